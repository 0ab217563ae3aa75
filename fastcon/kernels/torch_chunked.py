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
