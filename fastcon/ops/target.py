"""The engine's general target (``fastcon/targets/``) as engine operators. Its executable
statement is the torch backend's; the C++ backend, the chunked Triton path and the fused Triton
tile kernels (D <= 256) have its two passes; its backend is chosen as for the other losses
(``engine.traced_backend_name``). Three operators, each with its second pass as an operator of its
own::

    fastcon::target_softmax_loss   the loss of a target and its gradients (gradient in forward)
    fastcon::target_pair_loss      a soft target's two losses from one pass (pass 2 in the backward:
                                   fastcon::target_pair_grad)
    fastcon::target_row_lse        each row's LSE over its kept pairs (pass 2 in the backward:
                                   fastcon::target_row_lse_grad)

The target travels in its wire format (``targets.wire``): its rows and cols, the optional dense
mask, the teacher's tensors as one list and its numbers as another.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastcon.kernels._common import acc_dtype, cache_bytes
from fastcon.ops.engine import (autocast_gemm_dtype, backend_context, backend_inputs, backend_module, engine_scalars,
                                final_grads, forbid_double_backward, grad_likes, input_grads, loss_dtype, needs_grad,
                                no_grads, save_output_grads, saved_grads_backward, traced_backend_name, wide_dtype)
from fastcon.ops.registry import EngineOp


def _target_softmax_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, rows: Tensor, cols: Tensor,
                         mask: Optional[Tensor], teacher: List[Optional[Tensor]], numbers: List[float], backend: str,
                         label_smoothing: float, symmetric: bool,
                         chunk_size: int, cache_limit: int, need_grad: bool,
                         mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The softmax loss of a general target (``fastcon.kernels.torch_chunked.target_softmax_fused``) in
    float64, and its gradients. The target comes in its wire format (``targets.wire``);
    ``cache_limit`` bounds the bytes of pass-1 logits kept for pass 2 (−1: ``cache_bytes()``)."""
    from fastcon.targets.wire import from_wire

    with backend_context(a.device.type):
        impl, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = from_wire(rows, cols, mask, teacher, numbers)
        limit = cache_bytes(x.device) if cache_limit < 0 else cache_limit
        loss, *grads = impl.target_softmax_fused(x, y, s, c, target, label_smoothing, symmetric, chunk_rows,
                                                 need_grad, limit)
        if not need_grad:
            return (loss,) + no_grads(a)
        return (loss,) + final_grads((a, b, scale, bias), grads, 1.0)


def _target_softmax_loss_fake(a, b, scale, bias, rows, cols, mask, teacher, numbers, backend,
                              label_smoothing, symmetric, chunk_size, cache_limit, need_grad, mm_dtype):
    loss = a.new_empty((), dtype=torch.float64)
    return (loss,) + (grad_likes(a, b, scale, bias) if need_grad else no_grads(a))



target_softmax_loss = EngineOp("target_softmax_loss", _target_softmax_loss, _target_softmax_loss_fake,
                               setup_context=save_output_grads, backward=saved_grads_backward)


def target_engine_loss(a, b, scale, bias, target, *, label_smoothing: float = 0.0, symmetric: bool = True,
                       backend: str = "auto", chunk_size: Optional[int] = None,
                       cache_limit: Optional[int] = None) -> torch.Tensor:
    """A general-target softmax loss on the engine (``target``: a ``fastcon.targets.Target``);
    arguments already validated. ``cache_limit``: bytes of pass-1 logits kept for pass 2 (None: the
    backend's default, ``FASTCON_CACHE_BYTES``). Returns the fp32 (float64 for float64 inputs) loss
    in ``loss_dtype(a)``."""
    from fastcon.targets.wire import wire_args

    out_dtype = loss_dtype(a)
    mm_dtype = autocast_gemm_dtype(a)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    loss, *_ = target_softmax_loss(a, b, scale, bias, *wire_args(target, a.shape[0], b.shape[0]), name,
                                   float(label_smoothing), bool(symmetric), int(chunk_size or 0),
                                   -1 if cache_limit is None else int(cache_limit), needs_grad(a, b, scale, bias),
                                   mm_dtype)
    return loss.to(acc_dtype(a.dtype)).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# A soft target's two losses from one pass: the contrastive loss of its hard targets and the soft
# cross-entropy against the teacher share the student's LSEs (open_clip's DistillClipLoss returns the
# two). Pass 1 runs in the forward; pass 2 runs in the backward, once, for the gradient of
# g_hard·L_hard + g_soft·L_soft (G = P − (g_hard·Q_hard + g_soft·Q_soft)/(g_hard + g_soft), times the
# sum), so the pair costs the GEMMs of one loss.

# an operator's inputs: a, b, scale, bias, then the target in the wire format (rows, cols, mask,
# teacher, numbers), then the rest
_WIRE_END = 9


def _wire_tensors(inputs):
    rows, cols, mask, teacher = inputs[4:8]
    return [rows, cols, mask, *teacher]


_PAIR_STATS = ("row_lse", "row_pos", "row_keep", "col_lse", "col_pos", "col_keep", "t_row_norm", "t_col_norm")


def target_passes(backend: str):
    """(target_stats, target_grad, teacher_stats) of a resolved backend: its two passes of the general
    target and its teacher's pass."""
    impl = backend_module(backend)
    return impl.target_stats, impl.target_grad, impl.teacher_stats


def _pair_targets(target):
    """(the hard part, the soft part) of a soft target: Q_hard = (1−ε)·[pos]/|P| + ε/|K|, Q_soft = Qt."""
    return target._replace(soft=0.0, hard=None, entropy=False), target._replace(hard=0.0, entropy=False)


def _target_pair_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, rows: Tensor, cols: Tensor,
                      mask: Optional[Tensor], teacher: List[Optional[Tensor]], numbers: List[float], backend: str,
                      label_smoothing: float, symmetric: bool,
                      chunk_size: int, mm_dtype: Optional[torch.dtype]) -> List[Tensor]:
    """[L_hard, L_soft (float64), then the statistics pass 2 needs (``_PAIR_STATS``)]: the teacher's
    pass and pass 1 of a soft target, both losses from the same LSEs."""
    from fastcon.targets import loss_and_weights, teacher_norms, teacher_stats
    from fastcon.targets.wire import from_wire

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = from_wire(rows, cols, mask, teacher, numbers)
        stats_fn, _, teacher_fn = target_passes(backend)
        teacher = teacher_norms(target, teacher_stats(teacher_fn, target, symmetric, chunk_rows), symmetric)
        st, _ = stats_fn(x, y, s, c, target, symmetric, bool(label_smoothing), chunk_rows, 0, teacher)
        hard, soft = _pair_targets(target)
        l_hard, _ = loss_and_weights(hard, st, label_smoothing, symmetric, s.dtype)
        l_soft, _ = loss_and_weights(soft, st, 0.0, symmetric, s.dtype)
        empty = a.new_empty((0,), dtype=torch.float64)
        out = [l_hard.double(), l_soft.double()]
        for f in _PAIR_STATS:
            v = getattr(st, f) if f != "t_col_norm" else teacher.col_norm
            out.append(empty if v is None or (f.startswith("col") and not symmetric) else v)
        return out


def _target_pair_loss_fake(a, b, scale, bias, rows, cols, mask, teacher, numbers, backend, label_smoothing,
                           symmetric, chunk_size, mm_dtype):
    na, nb = a.shape[0], b.shape[0]
    acc = acc_dtype(a.dtype)
    f64 = torch.float64
    cols = nb if symmetric else 0
    return [a.new_empty((), dtype=f64), a.new_empty((), dtype=f64),
            a.new_empty((na,), dtype=f64), a.new_empty((na,), dtype=acc), a.new_empty((na,), dtype=acc),
            a.new_empty((cols,), dtype=f64), a.new_empty((cols,), dtype=acc), a.new_empty((cols,), dtype=acc),
            a.new_empty((na,), dtype=f64), a.new_empty((cols,), dtype=f64)]


def _target_pair_grad(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, rows: Tensor, cols: Tensor,
                      mask: Optional[Tensor], teacher: List[Optional[Tensor]], numbers: List[float], backend: str,
                      label_smoothing: float, symmetric: bool,
                      chunk_size: int, mm_dtype: Optional[torch.dtype], stats: List[Tensor],
                      upstream: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 2 of ``_target_pair_loss`` for the upstream gradients ``upstream = (g_hard, g_soft)``: the
    (wide) gradients of g_hard·L_hard + g_soft·L_soft with respect to a, b, scale and bias."""
    from fastcon.targets import TargetStats, loss_and_weights
    from fastcon.targets.wire import from_wire

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = from_wire(rows, cols, mask, teacher, numbers)
        _, grad_fn, _ = target_passes(backend)
        st = dict(zip(_PAIR_STATS, stats))
        na, nb = x.shape[0], y.shape[0]
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=x.device)  # noqa: E731
        if not symmetric:
            st.update(col_lse=torch.full((nb,), float("-inf"), dtype=torch.float64, device=x.device),
                      col_pos=torch.zeros(nb, dtype=st["row_pos"].dtype, device=x.device),
                      col_keep=torch.zeros(nb, dtype=st["row_pos"].dtype, device=x.device), t_col_norm=None)
        full = TargetStats(row_sum_pos=zeros(na), row_sum_keep=zeros(na), col_sum_pos=zeros(nb), col_sum_keep=zeros(nb),
                           cross_row=zeros(na), cross_col=zeros(nb), **st)
        g_hard, g_soft = (float(v) for v in upstream.double().cpu())
        eps = label_smoothing
        hard, soft = _pair_targets(target)
        total = g_hard + g_soft
        if total != 0.0:  # one pass: P − Q of the mixed targets, times the sum
            u, v = g_hard / total, g_soft / total
            parts = [(total, target._replace(hard=u * (1.0 - eps), soft=v * target.soft, entropy=False), u * eps)]
        else:  # g_soft = −g_hard: no softmax term is left, the two parts apart
            parts = [(g_hard, hard, eps), (g_soft, soft, 0.0)]
        grads = None
        for factor, t, e in parts:
            _, weights = loss_and_weights(t, full, e, symmetric, s.dtype)
            g = grad_fn(x, y, s, c, t, weights, chunk_rows)
            g = [factor * v for v in g]
            grads = g if grads is None else [p + q for p, q in zip(grads, g)]
        return final_grads((a, b, scale, bias), grads, 1.0)


def _target_pair_grad_fake(a, b, scale, bias, rows, cols, mask, teacher, numbers, backend, label_smoothing,
                           symmetric, chunk_size, mm_dtype, stats, upstream):
    return grad_likes(a, b, scale, bias)


def _save_wire(ctx, inputs, kept):
    """Save a, b, scale, bias, ``kept`` and the target's tensors of an operator's ``inputs``."""
    wire = _wire_tensors(inputs)
    ctx.save_for_backward(*inputs[:4], *kept, *[t for t in wire if t is not None])
    ctx.present = [t is not None for t in wire]
    ctx.numbers = inputs[_WIRE_END - 1]
    ctx.other = inputs[_WIRE_END:]
    ctx.n_inputs = len(inputs)
    ctx.n_kept = len(kept)
    ctx.teacher = [t is not None for t in inputs[7]]


def _wire_grads(ctx, features, wide):
    """The (wide) gradients ``wide`` of a, b, scale and bias (``features``) in their inputs' dtypes where
    they need one, and None for every other input (a list of them for a teacher's list holding
    tensors, as the traced backward matches the inputs' structure)."""
    grads = [w.to(x.dtype) if ctx.needs_input_grad[k] else None for k, (x, w) in enumerate(zip(features, wide))]
    out = list(input_grads(ctx, grads))
    if any(ctx.teacher):
        out[7] = [None] * len(ctx.teacher)
    return tuple(out)


def _saved_wire(ctx):
    """(a, b, scale, bias), the kept outputs and the target's inputs (rows, cols, mask, teacher, numbers)."""
    saved = ctx.saved_tensors
    rest = iter(saved[4 + ctx.n_kept:])
    rows, cols, mask, *teacher = [next(rest) if p else None for p in ctx.present]
    return saved[:4], list(saved[4:4 + ctx.n_kept]), (rows, cols, mask, teacher, ctx.numbers)


def _pair_setup(ctx, inputs, output):
    _save_wire(ctx, inputs, output[2:])


def _pair_backward(ctx, grads_out):
    forbid_double_backward()
    (a, b, scale, bias), stats, wire = _saved_wire(ctx)
    g = [torch.zeros((), dtype=torch.float64, device=a.device) if t is None else t.reshape(()) for t in grads_out[:2]]
    upstream = torch.stack([t.to(device=a.device, dtype=torch.float64) for t in g])
    wide = target_pair_grad(a, b, scale, bias, *wire, *ctx.other, stats, upstream)
    return _wire_grads(ctx, (a, b, scale, bias), wide)


target_pair_grad = EngineOp("target_pair_grad", _target_pair_grad, _target_pair_grad_fake)
target_pair_loss = EngineOp("target_pair_loss", _target_pair_loss, _target_pair_loss_fake, setup_context=_pair_setup,
                            backward=_pair_backward)


def target_pair_engine_loss(a, b, scale, bias, target, *, label_smoothing: float = 0.0, symmetric: bool = True,
                            backend: str = "auto", chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(L_hard, L_soft) of a soft ``target`` (a ``fastcon.targets.Target`` with a teacher,
    no margin, no entropy term) from one engine pass: the contrastive loss of its hard positives (with
    ``label_smoothing``) and the soft cross-entropy against the teacher, each with its own gradient
    (pass 2 in the backward, once for both). Returns the two losses in ``loss_dtype(a)``."""
    from fastcon.targets.wire import wire_args

    if target.margin is not None or target.entropy or not target.soft:
        raise ValueError("target_pair_engine_loss takes a soft target without margin or entropy term")
    out_dtype = loss_dtype(a)
    mm_dtype = autocast_gemm_dtype(a)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    out = target_pair_loss(a, b, scale, bias, *wire_args(target, a.shape[0], b.shape[0]), name,
                           float(label_smoothing), bool(symmetric), int(chunk_size or 0),
                           mm_dtype)
    return tuple(v.to(acc_dtype(a.dtype)).to(out_dtype) for v in out[:2])


# ---------------------------------------------------------------------------------------------------
# Each row's LSE over its kept pairs, differentiable: for losses whose rows meet logits from outside
# the tiles (a positive given apart, synthetic negatives), combined with them in O(N) autograd. Pass 1
# in the forward; pass 2 in the backward with the upstream gradient u_i of each row's LSE as the row's
# target mass: G_ij = u_i·exp(S_ij − LSE_i) on the kept pairs.

def _lse_target(target):
    return target._replace(soft=0.0, hard=0.0, entropy=False, teacher=None, debias=0.0)


def _target_row_lse(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, rows: Tensor, cols: Tensor,
                    mask: Optional[Tensor], teacher: List[Optional[Tensor]], numbers: List[float], backend: str,
                    chunk_size: int,
                    mm_dtype: Optional[torch.dtype]) -> Tensor:
    """(Na,) float64: the LSE of each row of ``s·A·Bᵀ + b`` over the target's kept pairs (−inf where
    none is kept)."""
    from fastcon.targets.wire import from_wire

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = _lse_target(from_wire(rows, cols, mask, teacher, numbers))
        stats_fn, _, _ = target_passes(backend)
        st, _ = stats_fn(x, y, s, c, target, False, False, chunk_rows, 0)
        return st.row_lse.clone()


def _target_row_lse_fake(a, b, scale, bias, rows, cols, mask, teacher, numbers, backend, chunk_size, mm_dtype):
    return a.new_empty((a.shape[0],), dtype=torch.float64)


def _target_row_lse_grad(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, rows: Tensor, cols: Tensor,
                         mask: Optional[Tensor], teacher: List[Optional[Tensor]], numbers: List[float], backend: str,
                         chunk_size: int,
                         mm_dtype: Optional[torch.dtype], row_lse: Tensor,
                         upstream: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (wide) gradients of Σ_i u_i·LSE_i (``upstream`` = u) with respect to a, b, scale and bias."""
    from fastcon.targets import TargetWeights
    from fastcon.targets.wire import from_wire

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = _lse_target(from_wire(rows, cols, mask, teacher, numbers))
        _, grad_fn, _ = target_passes(backend)
        u = upstream.to(torch.float64)
        peak = float(u.abs().max()) if u.numel() else 0.0
        if peak == 0.0 or not peak < float("inf"):
            # a NaN or infinite upstream gradient (a NaN loss, e.g. from NaN features): NaN gradients,
            # as the materialised formula gives, rather than an error about an internal quantity
            fill = 0.0 if peak == 0.0 else float("nan")
            return tuple(torch.full_like(t, fill, dtype=wide_dtype(t.dtype)) for t in (a, b, scale, bias))
        acc = s.dtype
        zeros = torch.zeros(x.shape[0], dtype=acc, device=x.device)
        # |mass| <= 1 (the bound the Triton path's fp16 lift assumes); the peak is the row weight
        weights = TargetWeights(row_lse, zeros, zeros, peak, row_mass=(u / peak).to(acc))
        grads = grad_fn(x, y, s, c, target, weights, chunk_rows)
        return final_grads((a, b, scale, bias), grads, 1.0)


def _target_row_lse_grad_fake(a, b, scale, bias, rows, cols, mask, teacher, numbers, backend, chunk_size,
                              mm_dtype, row_lse, upstream):
    return grad_likes(a, b, scale, bias)


def _row_lse_setup(ctx, inputs, output):
    _save_wire(ctx, inputs, [output])


def _row_lse_backward(ctx, grad):
    forbid_double_backward()
    (a, b, scale, bias), (row_lse,), wire = _saved_wire(ctx)
    wide = target_row_lse_grad(a, b, scale, bias, *wire, *ctx.other, row_lse, grad.to(torch.float64))
    return _wire_grads(ctx, (a, b, scale, bias), wide)


target_row_lse_grad = EngineOp("target_row_lse_grad", _target_row_lse_grad, _target_row_lse_grad_fake)
target_row_lse_op = EngineOp("target_row_lse", _target_row_lse, _target_row_lse_fake, setup_context=_row_lse_setup,
                             backward=_row_lse_backward)


def target_row_lse(a, b, scale, bias, target, *, backend: str = "auto", chunk_size: Optional[int] = None) -> Tensor:
    """(Na,) float64: each row's LSE of ``S = s·A·Bᵀ + b`` over the kept pairs of ``target`` (its
    positives and soft fields are not used), with the gradient of any weighting of the rows (pass 2 in
    the backward). float64, so that a caller who subtracts a logit of its own (LSE − S_pos cancels to
    a small loss) keeps the precision of the engine's float64 LSE. Memory O((Na + Nb)·D + chunk·Nb)."""
    from fastcon.targets.wire import wire_args

    mm_dtype = autocast_gemm_dtype(a)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    target = _lse_target(target)
    return target_row_lse_op(a, b, scale, bias, *wire_args(target, a.shape[0], b.shape[0]), name,
                             int(chunk_size or 0), mm_dtype)
