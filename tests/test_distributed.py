"""Distributed losses: the single-process oracle, then every rank of real gloo jobs against it.

The oracle (``fastcon.reference.clip_loss_ranks_reference`` / ``siglip_loss_ranks_reference``) simulates
all W ranks of open_clip's ``ClipLoss``/``SigLipLoss`` in one process. Its own tests below pin it to the
single-rank references and to the global loss of the concatenated batch, mode by mode.

The multi-process tests spawn W = 2 and 3 gloo ranks once each; every rank runs the whole case list of
``tests/dist_worker.py`` (different data on every rank, rows repeated across ranks, every
``(local_loss, gather_with_grad)`` mode, every ``dist_impl``, both CPU backends, n = 1 and 7) and
compares its loss and gradients with the oracle's values for its rank.
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import dist_worker
from fastcon import reference as R
from helpers import assert_close_rel

MODES = dist_worker.CLIP_MODES


# ---------------------------------------------------------------------------------------------------
# The oracle, single process


def _rank_data(world_size, n, d, seed=0, layout="hardneg"):
    images, texts = dist_worker.rank_features(seed, [n] * world_size, d, layout)
    return [x.double() for x in images], [y.double() for y in texts]


def _global(loss_fn, images, texts, scale, bias, **kw):
    """Loss and gradients of the single-rank reference on the concatenated batch."""
    x = torch.cat(images).requires_grad_(True)
    y = torch.cat(texts).requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(x, y, s, b, **kw)
    grads = torch.autograd.grad(loss, [x, y, s] + ([b] if b is not None else []))
    n = images[0].shape[0]
    return dict(loss=loss.detach(), grad_image=grads[0].split(n), grad_text=grads[1].split(n), grad_scale=grads[2],
                grad_bias=grads[3] if b is not None else None)


def _close(actual, expected, name):
    assert_close_rel(actual, expected, rtol=1e-11, atol=1e-13, name=name)


@pytest.mark.parametrize("local_loss,gather_with_grad", MODES)
@pytest.mark.parametrize("bias", [None, -2.5])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_clip_oracle_single_rank_is_the_reference(local_loss, gather_with_grad, bias, eps):
    images, texts = _rank_data(1, 7, 16)
    (res,) = R.clip_loss_ranks_reference(images, texts, 14.3, bias, local_loss=local_loss,
                                         gather_with_grad=gather_with_grad, label_smoothing=eps)
    exp = _global(R.clip_loss_reference, images, texts, 14.3, bias, label_smoothing=eps)
    _close(res["loss"], exp["loss"], "loss")
    _close(res["grad_image"], exp["grad_image"][0], "grad image")
    _close(res["grad_text"], exp["grad_text"][0], "grad text")
    _close(res["grad_scale"], exp["grad_scale"], "grad scale")
    if bias is None:
        assert res["grad_bias"] is None
    else:
        _close(res["grad_bias"], exp["grad_bias"], "grad bias")


def test_siglip_oracle_single_rank_is_the_reference():
    images, texts = _rank_data(1, 7, 16)
    (res,) = R.siglip_loss_ranks_reference(images, texts, 10.0, -10.0)
    exp = _global(R.siglip_loss_reference, images, texts, 10.0, -10.0)
    for key in ("loss", "grad_scale", "grad_bias"):
        _close(res[key], exp[key], key)
    _close(res["grad_image"], exp["grad_image"][0], "grad image")
    _close(res["grad_text"], exp["grad_text"][0], "grad text")


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("local_loss,gather_with_grad", MODES)
@pytest.mark.parametrize("bias,eps", [(None, 0.0), (-2.5, 0.1)])
def test_clip_oracle_against_the_global_batch(world_size, local_loss, gather_with_grad, bias, eps):
    """The per-rank values of each mode, derived from the global loss L of the concatenated batch."""
    n, scale = 5, 14.3
    images, texts = _rank_data(world_size, n, 16)
    ranks = R.clip_loss_ranks_reference(images, texts, scale, bias, local_loss=local_loss,
                                        gather_with_grad=gather_with_grad, label_smoothing=eps)
    exp = _global(R.clip_loss_reference, images, texts, scale, bias, label_smoothing=eps)
    W = world_size
    assert len(ranks) == W
    if local_loss:
        # Each rank's loss covers its own rows (both directions) against all N columns: the mean is L.
        _close(sum(r["loss"] for r in ranks) / W, exp["loss"], "mean of the local losses")
        # Scale and bias stay on the rank that used them; their sum is the gradient of Σ_r L_r = W·L.
        _close(sum(r["grad_scale"] for r in ranks), W * exp["grad_scale"], "Σ_r grad scale")
        if bias is not None:
            _close(sum(r["grad_bias"] for r in ranks), W * exp["grad_bias"], "Σ_r grad bias")
        # Rank r: its image rows against all texts, and its text rows against all images (not the
        # column term of the rectangular reference, which would see only the local images).
        for r, res in enumerate(ranks):
            row_term = F.cross_entropy(scale * images[r] @ torch.cat(texts).T + (bias or 0.0),
                                       torch.arange(n) + r * n, label_smoothing=eps)
            col_term = F.cross_entropy(scale * texts[r] @ torch.cat(images).T + (bias or 0.0),
                                       torch.arange(n) + r * n, label_smoothing=eps)
            _close(res["loss"], (row_term + col_term) / 2, f"rank {r} loss")
    else:
        for r, res in enumerate(ranks):  # every rank computes the global loss
            _close(res["loss"], exp["loss"], f"rank {r} loss")
            _close(res["grad_scale"], exp["grad_scale"], f"rank {r} grad scale")
            if bias is not None:
                _close(res["grad_bias"], exp["grad_bias"], f"rank {r} grad bias")
    for r, res in enumerate(ranks):
        if gather_with_grad:  # both local modes: Σ_q ∂L_q/∂X_r = W·∂L/∂X_r
            _close(res["grad_image"], W * exp["grad_image"][r], f"rank {r} grad image")
            _close(res["grad_text"], W * exp["grad_text"][r], f"rank {r} grad text")
        elif not local_loss:  # only through the re-inserted local slice: ∂L/∂X_r
            _close(res["grad_image"], exp["grad_image"][r], f"rank {r} grad image")
            _close(res["grad_text"], exp["grad_text"][r], f"rank {r} grad text")
        else:  # local_loss without a gradient-carrying gather: only the local factor of each direction
            x, y = images[r].clone().requires_grad_(True), texts[r].clone().requires_grad_(True)
            labels = torch.arange(n) + r * n
            row = F.cross_entropy(scale * x @ torch.cat(texts).T + (bias or 0.0), labels, label_smoothing=eps)
            col = F.cross_entropy(scale * y @ torch.cat(images).T + (bias or 0.0), labels, label_smoothing=eps)
            gx, gy = torch.autograd.grad((row + col) / 2, [x, y])
            _close(res["grad_image"], gx, f"rank {r} grad image")
            _close(res["grad_text"], gy, f"rank {r} grad text")
        if bias is None:
            assert res["grad_bias"] is None
        else:  # a bias shared by every logit of a row cancels in the softmax
            assert abs(res["grad_bias"].item()) < 1e-12


@pytest.mark.parametrize("world_size", [2, 3])
def test_siglip_oracle_against_the_global_batch(world_size):
    n, scale, bias = 5, 14.3, -2.5
    images, texts = _rank_data(world_size, n, 16)
    ranks = R.siglip_loss_ranks_reference(images, texts, scale, bias)
    exp = _global(R.siglip_loss_reference, images, texts, scale, bias)
    W = world_size
    _close(sum(r["loss"] for r in ranks), W * exp["loss"], "Σ_r loss")
    _close(sum(r["grad_scale"] for r in ranks), W * exp["grad_scale"], "Σ_r grad scale")
    _close(sum(r["grad_bias"] for r in ranks), W * exp["grad_bias"], "Σ_r grad bias")
    for r, res in enumerate(ranks):
        rows = R.siglip_loss_reference(images[r], torch.cat(texts), scale, bias, pos_offset=r * n)
        _close(res["loss"], rows, f"rank {r} loss (its rows against all columns)")
        _close(res["grad_image"], W * exp["grad_image"][r], f"rank {r} grad image")
        _close(res["grad_text"], W * exp["grad_text"][r], f"rank {r} grad text")


def test_oracle_rejects_unequal_batches():
    images, texts = dist_worker.rank_features(0, [4, 5], 8)
    with pytest.raises(ValueError, match=r"\[4, 5\]"):
        R.clip_loss_ranks_reference(images, texts, 14.3)
    with pytest.raises(ValueError, match=r"\[4, 5\]"):
        R.siglip_loss_ranks_reference(images, texts, 14.3, -2.5)


def test_hard_negative_layout_repeats_rows_across_ranks():
    images, texts = dist_worker.rank_features(3, [7, 7, 7], 16, "hardneg")
    assert torch.equal(images[1][0], images[0][0]) and torch.equal(texts[2][-1], texts[0][0])
    other, _ = dist_worker.rank_features(3, [7, 7, 7], 16, "random")
    assert not torch.equal(other[0], other[1])


# ---------------------------------------------------------------------------------------------------
# Spawned gloo ranks


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world_size, out_dir, *, kinds=None, timeout_s=150):
    """Spawns ``world_size`` gloo ranks running ``dist_worker.worker``; returns (per-rank records,
    exit codes, ranks that had to be killed)."""
    ctx = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=dist_worker.worker, args=(r, world_size, init_method, str(out_dir), kinds),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    killed = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in killed:
        procs[r].kill()
        procs[r].join()
    records = []
    for r in range(world_size):
        path = os.path.join(out_dir, f"rank{r}.json")
        records.append(json.load(open(path)) if os.path.exists(path) else [])
    return records, [p.exitcode for p in procs], killed


def _report(world_size, records, exitcodes, killed):
    """Failure lines, first the harness problems, then one line per (case, rank) that failed."""
    lines = []
    if killed:
        lines.append(f"ranks {killed} still running after the timeout (a hung collective?) and were killed")
    for r, (recs, code) in enumerate(zip(records, exitcodes)):
        if code != 0 and r not in killed:
            lines.append(f"rank {r} exited with code {code}")
        if not recs or recs[-1]["case"] != "<done>":
            last = recs[-1]["case"] if recs else "nothing"
            lines.append(f"rank {r} did not finish the case list (last record: {last})")
    failed_cases = {}
    for r, recs in enumerate(records):
        for rec in recs:
            if not rec["ok"]:
                failed_cases.setdefault(rec["case"], []).append((r, rec["errors"]))
    for case, ranks in failed_cases.items():
        first_rank, errors = ranks[0]
        lines.append(f"{case}: failed on ranks {[r for r, _ in ranks]}; rank {first_rank}: {errors[0].strip()}")
    n_failed = sum(not case.startswith("<") for case in failed_cases)
    n_run = min((sum(not rec["case"].startswith("<") for rec in recs) for recs in records), default=0)
    header = f"world_size={world_size}: {n_failed} of the {n_run} cases that every rank ran failed"
    return header, lines


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_losses_match_the_oracle_on_every_rank(world_size, tmp_path):
    records, exitcodes, killed = run_ranks(world_size, tmp_path)
    header, lines = _report(world_size, records, exitcodes, killed)
    tightest = max(((rec["error_over_bound"][0], rec["error_over_bound"][1], rec["case"])
                    for recs in records for rec in recs if rec.get("error_over_bound")), default=None)
    seconds = max(sum(rec["seconds"] for rec in recs) for recs in records)
    print(f"{header} in {seconds:.2f} s of case time; largest error/allowed: {tightest}")
    if lines:
        shown = "\n".join(line[:1500] for line in lines[:12])
        more = f"\n... and {len(lines) - 12} more" if len(lines) > 12 else ""
        pytest.fail(f"{header}\n{shown}{more}", pytrace=False)
