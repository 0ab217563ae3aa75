"""GISTEmbed's guided in-batch negatives (docs/losses.md §2.6) on the engine's general target: the
guide's similarity tile is formed beside the student's (a ``Teacher`` of kind ``TEACHER_GUIDE``) and
decides the margin rule in the tile, so that neither a B×B student nor a B×B guide matrix exists."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from .._validation import check_features
from ..ops import prefix_target_loss, target_engine_loss
from ..targets import TEACHER_GUIDE, Target, Teacher
from ._checks import check_chunk_size, distributed_setup
from ._matryoshka import check_matryoshka, matryoshka_sum, one_pass, prefix

MARGIN_STRATEGIES = reference.GIST_MARGIN_STRATEGIES


def _negatives(name, x, b, dim):
    """(B, D) or (B, m, D) negatives as a (B, m, D) tensor."""
    if x.dim() == 2:
        x = x[:, None, :]
    if x.dim() != 3 or x.shape[0] != b or x.shape[2] != dim:
        raise ValueError(f"{name} must be (B={b}, {dim}) or (B={b}, m, {dim}), got {tuple(x.shape)}")
    return x


def _check(anchor, positive, guide_anchor, guide_positive, negatives, guide_negatives, temperature,
           margin_strategy, margin, contrast_anchors, contrast_positives):
    check_features("anchor", anchor, "positive", positive)
    check_features("guide_anchor", guide_anchor, "guide_positive", guide_positive)
    b = anchor.shape[0]
    for name, t, d in (("positive", positive, anchor.shape[1]), ("guide_anchor", guide_anchor, None),
                       ("guide_positive", guide_positive, guide_anchor.shape[1])):
        if t.shape[0] != b or (d is not None and t.shape[1] != d):
            raise ValueError(f"{name} must have the anchors' batch size {b}"
                             + ("" if d is None else f" and dim {d}") + f", got {tuple(t.shape)}")
    if (negatives is None) != (guide_negatives is None):
        raise ValueError("negatives and guide_negatives go together: give both or neither")
    if negatives is not None:
        for name, t, ref_name, ref in (("negatives", negatives, "anchor", anchor),
                                       ("guide_negatives", guide_negatives, "guide_anchor", guide_anchor)):
            if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
                raise TypeError(f"{name} must be a (B, D) or (B, m, D) tensor, got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            check_features(ref_name, ref, name, t.reshape(-1, t.shape[-1]))
        negatives = _negatives("negatives", negatives, b, anchor.shape[1])
        guide_negatives = _negatives("guide_negatives", guide_negatives, b, guide_anchor.shape[1])
        if guide_negatives.shape[1] != negatives.shape[1]:
            raise ValueError(f"guide_negatives must have the negatives' count m={negatives.shape[1]}, got "
                             f"{guide_negatives.shape[1]}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(f"margin_strategy must be one of {MARGIN_STRATEGIES}, got {margin_strategy!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    for name, v in (("contrast_anchors", contrast_anchors), ("contrast_positives", contrast_positives)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return negatives, guide_negatives


def gist_loss(anchor: torch.Tensor, positive: torch.Tensor, guide_anchor: torch.Tensor, guide_positive: torch.Tensor,
              *, negatives: Optional[torch.Tensor] = None, guide_negatives: Optional[torch.Tensor] = None,
              temperature: float = 0.01, margin_strategy: str = "absolute", margin: float = 0.0,
              contrast_anchors: bool = True, contrast_positives: bool = True, process_group=None,
              backend: str = "auto", chunk_size: Optional[int] = None, cache_limit: Optional[int] = None,
              matryoshka_dims=None, matryoshka_weights=None) -> torch.Tensor:
    """sentence-transformers' GISTEmbedLoss from embeddings (docs/losses.md §2.6).

    The student's anchors A and positives P (B, D), optional ``negatives`` N ((B, D) or (B, m, D)), and
    the guide model's embeddings of the same texts (``guide_*``, (B, Dg), any Dg). Cosine
    similarities; row i is one softmax over ``A_i·Pᵀ``, ``A_i·Aᵀ`` (``contrast_anchors``), ``P_i·Pᵀ``
    (``contrast_positives``) and ``A_i·Nᵀ`` (every row's negatives), each divided by ``temperature``,
    its target ``P_i``::

        L = mean_i [ LSE over row i's kept pairs − cos(A_i, P_i)/t ]

    A pair is dropped (a false negative) when its guide similarity exceeds ``θ_i − margin``
    (``margin_strategy="absolute"``) or ``θ_i − |θ_i|·margin`` (``"relative"``), with ``θ_i`` the guide's
    similarity of ``(A_i, P_i)``; the positive never is, and ``A_i·A_i``, ``P_i·P_i`` always are. The
    guide's similarities are formed tile by tile beside the student's: memory O(B·(D + Dg)) beside one
    chunk of each, no B×B matrix. The guide's inputs carry no gradient.

    With ``process_group`` (``gather_across_devices``) each rank's anchors meet every rank's positives
    and negatives (gathered with their gradient, as sentence-transformers does; the anchor-anchor
    block is this rank's), and the loss is the mean over this rank's anchors. ``cache_limit``: bytes of
    first-pass logits kept for the gradient pass (None: the default; 0 for the least memory).
    ``matryoshka_dims`` (d₁ > d₂ > …, within D) and ``matryoshka_weights`` (default all 1): the loss
    is ``Σ_k w_k · L(prefix_{d_k})`` (docs/losses.md §2.7) over the first d_k features of the
    student's embeddings (the guide's stay whole, as sentence-transformers' MatryoshkaLoss shrinks the
    student's only).
    """
    negatives, guide_negatives = _check(anchor, positive, guide_anchor, guide_positive, negatives, guide_negatives,
                                        temperature, margin_strategy, margin, contrast_anchors, contrast_positives)
    chunk_size = check_chunk_size(chunk_size)
    prefixes = None
    if matryoshka_dims is not None:
        dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, anchor.shape[1])
        if one_pass(backend, anchor):
            prefixes = (dims, weights)  # every prefix in one pass over D
    if matryoshka_dims is not None and prefixes is None:  # one engine call per prefix
        kw = dict(guide_negatives=guide_negatives, temperature=temperature, margin_strategy=margin_strategy,
                  margin=margin, contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
                  process_group=process_group, backend=backend, chunk_size=chunk_size, cache_limit=cache_limit)
        return matryoshka_sum(lambda d: gist_loss(anchor[:, :d], positive[:, :d], guide_anchor, guide_positive,
                                                  negatives=prefix(negatives, d, False), **kw), dims, weights)
    if matryoshka_weights is not None and matryoshka_dims is None:
        raise ValueError("matryoshka_weights needs matryoshka_dims")
    group = distributed_setup(process_group, anchor, positive, backend)
    if backend == "reference":
        return reference.gist_loss_reference(
            anchor, positive, guide_anchor, guide_positive, negatives, guide_negatives, temperature=temperature,
            margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives).to(anchor.dtype)
    norm = lambda t: F.normalize(t, p=2, dim=-1)  # noqa: E731
    # the student's prefixes are normalised by scales of their own in the one-pass form
    student = norm if prefixes is None else (lambda t: t)
    a, p = student(anchor), student(positive)
    with torch.no_grad():
        ga, gp = norm(guide_anchor.detach()), norm(guide_positive.detach())
    n = gn = None
    if negatives is not None:
        n = student(negatives).reshape(-1, a.shape[1])
        with torch.no_grad():
            gn = norm(guide_negatives.detach()).reshape(-1, ga.shape[1])
    rank, p_world, gp_world, n_world, gn_world = 0, p, gp, n, gn
    if group is not None:
        from ..distributed import all_gather_no_grad, all_gather_with_grad, group_rank_and_size

        rank = group_rank_and_size(group)[0]
        p_world, gp_world = all_gather_with_grad(p, group), all_gather_no_grad(gp, group)
        if n is not None:
            n_world, gn_world = all_gather_with_grad(n, group), all_gather_no_grad(gn, group)
    rows, cols, target = _gist_target(
        a, p, p_world, n_world, ga, gp, gp_world, gn_world, rank=rank, margin_strategy=margin_strategy,
        margin=float(margin), contrast_anchors=contrast_anchors, contrast_positives=contrast_positives)
    scale = torch.tensor(1.0 / float(temperature), dtype=torch.float64, device=a.device)
    if prefixes is not None:
        return prefix_target_loss(rows, cols, scale, None, target, *prefixes, symmetric=False, backend=backend,
                                  chunk_size=chunk_size)
    return target_engine_loss(rows, cols, scale, None, target, symmetric=False, backend=backend,
                              chunk_size=chunk_size, cache_limit=cache_limit)


def _gist_target(a, p, p_world, n_world, ga, gp, gp_world, gn_world, *, rank, margin_strategy, margin,
                contrast_anchors, contrast_positives):
    """The stacked product of GISTEmbed on the engine: rows ``[A; P]`` (the P rows only with
    ``contrast_positives``) against columns ``[P_world; A; N_world]`` (A only where a block or a P row's
    threshold needs it), and its target: row groups ``{A_i, P_i}`` sharing one softmax, column ranges
    and the self pairs excluded, the positive ``(A_i, P_i)`` by id, and the guided margin with each
    row's pair column (A_i: P_i; P_i: A_i, whose guide similarity is the same θ_i), the guide's rows
    and columns stacked alike. Returns (rows, cols, Target)."""
    dev = a.device
    b, bw = a.shape[0], p_world.shape[0]
    n_neg = 0 if n_world is None else n_world.shape[0]
    with_a = contrast_anchors or contrast_positives
    n_cols = bw + (b if with_a else 0) + n_neg
    local = torch.arange(b, device=dev)
    none = torch.full((b,), -1, dtype=torch.int64, device=dev)
    rows = torch.cat([a, p]) if contrast_positives else a
    cols = torch.cat([p_world] + ([a] if with_a else []) + ([n_world] if n_neg else []))
    guide_rows = torch.cat([ga, gp]) if contrast_positives else ga
    guide_cols = torch.cat([gp_world] + ([ga] if with_a else []) + ([gn_world] if n_neg else []))
    row_ids = local + rank * b
    col_ids = torch.cat([torch.arange(bw, device=dev), torch.full((n_cols - bw,), -1, dtype=torch.int64, device=dev)])
    a_range = torch.tensor([0, n_cols], device=dev).expand(b, 2)
    a_exclude = local + bw if contrast_anchors else none
    a_pair = local + rank * b
    col_keep = None
    if with_a and not contrast_anchors:  # A's columns only for the P rows' thresholds
        col_keep = torch.ones(n_cols, dtype=torch.bool, device=dev)
        col_keep[bw:bw + b] = False
    row_group = None
    if contrast_positives:
        row_ids = torch.cat([row_ids, none])
        col_range = torch.cat([a_range, torch.tensor([0, bw], device=dev).expand(b, 2)])
        exclude_col = torch.cat([a_exclude, local + rank * b])
        pair_col = torch.cat([a_pair, local + bw])
        row_group = local.repeat(2)
    else:
        col_range, exclude_col, pair_col = a_range, a_exclude, a_pair
    guide = Teacher(guide_rows, guide_cols, kind=TEACHER_GUIDE)
    target = Target(row_ids, col_ids, exclude_col=exclude_col if bool((exclude_col >= 0).any()) else None,
                    col_keep=col_keep, margin=margin, row_group=row_group, col_range=col_range.contiguous(),
                    teacher=guide, margin_relative=margin_strategy == "relative", pair_col=pair_col)
    return rows, cols, target
