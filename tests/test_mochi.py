"""MoCHi (docs/losses.md §2.2): FC.mochi_loss and fastcon.MoCHiLoss on every backend against the
materialised reference (explicit mixes and a generator, a queue and the batch's own keys, ties in the
queue), the streaming top-N against a full stable sort, and bad input."""
import pytest
import torch

import fastcon
import fastcon.functional as FC
from fastcon import reference as R
from fastcon.kernels.mixing import top_negatives
from helpers import assert_close_rel

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter), "auto"]


def _unit(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _data(b=20, k=50, d=8, dtype=torch.float64):
    return _unit(b, d, seed=1, dtype=dtype), _unit(b, d, seed=2, dtype=dtype), _unit(k, d, seed=3, dtype=dtype)


def _compare(backend, q, k, queue, *, in_batch=False, top_n=7, n_mix=5, n_query_mix=3, chunk=6, seed=11, rtol):
    leaves = q.clone().requires_grad_()
    loss, mixes = FC.mochi_loss(leaves, k, queue, top_n=top_n, n_mix=n_mix, n_query_mix=n_query_mix, in_batch=in_batch,
                                generator=torch.Generator().manual_seed(seed), return_mixes=True, backend=backend,
                                chunk_size=chunk)
    truth = q.double().requires_grad_()
    want = R.mochi_loss_reference(truth, k.double(), None if queue is None else queue.double(), mixes,
                                  top_n=top_n, in_batch=in_batch)
    assert loss.dtype == q.dtype and loss.shape == ()
    assert_close_rel(loss, want, rtol=rtol, name="loss")
    (g,), (e,) = torch.autograd.grad(loss, [leaves]), torch.autograd.grad(want, [truth])
    assert_close_rel(g, e, rtol=rtol, atol=rtol * 1e-3, name="grad q")
    return loss, mixes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("sizes", [(7, 5, 3), (7, 0, 3), (7, 5, 0), (0, 0, 0), (19, 40, 8)])
def test_mochi_against_reference(backend, in_batch, sizes):
    dtype, rtol = (torch.float32, 2e-5) if backend.startswith("triton") else (torch.float64, 1e-12)
    q, k, queue = _data(dtype=dtype)
    top_n, n_mix, n_query_mix = sizes
    _compare(backend, q, k, None if in_batch else queue, in_batch=in_batch, top_n=top_n, n_mix=n_mix,
             n_query_mix=n_query_mix, rtol=rtol)


@pytest.mark.interpreter
@pytest.mark.parametrize("in_batch", [False, True])
def test_mochi_on_the_fused_tile_kernels(in_batch):
    test_mochi_against_reference("triton_fused", in_batch, (19, 40, 8))


def test_mochi_fp32_and_the_module():
    q, k, queue = _data(dtype=torch.float32)
    _compare("cpp", q, k, queue, rtol=2e-5)
    module = fastcon.MoCHiLoss(top_n=7, n_mix=5, n_query_mix=3)
    g = torch.Generator().manual_seed(3)
    loss, mixes = module(q, k, queue, generator=g, return_mixes=True)
    assert torch.equal(loss, FC.mochi_loss(q, k, queue, top_n=7, n_mix=5, n_query_mix=3, mixes=mixes))


def test_mochi_without_mixing_is_moco_infonce():
    q, k, queue = _data()
    loss = FC.mochi_loss(q, k, queue, top_n=0, n_mix=0, n_query_mix=0)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
    want = torch.nn.functional.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.int64))
    assert_close_rel(loss, want, rtol=1e-12, name="MoCo InfoNCE")


def test_mochi_draws_from_the_generator_and_returns_them():
    q, k, queue = _data()
    run = lambda seed: FC.mochi_loss(q, k, queue, top_n=7, n_mix=5, n_query_mix=3,  # noqa: E731
                                     generator=torch.Generator().manual_seed(seed), return_mixes=True)
    (l1, m1), (l2, _), (l3, _) = run(5), run(5), run(6)
    assert torch.equal(l1, l2) and not torch.equal(l1, l3)
    assert m1["pair_ranks"].shape == (20, 5, 2) and m1["query_ranks"].shape == (20, 3)
    assert float(m1["alpha"].min()) >= 0 and float(m1["alpha"].max()) < 1
    assert float(m1["beta"].min()) >= 0 and float(m1["beta"].max()) < 0.5
    assert int(m1["pair_ranks"].max()) < 7
    assert torch.equal(FC.mochi_loss(q, k, queue, top_n=7, n_mix=5, n_query_mix=3, mixes=m1), l1)


def test_mochi_keys_and_queue_get_no_gradient():
    q, k, queue = _data()
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_(), queue.clone().requires_grad_()]
    FC.mochi_loss(*leaves, top_n=7, n_mix=5, n_query_mix=3).backward()
    assert leaves[0].grad is not None and leaves[1].grad is None and leaves[2].grad is None


@pytest.mark.parametrize("chunk_cols", [1, 3, 8, 64])
@pytest.mark.parametrize("exclude_own", [False, True])
def test_top_negatives_with_ties_are_ranked_by_the_lower_index(chunk_cols, exclude_own):
    """Duplicate rows in the negatives (exact ties) are ranked by the lower index across chunks. The
    features are multiples of 1/4 with small numerators, so that every similarity is exact in any
    summation order: a BLAS may round a duplicate row's products differently at another position of
    the same GEMM (MKL on AMD EPYC does, by an ulp), and then a duplicate is no tie."""
    g = torch.Generator().manual_seed(5)
    q, base = (torch.randint(-4, 5, (n, 8), generator=g).double() / 4 for n in (20, 12))
    negatives = torch.cat([base, base[[3, 1, 3, 7]], base[:4]])  # ties, some across chunk boundaries
    if exclude_own:
        negatives = negatives[:q.shape[0]]
    top, _ = top_negatives(q, negatives, 9, exclude_own=exclude_own, chunk_cols=chunk_cols)
    assert torch.equal(top, R.mochi_top_indices(q, negatives, 9, in_batch=exclude_own))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_mochi_with_ties_in_the_queue(backend):
    q, k, base = _data(k=12)
    queue = torch.cat([base, base, base[:5]])
    _compare(backend, q, k, queue, top_n=9, chunk=4, rtol=1e-12)


def test_mochi_bad_input():
    q, k, queue = _data(k=10)
    with pytest.raises(ValueError, match="top_n=11 is more than the queue's K: 10"):
        FC.mochi_loss(q, k, queue, top_n=11)
    with pytest.raises(ValueError, match="top_n=20 is more than the other keys of the batch: 19"):
        FC.mochi_loss(q, k, top_n=20, in_batch=True)
    with pytest.raises(ValueError, match="top_n=0 turns mixing off"):
        FC.mochi_loss(q, k, queue, top_n=0, n_mix=4, n_query_mix=0)
    with pytest.raises(ValueError, match="queue=None"):
        FC.mochi_loss(q, k, queue, top_n=3, in_batch=True)
    with pytest.raises(ValueError, match="needs a queue"):
        FC.mochi_loss(q, k, top_n=3)
    with pytest.raises(ValueError, match="one shape"):
        FC.mochi_loss(q, k[:5], queue, top_n=3)
    with pytest.raises(ValueError, match="temperature"):
        FC.mochi_loss(q, k, queue, top_n=3, temperature=0.0)
    with pytest.raises(TypeError, match="top_n must be an int"):
        FC.mochi_loss(q, k, queue, top_n=3.0)
    good = FC.mochi_loss(q, k, queue, top_n=3, n_mix=2, n_query_mix=2, return_mixes=True)[1]
    with pytest.raises(ValueError, match="pair_ranks"):
        FC.mochi_loss(q, k, queue, top_n=3, n_mix=2, n_query_mix=2, mixes={**good, "pair_ranks": good["pair_ranks"] + 3})
    with pytest.raises(ValueError, match="shape"):
        FC.mochi_loss(q, k, queue, top_n=3, n_mix=2, n_query_mix=2, mixes={**good, "alpha": good["alpha"][:, :1]})
    with pytest.raises(ValueError, match="keys"):
        FC.mochi_loss(q, k, queue, top_n=3, n_mix=2, n_query_mix=2, mixes={"alpha": good["alpha"]})


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_mochi_with_a_nan_query_gives_nan_not_an_error(backend):
    """A NaN in the features gives a NaN loss and NaN gradients (as the materialised reference does),
    not an error about a gradient the user never passed."""
    q, k, queue = _data(dtype=torch.float32)
    q = q.clone()
    q[0, 0] = float("nan")
    leaves = q.requires_grad_()
    loss = FC.mochi_loss(leaves, k, queue, top_n=7, n_mix=5, n_query_mix=3, backend=backend,
                         generator=torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad(loss, [leaves])
    assert torch.isnan(loss) and torch.isnan(g).any()
