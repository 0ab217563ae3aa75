"""Matryoshka prefixes in one pass over D on the Triton backends (the contract of
``torch_chunked.target_prefix_stats`` and ``target_prefix_grad``; docs/engine.md).

A row chunk's dot products accumulate over the D slices in cuBLAS GEMMs, one accumulator for every
prefix (``torch_chunked.prefix_dots``), and each prefix's tile ``r_k ⊙ P_k ⊙ c_kᵀ`` goes through the
general target's Triton epilogues as a chunk of the cuBLAS producer, on the chunk's rows
(``targets.rows_of``): pass 1 with statistics of its own per prefix (``target.target_stats`` with this
chunk as its producer), pass 2 writing G over the tile (``target.target_grad`` with a ``g_sink``) for
the slices' GEMMs, which ``torch_chunked.prefix_backward`` forms from Σ_{k≤j} r_k ⊙ G_k ⊙ c_kᵀ. The
GEMMs are those of the largest prefix; the matmul producer's in-kernel form (the K loop handing each
boundary's accumulator to the epilogue) is not built, so these passes take the cuBLAS producer
whatever ``FASTCON_TRITON_PRODUCER`` says, and SigLIP's prefixes run one engine call each.
"""
from __future__ import annotations

import torch

from .._common import chunk_bytes, row_chunks
from ..torch_chunked import prefix_backward, prefix_dots
from .chunked import sigmoid_chunk
from .plan import TargetTiles, check_inputs, memory_rows
from .target import target_grad, target_stats

class _ChunkTiles(TargetTiles):
    """The cuBLAS producer of one given chunk of dot products (a prefix's tile of rows [r0, r1))."""

    def __init__(self, a, target, kernel: str, dot: torch.Tensor):
        super().__init__(a, target, kernel, cublas=True)
        self.dot = dot

    def operands(self, a, b, tch, r0, r1, c0, c1):
        if (r1 - r0, c1 - c0) != tuple(self.dot.shape):
            raise RuntimeError(f"a prefix tile of shape {tuple(self.dot.shape)} where ({r1 - r0}, {c1 - c0}) was "
                               "expected")
        return self.dot, self.dot, self.dot, tch.chunk(r0, r1, c0, c1)


def _chunks(a, b, target, chunk_rows, n_prefix: int):
    """(r0, r1, c0, c1) of each row chunk that keeps some column (every column without a ``target``), its
    rows within the device's chunk budget shared by the tiles a chunk holds at once (the accumulator,
    K prefixes' G, two temporaries)."""
    from ...targets import column_span

    na, nb = a.shape[0], b.shape[0]
    rows = memory_rows(na, nb, chunk_rows, chunk_bytes(a.device) // (n_prefix + 3))
    spans = [(r0, r1, *(column_span(target, r0, r1, nb) if target is not None else (0, nb)))
             for r0, r1 in row_chunks(na, rows)]
    return [c for c in spans if c[3] > c[2]]


def _merge_rows(st, part, r0: int, r1: int, symmetric: bool) -> None:
    """Pass 1's statistics ``part`` of rows [r0, r1) into ``st`` (its rows; the column sums added and
    the column LSEs merged)."""
    for f in ("row_lse", "row_pos", "row_keep", "row_sum_pos", "row_sum_keep"):
        getattr(st, f)[r0:r1] = getattr(part, f)
    if symmetric:
        st.col_lse.copy_(torch.logaddexp(st.col_lse, part.col_lse))
        for f in ("col_pos", "col_keep", "col_sum_pos", "col_sum_keep"):
            getattr(st, f).add_(getattr(part, f))


def target_prefix_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, prefix):
    from ...targets import TargetStats, rows_of

    check_inputs(a, b)
    a, b = a.contiguous(), b.contiguous()
    sts = [TargetStats.empty(a.shape[0], b.shape[0], torch.float32, a.device) for _ in prefix.dims]
    for r0, r1, c0, c1 in _chunks(a, b, target, chunk_rows, len(prefix.dims)):
        rows = rows_of(target, r0, r1)
        for k, _, dot in prefix_dots(a, b, prefix, r0, r1, c0, c1):
            part, _ = target_stats(a[r0:r1], b, scale, bias, rows, symmetric, smoothing, r1 - r0, 0,
                                   tiles=_ChunkTiles(a, rows, "target_stats", dot))
            _merge_rows(sts[k], part, r0, r1, symmetric)
    return sts


def _weight_rows(w, r0: int, r1: int):
    """Pass 2's weights of rows [r0, r1) (the per-row vectors sliced; the columns' whole)."""
    rows = ("row_lse", "q_row_pos", "q_row_keep", "t_row_norm", "row_mass")
    return w._replace(**{f: getattr(w, f)[r0:r1] for f in rows if getattr(w, f) is not None})


def target_prefix_grad(a, b, scale, bias, target, weights, chunk_rows, prefix):
    from ...targets import rows_of

    check_inputs(a, b)
    a, b = a.contiguous(), b.contiguous()
    sums = []

    def make_g(k, dot, r0, r1, c0, c1):
        out = []
        rows = rows_of(target, r0, r1)
        _, _, gs, gb = target_grad(a[r0:r1], b, scale, bias, rows, _weight_rows(weights[k], r0, r1), r1 - r0,
                                   cached=[dot], tiles=_ChunkTiles(a, rows, "target_grad", dot),
                                   g_sink=lambda g, *_: out.append(g))
        sums.append(torch.stack([gs, gb]))
        return out[0]

    grad_a, grad_b, grad_rs, grad_cs = prefix_backward(a, b, scale, prefix,
                                                       _chunks(a, b, target, chunk_rows, len(prefix.dims)), make_g)
    totals = torch.stack(sums).sum(dim=0) if sums else torch.zeros(2, dtype=torch.float32, device=a.device)
    return grad_a, grad_b, totals[0].clone(), totals[1].clone(), grad_rs, grad_cs


def sigmoid_prefix_fused(a, b, scale, bias, pos_offset, w, weights, chunk_rows, need_grad, prefix):
    check_inputs(a, b)
    a, b = a.contiguous(), b.contiguous()
    chunks = _chunks(a, b, None, chunk_rows, len(prefix.dims))
    sums = []

    def make_g(k, dot, r0, r1, c0, c1):
        part = sigmoid_chunk(dot, a[r0:r1], b, scale, bias, r0 + int(pos_offset), w * weights[k], need_grad)
        factor = torch.ones_like(part)
        factor[0] = weights[k]  # the loss's share of this prefix; G carries its weight already
        sums.append(part * factor)
        return dot

    if not need_grad:
        for r0, r1, c0, c1 in chunks:
            for k, _, dot in prefix_dots(a, b, prefix, r0, r1, c0, c1):
                make_g(k, dot, r0, r1, c0, c1)
        loss = torch.stack(sums).sum(dim=0)[0] if sums else torch.zeros((), dtype=torch.float32, device=a.device)
        return (loss,) + (None,) * 6
    grad_a, grad_b, grad_rs, grad_cs = prefix_backward(a, b, scale, prefix, chunks, make_g)
    totals = torch.stack(sums).sum(dim=0) if sums else torch.zeros(3, dtype=torch.float32, device=a.device)
    return totals[0].clone(), grad_a, grad_b, totals[1].clone(), totals[2].clone(), grad_rs, grad_cs
