"""m²-mix (docs/losses.md §2.3): FC.slerp against the formula and at its ends (θ → 0, θ → π), and
FC.m2mix_loss on every backend against the materialised reference, loss and every gradient."""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel, make_features

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter), "auto"]


def _unit(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)


@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_the_formula_and_stays_on_the_sphere(lam):
    a, b = _unit(50, 8, 1), _unit(50, 8, 2)
    la = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(), la]
    truth = [a.clone().requires_grad_(), b.clone().requires_grad_(), la.detach().clone().requires_grad_()]
    out, want = FC.slerp(*leaves), R.slerp_reference(*truth)
    assert_close_rel(out, want, rtol=1e-12, name="slerp")
    assert_close_rel(out.norm(dim=1), torch.ones(50, dtype=torch.float64), rtol=1e-12, name="norm")
    w = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((want * w).sum(), truth)):
        assert_close_rel(g, e, rtol=1e-9, atol=1e-12, name="grad")
    if lam in (0.0, 1.0):  # the ends are the inputs themselves
        assert_close_rel(out, a if lam == 1.0 else b, rtol=1e-12, name="end")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("end", ["same", "near", "opposite", "near_opposite"])
def test_slerp_value_and_gradient_are_finite_at_the_ends(dtype, end):
    a = _unit(6, 8, 3, dtype)
    noise = 1e-4 * _unit(6, 8, 4, dtype)
    b = {"same": a.clone(), "near": torch.nn.functional.normalize(a + noise, dim=1), "opposite": -a,
         "near_opposite": torch.nn.functional.normalize(-a + noise, dim=1)}[end]
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    out = FC.slerp(*leaves, 0.3)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    if end in ("same", "near"):  # the geodesic through two (nearly) equal points is the point
        assert_close_rel(out, a, rtol=2e-4, name="slerp near θ = 0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("n,d,chunk", [(2, 4, None), (33, 16, 7), (64, 8, None)])
def test_m2mix_against_reference(backend, lam, n, d, chunk):
    dtype, rtol = (torch.float32, 2e-5) if backend.startswith("triton") else (torch.float64, 1e-11)
    x, y = make_features(n, n, d, dtype=dtype)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    truth = [x.double().requires_grad_(), y.double().requires_grad_()]
    out = FC.m2mix_loss(*leaves, lam=lam, temperature=0.07, backend=backend, chunk_size=chunk)
    want = R.m2mix_loss_reference(*truth, lam, temperature=0.07)
    assert out.dtype == dtype and out.shape == ()
    assert_close_rel(out, want, rtol=rtol, name="loss")
    for g, e in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(want, truth)):
        assert_close_rel(g, e, rtol=rtol, atol=rtol * 1e-3, name="grad")


@pytest.mark.interpreter
def test_m2mix_on_the_fused_tile_kernels():
    test_m2mix_against_reference("triton_fused", 0.3, 33, 16, 7)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_m2mix_with_equal_pairs_and_a_tensor_lam(backend):
    """x_j = y_j (θ = 0: the interpolation falls back to the line) and λ a tensor with a gradient:
    against the materialised formula on the same slerp."""
    x, _ = make_features(20, 20, 8, dtype=torch.float64)
    y = x.clone()
    y[::2] = make_features(20, 20, 8, seed=9, dtype=torch.float64)[1][::2]  # half the pairs equal
    lam = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), lam]
    truth = [x.clone().requires_grad_(), y.clone().requires_grad_(), lam.detach().clone().requires_grad_()]
    out = FC.m2mix_loss(leaves[0], leaves[1], lam=leaves[2], backend=backend)
    want = R.m2mix_loss_reference(truth[0], truth[1], truth[2], slerp=FC.slerp)
    assert_close_rel(out, want, rtol=1e-11, name="loss")
    for g, e in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(want, truth)):
        assert torch.isfinite(g).all()
        assert_close_rel(g, e, rtol=1e-10, atol=1e-12, name="grad")


def test_m2mix_draws_lam_from_the_generator():
    x, y = make_features(16, 16, 8)
    draw = lambda seed: FC.m2mix_loss(x, y, beta=0.5, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(3) == draw(3)
    assert len({float(draw(s)) for s in range(6)}) > 1
    state = torch.random.get_rng_state()
    draw(4)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left alone


def test_m2mix_bad_input():
    x, y = make_features(8, 8, 4)
    with pytest.raises(ValueError, match="beta"):
        FC.m2mix_loss(x, y)
    with pytest.raises(ValueError, match="lam must be in"):
        FC.m2mix_loss(x, y, lam=1.5)
    with pytest.raises(TypeError, match="lam"):
        FC.m2mix_loss(x, y, lam="half")
    with pytest.raises(ValueError, match="0-d"):
        FC.m2mix_loss(x, y, lam=torch.ones(2))
    with pytest.raises(ValueError, match="beta"):
        FC.m2mix_loss(x, y, beta=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        FC.m2mix_loss(x, y, lam=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="one shape"):
        FC.m2mix_loss(x, y[:5], lam=0.5)
    with pytest.raises(ValueError, match="one shape"):
        FC.slerp(x, y[:, :2], 0.5)
    with pytest.raises(ValueError, match="lam must be in"):
        FC.slerp(x, y, -0.1)
