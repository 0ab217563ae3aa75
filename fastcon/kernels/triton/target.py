"""The engine's general target (``fastcon/targets/``) on the Triton epilogues: their kernels,
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

The kernels read the target's columns of its wire format (``targets.wire``, as ``PackedTarget``
lays them out for ``tiles.target_tile``), the defaults of absent fields filled in, the per-row and
per-column vectors of a pass in one float64 array each (``vectors``, columns ``tiles.VEC_*``) and the
launch's numbers in one fp32 array (``tiles.NUM_*``); the variant compiled is two constexpr bit sets,
RULES and TERMS (``rule_bits``, ``term_bits``). The margin enters as each row's bound
``A_i·B_pair − margin``, from the chunk of dot products or the producer's own tiles. Semantics and
results match ``torch_chunked`` (to fp32 rounding); the loss and the weights between the passes are
``targets.loss_and_weights``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import chunk_bytes, mm_acc, row_chunks, take_cached
from . import launch
from ...targets.wire import COL_ID, COL_KEEP, COL_OWNER, COL_PENALTY, ROW_EXCLUDE, ROW_HI, ROW_ID, ROW_LO, ROW_OWNER, \
    ROW_PENALTY, ROW_RULE, pack
from .configs import FUSED_FP32_PRECISION, SUPPORTED_DTYPES, chunked_config, matmul_config
from .gemm import grad_buffer, grad_gemms, grad_tile_scale
from .margin import feature_margin_bounds, margin_bounds, pair_dots_kernel
from .plan import (TargetTiles, aligned_memory_rows, check_inputs, matmul_plan, matmul_stats_rows, memory_rows,
                   merge_lse, work_items)
from .tiles import (NUM_G_SCALE, NUM_PENALTY, NUM_SOFT, NUM_T_C0, NUM_T_C1, NUM_T_SCALE, NUM_WIDTH, NUM_W_ROW,
                    RULE_DENSE, RULE_GUIDE, RULE_MARGIN, RULE_PENALTY, RULE_PENALTY_OTHER, RULE_PENALTY_OWN,
                    TERM_ENTROPY, TERM_LINEAR, TERM_MASS, TERM_SMOOTHING, TERM_SOFT, TERM_SYMMETRIC, VEC_LSE,
                    VEC_MASS, VEC_Q_KEEP, VEC_Q_POS, VEC_T_HARD, VEC_T_NORM, VEC_WEIGHT, VEC_WIDTH, column_tile,
                    grad_row_vectors, items_end, items_step, lse64, margin_tile, online_row_lse,
                    target_grad_tile, target_items, target_tile, target_work_item, teacher_dot_tile, teacher_rows,
                    tile_lse_parts, vec_load)



# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _xlogx(x):
    """x·log(x), 0 at x = 0 (torch.xlogy(x, x))."""
    zero = x == 0.0
    return tl.where(zero, 0.0, x * tl.log(tl.where(zero, 1.0, x)))


@triton.jit
def _sums(sums_ptr, p, n, TERMS: tl.constexpr):
    """Where partial p of pass 1's sums over n rows (columns) starts: 4 sums of n each, 6 with soft
    targets."""
    if TERM_SOFT & TERMS:
        out = sums_ptr + p * (6 * n)
    else:
        out = sums_ptr + p * (4 * n)
    return out


@triton.jit
def target_stats_kernel(
    dot_ptr, a_ptr, b_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr, dense_ptr,
    bound_ptr, tdot_ptr, row_vec_ptr, col_vec_ptr, numbers_ptr, row_part_ptr, row_sums_ptr, col_part_ptr,
    col_sums_ptr, R, W, D, col0, tiles_per_split, stride_dense,
    RULES: tl.constexpr, TERMS: tl.constexpr, MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, s): rows [m·BM, (m+1)·BM) of the chunk × the column tiles of split s. Writes
    row_part[s, rows] (float64 LSE over the split's kept pairs), row_sums[s, k, rows] (k = 0: number
    of positives, 1: their summed logits, 2 and 3 the same of the kept pairs with TERM_SMOOTHING) and,
    with TERM_SYMMETRIC, col_part[m, cols] and col_sums[m, k, cols], the same per column over the row
    block (every partial contiguous: 4 sums, 6 with soft targets). With TERM_SOFT (the teacher's
    chunk of dot products at tdot, its normalisers of the chunk's rows and columns in the vectors'
    VEC_T_NORM), k = 4: the cross term Σ Qt·S over the kept pairs and, with TERM_ENTROPY, k = 5:
    Σ xlogy(mix, mix) of mix = soft·Qt + [pos]·hw, hw the hard weight of each row or column per
    positive (VEC_T_HARD). The student's tiles of dot products come from ``tiles.dot_tile``: its
    chunk in memory (R × W), or with MATMUL formed here from the features (a_ptr, b_ptr, D wide), the
    programs then taking the work items in turn (persistent); the teacher's are always read from its
    chunk (``teacher_dot_tile``). The row-side arrays start at the chunk's first row."""
    SOFT: tl.constexpr = (TERM_SOFT & TERMS) != 0
    n_items = target_items(R, W, tiles_per_split, BLOCK_M, BLOCK_N)
    for item in range(tl.program_id(0), items_end(n_items, MATMUL), items_step(MATMUL)):
        pid_m, pid_s, offs_m, mask_m, bound, scale, bias, t0, t1 = target_work_item(
            item, scale_ptr, bias_ptr, bound_ptr, R, W, tiles_per_split, RULES, BLOCK_M, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        r_i = tl.zeros([BLOCK_M], tl.float32)
        n_pos = tl.zeros([BLOCK_M], tl.float32)
        s_pos = tl.zeros([BLOCK_M], tl.float32)
        n_keep = tl.zeros([BLOCK_M], tl.float32)
        s_keep = tl.zeros([BLOCK_M], tl.float32)
        x_row = tl.zeros([BLOCK_M], tl.float32)
        e_row = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, W, a_ptr, D, b_ptr, D, D, offs_m, mask_m, W, MATMUL,
                                           INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            g_m = margin_tile(d, tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, RULES)
            keep, pos, t = target_tile(d, g_m, offs_m, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                       row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, numbers_ptr, bound, scale,
                                       bias, RULES)
            t = tl.where(keep, t, float("-inf"))
            m_i, r_i = online_row_lse(m_i, r_i, t)
            t_pos = tl.where(pos, t, 0.0)
            n_pos += tl.sum(pos.to(tl.float32), 1)
            s_pos += tl.sum(t_pos, 1)
            t_keep = tl.where(keep, t, 0.0)
            if TERM_SMOOTHING & TERMS:
                n_keep += tl.sum(keep.to(tl.float32), 1)
                s_keep += tl.sum(t_keep, 1)
            if TERM_SYMMETRIC & TERMS:
                c_m, c_r = tile_lse_parts(t, 0)
                tl.store(col_part_ptr + pid_m * W + offs_n, lse64(c_m, c_r), mask=mask_n)
                base = _sums(col_sums_ptr, pid_m, W, TERMS) + offs_n
                tl.store(base, tl.sum(pos.to(tl.float32), 0), mask=mask_n)
                tl.store(base + W, tl.sum(t_pos, 0), mask=mask_n)
                if TERM_SMOOTHING & TERMS:
                    tl.store(base + 2 * W, tl.sum(keep.to(tl.float32), 0), mask=mask_n)
                    tl.store(base + 3 * W, tl.sum(t_keep, 0), mask=mask_n)
            if SOFT:
                # the teacher's terms last (its row vectors and numbers read per tile, from L1: fewer live registers)
                t_scale, t_row_hi, t_row_lo = teacher_rows(numbers_ptr, row_vec_ptr, offs_m, mask_m, TERMS)
                q_row, q_col = teacher_dot_tile(tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, keep, numbers_ptr,
                                                 col_vec_ptr, t_scale, t_row_hi, t_row_lo, TERMS)
                x_row += tl.sum(q_row * t_keep, 1)
                if TERM_ENTROPY & TERMS:
                    hw_row = vec_load(row_vec_ptr, offs_m, mask_m, VEC_T_HARD, 0.0)
                    mix = q_row * tl.load(numbers_ptr + NUM_SOFT) + tl.where(pos, hw_row[:, None], 0.0)
                    e_row += tl.sum(_xlogx(mix), 1)
                if TERM_SYMMETRIC & TERMS:
                    base = _sums(col_sums_ptr, pid_m, W, TERMS) + offs_n
                    tl.store(base + 4 * W, tl.sum(q_col * t_keep, 0), mask=mask_n)
                    if TERM_ENTROPY & TERMS:
                        hw_col = vec_load(col_vec_ptr, offs_n, mask_n, VEC_T_HARD, 0.0)
                        mix = q_col * tl.load(numbers_ptr + NUM_SOFT) + tl.where(pos, hw_col[None, :], 0.0)
                        tl.store(base + 5 * W, tl.sum(_xlogx(mix), 0), mask=mask_n)
        tl.store(row_part_ptr + pid_s * R + offs_m, lse64(m_i, r_i), mask=mask_m)
        base = _sums(row_sums_ptr, pid_s, R, TERMS) + offs_m
        tl.store(base, n_pos, mask=mask_m)
        tl.store(base + R, s_pos, mask=mask_m)
        if TERM_SMOOTHING & TERMS:
            tl.store(base + 2 * R, n_keep, mask=mask_m)
            tl.store(base + 3 * R, s_keep, mask=mask_m)
        if SOFT:
            tl.store(base + 4 * R, x_row, mask=mask_m)
            if TERM_ENTROPY & TERMS:
                tl.store(base + 5 * R, e_row, mask=mask_m)


@triton.jit
def _target_grad_kernel(
    dot_ptr, a_ptr, b_ptr, g_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr,
    dense_ptr, bound_ptr, tdot_ptr, row_vec_ptr, col_vec_ptr, numbers_ptr, part_ptr,
    R, W, D, col0, tiles_per_split, stride_gm, stride_dense,
    RULES: tl.constexpr, TERMS: tl.constexpr, MATMUL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G of program (m, s)'s tiles on the kept pairs (0 elsewhere):
    ``w_row·(exp(t − row_lse) − q_pos·[pos] − q_keep) [+ w_col·(exp(t − col_lse) − q_col_pos·[pos]
    − q_col_keep)]`` (the vectors' VEC_LSE, VEC_Q_POS, VEC_Q_KEEP, VEC_WEIGHT; w_row the number
    NUM_W_ROW), the float64 LSEs split into fp32 (hi, lo), ``exp(x) − q`` at a positive with q > ½
    formed as ``expm1(x) + (1 − q)``. With TERM_SOFT each direction also subtracts ``soft·Qt`` (the
    teacher's probabilities of its chunk of dot products at tdot, ``teacher_tile``) and with TERM_MASS
    its softmax term is ``mass·exp(x)`` (at such a positive ``mass·expm1(x) + (mass − q)``; VEC_MASS).
    G·g_scale (NUM_G_SCALE) is stored to g_ptr (which may alias dot_ptr: each element is read before
    the same program writes it); part[p, 0] = Σ G·dot, part[p, 1] = Σ G (unscaled), p the work item.
    The tiles come from ``tiles.dot_tile`` as in ``target_stats_kernel``."""
    n_items = target_items(R, W, tiles_per_split, BLOCK_M, BLOCK_N)
    for item in range(tl.program_id(0), items_end(n_items, MATMUL), items_step(MATMUL)):
        pid_m, pid_s, offs_m, mask_m, bound, scale, bias, t0, t1 = target_work_item(
            item, scale_ptr, bias_ptr, bound_ptr, R, W, tiles_per_split, RULES, BLOCK_M, BLOCK_N)
        row_hi, row_lo, qp, qk, mass = grad_row_vectors(row_vec_ptr, offs_m, mask_m, TERMS)
        t_scale, t_row_hi, t_row_lo = teacher_rows(numbers_ptr, row_vec_ptr, offs_m, mask_m, TERMS)
        acc_gd = tl.zeros([BLOCK_M], tl.float32)
        acc_g = tl.zeros([BLOCK_M], tl.float32)
        for ct in range(t0, t1):
            offs_n, mask_n, d = column_tile(ct, dot_ptr, W, a_ptr, D, b_ptr, D, D, offs_m, mask_m, W, MATMUL,
                                           INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            mask = mask_m[:, None] & mask_n[None, :]
            g_m = margin_tile(d, tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, RULES)
            keep, pos, t = target_tile(d, g_m, offs_m, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                       row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, numbers_ptr, bound, scale,
                                       bias, RULES)
            q_row, q_col = t, t  # (unused without TERM_SOFT)
            if TERM_SOFT & TERMS:
                q_row, q_col = teacher_dot_tile(tdot_ptr, W, offs_m, offs_n, mask_m, mask_n, keep, numbers_ptr,
                                                 col_vec_ptr, t_scale, t_row_hi, t_row_lo, TERMS)
            g = target_grad_tile(t, keep, pos, row_hi, row_lo, qp, qk, mass, q_row, q_col, offs_n, mask_n,
                                 col_vec_ptr, numbers_ptr, TERMS)
            acc_gd += tl.sum(g * d, 1)
            acc_g += tl.sum(g, 1)
            g = g * tl.load(numbers_ptr + NUM_G_SCALE)
            tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], g.to(g_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + 2 * item, tl.sum(acc_gd, 0))
        tl.store(part_ptr + 2 * item + 1, tl.sum(acc_g, 0))


# ------------------------------------------------------------------------------------------ host side
def _bit_set(*bits) -> int:
    """The int of a constexpr bit set from (bit, on) pairs."""
    return sum(int(bit) for bit, on in bits if on)


def rule_bits(margin=False, penalty=False, penalty_mode=0, dense=False, guide=False) -> int:
    """The RULES constexpr of a general-target kernel (``tiles.RULE_*``)."""
    return _bit_set((RULE_MARGIN, margin), (RULE_PENALTY, penalty), (RULE_PENALTY_OWN, penalty and penalty_mode == 1),
                    (RULE_PENALTY_OTHER, penalty and penalty_mode == 2), (RULE_DENSE, dense),
                    (RULE_GUIDE, margin and guide))


def term_bits(symmetric=False, smoothing=False, soft=False, linear=False, entropy=False, mass=False) -> int:
    """The TERMS constexpr of a general-target kernel (``tiles.TERM_*``)."""
    return _bit_set((TERM_SYMMETRIC, symmetric), (TERM_SMOOTHING, smoothing), (TERM_SOFT, soft),
                    (TERM_LINEAR, linear), (TERM_ENTROPY, entropy), (TERM_MASS, mass))


class PackedTarget:
    """The target's arrays as the kernels read them (defaults of absent fields filled in)."""

    def __init__(self, target, na: int, nb: int, device):
        from ...targets import guided

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
        self.has_dense = target.mask is not None
        self.dense = (target.mask.to(torch.uint8).contiguous() if self.has_dense
                      else torch.zeros((1, 1), dtype=torch.uint8, device=device))
        has_penalty = target.penalty != 0.0
        self.rules = rule_bits(target.margin is not None, has_penalty, int(target.penalty_mode), self.has_dense,
                               guided(target))

    def kwargs(self, r0: int, r1: int):
        """The target's arguments of a kernel over rows [r0, r1), by name (the wire format's columns,
        the dense mask; the row-side ones start at row r0)."""
        return dict(row_info_ptr=self.row[r0:r1], col_info_ptr=self.col, row_flag_ptr=self.row_flag[r0:r1],
                    col_flag_ptr=self.col_flag, dense_ptr=self.dense[r0:r1] if self.has_dense else self.dense,
                    stride_dense=self.dense.stride(0), RULES=self.rules)


def _q_bound(target, nb: int) -> float:
    """A bound of |P·mass − Q| per direction from the target's numbers alone (never the data): P <= 1
    and 0 <= mass <= 1, Q = hard·[pos]/|P| + ε/|K| + soft·Qt >= 0 with Qt <= 1, so |P·mass − Q| <=
    max(1, |hard| + ε + |soft|), ε < 1 and |hard| <= 1 + |soft| when it is what ε and soft leave. 1
    without soft targets (Q <= 1). The debiased loss (docs/losses.md §2.5): each of P and q is at most
    1 + τ⁺·(1 + M)/(1 − τ⁺), M < Nb."""
    if target.debias:
        tau = float(target.debias)
        return 1.0 + tau * (1.0 + nb) / (1.0 - tau)
    if not target.soft:
        return 1.0
    soft = abs(float(target.soft))
    hard = abs(float(target.hard)) if target.hard is not None else 1.0 + soft
    return max(1.0, hard + 1.0 + soft)


def vectors(n: int, device, **columns):
    """A per-row (per-column) vector array (``tiles.VEC_*``, float64, n × VEC_WIDTH) with the given
    columns (``lse=…``, ``t_norm=…``: tensors of n, or numbers), the others 0; a dummy row for n = 0."""
    out = torch.zeros((max(n, 1), int(VEC_WIDTH)), dtype=torch.float64, device=device)
    for name, value in columns.items():
        if value is not None:
            out[:n, int(_VEC_COLUMNS[name])] = value
    return out


_VEC_COLUMNS = dict(lse=VEC_LSE, q_pos=VEC_Q_POS, q_keep=VEC_Q_KEEP, mass=VEC_MASS, weight=VEC_WEIGHT,
                    t_norm=VEC_T_NORM, t_hard=VEC_T_HARD)


class _Teacher:
    """The soft targets' inputs of the epilogues: the teacher's chunks of dot products, its scale (a
    softmax teacher's, on the device: no host read), its normalisers (float64; a linear teacher's as
    their reciprocals, see ``teacher_tile``) and its numbers; dummies without soft targets."""

    def __init__(self, target, row_norm, col_norm, device):
        from ...targets import TEACHER_LINEAR, guided

        self.soft = bool(target.soft)
        self.guide = guided(target)  # a guide's chunks (the margin rule's similarities), no soft targets
        self.linear = self.soft and target.teacher.kind == TEACHER_LINEAR
        self.device = device
        self.target = target
        self.row_norm = self.col_norm = None
        if self.soft:
            prep = (lambda v: v.to(torch.float64).reciprocal()) if self.linear else (lambda v: v.to(torch.float64))
            self.row_norm = prep(row_norm)
            self.col_norm = None if col_norm is None else prep(col_norm)

    def chunk(self, r0, r1, c0, c1):
        """The teacher's (or guide's) dot products of rows [r0, r1) × columns [c0, c1) (fp32), or a dummy."""
        if not (self.soft or self.guide):
            return torch.zeros((1, 1), dtype=torch.float32, device=self.device)
        t = self.target.teacher
        return mm_acc(t.a[r0:r1], t.b[c0:c1].T).float()

    def numbers(self, penalty: float, w_row: float = 0.0, g_scale: float = 1.0):
        """The numbers of a launch (``tiles.NUM_*``, fp32 on the device; the teacher's scale copied
        there, never read on the host)."""
        t = self.target.teacher
        c0, c1, soft = (float(t.c0), float(t.c1), float(self.target.soft)) if self.soft else (0.0, 1.0, 0.0)
        out = torch.tensor([0.0] * int(NUM_WIDTH), dtype=torch.float32)
        for col, value in ((NUM_PENALTY, penalty), (NUM_W_ROW, w_row), (NUM_G_SCALE, g_scale), (NUM_T_C0, c0),
                           (NUM_T_C1, c1), (NUM_SOFT, soft), (NUM_T_SCALE, 1.0)):
            out[int(col)] = value
        out = out.to(self.device)
        if self.soft and not self.linear:
            out[int(NUM_T_SCALE)] = t.scale.detach().reshape(())
        return out

    def terms(self, symmetric: bool, **more) -> int:
        return term_bits(symmetric=symmetric, soft=self.soft, linear=self.linear, **more)


def target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None,
                 cublas=False, tiles=None):
    """Pass 1 of the general target (the contract of ``torch_chunked.target_stats``; with soft
    targets ``teacher`` is the ``targets.TeacherNorms`` of the teacher's pass). ``cublas``: the
    cuBLAS producer whatever ``plan.producer`` says (the teacher's pass, ``teacher_stats``); ``tiles``:
    the producer (a ``plan.TargetTiles``) to use instead of ``plan.producer``'s (the fused kernels'
    pass 1, ``fused_target.target_stats``)."""
    from ...targets import TargetStats, column_span, hard_weight, with_teacher

    check_inputs(a, b)
    a, b = a.contiguous(), b.contiguous()  # (the kernels take rows D apart)
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
    hw_row = hw_col = None
    if entropy:  # the hard targets' weight per positive, as torch_chunked forms it (fp32)
        h = hard_weight(target, 0.0)
        hw_row = (h / teacher.row_pos.float().clamp_min(1)).float()
        if symmetric:
            hw_col = (h / teacher.col_pos.float().clamp_min(1)).float()
    row_vec = vectors(na if soft else 0, dev, t_norm=tch.row_norm, t_hard=hw_row)
    col_vec = vectors(nb if (soft and symmetric) else 0, dev, t_norm=tch.col_norm, t_hard=hw_col)
    numbers = tch.numbers(float(target.penalty))
    terms = tch.terms(bool(symmetric), smoothing=bool(smoothing), entropy=entropy)
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
        bound = margin_bounds(tiles, target, a, b, dot, tdot, r0, r1, c0, c1)
        launch(target_stats_kernel)[it.grid](
            dot_ptr=dot, a_ptr=a_c, b_ptr=b_k, scale_ptr=scale, bias_ptr=bias, bound_ptr=bound, tdot_ptr=tdot,
            row_vec_ptr=row_vec[r0:r1] if soft else row_vec, col_vec_ptr=col_vec[c0:c1] if (soft and symmetric)
            else col_vec, numbers_ptr=numbers, row_part_ptr=row_part, row_sums_ptr=row_sums, col_part_ptr=col_part,
            col_sums_ptr=col_sums, R=r, W=w, D=a.shape[1], col0=c0, tiles_per_split=it.per_split,
            **packed.kwargs(r0, r1), TERMS=terms, **tiles.consts(a),
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
    """Pass 2's inputs of ``target_grad_tile`` from the weights of ``targets.loss_and_weights``: the
    per-row and per-column vectors (``vectors``: the LSEs, q at a positive and on every kept pair,
    the columns' weights, the masses, the teacher's normalisers), the numbers, the variant's TERMS and
    the bound of the fp16 lift of G."""

    def __init__(self, a, target, w8, nb: int):
        dev = a.device
        self.symmetric = symmetric = w8.col_lse is not None
        tch = _Teacher(target, w8.t_row_norm, w8.t_col_norm if symmetric else None, dev)
        has_mass = w8.row_mass is not None  # a linear teacher's eps, or a row LSE's upstream weights
        self.rows = vectors(a.shape[0], dev, lse=w8.row_lse, q_pos=w8.q_row_pos.float(),
                            q_keep=w8.q_row_keep.float(), mass=w8.row_mass.float() if has_mass else None,
                            t_norm=tch.row_norm)
        self.cols = None
        if symmetric:
            col_mass = (w8.col_mass.float() if w8.col_mass is not None else 1.0) if has_mass else None
            self.cols = vectors(nb, dev, lse=w8.col_lse, q_pos=w8.q_col_pos.float(), q_keep=w8.q_col_keep.float(),
                                weight=w8.w_col.float(), mass=col_mass, t_norm=tch.col_norm)
        self.dummy = vectors(0, dev)
        # |G| <= (w_row + max w_col)·q_bound: the bound of the fp16 lift, from the loss weights, not the data
        self.g_scale = grad_tile_scale(a.dtype, (abs(float(w8.w_row)) + (float(w8.w_col_max) if symmetric else 0.0))
                                       * _q_bound(target, nb))
        self.numbers = tch.numbers(float(target.penalty), float(w8.w_row), self.g_scale)
        self.terms = tch.terms(symmetric, mass=has_mass)
        self.tch = tch

    def kwargs(self, r0: int, r1: int, c0: int, c1: int):
        """Pass 2's vectors of rows [r0, r1) and columns [c0, c1), its numbers and TERMS, by kernel
        argument name."""
        return dict(row_vec_ptr=self.rows[r0:r1], col_vec_ptr=self.cols[c0:c1] if self.symmetric else self.dummy,
                    numbers_ptr=self.numbers, TERMS=self.terms)


def target_grad(a, b, scale, bias, target, weights, chunk_rows, cached=(), tiles=None, g_sink=None):
    """Pass 2 of the general target (the contract of ``torch_chunked.target_grad``). ``tiles``: the
    producer to use instead of ``plan.producer``'s; ``g_sink``: a function taking each chunk's fp32 G
    (rows [r0, r1) × columns [c0, c1), written over its chunk of dot products) as ``g_sink(G, r0, r1,
    c0, c1)`` in place of the gradient GEMMs, which then return no feature gradients (the prefix passes,
    ``prefix.py``; the cuBLAS producer)."""
    from ...targets import column_span, guided

    check_inputs(a, b)
    a, b = a.contiguous(), b.contiguous()  # (the kernels take rows D apart)
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    packed = PackedTarget(target, na, nb, dev)
    guide = guided(target)
    grad_a = grad_b = None
    if g_sink is None:
        grad_a = torch.zeros(a.shape, dtype=torch.float32, device=dev)
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    vec = GradVectors(a, target, weights, nb)
    tch, g_scale = vec.tch, vec.g_scale
    parts = []
    tiles = tiles or TargetTiles(a, target, "target_grad")
    cfg = tiles.cfg
    if tiles.matmul and guide:  # the guide's chunk over every column, so that each row's pair lies in it
        chunk_rows = aligned_memory_rows(na, nb, chunk_rows, chunk_bytes(dev), a.dtype, partial_bytes=a.element_size())
        block_cols = nb
        g_buf = torch.empty((chunk_rows, block_cols), dtype=a.dtype, device=dev)
    elif tiles.matmul:  # blocks of rows × columns whose G (and the teacher's fp32 chunk) fit the budget
        plan = matmul_plan(na, nb, a.dtype, chunk_rows, chunk_bytes(dev),
                           block_bytes=a.element_size() + (4 if target.soft else 0))
        chunk_rows, block_cols = plan.grad_rows, plan.grad_cols
        g_buf = torch.empty((chunk_rows, block_cols), dtype=a.dtype, device=dev)
    else:
        chunk_rows, block_cols = memory_rows(na, nb, chunk_rows, chunk_bytes(dev)), nb
    for k, (r0, r1) in enumerate(row_chunks(na, chunk_rows)):
        span0, span1 = column_span(target, r0, r1, nb)
        # the margin bounds at pass 1's alignment (its chunk's columns from span0)
        bound = (feature_margin_bounds(tiles, target, a, b, r0, r1, span0, span1)
                 if tiles.matmul and not guide and span1 > span0 else None)
        for c0 in range(span0, span1, block_cols):
            c1 = min(span1, c0 + block_cols)
            dot = None if tiles.matmul else take_cached(cached, k)  # released: G is written in place
            if dot is not None:
                tdot = tch.chunk(r0, r1, c0, c1)
                a_c = b_k = dot
            else:
                dot, a_c, b_k, tdot = tiles.operands(a, b, tch, r0, r1, c0, c1)
            r, w = r1 - r0, c1 - c0
            if tiles.matmul:
                g = g_buf[:r, :w]
            else:
                g_chunk = None if g_sink is not None else grad_buffer(a, r, w)
                g = dot if g_chunk is None else g_chunk
            it = work_items(r, w, cfg, dev)
            part = torch.empty((it.n_items, 2), dtype=torch.float32, device=dev)
            if not tiles.matmul or guide:  # (the chunk holds every pair: one block per row chunk)
                bound = margin_bounds(tiles, target, a, b, dot, tdot, r0, r1, c0, c1)
            launch(_target_grad_kernel)[it.grid](
                dot_ptr=dot, a_ptr=a_c, b_ptr=b_k, g_ptr=g, scale_ptr=scale, bias_ptr=bias, bound_ptr=bound,
                tdot_ptr=tdot, part_ptr=part, R=r, W=w, D=a.shape[1], col0=c0, tiles_per_split=it.per_split,
                stride_gm=g.stride(0), **packed.kwargs(r0, r1), **vec.kwargs(r0, r1, c0, c1), **tiles.consts(a),
            )
            parts.append(part)
            if g_sink is not None:
                g_sink(g if g_scale == 1.0 else g / g_scale, r0, r1, c0, c1)
                continue
            grad_gemms(g, a[r0:r1], b[c0:c1], scale, grad_a[r0:r1], grad_b[c0:c1], g_scale,
                        accumulate_a=c0 > span0)
    if grad_b is not None:
        grad_b.mul_(scale)
    totals = torch.cat(parts).sum(dim=0) if parts else torch.zeros(2, dtype=torch.float32, device=dev)
    return grad_a, grad_b, totals[0].clone(), totals[1].clone()


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    """Softmax loss of a general target and its gradients (``targets.two_pass_target`` over this
    backend's two passes)."""
    from ...targets import two_pass_target

    return two_pass_target(target_stats, target_grad, a, b, scale, bias, target, eps, symmetric, chunk_rows,
                           need_grad, cache_bytes, teacher_pass=teacher_stats)


# ------------------------------------------------------------------------------------ compile gate
_POINTER_TYPES = dict(row_part_ptr="*fp64", col_part_ptr="*fp64", row_vec_ptr="*fp64", col_vec_ptr="*fp64",
                      row_info_ptr="*i64", col_info_ptr="*i64", row_flag_ptr="*u8", col_flag_ptr="*u8",
                      dense_ptr="*u8")


def variant(SYMMETRIC=False, SMOOTHING=False, HAS_MARGIN=False, HAS_PENALTY=False, PENALTY_MODE=0, HAS_DENSE=False,
            SOFT=False, TEACHER_LINEAR=False, ENTROPY=False, HAS_MASS=False, HAS_GUIDE=False) -> dict:
    """The RULES and TERMS constexprs of a general-target kernel from the variant's named flags (the
    compile gate's tables)."""
    return dict(RULES=rule_bits(HAS_MARGIN, HAS_PENALTY, PENALTY_MODE, HAS_DENSE, HAS_GUIDE),
                TERMS=term_bits(SYMMETRIC, SMOOTHING, SOFT, TEACHER_LINEAR, ENTROPY, HAS_MASS))


def target_signature(fn, consts: dict, features: str, grad: str = "*fp32") -> dict:
    """The argument types of a general-target kernel (this module's and ``fused_target.py``'s) from its
    argument names, for the compile gate: the features (a_ptr, b_ptr) of type ``features`` (stand-ins
    of the chunk's type with the cuBLAS producer), G (g_ptr) of type ``grad``, every other pointer fp32
    unless named in _POINTER_TYPES (the chunks of dot products among them), the rest i32; the names
    in ``consts`` constexpr."""
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
            sig[name] = "i32"
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
    guided = dict(none, HAS_MARGIN=True, HAS_GUIDE=True)  # GISTEmbed: the margin on the guide's chunk

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
                          config=cfg, divisible=("D", "R", "W") if matmul else ("R", "W"), pipelined=matmul,
                          wgmma_required=matmul and dtype != "float32"))

    cublas_stats = [(none, False, False, hard), (margin, False, False, hard), (penalty, False, True, hard),
                    (none, True, False, hard), (everything, True, True, hard), (none, True, False, soft_max),
                    (none, True, False, soft_lin), (rules, True, True, soft_max), (guided, False, False, hard)]
    mm_stats = [(everything, True, True, hard), (margin, False, False, hard), (guided, False, False, hard)]
    mm_soft_stats = [(rules, True, True, soft_max), (none, True, False, soft_max), (none, True, False, soft_lin),
                     (none, False, False, soft_max)]
    stats_runs = [(False, "float32", v) for v in cublas_stats]
    for dtype in SUPPORTED_DTYPES:
        stats_runs += [(True, dtype, v) for v in mm_stats]
        stats_runs += [(True, dtype, v) for v in (mm_soft_stats if dtype == "bfloat16" else mm_soft_stats[:1])]
    for matmul, dtype, (flags, sym, smooth, soft) in stats_runs:
        consts = variant(SYMMETRIC=sym, SMOOTHING=smooth, **flags, **soft)
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
                         (rules, True, g_soft_max), (none, False, g_soft_max), (guided, False, g_hard)]
        grad_runs += [(False, dtype, v) for v in variants]
        grad_runs += [(True, dtype, v) for v in ((everything, True, g_hard), (rules, False, g_mass),
                                                 (guided, False, g_hard))]
        grad_runs += [(True, dtype, v) for v in (mm_soft_grad if dtype == "bfloat16" else mm_soft_grad[:2])]
    for matmul, dtype, (flags, sym, soft) in grad_runs:
        consts = variant(SYMMETRIC=sym, **flags, **soft)
        tag = ",".join(k for k, v in flags.items() if v and k != "PENALTY_MODE") or "plain"
        stag = soft_tag(dict(soft, ENTROPY=False)) + (",mass" if soft["HAS_MASS"] else "")
        add(f"target_grad[{tag},sym={sym}{stag}]", _target_grad_kernel, consts, dtype, matmul, soft["SOFT"],
            "target_grad")
    for dtype in SUPPORTED_DTYPES:  # (the margin rule does not combine with soft targets)
        add("target_pair_dots", pair_dots_kernel, {}, dtype, True, False, "target_stats")
    return specs
