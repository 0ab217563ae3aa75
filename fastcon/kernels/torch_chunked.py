"""The engine in chunked plain PyTorch: the portable fallback, and the executable statement of the
backend contract in ``fastcon/kernels/__init__.py``."""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dot_chunk(a_c: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a_c·bᵀ`` in the accumulation dtype (fp32 for fp32/bf16/fp16 inputs, fp64 for fp64)."""
    if a_c.dtype in (torch.float32, torch.float64):
        return a_c @ b.T
    if a_c.is_cuda:
        try:
            return torch.mm(a_c, b.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a_c.float() @ b.float().T


def _chunks(n: int, chunk_rows: int):
    for start in range(0, n, chunk_rows):
        yield start, min(n, start + chunk_rows)


def lse_stats(a, b, scale, bias, chunk_rows):
    acc = acc_dtype(a.dtype)
    na, nb = a.shape[0], b.shape[0]
    row_lse = torch.empty(na, dtype=acc, device=a.device)
    col_lse = torch.full((nb,), float("-inf"), dtype=acc, device=a.device)
    for r0, r1 in _chunks(na, chunk_rows):
        s_c = _dot_chunk(a[r0:r1], b).mul_(scale).add_(bias)
        row_lse[r0:r1] = torch.logsumexp(s_c, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(s_c, dim=0))
    return row_lse, col_lse


def _grad_from_logits(s_c, row_lse_c, col_lse, w_row, w_col):
    """G for one chunk, computed in place in ``s_c``."""
    p_col = torch.exp(s_c - col_lse[None, :]).mul_(w_col) if w_col != 0 else None
    g = s_c.sub_(row_lse_c[:, None]).exp_().mul_(w_row)
    if p_col is not None:
        g.add_(p_col)
    return g


def softmax_grad(a, b, scale, bias, row_lse, col_lse, w_row, w_col, chunk_rows, _cached=None):
    acc = acc_dtype(a.dtype)
    na = a.shape[0]
    b32 = b.to(acc)
    grad_a = torch.empty(a.shape, dtype=acc, device=a.device)
    grad_b = torch.zeros(b.shape, dtype=acc, device=a.device)
    grad_scale = torch.zeros((), dtype=acc, device=a.device)
    grad_bias = torch.zeros((), dtype=acc, device=a.device)
    for k, (r0, r1) in enumerate(_chunks(na, chunk_rows)):
        if _cached is not None and k < len(_cached):
            dot = _cached[k]
        else:
            dot = _dot_chunk(a[r0:r1], b)
        g = _grad_from_logits(dot * scale + bias, row_lse[r0:r1], col_lse, w_row, w_col)
        grad_scale += (g * dot).sum()
        grad_bias += g.sum()
        a_c = a[r0:r1].to(acc)
        grad_a[r0:r1] = (g @ b32).mul_(scale)
        grad_b.addmm_(g.T, a_c)
    grad_b.mul_(scale)
    return grad_a, grad_b, grad_scale, grad_bias


def softmax_fused(a, b, scale, bias, col_begin, col_end, w_row, w_col, chunk_rows, cache_bytes):
    acc = acc_dtype(a.dtype)
    na, nb = a.shape[0], b.shape[0]
    row_lse = torch.empty(na, dtype=acc, device=a.device)
    col_lse = torch.full((nb,), float("-inf"), dtype=acc, device=a.device)
    cached, kept = [], 0
    for r0, r1 in _chunks(na, chunk_rows):
        dot = _dot_chunk(a[r0:r1], b)
        s_c = dot * scale + bias
        row_lse[r0:r1] = torch.logsumexp(s_c, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(s_c, dim=0))
        if len(cached) * chunk_rows == r0 and kept + dot.numel() * dot.element_size() <= cache_bytes:
            cached.append(dot)
            kept += dot.numel() * dot.element_size()
    col_lse[:col_begin] = float("inf")
    col_lse[col_end:] = float("inf")
    grads = softmax_grad(a, b, scale, bias, row_lse, col_lse, w_row, w_col, chunk_rows, _cached=cached)
    return (row_lse, col_lse) + grads


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
    for r0, r1 in _chunks(na, chunk_rows):
        dot = _dot_chunk(a[r0:r1], b)
        s_c = dot * scale + bias
        rows = torch.arange(r0, r1, device=a.device)
        cols = rows + pos_offset
        keep = cols < nb
        rows, cols = rows[keep] - r0, cols[keep]
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
