"""CLIP's softmax loss and SigLIP's sigmoid loss as engine operators, each returning the loss and the
gradient of every tensor input ("gradient in forward", see ``fastcon.ops.engine``)::

    fastcon::softmax_loss(a, b, scale, bias, backend, pos_offset, label_smoothing, symmetric,
                          chunk_size, need_grad, mm_dtype) -> (loss, grad_a, grad_b, grad_scale, grad_bias)
    fastcon::sigmoid_loss(a, b, scale, bias, backend, pos_offset, chunk_size, need_grad, mm_dtype)
                          -> (loss, grad_a, grad_b, grad_scale, grad_bias)

``fastcon::softmax_loss_triton`` and ``fastcon::sigmoid_loss_triton`` are the same operators for the
Triton backends, registered with ``torch.library.triton_op`` where torch has it (on first use under
``torch.compile``), so that compile traces into the kernel launches. ``backend`` is a resolved
backend name; the gradients are empty tensors when ``need_grad`` is false. Label smoothing's
O(N·D) sums are plain autograd here (``_ColumnSum``), the same for every backend.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastcon.kernels._common import acc_dtype, cache_bytes
from fastcon.ops.engine import (TRITON_BACKENDS, autocast_gemm_dtype, autocast_off, backend_inputs, cpp_direct,
                                cpp_direct_loss, engine_scalars, final_grads, grad_likes, loss_dtype, needs_grad,
                                no_grads, save_output_grads, saved_grads_backward, traced_backend_name)
from fastcon.ops.registry import EngineOp


def _softmax_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, backend: str, pos_offset: int,
                  label_smoothing: float, symmetric: bool, chunk_size: int, need_grad: bool,
                  mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The symmetric InfoNCE without smoothing sums, in float64:
    (1/(2·Na))·Σ_i [(row_lse_i − (1−ε)·S_{i,c0+i}) + (col_lse_{c0+i} − (1−ε)·S_{i,c0+i})], c0 =
    ``pos_offset`` (only the first bracket over Na when not ``symmetric``), and its gradients. The
    positive logits come from the same tiles as the LSEs."""
    with autocast_off(a.device.type):
        impl, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        na = x.shape[0]
        w_col = 1.0 if symmetric else 0.0
        denom = (2 if symmetric else 1) * na
        eps = label_smoothing
        # The C++ kernels (fp32/float64, no fp16 lift) take the loss's 1/denom into their weights, which
        # spares two passes over each gradient; the other backends scale their gradients afterwards.
        fold = 1.0 / denom if backend == "cpp" else 1.0
        if need_grad:
            row_lse, col_lse, pos_logit, *grads = impl.softmax_fused(
                x, y, s, c, pos_offset, fold, w_col * fold, (1.0 + w_col) * (1.0 - eps) * fold, chunk_rows,
                cache_bytes(x.device))
        else:
            row_lse, col_lse, pos_logit = impl.lse_stats(x, y, s, c, pos_offset, chunk_rows)
        # Per-row differences in float64: each is small next to the LSE and the logit it subtracts.
        target = (1.0 - eps) * pos_logit.double()
        terms = row_lse - target
        if symmetric:
            terms = terms + (col_lse[pos_offset:pos_offset + na] - target)
        loss = terms.sum() / denom
        if not need_grad:
            return (loss,) + no_grads(a)
        return (loss,) + final_grads((a, b, scale, bias), grads, 1.0 / denom / fold)


def _softmax_loss_fake(a, b, scale, bias, backend, pos_offset, label_smoothing, symmetric, chunk_size, need_grad,
                       mm_dtype):
    loss = a.new_empty((), dtype=torch.float64)
    return (loss,) + (grad_likes(a, b, scale, bias) if need_grad else no_grads(a))


def _sigmoid_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, backend: str, pos_offset: int,
                  chunk_size: int, need_grad: bool,
                  mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(1/Na)·Σ_ij softplus(−z_ij·S_ij), z = +1 only at j = i + pos_offset (``pos_offset >= Nb``: no
    positives), in the accumulation dtype, and its gradients."""
    with autocast_off(a.device.type):
        impl, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        na = x.shape[0]
        fold = 1.0 / na if backend == "cpp" else 1.0  # as in _softmax_loss
        loss_sum, *grads = impl.sigmoid_fused(x, y, s, c, pos_offset, fold, chunk_rows, need_grad)
        loss = loss_sum / na
        if not need_grad:
            return (loss,) + no_grads(a)
        return (loss,) + final_grads((a, b, scale, bias), grads, 1.0 / na / fold)


def _sigmoid_loss_fake(a, b, scale, bias, backend, pos_offset, chunk_size, need_grad, mm_dtype):
    loss = a.new_empty((), dtype=acc_dtype(a.dtype))
    return (loss,) + (grad_likes(a, b, scale, bias) if need_grad else no_grads(a))



def _shipped_triton_kernels() -> list:
    """Every Triton kernel the Triton backends launch (through ``launch``, which torch's scan of a
    triton_op's source does not see)."""
    import pkgutil

    import triton

    from fastcon.kernels import triton as package

    modules = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    return [v for m in modules for v in vars(m).values() if isinstance(v, triton.runtime.JITFunction)]


def _record_kernels(op: EngineOp) -> None:
    """Records the Triton kernels of a just-registered triton_op for torch.compile's cache key, so
    that edited kernels are recompiled."""
    registry = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
    if isinstance(registry, dict):
        try:
            registry[op.name] = _shipped_triton_kernels()
        except ImportError:  # triton missing: the backends report it when used
            registry[op.name] = []


def _ops(name: str, body, fake):
    """The operator ``name`` and its Triton twin ``name_triton``."""
    kw = dict(setup_context=save_output_grads, backward=saved_grads_backward)
    return EngineOp(name, body, fake, **kw), EngineOp(name + "_triton", body, fake, triton=True,
                                                      on_register=_record_kernels, **kw)


softmax_loss, softmax_loss_triton = _ops("softmax_loss", _softmax_loss, _softmax_loss_fake)
sigmoid_loss, sigmoid_loss_triton = _ops("sigmoid_loss", _sigmoid_loss, _sigmoid_loss_fake)


def triton_ops():
    """The registered Triton operators ``fastcon::softmax_loss_triton`` and
    ``fastcon::sigmoid_loss_triton`` (registering them on first use)."""
    return softmax_loss_triton.registered(), sigmoid_loss_triton.registered()


# ---------------------------------------------------------------------------------------------------
# O(N·D) helper of label smoothing

class _ColumnSum(torch.autograd.Function):
    """Σ_i a_i in the accumulation dtype, of the rows as the GEMMs see them (rounded to ``mm_dtype``
    under autocast), with the gradient of that sum passed straight to ``a`` in its own dtype (no
    rounding of the gradient to the autocast dtype)."""

    @staticmethod
    def forward(ctx, a, acc, mm_dtype):
        ctx.shape, ctx.dtype = a.shape, a.dtype
        with autocast_off(a.device.type):
            x = a if mm_dtype is None else a.to(mm_dtype)
            return x.sum(dim=0, dtype=acc)

    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape).to(ctx.dtype), None, None


def clip_engine_loss(a, b, scale, bias, *, label_smoothing: float, pos_offset: int, backend: str,
                     chunk_size: Optional[int], symmetric: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (docs/losses.md §1.1) on the engine; arguments already validated. With
    ``symmetric=False`` only the row direction: (1/Na)·Σ_i CE(S_i·, pos_offset + i)."""
    mm_dtype = autocast_gemm_dtype(a)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    eps = label_smoothing
    if cpp_direct(name, a, b, mm_dtype):
        return cpp_direct_loss("softmax", a, b, scale, bias, pos_offset, chunk_size, symmetric=symmetric,
                                label_smoothing=eps)
    out_dtype = loss_dtype(a)
    acc = acc_dtype(a.dtype)
    scale, bias = engine_scalars(scale, bias, acc, a.device)
    na, nb = a.shape[0], b.shape[0]
    op = softmax_loss_triton if name in TRITON_BACKENDS else softmax_loss
    loss = op(a, b, scale, bias, name, int(pos_offset), float(eps), bool(symmetric), int(chunk_size or 0),
              needs_grad(a, b, scale, bias), mm_dtype)[0]
    if eps > 0:
        # The smoothing targets ε/Nb add −(ε/Nb)·Σ_ij S_ij to the row terms, and Σ_ij S_ij =
        # s·(Σ_i a_i)·(Σ_j b_j) + Na·Nb·b; likewise ε/Na for the columns that own a positive. Two column
        # sums, O(N·D), no N×N; their dot product in float64.
        denom = (2 if symmetric else 1) * na
        sum_a = _ColumnSum.apply(a, acc, mm_dtype).double()
        sum_b = _ColumnSum.apply(b, acc, mm_dtype).double()
        s64, b64 = scale.double(), bias.double()
        total = (eps / nb) * (s64 * (sum_a @ sum_b) + na * nb * b64)
        if symmetric:
            sum_b_pos = _ColumnSum.apply(b[pos_offset:pos_offset + na], acc, mm_dtype).double()
            total = total + (eps / na) * (s64 * (sum_b_pos @ sum_a) + na * na * b64)
        loss = loss - total / denom
    return loss.to(acc).to(out_dtype)


def siglip_engine_loss(a, b, scale, bias, *, pos_offset: Optional[int], backend: str,
                       chunk_size: Optional[int]) -> torch.Tensor:
    """SigLIP (docs/losses.md §1.2) on the engine; ``pos_offset=None`` means negatives only."""
    mm_dtype = autocast_gemm_dtype(a)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    offset = b.shape[0] if pos_offset is None else pos_offset
    if cpp_direct(name, a, b, mm_dtype):
        return cpp_direct_loss("sigmoid", a, b, scale, bias, offset, chunk_size)
    out_dtype = loss_dtype(a)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    op = sigmoid_loss_triton if name in TRITON_BACKENDS else sigmoid_loss
    loss = op(a, b, scale, bias, name, int(offset), int(chunk_size or 0), needs_grad(a, b, scale, bias), mm_dtype)[0]
    return loss.to(out_dtype)

