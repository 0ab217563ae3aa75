"""Distillation on two gloo ranks: fastcon.DistillClipLoss against open_clip's DistillClipLoss in every
(local_loss, gather_with_grad) mode (both outputs and the gradients of each), and FC.distill_loss of
every kind in the global mode against the one-process loss of the gathered batch."""
import datetime
import importlib.util

import pytest
import torch

import fastcon
import fastcon.functional as FC
from helpers import close_gloo, make_features, run_gloo

MODES = [(False, False), (False, True), (True, False), (True, True)]
KINDS = ["clip", "hycd", "cwcl"]


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _grads(out, leaves):
    return torch.autograd.grad(out, leaves, allow_unused=True)


def _worker(rank, world, port, out, backend):
    import traceback

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from fastcon.bench.providers import _load_open_clip_loss

        oc = _load_open_clip_loss()
        results = {}
        n, d = 5, 12
        x, y = make_features(n, n, d, seed=20 + rank, paired=False)
        tx, ty = make_features(n, n, d, seed=40 + rank, paired=False)
        scale, t_scale = torch.tensor(12.0), torch.tensor(21.0)  # replicated, as in training
        for local_loss, gather_with_grad in MODES:
            errs = results[local_loss, gather_with_grad] = {}
            kw = dict(rank=rank, world_size=world, local_loss=local_loss, gather_with_grad=gather_with_grad)
            ours = fastcon.DistillClipLoss(**kw, backend=backend)
            theirs = oc.DistillClipLoss(**kw)
            for k, key in enumerate(("contrastive_loss", "distill_loss", "sum")):
                got_l = [x.clone().requires_grad_(), y.clone().requires_grad_(), scale.clone().requires_grad_()]
                want_l = [x.clone().requires_grad_(), y.clone().requires_grad_(), scale.clone().requires_grad_()]
                got, want = ours(*got_l, tx, ty, t_scale), theirs(*want_l, tx, ty, t_scale)
                got, want = (sum(got), sum(want)) if k == 2 else (got[k], want[k])
                errs[key] = _rel(got.detach(), want.detach())
                for name, g, e in zip(("image", "text", "scale"), _grads(got, got_l), _grads(want, want_l)):
                    errs[f"{key} grad {name}"] = _rel(g, e)
        # every kind, global mode: the loss of the gathered batch in one process, and this rank's slice
        # of its gradients
        all_x = torch.cat([make_features(n, n, d, seed=20 + r, paired=False)[0] for r in range(world)])
        all_y = torch.cat([make_features(n, n, d, seed=20 + r, paired=False)[1] for r in range(world)])
        all_tx = torch.cat([make_features(n, n, d, seed=40 + r, paired=False)[0] for r in range(world)])
        all_ty = torch.cat([make_features(n, n, d, seed=40 + r, paired=False)[1] for r in range(world)])
        rows = slice(rank * n, (rank + 1) * n)
        for kind in KINDS:
            kw = dict(kind=kind, alpha=0.3, temperature=0.5) if kind == "hycd" else dict(kind=kind)
            leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), scale.clone().requires_grad_()]
            got = FC.distill_loss(*leaves, tx, ty, t_scale, process_group=dist.group.WORLD, backend=backend, **kw)
            whole = [all_x.clone().requires_grad_(), all_y.clone().requires_grad_(), scale.clone().requires_grad_()]
            want = FC.distill_loss(*whole, all_tx, all_ty, t_scale, backend="reference", **kw)
            errs = results[kind] = {"loss": _rel(got.detach(), want.detach())}
            g_got, g_want = _grads(got, leaves), _grads(want, whole)
            errs["grad image"] = _rel(g_got[0], g_want[0][rows])
            errs["grad text"] = _rel(g_got[1], g_want[1][rows])
            if kind != "hycd":  # the scale is not used by hycd
                total = g_got[2].clone()  # the scale's gradient of the global loss, on every rank
                errs["grad scale"] = _rel(total, g_want[2])
        out.put((rank, results))
    except Exception:
        out.put((rank, traceback.format_exc()))
    finally:
        close_gloo()


@pytest.fixture(scope="module", params=["cpp", "torch"])
def results(request):
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch; make test does)")
    return run_gloo(_worker, 2, request.param, timeout=180)


def _check(results, key, tol=2e-5):
    assert sorted(results) == [0, 1]
    for rank, res in results.items():
        assert isinstance(res, dict), f"rank {rank} failed:\n{res}"
        errs = res[key]
        worst = max(errs, key=errs.get)
        assert errs[worst] < tol, (rank, key, worst, errs)


@pytest.mark.parametrize("local_loss,gather_with_grad", MODES)
def test_distill_clip_loss_on_two_ranks_equals_open_clip(results, local_loss, gather_with_grad):
    _check(results, (local_loss, gather_with_grad))


@pytest.mark.parametrize("kind", KINDS)
def test_distill_loss_global_mode_is_the_loss_of_the_gathered_batch(results, kind):
    _check(results, kind)
