"""The margin rule's host side (the false-negative rule of GISTEmbed and of CLIP with hard negatives,
docs/losses.md §2.1, §2.6): each row's bound ``targets.margin_bound`` of its own pair's similarity,
read from the chunk the epilogues compare with it (the student's cuBLAS chunk, or a guide's), or for
the matmul producer, which has no chunk, from its own tiles (``pair_dots_kernel``), so that every
bound is bitwise the similarity the kernels compare."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .tiles import dot_tile


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


def _bounds(target, sim, r0: int, r1: int, c0: int):
    """Each row's margin bound (``targets.margin_bound``) from its pair's similarity in the chunk
    ``sim`` of columns from c0 (the student's dot products, or a guide's), or a dummy."""
    from ...targets import margin_bound, pair_columns

    if target.margin is None:
        return sim.new_zeros(1)
    local = torch.arange(r1 - r0, device=sim.device)
    return margin_bound(target, sim[local, pair_columns(target, r0, r1) - c0]).float().contiguous()


def margin_bounds(tiles, target, a, b, dot, tdot, r0: int, r1: int, c0: int, c1: int):
    """The margin bounds of rows [r0, r1) for a chunk over columns [c0, c1) holding every pair: from
    the guide's chunk ``tdot`` with a guide, from the student's chunk ``dot`` on the cuBLAS producer,
    from the matmul producer's own tiles otherwise (``feature_margin_bounds``); a dummy without a margin."""
    from ...targets import guided

    if target.margin is None:
        return a.new_zeros(1, dtype=torch.float32)
    if guided(target):
        return _bounds(target, tdot, r0, r1, c0)
    if tiles.matmul:
        return feature_margin_bounds(tiles, target, a, b, r0, r1, c0, c1)
    return _bounds(target, dot, r0, r1, c0)


def feature_margin_bounds(tiles, target, a, b, r0: int, r1: int, c0: int, c1: int):
    """Each row's A_i·B_pair − margin for the matmul producer (which has no chunk of dot products to
    read it from): the pair's logit from the producer's own tiles (``pair_dots_kernel``) over the
    chunk's columns [c0, c1), or a dummy."""
    if target.margin is None:
        return a.new_zeros(1, dtype=torch.float32)
    if target.pair_col is not None:
        raise ValueError("per-row pair columns of a margin on the student's similarities are read from a chunk "
                         "of dot products: use the cuBLAS producer (FASTCON_TRITON_PRODUCER=cublas)")
    cfg = tiles.cfg
    r = r1 - r0
    out = torch.empty(r, dtype=torch.float32, device=a.device)
    a_c, b_k = a[r0:r1], b[c0:c1]
    launch(pair_dots_kernel)[(triton.cdiv(r, cfg.block_m),)](
        a_c, b_k, out, r, c1 - c0, a.shape[1], r0 + int(target.pair_offset) - c0, a_c.stride(0), b_k.stride(0),
        INPUT_PRECISION=tiles.consts(a)["INPUT_PRECISION"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    from ...targets import margin_bound

    return margin_bound(target, out).contiguous()
