"""Chunked Triton path of the fastcon engine (any D).

The epilogue kernels below work on tiles of dot products ``A_i·B_j`` from one of two producers
(``dot_tile``, chosen per call by ``producer``):

* the matmul producer (bf16/fp16 on a GPU): each kernel forms its tiles with ``tl.dot`` over D (wgmma
  on sm_90), so that no logit goes to memory; pass 1 runs in row chunks whose column partials fit the
  chunk budget, pass 2 in row × column blocks whose G fits it (``matmul_plan``); the kernels are
  persistent, each program taking work items (row block × column range) in turn;
* the cuBLAS producer (fp32, the interpreter): for each chunk of rows of A, ``torch.mm`` writes the
  fp32 dot products ``dot = A_c·Bᵀ`` (tensor cores for bf16/fp16 through ``out_dtype=torch.float32``)
  and the kernels read that chunk once.

The epilogues:

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

import functools
import math
import os
import time
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._common import chunk_bytes, mask_columns_without_positive, mm_acc, row_chunks, stats_pass
from . import launch
from .configs import (FUSED_FP32_PRECISION, MATMUL_FAMILY, SUPPORTED_DTYPES, chunked_config, dtype_class,
                      matmul_candidates, matmul_config)
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
def dot_tile(dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m, offs_n, mask_m, mask_n,
             MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The producer of the engine's tiles: the fp32 dot products A_i·B_j of rows ``offs_m`` of a chunk
    of A and rows ``offs_n`` of B, 0 outside ``mask_m × mask_n``. With MATMUL formed here, ``tl.dot``
    over D in BLOCK_K slices of A (row stride stride_am) and B (stride_bn), fp32 accumulation (wgmma on
    sm_90, mma on sm_80); else read from a chunk of dot products in memory (row stride stride_dm),
    written by ``torch.mm``. Every operand has a unit inner stride. Both passes of a loss call it with
    the same BLOCK_K, so a logit is the same number in each."""
    if MATMUL:
        d = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D
            x = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            y = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            d = tl.dot(x, tl.trans(y), d, input_precision=INPUT_PRECISION)
    else:
        d = tl.load(dot_ptr + offs_m[:, None] * stride_dm + offs_n[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
    return d


@triton.jit
def column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m, mask_m, N,
                MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column tile ``ct`` of a row block (local rows ``offs_m``) of an epilogue over N columns: its
    column offsets, their mask and its dot products (``dot_tile``)."""
    offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    d = dot_tile(dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m, offs_n, mask_m, mask_n,
                 MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    return offs_n, mask_n, d


@triton.jit
def _items_end(n_items, PERSISTENT: tl.constexpr):
    """End of a program's loop over work items: all of them for a persistent grid (the matmul
    producer, whose configurations state an occupancy: ``_items``), else its own one (a loop the
    compiler sees run once: no loop-carried registers)."""
    if PERSISTENT:
        end = n_items
    else:
        end = tl.program_id(0) + 1
    return end


@triton.jit
def _items_step(PERSISTENT: tl.constexpr):
    if PERSISTENT:
        step = tl.num_programs(0)
    else:
        step = 1
    return step


@triton.jit
def _work_item(item, m_blocks, tiles_per_split, R, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Work item ``item`` of an epilogue over R rows × N columns: row block m (fastest, so that the
    programs running at once walk the same column tiles of B and share them in L2) and column
    split s. Returns (m, its local row offsets as int64 and their mask, its column tiles [t0, t1))."""
    pid_m = item % m_blocks
    pid_s = item // m_blocks
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(N, BLOCK_N))
    return pid_m, offs_m, offs_m < R, t0, t1


@triton.jit
def _chunk_stats_kernel(
    dot_ptr, a_ptr, b_ptr, scale_ptr, bias_ptr, row_part_ptr, col_part_ptr, pos_logit_ptr,
    R, N, D, m_blocks, n_items, tiles_per_split, pos_col0,
    stride_dm, stride_am, stride_bn, stride_rp, stride_cp,
    MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pass 1 of the softmax losses. Work item (m, s) (``_work_item``; the programs take items
    p, p + P, ...: persistent): rows [m·BM, (m+1)·BM) of the chunk × the column tiles of split s, the
    tiles from ``dot_tile``. Writes row_part[s, rows] (LSE over the split's columns), col_part[m, cols]
    (LSE of each column over the row block) and pos_logit[i] = S[i, i + pos_col0] for the rows whose
    positive column lies in this split (one writer per row). No logit goes to memory."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    for item in range(tl.program_id(0), _items_end(n_items, MATMUL), _items_step(MATMUL)):
        pid_m, offs_m, mask_m, t0, t1 = _work_item(item, m_blocks, tiles_per_split, R, N, BLOCK_M, BLOCK_N)
        pid_s = item // m_blocks
        target = offs_m + pos_col0
        pos_d = tl.zeros([BLOCK_M], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        r_i = tl.zeros([BLOCK_M], tl.float32)  # Σ exp(t − m_i) − 1
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m,
                                           mask_m, N, MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            mask = mask_m[:, None] & mask_n[None, :]
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
            pc_hi, pc_lo = _split_lse(tl.load(col_lse_ptr + target, mask=mask_m & (target >= 0) & (target < N),
                                              other=float("inf")))
            g_pos += w_col * _expm1((t_pos - pc_hi) - pc_lo)
        g_pos += w_row * _expm1((t_pos - row_hi) - row_lo)
        g = tl.where(is_t, g_pos[:, None], g)
    return g


@triton.jit
def _chunk_softmax_grad_kernel(
    dot_ptr, a_ptr, b_ptr, g_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, part_ptr,
    R, N, D, m_blocks, n_items, tiles_per_split, pos_col0,
    stride_dm, stride_am, stride_bn, stride_gm,
    w_row, w_col, w_pos, g_scale,
    HAS_COL_TERM: tl.constexpr, MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pass 2 of the softmax losses over a block of R rows × N columns (the columns' LSEs at
    col_lse_ptr; a row's positive is its local column row + pos_col0, which may lie outside the
    block), work items as in ``_chunk_stats_kernel``: G = w_row·e^(t − row_lse) + w_col·e^(t −
    col_lse) − w_pos·[positive] (``_softmax_grad_tile``: the float64 LSEs split into fp32 (hi, lo),
    the positive's P − 1 with expm1). G·g_scale is stored to g_ptr (which may alias dot_ptr: each
    element is read before it is written by the same program) in g_ptr's dtype; g_scale is a power of
    two (``grad_tile_scale``) that keeps fp16 tiles above fp16's subnormals. part[0, item] = Σ G·dot,
    part[1, item] = Σ G over the item (unscaled)."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if HAS_COL_TERM:
        w_tgt = (w_row + w_col) - w_pos
    else:
        w_tgt = w_row - w_pos
    for item in range(tl.program_id(0), _items_end(n_items, MATMUL), _items_step(MATMUL)):
        pid_m, offs_m, mask_m, t0, t1 = _work_item(item, m_blocks, tiles_per_split, R, N, BLOCK_M, BLOCK_N)
        row_hi, row_lo = _split_lse(tl.load(row_lse_ptr + offs_m, mask=mask_m, other=float("inf")))
        target = offs_m + pos_col0
        first_target = pid_m * BLOCK_M + pos_col0
        acc_gd = tl.zeros([BLOCK_M], tl.float32)
        acc_g = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m,
                                           mask_m, N, MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            mask = mask_m[:, None] & mask_n[None, :]
            t = d * scale + bias
            g = _softmax_grad_tile(t, ct, offs_n, mask_n, mask_m, target, first_target, N, row_hi, row_lo,
                                   col_lse_ptr, w_row, w_col, w_tgt, HAS_COL_TERM, BLOCK_M, BLOCK_N)
            g = tl.where(mask, g, 0.0)
            acc_gd += tl.sum(g * d, 1)
            acc_g += tl.sum(g, 1)
            tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
                     (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + item, tl.sum(acc_gd, 0))
        tl.store(part_ptr + n_items + item, tl.sum(acc_g, 0))


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
    dot_ptr, a_ptr, b_ptr, g_ptr, scale_ptr, bias_ptr, part_ptr,
    R, N, D, m_blocks, n_items, tiles_per_split, pos_col0,
    stride_dm, stride_am, stride_bn, stride_gm,
    w, g_scale,
    NEED_GRAD: tl.constexpr, MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """SigLIP over a block of R rows × N columns, work items as in ``_chunk_stats_kernel``:
    part[0, item] = Σ softplus(−z·S); with NEED_GRAD G = w·(σ(S) − [pos]) is stored (g_ptr may alias
    dot_ptr) and part[1, item] = Σ G·dot, part[2, item] = Σ G. A row's positive is its local column
    row + pos_col0 (z = +1 there, −1 elsewhere)."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    for item in range(tl.program_id(0), _items_end(n_items, MATMUL), _items_step(MATMUL)):
        pid_m, offs_m, mask_m, t0, t1 = _work_item(item, m_blocks, tiles_per_split, R, N, BLOCK_M, BLOCK_N)
        target = offs_m + pos_col0
        acc_loss = tl.zeros([BLOCK_M], tl.float32)
        acc_gd = tl.zeros([BLOCK_M], tl.float32)
        acc_g = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m,
                                           mask_m, N, MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            mask = mask_m[:, None] & mask_n[None, :]
            loss, g = _sigmoid_terms(d * scale + bias, offs_n[None, :] == target[:, None])
            acc_loss += tl.sum(tl.where(mask, loss, 0.0), 1)
            if NEED_GRAD:
                g = tl.where(mask, w * g, 0.0)
                acc_gd += tl.sum(g * d, 1)
                acc_g += tl.sum(g, 1)
                tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
                         (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + item, tl.sum(acc_loss, 0))
        if NEED_GRAD:
            tl.store(part_ptr + n_items + item, tl.sum(acc_gd, 0))
            tl.store(part_ptr + 2 * n_items + item, tl.sum(acc_g, 0))


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


PRODUCERS = ("auto", "matmul", "cublas")


def producer(a: torch.Tensor, soft: bool = False) -> str:
    """Where this call's tiles of dot products come from (``FASTCON_TRITON_PRODUCER``): ``"matmul"``,
    the epilogue kernels form them with tl.dot (``dot_tile``: no logit in memory), or ``"cublas"``,
    ``torch.mm`` writes each chunk and the kernels read it. ``auto`` (the default): the matmul
    producer for bf16/fp16 on a GPU; cuBLAS for fp32 (its fp32 GEMM has no TF32 rounding), in the
    interpreter, and for soft targets (``soft``: distillation, whose teacher's chunk is in memory
    either way; ``matmul`` forms the student's tiles there too, until a GPU measurement says which
    wins: benchmarks/gpu_sweep.sh)."""
    return producer_for(a.dtype, a.is_cuda, soft)


def producer_for(dtype: torch.dtype, on_gpu: bool, soft: bool = False) -> str:
    """``producer`` of inputs of ``dtype`` on a GPU (``on_gpu``) or in the interpreter."""
    choice = os.environ.get("FASTCON_TRITON_PRODUCER", "auto") or "auto"
    if choice not in PRODUCERS:
        raise ValueError(f"FASTCON_TRITON_PRODUCER must be one of {', '.join(PRODUCERS)}, got {choice!r}")
    if choice == "auto":
        return "matmul" if on_gpu and dtype in (torch.bfloat16, torch.float16) and not soft else "cublas"
    return choice


def _target_programs(device: torch.device) -> int:
    return _TARGET_PROGRAMS_CUDA if device.type == "cuda" else _TARGET_PROGRAMS_CPU


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 for the interpreter, which runs programs in turn)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _grid(rows: int, cols: int, block_m: int, block_n: int, device: torch.device, target: int = 0):
    """(row blocks, column splits, column tiles per split) aiming at about ``target`` work items
    (default _target_programs)."""
    m_blocks = triton.cdiv(rows, block_m)
    n_tiles = triton.cdiv(cols, block_n)
    splits = max(1, min(n_tiles, triton.cdiv(target or _target_programs(device), m_blocks)))
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    return m_blocks, splits, per_split


class _Items(NamedTuple):
    """The work items of one epilogue launch (row blocks × column splits) and its grid."""
    m_blocks: int
    splits: int
    per_split: int
    n_items: int
    grid: tuple


ITEMS_PER_PROGRAM = 8  # a persistent grid's work items per program: the last round idles at most 1/8


def _items(rows: int, cols: int, cfg, device: torch.device) -> _Items:
    """Work items of an epilogue over rows × cols; a persistent configuration (``cfg.occupancy``)
    launches ``occupancy`` programs per SM that take the items in turn (about ITEMS_PER_PROGRAM each,
    where the shape allows), any other one program each."""
    programs = cfg.occupancy * sm_count(device) if cfg.occupancy else 0
    m_blocks, splits, per_split = _grid(rows, cols, cfg.block_m, cfg.block_n, device,
                                        max(_target_programs(device), ITEMS_PER_PROGRAM * programs))
    n_items = m_blocks * splits
    programs = n_items if not cfg.occupancy else min(n_items, programs)
    return _Items(m_blocks, splits, per_split, n_items, (max(1, programs),))


class _Producer(NamedTuple):
    """How an epilogue launch gets its tiles: the keyword arguments of ``dot_tile``'s constexprs and
    the launch configuration."""
    matmul: bool
    cfg: object

    def consts(self, a: torch.Tensor) -> dict:
        prec = FUSED_FP32_PRECISION if self.matmul and a.dtype == torch.float32 else "ieee"
        return dict(MATMUL=self.matmul, INPUT_PRECISION=prec, BLOCK_M=self.cfg.block_m, BLOCK_N=self.cfg.block_n,
                    BLOCK_K=self.cfg.block_k or 16, num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)


def _producer_for(a: torch.Tensor, kernel: str) -> _Producer:
    if producer(a) == "matmul":
        return _Producer(True, tuned_config(kernel, a))
    return _Producer(False, chunked_config(kernel))


# ---------------------------------------------------------------------------------- autotuning
AUTOTUNE_ENV = "FASTCON_TRITON_AUTOTUNE"
_TUNED: dict = {}


def _tune_key(family: str, a: torch.Tensor) -> tuple:
    """Tuning is per loss family, dtype class, D (rounded up to a power of two) and device."""
    name = torch.cuda.get_device_name(a.device) if a.is_cuda else str(a.device)
    d = max(16, 1 << max(0, int(a.shape[1]) - 1).bit_length())
    return family, dtype_class(str(a.dtype).replace("torch.", "")), d, name


def tuned_config(kernel: str, a: torch.Tensor):
    """The matmul producer's configuration of ``kernel`` for inputs like ``a``: the family's fixed one,
    or with ``FASTCON_TRITON_AUTOTUNE=1`` the one ``autotune`` chose for this key."""
    fixed = matmul_config(kernel, str(a.dtype).replace("torch.", ""))
    if os.environ.get(AUTOTUNE_ENV) != "1":
        return fixed
    return _TUNED.get(_tune_key(MATMUL_FAMILY[kernel], a), fixed)


def _time(run) -> float:
    """Milliseconds of ``run()``: CUDA events through triton.testing.do_bench on a GPU, one timed call
    after a warm-up elsewhere (the interpreter: tuning there only exercises the logic)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(triton.testing.do_bench(run, warmup=5, rep=20))
    run()
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def autotune(family: str, a: torch.Tensor, run) -> None:
    """With ``FASTCON_TRITON_AUTOTUNE=1``, the first call of a key (``_tune_key``) times ``run(cfg)``
    (a launch of the family's heaviest kernel on a sample of the call's own inputs) for each of the
    family's candidates (``configs.MATMUL_CANDIDATES``) and keeps the fastest for the rest of the
    process; both passes of a loss then take that one configuration. Off (the default), every call
    takes the fixed configuration: results never depend on timing."""
    if os.environ.get(AUTOTUNE_ENV) != "1" or torch.compiler.is_compiling():
        return  # (under torch.compile the traced launches take what was chosen before, or the fixed one)
    key = _tune_key(family, a)
    if key in _TUNED:
        return
    candidates = matmul_candidates(family, key[1])
    times = [(_time(lambda c=cfg: run(c)), i) for i, cfg in enumerate(candidates)]
    _TUNED[key] = candidates[min(times)[1]]


TUNE_ROWS, TUNE_COLS = 4096, 8192  # the sample block autotuning times


def _tuning_run(family: str, a, b, scale, bias):
    """``run(cfg)`` for ``autotune``: the family's gradient kernel with configuration ``cfg`` on the
    first TUNE_ROWS × TUNE_COLS block of the call's inputs (G into a scratch buffer)."""
    r, n = min(a.shape[0], TUNE_ROWS), min(b.shape[0], TUNE_COLS)
    a_s, b_s = a[:r], b[:n]
    g = torch.empty((r, n), dtype=a.dtype, device=a.device)
    lse = torch.zeros(max(r, n), dtype=torch.float64, device=a.device)

    def run(cfg):
        consts = _Producer(True, cfg).consts(a)
        it = _items(r, n, cfg, a.device)
        part = torch.empty((3, it.n_items), dtype=torch.float32, device=a.device)
        common = (r, n, a.shape[1], it.m_blocks, it.n_items, it.per_split, 0,
                  a_s.stride(0), a_s.stride(0), b_s.stride(0), g.stride(0))
        if family == "softmax":
            launch(_chunk_softmax_grad_kernel)[it.grid](a_s, a_s, b_s, g, scale, bias, lse, lse, part, *common,
                                                        1.0, 1.0, 2.0, 1.0, HAS_COL_TERM=True, **consts)
        else:
            launch(_chunk_sigmoid_kernel)[it.grid](a_s, a_s, b_s, g, scale, bias, part, *common, 1.0, 1.0,
                                                   NEED_GRAD=True, **consts)
    return run


def memory_rows(na: int, nb: int, chunk_rows: int, budget: int, elt_bytes: float = 4) -> int:
    """Rows per chunk of the cuBLAS producer: at most ``chunk_rows``, and an fp32 chunk of dot
    products over ``nb`` columns within ``budget`` bytes (``chunk_bytes`` of the device); ``elt_bytes``:
    the bytes held per element of that chunk, when more than its own 4 sit beside it."""
    return max(1, min(na, chunk_rows, int(budget // (elt_bytes * max(nb, 1)))))


def aligned_memory_rows(na: int, nb: int, chunk_rows: int, budget: int, dtype: torch.dtype,
                        partial_bytes: float = 0.0) -> int:
    """``memory_rows`` for a pass of the matmul producer that holds an fp32 chunk over ``nb`` columns
    beside the tiles it forms (a soft target's teacher), and ``partial_bytes`` per element of that
    chunk beside it (pass 1's column partials, per row block): where the budget is what splits the
    rows, rounded down to a multiple of ``matmul_plan``'s row alignment (the CLIP statistics kernel's
    block_m, which every matmul configuration's divides), so that its chunks start where that plan's
    do."""
    rows = memory_rows(na, nb, chunk_rows, budget, 4 + partial_bytes)
    if rows >= min(na, chunk_rows):
        return rows
    unit = matmul_config("stats", str(dtype).replace("torch.", "")).block_m
    return max(unit, rows // unit * unit)


class MatmulPlan(NamedTuple):
    """The chunks of the matmul producer within a budget of bytes: pass 1 (statistics) in chunks of
    ``stats_rows`` rows, whose float64 column partials (one row per row block) fit; pass 2 (G and the
    gradient products) in blocks of ``grad_rows`` × ``grad_cols``, whose G in the gradient dtype
    fits. Both at most ``chunk_rows`` rows, the pass-2 block about square: the gradient of B is read
    and written once per row block (N/grad_rows times) and that of A once per column block, which at
    thousands of rows is far below the products' own time."""
    stats_rows: int
    grad_rows: int
    grad_cols: int


def matmul_plan(na: int, nb: int, dtype: torch.dtype, chunk_rows: int, budget: int,
                col_bytes: int = 8, partial_rows: int = 0, block_bytes: int = 0) -> MatmulPlan:
    """``MatmulPlan`` of Na × Nb within ``budget`` bytes; ``col_bytes``: pass 1's partials per row
    block and column (a float64 LSE for the CLIP losses; the general target adds its fp32 sums), one
    row block per ``partial_rows`` rows (its kernel's block_m; by default the CLIP statistics
    kernel's); ``block_bytes``: the bytes per element of a pass-2 block (by default G's, in
    ``dtype``; soft targets add the teacher's fp32 chunk beside it). The chunks are multiples of that
    kernel's block_m and block_n, which every matmul configuration divides, so that each logit sits at
    the same place of its tile in both passes."""
    cfg = matmul_config("stats", str(dtype).replace("torch.", ""))
    elt = block_bytes or torch.empty((), dtype=dtype).element_size()
    blocks = budget // (col_bytes * max(nb, 1))  # row blocks of partials that fit
    stats_rows = max(cfg.block_m, blocks * (partial_rows or cfg.block_m) // cfg.block_m * cfg.block_m)
    side = max(cfg.block_m, math.isqrt(budget // elt) // cfg.block_m * cfg.block_m)
    grad_rows = max(1, min(na, chunk_rows, side))
    grad_cols = max(cfg.block_n, budget // (elt * grad_rows) // cfg.block_n * cfg.block_n)
    return MatmulPlan(max(1, min(na, chunk_rows, stats_rows)), grad_rows, max(1, min(nb, grad_cols)))


def _merge(part: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    cfg = chunked_config("merge")
    k, n = part.shape
    grid = (triton.cdiv(n, cfg.block_n),)
    launch(_merge_lse_kernel)[grid](
        part, out, k, n, part.stride(0), part.stride(1),
        ACCUMULATE=accumulate, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _operands(dot, a_c, b):
    """(dot, a, b) pointers of an epilogue launch: the unused side is a stand-in (never read)."""
    if dot is None:
        return a_c, a_c, b
    return dot, dot, dot


def _chunk_stats(dot, a_c, b, scale, bias, row_lse_out, col_lse, pos_logit_out, pos_col0: int,
                 accumulate_cols: bool) -> None:
    """row_lse_out[:] = row LSE of the chunk; col_lse ⊕= column LSE of the chunk;
    pos_logit_out[i] = S[i, i + pos_col0] where that column exists (left untouched elsewhere). The
    chunk's dot products are ``dot`` (cuBLAS producer) or, with ``dot`` None, formed from a_c and b."""
    if dot is None:
        prod, (r, d), n = _producer_for(a_c, "stats"), a_c.shape, b.shape[0]
    else:
        prod, (r, n), d = _Producer(False, chunked_config("stats")), dot.shape, 0
    dev = row_lse_out.device
    it = _items(r, n, prod.cfg, dev)
    row_part = torch.empty((it.splits, r), dtype=torch.float64, device=dev)
    col_part = torch.empty((it.m_blocks, n), dtype=torch.float64, device=dev)
    d_ptr, a_ptr, b_ptr = _operands(dot, a_c, b)
    launch(_chunk_stats_kernel)[it.grid](
        d_ptr, a_ptr, b_ptr, scale, bias, row_part, col_part, pos_logit_out,
        r, n, d, it.m_blocks, it.n_items, it.per_split, int(pos_col0),
        d_ptr.stride(0), a_ptr.stride(0), b_ptr.stride(0), row_part.stride(0), col_part.stride(0),
        **prod.consts(d_ptr),
    )
    _merge(row_part, row_lse_out, accumulate=False)
    _merge(col_part, col_lse, accumulate=accumulate_cols)


# ---------------------------------------------------------------------------------------- contract
def _stats_epilogue(scale, bias, pos_offset):
    """The statistics epilogue of ``_common.stats_pass`` (the cuBLAS producer's chunks)."""
    def chunk_stats(dot, r0, r1, row_lse, col_lse, pos_logit):
        _chunk_stats(dot, None, None, scale, bias, row_lse[r0:r1], col_lse, pos_logit[r0:r1], r0 + pos_offset,
                     accumulate_cols=r0 > 0)
    return chunk_stats


def _matmul_stats(a, b, scale, bias, pos_offset, rows):
    """Pass 1 with the matmul producer: (row_lse, col_lse, pos_logit), no dot products in memory."""
    na, nb = a.shape[0], b.shape[0]
    row_lse = torch.empty(na, dtype=torch.float64, device=a.device)
    pos_logit = torch.zeros(na, dtype=torch.float32, device=a.device)
    col_lse = torch.full((nb,), float("-inf"), dtype=torch.float64, device=a.device)
    for r0, r1 in row_chunks(na, rows):
        _chunk_stats(None, a[r0:r1], b, scale, bias, row_lse[r0:r1], col_lse, pos_logit[r0:r1], r0 + pos_offset,
                     accumulate_cols=r0 > 0)
    return row_lse, col_lse, pos_logit


def _stats_pass(a, b, scale, bias, pos_offset, chunk_rows, cache_bytes):
    """(row_lse, col_lse, pos_logit, cached dot-product chunks) of pass 1 by this call's producer."""
    if producer(a) == "matmul":
        if a.shape[0] and b.shape[0]:
            autotune("softmax", a, _tuning_run("softmax", a, b, scale, bias))
        plan = matmul_plan(a.shape[0], b.shape[0], a.dtype, chunk_rows, chunk_bytes(a.device))
        return _matmul_stats(a, b, scale, bias, pos_offset, plan.stats_rows) + ([],)
    rows = memory_rows(a.shape[0], b.shape[0], chunk_rows, chunk_bytes(a.device))
    return stats_pass(a, b, rows, cache_bytes, _stats_epilogue(scale, bias, pos_offset))


def lse_stats(a, b, scale, bias, pos_offset, chunk_rows):
    _check(a, b)
    row_lse, col_lse, pos_logit, _ = _stats_pass(a, b, scale, bias, pos_offset, chunk_rows, 0)
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


def _grad_gemms(g, a_c, b, scale, grad_a_c, grad_b, g_scale: float, accumulate_a: bool = False) -> None:
    """grad_a_c = s·G·B (``accumulate_a``: +=, the device scale read by the GEMM); grad_b += Gᵀ·A_c in
    place (fp32 accumulation; s applied to grad_b at the end). ``g`` holds G·g_scale (a power of
    two), undone in the products' α."""
    inv = 1.0 / g_scale
    if accumulate_a:
        mm_accumulate(g, b, grad_a_c, inv, alpha=scale)
    elif g.dtype == torch.float32:
        torch.mul(g @ b, scale, out=grad_a_c)
    else:
        torch.mul(mm_acc(g, b), scale * inv, out=grad_a_c)
    if g.dtype == torch.float32:
        grad_b.addmm_(g.T, a_c)
    else:
        mm_accumulate(g.T, a_c, grad_b, inv)


def _blocks(a, b, chunk_rows, need_g: bool):
    """(row chunk, column block) pairs of pass 2, the G buffer they share (None: G in place of the
    dot products, or no G) and the rows per chunk. The cuBLAS producer: row chunks over all columns,
    G in place of the fp32 dot products or in a half buffer; the matmul producer: ``matmul_plan``'s
    blocks, G in its buffer (without G, whole row chunks: nothing but per-item partials is stored)."""
    na, nb = a.shape[0], b.shape[0]
    if producer(a) == "matmul":
        if need_g:
            plan = matmul_plan(na, nb, a.dtype, chunk_rows, chunk_bytes(a.device))
            rows, cols = plan.grad_rows, plan.grad_cols
            g_buf = torch.empty((rows, cols), dtype=a.dtype, device=a.device)
        else:
            rows, cols, g_buf = chunk_rows, nb, None
    else:
        rows, cols = memory_rows(na, nb, chunk_rows, chunk_bytes(a.device)), nb
        g_buf = _g_buffer(a, min(rows, na), nb) if need_g else None
    pairs = [(r0, r1, c0, c1) for r0, r1 in row_chunks(na, rows) for c0, c1 in row_chunks(nb, cols)]
    return pairs, g_buf, rows


def _pass2(a, b, scale, grad_a, grad_b, g_scale, chunk_rows, n_parts, launch_block, cached=None):
    """The blocks of pass 2: for each, its dot products (a cached chunk, cuBLAS, or none with the
    matmul producer), ``launch_block(dot, a_c, b_k, g, r0, c0)`` writing G (into ``g``) and returning
    the block's partials, then the gradient products (with ``grad_a``; else ``g`` is a stand-in that
    is never written). Returns the partials summed over the blocks in a fixed order."""
    need_g = grad_a is not None
    matmul = producer(a) == "matmul"
    pairs, g_buf, rows = _blocks(a, b, chunk_rows, need_g)
    parts = []
    for r0, r1, c0, c1 in pairs:
        a_c, b_k = a[r0:r1], b[c0:c1]
        dot = None
        if not matmul:
            k = r0 // rows
            dot = cached[k] if cached is not None and k < len(cached) else mm_acc(a_c, b_k.T)
        if not need_g:
            g = dot if dot is not None else a_c
        else:
            g = dot if g_buf is None else g_buf[:r1 - r0, :c1 - c0]
        parts.append(launch_block(dot, a_c, b_k, g, r0, c0))
        if need_g:
            _grad_gemms(g, a_c, b_k, scale, grad_a[r0:r1], grad_b[c0:c1], g_scale, accumulate_a=c0 > 0)
    if not parts:
        return torch.zeros(n_parts, dtype=torch.float32, device=a.device)
    return torch.cat(parts, dim=1).sum(dim=1)


def softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows,
                 _cached=None):
    _check(a, b)
    dev = a.device
    grad_a = torch.empty(a.shape, dtype=torch.float32, device=dev)
    grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    row_lse = row_lse.to(torch.float64).contiguous()
    col_lse = col_lse.to(torch.float64).contiguous()
    g_scale = grad_tile_scale(a.dtype, abs(w_row) + abs(w_col) + abs(w_pos))
    prod = _producer_for(a, "softmax_grad")

    def launch_block(dot, a_c, b_k, g, r0, c0):
        r, n = a_c.shape[0], b_k.shape[0]
        it = _items(r, n, prod.cfg, dev)
        part = torch.empty((2, it.n_items), dtype=torch.float32, device=dev)
        d_ptr, a_ptr, b_ptr = _operands(dot, a_c, b_k)
        launch(_chunk_softmax_grad_kernel)[it.grid](
            d_ptr, a_ptr, b_ptr, g, scale, bias, row_lse[r0:], col_lse[c0:], part,
            r, n, a_c.shape[1], it.m_blocks, it.n_items, it.per_split, r0 + int(pos_offset) - c0,
            d_ptr.stride(0), a_ptr.stride(0), b_ptr.stride(0), g.stride(0),
            float(w_row), float(w_col), float(w_pos), g_scale,
            HAS_COL_TERM=w_col != 0, **prod.consts(a),
        )
        return part

    totals = _pass2(a, b, scale, grad_a, grad_b, g_scale, chunk_rows, 2, launch_block, _cached)
    grad_b.mul_(scale)
    return grad_a, grad_b, totals[0].clone(), totals[1].clone()


def softmax_fused(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes):
    _check(a, b)
    row_lse, col_lse, pos_logit, cached = _stats_pass(a, b, scale, bias, pos_offset, chunk_rows, cache_bytes)
    mask_columns_without_positive(col_lse, pos_offset, a.shape[0])
    grads = softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows,
                         _cached=cached)
    return (row_lse, col_lse, pos_logit) + grads


def sigmoid_fused(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad):
    _check(a, b)
    dev = a.device
    grad_a = grad_b = None
    if need_grad:
        grad_a = torch.empty(a.shape, dtype=torch.float32, device=dev)
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    g_scale = grad_tile_scale(a.dtype, abs(w))
    if producer(a) == "matmul" and a.shape[0] and b.shape[0]:
        autotune("sigmoid", a, _tuning_run("sigmoid", a, b, scale, bias))
    prod = _producer_for(a, "sigmoid")

    def launch_block(dot, a_c, b_k, g, r0, c0):
        r, n = a_c.shape[0], b_k.shape[0]
        it = _items(r, n, prod.cfg, dev)
        part = torch.zeros((3, it.n_items), dtype=torch.float32, device=dev)
        d_ptr, a_ptr, b_ptr = _operands(dot, a_c, b_k)
        launch(_chunk_sigmoid_kernel)[it.grid](
            d_ptr, a_ptr, b_ptr, g, scale, bias, part,
            r, n, a_c.shape[1], it.m_blocks, it.n_items, it.per_split, r0 + int(pos_offset) - c0,
            d_ptr.stride(0), a_ptr.stride(0), b_ptr.stride(0), g.stride(0),
            float(w), g_scale,
            NEED_GRAD=bool(need_grad), **prod.consts(a),
        )
        return part

    totals = _pass2(a, b, scale, grad_a, grad_b, g_scale, chunk_rows, 3, launch_block)
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
    as dicts for ``triton.compile(ASTSource(...))`` (used by tests/test_triton_compile.py): the
    epilogue kernels with both producers (``dot_tile``), the matmul one at ``MATMUL_CONFIGS``."""

    specs = []
    i32, f32p, f64p = "i32", "*fp32", "*fp64"
    tri = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

    def add(name, fn, sig, consts, cfg, dtype, matmul=False):
        """A spec; the matmul producer's are compiled with D divisible by 16 (as the runtime
        specialises D = 512, 768, 1152, ...: its K loop is then pipelined, which the gate checks)
        and must use wgmma on sm_90 for bf16/fp16."""
        sig = dict(sig)
        for key in consts:
            sig[key] = "constexpr"
        specs.append(dict(name=name, fn=fn, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages, uses_dot=matmul, dtype=dtype, config=cfg,
                          divisible=("D",) if matmul else (), pipelined=matmul,
                          wgmma_required=matmul and dtype != "float32"))

    cfg = chunked_config("merge")
    for acc in (False, True):
        sig = {"part_ptr": f64p, "out_ptr": f64p, "K": i32, "N": i32, "stride_pk": i32, "stride_pn": i32}
        add(f"merge[acc={acc}]", _merge_lse_kernel, sig,
            {"stride_pn": 1, "ACCUMULATE": acc, "BLOCK_N": cfg.block_n}, cfg, "float32")

    def producers(dtype, kernel):
        """(label, producer constexprs, config, operand pointer type) of each producer of ``kernel``:
        the matmul producer at its fixed configuration and at every autotuning candidate."""
        fixed = matmul_config(kernel, dtype)
        prec = FUSED_FP32_PRECISION if dtype == "float32" else "ieee"
        out = []
        for mm in [fixed] + [c for c in matmul_candidates(MATMUL_FAMILY[kernel], dtype_class(dtype)) if c != fixed]:
            label = "mm" if mm == fixed else "mm,candidate"
            out.append((label, dict(MATMUL=True, INPUT_PRECISION=prec, BLOCK_M=mm.block_m, BLOCK_N=mm.block_n,
                                    BLOCK_K=mm.block_k), mm, "*" + tri[dtype]))
        if kernel != "stats" or dtype == "float32":  # the cuBLAS producer's chunk is fp32 in any case
            c = chunked_config(kernel)
            out.append(("cublas", dict(MATMUL=False, INPUT_PRECISION="ieee", BLOCK_M=c.block_m,
                                       BLOCK_N=c.block_n, BLOCK_K=16), c, f32p))
        return out

    items = {"R": i32, "N": i32, "D": i32, "m_blocks": i32, "n_items": i32, "tiles_per_split": i32,
             "pos_col0": i32, "stride_dm": i32, "stride_am": i32, "stride_bn": i32}
    for dtype in SUPPORTED_DTYPES:
        for label, consts, cfg, op in producers(dtype, "stats"):
            sig = dict({"dot_ptr": f32p, "a_ptr": op, "b_ptr": op, "scale_ptr": f32p, "bias_ptr": f32p,
                        "row_part_ptr": f64p, "col_part_ptr": f64p, "pos_logit_ptr": f32p},
                       **items, stride_rp=i32, stride_cp=i32)
            add(f"chunk_stats[{label}]", _chunk_stats_kernel, sig, consts, cfg, dtype, consts["MATMUL"])
        for label, consts, cfg, op in producers(dtype, "softmax_grad"):
            for col in (False, True):
                sig = dict({"dot_ptr": f32p, "a_ptr": op, "b_ptr": op, "g_ptr": "*" + tri[dtype],
                            "scale_ptr": f32p, "bias_ptr": f32p, "row_lse_ptr": f64p, "col_lse_ptr": f64p,
                            "part_ptr": f32p}, **items, stride_gm=i32,
                           w_row="fp32", w_col="fp32", w_pos="fp32", g_scale="fp32")
                add(f"chunk_softmax_grad[{label},col={col}]", _chunk_softmax_grad_kernel, sig,
                    dict(consts, HAS_COL_TERM=col), cfg, dtype, consts["MATMUL"])
        for label, consts, cfg, op in producers(dtype, "sigmoid"):
            for need_grad in (False, True):
                sig = dict({"dot_ptr": f32p, "a_ptr": op, "b_ptr": op, "g_ptr": "*" + tri[dtype],
                            "scale_ptr": f32p, "bias_ptr": f32p, "part_ptr": f32p}, **items, stride_gm=i32,
                           w="fp32", g_scale="fp32")
                add(f"chunk_sigmoid[{label},grad={need_grad}]", _chunk_sigmoid_kernel, sig,
                    dict(consts, NEED_GRAD=need_grad), cfg, dtype, consts["MATMUL"])
    return specs
