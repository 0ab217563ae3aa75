"""Between a general target's two passes, for every backend alike: pass 1's statistics
(``TargetStats``) → row groups → the loss and pass 2's weights (``loss_and_weights``); the teacher's
own pass of soft targets (``teacher_stats``, ``teacher_norms``); and the loss on a backend's two
passes (``two_pass_target``). What a target means is ``definition.py``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .definition import TEACHER_LINEAR, Target, hard_weight, teacher_target


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
    # ∂L/∂s from outside the tile (float64, 0-d; the debiased loss's floor M·e^{−s}), added to the
    # backend's Σ G·∂S/∂s
    d_scale: Optional[torch.Tensor] = None


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


def debiased_terms(lse, n_neg, s_pos, tau: float, scale):
    """The debiased loss of groups with one positive (docs/losses.md §2.5) from pass 1's statistics,
    in log space (float64): each group's LSE over its kept pairs ``lse``, its number of negatives M
    ``n_neg`` and its positive's logit ``s_pos``, the class prior τ⁺ and the logit scale s. Returns
    (ℓ, λ', q, ∂ℓ/∂s from the floor): pass 2's G is ``exp(S − λ') − q·[pos]`` on the kept pairs."""
    f64 = torch.float64
    lse, s_pos, m = lse.to(f64), s_pos.to(f64), n_neg.to(f64)
    s = scale.to(f64).reshape(())
    inf = torch.full_like(lse, float("inf"))
    log_neg = lse + torch.log(-torch.expm1((s_pos - lse).clamp(max=0.0)))  # log Σ_n e^{S_n}
    log_tm = torch.log(tau * m) + s_pos  # log τ⁺·M·e^{S_p}
    above = log_neg > log_tm
    gap = torch.where(above, log_tm - log_neg, -inf)
    log_num = torch.where(above, log_neg + torch.log(-torch.expm1(gap)), -inf) - math.log1p(-tau)
    log_floor = torch.log(m) - s
    floor = log_floor >= log_num
    log_z = torch.logaddexp(s_pos, torch.maximum(log_num, log_floor))
    r = torch.exp(s_pos - log_z)
    lse_eff = torch.where(floor, inf, log_z + math.log1p(-tau))
    q = torch.where(floor, 1.0 - r, 1.0 + tau * (1.0 + m) * r / (1.0 - tau))
    d_s = torch.where(floor, -torch.exp(log_floor - log_z), torch.zeros_like(r))
    return log_z - s_pos, lse_eff, q, d_s


def _debiased_loss_and_weights(target, st, symmetric, acc, shard, scale, groups, g_lse, g_pos, g_keep, g_sum_pos,
                               w_r, w_c, owned):
    """``loss_and_weights`` of a debiased target (one positive per group, no smoothing or soft targets)."""
    tau = float(target.debias)
    if scale is None:
        raise ValueError("the debiased loss needs the logit scale")
    checks = [("row", g_pos, torch.ones_like(g_pos, dtype=torch.bool))]
    if symmetric:
        checks.append(("column", st.col_pos, owned))
    for name, count, where in checks:
        many = torch.nonzero((count > 1) & where).reshape(-1)
        if many.numel():
            k = int(many[0])
            shown = k + (shard.offset if shard is not None and name == "row" else 0)
            raise ValueError(f"the debiased loss takes one positive per {name}; {name} {shown} has {int(count[k])}")
    ell, lse_eff, q, d_s = debiased_terms(g_lse, g_keep - g_pos, g_sum_pos, tau, scale)
    loss = w_r * ell.sum()
    d_scale = w_r * d_s.sum()
    if shard is not None:
        both = torch.stack([loss, d_scale])
        shard.all_reduce_sum(both)
        loss = both[0]
    zeros = torch.zeros(st.row_lse.shape[0], dtype=acc, device=st.row_lse.device)
    weights = TargetWeights(lse_eff[groups], q[groups].to(acc), zeros, w_r)
    if symmetric:
        c_ell, c_lse, c_q, c_ds = debiased_terms(st.col_lse, st.col_keep - st.col_pos, st.col_sum_pos, tau, scale)
        loss = loss + w_c * c_ell[owned].sum()
        if shard is None or shard.offset == 0:  # every rank holds the columns' terms: counted once
            d_scale = d_scale + w_c * c_ds[owned].sum()
        weights = weights._replace(col_lse=torch.where(owned, c_lse, float("inf")),
                                   q_col_pos=torch.where(owned, c_q, 0.0).to(acc),
                                   q_col_keep=torch.zeros_like(st.col_lse, dtype=acc),
                                   w_col=owned.to(acc) * w_c, w_col_max=w_c)
    return loss, weights._replace(d_scale=d_scale)


def loss_and_weights(target: Target, st: TargetStats, eps: float, symmetric: bool, acc: torch.dtype,
                     shard: Optional[RowShard] = None, scale: Optional[torch.Tensor] = None):
    """The float64 loss of the statistics and the weights of pass 2::

        L = w_r·Σ_g [LSE_{K_g} S − (1−ε)·mean_{P_g} S − ε·mean_{K_g} S]
          + w_c·Σ_{j owning a positive} [the same over column j's kept rows]

    over the groups g of rows (each row its own group without ``row_group``), w_r = 1/G (½ of it and
    w_c = 1/(2·#owning columns) when ``symmetric``, else w_c = 0). A group with no positive is a
    ValueError naming it. With a ``shard`` the rows are this rank's (no row groups), the column
    statistics already every rank's, and the loss the one of all ranks' rows. A debiased target
    (``Target.debias``, docs/losses.md §2.5) needs the logit ``scale`` and pass 1's counts of kept
    pairs; its weights carry the floor's ``d_scale``."""
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
    if target.debias:
        if eps or soft or h != 1.0:
            raise ValueError("the debiased loss does not combine with label smoothing or soft targets")
        return _debiased_loss_and_weights(target, st, symmetric, acc, shard, scale, groups, g_lse, g_pos, g_keep,
                                          g_sum_pos, w_r, w_c, owned)

    # a linear teacher normalised with an eps leaves each row's soft mass 1 − eps/norm
    row_mass = col_mass = None
    t_eps = target.teacher.eps if soft and target.teacher.kind == TEACHER_LINEAR else 0.0
    if t_eps:
        row_mass = 1.0 - soft * t_eps / st.t_row_norm
        col_mass = None if st.t_col_norm is None else 1.0 - soft * t_eps / st.t_col_norm

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


def teacher_stats(teacher_pass, target: Target, symmetric: bool, chunk_rows: int) -> TargetStats:
    """The teacher's pass as a backend runs it (its ``teacher_stats`` operation, a pass 1 with the
    signature of ``target_stats``) over the teacher's features: the
    LSEs of a softmax teacher's logits ``s_t·A_t·B_tᵀ``, or the kept sums (the label-smoothing
    statistics) of a linear teacher's weights ``c0 + c1·A_t·B_tᵀ``, and the positives' counts."""
    from ..kernels._common import acc_dtype

    if target.margin is not None:
        raise ValueError("soft targets do not combine with the margin rule (it reads the student's similarities)")
    t = target.teacher
    acc = acc_dtype(t.a.dtype)
    linear = t.kind == TEACHER_LINEAR
    number = lambda v: torch.tensor(float(v), dtype=acc, device=t.a.device)  # noqa: E731
    scale = number(t.c1) if linear else t.scale.to(acc).reshape(())
    bias = number(t.c0 if linear else 0.0)
    st, _ = teacher_pass(t.a, t.b, scale, bias, teacher_target(target), symmetric, linear, chunk_rows, 0)
    return st


def teacher_norms(target: Target, st: TargetStats, symmetric: bool) -> TeacherNorms:
    """The teacher's normalisers from its pass's statistics (``teacher_stats``, with the columns of
    every rank merged in a distributed loss)."""
    f64 = torch.float64
    t = target.teacher
    if t.kind == TEACHER_LINEAR:
        row, col = st.row_sum_keep.to(f64) + t.eps, st.col_sum_keep.to(f64) + t.eps
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
    from ..kernels._common import acc_dtype

    teacher = None
    if target.soft:
        teacher = teacher_norms(target, teacher_stats(teacher_pass or stats_fn, target, symmetric, chunk_rows),
                                symmetric)
    st, cached = stats_fn(a, b, scale, bias, target, symmetric, needs_counts(target, eps), chunk_rows,
                          cache_bytes if need_grad else 0, teacher)
    loss, weights = loss_and_weights(target, st, eps, symmetric, acc_dtype(a.dtype), scale=scale)
    if not need_grad:
        return loss, None, None, None, None
    grad_a, grad_b, grad_scale, grad_bias = grad_fn(a, b, scale, bias, target, weights, chunk_rows, cached)
    return loss, grad_a, grad_b, with_d_scale(grad_scale, weights), grad_bias


def needs_counts(target: Target, eps: float) -> bool:
    """Whether pass 1 counts each row's kept pairs (its ``smoothing`` flag): for label smoothing and
    for the debiased loss (its M)."""
    return bool(eps) or bool(target.debias)


def with_d_scale(grad_scale, weights: TargetWeights):
    """The backend's gradient of the scale plus the part from outside the tile (``d_scale``)."""
    return grad_scale if weights.d_scale is None else grad_scale + weights.d_scale.to(grad_scale.dtype)


# ---------------------------------------------------------------------------------------------------
# Matryoshka prefixes in one pass over D (docs/engine.md)

class Prefix(NamedTuple):
    """Nested prefixes of the features in one engine pass: ``dims`` d_1 > d_2 > … (each within D) and
    per-row and per-column scales ``row_scale`` (Na, K) and ``col_scale`` (Nb, K) (1/‖A_i[:d_k]‖ for
    normalised prefixes, 1 for raw ones): prefix k's logits are ``s·r_k[i]·(A_i[:d_k]·B_j[:d_k])·c_k[j]
    + b``."""
    dims: tuple
    row_scale: torch.Tensor
    col_scale: torch.Tensor


def weighted(weights: TargetWeights, w: float) -> TargetWeights:
    """Pass 2's weights of ``w`` times the loss (G and the scale's outside part are linear in them)."""
    return weights._replace(w_row=weights.w_row * w, w_col=None if weights.w_col is None else weights.w_col * w,
                            w_col_max=weights.w_col_max * abs(w),
                            d_scale=None if weights.d_scale is None else weights.d_scale * w)


def two_pass_prefix_target(stats_fn, grad_fn, a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad,
                           prefix: Prefix, prefix_weights, shard: Optional[RowShard] = None, merge_cols=None):
    """``Σ_k w_k·L_k`` of a general target at every prefix of ``prefix`` on a backend's two prefix
    passes (``target_prefix_stats``, ``target_prefix_grad``): one LSE set per prefix, one pass over D
    each. Returns (loss float64, grad_a, grad_b, grad_scale, grad_bias, grad_row_scale,
    grad_col_scale), the gradients None without ``need_grad``. With a ``shard`` (this rank's rows of a
    loss whose rows are split over ranks, as ``loss_and_weights`` takes it), ``merge_cols`` merges each
    prefix's column statistics across the ranks between the passes (symmetric losses); the gradients
    are then this rank's parts, to be summed over the ranks by the caller."""
    from ..kernels._common import acc_dtype

    if target.soft:
        raise ValueError("soft targets do not combine with Matryoshka prefixes in one pass")
    acc = acc_dtype(a.dtype)
    sts = stats_fn(a, b, scale, bias, target, symmetric, needs_counts(target, eps), chunk_rows, prefix)
    loss, weights = None, []
    for st, w in zip(sts, prefix_weights):
        if merge_cols is not None:
            st = merge_cols(st)
        part, wt = loss_and_weights(target, st, eps, symmetric, acc, shard, scale=scale)
        loss = part * w if loss is None else loss + part * w
        weights.append(weighted(wt, w))
    if not need_grad:
        return (loss,) + (None,) * 6
    grad_a, grad_b, grad_scale, grad_bias, grad_rs, grad_cs = grad_fn(a, b, scale, bias, target, weights,
                                                                      chunk_rows, prefix)
    for wt in weights:
        grad_scale = with_d_scale(grad_scale, wt)
    return loss, grad_a, grad_b, grad_scale, grad_bias, grad_rs, grad_cs
