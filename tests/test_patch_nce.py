"""Dense patch InfoNCE (docs/losses.md §3.3): FC.patch_nce_loss on every backend against the per-image
materialised reference, single- and multi-positive, every detach option, loss and every gradient."""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter), "auto"]


def _data(b, p, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, p, d, generator=g, dtype=dtype), dim=-1)
    k = torch.nn.functional.normalize(q + 0.7 * torch.randn(b, p, d, generator=g, dtype=dtype), dim=-1)
    return q, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("detach", ["key", "query", None])
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("b,p,d,chunk", [(1, 1, 4, None), (3, 17, 8, 10), (5, 8, 16, None)])
def test_patch_nce_against_reference(backend, detach, multi, b, p, d, chunk):
    # a loss near 0 (one patch) is a difference of logits of size 1/τ, rounded at their ulp
    dtype, rtol, atol = (torch.float32, 2e-5, 2e-6) if backend.startswith("triton") else (torch.float64, 1e-11, 1e-13)
    q, k = _data(b, p, d, dtype)
    mask = None
    if multi:
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(b, p, p, generator=g) < 0.3
        mask[:, 0] = False  # a patch without a positive: left out of the mean
        mask[0, min(1, p - 1), 0] = True
    leaves = [q.clone().requires_grad_(), k.clone().requires_grad_()]
    truth = [q.double().requires_grad_(), k.double().requires_grad_()]
    out = FC.patch_nce_loss(*leaves, detach=detach, pos_mask=mask, backend=backend, chunk_size=chunk)
    want = R.patch_nce_loss_reference(*truth, detach=detach, pos_mask=mask)
    assert out.dtype == dtype
    assert_close_rel(out, want, rtol=rtol, atol=atol, name="loss")
    got = torch.autograd.grad(out, leaves, allow_unused=True)
    exp = torch.autograd.grad(want, truth, allow_unused=True)
    for name, g_, e in zip(("q", "k"), got, exp):
        if (name == "k" and detach == "key") or (name == "q" and detach == "query"):
            assert g_ is None and e is None
        else:
            assert_close_rel(g_, e, rtol=rtol, atol=atol, name=f"grad {name}")


@pytest.mark.interpreter
@pytest.mark.parametrize("multi", [False, True])
def test_patch_nce_on_the_fused_tile_kernels(multi):
    """The fused Triton tile kernels (each row's image block as a column range of the general target),
    one shape per form of the positives."""
    test_patch_nce_against_reference("triton_fused", "key", multi, 3, 17, 8, 10)


def test_patch_nce_bad_input():
    q, k = _data(2, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        FC.patch_nce_loss(q, k[:, :3])
    with pytest.raises(ValueError, match="detach"):
        FC.patch_nce_loss(q, k, detach="both")
    with pytest.raises(ValueError, match="pos_mask"):
        FC.patch_nce_loss(q, k, pos_mask=torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no positive"):
        FC.patch_nce_loss(q, k, pos_mask=torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        FC.patch_nce_loss(q, k, temperature=0)
    with pytest.raises(ValueError, match="3-D"):
        FC.patch_nce_loss(q[0], k[0])
