"""The engine in chunked plain PyTorch: the portable fallback, and the executable statement of the
backend contract in ``fastcon/kernels/__init__.py``."""
from __future__ import annotations

import torch

from ._common import (acc_dtype, lse_parts, mm_acc, row_chunks, split_lse, stats_pass, take_cached,
                      two_pass_softmax)


def _positives(r0, r1, pos_offset, nb, device):
    """(row index within the chunk, column) of the positives of rows [r0, r1)."""
    rows = torch.arange(r0, r1, device=device)
    cols = rows + pos_offset
    keep = cols < nb
    return rows[keep] - r0, cols[keep]


def _reduce_chunk(g, dot, a_rows, b_acc, scale, grad_a_rows, grad_b, grad_scale, grad_bias):
    """A chunk's share of the gradients from its G = ∂loss/∂logits (rows × columns):
    ``grad_a_rows = scale·G·B``, ``grad_b += Gᵀ·A_rows`` (scaled once at the end), ``∂scale += Σ G∘dot``,
    ``∂bias += Σ G``. G is consumed: ``Σ G∘dot`` is taken in G's own storage, last, so that no
    further chunk-sized buffer is allocated. Subnormal entries of G are 0 in the products (as the C++
    kernels write them: ``flush_subnormal`` in csrc/cpu/kernels.h; far below what fp32 resolves beside
    a row's other terms, and an order of magnitude slower in a CPU GEMM)."""
    grad_bias += g.sum()
    _flush_subnormal(g)
    torch.mm(g, b_acc, out=grad_a_rows)
    grad_a_rows.mul_(scale)
    grad_b.addmm_(g.T, a_rows.to(b_acc.dtype))
    grad_scale += g.mul_(dot).sum()


def _flush_subnormal(g):
    """G's subnormal entries set to 0, in place (not in float64)."""
    if g.dtype != torch.float64:
        g.masked_fill_(g.abs() < torch.finfo(g.dtype).tiny, 0.0)


def _sigmoid_chunk(dot, scale, bias, r0, r1, pos_offset, nb, w, need_grad):
    """SigLIP on a chunk of dot products of rows [r0, r1): (Σ softplus(−z·S), G = w·(σ(S) − [pos]) or None
    without ``need_grad``)."""
    s_c = dot * scale + bias
    rows, cols = _positives(r0, r1, pos_offset, nb, dot.device)
    # softplus(-z·l): negatives give softplus(l), positives softplus(-l) = softplus(l) - l.
    loss = torch.nn.functional.softplus(s_c).sum() - s_c[rows, cols].sum()
    if not need_grad:
        return loss, None
    g = torch.sigmoid(s_c)
    g[rows, cols] -= 1
    return loss, g.mul_(w)


def lse_stats(a, b, scale, bias, pos_offset, chunk_rows):
    row_lse, col_lse, pos_logit, _ = stats_pass(a, b, chunk_rows, 0, _stats_epilogue(scale, bias, pos_offset))
    return row_lse, col_lse, pos_logit


def _stats_epilogue(scale, bias, pos_offset):
    def chunk_stats(dot, r0, r1, row_lse, col_lse, pos_logit):
        s_c = dot * scale + bias
        rows, cols = _positives(r0, r1, pos_offset, s_c.shape[1], s_c.device)
        pos_logit[rows + r0] = s_c[rows, cols]
        row_lse[r0:r1] = lse_parts(s_c, dim=1)
        col_lse.copy_(torch.logaddexp(col_lse, lse_parts(s_c, dim=0)))
    return chunk_stats


def softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows,
                 _cached=None):
    acc = acc_dtype(a.dtype)
    na, nb = a.shape[0], b.shape[0]
    b_acc = b.to(acc)
    grad_a = torch.empty(a.shape, dtype=acc, device=a.device)
    grad_b = torch.zeros(b.shape, dtype=acc, device=a.device)
    grad_scale = torch.zeros((), dtype=acc, device=a.device)
    grad_bias = torch.zeros((), dtype=acc, device=a.device)
    row_hi, row_lo = split_lse(row_lse, acc)
    col_hi, col_lo = split_lse(col_lse, acc)
    for k, (r0, r1) in enumerate(row_chunks(na, chunk_rows)):
        dot = take_cached(_cached, k)
        if dot is None:
            dot = mm_acc(a[r0:r1], b.T)
        # at most three chunk-sized buffers at once: the dot products, the logits and G
        s_c = dot * scale + bias
        g = (s_c - col_hi[None, :]).sub_(col_lo[None, :]).exp_().mul_(w_col) if w_col != 0 else None
        p_row = s_c.sub_(row_hi[r0:r1, None]).sub_(row_lo[r0:r1, None]).exp_().mul_(w_row)
        g = p_row if g is None else g.add_(p_row)
        del s_c, p_row
        rows, cols = _positives(r0, r1, pos_offset, nb, a.device)
        g[rows, cols] -= w_pos
        _reduce_chunk(g, dot, a[r0:r1], b_acc, scale, grad_a[r0:r1], grad_b, grad_scale, grad_bias)
    grad_b.mul_(scale)
    return grad_a, grad_b, grad_scale, grad_bias


def softmax_fused(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes):
    return two_pass_softmax(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes,
                            _stats_epilogue(scale, bias, pos_offset), softmax_grad)


def sigmoid_fused(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad):
    acc = acc_dtype(a.dtype)
    na, nb = a.shape[0], b.shape[0]
    total = torch.zeros((), dtype=acc, device=a.device)
    grad_a = grad_b = grad_scale = grad_bias = None
    if need_grad:
        b_acc = b.to(acc)
        grad_a = torch.empty(a.shape, dtype=acc, device=a.device)
        grad_b = torch.zeros(b.shape, dtype=acc, device=a.device)
        grad_scale = torch.zeros((), dtype=acc, device=a.device)
        grad_bias = torch.zeros((), dtype=acc, device=a.device)
    for r0, r1 in row_chunks(na, chunk_rows):
        dot = mm_acc(a[r0:r1], b.T)
        loss, g = _sigmoid_chunk(dot, scale, bias, r0, r1, pos_offset, nb, w, need_grad)
        total += loss
        if need_grad:
            _reduce_chunk(g, dot, a[r0:r1], b_acc, scale, grad_a[r0:r1], grad_b, grad_scale, grad_bias)
    if need_grad:
        grad_b.mul_(scale)
    return total, grad_a, grad_b, grad_scale, grad_bias


# ---------------------------------------------------------------------------------------------------
# The general target (fastcon/targets/): positives by id, dropped pairs, groups of rows
# sharing one softmax, the hardness penalty, label smoothing.

def target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None):
    """Pass 1 of a general target: per row (and, when ``symmetric``, per column) the LSE over the kept
    pairs (float64), the number of positives and their summed logits, and with ``smoothing`` the
    number of kept pairs and their summed logits; with soft targets (``teacher``: the
    ``targets.TeacherNorms`` of the teacher's pass) also the cross terms and, with ``entropy``, the
    targets' Σ Q·log Q. Returns (a ``targets.TargetStats``, the leading chunks of dot products that
    fit ``cache_bytes``)."""
    from ..targets import TargetStats, column_span, with_teacher

    na, nb = a.shape[0], b.shape[0]
    st = TargetStats.empty(na, nb, acc_dtype(a.dtype), a.device)
    counts = None
    if target.soft:
        f64, dev = torch.float64, a.device
        zeros = lambda n: torch.zeros(n, dtype=f64, device=dev)  # noqa: E731
        st = with_teacher(st, teacher, zeros(na), zeros(nb), *((zeros(na), zeros(nb)) if target.entropy else ()))
        counts = (teacher.row_pos, teacher.col_pos)
    cached, kept = [], 0
    for r0, r1 in row_chunks(na, chunk_rows):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        dot = mm_acc(a[r0:r1], b[c0:c1].T)
        _stats_chunk(target, st, dot, scale, bias, r0, r1, c0, c1, symmetric, smoothing, counts)
        size = dot.numel() * dot.element_size()
        if len(cached) * chunk_rows == r0 and kept + size <= cache_bytes:
            cached.append(dot)
            kept += size
    return st, cached


def _stats_chunk(target, st, dot, scale, bias, r0, r1, c0, c1, symmetric, smoothing, counts):
    """Pass 1's step on rows [r0, r1) × columns [c0, c1) of dot products ``dot``: the rows' LSEs, counts
    and sums, merged into the columns' (``st``: a ``targets.TargetStats``, updated in place)."""
    from ..targets import chunk_logits, chunk_masks

    pos, keep, pen = chunk_masks(target, dot, r0, r1, c0)
    s_c = chunk_logits(target, dot, scale, bias, pen)
    masked = s_c if keep is None else s_c.masked_fill(~keep, float("-inf"))
    st.row_lse[r0:r1] = lse_parts(masked, dim=1)
    s_pos = torch.where(pos, s_c, 0.0)
    st.row_pos[r0:r1] = pos.sum(1)
    st.row_sum_pos[r0:r1] = s_pos.sum(1)
    if symmetric:
        st.col_lse[c0:c1] = torch.logaddexp(st.col_lse[c0:c1], lse_parts(masked, dim=0))
        st.col_pos[c0:c1] += pos.sum(0)
        st.col_sum_pos[c0:c1] += s_pos.sum(0)
    if target.soft:
        _soft_terms(target, st, counts, s_c, pos, keep, symmetric, r0, r1, c0, c1)
    if smoothing:  # the smoothing term's counts and sums of the kept logits
        s_keep = s_c if keep is None else torch.where(keep, s_c, 0.0)
        st.row_keep[r0:r1] = c1 - c0 if keep is None else keep.sum(1)
        st.row_sum_keep[r0:r1] = s_keep.sum(1)
        if symmetric:
            st.col_keep[c0:c1] += r1 - r0 if keep is None else keep.sum(0)
            st.col_sum_keep[c0:c1] += s_keep.sum(0)


def teacher_probs(target, t, keep, row_norm, col_norm):
    """The teacher's row (and column) target probabilities of a chunk ``t`` on its kept pairs (0 on the
    dropped ones)."""
    from ..targets import TEACHER_LINEAR

    linear = target.teacher.kind == TEACHER_LINEAR
    f32 = t.dtype
    if linear:
        row = t / row_norm[:, None].to(f32)
        col = None if col_norm is None else t / col_norm[None, :].to(f32)
    else:
        hi, lo = split_lse(row_norm, f32)
        row = (t - hi[:, None]).sub_(lo[:, None]).exp_()
        col = None
        if col_norm is not None:
            chi, clo = split_lse(col_norm, f32)
            col = (t - chi[None, :]).sub_(clo[None, :]).exp_()
    if keep is not None:
        row = row.masked_fill_(~keep, 0.0)
        col = None if col is None else col.masked_fill_(~keep, 0.0)
    return row, col


def _soft_terms(target, st, counts, s_c, pos, keep, symmetric, r0, r1, c0, c1):
    """Pass 1 with soft targets: the cross terms Σ Qt·S and, with ``entropy``, Σ Q·log Q of the mixed
    targets Q = hard·[pos]/|P| + soft·Qt (no smoothing), for rows [r0, r1) × columns [c0, c1)."""
    from ..targets import hard_weight, teacher_chunk

    f64 = torch.float64
    t = teacher_chunk(target, r0, r1, c0, c1)
    q_row, q_col = teacher_probs(target, t, keep, st.t_row_norm[r0:r1],
                                 st.t_col_norm[c0:c1] if symmetric else None)
    s_kept = s_c if keep is None else torch.where(keep, s_c, 0.0)
    st.cross_row[r0:r1] = (q_row * s_kept).sum(1, dtype=f64)
    if symmetric:
        st.cross_col[c0:c1] += (q_col * s_kept).sum(0, dtype=f64)
    if target.entropy:
        h = hard_weight(target, 0.0)
        row_pos, col_pos = counts
        mix = q_row.mul(target.soft).add_(pos * (h / row_pos[r0:r1].clamp_min(1))[:, None])
        st.ent_row[r0:r1] = torch.xlogy(mix, mix).sum(1, dtype=f64)
        if symmetric:
            mix = q_col.mul(target.soft).add_(pos * (h / col_pos[c0:c1].clamp_min(1))[None, :])
            st.ent_col[c0:c1] += torch.xlogy(mix, mix).sum(0, dtype=f64)



teacher_stats = target_stats  # the teacher's pass (targets.teacher_stats) is this backend's pass 1

def target_grad(a, b, scale, bias, target, weights, chunk_rows, cached=()):
    """Pass 2 of a general target: ``G = w_r·(P_row − Q_row) + w_c·(P_col − Q_col)`` on the kept pairs
    (``weights``: a ``targets.TargetWeights``; P_row from each row's group LSE), reduced to
    (grad_a, grad_b, grad_scale, grad_bias) by two GEMMs per chunk. The hardness penalty enters the
    logits only (stop-gradient)."""
    from ..targets import column_span

    acc = acc_dtype(a.dtype)
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    grad_a = torch.zeros(a.shape, dtype=acc, device=dev)
    grad_b = torch.zeros(b.shape, dtype=acc, device=dev)
    grad_scale = torch.zeros((), dtype=acc, device=dev)
    grad_bias = torch.zeros((), dtype=acc, device=dev)
    lse = _split_weights(weights, acc)
    for k, (r0, r1) in enumerate(row_chunks(na, chunk_rows)):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        dot = take_cached(cached, k)
        if dot is None:
            dot = mm_acc(a[r0:r1], b[c0:c1].T)
        g = _grad_chunk(target, weights, lse, dot, scale, bias, r0, r1, c0, c1)
        _reduce_chunk(g, dot, a[r0:r1], b[c0:c1].to(acc), scale, grad_a[r0:r1], grad_b[c0:c1], grad_scale,
                      grad_bias)
    grad_b.mul_(scale)
    return grad_a, grad_b, grad_scale, grad_bias


def _split_weights(w, acc):
    """Pass 2's float64 LSEs split in (hi, lo) of ``acc`` (row, then column: None without a column
    direction), and whether the smoothing targets are on."""
    symmetric = w.col_lse is not None
    smoothing = bool((w.q_row_keep != 0).any()) or (symmetric and bool((w.q_col_keep != 0).any()))
    cols = split_lse(w.col_lse, acc) if symmetric else (None, None)
    return (*split_lse(w.row_lse, acc), *cols, smoothing)


def _grad_chunk(target, w, lse, dot, scale, bias, r0, r1, c0, c1):
    """Pass 2's G on rows [r0, r1) × columns [c0, c1) of dot products ``dot`` (``w``: the
    ``targets.TargetWeights``, ``lse``: ``_split_weights`` of them), zero on the dropped pairs."""
    from ..targets import chunk_logits, chunk_masks

    row_hi, row_lo, col_hi, col_lo, smoothing = lse
    symmetric = col_hi is not None
    pos, keep, pen = chunk_masks(target, dot, r0, r1, c0)
    s_c = chunk_logits(target, dot, scale, bias, pen)
    # P − Q on the kept pairs (zero on the dropped ones, whose logits are −∞ here: a dropped logit
    # above the row's LSE would overflow), in fp32 with the float64 LSEs split in (hi, lo) as the
    # other backends do
    if keep is not None:
        s_c.masked_fill_(~keep, float("-inf"))
    g = (s_c - row_hi[r0:r1, None]).sub_(row_lo[r0:r1, None]).exp_()
    if w.row_mass is not None:
        g.mul_(w.row_mass[r0:r1, None])
    g.sub_(pos * w.q_row_pos[r0:r1, None])
    if smoothing:
        g.sub_(w.q_row_keep[r0:r1, None])
    q_row = q_col = None
    if target.soft:
        from ..targets import teacher_chunk

        q_row, q_col = teacher_probs(target, teacher_chunk(target, r0, r1, c0, c1), keep,
                                     w.t_row_norm[r0:r1], w.t_col_norm[c0:c1] if symmetric else None)
        g.sub_(q_row, alpha=target.soft)
    g.mul_(w.w_row)
    if symmetric:
        p_col = (s_c - col_hi[None, c0:c1]).sub_(col_lo[None, c0:c1]).exp_()
        if w.col_mass is not None:
            p_col.mul_(w.col_mass[None, c0:c1])
        p_col.sub_(pos * w.q_col_pos[None, c0:c1])
        if smoothing:
            p_col.sub_(w.q_col_keep[None, c0:c1])
        if q_col is not None:
            p_col.sub_(q_col, alpha=target.soft)
        g.add_(p_col.mul_(w.w_col[None, c0:c1]))
        del p_col
    del s_c
    if keep is not None:
        g.masked_fill_(~keep, 0.0)
    return g


# ---------------------------------------------------------------------------------------------------
# Matryoshka prefixes in one pass over D (docs/engine.md): prefix k's tile is s·r_k⊙P_k⊙c_kᵀ + b with
# P_k = A[:, :d_k]·B[:, :d_k]ᵀ, read from one accumulator over the D slices.

def prefix_dots(a, b, prefix, r0, r1, c0, c1):
    """For k = K−1 … 0 (the smallest prefix first): (k, P_k, r_k⊙P_k⊙c_kᵀ) of rows [r0, r1) × columns
    [c0, c1). P_k is one accumulator to which each D slice adds its product (so the chunk costs the
    GEMM of the largest prefix); the scaled tile is a new tensor."""
    acc, lo = None, 0
    for k in reversed(range(len(prefix.dims))):
        hi = prefix.dims[k]
        part = mm_acc(a[r0:r1, lo:hi], b[c0:c1, lo:hi].T)
        acc = part if acc is None else acc.add_(part)
        lo = hi
        rs, cs = prefix.row_scale[r0:r1, k].to(acc.dtype), prefix.col_scale[c0:c1, k].to(acc.dtype)
        yield k, acc, acc * rs[:, None] * cs[None, :]


def target_prefix_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, prefix):
    """Pass 1 of a general target at every Matryoshka prefix (``prefix``: a ``targets.Prefix``) in one
    pass over D: each prefix's tile goes through pass 1's chunk step with statistics of its own.
    Returns a list of ``targets.TargetStats``, one per prefix (largest first); no soft targets."""
    from ..targets import TargetStats, column_span

    na, nb = a.shape[0], b.shape[0]
    sts = [TargetStats.empty(na, nb, acc_dtype(a.dtype), a.device) for _ in prefix.dims]
    for r0, r1 in row_chunks(na, chunk_rows):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        for k, _, dot in prefix_dots(a, b, prefix, r0, r1, c0, c1):
            _stats_chunk(target, sts[k], dot, scale, bias, r0, r1, c0, c1, symmetric, smoothing, None)
    return sts


def target_prefix_grad(a, b, scale, bias, target, weights, chunk_rows, prefix):
    """Pass 2 at every Matryoshka prefix in one pass over D (``weights``: one ``targets.TargetWeights``
    per prefix, each prefix's loss weight folded in): prefix k's G_k is pass 2's chunk step on its tile
    (``prefix_backward`` does the rest). Returns (grad_a, grad_b, grad_scale, grad_bias,
    grad_row_scale (Na, K), grad_col_scale (Nb, K))."""
    from ..targets import column_span

    acc = acc_dtype(a.dtype)
    grad_scale = torch.zeros((), dtype=acc, device=a.device)
    grad_bias = torch.zeros((), dtype=acc, device=a.device)
    lses = [_split_weights(w, acc) for w in weights]
    spans = [(r0, r1, *column_span(target, r0, r1, b.shape[0])) for r0, r1 in row_chunks(a.shape[0], chunk_rows)]

    def make_g(k, dot, r0, r1, c0, c1):
        nonlocal grad_scale, grad_bias
        g = _grad_chunk(target, weights[k], lses[k], dot, scale, bias, r0, r1, c0, c1)
        grad_bias += g.sum()
        grad_scale += (g * dot).sum()
        return g

    grad_a, grad_b, grad_rs, grad_cs = prefix_backward(a, b, scale, prefix, [c for c in spans if c[3] > c[2]],
                                                        make_g)
    return grad_a, grad_b, grad_scale, grad_bias, grad_rs, grad_cs


def prefix_backward(a, b, scale, prefix, chunks, make_g):
    """Pass 2 at every prefix for any loss whose G of a tile ``make_g(k, tile, r0, r1, c0, c1)`` forms
    (with the loss's own sums for the scale and bias): with ``H_k = r_k⊙G_k⊙c_kᵀ`` the D slice
    j = [d_{j+1}, d_j) takes ``s·(Σ_{k≤j} H_k)·B[:, slice]`` (one GEMM per slice: the backward costs the
    GEMMs of the largest prefix), and the scales' gradients are ``∂/∂r_k[i] = s·Σ_j G_k·P_k·c_k`` and
    ``∂/∂c_k[j] = s·Σ_i G_k·P_k·r_k``. ``chunks``: (r0, r1, c0, c1) of each chunk. Returns (grad_a,
    grad_b, grad_row_scale (Na, K), grad_col_scale (Nb, K))."""
    acc = acc_dtype(a.dtype)
    na, nb, n_k = a.shape[0], b.shape[0], len(prefix.dims)
    dev = a.device
    grad_a = torch.zeros(a.shape, dtype=acc, device=dev)
    grad_b = torch.zeros(b.shape, dtype=acc, device=dev)
    grad_rs = torch.zeros((na, n_k), dtype=acc, device=dev)
    grad_cs = torch.zeros((nb, n_k), dtype=acc, device=dev)
    bounds = list(prefix.dims) + [0]
    for r0, r1, c0, c1 in chunks:
        h = [None] * n_k
        for k, p, dot in prefix_dots(a, b, prefix, r0, r1, c0, c1):
            g = make_g(k, dot, r0, r1, c0, c1)
            _flush_subnormal(g)  # (as in _reduce_chunk)
            rs, cs = prefix.row_scale[r0:r1, k].to(acc), prefix.col_scale[c0:c1, k].to(acc)
            gp = g * p
            grad_rs[r0:r1, k] = (gp * cs[None, :]).sum(1)
            grad_cs[c0:c1, k] += gp.mul_(rs[:, None]).sum(0)
            h[k] = g.mul_(rs[:, None]).mul_(cs[None, :])
        total = None
        for j in range(n_k):  # slice j is covered by the prefixes k <= j
            total = h[j] if total is None else total.add_(h[j])
            lo, hi = bounds[j + 1], bounds[j]
            grad_a[r0:r1, lo:hi] = total @ b[c0:c1, lo:hi].to(acc)
            grad_b[c0:c1, lo:hi].addmm_(total.T, a[r0:r1, lo:hi].to(acc))
    for t in (grad_a, grad_b, grad_rs, grad_cs):
        t.mul_(scale)
    return grad_a, grad_b, grad_rs, grad_cs


def sigmoid_prefix_fused(a, b, scale, bias, pos_offset, w, weights, chunk_rows, need_grad, prefix):
    """SigLIP's loss at every Matryoshka prefix in one pass over D: ``Σ_k weights[k]·loss_sum_k`` (the
    ``sigmoid_fused`` sum of prefix k's tile) and, with ``need_grad``, the gradients of
    ``w·Σ_k weights[k]·loss_sum_k`` with respect to a, b, scale, bias and the row and column scales
    (else five Nones)."""
    acc = acc_dtype(a.dtype)
    na, nb = a.shape[0], b.shape[0]
    total = torch.zeros((), dtype=acc, device=a.device)
    grad_scale = torch.zeros((), dtype=acc, device=a.device)
    grad_bias = torch.zeros((), dtype=acc, device=a.device)

    def make_g(k, dot, r0, r1, c0, c1):
        nonlocal total, grad_scale, grad_bias
        loss, g = _sigmoid_chunk(dot, scale, bias, r0, r1, pos_offset, nb, w * weights[k], need_grad)
        total += weights[k] * loss
        if g is not None:
            grad_bias += g.sum()
            grad_scale += (g * dot).sum()
        return g

    chunks = [(r0, r1, 0, nb) for r0, r1 in row_chunks(na, chunk_rows)]
    if not need_grad:
        for r0, r1, c0, c1 in chunks:
            for k, _, dot in prefix_dots(a, b, prefix, r0, r1, c0, c1):
                make_g(k, dot, r0, r1, c0, c1)
        return (total,) + (None,) * 6
    grad_a, grad_b, grad_rs, grad_cs = prefix_backward(a, b, scale, prefix, chunks, make_g)
    return total, grad_a, grad_b, grad_scale, grad_bias, grad_rs, grad_cs


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    """Softmax loss of a general ``target`` and its gradients (``targets.two_pass_target`` over this
    backend's ``target_stats`` and ``target_grad``)."""
    from ..targets import two_pass_target

    return two_pass_target(target_stats, target_grad, a, b, scale, bias, target, eps, symmetric, chunk_rows,
                           need_grad, cache_bytes)
