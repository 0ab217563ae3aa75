"""The general target (``fastcon/targets/``) on the fused tile kernels (D <= 256): the
``"triton_fused"`` backend's ``target_stats``, ``target_grad`` and ``target_softmax_fused``
(re-exported by ``fused.py``).

* pass 1 is ``target.target_stats_kernel`` with the matmul producer (``tiles.dot_tile`` forming
  each tile with tl.dot) at ``FUSED_CONFIGS["target", …]``, so no logit goes to memory;
* ``_fused_target_rows_kernel``: grid (row blocks × column splits). Forms each tile with the same
  producer and blocks, the target's decisions (``tiles.target_tile``) and G
  (``tiles.target_grad_tile``), and accumulates ``G·B`` in registers, with partials of Σ G·dot and Σ G;
* ``_fused_target_cols_kernel``: grid (column blocks × row splits). Forms the same tiles in the same
  orientation and accumulates ``Gᵀ·A`` (the transposed tile fed to tl.dot).

Both passes form a tile with the same blocks and K order, so pass 2 sees bitwise pass 1's logits (a
confident positive's P − 1 needs the identical logit), and G never leaves registers. Soft targets
read the teacher's tile from its fp32 chunk of dot products (cuBLAS, row chunks within
``chunk_bytes``), whose pass runs on that producer (``target.teacher_stats``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import chunk_bytes, row_chunks
from . import launch
from .configs import FUSED_CONFIGS, FUSED_FP32_PRECISION, fused_block_d, fused_config
from .margin import margin_bounds, pair_dots_kernel
from .plan import TargetTiles, check_fused_inputs, dot_precision, dtype_name, matmul_stats_rows, split_tiles
from .target import GradVectors, PackedTarget, target_signature, target_stats_kernel, teacher_stats, variant
from .target import target_stats as epilogue_target_stats
from .tiles import (NUM_G_SCALE, TERM_SOFT, column_tile, dot_tile, grad_row_vectors, margin_tile, row_bounds,
                    target_grad_tile, target_items, target_tile, target_work_item, teacher_dot_tile, teacher_rows)


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _fused_target_rows_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr, dense_ptr,
    bound_ptr, tdot_ptr, row_vec_ptr, col_vec_ptr, numbers_ptr, grad_a_ptr, part_ptr,
    R, W, D, col0, tiles_per_split, stride_dense,
    RULES: tl.constexpr, TERMS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2 of the general target, rows: program (m, s) of a chunk of R rows (a_ptr) × W columns
    (b_ptr) forms each tile of dot products as pass 1 did (``tiles.dot_tile``, same blocks), its G
    (``tiles.target_tile`` → ``tiles.target_grad_tile``) and accumulates ``G·B`` in a BLOCK_M ×
    BLOCK_D fp32 accumulator: grad_a[s, rows, D slice] = s·Σ_j G_ij·B_j (grad_a: splits × R × D) over
    D slice ``program_id // n_items`` of BLOCK_D features (each slice forms the tiles again);
    part[0, p] = Σ G·dot, part[1, p] = Σ G (slice 0). G never leaves registers. Soft targets read the
    teacher's tile from its chunk of dot products (tdot, fp32, R × W)."""
    n_items = target_items(R, W, tiles_per_split, BLOCK_M, BLOCK_N)
    item = tl.program_id(0) % n_items
    d_slice = tl.program_id(0) // n_items
    pid_m, pid_s, offs_m, mask_m, bound, scale, bias, t0, t1 = target_work_item(
        item, scale_ptr, bias_ptr, bound_ptr, R, W, tiles_per_split, RULES, BLOCK_M, BLOCK_N)
    row_hi, row_lo, qp, qk, mass = grad_row_vectors(row_vec_ptr, offs_m, mask_m, TERMS)
    t_scale, t_row_hi, t_row_lo = teacher_rows(numbers_ptr, row_vec_ptr, offs_m, mask_m, TERMS)
    g_scale = tl.load(numbers_ptr + NUM_G_SCALE)
    offs_d = d_slice * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_gd = tl.zeros([BLOCK_M], tl.float32)
    acc_g = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(t0, t1):
        offs_n, mask_n, d = column_tile(ct, a_ptr, 0, a_ptr, D, b_ptr, D, D, offs_m, mask_m, W,
                                        True, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        g_m = margin_tile(d, tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, RULES)
        keep, pos, t = target_tile(d, g_m, offs_m, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                   row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, numbers_ptr, bound, scale, bias,
                                   RULES)
        q_row, q_col = t, t  # (unused without TERM_SOFT)
        if TERM_SOFT & TERMS:
            q_row, q_col = teacher_dot_tile(tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, keep, numbers_ptr,
                                             col_vec_ptr, t_scale, t_row_hi, t_row_lo, TERMS)
        g = target_grad_tile(t, keep, pos, row_hi, row_lo, qp, qk, mass, q_row, q_col, offs_n, mask_n, col_vec_ptr,
                             numbers_ptr, TERMS)
        acc_gd += tl.sum(g * d, 1)
        acc_g += tl.sum(g, 1)
        bt = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :],
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        # G lifted by the power of two g_scale before its cast (fp16 keeps its bits), undone below
        acc = tl.dot((g * g_scale).to(bt.dtype), bt, acc, input_precision=INPUT_PRECISION)
    out = grad_a_ptr + pid_s * R * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(out, acc * (scale / g_scale), mask=mask_m[:, None] & mask_d[None, :])
    if d_slice == 0:
        tl.store(part_ptr + item, tl.sum(acc_gd, 0))
        tl.store(part_ptr + n_items + item, tl.sum(acc_g, 0))


@triton.jit
def _fused_target_cols_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr, dense_ptr,
    bound_ptr, tdot_ptr, row_vec_ptr, col_vec_ptr, numbers_ptr, grad_b_ptr,
    R, W, D, col0, tiles_per_split, stride_dense,
    RULES: tl.constexpr, TERMS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Pass 2 of the general target, columns: program (n, s) takes column block n of the chunk and the
    row tiles of split s, forms each tile of dot products in the rows kernel's orientation and blocks
    (so G is bitwise the rows kernel's) and accumulates ``Gᵀ·A`` in a BLOCK_N × BLOCK_D fp32
    accumulator: grad_b[s, cols, D slice] = s·Σ_i G_ij·A_i (grad_b: splits × W × D), D sliced as in
    the rows kernel."""
    n_blocks = tl.cdiv(W, BLOCK_N)
    n_items = n_blocks * tl.cdiv(tl.cdiv(R, BLOCK_M), tiles_per_split)
    item = tl.program_id(0) % n_items
    d_slice = tl.program_id(0) // n_items
    wide = tl.zeros([], tl.int64)
    pid_n = item % n_blocks + wide
    pid_s = item // n_blocks + wide
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    g_scale = tl.load(numbers_ptr + NUM_G_SCALE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < W
    offs_d = d_slice * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    rt0 = pid_s * tiles_per_split
    rt1 = tl.minimum(rt0 + tiles_per_split, tl.cdiv(R, BLOCK_M))
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for rt in range(rt0, rt1):
        offs_m = (rt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < R
        bound = row_bounds(bound_ptr, offs_m, mask_m, RULES, BLOCK_M)
        d = dot_tile(a_ptr, 0, a_ptr, D, b_ptr, D, D, offs_m, offs_n, mask_m, mask_n,
                     True, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        g_m = margin_tile(d, tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, RULES)
        keep, pos, t = target_tile(d, g_m, offs_m, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                   row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, numbers_ptr, bound, scale,
                                   bias, RULES)
        row_hi, row_lo, qp, qk, mass = grad_row_vectors(row_vec_ptr, offs_m, mask_m, TERMS)
        q_row, q_col = t, t  # (unused without TERM_SOFT)
        if TERM_SOFT & TERMS:
            t_scale, t_row_hi, t_row_lo = teacher_rows(numbers_ptr, row_vec_ptr, offs_m, mask_m, TERMS)
            q_row, q_col = teacher_dot_tile(tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, keep, numbers_ptr,
                                             col_vec_ptr, t_scale, t_row_hi, t_row_lo, TERMS)
        g = target_grad_tile(t, keep, pos, row_hi, row_lo, qp, qk, mass, q_row, q_col, offs_n, mask_n, col_vec_ptr,
                             numbers_ptr, TERMS)
        at = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(tl.trans((g * g_scale).to(at.dtype)), at, acc, input_precision=INPUT_PRECISION)
    out = grad_b_ptr + pid_s * W * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(out, acc * (scale / g_scale), mask=mask_n[:, None] & mask_d[None, :])


# ------------------------------------------------------------------------------------------- host
def _target_tiles(a, target):
    """The producer of this path's general-target tiles (``plan.TargetTiles`` at its configuration)."""
    cfg, _ = fused_config("target", dtype_name(a), a.shape[1])
    return TargetTiles(a, target, "target_stats", cfg=cfg)


def target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None):
    """Pass 1 of the general target (the contract of ``torch_chunked.target_stats``) on
    ``target.target_stats_kernel``; D <= 256."""
    check_fused_inputs(a, b)
    return epilogue_target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, 0, teacher,
                                 tiles=_target_tiles(a, target))


def target_grad(a, b, scale, bias, target, weights, chunk_rows, cached=()):
    """Pass 2 of the general target (the contract of ``torch_chunked.target_grad``): grad_a = s·G·B and
    grad_b = s·Gᵀ·A with G formed in the kernels' registers, and Σ G·dot, Σ G. Row chunks of
    ``chunk_rows`` (with soft targets also within ``chunk_bytes``: the teacher's chunk is in memory)."""
    from ...targets import column_span

    check_fused_inputs(a, b)
    a, b = a.contiguous(), b.contiguous()  # (the kernels take rows D apart)
    na, nb, d = a.shape[0], b.shape[0], a.shape[1]
    dev = a.device
    packed = PackedTarget(target, na, nb, dev)
    tiles = _target_tiles(a, target)
    cfg = tiles.cfg
    slice_d = cfg.block_d or fused_block_d(d)  # the accumulators' width: D in slices of it, the tiles formed per slice
    d_slices = triton.cdiv(d, slice_d)
    f32 = torch.float32
    vec = GradVectors(a, target, weights, nb)
    tch = vec.tch
    grad_a = torch.zeros(a.shape, dtype=f32, device=dev)
    grad_b = torch.zeros(b.shape, dtype=f32, device=dev)
    totals = torch.zeros(2, dtype=torch.float64, device=dev)
    # with soft targets the teacher's chunks within the budget, in pass 1's row chunks
    rows = (matmul_stats_rows(target, na, nb, chunk_rows, chunk_bytes(dev), a.dtype, vec.symmetric, cfg)
            if target.soft or tch.guide else max(1, min(na, chunk_rows)))
    blocks = dict(INPUT_PRECISION=dot_precision(a), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  BLOCK_D=slice_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    for r0, r1 in row_chunks(na, rows):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        r, w = r1 - r0, c1 - c0
        tdot = tch.chunk(r0, r1, c0, c1)
        bound = margin_bounds(tiles, target, a, b, None, tdot, r0, r1, c0, c1)
        common = dict(a_ptr=a[r0:r1], b_ptr=b[c0:c1], scale_ptr=scale, bias_ptr=bias, bound_ptr=bound,
                      tdot_ptr=tdot, R=r, W=w, D=d, col0=c0, **packed.kwargs(r0, r1),
                      **vec.kwargs(r0, r1, c0, c1), **blocks)
        m_blocks, n_ct = triton.cdiv(r, cfg.block_m), triton.cdiv(w, cfg.block_n)
        splits, per_split = split_tiles(n_ct, m_blocks, dev)
        n_items = m_blocks * splits
        ga = torch.empty((splits, r, d), dtype=f32, device=dev)
        part = torch.empty((2, n_items), dtype=f32, device=dev)
        launch(_fused_target_rows_kernel)[(n_items * d_slices,)](grad_a_ptr=ga, part_ptr=part,
                                                                 tiles_per_split=per_split, **common)
        grad_a[r0:r1] = ga.sum(dim=0)
        totals += part.double().sum(dim=1)
        n_blocks, m_rt = triton.cdiv(w, cfg.block_n), triton.cdiv(r, cfg.block_m)
        splits, per_split = split_tiles(m_rt, n_blocks, dev)
        gb = torch.empty((splits, w, d), dtype=f32, device=dev)
        launch(_fused_target_cols_kernel)[(n_blocks * splits * d_slices,)](grad_b_ptr=gb, tiles_per_split=per_split,
                                                                           **common)
        grad_b[c0:c1] += gb.sum(dim=0)
    return grad_a, grad_b, totals[0].float(), totals[1].float()


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    """Softmax loss of a general target and its gradients on the fused tile kernels
    (``targets.two_pass_target`` over ``target_stats`` and ``target_grad``); D <= 256."""
    from ...targets import two_pass_target

    check_fused_inputs(a, b)  # before the teacher's pass, which runs on any D
    return two_pass_target(target_stats, target_grad, a, b, scale, bias, target, eps, symmetric, chunk_rows,
                           need_grad, 0, teacher_pass=teacher_stats)


# ------------------------------------------------------------------------------------ compile gate
def compile_specs():
    """Every (kernel, constexprs, launch config) of the general target on this path, as dicts for
    ``triton.compile(ASTSource(...))`` (used by tests/test_triton_compile.py): pass 1
    (``target.target_stats_kernel`` with the matmul producer and the teacher's tiles from memory), the
    margin's pair kernel, and pass 2's rows and columns kernels, once per distinct kernel of the
    ``FUSED_CONFIGS["target", ...]`` entries (entries that share blocks and accumulator width compile
    to the same kernels): every variant in bfloat16, the heaviest (all pair rules, symmetric; smoothing
    in pass 1; a softmax teacher with the targets' entropy) in float16 (the same kernels but for the
    operands' type) and float32 (TF32x3, the interpreter's dtype)."""
    tri = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    none = dict(HAS_MARGIN=False, HAS_PENALTY=False, PENALTY_MODE=0, HAS_DENSE=False)
    everything = dict(HAS_MARGIN=True, HAS_PENALTY=True, PENALTY_MODE=1, HAS_DENSE=True)
    rules = dict(everything, HAS_MARGIN=False)
    hard = dict(SOFT=False, TEACHER_LINEAR=False)
    soft_max = dict(SOFT=True, TEACHER_LINEAR=False)
    soft_lin = dict(SOFT=True, TEACHER_LINEAR=True)
    # (pair rules, symmetric, soft, mass)
    grad_heavy = [(everything, True, hard, False), (rules, True, soft_max, False)]
    guided = dict(none, HAS_MARGIN=True, HAS_GUIDE=True)  # GISTEmbed: the margin on the guide's chunk
    grad_variants = grad_heavy + [(rules, False, hard, True), (none, True, soft_max, False),
                                  (none, True, soft_lin, True), (guided, False, hard, False)]
    # (pair rules, symmetric, smoothing, soft, entropy)
    stats_heavy = [(everything, True, True, hard, False), (rules, True, True, soft_max, True)]
    stats_variants = stats_heavy + [(dict(none, HAS_MARGIN=True), False, False, hard, False),
                                    (none, True, False, soft_max, True), (none, True, False, soft_lin, False),
                                    (guided, False, False, hard, False)]
    specs, seen = [], set()

    def add(name, fn, features, consts, cfg, dtype, bd):
        specs.append(dict(name=name, fn=fn, signature=target_signature(fn, consts, features), constexprs=consts,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, uses_dot=True, dtype=dtype,
                          config=cfg, block_d=bd, divisible=("D", "R", "W"), pipelined=True,
                          wgmma_required=dtype != "float32"))

    def tag(rules_, sym, soft, extra=""):
        out = ",".join(k for k, v in rules_.items() if v and k != "PENALTY_MODE") or "plain"
        out += f",sym={sym}{extra}"
        if soft["SOFT"]:
            out += ",soft=" + ("linear" if soft["TEACHER_LINEAR"] else "softmax")
        return out

    for (kernel, cls, bd), cfg in FUSED_CONFIGS.items():
        if kernel != "target":
            continue
        for dtype in (("float32",) if cls == "float32" else ("bfloat16", "float16")):
            width = cfg.block_d or bd
            key = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.block_k, dtype)
            if (key, width) in seen:
                continue
            op = "*" + tri[dtype]
            prec = FUSED_FP32_PRECISION if dtype == "float32" else "ieee"
            blocks = dict(INPUT_PRECISION=prec, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
            every = dtype == "bfloat16"
            for rules_, sym, soft, mass in (grad_variants if every else grad_heavy):
                consts = dict(variant(SYMMETRIC=sym, **rules_, **soft, HAS_MASS=mass), **blocks, BLOCK_D=width)
                name = tag(rules_, sym, soft) + (",mass" if mass else "")
                add(f"fused_target_rows[{name}]", _fused_target_rows_kernel, op, consts, cfg, dtype, width)
                add(f"fused_target_cols[{name}]", _fused_target_cols_kernel, op, consts, cfg, dtype, width)
            seen.add((key, width))
            if key in seen:
                continue
            seen.add(key)
            for rules_, sym, smooth, soft, entropy in (stats_variants if every else stats_heavy):
                consts = dict(variant(SYMMETRIC=sym, SMOOTHING=smooth, **rules_, **soft, ENTROPY=entropy), MATMUL=True,
                              **blocks)
                name = tag(rules_, sym, soft, f",smooth={smooth}") + (",entropy" if entropy else "")
                add(f"fused_target_stats[{name}]", target_stats_kernel, op, consts, cfg, dtype, bd)
            add("fused_target_pair_dots", pair_dots_kernel, op, dict(blocks), cfg, dtype, bd)
    return specs
