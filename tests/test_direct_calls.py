"""Eager calls run the engine operator's body through a plain autograd function (``ops.registry``),
and small CPU problems on the C++ backend the whole loss as one C++ operator (``ops.engine.direct_call``):
the same loss and gradients as the registered operator, to the last bit, and as the float64
reference, for CLIP (with smoothing and a rectangular offset) and SigLIP, under an upstream gradient
other than 1; the registered operator under torch.compile and for tensor subclasses. A fresh
process's first call imports no compiler."""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from fastcon.ops import engine, registry
from helpers import assert_close_rel, leaf, make_features


def _registered(monkeypatch):
    monkeypatch.setattr(engine, "direct_call", lambda *args: False)
    monkeypatch.setattr(registry, "eager_call", lambda args: False)


@pytest.mark.parametrize("backend", ["cpp", "torch", "auto"])
@pytest.mark.parametrize("loss", ["clip", "clip_smooth_offset", "siglip"])
def test_direct_call_equals_the_registered_operator(monkeypatch, backend, loss):
    a, b = make_features(12, 15, 8)
    s = torch.tensor(9.0)

    def run(**kw):
        xa, xb, xs = leaf(a), leaf(b), leaf(s)
        if loss == "clip":
            out = FC.clip_loss(xa, xb[:12], xs, **kw)
        elif loss == "clip_smooth_offset":
            out = FC.clip_loss(xa, xb, xs, label_smoothing=0.1, pos_offset=3, **kw)
        else:
            out = FC.siglip_loss(xa, xb, xs, -4.0, pos_offset=0, **kw)
        (3.0 * out).backward()  # an upstream gradient other than 1
        return [out.detach()] + [t.grad for t in (xa, xb, xs)]

    direct = run(backend=backend)
    # the float64 reference, its gradients times the same upstream 3
    xa, xb, xs = leaf(a.double()), leaf(b.double()), leaf(s.double())
    if loss == "clip":
        want = R.clip_loss_reference(xa, xb[:12], xs)
    elif loss == "clip_smooth_offset":
        want = R.clip_loss_reference(xa, xb, xs, label_smoothing=0.1, pos_offset=3)
    else:
        want = R.siglip_loss_reference(xa, xb, xs, -4.0)
    (3.0 * want).backward()
    for x, y in zip(direct, [want.detach(), xa.grad, xb.grad, xs.grad]):
        assert_close_rel(x, y, rtol=1e-5, name=loss)
    _registered(monkeypatch)
    registered = run(backend=backend)
    for x, y in zip(direct, registered):
        torch.testing.assert_close(x, y, rtol=2e-7, atol=0)


def test_direct_call_only_for_small_real_cpu_tensors():
    a, b = torch.zeros(8, 4), torch.zeros(8, 4)
    assert engine.direct_call("cpp", a, b) and engine.direct_call("torch", a, b)
    assert not engine.direct_call("triton", a, b)
    big = torch.zeros(engine.SMALL_LOGITS // 8 + 1, 4)
    assert not engine.direct_call("cpp", big, b)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fa = mode.from_tensor(a)
    assert not engine.direct_call("cpp", fa, b)


# ---------------------------------------------------------------------------------------------------
# The C++ backend's direct loss (fastcon::direct_loss): the whole loss and its autograd node in C++.

cpp = pytest.importorskip("fastcon.kernels.cpp")
needs_cpp = pytest.mark.skipif(not cpp.AVAILABLE, reason="the C++ extension is not built")


def _scalars(kind, dtype, need):
    """(scale, bias) of each kind of argument a user passes: 0-d, one-element of another shape, a
    Python number, with and without a gradient; bias None."""
    if kind == "0d":
        return leaf(torch.tensor(9.0, dtype=dtype), need), leaf(torch.tensor(-4.0, dtype=dtype), need)
    if kind == "shaped":
        return leaf(torch.full((1,), 9.0, dtype=dtype), need), leaf(torch.full((1, 1), -4.0, dtype=dtype), need)
    if kind == "number":
        return 9.0, -4.0
    return leaf(torch.tensor(9.0, dtype=dtype), need), None  # "no_bias"


def _run_case(loss, dtype, scalars, grad_of, upstream, **kw):
    a, b = make_features(10, 13, 8, seed=3)
    xa, xb = leaf(a.to(dtype), "a" in grad_of), leaf(b.to(dtype), "b" in grad_of)
    s, bias = _scalars(scalars, torch.float32, "s" in grad_of)
    if loss == "siglip":
        out = FC.siglip_loss(xa, xb, s, bias, pos_offset=1, **kw)
    elif loss == "siglip_neg":
        out = FC.siglip_loss(xa, xb, s, bias, negative_only=True, **kw)
    elif loss == "clip_smooth":
        out = FC.clip_loss(xa, xb, s, bias, label_smoothing=0.2, pos_offset=2, **kw)
    else:
        out = FC.clip_loss(xa, xb[:10], s, bias, **kw)
    leaves = [t for t in (xa, xb, s, bias) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(upstream * out, leaves) if leaves else []
    return [out.detach()] + list(grads)


@needs_cpp
@pytest.mark.parametrize("loss", ["clip", "clip_smooth", "siglip", "siglip_neg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scalars,grad_of", [("0d", "abs"), ("shaped", "abs"), ("number", "ab"), ("no_bias", "as"),
                                             ("0d", "b"), ("0d", "")])
@pytest.mark.parametrize("chunk", [None, 3], ids=["one-chunk", "chunks"])
def test_cpp_direct_loss_equals_the_registered_operator(monkeypatch, loss, dtype, scalars, grad_of, chunk):
    """Every kind of scale and bias, every input dtype, every subset of inputs with a gradient, one
    chunk or several (``chunk_size=3``, nothing cached for pass 2): the direct loss returns what the
    registered operator's path returns (loss, gradients, their shapes and dtypes), under an upstream
    gradient of 0.75."""
    if chunk:
        monkeypatch.setenv("FASTCON_CACHE_BYTES", "0")
    calls = []
    real = cpp.direct_loss
    monkeypatch.setattr(cpp, "direct_loss", lambda *args: calls.append(args[-2:]) or real(*args))
    direct = _run_case(loss, dtype, scalars, grad_of, 0.75, backend="cpp", chunk_size=chunk)
    assert calls, "the small CPU call did not take the direct loss"
    assert calls[0][0] == (chunk or 10) and (chunk is None or calls[0][1] == 0)
    _registered(monkeypatch)
    registered = _run_case(loss, dtype, scalars, grad_of, 0.75, backend="cpp", chunk_size=chunk)
    assert len(direct) == len(registered)
    rtol = 2e-7 if dtype in (torch.float32, torch.float64) else 0  # half: the same fp32 numbers, one rounding
    for x, y in zip(direct, registered):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-12 if dtype == torch.float64 else 0)


@needs_cpp
@pytest.mark.parametrize("loss", ["clip", "clip_smooth", "siglip"])
def test_cpp_direct_loss_against_float64(loss):
    """The direct loss in fp32 against the float64 reference, gradients included, at an upstream
    gradient of −2."""
    a, b = make_features(24, 30, 16, seed=5)
    s, bias = torch.tensor(12.0), torch.tensor(-6.0)

    def run(fn, dtype):
        xa, xb, xs, xbias = leaf(a.to(dtype)), leaf(b.to(dtype)), leaf(s.to(dtype)), leaf(bias.to(dtype))
        if loss == "siglip":
            out = fn["siglip"](xa, xb, xs, xbias, pos_offset=3)
        elif loss == "clip_smooth":
            out = fn["clip"](xa, xb, xs, xbias, label_smoothing=0.1, pos_offset=4)
        else:
            out = fn["clip"](xa, xb[:24], xs, xbias)
        return [out] + list(torch.autograd.grad(-2.0 * out, [xa, xb, xs, xbias]))

    got = run({"clip": FC.clip_loss, "siglip": FC.siglip_loss}, torch.float32)
    want = run({"clip": R.clip_loss_reference, "siglip": R.siglip_loss_reference}, torch.float64)
    for name, x, y in zip(["loss", "a", "b", "scale", "bias"], got, want):
        # the softmax does not see the bias: its gradient is 0 up to fp32's sum of probabilities − 1
        atol = 1e-6 if name == "bias" and loss != "siglip" else 0.0
        assert_close_rel(x, y, rtol=2e-6, atol=atol, name=f"{loss} {name}")


@needs_cpp
def test_cpp_direct_loss_without_gradients_and_double_backward():
    a, b = make_features(6, 6, 4)
    want = FC.clip_loss(a, b, 5.0, backend="cpp")
    with torch.no_grad():
        assert FC.clip_loss(leaf(a), leaf(b), 5.0, backend="cpp") == want
    with torch.inference_mode():
        assert FC.siglip_loss(a, b, 5.0, -2.0, backend="cpp").isfinite()
        assert FC.clip_loss(a, b, 5.0, backend="cpp") == want
    xa = leaf(a)
    out = FC.clip_loss(xa, b, 5.0, backend="cpp")
    assert out.grad_fn is not None
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, xa, create_graph=True)


@needs_cpp
def test_cpp_direct_loss_rejects_bad_calls():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    s = torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="kind"):
        cpp.direct_loss(a, b, s, None, 7, 0, True, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match="pos_offset"):
        cpp.direct_loss(a, b, s, None, cpp.DIRECT_SOFTMAX, 1, True, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match="one element"):
        cpp.direct_loss(a, b, torch.ones(2), None, cpp.DIRECT_SOFTMAX, 0, True, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        cpp.direct_loss(a, b, s, None, cpp.DIRECT_SIGMOID, 0, True, 0.1, 4, 0)
    with pytest.raises(RuntimeError, match="share a floating dtype"):
        cpp.direct_loss(a, b.double(), s, None, cpp.DIRECT_SOFTMAX, 0, True, 0.0, 4, 0)
    with pytest.raises(RuntimeError, match="chunk_rows"):
        cpp.direct_loss(a, b, s, None, cpp.DIRECT_SOFTMAX, 0, True, 0.0, 0, 0)


# ---------------------------------------------------------------------------------------------------
# Eager calls stay off torch.library's dispatch, which imports the compiler on its first call.

_FIRST_CALLS = r"""
import sys, torch
import fastcon, fastcon.functional as FC
from fastcon.bench.measure import rss_bytes
from fastcon.kernels._common import cache_bytes, chunk_bytes

n, d = 1500, 64  # 2.25M logits: above the direct C++ call's threshold, so the operators run
g = torch.Generator().manual_seed(0)
a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
s = torch.tensor(10.0, requires_grad=True)
before = rss_bytes("VmHWM")
FC.clip_loss(a, b, s, backend=BACKEND).backward()
rise = rss_bytes("VmHWM") - before
FC.siglip_loss(a, b, s, torch.tensor(-10.0)).backward()
FC.ntxent_loss(a[:200], b[:200]).backward()
FC.distill_loss(a[:200], b[:200], s, a[:200].detach(), b[:200].detach(), s.detach()).backward()
FC.filip_loss(torch.randn(4, 5, 8, requires_grad=True), torch.randn(4, 6, 8), torch.tensor(10.0)).backward()
FC.maxsim_loss(torch.randn(4, 5, 8, requires_grad=True), torch.randn(4, 6, 8)).backward()
FC.mochi_loss(a[:64], b[:64].detach(), b[64:400].detach(), temperature=0.2, top_n=16, n_mix=8, n_query_mix=4,
              generator=torch.Generator().manual_seed(1)).backward()
# fastcon's buffers at the peak. C++: two of the pass-1 cache, one chunk and the wide gradients (pass 2
# takes the cached block first and frees it before the chunk buffer is taken again). Eager PyTorch: the
# dot products (cached or a chunk) beside two more chunks, the logits and one temporary (pass 1) or the
# logits and G (pass 2), and the gradients. The margin is what a first call of the BLAS library keeps
# (its packing buffers) and pages in (code).
grads, cache, chunk = 2 * n * d * 4, min(cache_bytes(a.device), n * n * 4), min(chunk_bytes(a.device), n * n * 4)
if BACKEND == "torch":
    bound = max(cache, chunk) + 2 * chunk + grads + (24 << 20)
else:
    bound = max(cache + chunk, cache + grads, chunk + grads) + (24 << 20)
print(" ".join(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules) or "none", rise, bound)
"""


@pytest.mark.parametrize("loss", ["clip", "siglip", "late"])
def test_an_eager_backward_is_given_no_zero_gradients(monkeypatch, loss):
    """The outputs of an eager engine operator that carry no gradient (the gradients a forward
    returns and saves, a statistic nobody used) reach its backward as None: zeros of their shape
    would be a transient 2·N·D wide floats in every CLIP backward."""
    seen = []
    for op in registry.OPS.values():
        if op.backward is not None:
            def spy(ctx, *grads, _inner=op.backward):
                seen.append(grads)
                return _inner(ctx, *grads)
            monkeypatch.setattr(op, "backward", spy)
    a, b = make_features(40, 40, 8)
    xa, xb, s = leaf(a), leaf(b), torch.tensor(10.0, requires_grad=True)
    if loss == "late":
        FC.maxsim_loss(xa.view(5, 8, 8), xb.view(5, 8, 8)).backward()
    else:
        (FC.clip_loss if loss == "clip" else FC.siglip_loss)(xa, xb, s, backend="torch").backward()
    assert len(seen) == 1 and seen[0][0] is not None
    assert all(g is None for g in seen[0][1:]), [type(g) for g in seen[0]]
    assert xa.grad is not None and xb.grad is not None


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_fresh_process_pays_for_no_compiler(backend):
    """The first eager calls of a fresh process (CLIP above the direct call's size, SigLIP, NT-Xent,
    distillation, FILIP, MaxSim, MoCHi) import neither Dynamo nor Inductor, and CLIP's first call
    holds its peak RSS rise to the buffers of its backend and a margin: the compiler's import alone
    is about 160 MiB. glibc's mmap threshold is fixed at 1 MiB in the child, so that every freed chunk
    goes back to the system at once: its default threshold grows with the first large free, after
    which freed chunks stay in the heap and the peak varies by 20 MiB or more from run to run."""
    import os
    import subprocess
    import sys

    code = _FIRST_CALLS.replace("BACKEND", repr(backend))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    imported, rise, bound = out.stdout.split()
    assert imported == "none", f"a first eager call imported {imported}"
    assert int(rise) <= int(bound), f"CLIP's first call raised the peak RSS by {int(rise) >> 20} MiB"


_PEAK = r"""
import torch
torch.set_num_threads(2)
import fastcon.functional as FC
from fastcon.bench.measure import rss_bytes

n, d = 4096, 1024
g = torch.Generator().manual_seed(0)
def unit_rows():  # normalised in place: no temporary above the resident set the peak is measured from
    x = torch.randn(n, d, generator=g)
    return x.div_(x.norm(dim=1, keepdim=True)).requires_grad_()
a, b = unit_rows(), unit_rows()
s = torch.tensor(10.0, requires_grad=True)
resident = rss_bytes("VmRSS")
FC.clip_loss(a, b, s).backward()
print(rss_bytes("VmHWM") - resident)
"""


def test_clip_on_cpu_holds_two_of_cache_chunk_and_gradients_at_once():
    """CLIP's CPU pass 2 takes the cached block of pass 1 first and frees it before taking a chunk
    buffer again, and the backward allocates nothing of size N·D: the peak above the resident set is
    the largest two of the cache, one chunk and the wide gradients (N = 4096, D = 1024, a 32 MiB cache
    of the 64 MiB of logits, 16 MiB chunks, 32 MiB of gradients: 64 MiB, where holding all three
    would be 80), plus what a first BLAS call keeps."""
    import os
    import subprocess
    import sys

    cache, chunk, n, d = 32 << 20, 16 << 20, 4096, 1024
    env = dict(os.environ, FASTCON_CACHE_BYTES=str(cache), FASTCON_CHUNK_BYTES=str(chunk))
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True, env=env)
    grads = 2 * n * d * 4
    bound = max(cache + chunk, cache + grads, chunk + grads) + (20 << 20)
    assert int(out.stdout) <= bound, f"peak {int(out.stdout) >> 20} MiB above the resident set, bound {bound >> 20}"
