"""FILIP (docs/losses.md §3.1) on the torch backend (image blocks, each checkpointed) against the
materialised B×n₁×B×n₂ reference: ragged token padding, a patch mask, negative similarities, blocks that
do not divide B, exact ties (the gradient to the lowest index), loss and every gradient."""
import pytest
import torch

import fastcon
import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel


def _data(b, n1, n2, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.functional.normalize(torch.randn(b, n1, d, generator=g, dtype=dtype), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(b, n2, d, generator=g, dtype=dtype), dim=-1)
    tm = torch.arange(n2)[None, :] < torch.randint(1, n2 + 1, (b,), generator=g)[:, None]
    pm = torch.arange(n1)[None, :] < torch.randint(1, n1 + 1, (b,), generator=g)[:, None]
    return p, t, tm, pm


@pytest.mark.parametrize("b,n1,n2,d,chunk", [(1, 3, 2, 4, None), (7, 9, 5, 8, 3), (12, 6, 11, 16, None)])
@pytest.mark.parametrize("masks", ["none", "tokens", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_filip_against_reference(b, n1, n2, d, chunk, masks, dtype):
    p, t, tm, pm = _data(b, n1, n2, d, dtype=dtype)
    kw = dict(token_mask=None if masks == "none" else tm, patch_mask=pm if masks == "both" else None)
    rtol = 1e-11 if dtype == torch.float64 else 2e-5
    leaves = [p.clone().requires_grad_(), t.clone().requires_grad_(), torch.tensor(11.0, dtype=dtype,
                                                                                requires_grad=True)]
    truth = [p.double().requires_grad_(), t.double().requires_grad_(), torch.tensor(11.0, dtype=torch.float64,
                                                                                  requires_grad=True)]
    out = FC.filip_loss(*leaves, label_smoothing=0.1, chunk_size=chunk, **kw)
    want = R.filip_loss_reference(*truth, label_smoothing=0.1, **kw)
    assert out.dtype == dtype
    assert_close_rel(out, want, rtol=rtol, name="loss")
    for g, e in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(want, truth)):
        assert_close_rel(g, e, rtol=rtol, atol=rtol * 1e-3, name="grad")
    s_i, s_t = FC.filip_similarities(p, t, chunk_size=chunk, **kw)
    r_i, r_t = R.filip_similarities_reference(p, t, **kw)
    assert_close_rel(s_i, r_i, rtol=rtol, name="sI")
    assert_close_rel(s_t, r_t, rtol=rtol, name="sT")
    if b > 1:
        assert not torch.allclose(s_t, s_i.T)  # text → image is not the transpose


def test_filip_ties_send_the_gradient_to_the_lowest_index():
    """A duplicated token: the max over tokens ties, and the gradient reaches the first copy only."""
    p, t, _, _ = _data(3, 4, 3, 8)
    t = torch.cat([t[:, :1], t[:, :1], t[:, 1:]], dim=1)  # token 0 and token 1 equal in every caption
    leaf = t.clone().requires_grad_()
    s_i, _ = FC.filip_similarities(p, leaf)
    (g,) = torch.autograd.grad(s_i.sum(), [leaf])
    assert g[:, 1].abs().max() == 0 and g[:, 0].abs().max() > 0


def test_filip_module_and_bad_input():
    p, t, tm, pm = _data(4, 5, 6, 8)
    assert_close_rel(fastcon.FILIPLoss()(p, t, 10.0, tm, pm), FC.filip_loss(p, t, 10.0, token_mask=tm, patch_mask=pm),
                     rtol=1e-15)
    with pytest.raises(ValueError, match="no real entry"):
        FC.filip_loss(p, t, 10.0, token_mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask"):
        FC.filip_loss(p, t, 10.0, token_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="tokens must be"):
        FC.filip_loss(p, t[:, :, :3], 10.0)
    with pytest.raises(NotImplementedError, match="fused"):
        FC.filip_loss(p, t, 10.0, backend="cpp")
