"""The engine in chunked plain PyTorch: the portable fallback, and the executable statement of the
backend contract in ``fastcon/kernels/__init__.py``."""
from __future__ import annotations

import torch

from ._common import acc_dtype, lse_parts, mm_acc, row_chunks, split_lse, stats_pass, two_pass_softmax


def _positives(r0, r1, pos_offset, nb, device):
    """(row index within the chunk, column) of the positives of rows [r0, r1)."""
    rows = torch.arange(r0, r1, device=device)
    cols = rows + pos_offset
    keep = cols < nb
    return rows[keep] - r0, cols[keep]


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
        dot = _cached[k] if _cached is not None and k < len(_cached) else mm_acc(a[r0:r1], b.T)
        s_c = dot * scale + bias
        g = (s_c - col_hi[None, :]).sub_(col_lo[None, :]).exp_().mul_(w_col) if w_col != 0 else None
        p_row = s_c.sub_(row_hi[r0:r1, None]).sub_(row_lo[r0:r1, None]).exp_().mul_(w_row)
        g = p_row if g is None else g.add_(p_row)
        rows, cols = _positives(r0, r1, pos_offset, nb, a.device)
        g[rows, cols] -= w_pos
        grad_scale += (g * dot).sum()
        grad_bias += g.sum()
        grad_a[r0:r1] = (g @ b_acc).mul_(scale)
        grad_b.addmm_(g.T, a[r0:r1].to(acc))
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
        s_c = dot * scale + bias
        rows, cols = _positives(r0, r1, pos_offset, nb, a.device)
        # softplus(-z·l): negatives give softplus(l), positives softplus(-l) = softplus(l) - l.
        total += torch.nn.functional.softplus(s_c).sum() - s_c[rows, cols].sum()
        if need_grad:
            g = torch.sigmoid(s_c)
            g[rows, cols] -= 1
            g.mul_(w)
            grad_scale += (g * dot).sum()
            grad_bias += g.sum()
            grad_a[r0:r1] = (g @ b_acc).mul_(scale)
            grad_b.addmm_(g.T, a[r0:r1].to(acc))
    if need_grad:
        grad_b.mul_(scale)
    return total, grad_a, grad_b, grad_scale, grad_bias


# ---------------------------------------------------------------------------------------------------
# The general target (fastcon/kernels/targets.py): positives by id, dropped pairs, groups of rows
# sharing one softmax, the hardness penalty, label smoothing.

def _group_sum(values, groups, n_groups):
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, groups, values)


def group_lse(row_lse, groups, n_groups):
    """float64 LSE over the rows of each group of their row LSEs (−inf rows contribute nothing)."""
    peak = torch.full((n_groups,), float("-inf"), dtype=row_lse.dtype, device=row_lse.device)
    peak = peak.scatter_reduce(0, groups, row_lse, "amax")
    shift = torch.where(torch.isfinite(peak), peak, 0.0)
    return torch.log(_group_sum(torch.exp(row_lse - shift[groups]), groups, n_groups)) + shift


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    """Softmax loss of a general ``target`` and its gradients, in two chunked passes::

        L = w_r·Σ_g [LSE_{K_g} S − (1−ε)·mean_{P_g} S − ε·mean_{K_g} S]
          + w_c·Σ_{j owning a positive} [the same over column j's kept rows]

    over the groups g of rows (each row its own group without ``row_group``), with w_r = 1/G (½ of it
    and w_c = 1/(2·#owning columns) when ``symmetric``, else w_c = 0), and
    ``G = w_r·(P_row − Q_row) + w_c·(P_col − Q_col)`` on the kept pairs (P_row: the softmax of the
    row's group; Q: the targets). The hardness penalty enters the logits only (stop-gradient). Logits
    chunks of the first pass are kept for the second while they fit ``cache_bytes``. Returns (loss
    float64, grad_a, grad_b, grad_scale, grad_bias), the gradients None without ``need_grad``. A group
    with no positive is a ValueError naming it."""
    from .targets import chunk_logits, chunk_masks, column_span

    acc = acc_dtype(a.dtype)
    f64 = torch.float64
    na, nb = a.shape[0], b.shape[0]
    dev = a.device
    if symmetric and target.row_group is not None:
        raise ValueError("a target with row groups has no column direction (symmetric=False)")
    row_lse = torch.full((na,), float("-inf"), dtype=f64, device=dev)
    row_pos = torch.zeros(na, dtype=acc, device=dev)      # |P_i|
    row_keep = torch.zeros(na, dtype=acc, device=dev)     # |K_i|
    row_sum_pos = torch.zeros(na, dtype=f64, device=dev)  # Σ_{P_i} S
    row_sum_keep = torch.zeros(na, dtype=f64, device=dev)
    col_lse = torch.full((nb,), float("-inf"), dtype=f64, device=dev)
    col_pos = torch.zeros(nb, dtype=acc, device=dev)
    col_keep = torch.zeros(nb, dtype=acc, device=dev)
    col_sum_pos = torch.zeros(nb, dtype=f64, device=dev)
    col_sum_keep = torch.zeros(nb, dtype=f64, device=dev)
    cached, kept = [], 0
    for r0, r1 in row_chunks(na, chunk_rows):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        dot = mm_acc(a[r0:r1], b[c0:c1].T)
        pos, keep, pen = chunk_masks(target, dot, r0, r1, c0)
        s_c = chunk_logits(target, dot, scale, bias, pen)
        masked = s_c if keep is None else s_c.masked_fill(~keep, float("-inf"))
        row_lse[r0:r1] = lse_parts(masked, dim=1)
        s_pos = torch.where(pos, s_c, 0.0)
        row_pos[r0:r1] = pos.sum(1)
        row_sum_pos[r0:r1] = s_pos.sum(1)
        if symmetric:
            col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], lse_parts(masked, dim=0))
            col_pos[c0:c1] += pos.sum(0)
            col_sum_pos[c0:c1] += s_pos.sum(0)
        if eps:  # the smoothing term's counts and sums of the kept logits
            s_keep = s_c if keep is None else torch.where(keep, s_c, 0.0)
            row_keep[r0:r1] = c1 - c0 if keep is None else keep.sum(1)
            row_sum_keep[r0:r1] = s_keep.sum(1)
            if symmetric:
                col_keep[c0:c1] += r1 - r0 if keep is None else keep.sum(0)
                col_sum_keep[c0:c1] += s_keep.sum(0)
        size = dot.numel() * dot.element_size()
        if need_grad and len(cached) * chunk_rows == r0 and kept + size <= cache_bytes:
            cached.append(dot)
            kept += size
    if target.row_group is None:
        groups, n_groups = torch.arange(na, device=dev), na
    else:
        groups = target.row_group
        n_groups = int(groups.max()) + 1 if na else 0
    g_lse = group_lse(row_lse, groups, n_groups)
    g_pos, g_keep = _group_sum(row_pos, groups, n_groups), _group_sum(row_keep, groups, n_groups)
    g_sum_pos = _group_sum(row_sum_pos, groups, n_groups)
    g_sum_keep = _group_sum(row_sum_keep, groups, n_groups)
    if bool((g_pos == 0).any()):
        g = int(torch.nonzero(g_pos == 0)[0])
        what = f"row {g}" if target.row_group is None else f"row group {g}"
        raise ValueError(f"{what} of the loss has no positive among its kept columns")
    owned = col_pos > 0
    w_r = (0.5 if symmetric else 1.0) / n_groups
    w_c = 0.5 / max(int(owned.sum()), 1) if symmetric else 0.0

    def terms(lse, n_pos, n_keep, sum_pos, sum_keep):
        out = lse - (1.0 - eps) * sum_pos / n_pos.double()
        return out - eps * sum_keep / n_keep.double() if eps else out

    loss = w_r * terms(g_lse, g_pos, g_keep, g_sum_pos, g_sum_keep).sum()
    if symmetric:
        loss = loss + w_c * terms(col_lse, col_pos, col_keep, col_sum_pos, col_sum_keep)[owned].sum()
    if not need_grad:
        return loss, None, None, None, None

    grad_a = torch.zeros(a.shape, dtype=acc, device=dev)
    grad_b = torch.zeros(b.shape, dtype=acc, device=dev)
    grad_scale = torch.zeros((), dtype=acc, device=dev)
    grad_bias = torch.zeros((), dtype=acc, device=dev)
    row_hi, row_lo = split_lse(g_lse[groups], acc)
    # the target weights of one positive / one kept column, per row (of its group) and per owning column
    q_row_pos, q_row_keep = ((1.0 - eps) / g_pos)[groups], (eps / g_keep)[groups]
    if symmetric:
        # +inf for the columns without a positive: their column softmax term vanishes (exp(−inf) = 0)
        col_hi, col_lo = split_lse(torch.where(owned, col_lse, float("inf")), acc)
        q_col_pos = torch.where(owned, (1.0 - eps) / col_pos.clamp_min(1), 0.0)
        q_col_keep = torch.where(owned, eps / col_keep.clamp_min(1), 0.0)
        w_owned = w_c * owned.to(acc)
    for k, (r0, r1) in enumerate(row_chunks(na, chunk_rows)):
        c0, c1 = column_span(target, r0, r1, nb)
        if c1 == c0:
            continue
        dot = cached[k] if k < len(cached) else mm_acc(a[r0:r1], b[c0:c1].T)
        pos, keep, pen = chunk_masks(target, dot, r0, r1, c0)
        s_c = chunk_logits(target, dot, scale, bias, pen)
        # P − Q on the kept pairs (zero on the dropped ones, whose logits are −∞ here: a dropped logit
        # above the row's LSE would overflow), in fp32 with the float64 LSEs split in (hi, lo) as the
        # other backends do
        if keep is not None:
            s_c.masked_fill_(~keep, float("-inf"))
        p_row = (s_c - row_hi[r0:r1, None]).sub_(row_lo[r0:r1, None]).exp_()
        g = p_row.sub_(pos * q_row_pos[r0:r1, None])
        if eps:
            g.sub_(q_row_keep[r0:r1, None])
        g.mul_(w_r)
        if symmetric:
            p_col = (s_c - col_hi[None, c0:c1]).sub_(col_lo[None, c0:c1]).exp_().sub_(pos * q_col_pos[None, c0:c1])
            if eps:
                p_col.sub_(q_col_keep[None, c0:c1])
            g.add_(p_col.mul_(w_owned[None, c0:c1]))
        if keep is not None:
            g.masked_fill_(~keep, 0.0)
        grad_scale += (g * dot).sum()
        grad_bias += g.sum()
        grad_a[r0:r1] = (g @ b[c0:c1].to(acc)).mul_(scale)
        grad_b[c0:c1].addmm_(g.T, a[r0:r1].to(acc))
    grad_b.mul_(scale)
    return loss, grad_a, grad_b, grad_scale, grad_bias
