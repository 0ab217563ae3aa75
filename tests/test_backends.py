"""Every engine backend against the float64 reference: loss and the gradients of every input.

fp32 inputs; the ground truth is the reference evaluated in float64 on the same (fp32-valued) inputs.
Errors are relative to the largest magnitude of the expected value, with an absolute floor from
fp32 rounding of logits of size ``s`` (unit rows).
"""
import importlib
import os

import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel, leaf, make_features

# The Triton backends run here on CPU tensors, through the interpreter (TRITON_INTERPRET=1; skipped
# otherwise, see conftest.py); tests/test_cuda.py covers them on a GPU.
BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
            pytest.param("triton_fused", marks=pytest.mark.interpreter)]
INTERPRETER_SKIP_REASON = "runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (make test)"
FUSED_MAX_D = 256

# (Na, Nb, D, pos_offset, scale, bias, label_smoothing, chunk_size)
SQUARE = []
for i, (n, d) in enumerate([(n, d) for n in (1, 3, 127, 257, 1000) for d in (3, 64, 640)]):
    scale = (1.0, 14.3, 100.0)[i % 3]
    bias = None if i % 2 == 0 else -3.0
    eps = 0.1 if i % 4 in (1, 2) else 0.0
    chunk = None if n < 100 else (n // 3 + 1 if i % 2 else None)
    SQUARE.append((n, n, d, 0, scale, bias, eps, chunk))
RECT = [
    (3, 8, 64, 5, 14.3, None, 0.1, None),
    (127, 257, 64, 130, 100.0, 2.0, 0.0, 50),
    (257, 300, 3, 0, 1.0, -1.0, 0.1, 64),
    (100, 1000, 640, 900, 14.3, None, 0.0, None),
]
CASES = SQUARE + RECT


def _case_id(c):
    na, nb, d, off, s, bias, eps, chunk = c
    return f"{na}x{nb}x{d}-off{off}-s{s}-b{bias}-ls{eps}-c{chunk}"


def _pairs():
    """(backend, case) of every backend and case, but the fused tile kernels not at N = 1,000 (the
    interpreter runs them slowest there, a minute and a half; 257 rows already span several of their
    tiles, and the chunked cases at 127 and 257 rows cover their chunk boundaries)."""
    out = []
    for case in CASES:
        for backend in BACKENDS:
            name = getattr(backend, "values", (backend,))[0]
            if name == "triton_fused" and case[0] == case[1] == 1000:
                continue
            marks = getattr(backend, "marks", ())
            out.append(pytest.param(name, case, marks=marks, id=f"{_case_id(case)}-{name}"))
    return out


def _backend_ready(backend):
    if backend == "cpp":
        cpp = importlib.import_module("fastcon.kernels.cpp")
        # The extension is part of the build: a missing one is a failure, not a skip.
        assert cpp.AVAILABLE, f"C++ extension unavailable: {cpp.REASON}"
    if backend.startswith("triton") and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(INTERPRETER_SKIP_REASON)


def _inputs(case, with_bias_grad=True):
    na, nb, d, off, s, bias, eps, chunk = case
    a, b = make_features(na, nb, d, seed=na * 7 + nb + d, pos_offset=off)
    scale = torch.tensor(s, dtype=torch.float32)
    bias_t = None if bias is None else torch.tensor(bias, dtype=torch.float32)
    return a, b, scale, bias_t


def _run(fn, a, b, scale, bias, **kw):
    leaves = [leaf(a), leaf(b), leaf(scale)] + ([leaf(bias)] if bias is not None else [])
    loss = fn(*leaves[:3], leaves[3] if bias is not None else None, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return loss, grads


def _compare(loss, grads, ref_loss, ref_grads, scale, na):
    # Absolute floors: fp32 rounding of logits of size s, spread over the Na rows of the mean.
    atol = 2e-6 * max(1.0, scale)
    assert_close_rel(loss, ref_loss, rtol=1e-5, atol=atol, name="loss")
    names = ["grad image_features", "grad text_features", "grad logit_scale", "grad logit_bias"]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == torch.float32, f"{name} dtype {g.dtype}"
        floor = 4e-7 * max(1.0, scale) / na if "features" in name else atol
        assert_close_rel(g, r, rtol=1e-5, atol=floor, name=name)


@pytest.mark.parametrize("backend,case", _pairs())
def test_clip_backend_matches_reference(backend, case):
    _backend_ready(backend)
    na, nb, d, off, s, bias, eps, chunk = case
    a, b, scale, bias_t = _inputs(case)
    kw = dict(label_smoothing=eps, pos_offset=off)
    if backend == "triton_fused" and d > FUSED_MAX_D:
        with pytest.raises(ValueError, match="D"):
            FC.clip_loss(a, b, scale, bias_t, backend=backend, **kw)
        return
    loss, grads = _run(FC.clip_loss, a, b, scale, bias_t, backend=backend, chunk_size=chunk, **kw)
    ref_loss, ref_grads = _run(lambda *x, **k: R.clip_loss_reference(*x, **k),
                               a.double(), b.double(), scale.double(),
                               None if bias_t is None else bias_t.double(), **kw)
    _compare(loss, grads, ref_loss, ref_grads, s, na)


@pytest.mark.parametrize("backend,case", _pairs())
def test_siglip_backend_matches_reference(backend, case):
    _backend_ready(backend)
    na, nb, d, off, s, bias, eps, chunk = case
    a, b, scale, bias_t = _inputs(case)
    negative_only = eps > 0 and na != nb  # exercise the remote-shard form on some rectangular cases
    kw = dict(pos_offset=off, negative_only=negative_only)
    if backend == "triton_fused" and d > FUSED_MAX_D:
        with pytest.raises(ValueError, match="D"):
            FC.siglip_loss(a, b, scale, bias_t, backend=backend, **kw)
        return
    loss, grads = _run(FC.siglip_loss, a, b, scale, bias_t, backend=backend, chunk_size=chunk, **kw)
    ref_loss, ref_grads = _run(lambda *x, **k: R.siglip_loss_reference(*x, **k),
                               a.double(), b.double(), scale.double(),
                               None if bias_t is None else bias_t.double(), **kw)
    _compare(loss, grads, ref_loss, ref_grads, s, na)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float64_gradcheck(backend):
    _backend_ready(backend)
    a, b = make_features(7, 9, 5, dtype=torch.float64, pos_offset=2)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    a, b = leaf(a), leaf(b)

    def clip(a, b, s, bb):
        return FC.clip_loss(a, b, s, bb, label_smoothing=0.1, pos_offset=2, backend=backend, chunk_size=3)

    def siglip(a, b, s, bb):
        return FC.siglip_loss(a, b, s, bb, pos_offset=2, backend=backend, chunk_size=3)

    assert torch.autograd.gradcheck(clip, (a, b, scale, bias))
    assert torch.autograd.gradcheck(siglip, (a, b, scale, bias))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_upstream_gradient_scales_and_no_grad_forward(backend):
    _backend_ready(backend)
    a, b = make_features(33, 33, 16)
    scale = torch.tensor(14.3)
    loss, grads = _run(FC.clip_loss, a, b, scale, None, backend=backend)
    la, lb = leaf(a), leaf(b)
    (3.0 * FC.clip_loss(la, lb, scale, backend=backend)).backward()
    assert_close_rel(la.grad, 3.0 * grads[0], rtol=1e-6)
    assert_close_rel(lb.grad, 3.0 * grads[1], rtol=1e-6)
    with torch.no_grad():
        assert_close_rel(FC.clip_loss(a, b, scale, backend=backend), loss, rtol=1e-6)
        assert_close_rel(FC.siglip_loss(a, b, scale, -1.0, backend=backend),
                         R.siglip_loss_reference(a, b, scale, -1.0), rtol=1e-5)


def test_cache_budget_does_not_change_results(monkeypatch):
    a, b, scale, bias = _inputs((257, 257, 64, 0, 14.3, -1.0, 0.1, 40))
    results = []
    for cache in ("0", str(257 * 40 * 4 * 2), str(1 << 30)):
        monkeypatch.setenv("FASTCON_CACHE_BYTES", cache)
        results.append(_run(FC.clip_loss, a, b, scale, bias, label_smoothing=0.1, backend="auto", chunk_size=40))
    for loss, grads in results[1:]:
        assert_close_rel(loss, results[0][0], rtol=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            assert_close_rel(g, g0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noise", [0.3, 0.1])
def test_clip_confident_rows_at_scale_100(backend, noise):
    """Confident rows (per-row loss 1e-6..1e-2) at s = 100: the loss is a difference of an LSE and a
    logit of size 100, and P − 1 of the positive is as small. fastcon must stay within a small factor
    of the fp32 reference (which subtracts the row maximum first) against float64."""
    _backend_ready(backend)
    g = torch.Generator().manual_seed(7)
    a = torch.nn.functional.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=-1)
    b = torch.nn.functional.normalize(a + noise * torch.randn(64, 32, generator=g, dtype=torch.float64), dim=-1)
    a, b = a.float(), b.float()
    scale = torch.tensor(100.0)
    ours = _run(FC.clip_loss, a, b, scale, None, backend=backend, chunk_size=24)
    ref32 = _run(lambda *x: R.clip_loss_reference(*x), a, b, scale, None)
    truth = _run(lambda *x: R.clip_loss_reference(*x, upcast=False), a.double(), b.double(), scale.double(), None)
    for name, o, r, t in zip(["loss", "grad image", "grad text", "grad scale"], [ours[0], *ours[1]],
                             [ref32[0], *ref32[1]], [truth[0], *truth[1]]):
        err = ((o.double() - t).abs().max() / t.abs().max()).item()
        err_ref = ((r.double() - t).abs().max() / t.abs().max()).item()
        assert err <= 3 * err_ref + 1e-6, f"{name}: fastcon {err:.3g} vs fp32 reference {err_ref:.3g}"
