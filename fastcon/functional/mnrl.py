"""sentence-transformers' MultipleNegativesRankingLoss (docs/losses.md §2.4) on the engine's general
target."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import check_features
from ..targets import Target
from ..ops import prefix_target_loss, target_engine_loss
from ._checks import check_chunk_size, check_debias
from ._matryoshka import check_matryoshka, matryoshka_sum, one_pass


MNRL_DIRECTIONS = reference.MNRL_DIRECTIONS
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def _mnrl_docs(queries, docs):
    """docs as a list [P, N_1, .., N_m] of (B, D) tensors matching ``queries``."""
    if isinstance(docs, torch.Tensor):
        if docs.dim() != 3:
            raise ValueError(f"docs must be (B, 1+m, D) or a list of (B, D) tensors, got shape {tuple(docs.shape)}")
        docs = list(docs.unbind(1))
    else:
        docs = list(docs)
    if not docs:
        raise ValueError("docs must hold at least the positives")
    for k, d in enumerate(docs):
        check_features("queries", queries, f"docs[{k}]", d)
        if d.shape != queries.shape:
            raise ValueError(f"docs[{k}] must have the queries' shape {tuple(queries.shape)}, got {tuple(d.shape)}")
    return docs


def multiple_negatives_ranking_loss(
    queries: torch.Tensor,
    docs,
    *,
    scale: float = 20.0,
    similarity: str = "cos",
    directions=("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: Optional[str] = None,
    hardness_strength: float = 0.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    rank_offset: int = 0,
    world_queries: Optional[torch.Tensor] = None,
    world_docs=None,
    cache_limit: Optional[int] = None,
    debias: float = 0.0,
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> torch.Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss on the engine (docs/losses.md §2.4).

    ``queries`` Q (B, D); ``docs`` D_0 = P (the positives) and hard negatives N_1..N_m, as a (B, 1+m, D)
    tensor or a list of (B, D) tensors; candidates ``C = [P; N_1; ..; N_m]`` (B·(1+m) rows).
    ``similarity`` "cos" (rows normalised) or "dot". Directions (``query_to_doc`` is required):

    * query_to_doc: ``Q_i·C``, the positive is ``P_i``;
    * query_to_query: ``Q_i·Q`` without ``Q_i·Q_i``;
    * doc_to_query: ``P_i·Q``;
    * doc_to_doc: ``P_i·C`` without query i's own documents.

    Logits ``scale·sim``, plus ``hardness_strength·sg(sim)`` on the query_to_doc negatives named by
    ``hardness_mode`` (in-batch: other queries' documents; hard: the query's own negatives; all: every
    negative). ``partition_mode="joint"``: ``L_i = LSE over every block of row i − S_{i,P_i}``;
    ``"per_direction"`` (query_to_doc and doc_to_query only): the mean of the blocks' LSEs instead. The
    loss is the mean over queries. The blocks are rows and column ranges of one stacked product
    ``[Q; P]·[C; Q]ᵀ`` on the engine (a joint softmax is a group of two rows), never materialised: memory
    O(B·(2+m)·D + chunk).

    For a gathered batch (``gather_across_devices``), ``world_queries``/``world_docs`` are every
    rank's rows (this rank's at ``rank_offset``) and ``queries``/``docs`` are this rank's; the loss is
    the mean over this rank's queries. ``cache_limit``: bytes of first-pass logits kept for the
    gradient pass (None: the default; 0 for the least memory). ``debias`` τ⁺ in [0, 1): each row's
    (joint) or each direction's (per_direction) loss is the debiased contrastive loss of
    docs/losses.md §2.5 (``N_g = max((Σ_n e^{S_n} − τ⁺·M·e^{S_p})/(1 − τ⁺), M·e^{−scale})``, M every
    candidate column of the row but its positive); 0 is the plain loss. ``matryoshka_dims`` (d₁ > d₂ > …, within D) and ``matryoshka_weights`` (default all 1): the loss
    is ``Σ_k w_k · L(prefix_{d_k})`` (docs/losses.md §2.7) over the first d_k features of queries
    and documents (normalised for ``"cos"``, raw for ``"dot"``).
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be 'cos' or 'dot', got {similarity!r}")
    directions = tuple(directions)
    if not directions or not set(directions) <= set(MNRL_DIRECTIONS):
        raise ValueError(f"directions must be a non-empty subset of {MNRL_DIRECTIONS}, got {directions}")
    if "query_to_doc" not in directions:
        raise ValueError("directions must include 'query_to_doc' (it holds the positive pair)")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError("partition_mode='per_direction' takes query_to_doc and doc_to_query only (the other "
                         "directions hold no positive); use partition_mode='joint'")
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, (int, float)) \
            or not 0 <= hardness_strength < float("inf"):
        raise ValueError(f"hardness_strength must be a finite number >= 0, got {hardness_strength!r}")
    chunk_size = check_chunk_size(chunk_size)
    tau = check_debias(debias)
    docs = _mnrl_docs(queries, docs)
    prefixes = None
    if matryoshka_dims is not None:
        dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, queries.shape[1])
        if one_pass(backend, queries):
            prefixes = (dims, weights)
    if matryoshka_dims is not None and prefixes is None:  # one engine call per prefix
        world = world_queries is not None

        def at(d):
            return multiple_negatives_ranking_loss(
                queries[:, :d], [x[:, :d] for x in docs], scale=scale, similarity=similarity, directions=directions,
                partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
                backend=backend, chunk_size=chunk_size, rank_offset=rank_offset,
                world_queries=world_queries[:, :d] if world else None,
                world_docs=[x[:, :d] for x in world_docs] if world else None, cache_limit=cache_limit,
                debias=tau)
        return matryoshka_sum(at, dims, weights)
    if matryoshka_weights is not None and matryoshka_dims is None:
        raise ValueError("matryoshka_weights needs matryoshka_dims")
    if world_queries is None:
        world_queries, world_docs, rank_offset = queries, docs, 0
    else:
        world_docs = _mnrl_docs(world_queries, world_docs)
        if len(world_docs) != len(docs):
            raise ValueError(f"world_docs has {len(world_docs)} columns, docs {len(docs)}")
    if backend == "reference":
        if world_queries is not queries:
            raise ValueError("backend='reference' computes the single-process loss only")
        return reference.mnrl_loss_reference(
            queries, docs, scale, similarity=similarity, directions=directions, partition_mode=partition_mode,
            hardness_mode=hardness_mode, hardness_strength=hardness_strength, debias=tau).to(queries.dtype)

    if similarity == "cos" and prefixes is None:  # (prefixes are normalised by scales of their own)
        norm = lambda t: torch.nn.functional.normalize(t, p=2, dim=1)  # noqa: E731
        queries, docs = norm(queries), [norm(d) for d in docs]
        if world_queries is not None:
            world_queries, world_docs = norm(world_queries), [norm(d) for d in world_docs]
    dev = queries.device
    b, bw, n_docs = queries.shape[0], world_queries.shape[0], len(docs)
    q2q, d2q, d2d = ("query_to_query" in directions, "doc_to_query" in directions, "doc_to_doc" in directions)
    joint = partition_mode == "joint"
    n_c = bw * n_docs
    n_cols = n_c + (bw if (q2q or d2q) else 0)
    p_rows = d2q or d2d
    # rows [Q_local; P_local], columns [C_world; Q_world]
    rows = torch.cat([queries, docs[0]]) if p_rows else queries
    cols = torch.cat(list(world_docs) + ([world_queries] if n_cols > n_c else []))
    local = torch.arange(b, device=dev) + rank_offset
    none = torch.full((b,), -1, dtype=torch.int64, device=dev)
    world = torch.arange(bw, device=dev)
    world_none = torch.full((bw,), -1, dtype=torch.int64, device=dev)
    # positives: Q_i ↔ P_i; in per_direction also P_i ↔ Q_i (the doc_to_query block's own CE)
    row_ids = torch.cat([local, none if joint else local]) if p_rows else local
    col_ids = torch.cat([world] + [world_none] * (n_docs - 1)
                        + ([world_none if joint else world] if n_cols > n_c else []))
    q_range = torch.tensor([0, n_c + (bw if q2q else 0)], device=dev)
    p_range = torch.tensor([0 if d2d else n_c, n_c + (bw if d2q else 0)], device=dev)
    col_range = torch.stack([q_range] * b + ([p_range] * b if p_rows else []))
    row_owner = local.repeat(2 if p_rows else 1)
    col_owner = torch.cat([world.repeat(n_docs)] + ([world_none] if n_cols > n_c else []))
    own_rule = None
    if d2d:  # the doc rows drop their query's own documents
        own_rule = torch.cat([torch.zeros(b, dtype=torch.int64, device=dev), torch.ones(b, dtype=torch.int64,
                                                                                        device=dev)])
    penalty, penalty_mode, penalty_cols, penalty_rows = 0.0, 0, None, None
    if hardness_mode is not None and hardness_strength > 0:
        penalty = float(hardness_strength)
        penalty_mode = {"in_batch_negatives": 2, "hard_negatives": 1, "all_negatives": 0}[hardness_mode]
        cidx = torch.arange(n_cols, device=dev)
        penalty_cols = (cidx < n_c) & ((cidx >= bw) if hardness_mode == "hard_negatives" else True)
        if p_rows:
            penalty_rows = torch.arange(2 * b, device=dev) < b
    row_group = torch.arange(b, device=dev).repeat(2) if (p_rows and joint) else None
    exclude_col = None
    if q2q:  # the query rows drop their own query column
        exclude_col = torch.cat([local + n_c] + ([none] if p_rows else []))
    if not p_rows:
        col_range = None  # every query row keeps every column
    if own_rule is None and penalty_mode == 0:
        row_owner = col_owner = None  # nothing reads the owners: the target stays plain where it can
    target = Target(row_ids, col_ids, exclude_col=exclude_col, row_group=row_group,
                    row_owner=row_owner, col_owner=col_owner, own_rule=own_rule, col_range=col_range,
                    penalty=penalty, penalty_cols=penalty_cols, penalty_mode=penalty_mode,
                    penalty_rows=penalty_rows, debias=tau)
    scale_t = torch.tensor(float(scale), dtype=torch.float64, device=dev)
    if prefixes is not None:
        return prefix_target_loss(rows, cols, scale_t, None, target, *prefixes, normalize=similarity == "cos",
                                  symmetric=False, backend=backend, chunk_size=chunk_size)
    return target_engine_loss(rows, cols, scale_t, None, target, symmetric=False, backend=backend,
                              chunk_size=chunk_size, cache_limit=cache_limit)
