"""The engine's general target, and its executable statement on row chunks (the torch backend).

A target says, for every pair (row i, column j) of ``S = s·A·Bᵀ + b``, whether column j is kept for
row i (a dropped pair is as if its logit were −∞, in both directions), whether it is a positive, and
which softmax row i belongs to. Everything but the optional dense mask is O(N) memory::

    Target(row_ids, col_ids, exclude_col, col_keep, pair_offset, margin,
           row_group, row_owner, col_owner, own_rule, col_range,
           penalty, penalty_cols, penalty_mode, mask, penalty_rows, teacher, soft, hard, entropy, debias,
           margin_relative, pair_col)

* positives by id: ``row_ids`` (Na, int64; −1: the row has no positive of its own) and ``col_ids``
  (Nb, int64; −1: never a positive): column j is a positive of row i when ``col_ids[j] ==
  row_ids[i] >= 0`` (several per row: duplicates and pairs of one class are not negatives);
* ``exclude_col`` (Na, int64; −1: none): column ``exclude_col[i]`` is dropped from row i (its own
  similarity in self-contrast: NT-Xent, sentence-transformers' query_to_query);
* ``col_keep`` (Nb, bool): False drops column j from every row (a padded negative slot);
* ``margin`` with ``pair_offset``: GISTEmbed's false-negative rule, a non-positive column j is dropped
  from row i when ``A_i·B_j > A_i·B_{i + pair_offset} − margin`` (similarity units, before the scale;
  column ``i + pair_offset`` holds row i's own pair, or ``pair_col[i]`` where given). Both similarities
  are read from the same chunk of dot products, so that ties are decided exactly. With
  ``margin_relative`` the bound is ``pair − |pair|·margin`` (sentence-transformers' relative strategy).
  With a guide (``teacher`` of kind ``TEACHER_GUIDE``: GISTEmbed's guide model) both similarities are
  the guide's, ``G_i·H_j`` from its features, a tile formed beside the student's;
* ownership: ``row_owner`` (Na) and ``col_owner`` (Nb, int64, −1: nobody's) say which item a row and a
  column belong to (a query and its documents); ``own_rule`` (Na, int64) drops from row i every column
  of its own item (1: sentence-transformers' doc_to_doc) or every column of another item (2: a
  memory-bank loss, where row i keeps its own view and the bank's unowned columns); 0 drops nothing;
* ``col_range`` (Na, 2): row i keeps only the columns ``[lo_i, hi_i)`` (a row block of a stacked
  product); backends skip the dot products of columns no row of a chunk keeps;
* the hardness penalty: ``penalty`` α adds ``α·sg(A_i·B_j)`` to the logit of the penalised negatives:
  non-positive kept pairs of the rows with ``penalty_rows[i]`` and the columns with ``penalty_cols[j]``
  (None: all of them) and, by ``penalty_mode``, every such pair (0), only those of the row's own item
  (1) or only those of other items (2);
* ``mask`` (Na, Nb, bool): a dense keep mask, the one O(N²) input, for users who have one;
* ``row_group`` (Na, int64 in [0, G)): rows of one group share one softmax (a joint partition over
  several products stacked as rows); None: every row is its own group.
* soft targets: ``teacher`` (a ``Teacher``: its features and its softmax scale or linear weights)
  gives a tile Qt beside the student's, and each row's targets are ``Q = hard·[pos]/|P| + ε/|K| +
  soft·Qt`` (``hard`` None: what ``soft`` and the smoothing ε leave), with ``entropy`` adding the
  ``Σ Q·log Q`` term of a KL divergence;
* ``debias`` τ⁺ (0 ≤ τ⁺ < 1): each group's loss is the debiased contrastive loss of its one positive
  (docs/losses.md §2.5), formed from pass 1's statistics (``passes.loss_and_weights``).

Positives are kept columns by definition (a dropped column is never a positive). The loss of a group g
(docs/losses.md §2.1) is ``LSE_{K_g}(S) − (1−ε)·mean_{P_g} S − ε·mean_{K_g} S`` over the kept pairs
``K_g`` and positives ``P_g`` of its rows; the column direction is the same on the transposed masks,
over the columns that own a positive (without groups).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Teacher(NamedTuple):
    """The teacher tile of soft targets, computed beside the student's chunk (no gradient):
    ``kind`` 0 (softmax teacher) gives logits ``scale·A_t·B_tᵀ`` whose row (column) softmax is Qt;
    ``kind`` 1 (linear teacher) gives weights ``c0 + c1·A_t·B_tᵀ`` normalised by their kept row
    (column) sums plus ``eps``. ``a`` is (Na, Dt), ``b`` (Nb, Dt); ``scale`` a 0-d tensor (softmax)."""
    a: torch.Tensor
    b: torch.Tensor
    scale: Optional[torch.Tensor] = None
    kind: int = 0
    c0: float = 0.0
    c1: float = 1.0
    eps: float = 0.0


class Target(NamedTuple):
    row_ids: torch.Tensor
    col_ids: torch.Tensor
    exclude_col: Optional[torch.Tensor] = None
    col_keep: Optional[torch.Tensor] = None
    pair_offset: int = 0
    margin: Optional[float] = None
    row_group: Optional[torch.Tensor] = None
    row_owner: Optional[torch.Tensor] = None
    col_owner: Optional[torch.Tensor] = None
    own_rule: Optional[torch.Tensor] = None
    col_range: Optional[torch.Tensor] = None
    penalty: float = 0.0
    penalty_cols: Optional[torch.Tensor] = None
    penalty_mode: int = 0
    mask: Optional[torch.Tensor] = None
    penalty_rows: Optional[torch.Tensor] = None
    # soft targets: Q = hard·[pos]/|P| + ε/|K| + soft·Qt, Qt from the teacher's tile
    teacher: Optional[Teacher] = None
    soft: float = 0.0
    hard: Optional[float] = None
    entropy: bool = False
    # the debiased loss (docs/losses.md §2.5): the class prior τ⁺ of each group's one positive; 0: off
    debias: float = 0.0
    # the margin rule: a relative bound pair − |pair|·margin; each row's pair column (None: i + pair_offset)
    margin_relative: bool = False
    pair_col: Optional[torch.Tensor] = None


TEACHER_LINEAR = 1  # Teacher.kind: 0 a softmax teacher, 1 a linear one
TEACHER_GUIDE = 2  # Teacher.kind of a guide: its tile G·Hᵀ decides the margin rule (no soft targets)


def guided(target: "Target") -> bool:
    """Whether the margin rule reads a guide's tile (GISTEmbed) instead of the student's."""
    return target.teacher is not None and target.teacher.kind == TEACHER_GUIDE


def hard_weight(target: Target, eps: float) -> float:
    """The weight of the hard positives in Q: ``hard``, or what smoothing and soft targets leave."""
    return (1.0 - eps - target.soft) if target.hard is None else target.hard


def teacher_chunk(target: Target, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """The teacher's tile of rows [r0, r1) × columns [c0, c1) (no gradient): logits
    ``s_t·A_t·B_tᵀ`` (softmax teacher) or weights ``c0 + c1·A_t·B_tᵀ`` (linear teacher)."""
    from ..kernels._common import mm_acc

    t = target.teacher
    dot = mm_acc(t.a[r0:r1], t.b[c0:c1].T)
    if t.kind == TEACHER_LINEAR:
        return dot.mul_(t.c1).add_(t.c0)
    if t.kind == TEACHER_GUIDE:
        return dot
    return dot.mul_(t.scale)


def column_span(target: Target, r0: int, r1: int, nb: int):
    """The columns [c0, c1) that some row of [r0, r1) may keep (all of them when a margin needs the
    row's own pair, which may lie outside its range)."""
    if target.col_range is None or target.margin is not None:
        return 0, nb
    rng = target.col_range[r0:r1]
    c0, c1 = int(rng[:, 0].min()), int(rng[:, 1].max())
    c0 = min(max(c0, 0), nb)
    return c0, max(c0, min(c1, nb))


def _keys(ids: torch.Tensor, none: int) -> torch.Tensor:
    """Ids with −1 (no id) replaced by ``none``, so that one comparison decides a match."""
    return torch.where(ids >= 0, ids, none)


def _and(mask: Optional[torch.Tensor], other: torch.Tensor) -> torch.Tensor:
    return other if mask is None else mask & other


def chunk_masks(target: Target, dot: torch.Tensor, r0: int, r1: int, c0: int = 0):
    """(positives, kept, penalised) boolean masks of rows [r0, r1) and columns [c0, c0 + w) of the chunk
    ``dot = A_c·B[c0:c0+w]ᵀ`` (unscaled); ``kept`` is None when every pair of the chunk is kept and
    ``penalised`` None without a penalty."""
    dev = dot.device
    w = dot.shape[1]
    c1 = c0 + w
    pos = _keys(target.row_ids[r0:r1], -2)[:, None] == _keys(target.col_ids[c0:c1], -3)[None, :]
    keep = None
    local = torch.arange(r1 - r0, device=dev)
    if target.exclude_col is not None:
        cols = target.exclude_col[r0:r1] - c0
        inside = (target.exclude_col[r0:r1] >= 0) & (cols >= 0) & (cols < w)
        if bool(inside.any()):
            keep = torch.ones_like(pos)
            keep[local[inside], cols[inside]] = False
    if target.col_keep is not None:
        keep = _and(keep, target.col_keep[None, c0:c1])
    if target.col_range is not None:
        rng = target.col_range[r0:r1]
        if not bool(((rng[:, 0] <= c0) & (rng[:, 1] >= c1)).all()):  # some row keeps less than the span
            cols = torch.arange(c0, c1, device=dev)[None, :]
            keep = _and(keep, (cols >= rng[:, :1]) & (cols < rng[:, 1:]))
    own = None
    if target.col_owner is not None and target.row_owner is not None:
        col_owner = target.col_owner[c0:c1]
        own = _keys(target.row_owner[r0:r1], -2)[:, None] == _keys(col_owner, -3)[None, :]
        if target.own_rule is not None:
            rule = target.own_rule[r0:r1]
            if bool((rule == 1).any()):
                keep = _and(keep, ~(own & (rule == 1)[:, None]))
            if bool((rule == 2).any()):
                other = ~own & (col_owner >= 0)[None, :]
                keep = _and(keep, ~(other & (rule == 2)[:, None]))
    if target.mask is not None:
        keep = _and(keep, target.mask[r0:r1, c0:c1])
    if target.margin is not None:
        sim = teacher_chunk(target, r0, r1, c0, c1) if guided(target) else dot
        pair = sim[local, pair_columns(target, r0, r1) - c0]
        keep = _and(keep, pos | (sim <= margin_bound(target, pair)[:, None]))
    if keep is not None:
        keep = keep.expand(pos.shape)  # a column mask alone is (1, w): the column counts need every row
        pos &= keep
    penalised = None
    if target.penalty != 0.0:
        penalised = ~pos if keep is None else keep & ~pos
        if target.penalty_cols is not None:
            penalised &= target.penalty_cols[None, c0:c1]
        if target.penalty_rows is not None:
            penalised &= target.penalty_rows[r0:r1, None]
        if target.penalty_mode != 0:
            if own is None:
                raise ValueError("a hardness penalty by ownership needs row_owner and col_owner")
            penalised &= own if target.penalty_mode == 1 else ~own
    return pos, keep, penalised


def pair_columns(target: Target, r0: int, r1: int) -> torch.Tensor:
    """The column of each row's own pair (the margin rule's threshold) for rows [r0, r1)."""
    if target.pair_col is not None:
        return target.pair_col[r0:r1]
    return torch.arange(r0, r1, device=target.row_ids.device) + target.pair_offset


def margin_bound(target: Target, pair: torch.Tensor) -> torch.Tensor:
    """The margin rule's bound of each row from its pair's similarity: ``pair − margin``, or
    ``pair − |pair|·margin`` (relative); a non-positive pair above it is dropped."""
    if target.margin_relative:
        return pair - pair.abs() * target.margin
    return pair - target.margin


def chunk_logits(target: Target, dot: torch.Tensor, scale, bias, penalised) -> torch.Tensor:
    """``s·dot + b`` plus the stop-gradient hardness penalty ``α·dot`` on the penalised pairs."""
    s_c = dot * scale + bias
    if penalised is not None:
        s_c.add_(torch.where(penalised, dot, 0.0), alpha=target.penalty)
    return s_c


def rows_of(target: Target, r0: int, r1: int) -> Target:
    """The target of rows [r0, r1) only (its columns unchanged): a rank's share of a global target."""
    row_fields = ("row_ids", "exclude_col", "row_group", "row_owner", "own_rule", "col_range", "mask", "penalty_rows",
                  "pair_col")
    teacher = target.teacher
    if teacher is not None:
        teacher = teacher._replace(a=teacher.a[r0:r1])
    return target._replace(**{f: getattr(target, f)[r0:r1] for f in row_fields if getattr(target, f) is not None},
                           pair_offset=target.pair_offset + r0, teacher=teacher)


def teacher_target(target: Target) -> Target:
    """The target of the teacher's pass: the student's kept pairs and positives, without the hardness
    penalty (a teacher's logits are its own) and without soft fields."""
    return target._replace(penalty=0.0, teacher=None, soft=0.0, hard=None, entropy=False)
