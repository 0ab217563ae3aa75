"""Matryoshka over nested prefixes (docs/losses.md §2.7): ``matryoshka_dims``/``matryoshka_weights`` of
``multiple_negatives_ranking_loss``, ``clip_loss``, ``siglip_loss`` and ``gist_loss`` on every backend
against the float64 sum of each loss's reference over the prefixes (loss and the gradient of every
input, the logit scale and bias included), and the argument errors. sentence-transformers'
MatryoshkaLoss drop-in is in tests/test_st_matryoshka.py."""

import pytest
import torch
import torch.nn.functional as F

import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel, assert_matches_f64

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
            pytest.param("triton_fused", marks=pytest.mark.interpreter), "auto"]
DIMS, WEIGHTS = (24, 16, 8, 3), (1.0, 0.5, 2.0, 1.0)


def _pairs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    return a, a + 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64)


def _norm(x, d):
    return F.normalize(x[..., :d], dim=-1)


def _check(fn, ref, tensors, rtol=2e-5):
    assert_matches_f64(fn, ref, tensors, rtol=rtol)


def _sum(term):
    return sum(w * term(d) for d, w in zip(DIMS, WEIGHTS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_mnrl(backend, similarity):
    q, p = _pairs(19, 24)
    n = torch.randn(19, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scale = 20.0 if similarity == "cos" else 0.3
    kw = dict(scale=scale, similarity=similarity, directions=("query_to_doc", "doc_to_query"))
    _check(lambda q_, p_, n_: FC.multiple_negatives_ranking_loss(q_, [p_, n_], matryoshka_dims=DIMS,
                                                                 matryoshka_weights=WEIGHTS, backend=backend,
                                                                 chunk_size=7, **kw),
           lambda q_, p_, n_: _sum(lambda d: R.mnrl_loss_reference(q_[:, :d], [p_[:, :d], n_[:, :d]], **kw)),
           [q, p, n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_and_siglip(backend):
    a, b = _pairs(17, 24, seed=2)
    s, bias = torch.tensor(10.0), torch.tensor(-1.0)
    _check(lambda x, y, s_, b_: FC.clip_loss(x, y, s_, b_, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS,
                                             backend=backend, chunk_size=5),
           lambda x, y, s_, b_: _sum(lambda d: R.clip_loss_reference(_norm(x, d), _norm(y, d), s_, b_)),
           [a, b, s, bias])
    _check(lambda x, y, s_, b_: FC.siglip_loss(x, y, s_, b_, matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS,
                                               backend=backend),
           lambda x, y, s_, b_: _sum(lambda d: R.siglip_loss_reference(_norm(x, d), _norm(y, d), s_, b_)),
           [a, b, s, bias])


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_gist_shrinks_the_student_only(backend):
    a, p = _pairs(13, 24, seed=3)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 10, generator=g, dtype=torch.float64)
    ga, gp = a @ w + 0.3 * torch.randn(13, 10, generator=g, dtype=torch.float64), p @ w
    kw = dict(temperature=0.1, margin=0.05)
    _check(lambda x, y: FC.gist_loss(x, y, ga.float(), gp.float(), matryoshka_dims=DIMS, matryoshka_weights=WEIGHTS,
                                     backend=backend, **kw),
           lambda x, y: _sum(lambda d: R.gist_loss_reference(x[:, :d], y[:, :d], ga, gp, **kw)), [a, p])


def test_one_dim_is_the_plain_loss_weighted():
    a, b = _pairs(9, 8, seed=5)
    a, b = F.normalize(a, dim=1).float(), F.normalize(b, dim=1).float()
    plain = FC.clip_loss(a, b, 10.0, backend="cpp")
    assert_close_rel(FC.clip_loss(a, b, 10.0, matryoshka_dims=[8], matryoshka_weights=[3.0], backend="cpp"),
                     3 * plain, rtol=1e-6)


def test_errors():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    for dims, match in (([8, 8], "strictly descending"), ([4, 8], "strictly descending"), ([9, 4], r"\[1, D=8\]"),
                        ([0], r"\[1, D=8\]"), ([], "at least one")):
        with pytest.raises(ValueError, match=match):
            FC.clip_loss(a, b, 10.0, matryoshka_dims=dims)
    with pytest.raises(TypeError, match="ints"):
        FC.clip_loss(a, b, 10.0, matryoshka_dims=[8.0, 4.0])
    with pytest.raises(TypeError, match="sequence"):
        FC.multiple_negatives_ranking_loss(a, [b], matryoshka_dims=8)
    with pytest.raises(ValueError, match="one weight per dim"):
        FC.siglip_loss(a, b, 10.0, -10.0, matryoshka_dims=[8, 4], matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match="finite"):
        FC.clip_loss(a, b, 10.0, matryoshka_dims=[8, 4], matryoshka_weights=[1.0, float("inf")])
    with pytest.raises(ValueError, match="needs matryoshka_dims"):
        FC.multiple_negatives_ranking_loss(a, [b], matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match="needs matryoshka_dims"):
        FC.gist_loss(a, b, a, b, matryoshka_weights=[1.0])
