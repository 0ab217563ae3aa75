"""Streaming top-k similarity and retrieval recall (docs/losses.md §4), and the pooled patch-token
alignment loss (§3.2), against materialised computations."""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel, make_features


def _unit(*shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("n,m,k,chunk", [(1, 1, 1, None), (37, 50, 5, 7), (64, 300, 10, None), (20, 33, 33, 4),
                                         (30, 700, 70, 90)])
def test_topk_similarity_equals_topk_of_the_matrix(n, m, k, chunk):
    x, y = _unit(n, 16, seed=1, dtype=torch.float64), _unit(m, 16, seed=2, dtype=torch.float64)
    values, indices = FC.topk_similarity(x, y, k, chunk_size=chunk)
    want = torch.topk(x @ y.T, k, dim=1)
    assert torch.equal(indices, want.indices)
    assert_close_rel(values, want.values, rtol=1e-12, name="values")


def test_topk_similarity_ties_go_to_the_lower_index():
    """Small integer features: every similarity is an exact integer in any GEMM, so ties are exact."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (9, 8), generator=g).float()
    base = torch.randint(-2, 3, (6, 8), generator=g).float()
    y = torch.cat([base, base[[2, 0]], base, base[:3]])  # exact ties, some across chunks
    _, indices = FC.topk_similarity(x, y, 7, chunk_size=4)
    order = torch.sort(x @ y.T, dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(indices, order)
    # a long list (its later chunks' candidates counted above the running k-th): many exact ties
    y = torch.randint(-1, 2, (600, 8), generator=g).float()
    _, indices = FC.topk_similarity(x, y, 80, chunk_size=90)
    assert torch.equal(indices, torch.sort(x @ y.T, dim=1, descending=True, stable=True).indices[:, :80])


def test_retrieval_recall_both_directions():
    x, y = make_features(40, 40, 8, seed=5, duplicates=False)
    rec = FC.retrieval_recall(x, y, ks=(1, 5, 40))
    sim = x @ y.T
    target = torch.arange(40)[:, None]
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        for k in (1, 5, 40):
            assert rec[name][k] == pytest.approx(float((order[:, :k] == target).any(1).double().mean()))
    assert rec["image_to_text"][40] == 1.0


def test_topk_and_recall_bad_input():
    x, y = _unit(5, 4, seed=1), _unit(6, 4, seed=2)
    with pytest.raises(ValueError, match="k must be"):
        FC.topk_similarity(x, y, 7)
    with pytest.raises(ValueError, match="k must be"):
        FC.topk_similarity(x, y, 0)
    with pytest.raises(ValueError, match="one shape"):
        FC.retrieval_recall(x, y)
    with pytest.raises(ValueError, match="ks must be"):
        FC.retrieval_recall(x, x, ks=(1, 9))


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter), "auto"])
@pytest.mark.parametrize("pool_size,masked", [(None, False), (3, True), (5, True), (7, False)])
def test_pooled_alignment_against_the_materialised_cosines(backend, pool_size, masked):
    dtype, rtol = (torch.float32, 2e-5) if backend == "triton" else (torch.float64, 1e-11)
    b, m, length, d = 11, 7, 6, 8
    g = torch.Generator().manual_seed(0)
    v = torch.randn(b, m, d, generator=g, dtype=dtype)
    e = torch.randn(b, length, d, generator=g, dtype=dtype)
    mask = None
    if masked:
        mask = torch.arange(length)[None, :] < torch.randint(1, length + 1, (b,), generator=g)[:, None]
    leaves = [v.clone().requires_grad_(), e.clone().requires_grad_()]
    truth = [v.double().requires_grad_(), e.double().requires_grad_()]
    out = FC.pooled_alignment_loss(*leaves, word_mask=mask, pool_size=pool_size, backend=backend)
    want = R.pooled_alignment_loss_reference(*truth, word_mask=mask, pool_size=pool_size)
    assert out.dtype == dtype
    assert_close_rel(out, want, rtol=rtol, name="loss")
    for got, exp in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(want, truth)):
        assert_close_rel(got, exp, rtol=rtol, atol=rtol * 1e-3, name="grad")


def test_pooled_alignment_bad_input():
    v, e = torch.randn(4, 5, 3), torch.randn(4, 6, 3)
    with pytest.raises(ValueError, match="has no word"):
        FC.pooled_alignment_loss(v, e, word_mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="pool_size"):
        FC.pooled_alignment_loss(v, e, pool_size=6)
    with pytest.raises(ValueError, match="word_embeddings"):
        FC.pooled_alignment_loss(v, e[:, :, :2])
    with pytest.raises(ValueError, match="word_mask"):
        FC.pooled_alignment_loss(v, e, word_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        FC.pooled_alignment_loss(v, e, temperature=-1.0)
