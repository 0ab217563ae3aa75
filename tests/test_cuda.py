"""GPU-only checks (skipped without CUDA): low-precision error budgets and CUDA kernels vs reference.

The error budget follows the convention of memory-efficient loss kernels: in bf16/fp16 a fused path
must be no worse than the reference computed in the same low precision, both measured against an
fp32 ground truth on the same inputs, plus a small tolerance.
"""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from helpers import make_features

pytestmark = pytest.mark.cuda

LOSSES = {
    "clip": (FC.clip_loss, R.clip_loss_reference, None),
    "siglip": (FC.siglip_loss, R.siglip_loss_reference, -10.0),
}


def _loss_and_grads(fn, a, b, s, bias, **kw):
    leaves = [a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(),
              s.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    out = fn(*leaves[:3], leaves[3] if bias is not None else None, **kw)
    return [out.detach().float()] + [g.float() for g in torch.autograd.grad(out, leaves)]


def _errors(outs, truth):
    return [((o - t).abs().max() / t.abs().max().clamp_min(1e-12)).item() for o, t in zip(outs, truth)]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["triton", "triton_fused", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(1000, 64), (4099, 256), (2048, 768)])
def test_low_precision_error_budget(loss, backend, dtype, n, d):
    if backend == "triton_fused" and d > 256:
        pytest.skip("the fully fused path covers D <= 256")
    fn, ref, bias_value = LOSSES[loss]
    a32, b32 = make_features(n, n, d)
    a32, b32 = a32.cuda(), b32.cuda()
    s = torch.tensor(100.0 if loss == "clip" else 10.0, device="cuda")
    bias = None if bias_value is None else torch.tensor(bias_value, device="cuda")
    truth = _loss_and_grads(ref, a32.to(dtype).float(), b32.to(dtype).float(), s, bias)
    ours = _errors(_loss_and_grads(fn, a32.to(dtype), b32.to(dtype), s, bias, backend=backend), truth)
    low = _errors(_loss_and_grads(lambda *x: ref(*x, upcast=False), a32.to(dtype), b32.to(dtype), s, bias), truth)
    tol = 2e-3 if dtype == torch.bfloat16 else 5e-4
    names = ["loss", "grad image", "grad text", "grad scale", "grad bias"]
    for name, e_ours, e_low in zip(names, ours, low):
        assert e_ours <= e_low + tol, f"{name}: fastcon error {e_ours:.3g} > low-precision reference {e_low:.3g} + {tol}"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["auto", "triton", "triton_fused", "torch"])
@pytest.mark.parametrize("n,d", [(1, 3), (257, 64), (1000, 640)])
def test_cuda_fp32_matches_reference(loss, backend, n, d):
    if backend == "triton_fused" and d > 256:
        pytest.skip("the fully fused path covers D <= 256")
    fn, ref, bias_value = LOSSES[loss]
    a, b = make_features(n, n, d)
    a, b = a.cuda(), b.cuda()
    s = torch.tensor(14.3, device="cuda")
    bias = None if bias_value is None else torch.tensor(bias_value, device="cuda")
    truth = _loss_and_grads(ref, a.double(), b.double(), s.double(), None if bias is None else bias.double())
    ours = _loss_and_grads(fn, a, b, s, bias, backend=backend)
    # TF32 is off for torch.mm by default; 1e-4 leaves room for a different summation order at N=1000.
    for e in _errors(ours, [t.float() for t in truth]):
        assert e <= 1e-4


def test_cuda_memory_is_linear_in_n():
    a, b = make_features(16384, 16384, 256)
    a, b = a.cuda().bfloat16().requires_grad_(), b.cuda().bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    FC.clip_loss(a, b, torch.tensor(14.3, device="cuda")).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 16384 * 16384 * 4 // 2, f"{extra / 2**20:.0f} MiB: half of one 16k x 16k fp32 logits matrix is 512 MiB"
