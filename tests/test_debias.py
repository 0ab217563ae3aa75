"""The debiased contrastive loss (docs/losses.md §2.5) as a target option: ``clip_loss(debias=τ⁺)`` and
``multiple_negatives_ranking_loss(debias=τ⁺)`` on every backend against the float64 reference (loss
and the gradient of every input, the logit scale's through the floor included), the reference
against the authors' formula written out, and the errors. The distributed forms are in
tests/test_targets_distributed.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastcon.functional as FC
from fastcon import reference as R
from fastcon.targets import debiased_terms
from helpers import assert_close_rel, assert_matches_f64

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
            pytest.param("triton_fused", marks=pytest.mark.interpreter), "auto"]


def _pairs(na, nb, d, seed=0, pos_offset=0):
    """Unit rows whose positives range from close to unrelated (noise weights 0.3 to 4), so that some
    rows are corrected and others meet the floor."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(na, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(torch.randn(nb, d, generator=g, dtype=torch.float64), dim=1)
    w = torch.linspace(0.3, 4.0, na, dtype=torch.float64)[torch.randperm(na, generator=g)]
    b[pos_offset:pos_offset + na] = F.normalize(a + w[:, None] * b[pos_offset:pos_offset + na], dim=1)
    return a, b


def _floored(logits, tau, scale):
    """How many rows of a one-positive-per-row logits matrix (positive on the diagonal) meet the floor."""
    n = logits.shape[0]
    lse = torch.logsumexp(logits, dim=1)
    m = torch.full((n,), logits.shape[1] - 1.0, dtype=torch.float64)
    return int(torch.isinf(debiased_terms(lse, m, logits.diagonal(), tau, torch.tensor(scale))[1]).sum())


def _check(fn, ref, tensors, rtol=2e-5):
    assert_matches_f64(fn, ref, tensors, rtol=rtol)


def test_reference_is_the_authors_formula():
    """The shifted reference against the formula as written (float64, moderate logits)."""
    a, b = _pairs(12, 12, 8)
    s, tau = 5.0, 0.1
    logits = s * a @ b.T
    n = 12
    e = torch.exp(logits)
    pos = e.diagonal()
    neg = e.sum(1) - pos
    floor = (n - 1) * math.exp(-s)
    ng = torch.clamp((neg - tau * (n - 1) * pos) / (1 - tau), min=floor)
    rows = -torch.log(pos / (pos + ng))
    ours = R.debiased_rows_reference(logits, torch.arange(n), None, tau, s)
    assert torch.allclose(ours, rows, rtol=1e-9, atol=1e-12)
    assert 0 < int((ng == floor).sum()) < n  # both regimes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,scale,tau,chunk", [(1, 3, 10.0, 0.1, None), (9, 8, 10.0, 0.3, None),
                                                 (37, 16, 3.0, 0.2, 5), (130, 64, 20.0, 0.1, 33)])
def test_clip(backend, n, d, scale, tau, chunk):
    a, b = _pairs(n, n, d)
    if n > 1:
        floored = _floored(scale * a @ b.T, tau, scale)
        assert 0 < floored < n, floored  # both the correction and the floor (the scale's extra gradient)
    _check(lambda x, y, s: FC.clip_loss(x, y, s, debias=tau, backend=backend, chunk_size=chunk),
           lambda x, y, s: R.clip_loss_reference(x, y, s, debias=tau), [a, b, torch.tensor(scale)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_rectangular_and_pair_mask(backend):
    a, b = _pairs(11, 19, 16, pos_offset=5)
    _check(lambda x, y, s: FC.clip_loss(x, y, s, debias=0.2, pos_offset=5, backend=backend, chunk_size=4),
           lambda x, y, s: R.clip_loss_reference(x, y, s, debias=0.2, pos_offset=5), [a, b, torch.tensor(8.0)])
    a, b = _pairs(23, 23, 16, seed=1)
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(23, 23, generator=g) > 0.3) | torch.eye(23, dtype=torch.bool)

    def ref(x, y, s):
        logits = s * x @ y.T
        idx = torch.arange(23)
        return (R.debiased_rows_reference(logits, idx, mask, 0.2, s).mean()
                + R.debiased_rows_reference(logits.T, idx, mask.T, 0.2, s).mean()) / 2

    _check(lambda x, y, s: FC.clip_loss(x, y, s, debias=0.2, pair_mask=mask, backend=backend), ref,
           [a, b, torch.tensor(8.0)])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_large_scale_stays_finite(backend):
    """s = 100 with unit rows: e^{S} overflows float64 without the log-space form."""
    a, b = _pairs(40, 40, 16)
    _check(lambda x, y, s: FC.clip_loss(x, y, s, debias=0.1, backend=backend),
           lambda x, y, s: R.clip_loss_reference(x, y, s, debias=0.1), [a, b, torch.tensor(100.0)])
    x = F.normalize(torch.randn(40, 16), dim=1)
    out = FC.clip_loss(x, x.clone(), torch.tensor(1000.0), debias=0.1, backend=backend)
    assert torch.isfinite(out)


def test_a_tiny_prior_is_the_plain_loss():
    a, b = _pairs(30, 30, 16, seed=2)
    a, b = a.float(), b.float()
    plain = FC.clip_loss(a, b, torch.tensor(10.0), backend="cpp")
    tiny = FC.clip_loss(a, b, torch.tensor(10.0), debias=1e-9, backend="cpp")
    assert_close_rel(tiny, plain, rtol=1e-5)


def _mnrl_data(b, m, d, seed=0):
    q, p = _pairs(b, b, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    negs = [F.normalize(q + 1.5 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1) for _ in range(m)]
    return [q, p] + negs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(),
    dict(m=2, similarity="dot"),
    dict(m=1, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
    dict(m=1, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    dict(m=2, hardness_mode="hard_negatives", hardness_strength=5.0, tau=0.3),
])
def test_mnrl(backend, case):
    case = dict(case)
    m, tau = case.pop("m", 0), case.pop("tau", 0.1)
    tensors = _mnrl_data(17, m, 16)
    kw = dict(scale=20.0, **case)
    _check(lambda q, *docs: FC.multiple_negatives_ranking_loss(q, list(docs), debias=tau, backend=backend,
                                                               chunk_size=6, **kw),
           lambda q, *docs: R.mnrl_loss_reference(q, list(docs), debias=tau, **kw), tensors)


def test_errors():
    x, y = F.normalize(torch.randn(6, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="debias must be in"):
            FC.clip_loss(x, y, 10.0, debias=bad)
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match="debias must be a float"):
            FC.clip_loss(x, y, 10.0, debias=bad)
    with pytest.raises(ValueError, match="debias does not combine"):
        FC.clip_loss(x, y, 10.0, -1.0, debias=0.1)
    with pytest.raises(ValueError, match="debias does not combine"):
        FC.clip_loss(x, y, 10.0, debias=0.1, labels=torch.arange(6))
    with pytest.raises(ValueError, match="debias does not combine"):
        FC.clip_loss(x, y, 10.0, debias=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="pos_offset"):
        FC.clip_loss(x, torch.randn(9, 4), 10.0, debias=0.1)
    with pytest.raises(TypeError):
        FC.siglip_loss(x, y, 10.0, debias=0.1)
    with pytest.raises(ValueError, match="debias must be in"):
        FC.multiple_negatives_ranking_loss(x, [y], debias=1.5)
