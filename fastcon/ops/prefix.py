"""Matryoshka (docs/losses.md §2.7) as engine operators: a loss summed over nested prefixes of the
features, ``Σ_k w_k·L_k``, in one pass over D (docs/engine.md), for the backends that have the prefix
operations (``kernels.contract``: target_prefix_stats/_grad, sigmoid_prefix_fused)::

    fastcon::target_prefix_loss   the general target's softmax loss at every prefix
    fastcon::sigmoid_prefix_loss  SigLIP's sigmoid loss at every prefix

Both compute their gradients in the forward. The prefix norms come in as row and column scales
(N, K) with gradients of their own; the O(N·D) norms and their backward are autograd outside the
operators (``prefix_scales`` below).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastcon.kernels._common import acc_dtype
from fastcon.ops.engine import (assume_constant, autocast_gemm_dtype, autocast_off, backend_context, backend_inputs,
                                engine_scalars, final_grads, grad_likes, loss_dtype, needs_grad, no_grads,
                                resolve_name, save_output_grads, saved_grads_backward, traced_backend_name,
                                wide_dtype)
from fastcon.ops.registry import EngineOp


def prefix_scales(x: torch.Tensor, dims, normalize: bool) -> torch.Tensor:
    """(N, K) in at least fp32: ``1/max(‖x_i[:d_k]‖, 1e-12)`` for each prefix d_k with ``normalize``
    (F.normalize's scale, with autograd), else ones."""
    wide = torch.promote_types(x.dtype, torch.float32)
    if not normalize:
        return torch.ones((x.shape[0], len(dims)), dtype=wide, device=x.device)
    sq = x.to(wide).square()
    norms = torch.stack([sq[:, :d].sum(1) for d in dims], dim=1).sqrt()
    return 1.0 / norms.clamp_min(1e-12)


def _scale_likes(row_scale, col_scale):
    return tuple(torch.empty_like(t, dtype=wide_dtype(t.dtype)) for t in (row_scale, col_scale))


def _no_grads(a):
    """The six empty gradients of an operator called without ``need_grad``."""
    return no_grads(a) + tuple(a.new_empty((0,)) for _ in range(2))


def prefix_chunk_rows(chunk_rows: int, n_prefixes: int, chunk_size) -> int:
    """The rows per chunk of a prefix call: ``chunk_rows / (K + 1)`` where the caller gave no chunk
    size (the K prefixes' G of a chunk and the accumulator are held at once: the chunk memory of one
    loss), else ``chunk_rows``."""
    return chunk_rows if chunk_size else max(1, chunk_rows // (n_prefixes + 1))


def _prefix_inputs(a, b, scale, bias, row_scale, col_scale, dims, backend, chunk_size, mm_dtype):
    """``backend_inputs`` of a prefix operator, with ``prefix_chunk_rows``, and the ``targets.Prefix`` of
    the scales in the accumulation dtype."""
    from fastcon.targets import Prefix

    impl, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
    chunk_rows = prefix_chunk_rows(chunk_rows, len(dims), chunk_size)
    acc = acc_dtype(x.dtype)
    prefix = Prefix(tuple(dims), row_scale.to(acc).contiguous(), col_scale.to(acc).contiguous())
    return impl, x, y, s, c, chunk_rows, prefix


def _target_prefix_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, row_scale: Tensor, col_scale: Tensor,
                        rows: Tensor, cols: Tensor, mask: Optional[Tensor], teacher: List[Optional[Tensor]],
                        numbers: List[float], dims: List[int], weights: List[float], backend: str,
                        label_smoothing: float, symmetric: bool, chunk_size: int, need_grad: bool,
                        mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                  Tensor]:
    """``Σ_k w_k·L_k`` (float64) of a general target at the prefixes ``dims`` (``targets.Prefix``), and
    the gradients of a, b, scale, bias, row_scale and col_scale."""
    from fastcon.targets import two_pass_prefix_target
    from fastcon.targets.wire import from_wire

    with backend_context(a.device.type):
        impl, x, y, s, c, chunk_rows, prefix = _prefix_inputs(a, b, scale, bias, row_scale, col_scale, dims, backend,
                                                              chunk_size, mm_dtype)
        target = from_wire(rows, cols, mask, teacher, numbers)
        loss, *grads = two_pass_prefix_target(impl.target_prefix_stats, impl.target_prefix_grad, x, y, s, c,
                                              target, label_smoothing, symmetric, chunk_rows, need_grad, prefix,
                                              weights)
        if not need_grad:
            return (loss.double(),) + _no_grads(a)
        return (loss.double(),) + final_grads((a, b, scale, bias, row_scale, col_scale), grads, 1.0)


def _target_prefix_loss_fake(a, b, scale, bias, row_scale, col_scale, rows, cols, mask, teacher, numbers, dims,
                             weights, backend, label_smoothing, symmetric, chunk_size, need_grad, mm_dtype):
    loss = a.new_empty((), dtype=torch.float64)
    if not need_grad:
        return (loss,) + _no_grads(a)
    return (loss,) + grad_likes(a, b, scale, bias) + _scale_likes(row_scale, col_scale)


target_prefix_loss = EngineOp("target_prefix_loss", _target_prefix_loss, _target_prefix_loss_fake,
                              setup_context=save_output_grads, backward=saved_grads_backward)


@assume_constant
def has_prefix_passes(backend: str, device_type: str, dtype: torch.dtype, operation: str) -> bool:
    """Whether the backend that ``backend=`` resolves to for tensors of ``device_type`` and ``dtype``
    has the prefix ``operation`` (else a Matryoshka loss runs one engine call per prefix). A constant to
    ``torch.compile``."""
    from fastcon.kernels import contract

    name = resolve_name(backend, torch.device(device_type), dtype)
    return operation not in contract.missing_operations(name)


def target_prefix_engine_loss(a, b, scale, bias, row_scale, col_scale, target, dims, weights, *,
                              label_smoothing: float = 0.0, symmetric: bool = True, backend: str = "auto",
                              chunk_size: Optional[int] = None) -> torch.Tensor:
    """``Σ_k w_k·L_k`` of a general target over the prefixes ``dims`` (d_1 > d_2 > …, within D) in one
    engine pass over D; prefix k's logits are ``s·row_scale[i, k]·(A_i[:d_k]·B_j[:d_k])·col_scale[j, k]
    + b`` (the scales: 1/‖prefix‖ for cosine prefixes, with autograd through them). Arguments already
    validated. Returns the loss in ``loss_dtype(a)``."""
    from fastcon.targets.wire import wire_args

    out_dtype = loss_dtype(a)
    mm_dtype = autocast_gemm_dtype(a)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    loss, *_ = target_prefix_loss(a, b, scale, bias, row_scale, col_scale, *wire_args(target, a.shape[0], b.shape[0]),
                                  [int(d) for d in dims], [float(w) for w in weights], name, float(label_smoothing),
                                  bool(symmetric), int(chunk_size or 0),
                                  needs_grad(a, b, scale, bias, row_scale, col_scale), mm_dtype)
    return loss.to(acc_dtype(a.dtype)).to(out_dtype)


def _sigmoid_prefix_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, row_scale: Tensor, col_scale: Tensor,
                         dims: List[int], weights: List[float], backend: str, pos_offset: int, chunk_size: int,
                         need_grad: bool, mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                    Tensor, Tensor, Tensor]:
    """``(1/Na)·Σ_k w_k·Σ_ij softplus(−z_ij·S_k,ij)`` (SigLIP at every prefix, ``sigmoid_loss``'s terms)
    in the accumulation dtype, and the gradients of a, b, scale, bias, row_scale and col_scale."""
    with autocast_off(a.device.type):
        impl, x, y, s, c, chunk_rows, prefix = _prefix_inputs(a, b, scale, bias, row_scale, col_scale, dims, backend,
                                                              chunk_size, mm_dtype)
        na = x.shape[0]
        loss_sum, *grads = impl.sigmoid_prefix_fused(x, y, s, c, pos_offset, 1.0 / na, weights, chunk_rows,
                                                     need_grad, prefix)
        loss = loss_sum / na
        if not need_grad:
            return (loss,) + _no_grads(a)
        return (loss,) + final_grads((a, b, scale, bias, row_scale, col_scale), grads, 1.0)


def _sigmoid_prefix_loss_fake(a, b, scale, bias, row_scale, col_scale, dims, weights, backend, pos_offset,
                              chunk_size, need_grad, mm_dtype):
    loss = a.new_empty((), dtype=acc_dtype(a.dtype))
    if not need_grad:
        return (loss,) + _no_grads(a)
    return (loss,) + grad_likes(a, b, scale, bias) + _scale_likes(row_scale, col_scale)


sigmoid_prefix_loss = EngineOp("sigmoid_prefix_loss", _sigmoid_prefix_loss, _sigmoid_prefix_loss_fake,
                               setup_context=save_output_grads, backward=saved_grads_backward)


def siglip_prefix_engine_loss(a, b, scale, bias, row_scale, col_scale, dims, weights, *, pos_offset: Optional[int],
                              backend: str = "auto", chunk_size: Optional[int] = None) -> torch.Tensor:
    """SigLIP (docs/losses.md §1.2) summed over the prefixes ``dims`` with ``weights`` in one engine pass
    over D, prefix k's logits ``s·row_scale[i, k]·(A_i[:d_k]·B_j[:d_k])·col_scale[j, k] + b``;
    ``pos_offset=None`` means negatives only. Arguments already validated."""
    mm_dtype = autocast_gemm_dtype(a)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    offset = b.shape[0] if pos_offset is None else pos_offset
    out_dtype = loss_dtype(a)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    loss = sigmoid_prefix_loss(a, b, scale, bias, row_scale, col_scale, [int(d) for d in dims],
                               [float(w) for w in weights], name, int(offset), int(chunk_size or 0),
                               needs_grad(a, b, scale, bias, row_scale, col_scale), mm_dtype)[0]
    return loss.to(out_dtype)


def prefix_target_loss(a, b, scale, bias, target, dims, weights, *, normalize: bool = True, **kw) -> torch.Tensor:
    """``target_prefix_engine_loss`` over the prefixes of ``a`` and ``b`` themselves: their prefix norms
    as the scales (``prefix_scales``; ones with ``normalize=False``, for raw prefixes)."""
    return target_prefix_engine_loss(a, b, scale, bias, prefix_scales(a, dims, normalize),
                                     prefix_scales(b, dims, normalize), target, dims, weights, **kw)
