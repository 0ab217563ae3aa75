"""Worker side of tests/test_distributed.py: one spawned process per gloo rank runs every case.

Each case rebuilds the per-rank data of *all* ranks from the seeds, evaluates the single-process oracle
(``fastcon.reference.*_ranks_reference``, float64) for all ranks, runs the API under test on its own
rank's fp32 shard, and compares its loss and gradients with the oracle's entry for its rank. Results
go to ``rank{r}.json`` in the output folder after every case, so a hung or killed run still reports
the cases that finished.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

# A hung collective fails the case after this long instead of hanging CI.
COLLECTIVE_TIMEOUT_S = 30
# The control group (per-case status exchange) outlives a timed-out data collective.
CONTROL_TIMEOUT_S = 60
_BACKEND_ERRORS = (getattr(dist, "DistError", RuntimeError),)  # failed or timed-out collectives

CLIP_MODES = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)
SIGLIP_IMPLS = ["bidir", "shift", "reduce", "gather"]


# ---------------------------------------------------------------------------------------------------
# Data


def rank_features(seed, sizes, d, layout="random"):
    """Per-rank (image, text) fp32 shards, unit rows, each text row a noisy copy of its image row.

    ``sizes``: rows per rank. ``layout="hardneg"`` plants rows that repeat across ranks (the hard
    negatives a symmetric or wrongly-offset implementation gets wrong): rank 1's first image row is rank
    0's first image row, the last rank's last text row is rank 0's first text row (unless that would make
    the whole of rank 1 a copy of rank 0: W = 2, n = 1), and (n > 2) rank 0's third image row repeats its
    second.
    """
    images, texts = [], []
    for r, n in enumerate(sizes):
        g = torch.Generator().manual_seed(10_007 * seed + 101 * r + 1)
        x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
        noise = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
        images.append(x)
        texts.append(F.normalize(x + 0.8 * noise, dim=-1))
    if layout == "hardneg" and len(sizes) > 1:
        images[1][0] = images[0][0]
        if len(sizes) > 2 or sizes[-1] > 1:  # (not when that would make rank 1 a copy of rank 0)
            texts[-1][-1] = texts[0][0]
        if sizes[0] > 2:
            images[0][2] = images[0][1]
    return [x.float() for x in images], [y.float() for y in texts]


# ---------------------------------------------------------------------------------------------------
# Cases


def build_cases(world_size):
    """The case list; every rank builds the same list in the same order."""
    cases = []
    # 1. The harness itself: open_clip's code restated literally on real gloo collectives (materialised
    #    fp32 logits). These validate the oracle's per-rank semantics and the tolerances.
    for i, ((local_loss, gwg), bias) in enumerate(itertools.product(CLIP_MODES, (None, -2.5))):
        cases.append(dict(kind="clip_literal", local_loss=local_loss, gather_with_grad=gwg, n=7, d=16,
                          scale=(14.3, 100.0)[i % 3 == 1], bias=bias, eps=(0.0, 0.1)[i % 3 == 2],
                          layout="hardneg", seed=100 + i))
    cases.append(dict(kind="siglip_literal", n=7, d=16, scale=14.3, bias=-2.5, layout="hardneg", seed=110))

    # 2. ClipLoss: every mode, with and without bias, both backends, n = 1 and 7.
    variants = itertools.cycle([  # (d, scale, label_smoothing, layout); 5 is coprime with the 2-cycles
        (16, 14.3, 0.0, "random"), (3, 100.0, 0.1, "hardneg"), (16, 100.0, 0.0, "hardneg"),
        (3, 14.3, 0.0, "random"), (16, 14.3, 0.1, "hardneg")])
    for i, ((local_loss, gwg), bias, backend, n) in enumerate(
            itertools.product(CLIP_MODES, (None, -2.5), ("auto", "torch"), (1, 7))):
        d, scale, eps, layout = next(variants)
        cases.append(dict(kind="clip_module", local_loss=local_loss, gather_with_grad=gwg, n=n, d=d,
                          scale=scale, bias=bias, eps=eps, layout=layout, backend=backend,
                          chunk_size=5 if backend == "torch" else None, output_dict=i % 3 == 0,
                          cache_labels=i % 4 == 1, seed=200 + i))

    # 3. SigLipLoss: every dist_impl (and the default), both backends, n = 1 and 7.
    for i, (impl, backend, n) in enumerate(itertools.product(SIGLIP_IMPLS + [None], ("auto", "torch"), (1, 7))):
        cases.append(dict(kind="siglip_module", dist_impl=impl, n=n, d=(16, 3)[i % 2],
                          scale=(14.3, 100.0)[(i // 2) % 2], bias=-2.5, layout=("hardneg", "random")[i % 3 == 2],
                          backend=backend, chunk_size=5 if backend == "torch" else 0, output_dict=i % 4 == 0,
                          seed=300 + i))

    # 4. The functional forms with process_group=dist.group.WORLD.
    for i, (local_loss, gwg) in enumerate(CLIP_MODES):
        backend = ("auto", "torch")[i % 2]
        cases.append(dict(kind="clip_functional", group="world", local_loss=local_loss, gather_with_grad=gwg,
                          n=7, d=16, scale=(14.3, 100.0)[i // 2], bias=(-2.5, None)[i % 2], eps=(0.1, 0.0)[i // 2],
                          layout="hardneg", backend=backend, chunk_size=5 if backend == "torch" else None,
                          seed=400 + i))
    for i, backend in enumerate(("auto", "torch")):
        cases.append(dict(kind="siglip_functional", group="world", n=7, d=16, scale=(14.3, 100.0)[i], bias=-2.5,
                          layout="hardneg", backend=backend, chunk_size=5 if backend == "torch" else None,
                          seed=410 + i))

    # 5. A process group that is not the default one and whose ranks differ from the global ranks
    #    (ranks 1 and 2 of 3): rank and world size must come from the group.
    if world_size >= 3:
        cases.append(dict(kind="clip_functional", group="sub", local_loss=True, gather_with_grad=True, n=7, d=16,
                          scale=14.3, bias=-2.5, eps=0.1, layout="hardneg", backend="auto", chunk_size=None,
                          seed=500))
        cases.append(dict(kind="clip_module", group="sub", local_loss=False, gather_with_grad=True, n=7, d=3,
                          scale=100.0, bias=None, eps=0.0, layout="random", backend="torch", chunk_size=5,
                          output_dict=False, cache_labels=False, seed=501))
        cases.append(dict(kind="siglip_functional", group="sub", n=7, d=16, scale=14.3, bias=-2.5,
                          layout="hardneg", backend="torch", chunk_size=5, seed=502))

    # 6. Different upstream gradients on the ranks (e.g. per-rank loss weights): the cross-rank
    #    gradient contributions must carry the weight of the rank they come from.
    for i, (local_loss, gwg) in enumerate(CLIP_MODES):
        cases.append(dict(kind="clip_module", local_loss=local_loss, gather_with_grad=gwg, n=7, d=16, scale=14.3,
                          bias=-2.5, eps=0.1 if i % 2 else 0.0, layout="hardneg", backend="auto", chunk_size=None,
                          output_dict=False, cache_labels=False, seed=700 + i, upstream="per_rank"))
    for backend in ("auto", "torch"):
        cases.append(dict(kind="siglip_module", dist_impl=None, n=7, d=16, scale=14.3, bias=-2.5, layout="hardneg",
                          backend=backend, chunk_size=5 if backend == "torch" else 0, output_dict=False,
                          seed=710, upstream="per_rank"))

    # 7. Under CPU bf16 autocast: the oracle sees the features rounded to bf16 (what the GEMMs take);
    #    loss and gradients stay fp32 and keep the fp32 tolerances.
    for i, ((local_loss, gwg), backend) in enumerate(itertools.product(CLIP_MODES, ("auto", "torch"))):
        cases.append(dict(kind="clip_module", local_loss=local_loss, gather_with_grad=gwg, n=7, d=16, scale=14.3,
                          bias=(None, -2.5)[i % 2], eps=(0.0, 0.1)[i % 3 == 1], layout="hardneg", backend=backend,
                          chunk_size=5 if backend == "torch" else None, output_dict=False, cache_labels=False,
                          seed=800 + i, autocast="bfloat16"))
    for i, backend in enumerate(("auto", "torch")):
        cases.append(dict(kind="siglip_module", dist_impl=None, n=7, d=16, scale=14.3, bias=-2.5, layout="hardneg",
                          backend=backend, chunk_size=5 if backend == "torch" else 0, output_dict=False,
                          seed=810 + i, autocast="bfloat16"))

    # 8. Unequal local batches: every rank raises ValueError naming the sizes; then the group still works.
    sizes = [4 if r % 2 == 0 else 5 for r in range(world_size)]
    for kind in ("clip_module", "siglip_module", "clip_functional"):
        cases.append(dict(kind="unequal_" + kind, sizes=sizes, d=16, scale=14.3, bias=-2.5, seed=600))
    cases.append(dict(kind="clip_module", local_loss=True, gather_with_grad=True, n=7, d=16, scale=14.3, bias=-2.5,
                      eps=0.0, layout="random", backend="auto", chunk_size=None, output_dict=False,
                      cache_labels=False, seed=601, note="after the errors"))
    return cases


def case_name(case):
    parts = [case["kind"]]
    for key in ("group", "local_loss", "gather_with_grad", "dist_impl", "backend", "n", "sizes", "d", "scale",
                "bias", "eps", "layout", "upstream", "seed"):
        if key in case:
            parts.append(f"{key}={case[key]}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------
# open_clip's distributed code restated on gloo (the harness check)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def literal_open_clip_clip(x, y, scale, bias, *, local_loss, gather_with_grad, label_smoothing, group=None):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if gather_with_grad:
        all_x, all_y = _AllGatherWithGrad.apply(x, group), _AllGatherWithGrad.apply(y, group)
    else:
        gx, gy = [torch.zeros_like(x) for _ in range(world)], [torch.zeros_like(y) for _ in range(world)]
        dist.all_gather(gx, x.detach(), group=group)
        dist.all_gather(gy, y.detach(), group=group)
        if not local_loss:
            gx[rank], gy[rank] = x, y
        all_x, all_y = torch.cat(gx), torch.cat(gy)
    if local_loss:
        per_image, per_text = scale * x @ all_y.T, scale * y @ all_x.T
        labels = torch.arange(x.shape[0]) + rank * x.shape[0]
    else:
        per_image = scale * all_x @ all_y.T
        per_text = per_image.T
        labels = torch.arange(all_x.shape[0])
    if bias is not None:  # open_clip's in-place += on the aliased tensors adds it twice: same loss
        per_image, per_text = per_image + bias, per_text + bias
    return (F.cross_entropy(per_image, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(per_text, labels, label_smoothing=label_smoothing)) / 2


def literal_open_clip_siglip(x, y, scale, bias, group=None):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = x.shape[0]

    def sigmoid_loss(y_cols, negative_only):
        logits = scale * x @ y_cols.T + bias
        labels = -torch.ones_like(logits) if negative_only else 2 * torch.eye(n) - 1
        return -F.logsigmoid(labels * logits).sum() / n

    all_y = _AllGatherWithGrad.apply(y, group)  # open_clip's dist_impl="gather"
    loss = sigmoid_loss(y, False)
    for q in range(world):
        if q != rank:
            loss = loss + sigmoid_loss(all_y[q * n:(q + 1) * n], True)
    return loss


# ---------------------------------------------------------------------------------------------------
# Running one case


def _compare(got, expected, *, rtol, atol, name, margins):
    """Appends max error / allowed error to ``margins`` (diagnostics); returns mismatch messages."""
    from helpers import assert_close_rel
    if got is None:
        return [f"{name}: no gradient"]
    if got.dtype != torch.float32:
        return [f"{name}: dtype {got.dtype}, expected torch.float32"]
    if got.shape != expected.shape:
        return [f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"]
    bound = rtol * expected.abs().max().item() + atol
    margins.append(((got.detach().double() - expected).abs().max().item() / bound, name))
    try:
        assert_close_rel(got, expected, rtol=rtol, atol=atol, name=name)
    except AssertionError as e:
        return [str(e)]
    return []


def _check_against_oracle(case, loss, leaves, expected, n, margins):
    x, y, scale, bias = leaves
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        return [f"loss is not a 0-d tensor: {loss!r}"]
    # Absolute floors (they matter where the expected values cancel to ~0): fp32 logits of size s carry
    # rounding errors ~ε·s, which the softmax turns into errors ~ε·s/n of ∂L/∂S, and the feature
    # gradient s·(∂L/∂S)·Y multiplies by s again.
    s = max(1.0, case["scale"])
    scalar_atol = 2e-6 * s
    feature_atol = (1e-6 * s + 2e-8 * s * s) / n
    checks = [("loss", loss.detach(), expected["loss"], scalar_atol),
              ("grad image_features", x.grad, expected["grad_image"], feature_atol),
              ("grad text_features", y.grad, expected["grad_text"], feature_atol),
              ("grad logit_scale", scale.grad, expected["grad_scale"], scalar_atol)]
    if bias is not None:
        checks.append(("grad logit_bias", bias.grad, expected["grad_bias"], scalar_atol))
    errors = []
    for name, got, exp, atol in checks:
        errors += _compare(got, exp, rtol=1e-5, atol=atol, name=name, margins=margins)
    return errors


def _leaves(x, y, case):
    scale = torch.tensor(case["scale"], dtype=torch.float32, requires_grad=True)
    bias = None if case["bias"] is None else torch.tensor(case["bias"], dtype=torch.float32, requires_grad=True)
    return x.clone().requires_grad_(True), y.clone().requires_grad_(True), scale, bias


def _unwrap(out, output_dict):
    if output_dict:
        if not isinstance(out, dict) or set(out) != {"contrastive_loss"}:
            raise AssertionError(f"output_dict=True returned {type(out).__name__} "
                                 f"{sorted(out) if isinstance(out, dict) else ''}")
        return out["contrastive_loss"]
    return out


def run_case(case, groups, margins):
    """Returns a list of mismatch messages (empty: pass). Exceptions propagate to the caller."""
    import fastcon
    import fastcon.functional as FC
    from fastcon import reference as R

    kind = case["kind"]
    group = groups.get(case.get("group", "world"))
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        return []  # this rank is not in the case's group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pg = None if case.get("group", "world") == "world" and kind.endswith("module") else group

    if kind.startswith("unequal_"):
        return _run_unequal(case, kind[len("unequal_"):], rank, world, fastcon, FC)

    n = case["n"]
    images, texts = rank_features(case["seed"], [n] * world, case["d"], case["layout"])
    x, y, scale, bias = leaves = _leaves(images[rank], texts[rank], case)
    # The oracle sees exactly the values the rank's GEMMs get (fp32, or rounded to the autocast dtype),
    # in float64.
    autocast = getattr(torch, case["autocast"]) if case.get("autocast") else None
    seen = (lambda t: t.to(autocast).double()) if autocast is not None else (lambda t: t.double())
    ref_inputs = ([seen(t) for t in images], [seen(t) for t in texts], scale.detach().double(),
                  None if bias is None else bias.detach().double())
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        return _run_loss(case, kind, rank, world, group, pg, leaves, ref_inputs, n, margins)


def _run_loss(case, kind, rank, world, group, pg, leaves, ref_inputs, n, margins):
    import fastcon
    import fastcon.functional as FC
    from fastcon import reference as R

    x, y, scale, bias = leaves

    upstream = [1.0 + 0.5 * q for q in range(world)] if case.get("upstream") == "per_rank" else None
    if kind.startswith("clip"):
        expected = R.clip_loss_ranks_reference(*ref_inputs, local_loss=case["local_loss"],
                                               gather_with_grad=case["gather_with_grad"],
                                               label_smoothing=case["eps"], upstream=upstream)[rank]
        if kind == "clip_literal":
            loss = literal_open_clip_clip(x, y, scale, bias, local_loss=case["local_loss"],
                                          gather_with_grad=case["gather_with_grad"], label_smoothing=case["eps"])
        elif kind == "clip_module":
            module = fastcon.ClipLoss(local_loss=case["local_loss"], gather_with_grad=case["gather_with_grad"],
                                      cache_labels=case["cache_labels"], rank=rank, world_size=world,
                                      label_smoothing=case["eps"], backend=case["backend"],
                                      chunk_size=case["chunk_size"], process_group=pg)
            loss = _unwrap(module(x, y, scale, bias, output_dict=case["output_dict"]), case["output_dict"])
        elif kind == "clip_functional":
            loss = FC.clip_loss(x, y, scale, bias, label_smoothing=case["eps"], local_loss=case["local_loss"],
                                gather_with_grad=case["gather_with_grad"], process_group=group,
                                backend=case["backend"], chunk_size=case["chunk_size"])
        else:
            raise ValueError(f"unknown case kind {kind}")
    else:
        expected = R.siglip_loss_ranks_reference(*ref_inputs, upstream=upstream)[rank]
        if kind == "siglip_literal":
            loss = literal_open_clip_siglip(x, y, scale, bias)
        elif kind == "siglip_module":
            module = fastcon.SigLipLoss(rank=rank, world_size=world, dist_impl=case["dist_impl"],
                                        chunk_size=case["chunk_size"], backend=case["backend"], process_group=pg)
            loss = _unwrap(module(x, y, scale, bias, output_dict=case["output_dict"]), case["output_dict"])
        elif kind == "siglip_functional":
            loss = FC.siglip_loss(x, y, scale, bias, process_group=group, backend=case["backend"],
                                  chunk_size=case["chunk_size"])
        else:
            raise ValueError(f"unknown case kind {kind}")
    if not isinstance(loss, torch.Tensor):
        return [f"returned {type(loss).__name__}, expected a tensor"]
    if loss.dtype != torch.float32:
        return [f"loss dtype {loss.dtype}, expected torch.float32"]
    with torch.autocast("cpu", enabled=False):
        loss.backward(None if upstream is None else torch.tensor(upstream[rank], dtype=loss.dtype))
    return _check_against_oracle(case, loss, leaves, expected, n, margins)


def _run_unequal(case, kind, rank, world, fastcon, FC):
    sizes = case["sizes"]
    images, texts = rank_features(case["seed"], sizes, case["d"])
    x, y, scale, bias = _leaves(images[rank], texts[rank], case)
    try:
        if kind == "clip_module":
            fastcon.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(x, y, scale, bias)
        elif kind == "siglip_module":
            fastcon.SigLipLoss(rank=rank, world_size=world)(x, y, scale, bias)
        else:
            FC.clip_loss(x, y, scale, bias, local_loss=True, gather_with_grad=True, process_group=dist.group.WORLD)
    except ValueError as e:
        missing = [s for s in sorted(set(sizes)) if not re.search(rf"(?<!\d){s}(?!\d)", str(e))]
        if missing:
            return [f"ValueError does not name the local batch sizes {sorted(set(sizes))}: {e}"]
        return []
    return [f"no ValueError for local batch sizes {sizes}"]


# ---------------------------------------------------------------------------------------------------
# Process entry point


def worker(rank, world_size, init_method, out_dir, kinds=None):
    """Spawned once per rank. ``kinds``: run only cases of these kinds (None: all)."""
    torch.set_num_threads(1)
    out_path = os.path.join(out_dir, f"rank{rank}.json")
    records = []

    def save():
        with open(out_path + ".tmp", "w") as f:
            json.dump(records, f)
        os.replace(out_path + ".tmp", out_path)

    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
        groups = {"world": dist.group.WORLD}
        if world_size >= 3:  # new_group is collective: every rank creates it, members get a handle
            groups["sub"] = dist.new_group(ranks=[1, 2], backend="gloo",
                                           timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        cases = [c for c in build_cases(world_size) if kinds is None or c["kind"] in kinds]
        for case in cases:
            start = time.perf_counter()
            raised = timed_out = False
            margins = []
            try:
                errors = run_case(case, groups, margins)
            except Exception as e:  # noqa: BLE001 - reported to the parent
                raised = True
                timed_out = isinstance(e, _BACKEND_ERRORS) or "timed out" in str(e).lower()
                tb = traceback.format_exception(type(e), e, e.__traceback__)
                errors = [f"{type(e).__name__}: {e}\n" + "".join(tb[-4:])]
            worst = max(margins, default=(0.0, ""))
            records.append(dict(case=case_name(case), ok=not errors, errors=errors,
                                seconds=round(time.perf_counter() - start, 4),
                                error_over_bound=[round(worst[0], 4), worst[1]]))
            save()
            flags = torch.tensor([int(raised), int(timed_out)])
            dist.all_reduce(flags, group=control)
            n_raised, n_timed_out = flags.tolist()
            if 0 < n_raised < world_size or n_timed_out:
                # The ranks' collectives may be out of step: the next cases would only hang.
                records.append(dict(case="<aborted>", ok=False, seconds=0.0, errors=[
                    f"in the case above {n_raised} of {world_size} ranks raised ({n_timed_out} from a "
                    "collective that timed out or failed); the remaining cases were skipped"]))
                save()
                break
        dist.destroy_process_group()
        records.append(dict(case="<done>", ok=True, errors=[], seconds=0.0))
    except Exception as e:  # noqa: BLE001
        records.append(dict(case="<worker>", ok=False, seconds=0.0,
                            errors=["".join(traceback.format_exception(type(e), e, e.__traceback__))]))
    save()
