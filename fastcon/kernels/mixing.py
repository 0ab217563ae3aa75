"""Hard negative mixing (MoCHi, docs/losses.md §2.2) beside the engine: each query's top-N hardest
negatives by a streaming selection over the negatives, and the logits of the synthetic negatives mixed
from them, with no B×K similarity matrix and no B×s×D tensor of synthetic points. Plain PyTorch on
every device (not an engine operation of the backends: the queue's LSE is the engine's row LSE).

* ``top_negatives``: the negatives in column chunks; after each chunk the running top-N and the chunk's
  candidates (the similarities above a row's current N-th) are merged by a stable descending sort, so
  the ranks order the hardest first and break ties by the lower index (the earlier chunks' entries
  precede the later ones, and within the running list ties are already in index order). Memory
  O(B·(top_n + chunk)).
* ``mixed_logits``: ``q_i·h`` for the synthetic ``h = normalize(α·n_a + (1−α)·n_b)`` and
  ``h′ = normalize(β·sg(q_i) + (1−β)·n_c)``, both detached, from dot products: the top-N similarities
  ``q·n``, the negatives' squared norms and one gathered product ``n_a·n_b`` per synthetic point (for a
  chunk of queries at a time); the backward's ``∂/∂q_i = Σ_m g_im·h_im`` is a weight per top-N row of
  query i (and one on q_i), applied to its gathered top-N rows. No synthetic point is ever formed.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import acc_dtype, mm_acc

_MIX_CHUNK_BYTES = 32 << 20
_COUNT_ABOVE = 64  # top_n above which a chunk's candidates are counted rather than taken as its top_n


def _keep_top(vals, idx, top_n):
    """The top_n of candidate lists in index order (padding −inf), hardest first, ties by the lower index."""
    sv, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return sv[:, :top_n], idx.gather(1, order[:, :top_n])


def _chunk_candidates(sim, top_n, thr):
    """(values, columns) of a chunk's entries that may enter the top_n, −inf where a row has fewer; None
    when none can (``thr``: each row's top_n-th so far, None before the list is full)."""
    if thr is not None and top_n > _COUNT_ABOVE:
        # a long list: after the first chunks few entries beat its top_n-th, so count them and take
        # that many (cheaper than the chunk's own top_n)
        take = int((sim > thr).sum(1).max())
        if take == 0:
            return None
        cv, ci = torch.topk(sim, take, dim=1)
        return torch.where(cv > thr, cv, float("-inf")), ci
    # the chunk's own top_n (an entry below them cannot be in the result), or where an entry ties with
    # the top_n-th, every entry tied with it (the lower index of a tie must not be cut)
    kk = min(sim.shape[1], top_n + 1)
    cv, ci = torch.topk(sim, kk, dim=1)
    if kk > top_n:
        if bool((cv[:, top_n] == cv[:, top_n - 1]).any()):
            bound = cv[:, top_n - 1:top_n]
            cv, ci = torch.topk(sim, int((sim >= bound).sum(1).max()), dim=1)
            cv = torch.where(cv >= bound, cv, float("-inf"))
        else:
            cv, ci = cv[:, :top_n], ci[:, :top_n]
    if thr is not None:  # above the current top_n-th only (a later index loses a tie)
        keep = cv > thr
        if not bool(keep.any()):
            return None
        cv = torch.where(keep, cv, float("-inf"))
    return cv, ci


def top_negatives(q: torch.Tensor, negatives: torch.Tensor, top_n: int, *, exclude_own: bool = False,
                  chunk_cols: Optional[int] = None):
    """(indices (B, top_n) int64, their similarities ``q·n`` (B, top_n)): each query's ``top_n``
    largest ``q·n`` over the rows of ``negatives``, hardest first, ties by the lower index; with
    ``exclude_own`` row i of ``negatives`` is not a negative of query i. No gradient.

    Per chunk of negatives the chunk's own top_n (with every entry tied at its top_n-th place) that lie
    above each row's top_n-th value so far (a later index loses a tie) are appended to the
    candidates in index order (−inf where a row has fewer); when the candidates reach 2·top_n they are
    cut back to the top_n by a stable descending sort, which keeps the index order of ties. A tie is
    one of the computed similarities: every chunk is one GEMM shape, but a BLAS may still round a
    duplicate row's products differently at another column (MKL on AMD EPYC does, by an ulp)."""
    b, k = q.shape[0], negatives.shape[0]
    dev = q.device
    q = q.detach()
    if chunk_cols is None:
        chunk_cols = max(top_n + 1, _MIX_CHUNK_BYTES // (4 * max(b, 1)))
    vals = torch.empty((b, 0), dtype=acc_dtype(q.dtype), device=dev)
    idx = torch.empty((b, 0), dtype=torch.int64, device=dev)
    thr = None  # each row's N-th value at the last cut (a lower bound of the current one)
    rows = torch.arange(b, device=dev)
    for c0 in range(0, k, chunk_cols):
        c1 = min(k, c0 + chunk_cols)
        cols = negatives[c0:c1].detach()
        if c1 - c0 < chunk_cols and k > chunk_cols:  # the last chunk at the others' width: one GEMM shape,
            pad = cols.new_zeros((chunk_cols - (c1 - c0), cols.shape[1]))  # so equal rows give equal values
            sim = mm_acc(q, torch.cat([cols, pad]).T)[:, :c1 - c0]
        else:
            sim = mm_acc(q, cols.T)
        if exclude_own:
            own = (rows >= c0) & (rows < c1)
            sim[rows[own], rows[own] - c0] = float("-inf")
        cand = _chunk_candidates(sim, top_n, thr)
        if cand is None:
            continue
        cv, ci = cand
        ci, order = torch.sort(ci, dim=1)  # index order
        vals = torch.cat([vals, cv.gather(1, order)], dim=1)
        idx = torch.cat([idx, ci + c0], dim=1)
        if vals.shape[1] >= 2 * top_n or (thr is None and vals.shape[1] >= top_n):
            vals, idx = _keep_top(vals, idx, top_n)
            thr = vals[:, -1:]
    return tuple(reversed(_keep_top(vals, idx, top_n)))


class _MixedLogits(torch.autograd.Function):
    """``q_i·h`` of the detached synthetic points from dot products only: with ``v = α·n_a + (1−α)·n_b``,
    ``q·v = α·(q·n_a) + (1−α)·(q·n_b)`` (the top-N similarities) and ``‖v‖² = α²‖n_a‖² + (1−α)²‖n_b‖² +
    2α(1−α)·n_a·n_b`` (the one gathered product); with ``v′ = β·q + (1−β)·n_c``, ``q·v′ = β‖q‖² +
    (1−β)·(q·n_c)`` and ``‖v′‖² = β²‖q‖² + (1−β)²‖n_c‖² + 2β(1−β)·(q·n_c)``. The backward's ``Σ_m g_im·h_im``
    is a weight per top-N row of query i (and one on q_i itself), applied to the gathered top-N rows."""

    @staticmethod
    def forward(ctx, q, negatives, top, top_vals, pair_ranks, alpha, query_ranks, beta, eps):
        acc = acc_dtype(q.dtype)
        b, n = top.shape
        s1, s2 = pair_ranks.shape[1], query_ranks.shape[1]
        qd = q.detach().to(acc)
        vals = top_vals.to(acc)
        sq = negatives.to(acc).pow(2).sum(1)  # ‖n‖² of every negative
        out = torch.empty((b, s1 + s2), dtype=acc, device=q.device)
        norms = torch.empty((b, s1 + s2), dtype=acc, device=q.device)
        if s1:
            ra, rb = pair_ranks[..., 0], pair_ranks[..., 1]
            ia, ib = top.gather(1, ra), top.gather(1, rb)
            al = alpha.to(acc)
            ab = torch.empty((b, s1), dtype=acc, device=q.device)
            step = max(1, _MIX_CHUNK_BYTES // max(1, 2 * s1 * q.shape[1] * 4))
            for r0 in range(0, b, step):  # n_a·n_b, the one product of gathered rows
                r1 = min(b, r0 + step)
                ab[r0:r1] = (negatives[ia[r0:r1]].to(acc) * negatives[ib[r0:r1]].to(acc)).sum(-1)
            nv = (al * al * sq[ia] + (1 - al) * (1 - al) * sq[ib] + 2 * al * (1 - al) * ab).clamp_min(0).sqrt()
            nv = nv.clamp_min(eps)
            out[:, :s1] = (al * vals.gather(1, ra) + (1 - al) * vals.gather(1, rb)) / nv
            norms[:, :s1] = nv
        if s2:
            ic = top.gather(1, query_ranks)
            qc = vals.gather(1, query_ranks)
            qq = qd.pow(2).sum(1, keepdim=True)
            be = beta.to(acc)
            nv = (be * be * qq + (1 - be) * (1 - be) * sq[ic] + 2 * be * (1 - be) * qc).clamp_min(0).sqrt()
            nv = nv.clamp_min(eps)
            out[:, s1:] = (be * qq + (1 - be) * qc) / nv
            norms[:, s1:] = nv
        ctx.save_for_backward(qd, negatives, top, pair_ranks, alpha, query_ranks, beta, norms)
        ctx.q_dtype = q.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        q, negatives, top, pair_ranks, alpha, query_ranks, beta, norms = ctx.saved_tensors
        acc = q.dtype
        b, n = top.shape
        s1 = pair_ranks.shape[1]
        g = grad.to(acc) / norms
        weights = torch.zeros((b, n), dtype=acc, device=q.device)  # per top-N rank of each query
        grad_q = torch.zeros_like(q)
        if s1:
            al = alpha.to(acc)
            weights.scatter_add_(1, pair_ranks[..., 0], g[:, :s1] * al)
            weights.scatter_add_(1, pair_ranks[..., 1], g[:, :s1] * (1 - al))
        if query_ranks.shape[1]:
            be = beta.to(acc)
            weights.scatter_add_(1, query_ranks, g[:, s1:] * (1 - be))
            grad_q += (g[:, s1:] * be).sum(1, keepdim=True) * q
        step = max(1, _MIX_CHUNK_BYTES // max(1, n * q.shape[1] * 4))
        for r0 in range(0, b, step):
            r1 = min(b, r0 + step)
            rows = negatives[top[r0:r1]].to(acc)  # (c, N, D)
            grad_q[r0:r1] += torch.bmm(weights[r0:r1, None, :], rows)[:, 0]
        return grad_q.to(ctx.q_dtype), None, None, None, None, None, None, None, None


def mixed_logits(q, negatives, top, top_vals, pair_ranks, alpha, query_ranks, beta,
                 eps: float = 1e-12) -> torch.Tensor:
    """(B, s + s′): ``q_i·h_im`` for MoCHi's synthetic points (no temperature), in the accumulation
    dtype, from the top-N indices and similarities of ``top_negatives``; differentiable with respect
    to ``q`` only (the points are detached)."""
    return _MixedLogits.apply(q, negatives.detach(), top, top_vals, pair_ranks, alpha, query_ranks, beta,
                              float(eps))
