"""The engine's differentiable row LSE (fastcon.ops.target.target_row_lse): each row's LSE over the
target's kept pairs, the gradient of any weighting of the rows (pass 2 in the backward, the upstream
gradient as each row's target mass), on every backend against torch.logsumexp of the masked matrix."""
import pytest
import torch

from fastcon.targets import Target
from fastcon.ops import target_row_lse
from helpers import assert_close_rel, assert_compiles_like_eager, make_features

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
            pytest.param("triton_fused", marks=pytest.mark.interpreter)]


def _case(n, m, d, dtype):
    x, y = make_features(n, m, d, dtype=dtype)
    none_r, none_c = torch.full((n,), -1), torch.full((m,), -1)
    exclude = torch.where(torch.arange(n) % 3 == 0, torch.arange(n) % m, -1)
    col_keep = torch.arange(m) % 5 != 2
    keep = col_keep[None, :].expand(n, m).clone()
    rows = torch.arange(n)[exclude >= 0]
    keep[rows, exclude[rows]] = False
    return x, y, Target(none_r, none_c, exclude_col=exclude, col_keep=col_keep), keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,d,chunk", [(1, 3, 4, None), (23, 31, 8, 5), (40, 40, 16, None)])
def test_row_lse_and_weighted_gradients(backend, n, m, d, chunk):
    dtype, rtol = (torch.float32, 2e-6) if backend.startswith("triton") else (torch.float64, 1e-12)
    x, y, target, keep = _case(n, m, d, dtype)
    s = torch.tensor(7.5, dtype=dtype)
    u = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_()]
    truth = [x.double().requires_grad_(), y.double().requires_grad_(), s.double().requires_grad_()]
    lse = target_row_lse(leaves[0], leaves[1], leaves[2], None, target, backend=backend, chunk_size=chunk)
    want = torch.logsumexp((truth[2] * truth[0] @ truth[1].T).masked_fill(~keep, float("-inf")), dim=1)
    assert lse.dtype == torch.float64 and lse.shape == (n,)
    assert_close_rel(lse, want, rtol=rtol, name="row LSE")
    for g, e in zip(torch.autograd.grad((u * lse).sum(), leaves), torch.autograd.grad((u * want).sum(), truth)):
        assert g.dtype == dtype
        assert_close_rel(g, e, rtol=rtol * 10, atol=rtol * 1e-2, name="grad")


def test_row_lse_zero_upstream_and_opcheck():
    x, y, target, _ = _case(12, 9, 4, torch.float32)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    lse = target_row_lse(*leaves, torch.tensor(3.0), None, target, backend="cpp")
    grads = torch.autograd.grad(lse.sum() * 0.0, leaves)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    from fastcon.targets.wire import wire_args

    args = (x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(3.0, requires_grad=True),
            torch.tensor(0.0), *wire_args(target, 12, 9), "cpp", 4, None)
    torch.library.opcheck(torch.ops.fastcon.target_row_lse.default, args)


def test_row_lse_under_torch_compile():
    x, y, target, _ = _case(16, 16, 8, torch.float32)

    def step(p, q):
        return target_row_lse(torch.nn.functional.normalize(p, dim=-1), q, torch.tensor(5.0), None, target,
                              backend="torch").logsumexp(0)

    leaves = [(2 * x).requires_grad_(), y.clone().requires_grad_()]
    assert_compiles_like_eager(step, leaves)
