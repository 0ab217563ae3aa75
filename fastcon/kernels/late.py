"""Late interaction of token sets, the token-level engine family (docs/losses.md §3.1 and §3.4), as
readable PyTorch: the executable spec that the C++ (``csrc/cpu/late.cpp``) and Triton
(``fastcon/kernels/triton/late.py``) kernels follow.

For items i of ``x`` (Bx, nx, D) and j of ``y`` (By, ny, D), masks True for real tokens, the pair's tile
is ``t_kr = x_ik·y_jr`` and the two statistics are the sums of maxima

    sx[i, j] = Σ_{k real} max_{r real} t_kr        sy[i, j] = Σ_{r real} max_{k real} t_kr

(FILIP divides them by the token counts; MaxSim is sx with the queries as x). Padding is −inf before
every max, never zero; a NaN product among the real pairs makes the pair's statistics NaN. Each
function takes ``block`` items of x at a time: memory is two block × nx × By × ny tiles (the
gradient holds three). An item without any real token is rejected by the callers
(``fastcon.functional``); what the kernels give for one is not defined.

The gradient of a max goes to its first maximal index (``torch.argmax``: the lowest), so ties are
deterministic. With upstream gradients gx, gy (Bx, By), the pair's weight matrix is

    W_kr = gx_ij·[r = r*(k)] + gy_ij·[k = k*(r)]      (real k, r)

and ``dx_i += W·y_j``, ``dy_j += Wᵀ·x_i``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_NEG = float("-inf")


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _tile(x: Tensor, y: Tensor, xm: Tensor, ym: Tensor):
    """(c, nx, By, ny) tile with padding −inf: ``row`` masks y's padding (for maxima over r),
    ``col`` masks x's padding too (for maxima over k)."""
    a = torch.einsum("ikd,jrd->ikjr", x, y)
    row = a.masked_fill(~ym[None, None], _NEG)
    col = row.masked_fill(~xm[:, :, None, None], _NEG)
    return row, col


def late_stats(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, want_x: bool, want_y: bool,
               block: int) -> Tuple[Tensor, Tensor]:
    """(sx, sy), each (Bx, By) in the accumulation dtype, or (0, By) when not wanted."""
    x, y = _wide(x), _wide(y)
    bx, by = x.shape[0], y.shape[0]
    sx, sy = [], []
    for i0 in range(0, bx, block):
        xb, xm = x[i0:i0 + block], x_mask[i0:i0 + block]
        row, col = _tile(xb, y, xm, y_mask)
        if want_x:
            sx.append(torch.where(xm[:, :, None], row.amax(3), 0.0).sum(1))
        if want_y:
            sy.append(torch.where(y_mask[None], col.amax(1), 0.0).sum(2))
    return (torch.cat(sx) if sx else x.new_zeros((0, by))), (torch.cat(sy) if sy else x.new_zeros((0, by)))


def late_grad(x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, grad_x: Optional[Tensor],
              grad_y: Optional[Tensor], block: int) -> Tuple[Tensor, Tensor]:
    """(dx, dy) of ``Σ gx·sx + Σ gy·sy`` (``grad_x``/``grad_y`` None: that statistic is not used)."""
    x, y = _wide(x), _wide(y)
    dx, dy = torch.zeros_like(x), torch.zeros_like(y)
    for i0 in range(0, x.shape[0], block):
        xb, xm = x[i0:i0 + block], x_mask[i0:i0 + block]
        row, col = _tile(xb, y, xm, y_mask)
        w = torch.zeros_like(row)
        if grad_x is not None:  # each real k of each pair: its max over r
            g = torch.where(xm[:, :, None], grad_x[i0:i0 + block, None, :], 0.0)
            w.scatter_(3, row.argmax(3, keepdim=True), g[..., None].expand(-1, -1, -1, 1))
        if grad_y is not None:  # each real r: its max over k
            g = torch.where(y_mask[None], grad_y[i0:i0 + block, :, None], 0.0)
            w.scatter_add_(1, col.argmax(1, keepdim=True), g[:, None])
        dx[i0:i0 + block] = torch.einsum("ikjr,jrd->ikd", w, y)
        dy += torch.einsum("ikjr,ikd->jrd", w, xb)
    return dx, dy
