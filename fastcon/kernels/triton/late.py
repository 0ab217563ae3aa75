"""Triton kernels of the token-level family (late interaction: FILIP, MaxSim), the contract of
``fastcon/kernels/late.py``.

One program per pair (i, j) keeps the whole of the shorter token set (``BLOCK_Y``, a power of two up
to ``MAX_SHORT_SIDE``) on chip and walks the other in ``BLOCK_X`` tiles: each tile of dot products
``t = x_i[k-tile]·y_jᵀ`` comes from ``tl.dot`` over D in ``BLOCK_D`` slices and never leaves the
registers. Its row maxima are complete at once (every y token is in the tile); the column maxima run
over the x tiles. The wrappers orient each call so that the padded tile area is smallest (the
statistics of a swapped call are the transposes of the other direction's).

* ``_late_tiles_kernel`` (``ARGS=False``): the sums of maxima sx, sy of every pair.
* ``_late_tiles_kernel`` (``ARGS=True``), the backward's first pass: the same tiles again, each row's
  argmax r* and each column's argmax k* (ties: the lowest index; the running column maximum moves only
  on a strict increase) for a block of x items, O(c·By·(nx + ny)) int32.
* ``_late_rows_kernel``, where neither set fits (both longer than ``MAX_SHORT_SIDE``): one direction
  with y walked in tiles too (the running row maxima and argmaxes), the other direction the same
  kernel on the swapped pair.
* ``_late_grad_kernel``: dx_i[k-tile] = Σ_j W_ij·y_j with the pair's one-hot weights
  ``W_kr = gx_ij·[r = r*(k)] + gy_ij·[k = k*(r)]``, formed in registers from the argmaxes for
  ``BLOCK_R`` y tokens at a time, the products on the tensor cores. Each program owns its rows and
  takes j in order (deterministic). ``FOR_Y``: dy_j[r-tile] += Σ_i W_ijᵀ·x_i over the block's items,
  one program per y item and tile of its tokens.

The weights are cast to the features' dtype for the products (bf16: a relative rounding of at most
2⁻⁸ per weight; fp16 weights are first lifted by a power of two, undone on the fp32 result, so that
they stay normal numbers). A NaN product among a pair's real entries makes its statistics NaN. Program
and pair indices are int64 in the address arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .configs import FUSED_FP32_PRECISION, LATE_CONFIGS, Config, dtype_class

MAX_SHORT_SIDE = 256


def late_config(kernel: str, dtype_name: str, block_y: int = 0) -> Config:
    """Launch configuration of a late-interaction kernel. ``tiles`` (the statistics and argmaxes):
    ``block_m`` = BLOCK_X, ``block_n`` = BLOCK_Y (the on-chip token set padded to ``block_y``),
    ``block_k`` = BLOCK_D. ``dx``/``dy`` (the gradient products, independent of ``block_y``):
    ``block_m`` = BLOCK_X, ``block_n`` = BLOCK_R (the y tokens per product), ``block_k`` = BLOCK_D.
    fp32 runs as TF32x3 (three products per ``tl.dot``), so its tiles are smaller."""
    cls = dtype_class(dtype_name)
    release = LATE_CONFIGS.get((kernel, cls, block_y))
    if release is not None:  # the installed Triton release's own (configs.RELEASE_TABLES)
        return release
    half = cls == "half"
    block_d = 64 if half else 32
    if kernel == "rows":  # both token sets longer than MAX_SHORT_SIDE: y walked in tiles too
        return Config(block_m=64 if half else 16, block_n=64, num_warps=4, num_stages=1, block_k=block_d)
    if kernel == "tiles":
        block_x = (64 if block_y <= 128 else 32) if half else 32
        warps = 8 if block_x * block_y >= 4096 else 4
        return Config(block_m=block_x, block_n=block_y, num_warps=warps, num_stages=2 if half else 1,
                      block_k=block_d)
    block = 64 if half else 32
    return Config(block_m=block, block_n=block, num_warps=4, num_stages=2 if half else 1, block_k=block_d)


def _block_y(n: int) -> int:
    return max(16, triton.next_power_of_2(max(1, n)))


@triton.jit
def _token_tile(ptr, item, stride_b, offs_t, N, stride_n, offs_d, D):
    """(len(offs_t), len(offs_d)) features of tokens ``offs_t`` of item ``item`` (unit stride over
    D), 0 beyond N tokens or D."""
    return tl.load(ptr + item * stride_b + offs_t[:, None] * stride_n + offs_d[None, :],
                   mask=(offs_t[:, None] < N) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _real_tokens(mask_ptr, item, offs_t, N):
    """The token mask of item ``item`` at ``offs_t`` as booleans, False beyond N tokens."""
    return (tl.load(mask_ptr + item * N + offs_t, mask=offs_t < N, other=0) != 0) & (offs_t < N)


@triton.jit
def _pair_tile(x_ptr, y_ptr, i, j, kx, offs_y, ym, NX, NY, D, stride_xb, stride_xn, stride_yb, stride_yn,
               INPUT_PRECISION: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """(BLOCK_X, BLOCK_Y) fp32 dot products of x_i's tokens ``kx`` against y_j's tokens ``offs_y``,
    −inf in the columns of y tokens that are not real (``ym`` False)."""
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        xt = _token_tile(x_ptr, i, stride_xb, kx, NX, stride_xn, offs_d, D)
        yt = _token_tile(y_ptr, j, stride_yb, offs_y, NY, stride_yn, offs_d, D)
        acc = tl.dot(xt, tl.trans(yt), acc, input_precision=INPUT_PRECISION)
    return tl.where(ym[None, :], acc, float("-inf"))


@triton.jit
def _running_argmax(t, run_max, run_arg, offset, AXIS: tl.constexpr):
    """The running maximum and argmax along AXIS after tile t, whose index 0 is ``offset``: the tile's
    first maximum, taken only on a strict increase (a tie keeps the lowest index)."""
    b_max, b_arg = tl.max(t, axis=AXIS, return_indices=True, return_indices_tie_break_left=True)
    up = b_max > run_max
    return tl.where(up, b_max, run_max), tl.where(up, b_arg.to(tl.int32) + offset, run_arg)


@triton.jit
def _late_tiles_kernel(x_ptr, y_ptr, xm_ptr, ym_ptr, sx_ptr, sy_ptr, rarg_ptr, carg_ptr, i0, By, NX, NY, D,
                       stride_xb, stride_xn, stride_yb, stride_yn,
                       WANT_X: tl.constexpr, WANT_Y: tl.constexpr, ARGS: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)  # the block's pair (i0 + p // By, p % By)
    i = i0 + p // By
    j = p % By
    offs_y = tl.arange(0, BLOCK_Y)
    ym = _real_tokens(ym_ptr, j, offs_y, NY)
    col_max = tl.full((BLOCK_Y,), float("-inf"), dtype=tl.float32)
    col_arg = tl.full((BLOCK_Y,), -1, dtype=tl.int32)
    sx = tl.zeros((), dtype=tl.float32)
    bad = tl.zeros((), dtype=tl.int32)  # NaN products among the real pairs
    for k0 in range(0, NX, BLOCK_X):
        kx = k0 + tl.arange(0, BLOCK_X)
        xm = _real_tokens(xm_ptr, i, kx, NX)
        t = _pair_tile(x_ptr, y_ptr, i, j, kx, offs_y, ym, NX, NY, D, stride_xb, stride_xn, stride_yb, stride_yn,
                       INPUT_PRECISION, BLOCK_X, BLOCK_Y, BLOCK_D)
        tc = tl.where(xm[:, None], t, float("-inf"))
        if not ARGS:
            bad += tl.sum(tl.where(tc != tc, 1, 0))
        if ARGS:
            if WANT_X:
                _, r_star = tl.max(t, axis=1, return_indices=True, return_indices_tie_break_left=True)
                tl.store(rarg_ptr + p * NX + kx, tl.where(xm, r_star.to(tl.int32), -1), mask=kx < NX)
            if WANT_Y:
                col_max, col_arg = _running_argmax(tc, col_max, col_arg, k0, 0)
        else:
            if WANT_X:
                sx += tl.sum(tl.where(xm, tl.max(t, axis=1), 0.0), axis=0)
            if WANT_Y:
                col_max = tl.maximum(col_max, tl.max(tc, axis=0))
    if ARGS:
        if WANT_Y:
            tl.store(carg_ptr + p * NY + offs_y, col_arg, mask=offs_y < NY)
    else:
        nan = tl.where(bad > 0, float("nan"), 0.0)
        if WANT_X:
            tl.store(sx_ptr + i * By + j, sx + nan)
        if WANT_Y:
            tl.store(sy_ptr + i * By + j, tl.sum(tl.where(ym, col_max, 0.0), axis=0) + nan)


@triton.jit
def _late_rows_kernel(x_ptr, y_ptr, xm_ptr, ym_ptr, sx_ptr, rarg_ptr, i0, By, NX, NY, D,
                      stride_xb, stride_xn, stride_yb, stride_yn,
                      ARGS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_X: tl.constexpr,
                      BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr):
    """The x statistic alone (``ARGS``: its argmaxes r*) for token sets of any length: each x tile's
    row maxima run over y's tiles (a strict increase moves the argmax, so a tie keeps the lowest r).
    The y statistic is this kernel on the swapped pair."""
    p = tl.program_id(0).to(tl.int64)  # the block's pair (i0 + p // By, p % By)
    i = i0 + p // By
    j = p % By
    sx = tl.zeros((), dtype=tl.float32)
    bad = tl.zeros((), dtype=tl.int32)
    for k0 in range(0, NX, BLOCK_X):
        kx = k0 + tl.arange(0, BLOCK_X)
        xm = _real_tokens(xm_ptr, i, kx, NX)
        row_max = tl.full((BLOCK_X,), float("-inf"), dtype=tl.float32)
        row_arg = tl.full((BLOCK_X,), -1, dtype=tl.int32)
        for r0 in range(0, NY, BLOCK_Y):
            offs_r = r0 + tl.arange(0, BLOCK_Y)
            ym = _real_tokens(ym_ptr, j, offs_r, NY)
            t = _pair_tile(x_ptr, y_ptr, i, j, kx, offs_r, ym, NX, NY, D, stride_xb, stride_xn, stride_yb,
                           stride_yn, INPUT_PRECISION, BLOCK_X, BLOCK_Y, BLOCK_D)
            if ARGS:
                row_max, row_arg = _running_argmax(t, row_max, row_arg, r0, 1)
            else:
                tc = tl.where(xm[:, None], t, float("-inf"))
                bad += tl.sum(tl.where(tc != tc, 1, 0))
                row_max = tl.maximum(row_max, tl.max(t, axis=1))
        if ARGS:
            tl.store(rarg_ptr + p * NX + kx, tl.where(xm, row_arg, -1), mask=kx < NX)
        else:
            sx += tl.sum(tl.where(xm, row_max, 0.0), axis=0)
    if not ARGS:
        tl.store(sx_ptr + i * By + j, sx + tl.where(bad > 0, float("nan"), 0.0))


@triton.jit
def _pair_weights(rarg_ptr, carg_ptr, gx_ptr, gy_ptr, p, pair, kx, offs_r, NX, NY,
                  HAS_GX: tl.constexpr, HAS_GY: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr):
    """(BLOCK_X, BLOCK_R) fp32 weights W_kr of x tokens ``kx`` and y tokens ``offs_r`` of the block's
    pair ``p`` (global pair index ``pair``)."""
    w = tl.zeros((BLOCK_X, BLOCK_R), dtype=tl.float32)
    if HAS_GX:
        g1 = tl.load(gx_ptr + pair)
        ra = tl.load(rarg_ptr + p * NX + kx, mask=kx < NX, other=-1)
        w += tl.where(ra[:, None] == offs_r[None, :], g1, 0.0)
    if HAS_GY:
        g2 = tl.load(gy_ptr + pair)
        ca = tl.load(carg_ptr + p * NY + offs_r, mask=offs_r < NY, other=-1)
        w += tl.where(ca[None, :] == kx[:, None], g2, 0.0)
    return w


@triton.jit
def _weighted_tokens(acc, src_ptr, stride_sb, stride_sn, rarg_ptr, carg_ptr, gx_ptr, gy_ptr, li, i, j, By, kx, offs_r,
                     NX, NY, offs_d, D, HAS_GX: tl.constexpr, HAS_GY: tl.constexpr, FOR_Y: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr):
    """One step of a gradient product of the pair (i, j) (``li`` = i's place in the block), on the
    tensor cores in the features' dtype: acc + W_ij[kx, offs_r]·y_j[offs_r, offs_d] (src = y), or with
    FOR_Y acc + W_ij[kx, offs_r]ᵀ·x_i[kx, offs_d] (src = x)."""
    w = _pair_weights(rarg_ptr, carg_ptr, gx_ptr, gy_ptr, li * By + j, i * By + j, kx, offs_r, NX, NY,
                      HAS_GX, HAS_GY, BLOCK_X, BLOCK_R)
    if FOR_Y:
        xt = _token_tile(src_ptr, i, stride_sb, kx, NX, stride_sn, offs_d, D)
        acc = tl.dot(tl.trans(w).to(xt.dtype), xt, acc, input_precision=INPUT_PRECISION)
    else:
        yt = _token_tile(src_ptr, j, stride_sb, offs_r, NY, stride_sn, offs_d, D)
        acc = tl.dot(w.to(yt.dtype), yt, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _late_grad_kernel(src_ptr, rarg_ptr, carg_ptr, gx_ptr, gy_ptr, out_ptr, i0, C, By, NX, NY, D,
                      stride_sb, stride_sn, stride_ob, stride_on,
                      HAS_GX: tl.constexpr, HAS_GY: tl.constexpr, FOR_Y: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      BLOCK_X: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradient products of the block's C x items (i = i0 + li), one program per (own item, tile
    of its tokens, D tile), the other side's items taken in order (deterministic):
    dx_i[k-tile, d-tile] = Σ_j Σ_{r-tiles} W_ij[k, r]·y_j[r, d-tile] (src = y, out = dx), or FOR_Y
    dy_j[r-tile, d-tile] += Σ_{i in the block} Σ_{k-tiles} W_ij[k, r-tile]ᵀ·x_i[k, d-tile] (src = x,
    out = dy)."""
    own = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    if FOR_Y:
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for li in range(0, C):
            for k0 in range(0, NX, BLOCK_X):
                acc = _weighted_tokens(acc, src_ptr, stride_sb, stride_sn, rarg_ptr, carg_ptr, gx_ptr, gy_ptr, li,
                                       i0 + li, own, By, k0 + tl.arange(0, BLOCK_X), offs_r, NX, NY, offs_d, D,
                                       HAS_GX, HAS_GY, True, INPUT_PRECISION, BLOCK_X, BLOCK_R)
        ptrs = out_ptr + own * stride_ob + offs_r[:, None] * stride_on + offs_d[None, :]
        mask = (offs_r[:, None] < NY) & (offs_d[None, :] < D)
        acc += tl.load(ptrs, mask=mask, other=0.0)
    else:
        i = i0 + own
        kx = tl.program_id(1) * BLOCK_X + tl.arange(0, BLOCK_X)
        acc = tl.zeros((BLOCK_X, BLOCK_D), dtype=tl.float32)
        for j in range(0, By):
            for r0 in range(0, NY, BLOCK_R):
                acc = _weighted_tokens(acc, src_ptr, stride_sb, stride_sn, rarg_ptr, carg_ptr, gx_ptr, gy_ptr, own,
                                       i, j, By, kx, r0 + tl.arange(0, BLOCK_R), NX, NY, offs_d, D, HAS_GX, HAS_GY,
                                       False, INPUT_PRECISION, BLOCK_X, BLOCK_R)
        ptrs = out_ptr + i * stride_ob + kx[:, None] * stride_on + offs_d[None, :]
        mask = (kx[:, None] < NX) & (offs_d[None, :] < D)
    tl.store(ptrs, acc, mask=mask)


# ------------------------------------------------------------------------------------ launchers
def _dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).replace("torch.", "")


def _precision(x: torch.Tensor) -> str:
    return FUSED_FP32_PRECISION if x.dtype == torch.float32 else "ieee"


def _padded_area(nx: int, ny: int, dtype_name: str) -> int:
    by = _block_y(ny)
    bx = late_config("tiles", dtype_name, by).block_m
    return by * (-(-nx // bx) * bx)


def _swap(nx: int, ny: int, dtype_name: str) -> bool:
    """Whether x should take the on-chip role: it fits and its padded tile area is smaller."""
    if _block_y(nx) > MAX_SHORT_SIDE:
        return False
    if _block_y(ny) > MAX_SHORT_SIDE:
        return True
    return _padded_area(ny, nx, dtype_name) < _padded_area(nx, ny, dtype_name)


def _check(x, y):
    dtype_class(_dtype_name(x))  # a clear TypeError for float64


def _long(x, y) -> bool:
    """Neither token set fits on chip: the one-direction kernel on each orientation."""
    return min(x.shape[1], y.shape[1]) > MAX_SHORT_SIDE


def _rows(x, y, xm, ym, i0, c, out, args):
    """``_late_rows_kernel`` over x items [i0, i0 + c) against every y item: into ``out`` (sx, (Bx, By),
    or the block's argmaxes r*, (c·By·nx))."""
    cfg = late_config("rows", _dtype_name(x))
    launch(_late_rows_kernel)[(c * y.shape[0],)](
        x, y, xm, ym, out, out, i0, y.shape[0], x.shape[1], y.shape[1], x.shape[2], x.stride(0), x.stride(1),
        y.stride(0), y.stride(1), ARGS=args, INPUT_PRECISION=_precision(x), BLOCK_X=cfg.block_m,
        BLOCK_Y=cfg.block_n, BLOCK_D=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _stats(x, y, xm, ym, want_x, want_y):
    bx, nx, d = x.shape
    by, ny = y.shape[0], y.shape[1]
    sx = torch.empty((bx if want_x else 0, by), dtype=torch.float32, device=x.device)
    sy = torch.empty((bx if want_y else 0, by), dtype=torch.float32, device=x.device)
    if bx == 0 or by == 0 or not (want_x or want_y):
        return sx, sy
    if _long(x, y):
        if want_x:
            _rows(x, y, xm, ym, 0, bx, sx, False)
        if want_y:
            sy_t = torch.empty((by, bx), dtype=torch.float32, device=x.device)
            _rows(y, x, ym, xm, 0, by, sy_t, False)
            sy.copy_(sy_t.T)
        return sx, sy
    cfg = late_config("tiles", _dtype_name(x), _block_y(ny))
    launch(_late_tiles_kernel)[(bx * by,)](
        x, y, xm, ym, sx, sy, sx, sx, 0, by, nx, ny, d, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        WANT_X=bool(want_x), WANT_Y=bool(want_y), ARGS=False, INPUT_PRECISION=_precision(x),
        BLOCK_X=cfg.block_m, BLOCK_Y=cfg.block_n, BLOCK_D=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return sx, sy


def _grad(x, y, xm, ym, gx, gy, block):
    bx, nx, d = x.shape
    by, ny = y.shape[0], y.shape[1]
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dy = torch.zeros(y.shape, dtype=torch.float32, device=x.device)
    if bx == 0 or by == 0 or (gx is None and gy is None):
        return dx, dy
    name, prec = _dtype_name(x), _precision(x)
    tiles = late_config("tiles", name, min(_block_y(ny), MAX_SHORT_SIDE))
    cdx, cdy = late_config("dx", name), late_config("dy", name)
    has_gx, has_gy = gx is not None, gy is not None
    gx_arg = gx if has_gx else dx
    gy_arg = gy if has_gy else dx
    for i0 in range(0, bx, block):
        c = min(block, bx - i0)
        rarg = torch.empty((c * by * nx if has_gx else 1,), dtype=torch.int32, device=x.device)
        carg = torch.empty((c * by * ny if has_gy else 1,), dtype=torch.int32, device=x.device)
        if _long(x, y):
            if has_gx:
                _rows(x, y, xm, ym, i0, c, rarg, True)
            if has_gy:  # k*(r) is the swapped pair's r*: y items against the block's x items, transposed
                swapped = torch.empty((by * c * ny,), dtype=torch.int32, device=x.device)
                _rows(y, x.narrow(0, i0, c), ym, xm.narrow(0, i0, c), 0, by, swapped, True)
                carg = swapped.view(by, c, ny).transpose(0, 1).reshape(-1)
        else:
            launch(_late_tiles_kernel)[(c * by,)](
                x, y, xm, ym, dx, dx, rarg, carg, i0, by, nx, ny, d, x.stride(0), x.stride(1), y.stride(0),
                y.stride(1), WANT_X=has_gx, WANT_Y=has_gy, ARGS=True, INPUT_PRECISION=prec, BLOCK_X=tiles.block_m,
                BLOCK_Y=tiles.block_n, BLOCK_D=tiles.block_k, num_warps=tiles.num_warps,
                num_stages=tiles.num_stages)
        for out, src, cfg, grid, for_y in ((dx, y, cdx, (c, triton.cdiv(nx, cdx.block_m)), False),
                                           (dy, x, cdy, (by, triton.cdiv(ny, cdy.block_n)), True)):
            launch(_late_grad_kernel)[grid + (triton.cdiv(d, cfg.block_k),)](
                src, rarg, carg, gx_arg, gy_arg, out, i0, c, by, nx, ny, d, src.stride(0), src.stride(1),
                out.stride(0), out.stride(1), HAS_GX=has_gx, HAS_GY=has_gy, FOR_Y=for_y, INPUT_PRECISION=prec,
                BLOCK_X=cfg.block_m, BLOCK_R=cfg.block_n, BLOCK_D=cfg.block_k, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
    return dx, dy


def _masks(xm, ym):
    return xm.contiguous().view(torch.uint8), ym.contiguous().view(torch.uint8)


def late_stats(x, y, x_mask, y_mask, want_x, want_y, block):
    """(sx, sy) fp32 (fastcon/kernels/late.py); ``block`` is unused (the forward keeps no buffer)."""
    _check(x, y)
    xm, ym = _masks(x_mask, y_mask)
    if _swap(x.shape[1], y.shape[1], _dtype_name(x)):
        sy_t, sx_t = _stats(y, x, ym, xm, want_y, want_x)
        unwanted = x.new_zeros((0, y.shape[0]), dtype=torch.float32)
        return (sx_t.T.contiguous() if want_x else unwanted), (sy_t.T.contiguous() if want_y else unwanted.clone())
    return _stats(x, y, xm, ym, want_x, want_y)


def _fp16_lift(grad_x, grad_y):
    """(gx, gy, factor) with fp16 weights lifted by a power of two so that max|g| lies in [2¹⁴, 2¹⁵]
    (far from fp16's subnormals and its overflow), and the factor that undoes it on the result; no
    host synchronisation."""
    peaks = [g.abs().amax() for g in (grad_x, grad_y) if g is not None and g.numel()]
    if not peaks:
        return grad_x, grad_y, None
    peak = torch.stack(peaks).amax().clamp_min(2.0 ** -100)
    lift = torch.exp2(torch.floor(14.0 - torch.log2(peak)).clamp(-100, 100))
    lift = torch.where(torch.isfinite(lift), lift, torch.ones_like(lift))
    return (None if grad_x is None else grad_x * lift), (None if grad_y is None else grad_y * lift), 1.0 / lift


def late_grad(x, y, x_mask, y_mask, grad_x, grad_y, block):
    """(dx, dy) fp32 (fastcon/kernels/late.py), ``block`` items of x at a time (their argmaxes)."""
    _check(x, y)
    if x.dtype == torch.float16:
        grad_x, grad_y, factor = _fp16_lift(grad_x, grad_y)
        if factor is not None:
            dx, dy = _late_grad_oriented(x, y, x_mask, y_mask, grad_x, grad_y, block)
            return dx * factor, dy * factor
    return _late_grad_oriented(x, y, x_mask, y_mask, grad_x, grad_y, block)


def _late_grad_oriented(x, y, x_mask, y_mask, grad_x, grad_y, block):
    xm, ym = _masks(x_mask, y_mask)
    if _swap(x.shape[1], y.shape[1], _dtype_name(x)):
        # the swapped call's items are y's: its block counts y items, sized for the same buffer
        blk = max(1, block * y.shape[0] // max(1, x.shape[0]))
        gy_t = None if grad_y is None else grad_y.T.contiguous().float()
        gx_t = None if grad_x is None else grad_x.T.contiguous().float()
        dy, dx = _grad(y, x, ym, xm, gy_t, gx_t, blk)
        return dx, dy
    return _grad(x, y, xm, ym, None if grad_x is None else grad_x.float().contiguous(),
                 None if grad_y is None else grad_y.float().contiguous(), block)


# ------------------------------------------------------------------------------------ compile gate
def compile_specs():
    """Every (kernel, constexprs, launch config) of this module (tests/test_triton_compile.py): the
    tile kernel for each dtype and BLOCK_Y (one-direction variants at BLOCK_Y = 32, MaxSim's query
    length), the kernel for two long sets, and the gradient products for each dtype and gradient
    variant."""
    specs = []
    tri = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    i32 = "i32"
    for dtype in ("float32", "bfloat16", "float16"):
        fp = "*" + tri[dtype]
        blocks = (16, 32, 64, 128, 256) if dtype != "float16" else (128, 256)
        prec = FUSED_FP32_PRECISION if dtype == "float32" else "ieee"
        for block_y in blocks:
            cfg = late_config("tiles", dtype, block_y)
            # both directions (FILIP), and one (MaxSim: the x statistic, or the y one after a swap)
            wants = ((True, True), (True, False), (False, True)) if block_y == 32 else ((True, True),)
            for (want_x, want_y), args in ((w, a) for w in wants for a in (False, True)):
                sig = {"x_ptr": fp, "y_ptr": fp, "xm_ptr": "*u8", "ym_ptr": "*u8", "sx_ptr": "*fp32",
                       "sy_ptr": "*fp32", "rarg_ptr": "*i32", "carg_ptr": "*i32", "i0": i32, "By": i32, "NX": i32,
                       "NY": i32, "D": i32, "stride_xb": i32, "stride_xn": i32, "stride_yb": i32, "stride_yn": i32,
                       "WANT_X": "constexpr", "WANT_Y": "constexpr", "ARGS": "constexpr",
                       "INPUT_PRECISION": "constexpr", "BLOCK_X": "constexpr", "BLOCK_Y": "constexpr",
                       "BLOCK_D": "constexpr"}
                consts = dict(WANT_X=want_x, WANT_Y=want_y, ARGS=args, INPUT_PRECISION=prec, BLOCK_X=cfg.block_m,
                              BLOCK_Y=cfg.block_n, BLOCK_D=cfg.block_k)
                specs.append(dict(name=f"late_tiles[args={args},x={want_x},y={want_y}]", fn=_late_tiles_kernel,
                                  signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages, uses_dot=True, dtype=dtype, config=cfg))
        cfg = late_config("rows", dtype)
        for args in (False, True):
            sig = {"x_ptr": fp, "y_ptr": fp, "xm_ptr": "*u8", "ym_ptr": "*u8", "sx_ptr": "*fp32", "rarg_ptr": "*i32",
                   "i0": i32, "By": i32, "NX": i32, "NY": i32, "D": i32, "stride_xb": i32, "stride_xn": i32,
                   "stride_yb": i32, "stride_yn": i32, "ARGS": "constexpr", "INPUT_PRECISION": "constexpr",
                   "BLOCK_X": "constexpr", "BLOCK_Y": "constexpr", "BLOCK_D": "constexpr"}
            consts = dict(ARGS=args, INPUT_PRECISION=prec, BLOCK_X=cfg.block_m, BLOCK_Y=cfg.block_n,
                          BLOCK_D=cfg.block_k)
            specs.append(dict(name=f"late_rows[args={args}]", fn=_late_rows_kernel, signature=sig, constexprs=consts,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages, uses_dot=True, dtype=dtype,
                              config=cfg))
        for kernel in ("dx", "dy"):
            cfg = late_config(kernel, dtype)
            for has_gx, has_gy in ((True, True), (True, False), (False, True)):
                sig = {"src_ptr": fp, "rarg_ptr": "*i32", "carg_ptr": "*i32", "gx_ptr": "*fp32", "gy_ptr": "*fp32",
                       "out_ptr": "*fp32", "i0": i32, "C": i32, "By": i32, "NX": i32, "NY": i32, "D": i32,
                       "stride_sb": i32, "stride_sn": i32, "stride_ob": i32, "stride_on": i32}
                consts = dict(HAS_GX=has_gx, HAS_GY=has_gy, FOR_Y=kernel == "dy", INPUT_PRECISION=prec,
                              BLOCK_X=cfg.block_m, BLOCK_R=cfg.block_n, BLOCK_D=cfg.block_k)
                sig.update({k: "constexpr" for k in consts})
                specs.append(dict(name=f"late_{kernel}[gx={has_gx},gy={has_gy}]", fn=_late_grad_kernel,
                                  signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages, uses_dot=True, dtype=dtype, config=cfg))
    return specs
