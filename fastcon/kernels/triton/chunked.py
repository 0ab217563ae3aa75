"""CLIP's and SigLIP's chunked Triton path (any D): the epilogue kernels over tiles of dot products
``A_i·B_j`` and their launchers. This is the module of the engine's ``"triton"`` backend; the general
target's loss (``target_softmax_fused``) is ``target.py``'s.

The tiles come from one of two producers (``tiles.dot_tile``, chosen per call by ``plan.producer``):

* the matmul producer (bf16/fp16 on a GPU): each kernel forms its tiles with ``tl.dot`` over D (wgmma
  on sm_90), so that no logit goes to memory; pass 1 runs in row chunks whose column partials fit the
  chunk budget, pass 2 in row × column blocks whose G fits it (``plan.matmul_plan``); the kernels are
  persistent, each program taking work items (row block × column range) in turn;
* the cuBLAS producer (fp32, the interpreter): for each chunk of rows of A, ``torch.mm`` writes the
  fp32 dot products ``dot = A_c·Bᵀ`` (tensor cores for bf16/fp16 through ``out_dtype=torch.float32``)
  and the kernels read that chunk once.

The epilogues:

* stats:   ``S = s·dot + b``; row-LSE partials per column split and column-LSE partials per row
           block, merged deterministically by ``tiles.merge_lse_kernel`` (no float atomics);
* softmax: ``G = w_row·exp(S − row_lse) + w_col·exp(S − col_lse)`` written in place (fp32) or into a
           bf16/fp16 buffer so that the two gradient GEMMs run on tensor cores, with per-program
           partials of ``Σ G·dot`` and ``Σ G`` summed in a fixed order at the end;
* sigmoid: ``Σ softplus(−z·S)`` and ``G = w·(σ(S) − [positive])``.

The gradient GEMMs (``gemm.grad_gemms``): ``grad_a_c = s·G·B`` (``torch.mm`` with fp32 output for
bf16/fp16, torch >= 2.8 on CUDA) and ``grad_b += Gᵀ·A_c`` in place (fp32: ``addmm_``; bf16/fp16: the
accumulating Triton GEMM ``gemm.mm_accumulate``). An fp16 G is stored times a power of two
(``gemm.grad_tile_scale``) whose inverse is folded into both products' α.

Semantics, signatures and results match ``fastcon.kernels.torch_chunked`` (to fp32 rounding). The
LSEs are float64, formed from fp32 parts, and a positive's ``P − 1`` is formed with expm1: see
``tiles.py`` and ``fastcon/kernels/__init__.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import chunk_bytes, mask_columns_without_positive, mm_acc, row_chunks, stats_pass, take_cached
from . import launch
from .configs import (FUSED_FP32_PRECISION, MATMUL_FAMILY, SUPPORTED_DTYPES, chunked_config, dtype_class,
                      matmul_candidates, matmul_config)
from .gemm import grad_buffer, grad_gemms, grad_tile_scale
from .plan import (TileProducer, autotune, check_inputs, epilogue_operands, matmul_plan, memory_rows, merge_lse,
                   producer, tile_producer, work_items)
from .target import target_softmax_fused
from .tiles import (clip_grad_tile, column_tile, items_end, items_step, lse64, merge_lse_kernel, online_row_lse,
                    split_lse, tile_lse_parts, work_item)

__all__ = ["lse_stats", "softmax_grad", "softmax_fused", "sigmoid_fused", "target_softmax_fused", "compile_specs"]


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _chunk_stats_kernel(
    dot_ptr, a_ptr, b_ptr, scale_ptr, bias_ptr, row_part_ptr, col_part_ptr, pos_logit_ptr,
    R, N, D, m_blocks, n_items, tiles_per_split, pos_col0,
    stride_dm, stride_am, stride_bn, stride_rp, stride_cp,
    MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pass 1 of the softmax losses. Work item (m, s) (``tiles.work_item``; the programs take items
    p, p + P, ...: persistent): rows [m·BM, (m+1)·BM) of the chunk × the column tiles of split s, the
    tiles from ``tiles.dot_tile``. Writes row_part[s, rows] (LSE over the split's columns), col_part[m, cols]
    (LSE of each column over the row block) and pos_logit[i] = S[i, i + pos_col0] for the rows whose
    positive column lies in this split (one writer per row). No logit goes to memory."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    for item in range(tl.program_id(0), items_end(n_items, MATMUL), items_step(MATMUL)):
        pid_m, offs_m, mask_m, t0, t1 = work_item(item, m_blocks, tiles_per_split, R, N, BLOCK_M, BLOCK_N)
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
            m_i, r_i = online_row_lse(m_i, r_i, t)
            # column statistics of this row block (float64 partial)
            c_m, c_r = tile_lse_parts(t, 0)
            tl.store(col_part_ptr + pid_m * stride_cp + offs_n, lse64(c_m, c_r), mask=mask_n)
        tl.store(row_part_ptr + pid_s * stride_rp + offs_m, lse64(m_i, r_i), mask=mask_m)
        mine = mask_m & (target >= t0 * BLOCK_N) & (target < tl.minimum(t1 * BLOCK_N, N))
        tl.store(pos_logit_ptr + offs_m, pos_d * scale + bias, mask=mine)


@triton.jit
def _chunk_grad_kernel(
    dot_ptr, a_ptr, b_ptr, g_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, part_ptr,
    R, N, D, m_blocks, n_items, tiles_per_split, pos_col0,
    stride_dm, stride_am, stride_bn, stride_gm,
    w_row, w_col, w_pos, g_scale,
    SIGMOID: tl.constexpr, HAS_COL_TERM: tl.constexpr, NEED_GRAD: tl.constexpr, MATMUL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Pass 2 over a block of R rows × N columns, work items as in ``_chunk_stats_kernel``; a row's
    positive is its local column row + pos_col0, which may lie outside the block.

    Softmax: G = w_row·e^(t − row_lse) + w_col·e^(t − col_lse) − w_pos·[positive], the columns' LSEs at
    col_lse_ptr (``tiles.softmax_grad_tile``: the float64 LSEs split into fp32 (hi, lo), the
    positive's P − 1 with expm1). SIGMOID: part[0, item] = Σ softplus(−z·S) with z = +1 at the
    positive and −1 elsewhere, and G = w_row·(σ(S) − [positive]). With NEED_GRAD (always for the
    softmax) G·g_scale is stored to g_ptr (which may alias dot_ptr: each element is read before it is
    written by the same program) in g_ptr's dtype; g_scale is a power of two (``gemm.grad_tile_scale``)
    that keeps fp16 tiles above fp16's subnormals. part[1, item] = Σ G·dot, part[2, item] = Σ G over
    the item (unscaled); part[0] is 0 for the softmax, rows 1 and 2 are written with NEED_GRAD."""
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if HAS_COL_TERM:
        w_tgt = (w_row + w_col) - w_pos
    else:
        w_tgt = w_row - w_pos
    for item in range(tl.program_id(0), items_end(n_items, MATMUL), items_step(MATMUL)):
        pid_m, offs_m, mask_m, t0, t1 = work_item(item, m_blocks, tiles_per_split, R, N, BLOCK_M, BLOCK_N)
        target = offs_m + pos_col0
        first_target = pid_m * BLOCK_M + pos_col0
        row_hi = tl.zeros([BLOCK_M], tl.float32)  # the sigmoid reads no LSE
        row_lo = row_hi
        if not SIGMOID:
            row_hi, row_lo = split_lse(tl.load(row_lse_ptr + offs_m, mask=mask_m, other=float("inf")))
        acc_loss = tl.zeros([BLOCK_M], tl.float32)
        acc_gd = tl.zeros([BLOCK_M], tl.float32)
        acc_g = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m,
                                           mask_m, N, MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            mask = mask_m[:, None] & mask_n[None, :]
            line_loss, g = clip_grad_tile(d * scale + bias, mask, ct, offs_n, mask_n, mask_m, target, first_target,
                                          N, row_hi, row_lo, col_lse_ptr, w_row, w_col, w_tgt, SIGMOID, HAS_COL_TERM,
                                          False, BLOCK_M, BLOCK_N)
            if SIGMOID:
                acc_loss += line_loss
            if NEED_GRAD:
                g = tl.where(mask, g, 0.0)
                acc_gd += tl.sum(g * d, 1)
                acc_g += tl.sum(g, 1)
                tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
                         (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + item, tl.sum(acc_loss, 0))
        if NEED_GRAD:
            tl.store(part_ptr + n_items + item, tl.sum(acc_gd, 0))
            tl.store(part_ptr + 2 * n_items + item, tl.sum(acc_g, 0))


# ------------------------------------------------------------------------------------------- host
TUNE_ROWS, TUNE_COLS = 4096, 8192  # the sample block autotuning times


def _tuning_run(family: str, a, b, scale, bias):
    """``run(cfg)`` for ``autotune``: the family's gradient kernel with configuration ``cfg`` on the
    first TUNE_ROWS × TUNE_COLS block of the call's inputs (G into a scratch buffer)."""
    r, n = min(a.shape[0], TUNE_ROWS), min(b.shape[0], TUNE_COLS)
    a_s, b_s = a[:r], b[:n]
    g = torch.empty((r, n), dtype=a.dtype, device=a.device)
    lse = torch.zeros(max(r, n), dtype=torch.float64, device=a.device)

    def run(cfg):
        consts = TileProducer(True, cfg).consts(a)
        it = work_items(r, n, cfg, a.device)
        part = torch.empty((3, it.n_items), dtype=torch.float32, device=a.device)
        sigmoid = family == "sigmoid"
        launch(_chunk_grad_kernel)[it.grid](
            a_s, a_s, b_s, g, scale, bias, lse, lse, part, r, n, a.shape[1], it.m_blocks, it.n_items, it.per_split,
            0, a_s.stride(0), a_s.stride(0), b_s.stride(0), g.stride(0), 1.0, 0.0 if sigmoid else 1.0,
            0.0 if sigmoid else 2.0, 1.0, SIGMOID=sigmoid, HAS_COL_TERM=not sigmoid, NEED_GRAD=True, **consts)
    return run


def _chunk_stats(dot, a_c, b, scale, bias, row_lse_out, col_lse, pos_logit_out, pos_col0: int,
                 accumulate_cols: bool) -> None:
    """row_lse_out[:] = row LSE of the chunk; col_lse ⊕= column LSE of the chunk;
    pos_logit_out[i] = S[i, i + pos_col0] where that column exists (left untouched elsewhere). The
    chunk's dot products are ``dot`` (cuBLAS producer) or, with ``dot`` None, formed from a_c and b."""
    if dot is None:
        prod, (r, d), n = tile_producer(a_c, "stats"), a_c.shape, b.shape[0]
    else:
        prod, (r, n), d = TileProducer(False, chunked_config("stats")), dot.shape, 0
    dev = row_lse_out.device
    it = work_items(r, n, prod.cfg, dev)
    row_part = torch.empty((it.splits, r), dtype=torch.float64, device=dev)
    col_part = torch.empty((it.m_blocks, n), dtype=torch.float64, device=dev)
    d_ptr, a_ptr, b_ptr = epilogue_operands(dot, a_c, b)
    launch(_chunk_stats_kernel)[it.grid](
        d_ptr, a_ptr, b_ptr, scale, bias, row_part, col_part, pos_logit_out,
        r, n, d, it.m_blocks, it.n_items, it.per_split, int(pos_col0),
        d_ptr.stride(0), a_ptr.stride(0), b_ptr.stride(0), row_part.stride(0), col_part.stride(0),
        **prod.consts(d_ptr),
    )
    merge_lse(row_part, row_lse_out, accumulate=False)
    merge_lse(col_part, col_lse, accumulate=accumulate_cols)


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
    check_inputs(a, b)
    row_lse, col_lse, pos_logit, _ = _stats_pass(a, b, scale, bias, pos_offset, chunk_rows, 0)
    return row_lse, col_lse, pos_logit


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
        g_buf = grad_buffer(a, min(rows, na), nb) if need_g else None
    pairs = [(r0, r1, c0, c1) for r0, r1 in row_chunks(na, rows) for c0, c1 in row_chunks(nb, cols)]
    return pairs, g_buf, rows


def _pass2(a, b, scale, grad_a, grad_b, g_scale, chunk_rows, launch_block, cached=None):
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
            dot = take_cached(cached, k)  # released from the cache: G is written in place
            if dot is None:
                dot = mm_acc(a_c, b_k.T)
        if not need_g:
            g = dot if dot is not None else a_c
        else:
            g = dot if g_buf is None else g_buf[:r1 - r0, :c1 - c0]
        parts.append(launch_block(dot, a_c, b_k, g, r0, c0))
        if need_g:
            grad_gemms(g, a_c, b_k, scale, grad_a[r0:r1], grad_b[c0:c1], g_scale, accumulate_a=c0 > 0)
    if not parts:
        return torch.zeros(3, dtype=torch.float32, device=a.device)
    return torch.cat(parts, dim=1).sum(dim=1)


def _grad_pass(a, b, scale, bias, row_lse, col_lse, pos_offset, weights, sigmoid: bool, need_grad: bool,
               chunk_rows, cached=None):
    """Pass 2 of CLIP's softmax (row_lse, col_lse given) or SigLIP's sigmoid: ``_chunk_grad_kernel``
    over the blocks of ``_pass2`` with weights (w_row, w_col, w_pos). Returns (the partials summed
    over the blocks (3,): loss, Σ G·dot, Σ G; grad_a; grad_b), the gradients None without need_grad."""
    dev = a.device
    grad_a = grad_b = None
    if need_grad:
        grad_a = torch.empty(a.shape, dtype=torch.float32, device=dev)
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    if sigmoid:
        row_lse = col_lse = torch.empty(1, dtype=torch.float64, device=dev)  # never read
    else:
        row_lse, col_lse = row_lse.to(torch.float64).contiguous(), col_lse.to(torch.float64).contiguous()
    w_row, w_col, w_pos = (float(w) for w in weights)
    g_scale = grad_tile_scale(a.dtype, abs(w_row) + abs(w_col) + abs(w_pos))
    family = "sigmoid" if sigmoid else "softmax_grad"
    if sigmoid and producer(a) == "matmul" and a.shape[0] and b.shape[0]:
        autotune("sigmoid", a, _tuning_run("sigmoid", a, b, scale, bias))
    prod = tile_producer(a, family)

    def launch_block(dot, a_c, b_k, g, r0, c0):
        it, part, block = _grad_block(prod, dot, a_c, b_k, g, scale, bias, r0 + int(pos_offset) - c0, need_grad)
        launch(_chunk_grad_kernel)[it.grid](
            row_lse_ptr=row_lse if sigmoid else row_lse[r0:], col_lse_ptr=col_lse if sigmoid else col_lse[c0:],
            w_row=w_row, w_col=w_col, w_pos=w_pos, g_scale=g_scale, SIGMOID=sigmoid, HAS_COL_TERM=w_col != 0,
            NEED_GRAD=need_grad, **block, **prod.consts(a))
        return part

    totals = _pass2(a, b, scale, grad_a, grad_b, g_scale, chunk_rows, launch_block, cached)
    if need_grad:
        grad_b.mul_(scale)
    return totals, grad_a, grad_b


def _grad_block(prod, dot, a_c, b_k, g, scale, bias, pos_col0: int, need_grad: bool):
    """What a pass-2 launch over one block (rows a_c × columns b_k, G to g) is given: its work
    items, its partials (3 × items; the loss's row alone without need_grad) and its arguments by
    name (operands, sizes, the positive's column, strides)."""
    r, n = a_c.shape[0], b_k.shape[0]
    it = work_items(r, n, prod.cfg, a_c.device)
    part = torch.empty((3 if need_grad else 1, it.n_items), dtype=torch.float32, device=a_c.device)
    d_ptr, a_ptr, b_ptr = epilogue_operands(dot, a_c, b_k)
    return it, part, dict(dot_ptr=d_ptr, a_ptr=a_ptr, b_ptr=b_ptr, g_ptr=g, scale_ptr=scale, bias_ptr=bias,
                          part_ptr=part, R=r, N=n, D=a_c.shape[1], m_blocks=it.m_blocks, n_items=it.n_items,
                          tiles_per_split=it.per_split, pos_col0=pos_col0, stride_dm=d_ptr.stride(0),
                          stride_am=a_ptr.stride(0), stride_bn=b_ptr.stride(0), stride_gm=g.stride(0))


def softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows,
                 _cached=None):
    check_inputs(a, b)
    totals, grad_a, grad_b = _grad_pass(a, b, scale, bias, row_lse, col_lse, pos_offset, (w_row, w_col, w_pos),
                                        False, True, chunk_rows, _cached)
    return grad_a, grad_b, totals[1].clone(), totals[2].clone()


def softmax_fused(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes):
    check_inputs(a, b)
    row_lse, col_lse, pos_logit, cached = _stats_pass(a, b, scale, bias, pos_offset, chunk_rows, cache_bytes)
    mask_columns_without_positive(col_lse, pos_offset, a.shape[0])
    grads = softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows,
                         _cached=cached)
    return (row_lse, col_lse, pos_logit) + grads


def sigmoid_fused(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad):
    check_inputs(a, b)
    totals, grad_a, grad_b = _grad_pass(a, b, scale, bias, None, None, pos_offset, (w, 0.0, 0.0), True,
                                        bool(need_grad), chunk_rows)
    if not need_grad:
        return totals[0].clone(), None, None, None, None
    return totals[0].clone(), grad_a, grad_b, totals[1].clone(), totals[2].clone()


def sigmoid_chunk(dot, a_c, b_k, scale, bias, pos_col0: int, w: float, need_grad: bool):
    """SigLIP's epilogue on one given fp32 chunk of dot products of rows ``a_c`` × columns ``b_k`` (the
    cuBLAS producer; the positive of the chunk's row i at column ``i + pos_col0``): G = w·(σ(S) − [pos])
    written over ``dot`` with ``need_grad``. Returns (Σ softplus(−z·S), Σ G·dot, Σ G) (the loss alone
    without ``need_grad``)."""
    dev = dot.device
    prod = TileProducer(False, chunked_config("sigmoid"))
    it, part, block = _grad_block(prod, dot, a_c, b_k, dot, scale, bias, pos_col0, need_grad)
    never = torch.empty(1, dtype=torch.float64, device=dev)
    launch(_chunk_grad_kernel)[it.grid](
        row_lse_ptr=never, col_lse_ptr=never, w_row=float(w), w_col=0.0, w_pos=0.0, g_scale=1.0, SIGMOID=True,
        HAS_COL_TERM=False, NEED_GRAD=need_grad, **block, **prod.consts(a_c))
    return part.sum(dim=1)


# ------------------------------------------------------------------------------------ compile gate
def compile_specs():
    """Every (kernel, constexprs, launch config) this module ships, for each supported input dtype,
    as dicts for ``triton.compile(ASTSource(...))`` (used by tests/test_triton_compile.py): the
    epilogue kernels with both producers (``tiles.dot_tile``), the matmul one at ``MATMUL_CONFIGS``,
    and the LSE merge kernel (``tiles.merge_lse_kernel``) that its launches use."""

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
        add(f"merge[acc={acc}]", merge_lse_kernel, sig,
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
        for family, variants in (("softmax_grad", [("col=False", False, False, True), ("col=True", False, True, True)]),
                                 ("sigmoid", [("grad=False", True, False, False), ("grad=True", True, False, True)])):
            for label, consts, cfg, op in producers(dtype, family):
                sig = dict({"dot_ptr": f32p, "a_ptr": op, "b_ptr": op, "g_ptr": "*" + tri[dtype],
                            "scale_ptr": f32p, "bias_ptr": f32p, "row_lse_ptr": f64p, "col_lse_ptr": f64p,
                            "part_ptr": f32p}, **items, stride_gm=i32,
                           w_row="fp32", w_col="fp32", w_pos="fp32", g_scale="fp32")
                for vname, sigmoid, col, need_grad in variants:
                    add(f"chunk_{family}[{label},{vname}]", _chunk_grad_kernel, sig,
                        dict(consts, SIGMOID=sigmoid, HAS_COL_TERM=col, NEED_GRAD=need_grad), cfg, dtype,
                        consts["MATMUL"])
    return specs
