"""pytorch-metric-learning's NT-Xent and SupCon (docs/losses.md §1.8) on the engine: the pairs come
from class labels (every pair of one label a positive, every pair of two labels a negative, an
embedding never its own pair) or from an explicit list of mined pairs (``indices_tuple``), the
similarity is the cosine (PML's default ``CosineSimilarity``) over a temperature.

* ``pair_ntxent_loss``: each positive pair (a, p) against the anchor's negatives only,
  ``ℓ_ap = log(e^{S_ap} + Σ_{n ∈ N_a} e^{S_an}) − S_ap``, averaged over the positive pairs (PML's
  MeanReducer). With labels the negatives' log-sum-exp of every anchor is the engine's row LSE
  (``ops.target_row_lse``, the anchor's own label dropped by ownership), the positive pairs' logits
  are O(P·D) dot products: memory O((N + M)·D + P), never N×M.
* ``supcon_loss``: row i's ``LSE_{K_i} S − mean_{P_i} S`` over its kept pairs K_i = P_i ∪ N_i,
  averaged over the rows whose loss is above zero (PML's AvgNonZeroReducer). With labels it is the
  engine's general target (positives by label id, the row's own column excluded).

With ``indices_tuple`` (mined pairs, usually far fewer than N×M) both losses run on the listed pairs
alone: their dot products, and the per-anchor sums by scatter."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import reference
from .._validation import check_features, check_temperature
from ..ops import target_engine_loss, target_row_lse
from ..targets import Target
from ._checks import check_chunk_size

_PAIR_CHUNK = 1 << 16  # pairs per slice of the pair dot products


class _PairDots(torch.autograd.Function):
    """``out[k] = x[i[k]]·y[j[k]]`` for P pairs in slices of pairs: memory O(P + slice·D)."""

    @staticmethod
    def forward(ctx, x, y, i, j):
        acc = torch.promote_types(x.dtype, torch.float32)
        out = torch.empty(i.shape[0], dtype=acc, device=x.device)
        for k in range(0, i.shape[0], _PAIR_CHUNK):
            s = slice(k, k + _PAIR_CHUNK)
            out[s] = (x[i[s]].to(acc) * y[j[s]].to(acc)).sum(dim=1)
        ctx.save_for_backward(x, y, i, j)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, i, j = ctx.saved_tensors
        acc = grad.dtype
        gx = torch.zeros(x.shape, dtype=acc, device=x.device) if ctx.needs_input_grad[0] else None
        gy = torch.zeros(y.shape, dtype=acc, device=y.device) if ctx.needs_input_grad[1] else None
        for k in range(0, i.shape[0], _PAIR_CHUNK):
            s = slice(k, k + _PAIR_CHUNK)
            g = grad[s, None]
            if gx is not None:
                gx.index_add_(0, i[s], g * y[j[s]].to(acc))
            if gy is not None:
                gy.index_add_(0, j[s], g * x[i[s]].to(acc))
        return (None if gx is None else gx.to(x.dtype)), (None if gy is None else gy.to(y.dtype)), None, None


def _segment_lse(values: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) float64: the log-sum-exp of ``values`` grouped by ``index`` (−inf for an empty group),
    with gradients."""
    v = values.double()
    peak = torch.full((n,), float("-inf"), dtype=torch.float64, device=v.device)
    peak = peak.scatter_reduce(0, index, v.detach(), reduce="amax")
    has = torch.isfinite(peak)
    shift = torch.where(has, peak, torch.zeros_like(peak))
    total = torch.zeros(n, dtype=torch.float64, device=v.device).index_add(0, index, torch.exp(v - shift[index]))
    safe = torch.where(has, total, torch.ones_like(total))  # (no log(0) in an empty group's gradient)
    return torch.where(has, shift + torch.log(safe), peak)


def _zero(embeddings):
    return (embeddings * 0).sum()


def _check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The checked (embeddings, labels, pairs, ref_emb, ref_labels, same): ``pairs`` the 4-tuple
    (a1, p, a2, n) of an explicit ``indices_tuple`` (a triplet tuple (a, p, n) gives (a, p, a, n)), else
    None; ``same`` whether the embeddings are their own references (their diagonal is no pair)."""
    if ref_emb is None:
        check_features("embeddings", embeddings, "embeddings", embeddings)
    else:
        check_features("embeddings", embeddings, "ref_emb", ref_emb)
    n = embeddings.shape[0]
    m = n if ref_emb is None else ref_emb.shape[0]
    for name, lab, rows in (("labels", labels, n), ("ref_labels", ref_labels, m)):
        if lab is None:
            continue
        if not isinstance(lab, torch.Tensor) or lab.dim() != 1 or lab.shape[0] != rows:
            shape = tuple(lab.shape) if isinstance(lab, torch.Tensor) else type(lab).__name__
            raise ValueError(f"{name} must be a 1-D tensor of one label per row ({rows},), got {shape}")
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class labels, got {lab.dtype}")
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    pairs = None
    if indices_tuple is not None:
        pairs = _check_pairs(indices_tuple, n, m, embeddings.device)
    labels = None if labels is None else labels.to(embeddings.device)
    if ref_emb is None:
        ref_labels = None  # (PML pairs the embeddings with themselves by ``labels``, whatever ref_labels says)
    same = ref_emb is None or (ref_labels is None and labels is not None)
    if ref_labels is not None:
        ref_labels = ref_labels.to(embeddings.device)
    else:
        if ref_emb is not None and labels is not None and m != n and pairs is None:
            raise ValueError(f"ref_emb has {m} rows but no ref_labels: pass ref_labels (labels has {n})")
        ref_labels = labels
    return labels, pairs, ref_emb, ref_labels, same


def _check_pairs(indices_tuple, n, m, device):
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError("indices_tuple must be (anchors, positives, negatives) or (anchors1, positives, anchors2, "
                         "negatives), tensors of indices")
    parts = []
    for k, t in enumerate(indices_tuple):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"indices_tuple[{k}] must be a 1-D integer tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        parts.append(t.to(device=device, dtype=torch.int64))
    if len(parts) == 3:
        parts = [parts[0], parts[1], parts[0], parts[2]]
    a1, p, a2, neg = parts
    if a1.shape != p.shape or a2.shape != neg.shape:
        raise ValueError(f"indices_tuple: each anchor needs its partner, got {a1.shape[0]} anchors for {p.shape[0]} "
                         f"positives and {a2.shape[0]} anchors for {neg.shape[0]} negatives")
    for name, t, hi in (("anchor", a1, n), ("positive", p, m), ("anchor", a2, n), ("negative", neg, m)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
            raise ValueError(f"indices_tuple: a {name} index lies outside [0, {hi})")
    return a1, p, a2, neg


def _label_ids(labels, ref_labels):
    """Dense ids (0..) of the labels and the reference labels, one id per distinct label."""
    _, inv = torch.unique(torch.cat([labels, ref_labels.to(labels.device)]).to(torch.int64), return_inverse=True)
    return inv[:labels.shape[0]], inv[labels.shape[0]:]


def _label_pairs(ids, ref_ids, same, listed: bool = True):
    """The positive pairs (a, p) of equal label ids in O(P) memory (through the sorted references,
    never an N×M comparison; None, None without ``listed``: the counts alone, O(N)), and each anchor's
    numbers of positives and negatives."""
    order = torch.argsort(ref_ids, stable=True)
    sorted_ids = ref_ids[order]
    lo = torch.searchsorted(sorted_ids, ids)
    count = torch.searchsorted(sorted_ids, ids, right=True) - lo
    n_neg = ref_ids.shape[0] - count
    if not listed:
        return None, None, count - 1 if same else count, n_neg
    a = torch.repeat_interleave(torch.arange(ids.shape[0], device=ids.device), count)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    p = order[torch.repeat_interleave(lo, count) + torch.arange(a.shape[0], device=ids.device) - first]
    if same:
        keep = a != p
        a, p, count = a[keep], p[keep], count - 1
    return a, p, count, n_neg


def _normalized(embeddings, ref_emb):
    z = F.normalize(embeddings, dim=1)
    return z, (z if ref_emb is None else F.normalize(ref_emb, dim=1))


def _inv_t(temperature, device):
    return torch.tensor(1.0 / temperature, dtype=torch.float64, device=device)


class _Batch(NamedTuple):
    """A checked call of the pair losses: its settings, the pairs (listed, or from the labels) and
    whether it has no loss at all."""
    temperature: float
    chunk_size: Optional[int]
    labels: Optional[torch.Tensor]
    pairs: Optional[tuple]  # the listed (a1, p, a2, n); None with labels
    label_pairs: Optional[tuple]  # with labels: (ids, ref_ids, a, p, n_pos, n_neg) (_label_pairs; a, p listed
    # for NT-Xent only)
    ref_emb: Optional[torch.Tensor]
    ref_labels: Optional[torch.Tensor]
    same: bool
    n: int
    m: int
    empty: bool


def _prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature, chunk_size, supcon) -> _Batch:
    """The checked call. ``supcon``: the listed pairs as sets, the label pairs counted, not listed.
    ``empty``: PML's rules give 0 (no positive or no negative pair, or at most one pair of each kind,
    counted as listed, before any repeats are dropped)."""
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    labels, pairs, ref_emb, ref_labels, same = _check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
    n, m = embeddings.shape[0], (embeddings if ref_emb is None else ref_emb).shape[0]
    label_pairs = None
    if pairs is None:
        ids, ref_ids = _label_ids(labels, ref_labels)
        label_pairs = (ids, ref_ids) + _label_pairs(ids, ref_ids, same, listed=not supcon)
        n_pairs, n_neg = int(label_pairs[4].sum()), int(label_pairs[5].sum())
        counts = (n_pairs, n_pairs, n_neg, n_neg)
    else:
        counts = tuple(t.shape[0] for t in pairs)
        if supcon:
            pairs = _unique_pairs(pairs, m)
    empty = all(c <= 1 for c in counts) or counts[0] == 0 or counts[2] == 0
    return _Batch(temperature, chunk_size, labels, pairs, label_pairs, ref_emb, ref_labels, same, n, m, empty)


def pair_ntxent_loss(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, *, indices_tuple=None,
                     ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
                     temperature: float = 0.07, backend: str = "auto",
                     chunk_size: Optional[int] = None) -> torch.Tensor:
    """pytorch-metric-learning's ``NTXentLoss`` (docs/losses.md §1.8): for each positive pair (a, p)
    (a label's pairs, or the listed ones), ``−log(e^{S_ap} / (e^{S_ap} + Σ_{n ∈ N_a} e^{S_an}))`` with
    ``S = cos(·,·)/τ`` and N_a the anchor's negatives (other labels, or the listed negatives of a),
    averaged over the positive pairs; 0 (with a zero gradient) without a positive or a negative pair.
    ``embeddings`` (N, D) against themselves or against ``ref_emb`` (M, D) with ``ref_labels``.
    Returns a 0-d tensor in the embeddings' dtype."""
    b = _prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature, chunk_size, False)
    if b.empty:
        return _zero(embeddings)
    temperature, pairs, n, m, dev = b.temperature, b.pairs, b.n, b.m, embeddings.device
    if backend == "reference":
        pos, neg = _dense_pairs(b)
        return reference.pair_ntxent_loss_reference(embeddings, pos, neg, temperature, b.ref_emb).to(embeddings.dtype)
    z, r = _normalized(embeddings, b.ref_emb)
    if pairs is None:
        ids, ref_ids, a, p, _, _ = b.label_pairs
        own = torch.ones(n, dtype=torch.int64, device=dev)  # rule 1: the anchor's own label is no negative
        none = torch.full((n,), -1, dtype=torch.int64, device=dev)
        target = Target(none, torch.full((m,), -1, dtype=torch.int64, device=dev), row_owner=ids, col_owner=ref_ids,
                        own_rule=own)
        lse = target_row_lse(z, r, _inv_t(temperature, dev), None, target, backend=backend, chunk_size=b.chunk_size)
    else:
        a, p, a2, neg = pairs
        lse = _segment_lse(_PairDots.apply(z, r, a2, neg) / temperature, a2, n)
    s_pos = (_PairDots.apply(z, r, a, p) / temperature).double()
    loss = (torch.logaddexp(s_pos, lse[a]) - s_pos).mean()
    return loss.to(embeddings.dtype)


def supcon_loss(embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, *, indices_tuple=None,
                ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None,
                temperature: float = 0.1, backend: str = "auto", chunk_size: Optional[int] = None) -> torch.Tensor:
    """pytorch-metric-learning's ``SupConLoss`` (docs/losses.md §1.8): row i's loss
    ``LSE_{K_i} S − mean_{P_i} S`` with ``S = cos(·,·)/τ`` over its positives P_i and kept pairs
    K_i = P_i ∪ N_i (with labels: every other column), averaged over the rows whose loss is above zero;
    0 (with a zero gradient) without a positive or a negative pair. Returns a 0-d tensor in the
    embeddings' dtype."""
    b = _prepare(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature, chunk_size, True)
    if b.empty:
        return _zero(embeddings)
    temperature, dev = b.temperature, embeddings.device
    if backend == "reference":
        pos, neg = _dense_pairs(b)
        return reference.supcon_loss_reference(embeddings, pos, neg, temperature, b.ref_emb).to(embeddings.dtype)
    z, r = _normalized(embeddings, b.ref_emb)
    if b.pairs is not None:
        return _supcon_listed(z, r, b.pairs, temperature, b.n).to(embeddings.dtype)
    ids, ref_ids, _, _, n_pos, n_neg = b.label_pairs
    rows = torch.nonzero(n_pos > 0).flatten()  # a row without a positive has loss 0
    # a row whose only kept pair is its one positive has loss exactly 0: left out of the average
    nonzero = int(rows.shape[0]) - int(((n_pos == 1) & (n_neg == 0)).sum())
    if nonzero == 0:
        return _zero(embeddings)
    target = Target(ids[rows], ref_ids, exclude_col=rows if b.same else None)
    mean = target_engine_loss(z[rows], r, _inv_t(temperature, dev), None, target, symmetric=False, backend=backend,
                              chunk_size=b.chunk_size)
    return (mean * (rows.shape[0] / nonzero)).to(embeddings.dtype)


def _unique_pairs(pairs, m):
    """The listed pairs without repeats (PML's SupCon reads them through masks); a pair listed as
    both a positive and a negative is a ValueError."""
    a1, p, a2, neg = pairs
    pos_key, neg_key = torch.unique(a1 * m + p), torch.unique(a2 * m + neg)
    if torch.isin(pos_key, neg_key).any():
        raise ValueError("indices_tuple lists a pair as both a positive and a negative")
    return pos_key // m, pos_key % m, neg_key // m, neg_key % m


def _supcon_listed(z, r, pairs, temperature, n):
    """SupCon over the listed (unique) pairs: each anchor's LSE over its positives and negatives, the
    mean of its positives, averaged over the anchors whose loss is above zero."""
    a1, p, a2, neg = pairs
    s_pos = _PairDots.apply(z, r, a1, p) / temperature
    s_neg = _PairDots.apply(z, r, a2, neg) / temperature
    lse = _segment_lse(torch.cat([s_pos, s_neg]), torch.cat([a1, a2]), n)
    n_pos = torch.zeros(n, dtype=torch.float64, device=z.device).index_add(0, a1, torch.ones_like(s_pos.double()))
    sum_pos = torch.zeros(n, dtype=torch.float64, device=z.device).index_add(0, a1, s_pos.double())
    has = n_pos > 0
    rows = lse[has] - sum_pos[has] / n_pos[has]
    rows = rows[rows.detach() > 0]
    return rows.mean() if rows.numel() else _zero(z)


def _dense_pairs(b: "_Batch"):
    """The (N, M) masks of positive and negative pairs, for the reference."""
    if b.pairs is None:
        return reference.label_pairs_reference(b.labels, b.ref_labels.to(b.labels.device), b.same)
    a1, p, a2, neg = b.pairs
    pos = torch.zeros(b.n, b.m, dtype=torch.bool, device=a1.device)
    negm = torch.zeros(b.n, b.m, dtype=torch.bool, device=a1.device)
    pos[a1, p] = True
    negm[a2, neg] = True
    return pos, negm
