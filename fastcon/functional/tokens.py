"""Token- and patch-level losses (docs/losses.md §3): pooled patch-token alignment (CG-VLM), dense patch
InfoNCE (PatchNCE), FILIP's token-wise late interaction and ColBERT's MaxSim."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import check_label_smoothing, check_mask, check_scalar, check_token_features, compiling
from ..targets import Target
from ..ops.engine import BACKENDS as _BACKENDS
from ..ops.engine import loss_dtype as _loss_dtype
from ..ops import target_engine_loss
from ._checks import check_chunk_size
from .global_losses import clip_loss


def pooled_alignment_loss(
    visual_tokens: torch.Tensor,
    word_embeddings: torch.Tensor,
    *,
    word_mask: Optional[torch.Tensor] = None,
    pool_size: Optional[int] = None,
    temperature: float = 0.07,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Pooled patch-token alignment (CG-VLM; docs/losses.md §3.2)::

        v̄_ik = the visual tokens (B, M, D) average-pooled to K = pool_size tokens (adaptive average
               pooling over the token axis, as F.adaptive_avg_pool1d; K = 1 without pool_size)
        S_ij = mean_k masked-mean_l cos(v̄_ik, e_jl)        (words e: (B, L, D), word_mask (B, L))
        L    = ½[CE(S/τ, i) + CE(Sᵀ/τ, i)]

    Cosines of unit rows are dot products, and the means pass through them: ``S_ij = a_i·c_j`` with
    ``a_i = mean_k v̂_ik`` and ``c_j = masked-mean_l ê_jl`` (hats: rows normalised). So the loss is one
    CLIP loss of the engine on the two means, ``clip_loss(a, c, 1/τ)``: no B×K×B×L tensor, and
    memory O(B·(M + L)·D). ``word_mask`` is True for real words; a caption without one is an error.
    Returns a 0-d tensor in the features' dtype (computed in at least fp32)."""
    check_token_features("visual_tokens", visual_tokens)
    check_token_features("word_embeddings", word_embeddings)
    b, m, d = visual_tokens.shape
    if word_embeddings.shape[0] != b or word_embeddings.shape[2] != d:
        raise ValueError(f"word_embeddings must be (B={b}, L, D={d}), got {tuple(word_embeddings.shape)}")
    if pool_size is not None:
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or not 1 <= pool_size <= m:
            raise ValueError(f"pool_size must be an int in [1, {m}] (the number of visual tokens), got {pool_size!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    acc = torch.promote_types(visual_tokens.dtype, torch.float32)
    v, e = visual_tokens.to(acc), word_embeddings.to(acc)
    if word_mask is not None:
        word_mask = check_mask("word_mask", word_mask, tuple(e.shape[:2]), e.device)
        counts = word_mask.sum(1)
        if bool((counts == 0).any()):
            raise ValueError(f"caption {int(torch.nonzero(counts == 0)[0])} has no word (its word_mask is all False)")
    if backend == "reference":
        return reference.pooled_alignment_loss_reference(v, e, word_mask=word_mask, pool_size=pool_size,
                                                         temperature=temperature).to(visual_tokens.dtype)
    k = 1 if pool_size is None else pool_size
    pooled = torch.nn.functional.adaptive_avg_pool1d(v.transpose(1, 2), k).transpose(1, 2)
    a = torch.nn.functional.normalize(pooled, dim=-1).mean(1)
    words = torch.nn.functional.normalize(e, dim=-1)
    if word_mask is None:
        c = words.mean(1)
    else:
        w = word_mask.to(acc)[..., None]
        c = (words * w).sum(1) / w.sum(1)
    loss = clip_loss(a, c, 1.0 / temperature, backend=backend, chunk_size=chunk_size)
    return loss.to(visual_tokens.dtype)


def patch_nce_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    temperature: float = 0.07,
    detach: Optional[str] = "key",
    pos_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Dense patch InfoNCE (PatchNCE of CUT, contrastive denoising score, PixContrast; docs/losses.md
    §3.3), batched per image: ``q``, ``k`` (B, P, D) sampled at the same P positions of each image,
    ``S_b = q_b·k_bᵀ/τ`` (P×P per image), the other patches of the same image the negatives::

        L = mean_{b,i} CE(S_b[i], i)                                      (pos_mask None)
        L = mean_{b,i with a positive} −log(Σ_{j∈pos} e^{S_b,ij} / Σ_j e^{S_b,ij})   (pos_mask (B, P, P))

    ``detach``: "key" (CUT: the key side gets no gradient), "query" (the anchor, as contrastive
    denoising score) or None. On the engine: the images' patches stacked as rows against their
    stacked keys, each row keeping only its own image's block of columns (the target's column ranges:
    the GEMMs skip the other images' blocks), the diagonal the positive; with ``pos_mask`` the
    denominator is the engine's row LSE over the block, the numerator an LSE over the positive pairs
    alone (their dot products gathered: O(#positives·D)). No B·P × B·P matrix. Returns a 0-d tensor
    in q's dtype. A ``pos_mask`` without any positive is an error."""
    from ..ops import target_row_lse

    check_token_features("q", q)
    check_token_features("k", k)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape (B, P, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if detach not in ("key", "query", None):
        raise ValueError(f"detach must be 'key', 'query' or None, got {detach!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    b, p, d = q.shape
    if pos_mask is not None:
        pos_mask = check_mask("pos_mask", pos_mask, (b, p, p), q.device)
        if not bool(pos_mask.any()):
            raise ValueError("pos_mask has no positive pair")
    chunk_size = check_chunk_size(chunk_size)
    if backend == "reference":
        return reference.patch_nce_loss_reference(q, k, temperature=temperature, detach=detach,
                                                  pos_mask=pos_mask).to(q.dtype)
    if detach == "key":
        k = k.detach()
    elif detach == "query":
        q = q.detach()
    rows, cols = q.reshape(b * p, d), k.reshape(b * p, d)
    dev = q.device
    ids = torch.arange(b * p, device=dev)
    lo = (ids // p) * p
    block = torch.stack([lo, lo + p], dim=1)  # each row's image: its block of columns
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = torch.tensor(1.0 / temperature, dtype=acc, device=dev)
    if pos_mask is None:
        target = Target(ids, ids, col_range=block)
        return target_engine_loss(rows, cols, scale, None, target, symmetric=False, backend=backend,
                                  chunk_size=chunk_size)
    none = torch.full((b * p,), -1, dtype=torch.int64, device=dev)
    lse_all = target_row_lse(rows, cols, scale, None, Target(none, none, col_range=block), backend=backend,
                             chunk_size=chunk_size)
    img, i, j = torch.nonzero(pos_mask, as_tuple=True)
    r, c = img * p + i, img * p + j
    s_pos = (rows[r].double() * cols[c].double()).sum(1) / temperature  # float64 beside the float64 LSE
    peak = torch.full((b * p,), float("-inf"), dtype=torch.float64, device=dev)
    peak = peak.scatter_reduce(0, r, s_pos.detach(), "amax")
    sums = torch.zeros(b * p, dtype=torch.float64, device=dev).index_add(0, r, torch.exp(s_pos - peak[r]))
    has = pos_mask.reshape(b * p, p).any(1)
    lse_pos = torch.log(sums[has]) + peak[has]
    return (lse_all[has] - lse_pos).mean().to(q.dtype)


def _token_sets(pairs, backend: str):
    """Checks (name, features) pairs of (B, n, D) token sets and (name, mask, features) masks; returns
    the masks (all True where None), each item with at least one real token."""
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    masks = []
    first = None
    for name, t, mask_name, mask in pairs:
        check_token_features(name, t)
        if first is None:
            first = (name, t)
        elif t.dtype != first[1].dtype or t.device != first[1].device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must have the dtype and device of {first[0]} "
                            f"({first[1].dtype}, {first[1].device})")
        shape = tuple(t.shape[:2])
        if mask is None:
            mask = torch.ones(shape, dtype=torch.bool, device=t.device)
        else:
            mask = check_mask(mask_name, mask, shape, t.device)
        if not compiling():  # a data-dependent check: eager only (as check_scalar's finiteness check)
            empty = torch.nonzero(~mask.any(1))
            if empty.numel():
                raise ValueError(f"{mask_name}: item {int(empty[0])} has no real token (its max or mean is "
                                 "undefined)")
        masks.append(mask.to(t.device))
    return masks


def filip_similarities(patches, tokens, *, token_mask=None, patch_mask=None, backend: str = "auto",
                       chunk_size: Optional[int] = None):
    """FILIP's token-wise similarity matrices (docs/losses.md §3.1) without the B×B×n₁×n₂ tensor:
    ``sI[i, j] = mean_{k real} max_{r real} p_ik·t_jr`` (image → text, (B, B)) and
    ``sT[j, i] = mean_{r real} max_{k real} p_ik·t_jr`` (text → image, (B, B); not the transpose of sI).

    Both come from one pass of the token-level engine (``fastcon.ops.late``): on the C++ backend blocks
    of ``chunk_size`` images form one GEMM tile against every caption (default: a
    ``fastcon.backend_info()["chunk_bytes"]`` tile), on the Triton backends each pair's tile stays on
    chip; the backward forms the tiles again and sends the gradient of each max to its first maximal
    index (the lowest), deterministically. Padding is −inf before every max (never zero), the means
    run over real tokens and patches; an item without any is a ValueError. Returns fp32 matrices for
    half inputs."""
    from fastcon.ops.late import late_interaction

    pm, tm = _token_sets((("patches", patches, "patch_mask", patch_mask),
                          ("tokens", tokens, "token_mask", token_mask)), backend)
    b, _, d = patches.shape
    if tokens.shape[0] != b or tokens.shape[2] != d:
        raise ValueError(f"tokens must be (B={b}, n2, D={d}), got {tuple(tokens.shape)}")
    if backend == "reference":
        return reference.filip_similarities_reference(patches, tokens, token_mask=tm, patch_mask=pm)
    chunk_size = check_chunk_size(chunk_size)
    sx, sy = late_interaction(patches, tokens, pm, tm, backend=backend, chunk_size=chunk_size)
    return sx / pm.sum(1, keepdim=True).to(sx.dtype), (sy / tm.sum(1)[None, :].to(sy.dtype)).T


def maxsim_scores(queries, docs, *, query_mask=None, doc_mask=None, backend: str = "auto",
                  chunk_size: Optional[int] = None):
    """ColBERT/ColPali MaxSim scores (docs/losses.md §3.4), (B_q, B_d)::

        score[q, d] = Σ_{r real in q} max_{k real in d} q_r·d_k

    queries (B_q, n_q, D), docs (B_d, n_d, D), masks True for real tokens (an item without one is a
    ValueError). The token-level engine's x → y statistic (``fastcon.ops.late``): no
    B_q×B_d×n_q×n_d tensor; the backward sends each query token's gradient to its argmax document
    token (ties: the lowest index). ``chunk_size``: queries per block. fp32 for half inputs."""
    from fastcon.ops.late import late_interaction

    qm, dm = _token_sets((("queries", queries, "query_mask", query_mask),
                          ("docs", docs, "doc_mask", doc_mask)), backend)
    if docs.shape[2] != queries.shape[2]:
        raise ValueError(f"queries and docs must have the same feature dimension, got {tuple(queries.shape)} "
                         f"and {tuple(docs.shape)}")
    if backend == "reference":
        return reference.maxsim_scores_reference(queries, docs, query_mask=qm, doc_mask=dm)
    chunk_size = check_chunk_size(chunk_size)
    sx, _ = late_interaction(queries, docs, qm, dm, want_y=False, backend=backend, chunk_size=chunk_size)
    return sx


def maxsim_loss(queries, docs, *, query_mask=None, doc_mask=None, scale=1.0, negatives=None, negatives_mask=None,
                backend: str = "auto", chunk_size: Optional[int] = None):
    """The in-batch contrastive MaxSim loss of PyLate and colpali (docs/losses.md §3.4)::

        L = CE(scale·score(Q, [D; N]), i)

    query i's positive is document i (B_q == B_d); ``negatives`` (M, n_d', D) are extra documents
    appended to the columns (with their own ``negatives_mask``; n_d' may differ from n_d: the shorter
    set is padded to the longer). ``scale`` is a float or 0-d tensor (PyLate's 1/temperature). Returns a 0-d tensor
    in the queries' dtype (fp32 under autocast)."""
    check_token_features("queries", queries)
    check_token_features("docs", docs)
    if docs.shape[0] != queries.shape[0]:
        raise ValueError(f"query i's positive is document i: B_q and B_d must be equal, got {queries.shape[0]} "
                         f"and {docs.shape[0]}")
    s = check_scalar("scale", scale, queries.device)
    if negatives is not None:
        (dm, nm) = _token_sets((("docs", docs, "doc_mask", doc_mask),
                                ("negatives", negatives, "negatives_mask", negatives_mask)), backend)
        if negatives.shape[2] != docs.shape[2]:
            raise ValueError(f"negatives must be (M, n, D={docs.shape[2]}), got {tuple(negatives.shape)}")
        n = max(docs.shape[1], negatives.shape[1])

        def pad(t, m):
            extra = n - t.shape[1]
            if extra == 0:
                return t, m
            return (torch.nn.functional.pad(t, (0, 0, 0, extra)),
                    torch.nn.functional.pad(m, (0, extra), value=False))

        (docs, dm), (negatives, nm) = pad(docs, dm), pad(negatives, nm)
        docs, doc_mask = torch.cat([docs, negatives]), torch.cat([dm, nm])
    elif negatives_mask is not None:
        raise ValueError("negatives_mask is given without negatives")
    scores = maxsim_scores(queries, docs, query_mask=query_mask, doc_mask=doc_mask, backend=backend,
                           chunk_size=chunk_size)
    labels = torch.arange(queries.shape[0], device=scores.device)
    out = torch.nn.functional.cross_entropy(s.to(scores.dtype) * scores, labels)
    return out.to(_loss_dtype(queries))


def filip_loss(patches, tokens, logit_scale, *, token_mask=None, patch_mask=None, label_smoothing: float = 0.0,
               backend: str = "auto", chunk_size: Optional[int] = None):
    """FILIP's token-wise late-interaction loss (docs/losses.md §3.1)::

        L = ½[CE(s·sI, i) + CE(s·sT, i)]

    with ``sI``, ``sT`` from ``filip_similarities`` (patches (B, n₁, D), tokens (B, n₂, D), used as given:
    FILIP normalises them before; masks True for real tokens and patches; padding never wins a max).
    ``logit_scale`` s is the exponentiated scale. Returns a 0-d tensor in the features' dtype (fp32
    under autocast)."""
    scale = check_scalar("logit_scale", logit_scale, patches.device if isinstance(patches, torch.Tensor) else None)
    eps = check_label_smoothing(label_smoothing)
    s_i, s_t = filip_similarities(patches, tokens, token_mask=token_mask, patch_mask=patch_mask, backend=backend,
                                  chunk_size=chunk_size)
    labels = torch.arange(s_i.shape[0], device=s_i.device)
    ce = torch.nn.functional.cross_entropy
    return ((ce(scale * s_i, labels, label_smoothing=eps) + ce(scale * s_t, labels, label_smoothing=eps)) / 2).to(
        _loss_dtype(patches))
