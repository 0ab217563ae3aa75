"""CPU regression benchmarks (pytest-benchmark): ``make bench-ci``, not part of ``make test``.

Each benchmark checks its loss and gradients against the float64 reference once, then times
forward+backward on a fixed batch. ``make bench-ci`` saves every run under ``.benchmarks/`` and
fails when the best time (min of 20 rounds) of a benchmark is more than 15% slower than the last
saved run on this machine.
"""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from fastcon.bench.measure import make_inputs, make_scalars, set_malloc_thresholds

# Buffers up to 32 MiB are reused from the heap and the heap is never trimmed: a regression gate
# wants the computation's time, without page faults whose share moves by 40% between identical runs
# under glibc's dynamic thresholds.
set_malloc_thresholds(32 << 20, 1 << 30)

N, D = 2048, 256
LOSS_FN = {"clip": FC.clip_loss, "siglip": FC.siglip_loss}
REFERENCE = {"clip": R.clip_loss_reference, "siglip": R.siglip_loss_reference}


def _loss_and_grads(fn, a, b, loss):
    scale, bias = (None if t is None else t.detach().to(a.dtype).requires_grad_() for t in make_scalars(loss, "cpu"))
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(), scale]
    out = fn(*leaves, bias)
    grads = torch.autograd.grad(out, leaves + ([bias] if bias is not None else []))
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("backend", ["cpp", "torch", "reference"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_forward_backward(benchmark, loss, backend):
    a, b = make_inputs(N, D, torch.float32, "cpu")
    fn = LOSS_FN[loss]
    call = lambda x, y, s, bias: fn(x, y, s, bias, backend=backend)  # noqa: E731
    ours = _loss_and_grads(call, a[:256], b[:256], loss)
    truth = _loss_and_grads(REFERENCE[loss], a[:256].double(), b[:256].double(), loss)
    for got, want in zip(ours, truth):
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7
    benchmark.extra_info.update(loss=loss, backend=backend, N=N, D=D, threads=torch.get_num_threads())
    benchmark.pedantic(_loss_and_grads, args=(call, a, b, loss), rounds=20, warmup_rounds=3)
