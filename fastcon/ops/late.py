"""The token-level engine family as ``torch.library`` custom ops: the sums of maxima of late
interaction (FILIP, MaxSim; ``fastcon/kernels/late.py`` states the contract), differentiable, on
every backend::

    fastcon::late_interaction(x, y, x_mask, y_mask, backend, want_x, want_y, block, mm_dtype) -> (sx, sy)
    fastcon::late_interaction_grad(x, y, x_mask, y_mask, grad_x, grad_y, backend, block, mm_dtype)
                                  -> (dx, dy)

The forward keeps nothing but its inputs; the backward forms each tile again and takes the argmaxes
(ties: the lowest index). Memory: one block of tiles on the torch and C++ backends, none on the
Triton backend (its tiles stay on chip; its backward keeps the block's argmaxes, O(c·By·(nx + ny))).
Any token counts run on every backend.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastcon.kernels._common import acc_dtype
from fastcon.ops import engine
from fastcon.ops.registry import EngineOp

@engine.assume_constant
def _traced_late_backend(backend: str, device_type: str, dtype: torch.dtype) -> str:
    name = engine.resolve_name(backend, torch.device(device_type), dtype)
    # one Triton family for token sets: triton and triton_fused name the same kernels
    return "triton" if name in engine.TRITON_BACKENDS else name


def resolve_late_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs late interaction for ``backend=``."""
    if backend == "reference":
        raise ValueError("backend='reference' is handled by fastcon.functional, not by the engine")
    return _traced_late_backend(backend, device.type, dtype)


def block_items(backend: str, device: torch.device, nx: int, by: int, ny: int, chunk_size: Optional[int]) -> int:
    """Items of x per block: ``chunk_size`` when given; else the torch and C++ backends fit one
    block's c·nx × By·ny fp32 tile in ``engine.chunk_bytes`` and the Triton backend the block's
    argmaxes, c·By·(nx + ny) int32."""
    if chunk_size:
        return int(chunk_size)
    budget = engine.chunk_bytes(device)
    per_item = 4 * by * ((nx + ny) if backend == "triton" else nx * ny)
    return max(1, budget // max(1, per_item))


def _late(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, backend: str, want_x: bool, want_y: bool,
          block: int, mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    with engine.backend_context(x.device.type):
        xx, yy = engine.engine_operands(x, y, backend, mm_dtype)
        sx, sy = engine.backend_module(backend).late_stats(xx, yy, x_mask.contiguous(), y_mask.contiguous(), want_x, want_y,
                                                  block)
        return sx.to(acc), sy.to(acc)


def _late_fake(x, y, x_mask, y_mask, backend, want_x, want_y, block, mm_dtype):
    acc = acc_dtype(x.dtype)
    by = y.shape[0]
    return (x.new_empty((x.shape[0] if want_x else 0, by), dtype=acc),
            x.new_empty((x.shape[0] if want_y else 0, by), dtype=acc))


def _late_grad(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, grad_x: Optional[Tensor],
               grad_y: Optional[Tensor], backend: str, block: int,
               mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    with engine.backend_context(x.device.type):
        xx, yy = engine.engine_operands(x, y, backend, mm_dtype)
        work = torch.float64 if xx.dtype == torch.float64 else torch.float32
        gx = None if grad_x is None else grad_x.to(work).contiguous()
        gy = None if grad_y is None else grad_y.to(work).contiguous()
        dx, dy = engine.backend_module(backend).late_grad(xx, yy, x_mask.contiguous(), y_mask.contiguous(), gx, gy, block)
        return dx.to(acc), dy.to(acc)


def _late_grad_fake(x, y, x_mask, y_mask, grad_x, grad_y, backend, block, mm_dtype):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape, dtype=acc), y.new_empty(y.shape, dtype=acc)


def _late_setup(ctx, inputs, output):
    x, y, x_mask, y_mask, backend, want_x, want_y, block, mm_dtype = inputs
    ctx.save_for_backward(x, y, x_mask, y_mask)
    ctx.other = (backend, block, mm_dtype)
    ctx.wants = (want_x, want_y)
    ctx.n_inputs = len(inputs)


def _late_backward(ctx, grad_sx, grad_sy):
    engine.forbid_double_backward()
    x, y, x_mask, y_mask = ctx.saved_tensors
    backend, block, mm_dtype = ctx.other
    grads = [g if (want and g is not None) else None for g, want in zip((grad_sx, grad_sy), ctx.wants)]
    if grads[0] is None and grads[1] is None:
        return engine.input_grads(ctx, ())
    dx, dy = late_interaction_grad(x, y, x_mask, y_mask, grads[0], grads[1], backend, block, mm_dtype)
    return engine.input_grads(ctx, (dx.to(x.dtype) if ctx.needs_input_grad[0] else None,
                                    dy.to(y.dtype) if ctx.needs_input_grad[1] else None))


late_interaction_grad = EngineOp("late_interaction_grad", _late_grad, _late_grad_fake)
late_interaction_op = EngineOp("late_interaction", _late, _late_fake, setup_context=_late_setup,
                               backward=_late_backward)


def late_interaction(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, *, want_x: bool = True,
                     want_y: bool = True, backend: str = "auto",
                     chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(sx, sy), each (Bx, By) in the accumulation dtype (fp32 for half inputs), of ``x`` (Bx, nx, D)
    against ``y`` (By, ny, D) with bool masks True for real tokens::

        sx[i, j] = Σ_{k real} max_{r real} x_ik·y_jr      sy[i, j] = Σ_{r real} max_{k real} x_ik·y_jr

    An unwanted statistic is a (0, By) tensor. Differentiable in x and y (the gradient of each max
    goes to its lowest maximal index); ``chunk_size``: items of x per block."""
    mm_dtype = engine.autocast_gemm_dtype(x)
    name = resolve_late_backend(backend, x.device, mm_dtype or x.dtype)
    block = block_items(name, x.device, x.shape[1], y.shape[0], y.shape[1], chunk_size)
    return late_interaction_op(x, y, x_mask, y_mask, name, bool(want_x), bool(want_y), int(block), mm_dtype)
