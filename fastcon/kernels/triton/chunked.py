"""Chunked-GEMM Triton path of the fastcon engine (any D).

For each chunk of ``chunk_rows`` rows of A, ``torch.mm`` writes the fp32 dot products
``dot = A_c·Bᵀ`` (tensor cores for bf16/fp16 through ``out_dtype=torch.float32``), then fused Triton
epilogue kernels read that chunk once:

* stats:   ``S = s·dot + b``; row-LSE partials per column split and column-LSE partials per row
           block, merged deterministically by ``_merge_lse_kernel`` (no float atomics);
* softmax: ``G = w_row·exp(S − row_lse) + w_col·exp(S − col_lse)`` written in place (fp32) or into a
           bf16/fp16 buffer so that the two gradient GEMMs run on tensor cores, with per-program
           partials of ``Σ G·dot`` and ``Σ G`` summed in a fixed order at the end;
* sigmoid: ``Σ softplus(−z·S)`` and ``G = w·(σ(S) − [positive])``.

The gradient GEMMs: ``grad_a_c = s·G·B`` (``torch.mm`` with fp32 output for bf16/fp16, torch >= 2.8
on CUDA) and ``grad_b += Gᵀ·A_c`` in place (fp32: ``addmm_``; bf16/fp16: the accumulating Triton
GEMM of ``gemm.py``). An fp16 G is stored times a power of two (``grad_tile_scale``) whose inverse
is folded into both products' α.

Semantics, signatures and results match ``fastcon.kernels.torch_chunked`` (to fp32 rounding).
Logits, maxima and LSE partials are in natural units; exponentials are ``exp2((x − m)·log2 e)``
with the log2 factor applied after the subtraction, so that logits of size 100 lose no more than
fp32 rounding of the difference (folding log2 e into the scale would round both terms separately).

LSE precision (see ``fastcon/kernels/__init__.py``): row and column LSEs, their partials and the
merge are float64; the element math stays fp32. A (partial) LSE is kept as its parts, the maximum
``m`` (an exact logit) and the *excess* ``r = Σ exp(t − m) − 1`` (the max's own term, exactly 1, is
never added), and formed as ``float64(m) + float64(log1p(r))``: a confident row's loss
``lse − S_pos = log1p(r)`` then keeps fp32 relative precision however small it is (``log(1 + r)``
with ``1 + r`` rounded in fp32 would lose everything below ulp(1) ≈ 1.2e-7). The gradient kernels
split the float64 LSE once per tile, ``hi = fp32(lse)``, ``lo = fp32(lse − hi)``, and form
``((t − hi) − lo)·log2 e`` per element in fp32; at the positive, ``P − 1`` is formed with an
accurate ``expm1`` (``w_row·expm1(x_row) + w_col·expm1(x_col) + (w_row + w_col − w_pos)``) instead
of ``exp(x) − 1``, which would round at ulp(1) as well.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import mm_acc, row_chunks, stats_pass, two_pass_softmax
from . import launch
from .configs import SUPPORTED_DTYPES, chunked_config
from .gemm import mm_accumulate

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Programs per launch that the column split aims at (about 4 waves on an H100's 132 SMs); the
# interpreter runs programs one after another, so it aims low.
_TARGET_PROGRAMS_CUDA = 528
_TARGET_PROGRAMS_CPU = 2


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _log1p(x):
    """log(1 + x) in fp32 for x >= 0 (or -1 < x), accurate for small x: log(u)·x/(u − 1), u = 1 + x."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _expm1(x):
    """exp(x) − 1 in fp32, accurate for small |x| (Kahan: (u − 1)·x/log(u), u = e^x, which stays
    accurate with an approximate exp2); −inf gives −1. Where u is below fp32's smallest normal number
    (x < −87.3: a subnormal u, whose log is inexact, or 0) the result is u − 1 = −1 itself."""
    u = tl.exp2(x * LOG2E)
    um1 = u - 1.0
    plain = (u < 1.1754944e-38) | (u == float("inf"))
    r = um1 * (x / tl.where((u == 1.0) | plain, 1.0, tl.log(u)))
    return tl.where(u == 1.0, x, tl.where(plain, um1, r))


@triton.jit
def _lse64(m, r):
    """float64 LSE from its fp32 parts: the max m and the excess r = Σ exp(t − m) − 1 (−inf stays)."""
    return tl.where(m == float("-inf"), float("-inf"), m.to(tl.float64) + _log1p(r).to(tl.float64))


@triton.jit
def _split_lse(lse):
    """(hi, lo) fp32 parts of a float64 LSE, hi + lo = lse; an infinite LSE gives lo = 0 (not NaN)."""
    hi = lse.to(tl.float32)
    lo = (lse - hi.to(tl.float64)).to(tl.float32)
    return hi, tl.where((hi == float("inf")) | (hi == float("-inf")), 0.0, lo)


@triton.jit
def _tile_lse_parts(t, AXIS: tl.constexpr):
    """(max, excess) of t along AXIS: Σ exp(t − max) = 1 + excess; ties to the max add exactly 1 each
    beyond the first, the max's own term is never summed."""
    mx = tl.max(t, AXIS)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp2((t - tl.expand_dims(mx_safe, AXIS)) * LOG2E)
    at_max = t == tl.expand_dims(mx, AXIS)
    excl = tl.sum(tl.where(at_max, 0.0, e), AXIS)
    n_eq = tl.sum(at_max.to(tl.float32), AXIS)
    return mx, excl + (n_eq - 1.0)


@triton.jit
def _online_rows(m_i, r_i, t):
    """One column tile of an online row LSE kept as (max m_i, excess r_i): Σ_j exp(t_j − m_i) = 1 + r_i."""
    tile_max = tl.max(t, 1)
    m_new = tl.maximum(m_i, tile_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp2((t - m_safe[:, None]) * LOG2E)
    at_max = t == m_new[:, None]
    excl = tl.sum(tl.where(at_max, 0.0, e), 1)
    n_eq = tl.sum(at_max.to(tl.float32), 1)
    alpha = tl.exp2((m_i - m_safe) * LOG2E)  # the old max's term; 0 for m_i = −inf
    # the new max comes from this tile: the old max's term alpha joins the excess, one tile max is
    # the new "1"; else every tile element (ties to the max included) is excess
    r_new = r_i * alpha + excl + tl.where(tile_max > m_i, alpha + (n_eq - 1.0), n_eq)
    return m_new, r_new


@triton.jit
def _merge_lse_kernel(
    part_ptr, out_ptr,
    K, N,
    stride_pk, stride_pn,
    ACCUMULATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[n] = ln(Σ_k e^part[k, n]) over float64 natural-unit partials, merged with the existing
    ``out[n]`` when ACCUMULATE, in float64: M = max, then M + log1p(Σ_{k ≠ argmax} e^(part − M))
    with the differences taken in float64 and exponentiated in fp32. Two passes over k in a fixed
    order: deterministic."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    if ACCUMULATE:
        m = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    else:
        m = tl.full([BLOCK_N], float("-inf"), tl.float64)
    prev = m
    for k in range(0, K):
        p = tl.load(part_ptr + k * stride_pk + offs * stride_pn, mask=mask, other=float("-inf")).to(tl.float64)
        m = tl.maximum(m, p)
    inf_m = (m == float("-inf")) | (m == float("inf"))
    m_safe = tl.where(inf_m, 0.0, m)
    acc = tl.zeros([BLOCK_N], tl.float32)   # Σ e^(p − M) over the partials below the max
    cnt = tl.zeros([BLOCK_N], tl.float32)   # partials equal to the max
    if ACCUMULATE:
        acc += tl.where(prev == m, 0.0, tl.exp2((prev - m_safe).to(tl.float32) * LOG2E))
        cnt += tl.where(prev == m, 1.0, 0.0)
    for k in range(0, K):
        p = tl.load(part_ptr + k * stride_pk + offs * stride_pn, mask=mask, other=float("-inf")).to(tl.float64)
        acc += tl.where(p == m, 0.0, tl.exp2((p - m_safe).to(tl.float32) * LOG2E))
        cnt += tl.where(p == m, 1.0, 0.0)
    res = m_safe + _log1p(acc + (cnt - 1.0)).to(tl.float64)
    res = tl.where(inf_m, m, res)
    tl.store(out_ptr + offs, res, mask=mask)


@triton.jit
def _chunk_stats_kernel(
    dot_ptr, scale_ptr, bias_ptr, row_part_ptr, col_part_ptr, pos_logit_ptr,
    R, N, tiles_per_split, pos_col0,
    stride_dm, stride_dn, stride_rp, stride_cp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (m, s): rows [m·BM, (m+1)·BM) of the chunk × column tiles of split s.
    Writes row_part[s, rows] (LSE over the split's columns), col_part[m, cols] (LSE of
    each column over the row block) and pos_logit[i] = S[i, i + pos_col0] for the rows whose positive
    column lies in this split (one writer per row)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < R
    n_tiles = tl.cdiv(N, BLOCK_N)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    target = offs_m + pos_col0
    pos_d = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)  # Σ exp(t − m_i) − 1
    for ct in range(t0, t1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        d = tl.load(dot_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0)
        t = tl.where(mask, d * scale + bias, float("-inf"))
        pos_d += tl.sum(tl.where(mask & (offs_n[None, :] == target[:, None]), d, 0.0), 1)
        # row statistics, online over the split's columns
        m_i, r_i = _online_rows(m_i, r_i, t)
        # column statistics of this row block (float64 partial)
        c_m, c_r = _tile_lse_parts(t, 0)
        tl.store(col_part_ptr + pid_m * stride_cp + offs_n, _lse64(c_m, c_r), mask=mask_n)
    tl.store(row_part_ptr + pid_s * stride_rp + offs_m, _lse64(m_i, r_i), mask=mask_m)
    mine = mask_m & (target >= t0 * BLOCK_N) & (target < tl.minimum(t1 * BLOCK_N, N))
    tl.store(pos_logit_ptr + offs_m, pos_d * scale + bias, mask=mine)


@triton.jit
def _softmax_grad_tile(t, ct, offs_n, mask_n, mask_m, target, first_target, N, row_hi, row_lo, col_lse_ptr,
                       w_row, w_col, w_tgt, HAS_COL_TERM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """G of one tile of logits t (rows × column tile ct): w_row·exp(t − row_lse) [+ w_col·exp(t −
    col_lse)], the LSEs as fp32 hi + lo; at the positives (column = target of the row) instead
    w_tgt + w_col·(P_col − 1) + w_row·(P_row − 1) with expm1, w_tgt = w_row [+ w_col] − w_pos."""
    g = w_row * tl.exp2(((t - row_hi[:, None]) - row_lo[:, None]) * LOG2E)
    if HAS_COL_TERM:
        col_hi, col_lo = _split_lse(tl.load(col_lse_ptr + offs_n, mask=mask_n, other=float("inf")))
        g += w_col * tl.exp2(((t - col_hi[None, :]) - col_lo[None, :]) * LOG2E)
    if (ct * BLOCK_N < first_target + BLOCK_M) & (ct * BLOCK_N + BLOCK_N > first_target):
        # this tile holds positives
        is_t = offs_n[None, :] == target[:, None]
        t_pos = tl.sum(tl.where(is_t, t, 0.0), 1)
        # the O(1) parts first: a column LSE of +inf gives w_col·(−1), which must cancel
        # against w_tgt before the small row term is added
        g_pos = w_tgt
        if HAS_COL_TERM:  # column LSE of each row's positive column
            pc_hi, pc_lo = _split_lse(tl.load(col_lse_ptr + target, mask=mask_m & (target < N),
                                              other=float("inf")))
            g_pos += w_col * _expm1((t_pos - pc_hi) - pc_lo)
        g_pos += w_row * _expm1((t_pos - row_hi) - row_lo)
        g = tl.where(is_t, g_pos[:, None], g)
    return g


@triton.jit
def _chunk_softmax_grad_kernel(
    dot_ptr, g_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, part_ptr,
    R, N, tiles_per_split, num_programs, pos_col0,
    stride_dm, stride_dn, stride_gm, stride_gn,
    w_row, w_col, w_pos, g_scale,
    HAS_COL_TERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G = w_row·e^(t − row_lse) + w_col·e^(t − col_lse) − w_pos·[j == i + pos_col0] for the tile
    range of program (m, s), with the float64 LSEs split into fp32 (hi, lo) and the positive's
    P − 1 formed with expm1 (module docstring);
    G·g_scale is stored to g_ptr (which may alias dot_ptr: each element is read before it is written
    by the same program) in g_ptr's dtype; g_scale is a power of two (``grad_tile_scale``) that keeps
    fp16 tiles above fp16's subnormals. part[0, p] = Σ G·dot, part[1, p] = Σ G over the program
    (unscaled)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid = pid_m * tl.num_programs(1) + pid_s
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < R
    row_hi, row_lo = _split_lse(tl.load(row_lse_ptr + offs_m, mask=mask_m, other=float("inf")))
    target = offs_m + pos_col0
    first_target = pid_m * BLOCK_M + pos_col0
    if HAS_COL_TERM:
        w_tgt = (w_row + w_col) - w_pos
    else:
        w_tgt = w_row - w_pos
    n_tiles = tl.cdiv(N, BLOCK_N)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    acc_gd = tl.zeros([BLOCK_M], tl.float32)
    acc_g = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(t0, t1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        d = tl.load(dot_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0)
        t = d * scale + bias
        g = _softmax_grad_tile(t, ct, offs_n, mask_n, mask_m, target, first_target, N, row_hi, row_lo, col_lse_ptr,
                               w_row, w_col, w_tgt, HAS_COL_TERM, BLOCK_M, BLOCK_N)
        g = tl.where(mask, g, 0.0)
        acc_gd += tl.sum(g * d, 1)
        acc_g += tl.sum(g, 1)
        tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                 (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid, tl.sum(acc_gd, 0))
    tl.store(part_ptr + num_programs + pid, tl.sum(acc_g, 0))


@triton.jit
def _softplus(x):
    """log(1 + e^x), stable, with an accurate log1p (log(u)·e/(u − 1), u = 1 + e)."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    u = 1.0 + e
    l1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + l1p


@triton.jit
def _sigmoid_terms(s, is_pos):
    """(softplus(−z·S), σ(S) − [z = +1]) for z = +1 on positives, −1 elsewhere."""
    x = tl.where(is_pos, -s, s)
    loss = _softplus(x)
    e = tl.exp2(-tl.abs(s) * LOG2E)
    inv = 1.0 / (1.0 + e)
    sig = tl.where(s >= 0, inv, e * inv)          # σ(S)
    sig_neg = tl.where(s >= 0, e * inv, inv)      # σ(−S) = 1 − σ(S)
    g = tl.where(is_pos, -sig_neg, sig)
    return loss, g


@triton.jit
def _chunk_sigmoid_kernel(
    dot_ptr, g_ptr, scale_ptr, bias_ptr, part_ptr,
    R, N, row0, pos_offset, tiles_per_split, num_programs,
    stride_dm, stride_dn, stride_gm, stride_gn,
    w, g_scale,
    NEED_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """part[0, p] = Σ softplus(−z·S); with NEED_GRAD G = w·(σ(S) − [pos]) is stored (g_ptr may alias
    dot_ptr) and part[1, p] = Σ G·dot, part[2, p] = Σ G. Positives: global row row0 + i, column
    j == row0 + i + pos_offset."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid = pid_m * tl.num_programs(1) + pid_s
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < R
    target = offs_m + row0 + pos_offset  # positive column of each row
    n_tiles = tl.cdiv(N, BLOCK_N)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    acc_loss = tl.zeros([BLOCK_M], tl.float32)
    acc_gd = tl.zeros([BLOCK_M], tl.float32)
    acc_g = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(t0, t1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask = mask_m[:, None] & mask_n[None, :]
        d = tl.load(dot_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn, mask=mask, other=0.0)
        s = d * scale + bias
        is_pos = offs_n[None, :] == target[:, None]
        loss, g = _sigmoid_terms(s, is_pos)
        acc_loss += tl.sum(tl.where(mask, loss, 0.0), 1)
        if NEED_GRAD:
            g = tl.where(mask, w * g, 0.0)
            acc_gd += tl.sum(g * d, 1)
            acc_g += tl.sum(g, 1)
            tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                     (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + pid, tl.sum(acc_loss, 0))
    if NEED_GRAD:
        tl.store(part_ptr + num_programs + pid, tl.sum(acc_gd, 0))
        tl.store(part_ptr + 2 * num_programs + pid, tl.sum(acc_g, 0))


# ------------------------------------------------------------------------------------------- host
def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    name = str(a.dtype).replace("torch.", "")
    if name not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the fastcon Triton backend supports float32, bfloat16 and float16 inputs, got {name}; "
            "use fastcon.kernels.torch_chunked for float64"
        )
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError("a and b must have the same dtype and device")


def _target_programs(device: torch.device) -> int:
    return _TARGET_PROGRAMS_CUDA if device.type == "cuda" else _TARGET_PROGRAMS_CPU


def _grid(rows: int, cols: int, block_m: int, block_n: int, device: torch.device):
    """(row blocks, column splits, column tiles per split) aiming at about _target_programs."""
    m_blocks = triton.cdiv(rows, block_m)
    n_tiles = triton.cdiv(cols, block_n)
    splits = max(1, min(n_tiles, triton.cdiv(_target_programs(device), m_blocks)))
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    return m_blocks, splits, per_split


def _merge(part: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    cfg = chunked_config("merge")
    k, n = part.shape
    grid = (triton.cdiv(n, cfg.block_n),)
    launch(_merge_lse_kernel)[grid](
        part, out, k, n, part.stride(0), part.stride(1),
        ACCUMULATE=accumulate, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _chunk_stats(dot, scale, bias, row_lse_out, col_lse, pos_logit_out, pos_col0: int,
                 accumulate_cols: bool) -> None:
    """row_lse_out[:] = row LSE of the chunk; col_lse ⊕= column LSE of the chunk;
    pos_logit_out[i] = S[i, i + pos_col0] where that column exists (left untouched elsewhere)."""
    cfg = chunked_config("stats")
    r, n = dot.shape
    m_blocks, splits, per_split = _grid(r, n, cfg.block_m, cfg.block_n, dot.device)
    row_part = torch.empty((splits, r), dtype=torch.float64, device=dot.device)
    col_part = torch.empty((m_blocks, n), dtype=torch.float64, device=dot.device)
    launch(_chunk_stats_kernel)[(m_blocks, splits)](
        dot, scale, bias, row_part, col_part, pos_logit_out,
        r, n, per_split, int(pos_col0),
        dot.stride(0), dot.stride(1), row_part.stride(0), col_part.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _merge(row_part, row_lse_out, accumulate=False)
    _merge(col_part, col_lse, accumulate=accumulate_cols)


# ---------------------------------------------------------------------------------------- contract
def _stats_epilogue(scale, bias, pos_offset):
    def chunk_stats(dot, r0, r1, row_lse, col_lse, pos_logit):
        _chunk_stats(dot, scale, bias, row_lse[r0:r1], col_lse, pos_logit[r0:r1], r0 + pos_offset,
                     accumulate_cols=r0 > 0)
    return chunk_stats


def lse_stats(a, b, scale, bias, pos_offset, chunk_rows):
    _check(a, b)
    row_lse, col_lse, pos_logit, _ = stats_pass(a, b, chunk_rows, 0, _stats_epilogue(scale, bias, pos_offset))
    return row_lse, col_lse, pos_logit


def _g_buffer(a: torch.Tensor, rows: int, nb: int):
    """Buffer for G in the dtype of the gradient GEMMs (None for fp32: G is written in place)."""
    if a.dtype == torch.float32:
        return None
    return torch.empty((rows, nb), dtype=a.dtype, device=a.device)


_FP16_LIFT_LIMIT = 32768.0  # half of fp16's largest finite value (65504), rounded to a power of two


def grad_tile_scale(dtype: torch.dtype, bound: float) -> float:
    """The power of two that G (|G| <= ``bound``) is multiplied by before its cast to ``dtype`` for
    the gradient GEMMs, whose inverse is folded into their α. Softmax gradients are about 1/N: at
    N = 65,536 that is 1.5e-5, below fp16's smallest normal number (6.1e-5), where the cast would keep
    few of its bits; lifted to just under fp16's range they keep all eleven. bf16 has fp32's exponent
    range and fp32 no cast: 1 for both. The factor depends on the loss weights only, never on the
    data, so results are deterministic and no device value is read."""
    if dtype != torch.float16 or bound <= 0:
        return 1.0
    return float(2.0 ** math.floor(math.log2(_FP16_LIFT_LIMIT / bound)))


def _grad_gemms(g, a_c, b, scale, grad_a_c, grad_b, g_scale: float) -> None:
    """grad_a_c = s·G·B; grad_b += Gᵀ·A_c in place (fp32 accumulation; s applied to grad_b at the
    end). ``g`` holds G·g_scale (a power of two), undone in the products' α."""
    if g.dtype == torch.float32:
        torch.mul(g @ b, scale, out=grad_a_c)
        grad_b.addmm_(g.T, a_c)
        return
    inv = 1.0 / g_scale
    torch.mul(mm_acc(g, b), scale * inv, out=grad_a_c)
    mm_accumulate(g.T, a_c, grad_b, inv)


def softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows,
                 _cached=None):
    _check(a, b)
    cfg = chunked_config("softmax_grad")
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    grad_a = torch.empty(a.shape, dtype=torch.float32, device=dev)
    grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    row_lse = row_lse.to(torch.float64).contiguous()
    col_lse = col_lse.to(torch.float64).contiguous()
    g_buf = _g_buffer(a, min(chunk_rows, na), nb)
    g_scale = grad_tile_scale(a.dtype, abs(w_row) + abs(w_col) + abs(w_pos))
    parts = []
    for k, (r0, r1) in enumerate(row_chunks(na, chunk_rows)):
        if _cached is not None and k < len(_cached):
            dot = _cached[k]
        else:
            dot = mm_acc(a[r0:r1], b.T)
        r = r1 - r0
        g = dot if g_buf is None else g_buf[:r]
        m_blocks, splits, per_split = _grid(r, nb, cfg.block_m, cfg.block_n, dev)
        nprog = m_blocks * splits
        part = torch.empty((2, nprog), dtype=torch.float32, device=dev)
        launch(_chunk_softmax_grad_kernel)[(m_blocks, splits)](
            dot, g, scale, bias, row_lse[r0:r1], col_lse, part,
            r, nb, per_split, nprog, r0 + int(pos_offset),
            dot.stride(0), dot.stride(1), g.stride(0), g.stride(1),
            float(w_row), float(w_col), float(w_pos), g_scale,
            HAS_COL_TERM=w_col != 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        parts.append(part)
        _grad_gemms(g, a[r0:r1], b, scale, grad_a[r0:r1], grad_b, g_scale)
    grad_b.mul_(scale)
    totals = torch.cat(parts, dim=1).sum(dim=1) if parts else torch.zeros(2, dtype=torch.float32, device=dev)
    return grad_a, grad_b, totals[0].clone(), totals[1].clone()


def softmax_fused(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes):
    _check(a, b)
    return two_pass_softmax(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes,
                            _stats_epilogue(scale, bias, pos_offset), softmax_grad)


def sigmoid_fused(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad):
    _check(a, b)
    cfg = chunked_config("sigmoid")
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    grad_a = grad_b = None
    if need_grad:
        grad_a = torch.empty(a.shape, dtype=torch.float32, device=dev)
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
        g_buf = _g_buffer(a, min(chunk_rows, na), nb)
    g_scale = grad_tile_scale(a.dtype, abs(w))
    parts = []
    for r0, r1 in row_chunks(na, chunk_rows):
        dot = mm_acc(a[r0:r1], b.T)
        r = r1 - r0
        g = dot if (not need_grad or g_buf is None) else g_buf[:r]
        m_blocks, splits, per_split = _grid(r, nb, cfg.block_m, cfg.block_n, dev)
        nprog = m_blocks * splits
        part = torch.zeros((3, nprog), dtype=torch.float32, device=dev)
        launch(_chunk_sigmoid_kernel)[(m_blocks, splits)](
            dot, g, scale, bias, part,
            r, nb, r0, int(pos_offset), per_split, nprog,
            dot.stride(0), dot.stride(1), g.stride(0), g.stride(1),
            float(w), g_scale,
            NEED_GRAD=bool(need_grad),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        parts.append(part)
        if need_grad:
            _grad_gemms(g, a[r0:r1], b, scale, grad_a[r0:r1], grad_b, g_scale)
    totals = torch.cat(parts, dim=1).sum(dim=1) if parts else torch.zeros(3, dtype=torch.float32, device=dev)
    if not need_grad:
        return totals[0].clone(), None, None, None, None
    grad_b.mul_(scale)
    return totals[0].clone(), grad_a, grad_b, totals[1].clone(), totals[2].clone()


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    """The general target's loss on this path (its epilogues live in ``target.py``)."""
    from .target import target_softmax_fused as fused

    return fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes)


# ------------------------------------------------------------------------------------ compile gate
def compile_specs():
    """Every (kernel, constexprs, launch config) this module ships, for each supported input dtype,
    as dicts for ``triton.compile(ASTSource(...))`` (used by tests/test_triton_compile.py)."""
    specs = []
    i32, f32p, f64p = "i32", "*fp32", "*fp64"
    tri = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

    def add(name, fn, sig, consts, cfg, dtype):
        specs.append(dict(name=name, fn=fn, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages, uses_dot=False, dtype=dtype, config=cfg))

    cfg = chunked_config("merge")
    for acc in (False, True):
        sig = {"part_ptr": f64p, "out_ptr": f64p, "K": i32, "N": i32, "stride_pk": i32, "stride_pn": "constexpr",
               "ACCUMULATE": "constexpr", "BLOCK_N": "constexpr"}
        add(f"merge[acc={acc}]", _merge_lse_kernel, sig,
            {"stride_pn": 1, "ACCUMULATE": acc, "BLOCK_N": cfg.block_n}, cfg, "float32")
    cfg = chunked_config("stats")
    sig = {"dot_ptr": f32p, "scale_ptr": f32p, "bias_ptr": f32p, "row_part_ptr": f64p, "col_part_ptr": f64p,
           "pos_logit_ptr": f32p, "R": i32, "N": i32, "tiles_per_split": i32, "pos_col0": i32, "stride_dm": i32, "stride_dn": "constexpr",
           "stride_rp": i32, "stride_cp": i32, "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    add("chunk_stats", _chunk_stats_kernel, sig,
        {"stride_dn": 1, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}, cfg, "float32")
    for dtype in SUPPORTED_DTYPES:
        cfg = chunked_config("softmax_grad")
        for col in (False, True):
            sig = {"dot_ptr": f32p, "g_ptr": "*" + tri[dtype], "scale_ptr": f32p, "bias_ptr": f32p,
                   "row_lse_ptr": f64p, "col_lse_ptr": f64p, "part_ptr": f32p,
                   "R": i32, "N": i32, "tiles_per_split": i32, "num_programs": i32, "pos_col0": i32,
                   "stride_dm": i32, "stride_dn": "constexpr", "stride_gm": i32, "stride_gn": "constexpr",
                   "w_row": "fp32", "w_col": "fp32", "w_pos": "fp32", "g_scale": "fp32", "HAS_COL_TERM": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
            add(f"chunk_softmax_grad[col={col}]", _chunk_softmax_grad_kernel, sig,
                {"stride_dn": 1, "stride_gn": 1, "HAS_COL_TERM": col, "BLOCK_M": cfg.block_m,
                 "BLOCK_N": cfg.block_n}, cfg, dtype)
        cfg = chunked_config("sigmoid")
        for need_grad in (False, True):
            sig = {"dot_ptr": f32p, "g_ptr": "*" + tri[dtype], "scale_ptr": f32p, "bias_ptr": f32p,
                   "part_ptr": f32p, "R": i32, "N": i32, "row0": i32, "pos_offset": i32,
                   "tiles_per_split": i32, "num_programs": i32,
                   "stride_dm": i32, "stride_dn": "constexpr", "stride_gm": i32, "stride_gn": "constexpr",
                   "w": "fp32", "g_scale": "fp32", "NEED_GRAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
            add(f"chunk_sigmoid[grad={need_grad}]", _chunk_sigmoid_kernel, sig,
                {"stride_dn": 1, "stride_gn": 1, "NEED_GRAD": need_grad, "BLOCK_M": cfg.block_m,
                 "BLOCK_N": cfg.block_n}, cfg, dtype)
    return specs
