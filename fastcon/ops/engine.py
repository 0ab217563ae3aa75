"""The engine as autograd functions: backend choice, chunk sizing, and the loss assembly that is the
same for every backend.

A backend computes the O(N²) parts (LSE statistics, positive logits, softplus sums and their
gradients, see ``fastcon/kernels/__init__.py``); the O(N·D) label-smoothing sums are plain autograd
here, so that every backend shares them.

Both losses compute their gradients inside the forward when any input requires grad ("gradient in
forward"): the second pass needs the complete statistics of the first, so doing it at once costs no
extra FLOPs, lets the CPU backend reuse the first pass's logits chunks, and leaves the backward a
multiplication by the upstream gradient.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch
from fastcon.kernels._common import acc_dtype

BACKENDS = ("auto", "cpp", "triton", "triton_fused", "torch", "reference")

_MiB = 1 << 20
_DEFAULT_CHUNK_BYTES = {"cpu": 32 * _MiB, "cuda": 256 * _MiB}
_DEFAULT_CACHE_BYTES = {"cpu": 96 * _MiB, "cuda": 0}
_warned_cpp_fallback = False


def _env_bytes(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def chunk_bytes(device: torch.device) -> int:
    """Bytes of one logits chunk (``FASTCON_CHUNK_BYTES``; default 32 MiB on CPU, 256 MiB on GPU)."""
    value = _env_bytes("FASTCON_CHUNK_BYTES")
    return value if value else _DEFAULT_CHUNK_BYTES.get(device.type, 256 * _MiB)


def cache_bytes(device: torch.device) -> int:
    """Bytes of first-pass logits kept for the gradient pass (``FASTCON_CACHE_BYTES``; default 96 MiB
    on CPU, where it saves a matrix product, 0 on GPU, where recomputing is cheaper than the traffic)."""
    value = _env_bytes("FASTCON_CACHE_BYTES")
    return value if value is not None else _DEFAULT_CACHE_BYTES.get(device.type, 0)


def chunk_rows_for(na: int, nb: int, device: torch.device, chunk_size: Optional[int]) -> int:
    """Rows per chunk: ``chunk_size`` if given, else what fits ``chunk_bytes`` at fp32."""
    if chunk_size:
        return max(1, min(int(chunk_size), na))
    return max(1, min(na, chunk_bytes(device) // (4 * max(nb, 1))))


def _cpp_module() -> ModuleType:
    return importlib.import_module("fastcon.kernels.cpp")


def _triton_available(device: torch.device) -> Tuple[bool, Optional[str]]:
    try:
        from fastcon.kernels import triton as triton_backend
    except ImportError as exc:  # pragma: no cover - the package always ships it
        return False, f"fastcon.kernels.triton failed to import: {exc}"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    return triton_backend.available(device)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, ModuleType]:
    """Maps a ``backend=`` name to (name, module implementing the engine contract)."""
    global _warned_cpp_fallback
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        raise ValueError("backend='reference' is handled by fastcon.functional, not by the engine")
    if backend == "auto":
        if device.type == "cuda":
            ok, _ = _triton_available(device)
            backend = "triton" if ok and dtype != torch.float64 else "torch"
        elif device.type == "cpu":
            cpp = _cpp_module()
            if cpp.AVAILABLE:
                backend = "cpp"
            else:
                if not _warned_cpp_fallback:
                    warnings.warn(
                        f"fastcon: the C++ extension is unavailable ({cpp.REASON}); CPU losses use the "
                        "chunked PyTorch path, which is slower. See fastcon.backend_info().",
                        RuntimeWarning, stacklevel=4)
                    _warned_cpp_fallback = True
                backend = "torch"
        else:
            backend = "torch"
    if backend == "torch":
        from fastcon.kernels import torch_chunked
        return backend, torch_chunked
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        cpp = _cpp_module()
        if not cpp.AVAILABLE:
            raise RuntimeError(f"backend='cpp' is unavailable: {cpp.REASON}")
        return backend, cpp
    # triton, triton_fused
    ok, reason = _triton_available(device)
    if not ok:
        raise RuntimeError(f"backend={backend!r} is unavailable on {device}: {reason}")
    if dtype == torch.float64:
        raise TypeError(f"backend={backend!r} supports float32, bfloat16 and float16 inputs, got float64")
    if device.type == "cpu" and dtype != torch.float32:
        raise TypeError(f"backend={backend!r} on CPU tensors (Triton interpreter) supports float32 only, got {dtype}")
    module = importlib.import_module(
        "fastcon.kernels.triton.fused" if backend == "triton_fused" else "fastcon.kernels.triton.chunked")
    return backend, module


# ---------------------------------------------------------------------------------------------------
# O(N·D) helpers with fp32 accumulation that keep no fp32 copies of the inputs for the backward.

_ROW_CHUNK = 8192


class _MatVec(torch.autograd.Function):
    """y = a · v in the accumulation dtype (a: N×D in the input dtype, v: D in the accumulation dtype)."""

    @staticmethod
    def forward(ctx, a, v):
        acc = v.dtype
        out = torch.empty(a.shape[0], dtype=acc, device=a.device)
        for r0 in range(0, a.shape[0], _ROW_CHUNK):
            out[r0:r0 + _ROW_CHUNK] = a[r0:r0 + _ROW_CHUNK].to(acc) @ v
        ctx.save_for_backward(a, v)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, v = ctx.saved_tensors
        grad_a = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_a = (grad[:, None] * v[None, :]).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_v = torch.zeros_like(v)
            for r0 in range(0, a.shape[0], _ROW_CHUNK):
                grad_v += a[r0:r0 + _ROW_CHUNK].to(v.dtype).T @ grad[r0:r0 + _ROW_CHUNK]
        return grad_a, grad_v


# ---------------------------------------------------------------------------------------------------
# The O(N²) parts.

def needs_grad(*tensors) -> bool:
    """Whether the engine must produce gradients: grad mode is on (decided before ``Function.apply``,
    inside which it is always off) and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forbid_double_backward() -> None:
    """The gradients are computed in the forward, so they are constants to autograd: a second
    derivative through them would silently be zero. ``create_graph=True`` (grad mode on inside the
    backward) is therefore an error rather than a wrong Hessian."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastcon's fused losses do not support double backward (create_graph=True): their gradients "
            "are computed in the forward pass and have no graph; use backend='reference' for higher-order "
            "derivatives")


def save_final_grads(ctx, inputs, grads, factor: float) -> None:
    """Saves ``factor·grad`` for each input that needs a gradient: multiplied in the accumulation
    dtype and rounded once to the input's dtype, so that the backward of a unit upstream gradient is
    exact and no bf16 rounding of a small factor like 1/(2N) biases the gradients."""
    need = ctx.needs_input_grad
    ctx.save_for_backward(*[
        (g * factor).to(x.dtype) if need[k] and g is not None else None
        for k, (x, g) in enumerate(zip(inputs, grads))])


def scaled_grads(saved, grad_output):
    """The saved gradients times the upstream gradient (multiplied in fp32 or better)."""
    out = []
    for t in saved:
        if t is None:
            out.append(None)
            continue
        acc = torch.promote_types(t.dtype, torch.float32)
        out.append((t.to(acc) * grad_output.to(acc)).to(t.dtype))
    return tuple(out)


class _SoftmaxLSE(torch.autograd.Function):
    """The symmetric InfoNCE: (1/(2·Na))·Σ_i [(row_lse_i − (1−ε)·S_{i,c0+i} − smooth_row_i)
    + (col_lse_{c0+i} − (1−ε)·S_{i,c0+i} − smooth_col_i)] with c0 = ``pos_offset`` (only the first
    bracket over Na, the row-wise cross-entropy, when not ``symmetric``). The positive logits come from
    the same tiles as the LSEs (float64); the smoothing terms (O(N·D), or None) come from the caller."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, smooth_row, smooth_col, impl, pos_offset, eps, chunk_rows, cache_bytes_,
                symmetric, need_grad):
        na = a.shape[0]
        w_col = 1.0 if symmetric else 0.0
        denom = (2 if symmetric else 1) * na
        if need_grad:
            row_lse, col_lse, pos_logit, *grads = impl.softmax_fused(
                a, b, scale, bias, pos_offset, 1.0, w_col, (1.0 + w_col) * (1.0 - eps), chunk_rows, cache_bytes_)
            save_final_grads(ctx, (a, b, scale, bias), grads, 1.0 / denom)
        else:
            row_lse, col_lse, pos_logit = impl.lse_stats(a, b, scale, bias, pos_offset, chunk_rows)
        # Per-row differences in float64: each is small next to the LSE and the logit it subtracts.
        target = (1.0 - eps) * pos_logit.double()
        terms = row_lse - target
        if smooth_row is not None:
            terms = terms - smooth_row.double()
        if symmetric:
            col_terms = col_lse[pos_offset:pos_offset + na] - target
            if smooth_col is not None:
                col_terms = col_terms - smooth_col.double()
            terms = terms + col_terms
        ctx.na, ctx.denom = na, denom
        return (terms.sum() / denom).to(scale.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        forbid_double_backward()
        grad_a, grad_b, grad_scale, grad_bias = scaled_grads(ctx.saved_tensors, grad_output)
        minus = (-grad_output / ctx.denom).expand(ctx.na)
        return (grad_a, grad_b, grad_scale, grad_bias,
                minus if ctx.needs_input_grad[4] else None,
                minus if ctx.needs_input_grad[5] else None,
                None, None, None, None, None, None, None)


class _SigmoidLoss(torch.autograd.Function):
    """(1/Na)·Σ_ij softplus(−z_ij·S_ij), z = +1 only at j = i + pos_offset."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, impl, pos_offset, chunk_rows, need_grad):
        loss_sum, *grads = impl.sigmoid_fused(a, b, scale, bias, pos_offset, 1.0, chunk_rows, need_grad)
        if need_grad:
            save_final_grads(ctx, (a, b, scale, bias), grads, 1.0 / a.shape[0])
        return loss_sum / a.shape[0]

    @staticmethod
    def backward(ctx, grad_output):
        forbid_double_backward()
        return scaled_grads(ctx.saved_tensors, grad_output) + (None, None, None, None)


def prepare_inputs(a, b, scale, bias, backend, chunk_size):
    """(backend module, a, b, scale, bias, chunk_rows) ready for the engine contract."""
    name, impl = resolve_backend(backend, a.device, a.dtype)
    if name == "cpp" and a.dtype in (torch.bfloat16, torch.float16):
        a, b = a.float(), b.float()
    acc = acc_dtype(a.dtype)
    a, b = a.contiguous(), b.contiguous()
    scale = scale.to(device=a.device, dtype=acc).reshape(())
    if bias is None:
        bias = torch.zeros((), dtype=acc, device=a.device)
    else:
        bias = bias.to(device=a.device, dtype=acc).reshape(())
    chunk_rows = chunk_rows_for(a.shape[0], b.shape[0], a.device, chunk_size)
    return impl, a, b, scale, bias, chunk_rows


def clip_engine_loss(a, b, scale, bias, *, label_smoothing: float, pos_offset: int, backend: str,
                     chunk_size: Optional[int], symmetric: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (LOSSES.md 1.1) on the engine; arguments already validated. With
    ``symmetric=False`` only the row direction: (1/Na)·Σ_i CE(S_i·, pos_offset + i)."""
    out_dtype = a.dtype
    na, nb = a.shape[0], b.shape[0]
    impl, a, b, scale, bias, chunk_rows = prepare_inputs(a, b, scale, bias, backend, chunk_size)
    eps = label_smoothing
    smooth_row = smooth_col = None
    if eps > 0:
        acc = scale.dtype
        # ε/Nb·Σ_j S_ij = ε/Nb·(s·a_i·Σ_j b_j + Nb·b), and likewise for the columns: no N×N needed.
        smooth_row = (eps / nb) * (scale * _MatVec.apply(a, b.sum(dim=0, dtype=acc)) + nb * bias)
        if symmetric:
            b_pos = b[pos_offset:pos_offset + na]
            smooth_col = (eps / na) * (scale * _MatVec.apply(b_pos, a.sum(dim=0, dtype=acc)) + na * bias)
    loss = _SoftmaxLSE.apply(a, b, scale, bias, smooth_row, smooth_col, impl, pos_offset, eps, chunk_rows,
                             cache_bytes(a.device), symmetric, needs_grad(a, b, scale, bias))
    return loss.to(out_dtype)


def siglip_engine_loss(a, b, scale, bias, *, pos_offset: Optional[int], backend: str,
                       chunk_size: Optional[int]) -> torch.Tensor:
    """SigLIP (LOSSES.md 1.2) on the engine; ``pos_offset=None`` means negatives only."""
    out_dtype = a.dtype
    nb = b.shape[0]
    impl, a, b, scale, bias, chunk_rows = prepare_inputs(a, b, scale, bias, backend, chunk_size)
    offset = nb if pos_offset is None else pos_offset
    loss = _SigmoidLoss.apply(a, b, scale, bias, impl, offset, chunk_rows, needs_grad(a, b, scale, bias))
    return loss.to(out_dtype)
