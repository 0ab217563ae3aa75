"""The engine's general target, and its executable statement on row chunks (the torch backend).

A target says, for every pair (row i, column j) of ``S = s·A·Bᵀ + b``, whether column j is kept for
row i (a dropped pair is as if its logit were −∞, in both directions) and whether it is a positive.
It is described with O(N) memory::

    Target(row_ids, col_ids, exclude_offset, col_keep, pair_offset, margin)

* positives by id: ``row_ids`` (Na, int64 >= 0) and ``col_ids`` (Nb, int64; −1: never a positive):
  column j is a positive of row i when ``col_ids[j] == row_ids[i]`` (several per row: duplicates and
  pairs of one class are not negatives);
* ``exclude_offset``: column ``i + exclude_offset`` is dropped from row i (self-contrast, NT-Xent);
* ``col_keep`` (Nb, bool): False drops column j from every row (a padded negative slot);
* ``margin`` with ``pair_offset``: GISTEmbed's false-negative rule, a non-positive column j is dropped
  from row i when ``A_i·B_j > A_i·B_{i + pair_offset} − margin`` (similarity units, before the scale;
  column ``i + pair_offset`` holds row i's own pair). Both similarities are read from the same chunk of
  dot products, so that ties are decided exactly.

Positives are kept columns by definition (a dropped column is never a positive). The loss of a row
(docs/losses.md §2.1) is ``LSE_{K_i}(S_i) − (1−ε)·mean_{P_i} S − ε·mean_{K_i} S``; the column
direction is the same on the transposed masks, over the columns that own a positive.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Target(NamedTuple):
    row_ids: torch.Tensor
    col_ids: torch.Tensor
    exclude_offset: Optional[int] = None
    col_keep: Optional[torch.Tensor] = None
    pair_offset: int = 0
    margin: Optional[float] = None


def chunk_masks(target: Target, dot: torch.Tensor, r0: int, r1: int):
    """(positives, kept) boolean masks of rows [r0, r1) of the chunk ``dot = A_c·Bᵀ`` (unscaled)."""
    rows = target.row_ids[r0:r1]
    pos = (rows[:, None] == target.col_ids[None, :]) & (target.col_ids[None, :] >= 0)
    keep = torch.ones_like(pos)
    if target.exclude_offset is not None:
        cols = torch.arange(r0, r1, device=dot.device) + target.exclude_offset
        inside = (cols >= 0) & (cols < dot.shape[1])
        keep[torch.arange(r1 - r0, device=dot.device)[inside], cols[inside]] = False
    if target.col_keep is not None:
        keep &= target.col_keep[None, :]
    if target.margin is not None:
        local = torch.arange(r1 - r0, device=dot.device)
        own = dot[local, local + r0 + target.pair_offset]
        keep &= pos | (dot <= own[:, None] - target.margin)
    return pos & keep, keep
