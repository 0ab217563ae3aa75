"""The engine's general target (``fastcon/kernels/targets.py``) on the Triton epilogues: their kernels,
launchers and host classes, and the pass-1 kernel the fused path shares (``target_stats_kernel``).

The epilogue kernels take tiles of dot products from either producer (``plan.producer``): the cuBLAS
producer, ``torch.mm`` writing each row chunk of dot products (over the columns some row of the chunk
keeps) that the kernels read once per pass, or the matmul producer, the kernels forming each tile
with ``tl.dot`` from the features (``tiles.dot_tile``), persistent over their work items. The
target's decisions on a tile are ``tiles.target_tile`` (which pairs are kept, which are positives,
their logits with the hardness penalty); around it:

* ``target_stats_kernel``: per row (and, for a symmetric loss, per row block of each column) the
  LSE over the kept pairs as float64 partials (merged by ``plan.merge_lse``), and the number of
  positives and their summed logits (with label smoothing also of the kept pairs);
* ``_target_grad_kernel``: ``G = w_row·(P_row − Q_row) + w_col·(P_col − Q_col)`` on the kept pairs
  (``tiles.target_grad_tile``), stored in place (fp32) or in a bf16/fp16 buffer for the gradient
  GEMMs, and per-program partials of ``Σ G·dot`` and ``Σ G``.

Soft targets (distillation, ``Target.soft``): ``torch.mm`` writes the teacher's chunk of dot products
``A_t·B_tᵀ`` whatever the student's producer, and ``tiles.teacher_tile`` turns a tile of it into the
teacher's row and column target probabilities with the normalisers of the teacher's own pass
(``targets.TeacherNorms``, from ``teacher_stats`` on the same cuBLAS chunks). Pass 1 adds the cross
terms ``Σ Qt·S`` and, with ``entropy``, the mixed targets' ``Σ Q·log Q`` to its per-row and
per-column sums; pass 2 forms ``G = w·(P·mass − Q_hard − ε/|K| − soft·Qt)`` per direction.

The kernels read the target's columns of its wire format (``kernels.wire``, as ``PackedTarget``
lays them out for ``tiles.target_tile``), the defaults of absent fields filled in; the margin enters
as each row's bound ``A_i·B_pair − margin``, from the chunk of dot products or the producer's own tiles. Semantics and
results match ``torch_chunked`` (to fp32 rounding); the loss and the weights between the passes are
``targets.loss_and_weights``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import chunk_bytes, mm_acc, row_chunks
from . import launch
from ..wire import COL_ID, COL_KEEP, COL_OWNER, COL_PENALTY, ROW_EXCLUDE, ROW_HI, ROW_ID, ROW_LO, ROW_OWNER, \
    ROW_PENALTY, ROW_RULE, pack
from .configs import FUSED_FP32_PRECISION, SUPPORTED_DTYPES, chunked_config, matmul_config
from .gemm import grad_buffer, grad_gemms, grad_tile_scale
from .plan import (TargetTiles, check_inputs, matmul_plan, matmul_stats_rows, memory_rows, merge_lse, work_items)
from .tiles import (column_tile, dot_tile, grad_row_vectors, items_end, items_step, lse64, online_row_lse,
                    target_grad_tile, target_tile, target_work_item, teacher_dot_tile, teacher_rows, tile_lse_parts)



# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _xlogx(x):
    """x·log(x), 0 at x = 0 (torch.xlogy(x, x))."""
    zero = x == 0.0
    return tl.where(zero, 0.0, x * tl.log(tl.where(zero, 1.0, x)))


@triton.jit
def target_stats_kernel(
    dot_ptr, a_ptr, b_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr, dense_ptr,
    bound_ptr, tdot_ptr, t_scale_ptr, t_row_ptr, t_col_ptr, t_row_hw_ptr, t_col_hw_ptr,
    row_part_ptr, row_sums_ptr, col_part_ptr, col_sums_ptr,
    R, W, D, row0, col0, m_blocks, n_items, tiles_per_split,
    stride_dm, stride_am, stride_bn, stride_tm, stride_dense, stride_rp, stride_rs,
    stride_cp, stride_cs, penalty, t_c0, t_c1, soft,
    SYMMETRIC: tl.constexpr, SMOOTHING: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_PENALTY: tl.constexpr,
    PENALTY_MODE: tl.constexpr, HAS_DENSE: tl.constexpr, SOFT: tl.constexpr, ENTROPY: tl.constexpr,
    TEACHER_LINEAR: tl.constexpr, MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, s): rows [m·BM, (m+1)·BM) of the chunk × the column tiles of split s. Writes
    row_part[s, rows] (float64 LSE over the split's kept pairs), row_sums[s, k, rows] (k = 0: number
    of positives, 1: their summed logits, 2 and 3 the same of the kept pairs with SMOOTHING) and, when
    SYMMETRIC, col_part[m, cols] and col_sums[m, k, cols], the same per column over the row block.
    With SOFT (the teacher's chunk of dot products at tdot, its normalisers of the chunk's rows at t_row
    and of its columns at t_col, float64; its scale at t_scale_ptr), k = 4: the cross term Σ Qt·S over
    the kept pairs and, with ENTROPY, k = 5: Σ xlogy(mix, mix) of mix = soft·Qt + [pos]·hw, hw the
    hard weight of each row (t_row_hw) or column (t_col_hw) per positive. The student's tiles of dot
    products come from ``tiles.dot_tile``: its chunk in memory, or with MATMUL formed here from the
    features (a_ptr, b_ptr, D wide), the programs then taking the work items in turn (persistent); the
    teacher's are always read from its chunk (``teacher_dot_tile``)."""
    for item in range(tl.program_id(0), items_end(n_items, MATMUL), items_step(MATMUL)):
        pid_m, pid_s, offs_m, mask_m, rows, bound, scale, bias, t0, t1 = target_work_item(
            item, m_blocks, scale_ptr, bias_ptr, bound_ptr, R, W, row0, tiles_per_split, HAS_MARGIN, BLOCK_M, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        r_i = tl.zeros([BLOCK_M], tl.float32)
        n_pos = tl.zeros([BLOCK_M], tl.float32)
        s_pos = tl.zeros([BLOCK_M], tl.float32)
        n_keep = tl.zeros([BLOCK_M], tl.float32)
        s_keep = tl.zeros([BLOCK_M], tl.float32)
        x_row = tl.zeros([BLOCK_M], tl.float32)
        e_row = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m,
                                           mask_m, W, MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            keep, pos, t = target_tile(d, rows, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                       row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, bound, scale, bias, penalty,
                                       HAS_MARGIN, HAS_PENALTY, PENALTY_MODE, HAS_DENSE)
            t = tl.where(keep, t, float("-inf"))
            m_i, r_i = online_row_lse(m_i, r_i, t)
            t_pos = tl.where(pos, t, 0.0)
            n_pos += tl.sum(pos.to(tl.float32), 1)
            s_pos += tl.sum(t_pos, 1)
            t_keep = tl.where(keep, t, 0.0)
            if SMOOTHING:
                n_keep += tl.sum(keep.to(tl.float32), 1)
                s_keep += tl.sum(t_keep, 1)
            if SYMMETRIC:
                c_m, c_r = tile_lse_parts(t, 0)
                tl.store(col_part_ptr + pid_m * stride_cp + offs_n, lse64(c_m, c_r), mask=mask_n)
                base = col_sums_ptr + pid_m * stride_cs + offs_n
                tl.store(base, tl.sum(pos.to(tl.float32), 0), mask=mask_n)
                tl.store(base + W, tl.sum(t_pos, 0), mask=mask_n)
                if SMOOTHING:
                    tl.store(base + 2 * W, tl.sum(keep.to(tl.float32), 0), mask=mask_n)
                    tl.store(base + 3 * W, tl.sum(t_keep, 0), mask=mask_n)
            if SOFT:
                # the teacher's terms last (its row vectors and scale read per tile, from L1: fewer live registers)
                t_scale, t_row_hi, t_row_lo = teacher_rows(t_scale_ptr, t_row_ptr, offs_m, mask_m, SOFT,
                                                            TEACHER_LINEAR)
                q_row, q_col = teacher_dot_tile(tdot_ptr, stride_tm, offs_m, offs_n, mask_m, mask_n, keep, t_col_ptr,
                                                 t_scale, t_c0, t_c1, t_row_hi, t_row_lo, TEACHER_LINEAR, SYMMETRIC)
                x_row += tl.sum(q_row * t_keep, 1)
                if ENTROPY:
                    hw_row = tl.load(t_row_hw_ptr + offs_m, mask=mask_m, other=0.0)
                    mix = q_row * soft + tl.where(pos, hw_row[:, None], 0.0)
                    e_row += tl.sum(_xlogx(mix), 1)
                if SYMMETRIC:
                    base = col_sums_ptr + pid_m * stride_cs + offs_n
                    tl.store(base + 4 * W, tl.sum(q_col * t_keep, 0), mask=mask_n)
                    if ENTROPY:
                        hw_col = tl.load(t_col_hw_ptr + offs_n, mask=mask_n, other=0.0)
                        mix = q_col * soft + tl.where(pos, hw_col[None, :], 0.0)
                        tl.store(base + 5 * W, tl.sum(_xlogx(mix), 0), mask=mask_n)
        tl.store(row_part_ptr + pid_s * stride_rp + offs_m, lse64(m_i, r_i), mask=mask_m)
        base = row_sums_ptr + pid_s * stride_rs + offs_m
        tl.store(base, n_pos, mask=mask_m)
        tl.store(base + R, s_pos, mask=mask_m)
        if SMOOTHING:
            tl.store(base + 2 * R, n_keep, mask=mask_m)
            tl.store(base + 3 * R, s_keep, mask=mask_m)
        if SOFT:
            tl.store(base + 4 * R, x_row, mask=mask_m)
            if ENTROPY:
                tl.store(base + 5 * R, e_row, mask=mask_m)


@triton.jit
def _target_grad_kernel(
    dot_ptr, a_ptr, b_ptr, g_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr,
    dense_ptr, bound_ptr, row_lse_ptr, q_row_pos_ptr, q_row_keep_ptr, col_lse_ptr, q_col_pos_ptr, q_col_keep_ptr,
    w_col_ptr, tdot_ptr, t_scale_ptr, t_row_ptr, t_col_ptr, row_mass_ptr, col_mass_ptr, part_ptr,
    R, W, D, row0, col0, m_blocks, n_items, tiles_per_split,
    stride_dm, stride_am, stride_bn, stride_gm, stride_tm, stride_dense,
    penalty, w_row, g_scale, t_c0, t_c1, soft,
    SYMMETRIC: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_PENALTY: tl.constexpr, PENALTY_MODE: tl.constexpr,
    HAS_DENSE: tl.constexpr, SOFT: tl.constexpr, TEACHER_LINEAR: tl.constexpr, HAS_MASS: tl.constexpr,
    MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G of program (m, s)'s tiles on the kept pairs (0 elsewhere):
    ``w_row·(exp(t − row_lse) − q_row_pos·[pos] − q_row_keep) [+ w_col·(exp(t − col_lse) − q_col_pos·[pos]
    − q_col_keep)]``, the float64 LSEs split into fp32 (hi, lo), ``exp(x) − q`` at a positive with
    q > ½ formed as ``expm1(x) + (1 − q)``. With SOFT each direction also subtracts ``soft·Qt`` (the
    teacher's probabilities of its chunk of dot products at tdot, ``teacher_tile``) and with HAS_MASS its
    softmax term is ``mass·exp(x)`` (at such a positive ``mass·expm1(x) + (mass − q)``), the row's mass
    at row_mass, the column's at col_mass. G·g_scale is stored to g_ptr (which may alias dot_ptr: each
    element is read before the same program writes it); part[0, p] = Σ G·dot, part[1, p] = Σ G
    (unscaled), p the work item. The tiles come from ``tiles.dot_tile`` as in
    ``target_stats_kernel``."""
    for item in range(tl.program_id(0), items_end(n_items, MATMUL), items_step(MATMUL)):
        pid_m, pid_s, offs_m, mask_m, rows, bound, scale, bias, t0, t1 = target_work_item(
            item, m_blocks, scale_ptr, bias_ptr, bound_ptr, R, W, row0, tiles_per_split, HAS_MARGIN, BLOCK_M, BLOCK_N)
        row_hi, row_lo, qp, qk, mass = grad_row_vectors(row_lse_ptr, q_row_pos_ptr, q_row_keep_ptr, row_mass_ptr,
                                                        offs_m, mask_m, HAS_MASS)
        t_scale, t_row_hi, t_row_lo = teacher_rows(t_scale_ptr, t_row_ptr, offs_m, mask_m, SOFT, TEACHER_LINEAR)
        acc_gd = tl.zeros([BLOCK_M], tl.float32)
        acc_g = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, stride_dm, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m,
                                           mask_m, W, MATMUL, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            mask = mask_m[:, None] & mask_n[None, :]
            keep, pos, t = target_tile(d, rows, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                       row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, bound, scale, bias, penalty,
                                       HAS_MARGIN, HAS_PENALTY, PENALTY_MODE, HAS_DENSE)
            q_row, q_col = t, t  # (unused without SOFT)
            if SOFT:
                q_row, q_col = teacher_dot_tile(tdot_ptr, stride_tm, offs_m, offs_n, mask_m, mask_n, keep, t_col_ptr,
                                                 t_scale, t_c0, t_c1, t_row_hi, t_row_lo, TEACHER_LINEAR, SYMMETRIC)
            g = target_grad_tile(t, keep, pos, row_hi, row_lo, qp, qk, mass, q_row, q_col, offs_n, mask_n,
                                 col_lse_ptr, q_col_pos_ptr, q_col_keep_ptr, w_col_ptr, col_mass_ptr, w_row, soft,
                                 SYMMETRIC, SOFT, HAS_MASS)
            acc_gd += tl.sum(g * d, 1)
            acc_g += tl.sum(g, 1)
            tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], (g * g_scale).to(g_ptr.dtype.element_ty),
                     mask=mask)
        tl.store(part_ptr + item, tl.sum(acc_gd, 0))
        tl.store(part_ptr + n_items + item, tl.sum(acc_g, 0))


@triton.jit
def pair_dots_kernel(a_ptr, b_ptr, out_ptr, R, W, D, pair_col0, stride_am, stride_bn,
                      INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """out[i] = A_i·B_(i + pair_col0) for the R rows of a chunk over W columns (local indices), for the
    margin rule of the matmul producer: taken from ``tiles.dot_tile``'s tiles at the epilogue kernels'
    alignment (row blocks and column tiles at multiples of BLOCK_M, BLOCK_N), so that each value is
    bitwise the logit the epilogues compare with it."""
    pid = tl.program_id(0)
    offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < R
    target = offs_m + pair_col0
    first = pid * BLOCK_M + pair_col0
    t0 = tl.maximum(first, 0) // BLOCK_N
    t1 = tl.minimum(tl.cdiv(first + BLOCK_M, BLOCK_N), tl.cdiv(W, BLOCK_N))
    acc = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(t0, t1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < W
        d = dot_tile(a_ptr, stride_am, a_ptr, stride_am, b_ptr, stride_bn, D, offs_m, offs_n, mask_m, mask_n,
                     True, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        acc += tl.sum(tl.where(offs_n[None, :] == target[:, None], d, 0.0), 1)
    tl.store(out_ptr + offs_m, acc, mask=mask_m)


# ------------------------------------------------------------------------------------------ host side
class PackedTarget:
    """The target's vectors as the kernels read them (defaults of absent fields filled in)."""

    def __init__(self, target, na: int, nb: int, device):
        if target.penalty_mode != 0 and (target.row_owner is None or target.col_owner is None):
            raise ValueError("a hardness penalty by ownership needs row_owner and col_owner")
        wired = pack(target, na, nb)
        rows, cols = wired.rows.to(device), wired.cols.to(device)
        # the wire's columns as tiles.target_tile reads them: int64 per row (id, excluded column, range
        # lo, range hi, owner, own rule) and per column (id, owner), the 0/1 flags as uint8
        self.row = rows[:, [ROW_ID, ROW_EXCLUDE, ROW_LO, ROW_HI, ROW_OWNER, ROW_RULE]].contiguous()
        self.col = cols[:, [COL_ID, COL_OWNER]].contiguous()
        self.row_flag = rows[:, ROW_PENALTY].to(torch.uint8).contiguous()
        self.col_flag = cols[:, [COL_KEEP, COL_PENALTY]].to(torch.uint8).contiguous()
        self.dense = (target.mask.to(torch.uint8).contiguous() if target.mask is not None
                      else torch.zeros((1, 1), dtype=torch.uint8, device=device))
        self.has_dense = target.mask is not None
        self.has_margin = target.margin is not None
        self.has_penalty = target.penalty != 0.0
        self.penalty = float(target.penalty)
        self.penalty_mode = int(target.penalty_mode) if self.has_penalty else 0

    def kwargs(self):
        """The target's arguments of a kernel, by name (the wire format's columns, the dense mask)."""
        return dict(row_info_ptr=self.row, col_info_ptr=self.col, row_flag_ptr=self.row_flag,
                    col_flag_ptr=self.col_flag, dense_ptr=self.dense, stride_dense=self.dense.stride(0),
                    penalty=self.penalty)

    def flags(self):
        return dict(HAS_MARGIN=self.has_margin, HAS_PENALTY=self.has_penalty, PENALTY_MODE=self.penalty_mode,
                    HAS_DENSE=self.has_dense)


def _q_bound(target) -> float:
    """A bound of |P·mass − Q| per direction from the target's numbers alone (never the data): P <= 1
    and 0 <= mass <= 1, Q = hard·[pos]/|P| + ε/|K| + soft·Qt >= 0 with Qt <= 1, so |P·mass − Q| <=
    max(1, |hard| + ε + |soft|), ε < 1 and |hard| <= 1 + |soft| when it is what ε and soft leave. 1
    without soft targets (Q <= 1)."""
    if not target.soft:
        return 1.0
    soft = abs(float(target.soft))
    hard = abs(float(target.hard)) if target.hard is not None else 1.0 + soft
    return max(1.0, hard + 1.0 + soft)


def _bounds(target, dot, r0: int, r1: int, c0: int):
    """Each row's A_i·B_pair − margin from the chunk's own dot products (fp32), or a dummy."""
    if target.margin is None:
        return dot.new_zeros(1)
    local = torch.arange(r1 - r0, device=dot.device)
    return (dot[local, local + r0 + target.pair_offset - c0] - target.margin).contiguous()


class _Teacher:
    """The soft targets' inputs of the epilogues: the teacher's chunks of dot products, its scale (a
    softmax teacher's, on the device: no host read), its normalisers (float64; a linear teacher's as
    their reciprocals, see ``teacher_tile``) and its numbers; dummies without soft targets."""

    def __init__(self, target, row_norm, col_norm, device):
        from ..targets import TEACHER_LINEAR

        self.soft = bool(target.soft)
        self.linear = self.soft and target.teacher_kind == TEACHER_LINEAR
        self.dummy = torch.zeros(1, dtype=torch.float32, device=device)
        self.dummy64 = self.dummy.double()
        self.target = target
        if not self.soft:
            self.scale, self.row_norm, self.col_norm = self.dummy, self.dummy64, self.dummy64
            self.numbers = (0.0, 1.0, 0.0)
            return
        self.scale = (self.dummy if self.linear
                      else target.teacher_scale.detach().to(device=device, dtype=torch.float32).reshape(1))
        prep = (lambda v: v.to(torch.float64).reciprocal().contiguous()) if self.linear else \
            (lambda v: v.to(torch.float64).contiguous())
        self.row_norm = prep(row_norm)
        self.col_norm = self.dummy64 if col_norm is None else prep(col_norm)
        self.has_cols = col_norm is not None
        self.numbers = (float(target.teacher_c0), float(target.teacher_c1), float(target.soft))

    def chunk(self, r0, r1, c0, c1):
        """The teacher's dot products of rows [r0, r1) × columns [c0, c1) (fp32), or a dummy."""
        if not self.soft:
            return self.dummy.reshape(1, 1)
        t = self.target
        return mm_acc(t.teacher_a[r0:r1], t.teacher_b[c0:c1].T).float()

    def kwargs(self, r0, r1, c0, c1, tdot):
        """The teacher's arguments of a kernel for rows [r0, r1) × columns [c0, c1), by name (``tdot``
        its chunk of dot products, ``chunk``)."""
        t_c0, t_c1, soft = self.numbers
        return dict(tdot_ptr=tdot, stride_tm=tdot.stride(0), t_scale_ptr=self.scale,
                    t_row_ptr=self.row_norm[r0:r1] if self.soft else self.row_norm,
                    t_col_ptr=self.col_norm[c0:c1] if (self.soft and self.has_cols) else self.col_norm,
                    t_c0=t_c0, t_c1=t_c1, soft=soft)

    def flags(self):
        return dict(SOFT=self.soft, TEACHER_LINEAR=self.linear)


def feature_margin_bounds(tiles, target, a, b, r0: int, r1: int, c0: int, c1: int):
    """Each row's A_i·B_pair − margin for the matmul producer (which has no chunk of dot products to
    read it from): the pair's logit from the producer's own tiles (``pair_dots_kernel``) over the
    chunk's columns [c0, c1), or a dummy."""
    if target.margin is None:
        return a.new_zeros(1, dtype=torch.float32)
    cfg = tiles.cfg
    r = r1 - r0
    out = torch.empty(r, dtype=torch.float32, device=a.device)
    a_c, b_k = a[r0:r1], b[c0:c1]
    launch(pair_dots_kernel)[(triton.cdiv(r, cfg.block_m),)](
        a_c, b_k, out, r, c1 - c0, a.shape[1], r0 + int(target.pair_offset) - c0, a_c.stride(0), b_k.stride(0),
        INPUT_PRECISION=tiles.consts(a)["INPUT_PRECISION"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return (out - target.margin).contiguous()


def target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None,
                 cublas=False, tiles=None):
    """Pass 1 of the general target (the contract of ``torch_chunked.target_stats``; with soft
    targets ``teacher`` is the ``targets.TeacherNorms`` of the teacher's pass). ``cublas``: the
    cuBLAS producer whatever ``plan.producer`` says (the teacher's pass, ``teacher_stats``); ``tiles``:
    the producer (a ``plan.TargetTiles``) to use instead of ``plan.producer``'s (the fused kernels'
    pass 1, ``fused_target.target_stats``)."""
    from ..targets import TargetStats, column_span, hard_weight, with_teacher

    check_inputs(a, b)
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    f32, f64 = torch.float32, torch.float64
    packed = PackedTarget(target, na, nb, dev)
    st = TargetStats.empty(na, nb, f32, dev)
    soft = bool(target.soft)
    if soft and teacher is None:
        raise ValueError("soft targets need the teacher's normalisers (targets.teacher_norms)")
    tch = _Teacher(target, teacher.row_norm if soft else None,
                   teacher.col_norm if (soft and symmetric) else None, dev)
    entropy = soft and bool(target.entropy)
    n_sums = 6 if soft else 4
    if soft:
        cross_row, cross_col = torch.zeros(na, dtype=f64, device=dev), torch.zeros(nb, dtype=f64, device=dev)
        ent_row, ent_col = ((torch.zeros(na, dtype=f64, device=dev), torch.zeros(nb, dtype=f64, device=dev))
                            if entropy else (None, None))
    hw_row = hw_col = tch.dummy
    if entropy:  # the hard targets' weight per positive, as torch_chunked forms it (fp32)
        h = hard_weight(target, 0.0)
        hw_row = (h / teacher.row_pos.float().clamp_min(1)).float().contiguous()
        if symmetric:
            hw_col = (h / teacher.col_pos.float().clamp_min(1)).float().contiguous()
    cached, kept = [], 0
    dummy = torch.zeros(1, dtype=f64, device=dev)
    tiles = tiles or TargetTiles(a, target, "target_stats", cublas)
    cfg = tiles.cfg
    if tiles.matmul:
        chunk_rows = matmul_stats_rows(target, na, nb, chunk_rows, chunk_bytes(dev), a.dtype, symmetric, cfg)
    else:
        chunk_rows = memory_rows(na, nb, chunk_rows, chunk_bytes(dev))
    for r0, r1 in row_chunks(na, chunk_rows):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        dot, a_c, b_k, tdot = tiles.operands(a, b, tch, r0, r1, c0, c1)
        r, w = r1 - r0, c1 - c0
        it = work_items(r, w, cfg, dev)
        row_part = torch.empty((it.splits, r), dtype=f64, device=dev)
        row_sums = torch.zeros((it.splits, n_sums, r), dtype=f32, device=dev)
        col_part = torch.empty((it.m_blocks, w), dtype=f64, device=dev) if symmetric else dummy
        col_sums = torch.zeros((it.m_blocks, n_sums, w), dtype=f32, device=dev) if symmetric else dummy.float()
        bound = (feature_margin_bounds(tiles, target, a, b, r0, r1, c0, c1) if tiles.matmul
                 else _bounds(target, dot, r0, r1, c0))
        launch(target_stats_kernel)[it.grid](
            dot_ptr=dot, a_ptr=a_c, b_ptr=b_k, scale_ptr=scale, bias_ptr=bias, bound_ptr=bound,
            t_row_hw_ptr=hw_row[r0:r1] if entropy else hw_row,
            t_col_hw_ptr=hw_col[c0:c1] if (entropy and symmetric) else hw_col,
            row_part_ptr=row_part, row_sums_ptr=row_sums, col_part_ptr=col_part, col_sums_ptr=col_sums,
            R=r, W=w, D=a.shape[1], row0=r0, col0=c0, m_blocks=it.m_blocks, n_items=it.n_items,
            tiles_per_split=it.per_split, stride_dm=dot.stride(0), stride_am=a_c.stride(0),
            stride_bn=b_k.stride(0), stride_rp=row_part.stride(0), stride_rs=row_sums.stride(0),
            stride_cp=col_part.stride(0) if symmetric else 0, stride_cs=col_sums.stride(0) if symmetric else 0,
            **packed.kwargs(), **tch.kwargs(r0, r1, c0, c1, tdot),
            SYMMETRIC=bool(symmetric), SMOOTHING=bool(smoothing), **packed.flags(), **tch.flags(),
            ENTROPY=entropy, **tiles.consts(a),
        )
        merge_lse(row_part, st.row_lse[r0:r1], accumulate=False)
        totals = row_sums.double().sum(dim=0)
        st.row_pos[r0:r1], st.row_sum_pos[r0:r1] = totals[0].float(), totals[1]
        st.row_keep[r0:r1], st.row_sum_keep[r0:r1] = totals[2].float(), totals[3]
        if soft:
            cross_row[r0:r1] = totals[4]
            if entropy:
                ent_row[r0:r1] = totals[5]
        if symmetric:
            merge_lse(col_part, st.col_lse[c0:c1], accumulate=True)
            ctot = col_sums.double().sum(dim=0)
            st.col_pos[c0:c1] += ctot[0].float()
            st.col_sum_pos[c0:c1] += ctot[1]
            st.col_keep[c0:c1] += ctot[2].float()
            st.col_sum_keep[c0:c1] += ctot[3]
            if soft:
                cross_col[c0:c1] += ctot[4]
                if entropy:
                    ent_col[c0:c1] += ctot[5]
        size = dot.numel() * dot.element_size()
        if not tiles.matmul and len(cached) * chunk_rows == r0 and kept + size <= cache_bytes:
            cached.append(dot)
            kept += size
    if soft:
        st = with_teacher(st, teacher, cross_row, cross_col, ent_row, ent_col)
    return st, cached


def teacher_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None):
    """The teacher's pass (the contract's ``teacher_stats``, run by ``targets.teacher_stats``) on the
    cuBLAS producer, whose chunks the soft
    pass's teacher tiles read (``_Teacher.chunk``), so that its normalisers come from the same GEMMs
    of the teacher's features."""
    return target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher,
                        cublas=True)


class GradVectors:
    """Pass 2's O(N) inputs of ``target_grad_tile`` from the weights of ``targets.loss_and_weights``,
    as the kernels read them (fp32, the LSEs float64; dummies where a direction or mass is absent), the
    teacher's (``_Teacher``) and the bound of the fp16 lift of G."""

    def __init__(self, a, target, w8, nb: int):
        dev = a.device
        self.symmetric = symmetric = w8.col_lse is not None
        dummy = torch.zeros(1, dtype=torch.float32, device=dev)
        self.row_lse = w8.row_lse.to(torch.float64).contiguous()
        self.q_row_pos, self.q_row_keep = w8.q_row_pos.float().contiguous(), w8.q_row_keep.float().contiguous()
        if symmetric:
            self.col_lse = w8.col_lse.to(torch.float64).contiguous()
            self.q_col_pos, self.q_col_keep = w8.q_col_pos.float().contiguous(), w8.q_col_keep.float().contiguous()
            self.w_col = w8.w_col.float().contiguous()
        else:
            self.col_lse, self.q_col_pos, self.q_col_keep, self.w_col = dummy.double(), dummy, dummy, dummy
        self.tch = _Teacher(target, w8.t_row_norm, w8.t_col_norm if symmetric else None, dev)
        self.has_mass = w8.row_mass is not None  # a linear teacher's eps, or a row LSE's upstream weights
        self.row_mass = self.col_mass = dummy
        if self.has_mass:
            self.row_mass = w8.row_mass.float().contiguous()
            if symmetric:
                self.col_mass = (w8.col_mass.float().contiguous() if w8.col_mass is not None
                                 else torch.ones(nb, dtype=torch.float32, device=dev))
        # |G| <= (w_row + max w_col)·q_bound: the bound of the fp16 lift, from the loss weights, not the data
        self.g_scale = grad_tile_scale(a.dtype, (abs(float(w8.w_row)) + (float(w8.w_col_max) if symmetric else 0.0))
                                       * _q_bound(target))

    def kwargs(self, r0: int, r1: int, c0: int, c1: int):
        """Pass 2's vectors of rows [r0, r1) and columns [c0, c1) by kernel argument name: the row LSE,
        q at a positive and on every kept pair, the same of the columns with their weight, the row
        and column masses (dummies where absent)."""
        rows, cols = slice(r0, r1), slice(c0, c1) if self.symmetric else slice(None)
        mass_rows = rows if self.has_mass else slice(None)
        mass_cols = cols if self.has_mass else slice(None)
        return dict(row_lse_ptr=self.row_lse[rows], q_row_pos_ptr=self.q_row_pos[rows],
                    q_row_keep_ptr=self.q_row_keep[rows], col_lse_ptr=self.col_lse[cols],
                    q_col_pos_ptr=self.q_col_pos[cols], q_col_keep_ptr=self.q_col_keep[cols],
                    w_col_ptr=self.w_col[cols], row_mass_ptr=self.row_mass[mass_rows],
                    col_mass_ptr=self.col_mass[mass_cols], g_scale=self.g_scale)

    def flags(self):
        return dict(SYMMETRIC=self.symmetric, **self.tch.flags(), HAS_MASS=self.has_mass)


def target_grad(a, b, scale, bias, target, weights, chunk_rows, cached=()):
    """Pass 2 of the general target (the contract of ``torch_chunked.target_grad``)."""
    from ..targets import column_span

    check_inputs(a, b)
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    packed = PackedTarget(target, na, nb, dev)
    grad_a = torch.zeros(a.shape, dtype=torch.float32, device=dev)
    grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    vec = GradVectors(a, target, weights, nb)
    tch, g_scale = vec.tch, vec.g_scale
    parts = []
    tiles = TargetTiles(a, target, "target_grad")
    cfg = tiles.cfg
    if tiles.matmul:  # blocks of rows × columns whose G (and the teacher's fp32 chunk) fit the budget
        plan = matmul_plan(na, nb, a.dtype, chunk_rows, chunk_bytes(dev),
                           block_bytes=a.element_size() + (4 if target.soft else 0))
        chunk_rows, block_cols = plan.grad_rows, plan.grad_cols
        g_buf = torch.empty((chunk_rows, block_cols), dtype=a.dtype, device=dev)
    else:
        chunk_rows, block_cols = memory_rows(na, nb, chunk_rows, chunk_bytes(dev)), nb
    for k, (r0, r1) in enumerate(row_chunks(na, chunk_rows)):
        span0, span1 = column_span(target, r0, r1, nb)
        # the margin bounds at pass 1's alignment (its chunk's columns from span0)
        bound = (feature_margin_bounds(tiles, target, a, b, r0, r1, span0, span1) if tiles.matmul and span1 > span0
                 else None)
        for c0 in range(span0, span1, block_cols):
            c1 = min(span1, c0 + block_cols)
            if not tiles.matmul and k < len(cached):
                dot = cached[k].clone()  # G is written in place
                tdot = tch.chunk(r0, r1, c0, c1)
                a_c = b_k = dot
            else:
                dot, a_c, b_k, tdot = tiles.operands(a, b, tch, r0, r1, c0, c1)
            r, w = r1 - r0, c1 - c0
            if tiles.matmul:
                g = g_buf[:r, :w]
            else:
                g_chunk = grad_buffer(a, r, w)
                g = dot if g_chunk is None else g_chunk
            it = work_items(r, w, cfg, dev)
            part = torch.empty((2, it.n_items), dtype=torch.float32, device=dev)
            if not tiles.matmul:
                bound = _bounds(target, dot, r0, r1, c0)
            launch(_target_grad_kernel)[it.grid](
                dot_ptr=dot, a_ptr=a_c, b_ptr=b_k, g_ptr=g, scale_ptr=scale, bias_ptr=bias, bound_ptr=bound,
                part_ptr=part, R=r, W=w, D=a.shape[1], row0=r0, col0=c0, m_blocks=it.m_blocks,
                n_items=it.n_items, tiles_per_split=it.per_split, stride_dm=dot.stride(0),
                stride_am=a_c.stride(0), stride_bn=b_k.stride(0), stride_gm=g.stride(0),
                w_row=float(weights.w_row), **packed.kwargs(), **vec.kwargs(r0, r1, c0, c1),
                **tch.kwargs(r0, r1, c0, c1, tdot), **packed.flags(), **vec.flags(), **tiles.consts(a),
            )
            parts.append(part)
            grad_gemms(g, a[r0:r1], b[c0:c1], scale, grad_a[r0:r1], grad_b[c0:c1], g_scale,
                        accumulate_a=c0 > span0)
    grad_b.mul_(scale)
    totals = torch.cat(parts, dim=1).sum(dim=1) if parts else torch.zeros(2, dtype=torch.float32, device=dev)
    return grad_a, grad_b, totals[0].clone(), totals[1].clone()


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    """Softmax loss of a general target and its gradients (``targets.two_pass_target`` over this
    backend's two passes)."""
    from ..targets import two_pass_target

    return two_pass_target(target_stats, target_grad, a, b, scale, bias, target, eps, symmetric, chunk_rows,
                           need_grad, cache_bytes, teacher_pass=teacher_stats)


# ------------------------------------------------------------------------------------ compile gate
_FP64_PTRS = ("row_lse_ptr", "col_lse_ptr", "t_row_ptr", "t_col_ptr", "row_part_ptr", "col_part_ptr")
_POINTER_TYPES = dict({name: "*fp64" for name in _FP64_PTRS}, row_info_ptr="*i64", col_info_ptr="*i64",
                      row_flag_ptr="*u8", col_flag_ptr="*u8", dense_ptr="*u8")
_FLOAT_ARGS = ("penalty", "w_row", "g_scale", "t_c0", "t_c1", "soft")


def target_signature(fn, consts: dict, features: str, grad: str = "*fp32") -> dict:
    """The argument types of a general-target kernel (this module's and ``fused_target.py``'s) from its
    argument names, for the compile gate: the features (a_ptr, b_ptr) of type ``features`` (stand-ins
    of the chunk's type with the cuBLAS producer), G (g_ptr) of type ``grad``, every other pointer fp32
    unless named in _POINTER_TYPES (the chunks of dot products among them), the numbers in _FLOAT_ARGS
    fp32, the rest i32; the names in ``consts`` constexpr."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("a_ptr", "b_ptr"):
            sig[name] = features
        elif name == "g_ptr":
            sig[name] = grad
        elif name.endswith("_ptr"):
            sig[name] = _POINTER_TYPES.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def compile_specs():
    """Every (kernel, constexprs, launch config) this module ships, for each supported input dtype
    (see ``chunked.compile_specs``; used by tests/test_triton_compile.py): the epilogue kernels with
    the cuBLAS producer in each shipped variant; with the matmul producer, hard targets in the
    heaviest variants (all pair rules; the row LSE's masses) and the margin rule's pair kernel, and
    soft targets (the "target_soft" configuration, the teacher's tiles from its chunk) in every soft
    variant in bfloat16 and the heaviest in float16 and float32."""
    specs = []
    tri = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    none = dict(HAS_MARGIN=False, HAS_PENALTY=False, PENALTY_MODE=0, HAS_DENSE=False)
    margin = dict(none, HAS_MARGIN=True)
    penalty = dict(none, HAS_PENALTY=True, PENALTY_MODE=2)
    everything = dict(HAS_MARGIN=True, HAS_PENALTY=True, PENALTY_MODE=1, HAS_DENSE=True)
    # soft targets (the margin rule does not combine with them): a softmax teacher with the targets'
    # entropy (clip, hycd), a linear one (cwcl), and the pair rules and smoothing beside a softmax teacher
    hard = dict(SOFT=False, ENTROPY=False, TEACHER_LINEAR=False)
    soft_max = dict(SOFT=True, ENTROPY=True, TEACHER_LINEAR=False)
    soft_lin = dict(SOFT=True, ENTROPY=False, TEACHER_LINEAR=True)
    rules = dict(everything, HAS_MARGIN=False)

    def soft_tag(soft):
        if not soft["SOFT"]:
            return ""
        return ",soft=" + ("linear" if soft["TEACHER_LINEAR"] else "softmax") + (",entropy" if soft["ENTROPY"] else "")

    def add(name, fn, consts, dtype, matmul, soft, kernel):
        cfg = matmul_config(kernel, dtype, soft=soft) if matmul else chunked_config(kernel)
        prec = FUSED_FP32_PRECISION if matmul and dtype == "float32" else "ieee"
        consts = dict(consts, INPUT_PRECISION=prec, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      BLOCK_K=cfg.block_k or 16)
        if "MATMUL" in fn.arg_names:
            consts["MATMUL"] = matmul
        features = "*" + tri[dtype] if matmul else "*fp32"
        specs.append(dict(name=name + ("[mm]" if matmul else ""), fn=fn,
                          signature=target_signature(fn, consts, features, "*" + tri[dtype]), constexprs=consts,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, uses_dot=matmul, dtype=dtype,
                          config=cfg, divisible=("D",) if matmul else (), pipelined=matmul,
                          wgmma_required=matmul and dtype != "float32"))

    cublas_stats = [(none, False, False, hard), (margin, False, False, hard), (penalty, False, True, hard),
                    (none, True, False, hard), (everything, True, True, hard), (none, True, False, soft_max),
                    (none, True, False, soft_lin), (rules, True, True, soft_max)]
    mm_stats = [(everything, True, True, hard), (margin, False, False, hard)]
    mm_soft_stats = [(rules, True, True, soft_max), (none, True, False, soft_max), (none, True, False, soft_lin),
                     (none, False, False, soft_max)]
    stats_runs = [(False, "float32", v) for v in cublas_stats]
    for dtype in SUPPORTED_DTYPES:
        stats_runs += [(True, dtype, v) for v in mm_stats]
        stats_runs += [(True, dtype, v) for v in (mm_soft_stats if dtype == "bfloat16" else mm_soft_stats[:1])]
    for matmul, dtype, (flags, sym, smooth, soft) in stats_runs:
        consts = dict(SYMMETRIC=sym, SMOOTHING=smooth, **flags, **soft)
        tag = ",".join(k for k, v in flags.items() if v and k != "PENALTY_MODE") or "plain"
        add(f"target_stats[{tag},sym={sym},smooth={smooth}{soft_tag(soft)}]", target_stats_kernel, consts,
            dtype, matmul, soft["SOFT"], "target_stats")
    g_hard = dict(SOFT=False, TEACHER_LINEAR=False, HAS_MASS=False)
    g_soft_max = dict(SOFT=True, TEACHER_LINEAR=False, HAS_MASS=False)
    g_soft_lin = dict(SOFT=True, TEACHER_LINEAR=True, HAS_MASS=True)
    g_mass = dict(SOFT=False, TEACHER_LINEAR=False, HAS_MASS=True)  # a row LSE's upstream weights
    mm_soft_grad = [(rules, True, g_soft_max), (none, True, g_soft_lin), (none, True, g_soft_max),
                    (none, False, g_soft_max)]
    grad_runs = []
    for dtype in SUPPORTED_DTYPES:
        variants = [(none, False, g_hard), (everything, True, g_hard), (none, True, g_soft_max),
                    (none, True, g_soft_lin), (rules, False, g_mass)]
        if dtype == "float32":
            variants += [(margin, False, g_hard), (penalty, False, g_hard), (none, True, g_hard),
                         (rules, True, g_soft_max), (none, False, g_soft_max)]
        grad_runs += [(False, dtype, v) for v in variants]
        grad_runs += [(True, dtype, v) for v in ((everything, True, g_hard), (rules, False, g_mass))]
        grad_runs += [(True, dtype, v) for v in (mm_soft_grad if dtype == "bfloat16" else mm_soft_grad[:2])]
    for matmul, dtype, (flags, sym, soft) in grad_runs:
        consts = dict(SYMMETRIC=sym, **flags, **soft)
        tag = ",".join(k for k, v in flags.items() if v and k != "PENALTY_MODE") or "plain"
        stag = soft_tag(dict(soft, ENTROPY=False)) + (",mass" if soft["HAS_MASS"] else "")
        add(f"target_grad[{tag},sym={sym}{stag}]", _target_grad_kernel, consts, dtype, matmul, soft["SOFT"],
            "target_grad")
    for dtype in SUPPORTED_DTYPES:  # (the margin rule does not combine with soft targets)
        add("target_pair_dots", pair_dots_kernel, {}, dtype, True, False, "target_stats")
    return specs
