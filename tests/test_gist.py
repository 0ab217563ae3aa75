"""GISTEmbed's guided negatives (docs/losses.md §2.6): ``fastcon.functional.gist_loss`` on every backend
against the float64 reference (loss and the gradient of every student input), with false negatives
that the guide drops in every block, ties at the margin, both margin strategies, the contrast options
and negatives as (B, D) or (B, m, D); the reference against sentence-transformers' own materialised
formula is in tests/test_st_gist.py; across gloo ranks (``process_group``) against the reference's
gathered form; the errors."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel, run_gloo

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
            pytest.param("triton_fused", marks=pytest.mark.interpreter), "auto"]


def _data(b, d, dg, m, seed=0, duplicates=False):
    """Student and guide embeddings (float64) of B pairs and m negatives each: the guide a noisy
    linear map of the student's texts, some negatives close to their anchor (false negatives for a
    margin); with ``duplicates`` two anchors share one positive text (the same student and guide
    vectors: a tie at margin 0)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    a = torch.randn(b, d, generator=g, dtype=f64)
    p = a + 0.9 * torch.randn(b, d, generator=g, dtype=f64)
    w = torch.randn(d, dg, generator=g, dtype=f64)
    ga, gp = a @ w + 0.3 * torch.randn(b, dg, generator=g, dtype=f64), p @ w
    n = a[:, None] + 1.2 * torch.randn(b, max(m, 1), d, generator=g, dtype=f64)
    gn = n @ w
    if duplicates:
        p[1], gp[1] = p[0], gp[0]
    if m == 0:
        return a, p, ga, gp, None, None
    return a, p, ga, gp, n, gn


def _dropped(a, p, ga, gp, gn, margin, strategy):
    """How many non-positive pairs of the anchor-positive and anchor-negative blocks the guide drops."""
    ga, gp = F.normalize(ga, dim=-1), F.normalize(gp, dim=-1)
    theta = (ga * gp).sum(-1, keepdim=True)
    bound = theta - margin if strategy == "absolute" else theta - theta.abs() * margin
    sims = [ga @ gp.T] + ([] if gn is None else [ga @ F.normalize(gn, dim=-1).reshape(-1, ga.shape[1]).T])
    eye = torch.eye(a.shape[0], dtype=torch.bool)
    return int(((sims[0] > bound) & ~eye).sum()) + sum(int((s > bound).sum()) for s in sims[1:])


def _check(backend, data, rtol=2e-5, chunk_size=None, atol=1e-6, **kw):
    a, p, ga, gp, n, gn = data
    student = [a, p] + ([n] if n is not None else [])
    ours = [t.float().requires_grad_() for t in student]
    truth = [t.clone().requires_grad_() for t in student]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the auto backend's one-time fallback notice
        out = FC.gist_loss(ours[0], ours[1], ga.float(), gp.float(), negatives=ours[2] if n is not None else None,
                           guide_negatives=None if gn is None else gn.float(), backend=backend,
                           chunk_size=chunk_size, **kw)
    expected = R.gist_loss_reference(truth[0], truth[1], ga, gp, truth[2] if n is not None else None, gn, **kw)
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close_rel(out, expected, rtol=rtol, atol=atol, name="loss")
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, ours), torch.autograd.grad(expected, truth))):
        assert_close_rel(g, e, rtol=rtol, atol=atol, name=f"grad of input {i}")


CASES = [
    dict(b=1, m=0),
    dict(b=13, m=0, margin=0.0),
    dict(b=13, m=1, margin=0.05, chunk_size=5),
    dict(b=17, m=3, margin=0.1, margin_strategy="relative", chunk_size=6),
    dict(b=17, m=2, margin=0.0, contrast_anchors=False),
    dict(b=17, m=2, margin=-0.1, contrast_positives=False),
    dict(b=9, m=0, margin=0.2, margin_strategy="relative", contrast_anchors=False, contrast_positives=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_against_the_reference(backend, case):
    case = dict(case)
    b, m = case.pop("b"), case.pop("m")
    data = _data(b, 16, 12, m, seed=b + m)
    if b > 1:  # the guide drops pairs: the rule is exercised, not only the softmax
        assert _dropped(data[0], data[1], data[2], data[3], data[5], case.get("margin", 0.0),
                        case.get("margin_strategy", "absolute")) > 0
    _check(backend, data, temperature=0.05, **case)


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_duplicate_positive_ties_at_margin_zero(backend):
    """Anchors 0 and 1 share a positive text: for row 0 the column P_1 has exactly the guide similarity
    θ_0, which margin 0 keeps (``>`` drops); a margin of 1e-6 drops it."""
    data = _data(8, 16, 12, 0, seed=3, duplicates=True)
    _check(backend, data, temperature=0.1, margin=0.0)
    _check(backend, data, temperature=0.1, margin=1e-6)
    a, p, ga, gp, _, _ = data
    kw = dict(temperature=0.1, backend=backend)
    kept = FC.gist_loss(a.float(), p.float(), ga.float(), gp.float(), margin=0.0, **kw)
    dropped = FC.gist_loss(a.float(), p.float(), ga.float(), gp.float(), margin=1e-6, **kw)
    assert kept > dropped  # the duplicate is a kept negative at 0, dropped just above


def test_guide_inputs_get_no_gradient_and_any_guide_dim():
    a, p, ga, gp, n, gn = _data(7, 8, 24, 2, seed=5)
    gaf, gpf = ga.float().requires_grad_(), gp.float().requires_grad_()
    af = a.float().requires_grad_()
    out = FC.gist_loss(af, p.float(), gaf, gpf, negatives=n.float(), guide_negatives=gn.float(), margin=0.1)
    out.backward()
    assert gaf.grad is None and gpf.grad is None and af.grad is not None


def test_errors():
    a, p, ga, gp = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="guide_anchor must have the anchors' batch size"):
        FC.gist_loss(a, p, torch.randn(5, 6), gp)
    with pytest.raises(ValueError, match="positive must have"):
        FC.gist_loss(a, torch.randn(3, 8), ga, gp)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        FC.gist_loss(a, p, ga, torch.randn(4, 5))
    with pytest.raises(ValueError, match="go together"):
        FC.gist_loss(a, p, ga, gp, negatives=torch.randn(4, 8))
    with pytest.raises(ValueError, match="negatives must be"):
        FC.gist_loss(a, p, ga, gp, negatives=torch.randn(3, 8), guide_negatives=torch.randn(3, 6))
    with pytest.raises(ValueError, match="count m"):
        FC.gist_loss(a, p, ga, gp, negatives=torch.randn(4, 2, 8), guide_negatives=torch.randn(4, 3, 6))
    with pytest.raises(ValueError, match="margin_strategy"):
        FC.gist_loss(a, p, ga, gp, margin_strategy="percent")
    with pytest.raises(ValueError, match="temperature"):
        FC.gist_loss(a, p, ga, gp, temperature=0.0)
    with pytest.raises(ValueError, match="margin must be"):
        FC.gist_loss(a, p, ga, gp, margin=float("nan"))
    with pytest.raises(TypeError, match="contrast_anchors"):
        FC.gist_loss(a, p, ga, gp, contrast_anchors=1)
    with pytest.raises(TypeError, match="dtype"):
        FC.gist_loss(a.long(), p, ga, gp)


# ---------------------------------------------------------------------------------------------------
# process_group: each rank's anchors against every rank's positives and negatives

B, M = 5, 2


def _rank_data(world):
    return [_data(B, 8, 6, M, seed=40 + r) for r in range(world)]


def _oracle(rank, world, kw):
    """This rank's loss and the gradients its inputs receive (float64): its anchors' from its own loss,
    its positives' and negatives' the sum over every rank's loss (the gathered copies' gradients
    flow home)."""
    data = _rank_data(world)
    a_all = [d[0].clone().requires_grad_() for d in data]
    p_world = torch.cat([d[1] for d in data]).requires_grad_()
    n_world = torch.cat([d[4] for d in data]).requires_grad_()
    gp_world, gn_world = torch.cat([d[3] for d in data]), torch.cat([d[5] for d in data])
    losses = [R.gist_loss_reference(a_all[r], p_world, data[r][2], gp_world, n_world, gn_world, offset=r * B, **kw)
              for r in range(world)]
    gp_, gn_ = torch.autograd.grad(sum(losses), [p_world, n_world], retain_graph=True)
    ga_, = torch.autograd.grad(losses[rank], [a_all[rank]])
    rows = slice(rank * B, (rank + 1) * B)
    return losses[rank].detach(), [ga_, gp_[rows], gn_[rows]]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    from helpers import close_gloo

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {}
        for name, kw in (("absolute", dict(margin=0.05)), ("relative-no-anchors",
                         dict(margin=0.1, margin_strategy="relative", contrast_anchors=False))):
            kw = dict(kw, temperature=0.1)
            expected, grads = _oracle(rank, world, kw)
            a, p, ga, gp, n, gn = _rank_data(world)[rank]
            for backend in ("torch", "cpp"):
                leaves = [t.clone().requires_grad_() for t in (a, p, n)]
                value = FC.gist_loss(leaves[0], leaves[1], ga, gp, negatives=leaves[2], guide_negatives=gn,
                                     process_group=dist.group.WORLD, backend=backend, **kw)
                got = torch.autograd.grad(value, leaves)
                errs = [abs(value.item() - expected.item()) / abs(expected.item())]
                errs += [((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, grads)]
                res[f"{name}/{backend}"] = max(errs)
        out.put((rank, res))
    except Exception as exc:  # reported to the test, which fails on it
        out.put((rank, {"error": repr(exc)}))
    finally:
        close_gloo()


@pytest.mark.parametrize("world", [2, 3])
def test_process_group_against_the_gathered_reference(world):
    for rank, res in run_gloo(_worker, world, timeout=600).items():
        assert "error" not in res, (rank, res)
        bad = {k: v for k, v in res.items() if not v < 1e-10}
        assert not bad, (rank, bad)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_tiny_loss_keeps_its_gradients(backend):
    """Well separated pairs at temperature 0.01: the loss is ~1e-11 and the positives' softmax 1 − 1e-11.
    exp(x) − 1 would cancel every bit of the positive's gradient; expm1(x) keeps them."""
    from fastcon.bench.measure import make_inputs
    from fastcon.bench.providers import gist_guide

    a, p = make_inputs(48, 32, torch.float32, "cpu", seed=1, loss="gist")
    ga, gp = gist_guide(a, p)
    data = (a.double(), p.double(), ga.double(), gp.double(), None, None)
    assert R.gist_loss_reference(*data[:4]) < 1e-9
    _check(backend, data, rtol=1e-3, atol=0.0, temperature=0.01)
