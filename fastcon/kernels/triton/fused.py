"""Fully fused Triton path of the fastcon engine: S = s·A·Bᵀ + b never leaves registers (D <= 256).
This is the module of the engine's ``"triton_fused"`` backend: CLIP's and SigLIP's tile kernels and
their launchers here, the general target's in ``fused_target.py``.

Kernels (launch configurations in ``configs.FUSED_CONFIGS``):

* ``_fused_lse_kernel``: grid (row groups, column splits). Each program keeps an A tile resident
  and loops over its row tiles × column tiles: row LSE online over the split's columns (partials per
  split), column LSE of each tile merged into the program's own slot of ``col_part[group, :]`` (read,
  merge, write; a barrier orders the slot's reuse). Partials are merged in a fixed order by
  ``plan.merge_lse``: deterministic, no float atomics, O((groups + splits)·N) memory.
* ``_fused_grad_kernel``, launched twice: over A's rows (grid (row blocks, column splits)) it
  recomputes S per column tile, forms G in registers (softmax or sigmoid), accumulates ``G·B`` into a
  block × BLOCK_D fp32 accumulator and per-program partials of Σ G·dot, Σ G (and the sigmoid loss);
  transposed, over B's rows (grid (column blocks, row splits)), it forms Gᵀ from Sᵀ per row tile and
  accumulates ``Gᵀ·A``.

With several splits the gradient partials go to a [splits, N, D] fp32 buffer summed in order.

LSEs are float64 (row_lse, col_lse, the partials, the lse kernel's column slots and the merge), formed
from fp32 parts (max plus log1p of the excess over the max's own term, ``tiles.py``); the gradient
kernels split each float64 LSE once per tile into fp32 (hi, lo), form ((t − hi) − lo)·log2 e per
element and the positive's P − 1 with expm1. The positive must see bitwise the same S as the lse
kernel for that to pay off on a confident row.
fp32 inputs use TF32x3 dots (tensor cores, near-fp32 accuracy); bf16/fp16 inputs feed tensor cores
directly and G is rounded to the input dtype for the gradient products, with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .configs import FUSED_CONFIGS, FUSED_FP32_PRECISION, SUPPORTED_DTYPES, fused_config
from .fused_target import target_grad, target_softmax_fused, target_stats, teacher_stats
from .gemm import grad_tile_scale
from .plan import check_fused_inputs, dot_precision, dtype_name, merge_lse, programs_per_launch, split_tiles
from .tiles import LOG2E, clip_grad_tile, log1p, lse64, online_row_lse, split_lse, tile_lse_parts

__all__ = ["lse_stats", "softmax_grad", "softmax_fused", "sigmoid_fused", "target_stats", "teacher_stats",
           "target_grad", "target_softmax_fused", "SUPPORTED_DTYPES", "compile_specs"]

# The lse kernel keeps a column-LSE slot per row group: at most this many groups.
_MAX_ROW_GROUPS = 32


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _dot_k_loop(x_ptr, offs_x, mask_x, stride_x, stride_xd, y_ptr, offs_y, mask_y, stride_y, stride_yd, D,
                INPUT_PRECISION: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """X·Yᵀ over D in BLOCK_K slices loaded from memory (L1/L2): used when a resident
    BLOCK_X × BLOCK_D operand would not fit in registers (fp32 TF32x3 dots at large D)."""
    acc = tl.zeros([BLOCK_X, BLOCK_Y], tl.float32)
    for k0 in range(0, BLOCK_D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        x = tl.load(x_ptr + offs_x[:, None] * stride_x + offs_k[None, :] * stride_xd,
                    mask=mask_x[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(y_ptr + offs_y[:, None] * stride_y + offs_k[None, :] * stride_yd,
                    mask=mask_y[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _fused_lse_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, row_part_ptr, col_part_ptr, pos_logit_ptr,
    Na, Nb, D, tiles_per_group, tiles_per_split, pos_offset,
    stride_am, stride_ad, stride_bn, stride_bd, stride_rp, stride_cp,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_g = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rt0 = pid_g * tiles_per_group
    rt1 = tl.minimum(rt0 + tiles_per_group, tl.cdiv(Na, BLOCK_M))
    ct0 = pid_s * tiles_per_split
    ct1 = tl.minimum(ct0 + tiles_per_split, tl.cdiv(Nb, BLOCK_N))
    for rt in range(rt0, rt1):
        offs_m = rt * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Na
        if BLOCK_K == BLOCK_D:  # A tile resident for the whole column loop
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_d[None, :] * stride_ad,
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        r_i = tl.zeros([BLOCK_M], tl.float32)  # Σ exp(t − m_i) − 1
        target = offs_m + pos_offset
        pos_d = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(ct0, ct1):
            offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < Nb
            if BLOCK_K == BLOCK_D:
                b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_d[None, :] * stride_bd,
                            mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                dot = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
            else:
                dot = _dot_k_loop(a_ptr, offs_m, mask_m, stride_am, stride_ad, b_ptr, offs_n, mask_n, stride_bn,
                                  stride_bd, D, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
            t = tl.where(mask_m[:, None] & mask_n[None, :], dot * scale + bias, float("-inf"))
            pos_d += tl.sum(tl.where(offs_n[None, :] == target[:, None], dot, 0.0), 1)
            # rows: online over the split's columns, as (max, excess)
            m_i, r_i = online_row_lse(m_i, r_i, t)
            # columns: this tile's float64 LSE merged into the group's float64 slot
            # (few float64 values live at once: a column vector sliced from the dot layout is
            # replicated over many threads, and each float64 element takes two registers)
            c_m, c_r = tile_lse_parts(t, 0)
            c_lse = c_m.to(tl.float64) + log1p(c_r).to(tl.float64)  # finite in every unmasked column
            slot = col_part_ptr + pid_g * stride_cp + offs_n
            old = tl.load(slot, mask=mask_n, other=float("-inf"))
            # old is -inf on a group's first row tile (gap -inf: new = c_lse); masked columns give
            # NaN here and are not stored. The gap in float64, its exp in fp32.
            gap = tl.abs((old - c_lse).to(tl.float32))
            new = tl.maximum(old, c_lse) + log1p(tl.exp2(-gap * LOG2E)).to(tl.float64)
            tl.store(slot, new, mask=mask_n)
            tl.debug_barrier()
        tl.store(row_part_ptr + pid_s * stride_rp + offs_m, lse64(m_i, r_i), mask=mask_m)
        # pos_logit: written by the one split whose columns hold the row's positive
        mine = mask_m & (target >= ct0 * BLOCK_N) & (target < tl.minimum(ct1 * BLOCK_N, Nb))
        tl.store(pos_logit_ptr + offs_m, pos_d * scale + bias, mask=mine)


@triton.jit
def _fused_grad_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, own_lse_ptr, other_lse_ptr, grad_ptr, part_ptr,
    Nx, Ny, D, tiles_per_split, pos_offset,
    stride_xm, stride_xd, stride_yn, stride_yd, stride_gs, stride_gm,
    w_row, w_col, w_pos, g_scale,
    SIGMOID: tl.constexpr, HAS_COL_TERM: tl.constexpr, NEED_GRAD: tl.constexpr, TRANSPOSED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, s): block m of X's own lines × the tiles of Y in split s; the tile's logits are
    recomputed from X·Yᵀ and G formed in registers; grad[s, lines, :] = s·Σ_j G_ij·Y_j (NEED_GRAD).
    The own line i's positive is line i + pos_offset of Y.

    Rows (X = A, Y = B): G of S = s·A·Bᵀ + b. SIGMOID: G = w_row·(σ(S) − [positive]); else G =
    w_row·exp(S − row_lse) (+ w_col·exp(S − col_lse) with HAS_COL_TERM) − w_pos·[positive]
    (``tiles.softmax_grad_tile``), own LSE = the rows'. part[0, p] = the sigmoid loss (SIGMOID),
    part[1, p] = Σ G·dot, part[2, p] = Σ G (NEED_GRAD), p = m·splits + s.
    TRANSPOSED (X = B, Y = A, pos_offset negated): the same G, transposed, for grad_b; own LSE = the
    columns' (read with HAS_COL_TERM), no partials."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    pid = pid_m * tl.num_programs(1) + pid_s
    num_programs = tl.num_programs(0) * tl.num_programs(1)
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Nx
    if BLOCK_K == BLOCK_D:  # X tile resident for the whole loop (else re-read in BLOCK_K slices)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    target = offs_m + pos_offset
    first_target = pid_m * BLOCK_M + pos_offset
    if HAS_COL_TERM:
        w_tgt = (w_row + w_col) - w_pos
    else:
        w_tgt = w_row - w_pos
    own_hi = tl.zeros([BLOCK_M], tl.float32)  # the sigmoid, and Gᵀ without a column term, read none
    own_lo = own_hi
    if not SIGMOID:
        if HAS_COL_TERM or not TRANSPOSED:
            own_hi, own_lo = split_lse(tl.load(own_lse_ptr + offs_m, mask=mask_m, other=float("inf")))
    ct0 = pid_s * tiles_per_split
    ct1 = tl.minimum(ct0 + tiles_per_split, tl.cdiv(Ny, BLOCK_N))
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_loss = tl.zeros([BLOCK_M], tl.float32)
    acc_gd = tl.zeros([BLOCK_M], tl.float32)
    acc_g = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(ct0, ct1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Ny
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptr + offs_n[:, None] * stride_yn + offs_d[None, :] * stride_yd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        if BLOCK_K == BLOCK_D:
            dot = tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION)
        else:
            dot = _dot_k_loop(x_ptr, offs_m, mask_m, stride_xm, stride_xd, y_ptr, offs_n, mask_n, stride_yn,
                              stride_yd, D, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_K)
        line_loss, g = clip_grad_tile(dot * scale + bias, mask, ct, offs_n, mask_n, mask_m, target, first_target, Ny,
                                      own_hi, own_lo, other_lse_ptr, w_row, w_col, w_tgt, SIGMOID, HAS_COL_TERM,
                                      TRANSPOSED, BLOCK_M, BLOCK_N)
        if SIGMOID:
            if not TRANSPOSED:
                acc_loss += line_loss
        if NEED_GRAD:
            g = tl.where(mask, g, 0.0)
            if not TRANSPOSED:
                acc_gd += tl.sum(g * dot, 1)
                acc_g += tl.sum(g, 1)
            # G lifted by the power of two g_scale before its cast (fp16 keeps its bits), undone below
            acc = tl.dot((g * g_scale).to(y.dtype), y, acc, input_precision=INPUT_PRECISION)
    if not TRANSPOSED:
        if SIGMOID:
            tl.store(part_ptr + pid, tl.sum(acc_loss, 0))
        if NEED_GRAD:
            tl.store(part_ptr + num_programs + pid, tl.sum(acc_gd, 0))
            tl.store(part_ptr + 2 * num_programs + pid, tl.sum(acc_g, 0))
    if NEED_GRAD:
        out = grad_ptr + pid_s * stride_gs + offs_m[:, None] * stride_gm + offs_d[None, :]
        tl.store(out, acc * (scale / g_scale), mask=mask_m[:, None] & mask_d[None, :])


# ------------------------------------------------------------------------------------------- host
def lse_stats(a, b, scale, bias, pos_offset, chunk_rows):
    check_fused_inputs(a, b)
    na, nb, d = a.shape[0], b.shape[0], a.shape[1]
    dev = a.device
    row_lse = torch.empty(na, dtype=torch.float64, device=dev)
    col_lse = torch.empty(nb, dtype=torch.float64, device=dev)
    pos_logit = torch.zeros(na, dtype=torch.float32, device=dev)
    if na == 0 or nb == 0:
        row_lse.fill_(float("-inf"))
        col_lse.fill_(float("-inf"))
        return row_lse, col_lse, pos_logit
    cfg, bd = fused_config("lse", dtype_name(a), d)
    n_rt, n_ct = triton.cdiv(na, cfg.block_m), triton.cdiv(nb, cfg.block_n)
    groups = min(n_rt, _MAX_ROW_GROUPS, programs_per_launch(dev))
    per_group = triton.cdiv(n_rt, groups)
    groups = triton.cdiv(n_rt, per_group)
    splits, per_split = split_tiles(n_ct, groups, dev)
    row_part = torch.empty((splits, na), dtype=torch.float64, device=dev)
    col_part = torch.full((groups, nb), float("-inf"), dtype=torch.float64, device=dev)
    launch(_fused_lse_kernel)[(groups, splits)](
        a, b, scale, bias, row_part, col_part, pos_logit,
        na, nb, d, per_group, per_split, int(pos_offset),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), row_part.stride(0), col_part.stride(0),
        INPUT_PRECISION=dot_precision(a),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, BLOCK_K=min(bd, cfg.block_k or bd),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    merge_lse(row_part, row_lse)
    merge_lse(col_part, col_lse)
    return row_lse, col_lse, pos_logit


def _grad_launch(x, y, scale, bias, own_lse, other_lse, pos_offset, weights, g_scale, sigmoid, has_col, need_grad,
                 transposed):
    """One launch of ``_fused_grad_kernel`` over the lines of x against y (configuration ``"cols"``
    when transposed, its block_n the own block). Returns (x's gradient summed over the splits or
    None, the partials (3, programs); transposed: not written)."""
    nx, ny, d = x.shape[0], y.shape[0], x.shape[1]
    cfg, bd = fused_config("cols" if transposed else "rows", dtype_name(x), d)
    own, other = (cfg.block_n, cfg.block_m) if transposed else (cfg.block_m, cfg.block_n)
    blocks, n_tiles = triton.cdiv(nx, own), triton.cdiv(ny, other)
    splits, per_split = split_tiles(n_tiles, blocks, x.device)
    new = torch.empty if transposed else torch.zeros
    part = new((3, blocks * splits), dtype=torch.float32, device=x.device)
    grad = torch.empty((splits, nx, d), dtype=torch.float32, device=x.device) if need_grad else part
    if nx > 0 and ny > 0:
        launch(_fused_grad_kernel)[(blocks, splits)](
            x, y, scale, bias, own_lse, other_lse, grad, part,
            nx, ny, d, per_split, int(pos_offset),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), grad.stride(0) if need_grad else 0,
            grad.stride(1) if need_grad else 0, *(float(w) for w in weights), g_scale,
            SIGMOID=sigmoid, HAS_COL_TERM=has_col, NEED_GRAD=need_grad, TRANSPOSED=transposed,
            INPUT_PRECISION=dot_precision(x), BLOCK_M=own, BLOCK_N=other, BLOCK_D=bd,
            BLOCK_K=min(bd, cfg.block_k or bd), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    elif need_grad:
        grad.zero_()
    if not need_grad:
        return None, part
    return (grad[0] if splits == 1 else grad.sum(dim=0)), part


def _gradients(a, b, scale, bias, row_lse, col_lse, w_row, w_col, w_pos, pos_offset, sigmoid, need_grad):
    """The gradient kernel over A's rows (and, with need_grad, over B's rows, transposed). Returns
    (loss_sum, grad_a, grad_b, grad_scale, grad_bias) with None where not computed."""
    has_col = (not sigmoid) and w_col != 0
    g_scale = grad_tile_scale(a.dtype, abs(w_row) + (abs(w_col) if has_col else 0.0) + abs(w_pos))
    dummy64 = torch.empty(1, dtype=torch.float64, device=a.device)  # an unread LSE (never an op input)
    row_lse = dummy64 if row_lse is None else row_lse.to(torch.float64).contiguous()
    col_lse = dummy64 if col_lse is None else col_lse.to(torch.float64).contiguous()
    grad_a, part = _grad_launch(a, b, scale, bias, row_lse, col_lse, pos_offset, (w_row, w_col, w_pos), g_scale,
                                sigmoid, has_col, need_grad, transposed=False)
    totals = part.sum(dim=1)
    loss = totals[0].clone()
    if not need_grad:
        return loss, None, None, None, None
    grad_b, _ = _grad_launch(b, a, scale, bias, col_lse, row_lse, -int(pos_offset), (w_row, w_col, w_pos),
                             g_scale, sigmoid, has_col, need_grad, transposed=True)
    return loss, grad_a, grad_b, totals[1].clone(), totals[2].clone()


# ---------------------------------------------------------------------------------------- contract
def softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows):
    check_fused_inputs(a, b)
    _, grad_a, grad_b, grad_scale, grad_bias = _gradients(
        a, b, scale, bias, row_lse, col_lse, w_row, w_col, w_pos, pos_offset, sigmoid=False, need_grad=True)
    return grad_a, grad_b, grad_scale, grad_bias


def softmax_fused(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes):
    row_lse, col_lse, pos_logit = lse_stats(a, b, scale, bias, pos_offset, chunk_rows)
    col_lse[:pos_offset] = float("inf")
    col_lse[pos_offset + a.shape[0]:] = float("inf")
    grads = softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows)
    return (row_lse, col_lse, pos_logit) + grads


def sigmoid_fused(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad):
    check_fused_inputs(a, b)
    return _gradients(a, b, scale, bias, None, None, w, 0.0, 0.0, pos_offset, sigmoid=True,
                      need_grad=bool(need_grad))


# ------------------------------------------------------------------------------------ compile gate
def compile_specs():
    """Every (kernel, constexpr flags, shipped launch config) of this module for each supported
    dtype, as dicts for ``triton.compile(ASTSource(...))`` (used by tests/test_triton_compile.py); the
    ``FUSED_CONFIGS["target", ...]`` entries are ``fused_target.compile_specs``'."""
    tri = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    specs = []
    for (kernel, cls, bd), cfg in FUSED_CONFIGS.items():
        if kernel == "target":
            continue  # fused_target.compile_specs
        dtypes = ("float32",) if cls == "float32" else ("bfloat16", "float16")
        for dtype in dtypes:
            p = "*" + tri[dtype]
            prec = FUSED_FP32_PRECISION if dtype == "float32" else "ieee"
            common = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_D": bd,
                      "BLOCK_K": min(bd, cfg.block_k or bd),
                      "INPUT_PRECISION": prec, "stride_ad": 1, "stride_bd": 1}
            if kernel == "lse":
                fn = _fused_lse_kernel
                sig = {"a_ptr": p, "b_ptr": p, "scale_ptr": "*fp32", "bias_ptr": "*fp32",
                       "row_part_ptr": "*fp64", "col_part_ptr": "*fp64", "pos_logit_ptr": "*fp32",
                       "Na": "i32", "Nb": "i32", "D": "i32", "tiles_per_group": "i32", "tiles_per_split": "i32",
                       "pos_offset": "i32",
                       "stride_am": "i32", "stride_ad": "constexpr", "stride_bn": "i32", "stride_bd": "constexpr",
                       "stride_rp": "i32", "stride_cp": "i32"}
                variants = [("", {})]
            else:
                fn = _fused_grad_kernel
                sig = {"x_ptr": p, "y_ptr": p, "scale_ptr": "*fp32", "bias_ptr": "*fp32",
                       "own_lse_ptr": "*fp64", "other_lse_ptr": "*fp64", "grad_ptr": "*fp32", "part_ptr": "*fp32",
                       "Nx": "i32", "Ny": "i32", "D": "i32", "tiles_per_split": "i32", "pos_offset": "i32",
                       "stride_xm": "i32", "stride_xd": "constexpr", "stride_yn": "i32", "stride_yd": "constexpr",
                       "stride_gs": "i32", "stride_gm": "i32",
                       "w_row": "fp32", "w_col": "fp32", "w_pos": "fp32", "g_scale": "fp32"}
                cols = kernel == "cols"  # the transposed launch: its own block is the config's block_n
                common = {"BLOCK_M": cfg.block_n if cols else cfg.block_m,
                          "BLOCK_N": cfg.block_m if cols else cfg.block_n, "BLOCK_D": bd,
                          "BLOCK_K": min(bd, cfg.block_k or bd), "INPUT_PRECISION": prec, "stride_xd": 1,
                          "stride_yd": 1, "TRANSPOSED": cols}
                variants = [
                    ("softmax", {"SIGMOID": False, "HAS_COL_TERM": True, "NEED_GRAD": True}),
                    ("softmax,row-only", {"SIGMOID": False, "HAS_COL_TERM": False, "NEED_GRAD": True}),
                    ("sigmoid", {"SIGMOID": True, "HAS_COL_TERM": False, "NEED_GRAD": True}),
                ] + ([] if cols else [("sigmoid,loss-only", {"SIGMOID": True, "HAS_COL_TERM": False,
                                                             "NEED_GRAD": False})])
            for vname, flags in variants:
                consts = dict(common, **flags)
                full_sig = dict(sig)
                for k in consts:
                    full_sig[k] = "constexpr"
                label = f"fused_{kernel}[{vname}]" if vname else f"fused_{kernel}"
                specs.append(dict(name=label, fn=fn, signature=full_sig, constexprs=consts,
                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, uses_dot=True,
                                  dtype=dtype, config=cfg, block_d=bd))
    return specs
