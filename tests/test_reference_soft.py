"""The references of the soft-target losses and regularisers (fastcon/reference/losses.py: distill_loss_reference,
distill_clip_loss_reference, align_uniform_loss_reference; docs/losses.md §1.3, §1.5), each against
open_clip's DistillClipLoss where it is installed and against formulations of their own (loops over
rows, F.kl_div, distances from dot products), loss and gradients, in float64."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from fastcon import reference as R
from helpers import assert_close_rel, make_features


def _inputs(n=9, d=6, seed=0):
    x, y = make_features(n, n, d, seed=seed, dtype=torch.float64)
    tx, ty = make_features(n, n, d, seed=seed + 1, dtype=torch.float64)
    return x, y, tx, ty


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves)


def _close(a, b, name):
    out_a, grads_a = a
    out_b, grads_b = b
    assert_close_rel(out_a, out_b, rtol=1e-12, atol=1e-14, name=name)
    for k, (g, e) in enumerate(zip(grads_a, grads_b)):
        assert_close_rel(g, e, rtol=1e-11, atol=1e-14, name=f"{name}: grad {k}")


def test_clip_distillation_against_open_clip():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch; make test does)")
    from fastcon.bench.providers import _load_open_clip_loss

    theirs_loss = _load_open_clip_loss().DistillClipLoss()
    x, y, tx, ty = _inputs()
    s, st = torch.tensor(14.3, dtype=torch.float64), torch.tensor(20.0, dtype=torch.float64)
    for k in range(2):  # contrastive, distill
        ours = _grads(lambda a, b, c: R.distill_clip_loss_reference(a, b, c, tx, ty, st)[k], x, y, s)
        theirs = _grads(lambda a, b, c: theirs_loss(a, b, c, tx, ty, st)[k], x, y, s)
        _close(ours, theirs, ["contrastive", "distill"][k])


def test_clip_distillation_against_rows_one_by_one():
    x, y, tx, ty = _inputs(7, 5, seed=3)

    def loops(a, b, c):
        s, t = c * a @ b.T, 11.0 * tx @ ty.T
        rows = [-(torch.softmax(t[i], 0) * torch.log_softmax(s[i], 0)).sum() for i in range(s.shape[0])]
        cols = [-(torch.softmax(t[:, j], 0) * torch.log_softmax(s[:, j], 0)).sum() for j in range(s.shape[1])]
        return (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2

    s = torch.tensor(9.0, dtype=torch.float64)
    _close(_grads(lambda a, b, c: R.distill_loss_reference(a, b, c, tx, ty, 11.0, kind="clip"), x, y, s),
           _grads(loops, x, y, s), "clip")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_hycd_against_kl_div(alpha, temperature):
    x, y, tx, ty = _inputs(8, 6, seed=5)
    n = x.shape[0]

    def kl_div(a, b):
        s, t = a @ b.T / temperature, tx @ ty.T / temperature
        total = 0
        for student, teacher in ((s, t), (s.T, t.T)):
            p = alpha * torch.eye(n, dtype=s.dtype) + (1 - alpha) * torch.softmax(teacher, 1)
            total = total + F.kl_div(torch.log_softmax(student, 1), p, reduction="batchmean") * temperature ** 2
        return total / 2

    # the logit scales are not used by this kind
    ours = _grads(lambda a, b: R.distill_loss_reference(a, b, 123.0, tx, ty, 7.0, kind="hycd", alpha=alpha,
                                                        temperature=temperature), x, y)
    _close(ours, _grads(kl_div, x, y), f"hycd alpha={alpha}")


def test_cwcl_against_loops():
    x, y, _, ty = _inputs(6, 5, seed=7)
    n = x.shape[0]

    def loops(a, b, c):
        s = c * a @ b.T
        q = ty / ty.norm(dim=1, keepdim=True)
        w = [[0.5 + 0.5 * float(q[i] @ q[j]) for j in range(n)] for i in range(n)]
        w = torch.tensor(w, dtype=s.dtype)
        i2t = sum(-(w[i] / (w[i].sum() + 1e-8) * torch.log_softmax(s[i], 0)).sum() for i in range(n)) / n
        t2i = sum(-(w[:, j] / (w[:, j].sum() + 1e-8) * torch.log_softmax(s[:, j], 0)).sum() for j in range(n)) / n
        return (i2t + t2i) / 2

    s = torch.tensor(12.0, dtype=torch.float64)
    # teacher_image_features and teacher_logit_scale are not used by this kind
    ours = _grads(lambda a, b, c: R.distill_loss_reference(a, b, c, torch.zeros(1), ty, None, kind="cwcl"), x, y, s)
    _close(ours, _grads(loops, x, y, s), "cwcl")
    # the frozen modality may be the student's own text features: no gradient through the weights
    _, grads = _grads(lambda a, b: R.distill_loss_reference(a, b, 12.0, a, b, None, kind="cwcl"), x, y)
    _, grads_detached = _grads(lambda a, b: R.distill_loss_reference(a, b, 12.0, a.detach(), b.detach(), None,
                                                                     kind="cwcl"), x, y)
    for g, e in zip(grads, grads_detached):
        assert torch.equal(g, e)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("alpha,t", [(2.0, 2.0), (1.0, 0.5)])
def test_align_uniform_against_pairs(cross, alpha, t):
    x, y = make_features(7, 7, 5, seed=11, dtype=torch.float64)
    n = x.shape[0]

    def pairs(a, b):
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        align = sum(((a[i] - b[i]) ** 2).sum() ** (alpha / 2) for i in range(n)) / n

        def unif(z):
            e = [torch.exp(-t * (2 - 2 * z[i] @ z[j])) for i in range(n) for j in range(i + 1, n)]
            return torch.log(torch.stack(e).mean())
        total = align + (unif(a) + unif(b)) / 2
        if cross:
            e = [torch.exp(-t * (2 - 2 * a[i] @ b[j])) for i in range(n) for j in range(n) if i != j]
            total = total + torch.log(torch.stack(e).mean())
        return total

    _close(_grads(lambda a, b: R.align_uniform_loss_reference(a, b, alpha=alpha, t=t, cross=cross), x, y),
           _grads(pairs, x, y), "align_uniform")
    terms = R.align_uniform_loss_reference(x, y, alpha=alpha, t=t, cross=cross, return_terms=True)
    assert set(terms) == {"align", "uniform", "total"} | ({"cross_uniform"} if cross else set())
    assert math.isclose(float(terms["total"]), float(sum(v for k, v in terms.items() if k != "total")))
