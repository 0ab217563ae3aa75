"""The engine's general target (``fastcon/kernels/targets.py``) on the chunked Triton path.

As in ``chunked.py``, ``torch.mm`` writes each row chunk of dot products (over the columns some row
of the chunk keeps) and Triton epilogue kernels read it once per pass. The target's decisions are
one tile function, ``target_tile``: given a tile of dot products however it was produced (a chunk in
memory here; a matmul kernel's accumulator later), the global row and column indices of the tile and
the target's O(N) vectors, it returns which pairs are kept, which are positives, and their logits
(with the hardness penalty). The two epilogues around it:

* ``_target_stats_kernel``: per row (and, for a symmetric loss, per row block of each column) the
  LSE over the kept pairs as float64 partials (merged by ``chunked._merge_lse_kernel``), and the
  number of positives and their summed logits (with label smoothing also of the kept pairs);
* ``_target_grad_kernel``: ``G = w_row·(P_row − Q_row) + w_col·(P_col − Q_col)`` on the kept pairs,
  with P − q at a single positive formed through expm1 (exact for a confident one), stored in
  place (fp32) or in a bf16/fp16 buffer for the gradient GEMMs, and per-program partials of ``Σ G·dot``
  and ``Σ G``.

The target's vectors travel packed: per row (id, excluded column, range lo, range hi, owner, own rule)
as int64 and the penalty flag, per column (id, owner) as int64 and (kept, penalised) flags, with the
defaults of absent fields filled in; the margin enters as each row's bound ``A_i·B_pair − margin``
read from the same chunk of dot products. Semantics and results match ``torch_chunked`` (to fp32
rounding); the loss and the weights between the passes are ``targets.loss_and_weights``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import mm_acc, row_chunks
from . import launch
from .chunked import (LOG2E, _check, _expm1, _g_buffer, _grad_gemms, _grid, _lse64, _merge, _online_rows,
                      _split_lse, _tile_lse_parts, grad_tile_scale)
from .configs import SUPPORTED_DTYPES, chunked_config

ROW_FIELDS = 6  # id, excluded column, range lo, range hi, owner, own rule
COL_FIELDS = 2  # id, owner


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def target_tile(d, rows, cols, mask_m, mask_n, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr,
                dense_ptr, stride_dense, bound, scale, bias, penalty,
                HAS_MARGIN: tl.constexpr, HAS_PENALTY: tl.constexpr, PENALTY_MODE: tl.constexpr,
                HAS_DENSE: tl.constexpr):
    """(kept, positive, logits) of a tile ``d`` of dot products A_i·B_j (unscaled, fp32) whose global
    row indices are ``rows`` and column indices ``cols`` (targets.py states the rules). Dropped pairs
    and the tile's padding (outside mask_m × mask_n) are not kept; ``bound`` is each row's
    ``A_i·B_pair − margin`` (used with HAS_MARGIN)."""
    rid = tl.load(row_info_ptr + rows * 6 + 0, mask=mask_m, other=-2)
    excl = tl.load(row_info_ptr + rows * 6 + 1, mask=mask_m, other=-1)
    lo = tl.load(row_info_ptr + rows * 6 + 2, mask=mask_m, other=0)
    hi = tl.load(row_info_ptr + rows * 6 + 3, mask=mask_m, other=0)
    rown = tl.load(row_info_ptr + rows * 6 + 4, mask=mask_m, other=-1)
    rule = tl.load(row_info_ptr + rows * 6 + 5, mask=mask_m, other=0)
    cid = tl.load(col_info_ptr + cols * 2 + 0, mask=mask_n, other=-3)
    cown = tl.load(col_info_ptr + cols * 2 + 1, mask=mask_n, other=-1)
    ckeep = tl.load(col_flag_ptr + cols * 2 + 0, mask=mask_n, other=0)
    c2 = cols[None, :]
    pos = (cid[None, :] >= 0) & (cid[None, :] == rid[:, None])
    keep = (mask_m[:, None] & mask_n[None, :]) & (ckeep[None, :] != 0)
    keep = keep & (c2 != excl[:, None]) & (c2 >= lo[:, None]) & (c2 < hi[:, None])
    owned = cown[None, :] >= 0
    own = owned & (cown[None, :] == rown[:, None])
    keep = keep & ~((rule[:, None] == 1) & own) & ~((rule[:, None] == 2) & owned & ~own)
    if HAS_DENSE:
        dense = tl.load(dense_ptr + rows[:, None].to(tl.int64) * stride_dense + c2,
                        mask=mask_m[:, None] & mask_n[None, :], other=0)
        keep = keep & (dense != 0)
    if HAS_MARGIN:
        keep = keep & (pos | (d <= bound[:, None]))
    pos = pos & keep
    t = d * scale + bias
    if HAS_PENALTY:
        prow = tl.load(row_flag_ptr + rows, mask=mask_m, other=0)
        pcol = tl.load(col_flag_ptr + cols * 2 + 1, mask=mask_n, other=0)
        pen = keep & ~pos & (prow[:, None] != 0) & (pcol[None, :] != 0)
        if PENALTY_MODE == 1:
            pen = pen & own
        if PENALTY_MODE == 2:
            pen = pen & ~own
        t = tl.where(pen, t + penalty * d, t)
    return keep, pos, t


@triton.jit
def _program(scale_ptr, bias_ptr, bound_ptr, R, W, row0, tiles_per_split, HAS_MARGIN: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What program (m, s) of an epilogue over a chunk of R rows × W columns works on: (m, s), its
    rows (local offsets, mask, global indices), their margin bounds, the scale and bias, and its
    column tiles [t0, t1)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < R
    if HAS_MARGIN:
        bound = tl.load(bound_ptr + offs_m, mask=mask_m, other=0.0)
    else:
        bound = tl.zeros([BLOCK_M], tl.float32)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(W, BLOCK_N))
    return (pid_m, pid_s, offs_m, mask_m, row0 + offs_m, bound, tl.load(scale_ptr).to(tl.float32),
            tl.load(bias_ptr).to(tl.float32), t0, t1)


@triton.jit
def _target_stats_kernel(
    dot_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr, dense_ptr, bound_ptr,
    row_part_ptr, row_sums_ptr, col_part_ptr, col_sums_ptr,
    R, W, row0, col0, tiles_per_split,
    stride_dm, stride_dense, stride_rp, stride_rs, stride_cp, stride_cs, penalty,
    SYMMETRIC: tl.constexpr, SMOOTHING: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_PENALTY: tl.constexpr,
    PENALTY_MODE: tl.constexpr, HAS_DENSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (m, s): rows [m·BM, (m+1)·BM) of the chunk × the column tiles of split s. Writes
    row_part[s, rows] (float64 LSE over the split's kept pairs), row_sums[s, k, rows] (k = 0: number
    of positives, 1: their summed logits, 2 and 3 the same of the kept pairs with SMOOTHING) and, when
    SYMMETRIC, col_part[m, cols] and col_sums[m, k, cols], the same per column over the row block."""
    pid_m, pid_s, offs_m, mask_m, rows, bound, scale, bias, t0, t1 = _program(
        scale_ptr, bias_ptr, bound_ptr, R, W, row0, tiles_per_split, HAS_MARGIN, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    n_pos = tl.zeros([BLOCK_M], tl.float32)
    s_pos = tl.zeros([BLOCK_M], tl.float32)
    n_keep = tl.zeros([BLOCK_M], tl.float32)
    s_keep = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(t0, t1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < W
        d = tl.load(dot_ptr + offs_m[:, None] * stride_dm + offs_n[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        keep, pos, t = target_tile(d, rows, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                   row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, bound, scale, bias, penalty,
                                   HAS_MARGIN, HAS_PENALTY, PENALTY_MODE, HAS_DENSE)
        t = tl.where(keep, t, float("-inf"))
        m_i, r_i = _online_rows(m_i, r_i, t)
        t_pos = tl.where(pos, t, 0.0)
        n_pos += tl.sum(pos.to(tl.float32), 1)
        s_pos += tl.sum(t_pos, 1)
        t_keep = tl.where(keep, t, 0.0)
        if SMOOTHING:
            n_keep += tl.sum(keep.to(tl.float32), 1)
            s_keep += tl.sum(t_keep, 1)
        if SYMMETRIC:
            c_m, c_r = _tile_lse_parts(t, 0)
            tl.store(col_part_ptr + pid_m * stride_cp + offs_n, _lse64(c_m, c_r), mask=mask_n)
            base = col_sums_ptr + pid_m * stride_cs + offs_n
            tl.store(base, tl.sum(pos.to(tl.float32), 0), mask=mask_n)
            tl.store(base + W, tl.sum(t_pos, 0), mask=mask_n)
            if SMOOTHING:
                tl.store(base + 2 * W, tl.sum(keep.to(tl.float32), 0), mask=mask_n)
                tl.store(base + 3 * W, tl.sum(t_keep, 0), mask=mask_n)
    tl.store(row_part_ptr + pid_s * stride_rp + offs_m, _lse64(m_i, r_i), mask=mask_m)
    base = row_sums_ptr + pid_s * stride_rs + offs_m
    tl.store(base, n_pos, mask=mask_m)
    tl.store(base + R, s_pos, mask=mask_m)
    if SMOOTHING:
        tl.store(base + 2 * R, n_keep, mask=mask_m)
        tl.store(base + 3 * R, s_keep, mask=mask_m)


@triton.jit
def _target_grad_kernel(
    dot_ptr, g_ptr, scale_ptr, bias_ptr, row_info_ptr, col_info_ptr, row_flag_ptr, col_flag_ptr, dense_ptr,
    bound_ptr, row_lse_ptr, q_row_pos_ptr, q_row_keep_ptr, col_lse_ptr, q_col_pos_ptr, q_col_keep_ptr, w_col_ptr,
    part_ptr,
    R, W, row0, col0, tiles_per_split, num_programs,
    stride_dm, stride_gm, stride_dense, penalty, w_row, g_scale,
    SYMMETRIC: tl.constexpr, HAS_MARGIN: tl.constexpr, HAS_PENALTY: tl.constexpr, PENALTY_MODE: tl.constexpr,
    HAS_DENSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """G of program (m, s)'s tiles on the kept pairs (0 elsewhere):
    ``w_row·(exp(t − row_lse) − q_row_pos·[pos] − q_row_keep) [+ w_col·(exp(t − col_lse) − q_col_pos·[pos]
    − q_col_keep)]``, the float64 LSEs split into fp32 (hi, lo), ``exp(x) − q`` at a positive with
    q > ½ formed as ``expm1(x) + (1 − q)``. G·g_scale is stored to g_ptr (which may alias dot_ptr: each element is read
    before the same program writes it); part[0, p] = Σ G·dot, part[1, p] = Σ G (unscaled)."""
    pid_m, pid_s, offs_m, mask_m, rows, bound, scale, bias, t0, t1 = _program(
        scale_ptr, bias_ptr, bound_ptr, R, W, row0, tiles_per_split, HAS_MARGIN, BLOCK_M, BLOCK_N)
    pid = pid_m * tl.num_programs(1) + pid_s
    row_hi, row_lo = _split_lse(tl.load(row_lse_ptr + offs_m, mask=mask_m, other=float("inf")))
    qp = tl.load(q_row_pos_ptr + offs_m, mask=mask_m, other=0.0)
    qk = tl.load(q_row_keep_ptr + offs_m, mask=mask_m, other=0.0)
    acc_gd = tl.zeros([BLOCK_M], tl.float32)
    acc_g = tl.zeros([BLOCK_M], tl.float32)
    for ct in range(t0, t1):
        offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < W
        mask = mask_m[:, None] & mask_n[None, :]
        d = tl.load(dot_ptr + offs_m[:, None] * stride_dm + offs_n[None, :], mask=mask, other=0.0)
        keep, pos, t = target_tile(d, rows, col0 + offs_n, mask_m, mask_n, row_info_ptr, col_info_ptr,
                                   row_flag_ptr, col_flag_ptr, dense_ptr, stride_dense, bound, scale, bias, penalty,
                                   HAS_MARGIN, HAS_PENALTY, PENALTY_MODE, HAS_DENSE)
        x = (t - row_hi[:, None]) - row_lo[:, None]
        e = tl.exp2(x * LOG2E)
        # at a positive, P − q: for q near 1 (a single positive) as expm1(x) + (1 − q), which keeps the
        # precision of a confident P ≈ 1; for smaller q directly
        g = tl.where(pos, tl.where(qp[:, None] > 0.5, _expm1(x) + (1.0 - qp[:, None]), e - qp[:, None]), e)
        g = w_row * (g - qk[:, None])
        if SYMMETRIC:
            col_hi, col_lo = _split_lse(tl.load(col_lse_ptr + offs_n, mask=mask_n, other=float("inf")))
            qcp = tl.load(q_col_pos_ptr + offs_n, mask=mask_n, other=0.0)
            qck = tl.load(q_col_keep_ptr + offs_n, mask=mask_n, other=0.0)
            wc = tl.load(w_col_ptr + offs_n, mask=mask_n, other=0.0)
            xc = (t - col_hi[None, :]) - col_lo[None, :]
            ec = tl.exp2(xc * LOG2E)
            gc = tl.where(pos, tl.where(qcp[None, :] > 0.5, _expm1(xc) + (1.0 - qcp[None, :]), ec - qcp[None, :]),
                          ec) - qck[None, :]
            g += tl.where(wc[None, :] != 0.0, wc[None, :] * gc, 0.0)
        g = tl.where(keep, g, 0.0)
        acc_gd += tl.sum(g * d, 1)
        acc_g += tl.sum(g, 1)
        tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], (g * g_scale).to(g_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(part_ptr + pid, tl.sum(acc_gd, 0))
    tl.store(part_ptr + num_programs + pid, tl.sum(acc_g, 0))


# ------------------------------------------------------------------------------------------ host side
class _Packed:
    """The target's vectors as the kernels read them (defaults of absent fields filled in)."""

    def __init__(self, target, na: int, nb: int, device):
        i64 = dict(dtype=torch.int64, device=device)
        if target.penalty_mode != 0 and (target.row_owner is None or target.col_owner is None):
            raise ValueError("a hardness penalty by ownership needs row_owner and col_owner")
        row = torch.empty((na, ROW_FIELDS), **i64)
        row[:, 0] = target.row_ids
        row[:, 1] = -1 if target.exclude_col is None else target.exclude_col
        if target.col_range is None:
            row[:, 2], row[:, 3] = 0, nb
        else:
            row[:, 2:4] = target.col_range
        owners = target.row_owner is not None and target.col_owner is not None
        row[:, 4] = target.row_owner if owners else -1
        row[:, 5] = target.own_rule if (owners and target.own_rule is not None) else 0
        col = torch.empty((nb, COL_FIELDS), **i64)
        col[:, 0] = target.col_ids
        col[:, 1] = target.col_owner if owners else -1
        flags = torch.ones((nb, 2), dtype=torch.uint8, device=device)
        if target.col_keep is not None:
            flags[:, 0] = target.col_keep
        if target.penalty_cols is not None:
            flags[:, 1] = target.penalty_cols
        row_flag = torch.ones(na, dtype=torch.uint8, device=device)
        if target.penalty_rows is not None:
            row_flag[:] = target.penalty_rows
        self.row, self.col, self.col_flag, self.row_flag = row, col, flags, row_flag
        self.dense = (target.mask.to(torch.uint8).contiguous() if target.mask is not None
                      else torch.zeros((1, 1), dtype=torch.uint8, device=device))
        self.has_dense = target.mask is not None
        self.has_margin = target.margin is not None
        self.has_penalty = target.penalty != 0.0
        self.penalty = float(target.penalty)
        self.penalty_mode = int(target.penalty_mode) if self.has_penalty else 0

    def args(self):
        return (self.row, self.col, self.row_flag, self.col_flag, self.dense)

    def flags(self):
        return dict(HAS_MARGIN=self.has_margin, HAS_PENALTY=self.has_penalty, PENALTY_MODE=self.penalty_mode,
                    HAS_DENSE=self.has_dense)


def _bounds(target, dot, r0: int, r1: int, c0: int):
    """Each row's A_i·B_pair − margin from the chunk's own dot products (fp32), or a dummy."""
    if target.margin is None:
        return dot.new_zeros(1)
    local = torch.arange(r1 - r0, device=dot.device)
    return (dot[local, local + r0 + target.pair_offset - c0] - target.margin).contiguous()


def target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None):
    """Pass 1 of the general target (the contract of ``torch_chunked.target_stats``)."""
    from ..targets import TargetStats, column_span, require_hard_targets

    _check(a, b)
    require_hard_targets(target, "triton")
    cfg = chunked_config("target_stats")
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    f32, f64 = torch.float32, torch.float64
    packed = _Packed(target, na, nb, dev)
    st = TargetStats.empty(na, nb, f32, dev)
    cached, kept = [], 0
    dummy = torch.zeros(1, dtype=f64, device=dev)
    for r0, r1 in row_chunks(na, chunk_rows):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        dot = mm_acc(a[r0:r1], b[c0:c1].T)
        r, w = r1 - r0, c1 - c0
        m_blocks, splits, per_split = _grid(r, w, cfg.block_m, cfg.block_n, dev)
        row_part = torch.empty((splits, r), dtype=f64, device=dev)
        row_sums = torch.zeros((splits, 4, r), dtype=f32, device=dev)
        col_part = torch.empty((m_blocks, w), dtype=f64, device=dev) if symmetric else dummy
        col_sums = torch.zeros((m_blocks, 4, w), dtype=f32, device=dev) if symmetric else dummy.float()
        launch(_target_stats_kernel)[(m_blocks, splits)](
            dot, scale, bias, *packed.args(), _bounds(target, dot, r0, r1, c0),
            row_part, row_sums, col_part, col_sums,
            r, w, r0, c0, per_split,
            dot.stride(0), packed.dense.stride(0), row_part.stride(0), row_sums.stride(0),
            col_part.stride(0) if symmetric else 0, col_sums.stride(0) if symmetric else 0, packed.penalty,
            SYMMETRIC=bool(symmetric), SMOOTHING=bool(smoothing), **packed.flags(),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        _merge(row_part, st.row_lse[r0:r1], accumulate=False)
        totals = row_sums.double().sum(dim=0)
        st.row_pos[r0:r1], st.row_sum_pos[r0:r1] = totals[0].float(), totals[1]
        st.row_keep[r0:r1], st.row_sum_keep[r0:r1] = totals[2].float(), totals[3]
        if symmetric:
            _merge(col_part, st.col_lse[c0:c1], accumulate=True)
            ctot = col_sums.double().sum(dim=0)
            st.col_pos[c0:c1] += ctot[0].float()
            st.col_sum_pos[c0:c1] += ctot[1]
            st.col_keep[c0:c1] += ctot[2].float()
            st.col_sum_keep[c0:c1] += ctot[3]
        size = dot.numel() * dot.element_size()
        if len(cached) * chunk_rows == r0 and kept + size <= cache_bytes:
            cached.append(dot)
            kept += size
    return st, cached


def target_grad(a, b, scale, bias, target, weights, chunk_rows, cached=()):
    """Pass 2 of the general target (the contract of ``torch_chunked.target_grad``)."""
    from ..targets import column_span

    _check(a, b)
    cfg = chunked_config("target_grad")
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    w8 = weights
    symmetric = w8.col_lse is not None
    packed = _Packed(target, na, nb, dev)
    grad_a = torch.zeros(a.shape, dtype=torch.float32, device=dev)
    grad_b = torch.zeros(b.shape, dtype=torch.float32, device=dev)
    row_lse = w8.row_lse.to(torch.float64).contiguous()
    q_row_pos, q_row_keep = w8.q_row_pos.float().contiguous(), w8.q_row_keep.float().contiguous()
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    if symmetric:
        col_lse = w8.col_lse.to(torch.float64).contiguous()
        q_col_pos, q_col_keep = w8.q_col_pos.float().contiguous(), w8.q_col_keep.float().contiguous()
        w_col = w8.w_col.float().contiguous()
    else:
        col_lse, q_col_pos, q_col_keep, w_col = dummy.double(), dummy, dummy, dummy
    # |G| <= w_row + max w_col: the bound of the fp16 lift, from the loss weights, not from the data
    g_scale = grad_tile_scale(a.dtype, abs(float(w8.w_row)) + (float(w8.w_col_max) if symmetric else 0.0))
    parts = []
    for k, (r0, r1) in enumerate(row_chunks(na, chunk_rows)):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        dot = cached[k] if k < len(cached) else mm_acc(a[r0:r1], b[c0:c1].T)
        if k < len(cached):
            dot = dot.clone()  # G is written in place
        r, w = r1 - r0, c1 - c0
        g_buf = _g_buffer(a, r, w)
        g = dot if g_buf is None else g_buf
        m_blocks, splits, per_split = _grid(r, w, cfg.block_m, cfg.block_n, dev)
        nprog = m_blocks * splits
        part = torch.empty((2, nprog), dtype=torch.float32, device=dev)
        sl = slice(c0, c1)
        launch(_target_grad_kernel)[(m_blocks, splits)](
            dot, g, scale, bias, *packed.args(), _bounds(target, dot, r0, r1, c0),
            row_lse[r0:r1], q_row_pos[r0:r1], q_row_keep[r0:r1],
            col_lse[sl] if symmetric else col_lse, q_col_pos[sl] if symmetric else q_col_pos,
            q_col_keep[sl] if symmetric else q_col_keep, w_col[sl] if symmetric else w_col, part,
            r, w, r0, c0, per_split, nprog,
            dot.stride(0), g.stride(0), packed.dense.stride(0), packed.penalty, float(w8.w_row), g_scale,
            SYMMETRIC=symmetric, **packed.flags(),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        parts.append(part)
        _grad_gemms(g, a[r0:r1], b[c0:c1], scale, grad_a[r0:r1], grad_b[c0:c1], g_scale)
    grad_b.mul_(scale)
    totals = torch.cat(parts, dim=1).sum(dim=1) if parts else torch.zeros(2, dtype=torch.float32, device=dev)
    return grad_a, grad_b, totals[0].clone(), totals[1].clone()


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    """Softmax loss of a general target and its gradients (``targets.two_pass_target`` over this
    backend's two passes)."""
    from ..targets import two_pass_target

    return two_pass_target(target_stats, target_grad, a, b, scale, bias, target, eps, symmetric, chunk_rows,
                           need_grad, cache_bytes)


# ------------------------------------------------------------------------------------ compile gate
def compile_specs():
    """Every (kernel, constexprs, launch config) this module ships, for each supported input dtype
    (see ``chunked.compile_specs``; used by tests/test_triton_compile.py)."""
    specs = []
    i32, f32p, f64p, i64p, u8p = "i32", "*fp32", "*fp64", "*i64", "*u8"
    tri = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    target_sig = {"row_info_ptr": i64p, "col_info_ptr": i64p, "row_flag_ptr": u8p, "col_flag_ptr": u8p,
                  "dense_ptr": u8p, "bound_ptr": f32p}
    none = dict(HAS_MARGIN=False, HAS_PENALTY=False, PENALTY_MODE=0, HAS_DENSE=False)
    margin = dict(none, HAS_MARGIN=True)
    penalty = dict(none, HAS_PENALTY=True, PENALTY_MODE=2)
    everything = dict(HAS_MARGIN=True, HAS_PENALTY=True, PENALTY_MODE=1, HAS_DENSE=True)
    cfg = chunked_config("target_stats")
    for flags, sym, smooth in ((none, False, False), (margin, False, False), (penalty, False, True),
                               (none, True, False), (everything, True, True)):
        sig = {"dot_ptr": f32p, "scale_ptr": f32p, "bias_ptr": f32p, **target_sig,
               "row_part_ptr": f64p, "row_sums_ptr": f32p, "col_part_ptr": f64p, "col_sums_ptr": f32p,
               "R": i32, "W": i32, "row0": i32, "col0": i32, "tiles_per_split": i32,
               "stride_dm": i32, "stride_dense": i32, "stride_rp": i32, "stride_rs": i32, "stride_cp": i32,
               "stride_cs": i32, "penalty": "fp32", "SYMMETRIC": "constexpr", "SMOOTHING": "constexpr",
               "HAS_MARGIN": "constexpr", "HAS_PENALTY": "constexpr", "PENALTY_MODE": "constexpr",
               "HAS_DENSE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        consts = dict(SYMMETRIC=sym, SMOOTHING=smooth, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags)
        tag = ",".join(k for k, v in flags.items() if v and k != "PENALTY_MODE") or "plain"
        specs.append(dict(name=f"target_stats[{tag},sym={sym},smooth={smooth}]", fn=_target_stats_kernel,
                          signature=sig, constexprs=consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                          uses_dot=False, dtype="float32", config=cfg))
    cfg = chunked_config("target_grad")
    for dtype in SUPPORTED_DTYPES:
        variants = [(none, False), (everything, True)]
        if dtype == "float32":
            variants += [(margin, False), (penalty, False), (none, True)]
        for flags, sym in variants:
            sig = {"dot_ptr": f32p, "g_ptr": "*" + tri[dtype], "scale_ptr": f32p, "bias_ptr": f32p, **target_sig,
                   "row_lse_ptr": f64p, "q_row_pos_ptr": f32p, "q_row_keep_ptr": f32p, "col_lse_ptr": f64p,
                   "q_col_pos_ptr": f32p, "q_col_keep_ptr": f32p, "w_col_ptr": f32p, "part_ptr": f32p,
                   "R": i32, "W": i32, "row0": i32, "col0": i32, "tiles_per_split": i32, "num_programs": i32,
                   "stride_dm": i32, "stride_gm": i32, "stride_dense": i32, "penalty": "fp32", "w_row": "fp32",
                   "g_scale": "fp32", "SYMMETRIC": "constexpr", "HAS_MARGIN": "constexpr",
                   "HAS_PENALTY": "constexpr", "PENALTY_MODE": "constexpr", "HAS_DENSE": "constexpr",
                   "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
            consts = dict(SYMMETRIC=sym, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **flags)
            tag = ",".join(k for k, v in flags.items() if v and k != "PENALTY_MODE") or "plain"
            specs.append(dict(name=f"target_grad[{tag},sym={sym}]", fn=_target_grad_kernel, signature=sig,
                              constexprs=consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                              uses_dot=False, dtype=dtype, config=cfg))
    return specs
