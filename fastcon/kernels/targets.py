"""The engine's general target, and its executable statement on row chunks (the torch backend).

A target says, for every pair (row i, column j) of ``S = s·A·Bᵀ + b``, whether column j is kept for
row i (a dropped pair is as if its logit were −∞, in both directions), whether it is a positive, and
which softmax row i belongs to. Everything but the optional dense mask is O(N) memory::

    Target(row_ids, col_ids, exclude_col, col_keep, pair_offset, margin,
           row_group, row_owner, col_owner, own_rule, col_range,
           penalty, penalty_cols, penalty_mode, mask, penalty_rows)

* positives by id: ``row_ids`` (Na, int64; −1: the row has no positive of its own) and ``col_ids``
  (Nb, int64; −1: never a positive): column j is a positive of row i when ``col_ids[j] ==
  row_ids[i] >= 0`` (several per row: duplicates and pairs of one class are not negatives);
* ``exclude_col`` (Na, int64; −1: none): column ``exclude_col[i]`` is dropped from row i (its own
  similarity in self-contrast: NT-Xent, sentence-transformers' query_to_query);
* ``col_keep`` (Nb, bool): False drops column j from every row (a padded negative slot);
* ``margin`` with ``pair_offset``: GISTEmbed's false-negative rule, a non-positive column j is dropped
  from row i when ``A_i·B_j > A_i·B_{i + pair_offset} − margin`` (similarity units, before the scale;
  column ``i + pair_offset`` holds row i's own pair). Both similarities are read from the same chunk of
  dot products, so that ties are decided exactly;
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

Positives are kept columns by definition (a dropped column is never a positive). The loss of a group g
(docs/losses.md §2.1) is ``LSE_{K_g}(S) − (1−ε)·mean_{P_g} S − ε·mean_{K_g} S`` over the kept pairs
``K_g`` and positives ``P_g`` of its rows; the column direction is the same on the transposed masks,
over the columns that own a positive (without groups).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

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
    # soft targets from a teacher tile (torch backend): Q = hard·[pos]/|P| + ε/|K| + soft·Qt
    teacher_a: Optional[torch.Tensor] = None
    teacher_b: Optional[torch.Tensor] = None
    teacher_scale: Optional[torch.Tensor] = None
    soft: float = 0.0
    hard: Optional[float] = None
    teacher_kind: int = 0
    teacher_c0: float = 0.0
    teacher_c1: float = 1.0
    teacher_eps: float = 0.0
    entropy: bool = False


TEACHER_LINEAR = 1  # teacher_kind: 0 a softmax teacher, 1 a linear one


def hard_weight(target: Target, eps: float) -> float:
    """The weight of the hard positives in Q: ``hard``, or what smoothing and soft targets leave."""
    return (1.0 - eps - target.soft) if target.hard is None else target.hard


def teacher_chunk(target: Target, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """The teacher's tile of rows [r0, r1) × columns [c0, c1) (no gradient): logits
    ``s_t·A_t·B_tᵀ`` (softmax teacher) or weights ``c0 + c1·A_t·B_tᵀ`` (linear teacher)."""
    from ._common import mm_acc

    dot = mm_acc(target.teacher_a[r0:r1], target.teacher_b[c0:c1].T)
    if target.teacher_kind == TEACHER_LINEAR:
        return dot.mul_(target.teacher_c1).add_(target.teacher_c0)
    return dot.mul_(target.teacher_scale)


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
        pair = dot[local, local + r0 + target.pair_offset - c0]
        keep = _and(keep, pos | (dot <= pair[:, None] - target.margin))
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


def chunk_logits(target: Target, dot: torch.Tensor, scale, bias, penalised) -> torch.Tensor:
    """``s·dot + b`` plus the stop-gradient hardness penalty ``α·dot`` on the penalised pairs."""
    s_c = dot * scale + bias
    if penalised is not None:
        s_c.add_(torch.where(penalised, dot, 0.0), alpha=target.penalty)
    return s_c


# ---------------------------------------------------------------------------------------------------
# Between the two passes, for every backend: statistics → row groups → loss and target weights

class TargetStats(NamedTuple):
    """Pass 1's statistics: per row and per column (the columns only for a symmetric loss) the
    float64 LSE over the kept pairs, the number of positives and their summed logits (float64), and
    with label smoothing the number of kept pairs and their summed logits."""
    row_lse: torch.Tensor
    row_pos: torch.Tensor
    row_keep: torch.Tensor
    row_sum_pos: torch.Tensor
    row_sum_keep: torch.Tensor
    col_lse: torch.Tensor
    col_pos: torch.Tensor
    col_keep: torch.Tensor
    col_sum_pos: torch.Tensor
    col_sum_keep: torch.Tensor
    # with soft targets: the teacher's normalisers per row and column (LSE of a softmax teacher, sum of
    # a linear one plus its eps), the cross terms Σ Qt·S, and with ``entropy`` Σ Q·log Q
    t_row_norm: Optional[torch.Tensor] = None
    t_col_norm: Optional[torch.Tensor] = None
    cross_row: Optional[torch.Tensor] = None
    cross_col: Optional[torch.Tensor] = None
    ent_row: Optional[torch.Tensor] = None
    ent_col: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, na: int, nb: int, count_dtype: torch.dtype, device) -> "TargetStats":
        """Statistics before any pair: LSEs −inf, counts and sums 0 (counts in ``count_dtype``, the
        rest float64)."""
        f64 = torch.float64
        return cls(row_lse=torch.full((na,), float("-inf"), dtype=f64, device=device),
                   row_pos=torch.zeros(na, dtype=count_dtype, device=device),
                   row_keep=torch.zeros(na, dtype=count_dtype, device=device),
                   row_sum_pos=torch.zeros(na, dtype=f64, device=device),
                   row_sum_keep=torch.zeros(na, dtype=f64, device=device),
                   col_lse=torch.full((nb,), float("-inf"), dtype=f64, device=device),
                   col_pos=torch.zeros(nb, dtype=count_dtype, device=device),
                   col_keep=torch.zeros(nb, dtype=count_dtype, device=device),
                   col_sum_pos=torch.zeros(nb, dtype=f64, device=device),
                   col_sum_keep=torch.zeros(nb, dtype=f64, device=device))


class TargetWeights(NamedTuple):
    """What pass 2 needs: ``G = w_row·(exp(S − row_lse_i) − q_row_pos_i·[pos] − q_row_keep_i)
    + w_col_j·(exp(S − col_lse_j) − q_col_pos_j·[pos] − q_col_keep_j)`` on the kept pairs. ``row_lse``
    is the LSE of each row's group (float64); the column terms are None without a column direction
    (col_lse +inf and w_col 0 on the columns that own no positive)."""
    row_lse: torch.Tensor
    q_row_pos: torch.Tensor
    q_row_keep: torch.Tensor
    w_row: float
    col_lse: Optional[torch.Tensor] = None
    q_col_pos: Optional[torch.Tensor] = None
    q_col_keep: Optional[torch.Tensor] = None
    w_col: Optional[torch.Tensor] = None
    w_col_max: float = 0.0  # the largest w_col (a bound for the backends that scale G), known on the host
    t_row_norm: Optional[torch.Tensor] = None  # soft targets: the teacher's normalisers (TargetStats)
    t_col_norm: Optional[torch.Tensor] = None
    # the total target mass of each row (column) where it is not 1 (a linear teacher's eps):
    # ∂/∂S of −Σ_j Q_ij·log p_ij is (Σ_k Q_ik)·p_ij − Q_ij
    row_mass: Optional[torch.Tensor] = None
    col_mass: Optional[torch.Tensor] = None


def _group_sum(values, groups, n_groups):
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, groups, values)


def group_lse(row_lse, groups, n_groups):
    """float64 LSE over the rows of each group of their row LSEs (−inf rows contribute nothing)."""
    peak = torch.full((n_groups,), float("-inf"), dtype=row_lse.dtype, device=row_lse.device)
    peak = peak.scatter_reduce(0, groups, row_lse, "amax")
    shift = torch.where(torch.isfinite(peak), peak, 0.0)
    return torch.log(_group_sum(torch.exp(row_lse - shift[groups]), groups, n_groups)) + shift


class RowShard(NamedTuple):
    """This rank's rows of a loss whose rows are split over ranks (``fastcon.distributed``): their
    global offset, the number of rows of all ranks, and collectives over the ranks (in place)."""
    offset: int
    total_rows: int
    all_reduce_sum: object
    all_reduce_min: object


def loss_and_weights(target: Target, st: TargetStats, eps: float, symmetric: bool, acc: torch.dtype,
                     shard: Optional[RowShard] = None):
    """The float64 loss of the statistics and the weights of pass 2::

        L = w_r·Σ_g [LSE_{K_g} S − (1−ε)·mean_{P_g} S − ε·mean_{K_g} S]
          + w_c·Σ_{j owning a positive} [the same over column j's kept rows]

    over the groups g of rows (each row its own group without ``row_group``), w_r = 1/G (½ of it and
    w_c = 1/(2·#owning columns) when ``symmetric``, else w_c = 0). A group with no positive is a
    ValueError naming it. With a ``shard`` the rows are this rank's (no row groups), the column
    statistics already every rank's, and the loss the one of all ranks' rows."""
    na = st.row_lse.shape[0]
    dev = st.row_lse.device
    if symmetric and target.row_group is not None:
        raise ValueError("a target with row groups has no column direction (symmetric=False)")
    if shard is not None and target.row_group is not None:
        raise ValueError("row groups do not span ranks")
    if target.row_group is None:
        groups, n_groups = torch.arange(na, device=dev), na
    else:
        groups = target.row_group
        n_groups = int(groups.max()) + 1 if na else 0
    g_lse = group_lse(st.row_lse, groups, n_groups)
    g_pos, g_keep = _group_sum(st.row_pos, groups, n_groups), _group_sum(st.row_keep, groups, n_groups)
    g_sum_pos = _group_sum(st.row_sum_pos, groups, n_groups)
    g_sum_keep = _group_sum(st.row_sum_keep, groups, n_groups)
    h = hard_weight(target, eps)
    soft = target.soft
    if soft and target.row_group is not None:
        raise ValueError("soft targets do not combine with row groups")
    # a group needs a positive only where the hard targets have weight
    bad = torch.nonzero(g_pos == 0).reshape(-1) if h != 0 else g_pos.new_zeros(0, dtype=torch.int64)
    offset, total = (0, n_groups) if shard is None else (shard.offset, shard.total_rows)
    first_bad = torch.tensor([int(bad[0]) + offset if bad.numel() else total], dtype=torch.int64, device=dev)
    if shard is not None:
        shard.all_reduce_min(first_bad)  # every rank raises, or none
    if int(first_bad) < total:
        what = f"row {int(first_bad)}" if target.row_group is None else f"row group {int(first_bad)}"
        raise ValueError(f"{what} of the loss has no positive among its kept columns")
    owned = st.col_pos > 0
    w_r = (0.5 if symmetric else 1.0) / total
    w_c = 0.5 / max(int(owned.sum()), 1) if symmetric else 0.0

    # a linear teacher normalised with an eps leaves each row's soft mass 1 − eps/norm
    row_mass = col_mass = None
    if soft and target.teacher_kind == TEACHER_LINEAR and target.teacher_eps:
        row_mass = 1.0 - soft * target.teacher_eps / st.t_row_norm
        col_mass = None if st.t_col_norm is None else 1.0 - soft * target.teacher_eps / st.t_col_norm

    def terms(lse, n_pos, n_keep, sum_pos, sum_keep, cross=None, ent=None, mass=None):
        out = lse if mass is None else lse * mass
        if h != 0:
            out = out - h * sum_pos / n_pos.double()
        if eps:
            out = out - eps * sum_keep / n_keep.double()
        if soft:
            out = out - soft * cross
        return out if ent is None else out + ent

    loss = w_r * terms(g_lse, g_pos, g_keep, g_sum_pos, g_sum_keep, st.cross_row, st.ent_row, row_mass).sum()
    if shard is not None:
        loss = loss.reshape(1).clone()
        shard.all_reduce_sum(loss)
        loss = loss[0]
    if symmetric:
        loss = loss + w_c * terms(st.col_lse, st.col_pos, st.col_keep, st.col_sum_pos, st.col_sum_keep,
                                  st.cross_col, st.ent_col, col_mass)[owned].sum()
    zeros = torch.zeros(na, dtype=acc, device=dev)
    weights = TargetWeights(g_lse[groups], (h / g_pos.clamp_min(1))[groups].to(acc),
                            (eps / g_keep.clamp_min(1))[groups].to(acc) if eps else zeros, w_r,
                            t_row_norm=st.t_row_norm, t_col_norm=st.t_col_norm,
                            row_mass=None if row_mass is None else row_mass.to(acc),
                            col_mass=None if col_mass is None else col_mass.to(acc))
    if symmetric:
        # +inf for the columns without a positive: their column softmax term vanishes (exp(−inf) = 0)
        weights = weights._replace(
            col_lse=torch.where(owned, st.col_lse, float("inf")),
            q_col_pos=torch.where(owned, h / st.col_pos.clamp_min(1), 0.0).to(acc),
            q_col_keep=torch.where(owned, eps / st.col_keep.clamp_min(1), 0.0).to(acc),
            w_col=owned.to(acc) * w_c, w_col_max=w_c)  # (w_c · a bool tensor would be fp32)
    return loss, weights


def rows_of(target: Target, r0: int, r1: int) -> Target:
    """The target of rows [r0, r1) only (its columns unchanged): a rank's share of a global target."""
    row_fields = ("row_ids", "exclude_col", "row_group", "row_owner", "own_rule", "col_range", "mask", "penalty_rows",
                  "teacher_a")
    return target._replace(**{f: getattr(target, f)[r0:r1] for f in row_fields if getattr(target, f) is not None},
                           pair_offset=target.pair_offset + r0)


# ---------------------------------------------------------------------------------------------------
# Soft targets: the teacher's own pass, on a backend's pass 1

class TeacherNorms(NamedTuple):
    """The teacher's normaliser of each row and column over the kept pairs (float64: the LSE of a
    softmax teacher, the sum of a linear one plus its eps; ``col_norm`` None without a column
    direction) and the number of positives of each row and column (the targets' entropy needs them
    before pass 1 ends)."""
    row_norm: torch.Tensor
    col_norm: Optional[torch.Tensor]
    row_pos: torch.Tensor
    col_pos: torch.Tensor


def teacher_target(target: Target) -> Target:
    """The target of the teacher's pass: the student's kept pairs and positives, without the hardness
    penalty (a teacher's logits are its own) and without soft fields."""
    return target._replace(penalty=0.0, teacher_a=None, teacher_b=None, teacher_scale=None, soft=0.0, hard=None,
                           entropy=False)


def teacher_stats(teacher_pass, target: Target, symmetric: bool, chunk_rows: int) -> TargetStats:
    """The teacher's pass as a backend runs it (its ``teacher_stats`` operation, a pass 1 with the
    signature of ``target_stats``) over the teacher's features: the
    LSEs of a softmax teacher's logits ``s_t·A_t·B_tᵀ``, or the kept sums (the label-smoothing
    statistics) of a linear teacher's weights ``c0 + c1·A_t·B_tᵀ``, and the positives' counts."""
    from ._common import acc_dtype

    if target.margin is not None:
        raise ValueError("soft targets do not combine with the margin rule (it reads the student's similarities)")
    ta = target.teacher_a
    acc = acc_dtype(ta.dtype)
    linear = target.teacher_kind == TEACHER_LINEAR
    number = lambda v: torch.tensor(float(v), dtype=acc, device=ta.device)  # noqa: E731
    scale = number(target.teacher_c1) if linear else target.teacher_scale.to(acc).reshape(())
    bias = number(target.teacher_c0 if linear else 0.0)
    st, _ = teacher_pass(ta, target.teacher_b, scale, bias, teacher_target(target), symmetric, linear, chunk_rows, 0)
    return st


def teacher_norms(target: Target, st: TargetStats, symmetric: bool) -> TeacherNorms:
    """The teacher's normalisers from its pass's statistics (``teacher_stats``, with the columns of
    every rank merged in a distributed loss)."""
    f64 = torch.float64
    if target.teacher_kind == TEACHER_LINEAR:
        row, col = st.row_sum_keep.to(f64) + target.teacher_eps, st.col_sum_keep.to(f64) + target.teacher_eps
    else:
        row, col = st.row_lse, st.col_lse
    return TeacherNorms(row, col if symmetric else None, st.row_pos, st.col_pos)


def with_teacher(st: TargetStats, teacher: TeacherNorms, cross_row, cross_col, ent_row=None,
                 ent_col=None) -> TargetStats:
    """Pass 1's statistics with the soft targets' terms (``ent_*`` only with ``entropy``)."""
    return st._replace(t_row_norm=teacher.row_norm, t_col_norm=teacher.col_norm, cross_row=cross_row,
                       cross_col=cross_col, ent_row=ent_row, ent_col=ent_col)


def two_pass_target(stats_fn, grad_fn, a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad,
                    cache_bytes=0, teacher_pass=None):
    """The softmax loss of a general target on a backend's two passes (``stats_fn``: pass 1,
    ``grad_fn``: pass 2, reusing pass 1's cached chunks of dot products); with soft targets the
    teacher's pass (``teacher_pass``, by default ``stats_fn``) runs first. Returns (loss float64, grad_a, grad_b, grad_scale,
    grad_bias), the gradients None without ``need_grad``."""
    from ._common import acc_dtype

    teacher = None
    if target.soft:
        teacher = teacher_norms(target, teacher_stats(teacher_pass or stats_fn, target, symmetric, chunk_rows),
                                symmetric)
    st, cached = stats_fn(a, b, scale, bias, target, symmetric, bool(eps), chunk_rows,
                          cache_bytes if need_grad else 0, teacher)
    loss, weights = loss_and_weights(target, st, eps, symmetric, acc_dtype(a.dtype))
    if not need_grad:
        return loss, None, None, None, None
    return (loss,) + tuple(grad_fn(a, b, scale, bias, target, weights, chunk_rows, cached))
