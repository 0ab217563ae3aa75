"""FILIP (docs/losses.md §3.1) on every backend of the token-level engine (torch, C++, Triton through
the interpreter) against the materialised B×n₁×B×n₂ reference in float64: ragged token padding, a
patch mask, all-negative similarities (a zero-filled pad would win the max), blocks that do not
divide B, token counts that are not multiples of a block, the Triton kernels in both orientations,
exact ties (the gradient to the lowest index), loss and every gradient."""
import pytest
import torch

import fastcon
import fastcon.functional as FC
from fastcon import reference as R
from fastcon.kernels import cpp
from helpers import assert_close_rel, assert_compiles_like_eager, assert_grads_within_fp32_formula, winner_token_case

TRITON = pytest.param("triton", marks=pytest.mark.interpreter)
BACKENDS = ["torch", "cpp", TRITON, "auto"]


def _data(b, n1, n2, d, seed=0, dtype=torch.float64, negative=False):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.functional.normalize(torch.randn(b, n1, d, generator=g, dtype=dtype), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(b, n2, d, generator=g, dtype=dtype), dim=-1)
    if negative:  # every p·t < 0: patches in the positive orthant, tokens in the negative one
        p, t = p.abs(), -t.abs()
    tm = torch.arange(n2)[None, :] < torch.randint(1, n2 + 1, (b,), generator=g)[:, None]
    pm = torch.arange(n1)[None, :] < torch.randint(1, n1 + 1, (b,), generator=g)[:, None]
    return p, t, tm, pm


def _check(backend, b, n1, n2, d, chunk, masks, dtype, negative=False):
    p, t, tm, pm = _data(b, n1, n2, d, dtype=dtype, negative=negative)
    kw = dict(token_mask=None if masks == "none" else tm, patch_mask=pm if masks == "both" else None)
    rtol = 1e-11 if dtype == torch.float64 else 2e-5
    leaves = [p.clone().requires_grad_(), t.clone().requires_grad_(), torch.tensor(11.0, dtype=dtype,
                                                                                requires_grad=True)]
    truth = [p.double().requires_grad_(), t.double().requires_grad_(), torch.tensor(11.0, dtype=torch.float64,
                                                                                  requires_grad=True)]
    out = FC.filip_loss(*leaves, label_smoothing=0.1, chunk_size=chunk, backend=backend, **kw)
    want = R.filip_loss_reference(*truth, label_smoothing=0.1, **kw)
    assert out.dtype == dtype
    assert_close_rel(out, want, rtol=rtol, name="loss")
    # the scale's gradient Σ (P − Q)·s cancels: its budget is the similarities' own rounding, each a
    # mean of up to max(n₁, n₂) rounded products
    budgets = (rtol * 1e-3, rtol * 1e-3, torch.finfo(dtype).eps * max(n1, n2))
    for g, e, name, atol in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(want, truth),
                                ("patches", "tokens", "logit_scale"), budgets):
        assert_close_rel(g, e, rtol=rtol, atol=atol, name=f"grad {name}")
    s_i, s_t = FC.filip_similarities(p, t, chunk_size=chunk, backend=backend, **kw)
    r_i, r_t = R.filip_similarities_reference(p, t, **kw)
    assert_close_rel(s_i, r_i, rtol=rtol, name="sI")
    assert_close_rel(s_t, r_t, rtol=rtol, name="sT")
    if negative:
        assert (s_i < 0).all() and (s_t < 0).all()  # padding never wins a max
    if b > 1:
        assert not torch.allclose(s_t, s_i.T)  # text → image is not the transpose


@pytest.mark.parametrize("backend", ["torch", "cpp", "auto"])
@pytest.mark.parametrize("b,n1,n2,d,chunk", [(1, 3, 2, 4, None), (7, 9, 5, 8, 3), (12, 6, 11, 16, None)])
@pytest.mark.parametrize("masks", ["none", "tokens", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_filip_against_reference(backend, b, n1, n2, d, chunk, masks, dtype):
    _check(backend, b, n1, n2, d, chunk, masks, dtype)


# The Triton kernels: fp32 only (the interpreter); n1 = 70 spans two BLOCK_X tiles; n2 = 270 does not fit
# on chip, so the patches take that role (the swapped orientation) and the tokens are walked in tiles.
# n₁ = 270 against n₂ = 300: neither fits on chip, so both directions walk both sets in tiles (that
# shape with masks only: the interpreter takes longest there).
_TRITON_SHAPES = [(3, 5, 4, 8, None), (5, 70, 9, 40, 2), (2, 7, 270, 16, None), (3, 270, 300, 8, 2)]


@pytest.mark.interpreter
@pytest.mark.parametrize("b,n1,n2,d,chunk,masks", [shape + (masks,) for shape in _TRITON_SHAPES
                                                   for masks in ("none", "both")
                                                   if not (shape[1] == 270 and masks == "none")])
def test_filip_triton_against_reference(b, n1, n2, d, chunk, masks):
    _check("triton", b, n1, n2, d, chunk, masks, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filip_negative_similarities(backend):
    _check(backend, 4, 6, 5, 8, None, "both", torch.float32, negative=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filip_ties_send_the_gradient_to_the_lowest_index(backend):
    """Duplicated tokens and patches: each max ties, and its gradient reaches the first copy only, in
    both directions."""
    p, t, _, _ = _data(3, 4, 3, 8, dtype=torch.float32)
    t = torch.cat([t[:, :1], t[:, :1], t[:, 1:]], dim=1)  # tokens 0 and 1 equal in every caption
    p = torch.cat([p[:, :1], p[:, :1], p[:, 1:]], dim=1)  # patches 0 and 1 equal in every image
    lp, lt = p.clone().requires_grad_(), t.clone().requires_grad_()
    s_i, s_t = FC.filip_similarities(lp, lt, backend=backend)
    (g,) = torch.autograd.grad(s_i.sum(), [lt], retain_graph=True)
    assert g[:, 1].abs().max() == 0 and g[:, 0].abs().max() > 0
    (g,) = torch.autograd.grad(s_t.sum(), [lp])
    assert g[:, 1].abs().max() == 0 and g[:, 0].abs().max() > 0


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_filip_gradient_of_each_direction_alone(backend):
    """One direction's gradient with the other unused (its upstream gradient absent)."""
    p, t, tm, pm = _data(5, 6, 4, 8)
    for k in (0, 1):
        leaves = [p.clone().requires_grad_(), t.clone().requires_grad_()]
        truth = [p.clone().requires_grad_(), t.clone().requires_grad_()]
        out = FC.filip_similarities(*leaves, token_mask=tm, patch_mask=pm, backend=backend)[k]
        want = R.filip_similarities_reference(*truth, token_mask=tm, patch_mask=pm)[k]
        w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(k))
        for g, e in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((want * w).sum(), truth)):
            assert_close_rel(g, e, rtol=1e-12, name=f"direction {k}")


@pytest.mark.skipif(not cpp.AVAILABLE, reason=f"C++ extension unavailable: {cpp.REASON}")
@pytest.mark.parametrize("chunk", [None, 5])
def test_filip_cpp_gradient_of_a_token_that_wins_every_patch(chunk):
    """Caption 0's only real token is the argmax of every patch of every image (the patches lean toward
    it), so its gradient sums B·n₁ = 1200 gathered rows: the C++ backend's fp32 gradients of both inputs
    stay within twice the error of the materialised fp32 formula, both against float64."""
    p, t, tm = winner_token_case(24, 50, 77, 64, seed=0)
    assert_grads_within_fp32_formula(
        lambda p, t: FC.filip_loss(p, t, 11.0, token_mask=tm, backend="cpp", chunk_size=chunk),
        lambda p, t: R.filip_loss_reference(p, t, 11.0, token_mask=tm), [p, t], ("patches", "tokens"))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_filip_compiles(backend):
    p, t, tm, pm = _data(4, 5, 3, 8, dtype=torch.float32)

    def step(p, t):
        return FC.filip_loss(p, t, 10.0, token_mask=tm, patch_mask=pm, backend=backend)

    assert_compiles_like_eager(step, [p.clone().requires_grad_(), t.clone().requires_grad_()])


def test_late_interaction_op_passes_opcheck():
    import fastcon.ops  # noqa: F401  (registers the operators)

    p, t, tm, pm = _data(3, 4, 5, 8)
    for backend in ("torch", "cpp"):
        torch.library.opcheck(torch.ops.fastcon.late_interaction.default,
                              (p.clone().requires_grad_(), t.clone().requires_grad_(), pm, tm, backend, True, True, 2,
                               None))


def test_filip_module_and_bad_input():
    p, t, tm, pm = _data(4, 5, 6, 8)
    assert_close_rel(fastcon.FILIPLoss()(p, t, 10.0, tm, pm), FC.filip_loss(p, t, 10.0, token_mask=tm, patch_mask=pm),
                     rtol=1e-15)
    with pytest.raises(ValueError, match="no real token"):
        FC.filip_loss(p, t, 10.0, token_mask=torch.zeros(4, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask"):
        FC.filip_loss(p, t, 10.0, token_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="tokens must be"):
        FC.filip_loss(p, t[:, :, :3], 10.0)
    with pytest.raises(ValueError, match="backend"):
        FC.filip_loss(p, t, 10.0, backend="cuda")
    with pytest.raises(ValueError, match="patches"):
        FC.filip_loss(p[0], t, 10.0)


@pytest.mark.interpreter
def test_filip_triton_rejects_float64():
    p, t, _, _ = _data(2, 3, 4, 8)
    with pytest.raises(TypeError, match="float64"):
        FC.filip_loss(p, t, 10.0, backend="triton")
