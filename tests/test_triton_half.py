"""fp16 paths of the Triton backend under the interpreter (which has fp16, not bf16): the in-place
accumulating GEMM of the chunked path, and the power-of-two lift of G before its cast to fp16.

The lift matters where G is small: G ≈ P ≈ 1/N per entry at large N, and the distributed ring
passes weights w = 1/(2N), so that G ≈ 1/(2N²) lies deep in fp16's subnormals even at small N.
"""
import pytest
import torch

from helpers import make_features

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (70, 33, 45), (129, 65, 200)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("device_alpha", [False, True])
def test_mm_accumulate_matches_float64(dtype, m, n, k, transposed, accumulate, device_alpha):
    from fastcon.kernels.triton.gemm import mm_accumulate

    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(k, m, generator=g).to(dtype).T if transposed else torch.randn(m, k, generator=g).to(dtype)
    y = torch.randn(k, n, generator=g).to(dtype)
    c0 = torch.randn(m, n, generator=g)
    c = c0.clone()
    alpha = torch.tensor(3.0) if device_alpha else None
    out = mm_accumulate(x, y, c, 0.25, alpha, accumulate=accumulate)
    assert out is c  # in place
    expected = (0.75 if device_alpha else 0.25) * (x.double() @ y.double()) + (c0.double() if accumulate else 0.0)
    # fp32 accumulation of exact products: error ~ sqrt(k)·ulp of the partial sums
    bound = 4e-6 * max(1.0, expected.abs().max().item()) * max(1.0, k ** 0.5)
    assert (c.double() - expected).abs().max().item() <= bound


def test_mm_accumulate_rejects_bad_operands():
    from fastcon.kernels.triton.gemm import mm_accumulate

    with pytest.raises(ValueError, match="cannot multiply"):
        mm_accumulate(torch.zeros(2, 3), torch.zeros(4, 5), torch.zeros(2, 5))
    with pytest.raises(TypeError, match="share a dtype"):
        mm_accumulate(torch.zeros(2, 3), torch.zeros(3, 5, dtype=torch.float16), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="float32"):
        mm_accumulate(torch.zeros(2, 3), torch.zeros(3, 5), torch.zeros(2, 5, dtype=torch.float16))


def test_grad_tile_scale_is_a_safe_power_of_two():
    import math

    from fastcon.kernels.triton.gemm import grad_tile_scale

    assert grad_tile_scale(torch.bfloat16, 4.0) == 1.0 and grad_tile_scale(torch.float32, 4.0) == 1.0
    for bound in (4.0, 2.0, 1.0, 1e-3, 1.0 / (2 * 65536), 3.7):
        scale = grad_tile_scale(torch.float16, bound)
        assert math.log2(scale).is_integer()
        assert bound * scale <= 32768.0 < 2 * bound * scale  # the largest |G| stays well inside fp16


def _contract_grads(a, b, scale, w_row, w_col, w_pos):
    """float64 gradients of the softmax contract (fastcon/kernels/__init__.py) on the given features."""
    a, b = a.double(), b.double()
    s = scale * (a @ b.T)
    row = torch.logsumexp(s, 1, keepdim=True)
    col = torch.logsumexp(s, 0, keepdim=True)
    g = w_row * torch.exp(s - row) + w_col * torch.exp(s - col)
    g -= w_pos * torch.eye(a.shape[0], b.shape[0], dtype=torch.float64)
    return scale * g @ b, scale * g.T @ a, row.squeeze(1), col.squeeze(0)


@pytest.mark.parametrize("path", ["chunked", "fused", "matmul"])
@pytest.mark.parametrize("lift", [True, False])
def test_fp16_gradient_keeps_its_bits(path, lift, monkeypatch):
    """With the weights of one rank's shard in a ring over N = 65,536 pairs, w = 1/(2N), the fp16
    gradients stay within a few fp16 ulps of the float64 truth; without the lift (monkeypatched off)
    they do not: the test sees the subnormals. ``matmul``: the chunked path with the matmul producer
    (its fp16 G block), the GPU's default for fp16."""
    import importlib

    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul" if path == "matmul" else "cublas")
    mod = importlib.import_module(f"fastcon.kernels.triton.{'chunked' if path == 'matmul' else path}")
    if not lift:
        monkeypatch.setattr(mod, "grad_tile_scale", lambda dtype, bound: 1.0)
    n, d = 192, 64
    a, b = make_features(n, n, d, dtype=torch.float16)
    s = 14.3
    w = 1.0 / (2 * 65536)
    ga_ref, gb_ref, row, col = _contract_grads(a, b, s, w, w, 2 * w)
    scale = torch.tensor(s)
    bias = torch.tensor(0.0)
    kw = dict(chunk_rows=n) if path == "fused" else dict(chunk_rows=70)
    ga, gb, _, _ = mod.softmax_grad(a, b, scale, bias, row, col, 0, w, w, 2 * w, **kw)
    err = max(((ga.double() - ga_ref).abs().max() / ga_ref.abs().max()).item(),
              ((gb.double() - gb_ref).abs().max() / gb_ref.abs().max()).item())
    print(f"{path} lift={lift}: relative gradient error {err:.3g}")
    if lift:
        assert err <= 2.0 ** -9, f"fp16 gradient error {err:.3g} with the lift"
    else:
        assert err > 2.0 ** -7, f"without the lift the error was only {err:.3g}: the case misses fp16's subnormals"
