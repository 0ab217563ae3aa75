"""The global contrastive losses (docs/losses.md §1.1, §1.2, §1.4, §2.1): CLIP's InfoNCE (also over class
ids and with a pair mask), SigLIP's sigmoid loss, CLIP with K extra text negatives per image, and
NT-Xent, with their distributed forms."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import (check_features, check_label_smoothing, check_labels, check_mask, check_pos_offset,
                           check_temperature)
from ..targets import Target
from ..ops import clip_engine_loss, siglip_engine_loss
from ..ops.engine import BACKENDS as _BACKENDS
from ..ops import prefix_scales, prefix_target_loss, siglip_prefix_engine_loss, target_engine_loss
from ._checks import check_chunk_size, check_common, check_debias, check_modes, distributed_setup
from ._matryoshka import check_matryoshka, matryoshka_sum, one_pass, prefix


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    label_smoothing: float = 0.0,
    pos_offset: Optional[int] = None,
    labels: Optional[torch.Tensor] = None,
    pair_mask: Optional[torch.Tensor] = None,
    debias: float = 0.0,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    matryoshka_dims=None,
    matryoshka_weights=None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE without the N×N logits matrix.

    ``S = s·X·Yᵀ + b`` with X = ``image_features`` (Na, D), Y = ``text_features`` (Nb, D),
    s = ``logit_scale`` (already exponentiated, as open_clip passes it), b = ``logit_bias``::

        L = ½·[ (1/Na)·Σ_i CE(S_i·, pos_offset + i) + (1/Na)·Σ_i CE(S_·(pos_offset+i), i) ]

    The column term runs over the Na columns that own a positive; with ``Na == Nb`` and
    ``pos_offset`` None (0) this is open_clip's ``ClipLoss``. ``Na < Nb`` needs an explicit
    ``pos_offset`` (a ValueError without one). ``label_smoothing`` ε uses the targets
    ``(1−ε)·onehot + ε/n_classes`` of ``F.cross_entropy``. ``labels`` (N integer class ids, paired
    batches): pairs that share an id are positives of one another in both directions, and each row's
    loss is the mean of −log p over its positives (SupCon's outside form, docs/losses.md §2.1; the
    smoothing ε then spreads over the row's columns). ``pair_mask`` (N, N) bool, paired batches: False
    drops the pair (i, j) from both directions, as if its logit were −∞ (known duplicates, a mask of
    one's own); the one O(N²) input, for users who have one. ``debias`` τ⁺ in [0, 1): each direction's
    CE is the debiased contrastive loss (docs/losses.md §2.5), ``ℓ = log(e^{S_p} + N_g) − S_p`` with
    ``N_g = max((Σ_n e^{S_n} − τ⁺·M·e^{S_p})/(1 − τ⁺), M·e^{−s})`` over a row's M negatives (0: the plain
    loss; not with ``logit_bias``, ``labels`` or ``label_smoothing``). ``matryoshka_dims`` (d₁ > d₂ > …, within D) and ``matryoshka_weights`` (default all 1): the loss
    is ``Σ_k w_k · L(prefix_{d_k})`` (docs/losses.md §2.7) over the first d_k features, each
    prefix L2-normalised (the full D too), all prefixes in one pass over D (across ranks the global
    loss over prefixes gathers the text features instead of passing them around the ring). Returns
    a 0-d tensor in the features' dtype (computed in fp32); gradients reach both feature tensors,
    ``logit_scale`` and ``logit_bias``.
    Memory: O((Na + Nb)·D + chunk·Nb).

    With ``process_group`` (W ranks, each passing its local n pairs; ``pos_offset`` must be 0) this
    is open_clip's distributed ``ClipLoss`` on each rank: ``local_loss=False`` returns the global loss
    over the N = W·n pairs, computed from this rank's n rows of the N×N matrix with the text shards
    travelling around a ring; ``local_loss=True`` returns ½[CE(s·X_r·Y_allᵀ) + CE(s·Y_r·X_allᵀ)] with
    labels offset by rank·n. ``gather_with_grad`` gives the gathered features a gradient, exactly as
    open_clip's all_gather with autograd does (in the global mode that multiplies the feature gradients
    by the sum of the ranks' upstream gradients, W for ``loss.backward()`` everywhere).
    """
    scale, bias = check_common(image_features, text_features, logit_scale, logit_bias)
    prefixes = None
    if matryoshka_dims is not None:
        dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, image_features.shape[1])
        # every prefix in one pass over D on the general target (in the distributed global loss, the
        # rows against the gathered columns in place of the ring)
        if one_pass(backend, image_features):
            prefixes = (dims, weights)
        else:
            kw = dict(label_smoothing=label_smoothing, pos_offset=pos_offset, labels=labels, pair_mask=pair_mask,
                      debias=debias, local_loss=local_loss, gather_with_grad=gather_with_grad,
                      process_group=process_group, backend=backend, chunk_size=chunk_size)
            return matryoshka_sum(lambda d: clip_loss(prefix(image_features, d, True), prefix(text_features, d, True),
                                                      logit_scale, logit_bias, **kw), dims, weights)
    elif matryoshka_weights is not None:
        raise ValueError("matryoshka_weights needs matryoshka_dims")
    eps = check_label_smoothing(label_smoothing)
    tau = check_debias(debias)
    if tau and (bias is not None or labels is not None or eps):
        raise ValueError("debias does not combine with logit_bias, labels or label_smoothing (docs/losses.md §2.5 "
                         "defines it for one positive per row, without a bias)")
    paired_only = labels is not None or pair_mask is not None  # (their own error for a rectangular batch)
    if not (paired_only and pos_offset is None):
        pos_offset = check_pos_offset(pos_offset, image_features.shape[0], text_features.shape[0])
    chunk_size = check_chunk_size(chunk_size)
    check_modes(local_loss, gather_with_grad)
    if paired_only:
        n = image_features.shape[0]
        if text_features.shape[0] != n or pos_offset not in (None, 0):
            raise ValueError(f"labels and pair_mask need paired batches with pos_offset=0: image_features has {n} "
                             f"rows, text_features {text_features.shape[0]}, pos_offset={pos_offset}")
        distinct = labels is None  # every pair its own id, across ranks too
        if distinct:
            labels = torch.arange(n, device=image_features.device)
        labels = check_labels("labels", labels, n, image_features.device)
        group = distributed_setup(process_group, image_features, text_features, backend)
        if pair_mask is not None:
            # (N, N) here; in the distributed loss the rows of this rank against every rank's columns
            shape = (n, n) if group is None or not isinstance(pair_mask, torch.Tensor) else tuple(pair_mask.shape)
            pair_mask = check_mask("pair_mask", pair_mask, shape, image_features.device)  # False drops a pair
        if group is not None:
            if distinct:
                labels = _rank_ids(n, group, image_features.device)
            return _multi_positive_distributed(image_features, text_features, scale, bias, labels, pair_mask, eps,
                                               group=group, local_loss=local_loss,
                                               gather_with_grad=gather_with_grad, backend=backend,
                                               chunk_size=chunk_size, debias=tau, prefixes=prefixes)
        if backend == "reference":
            if tau:
                return reference.debiased_clip_loss_reference(image_features, text_features, scale, tau,
                                                              pair_mask=pair_mask).to(image_features.dtype)
            return reference.multi_positive_clip_loss_reference(
                image_features, text_features, scale, bias, labels=labels, label_smoothing=eps,
                pair_mask=pair_mask).to(image_features.dtype)
        target = Target(labels, labels, mask=pair_mask, debias=tau)
        if prefixes is not None:
            return prefix_target_loss(image_features, text_features, scale, bias, target, *prefixes,
                                      label_smoothing=eps, backend=backend, chunk_size=chunk_size)
        return target_engine_loss(image_features, text_features, scale, bias, target,
                                  label_smoothing=eps, backend=backend, chunk_size=chunk_size)
    group = distributed_setup(process_group, image_features, text_features, backend)
    if group is not None:
        from .. import distributed

        if pos_offset != 0:
            raise ValueError("pos_offset must be 0 in the distributed loss (the positives are the paired rows)")
        if tau or prefixes is not None:  # one positive per row (each rank's pairs its ids), on the general target
            n = image_features.shape[0]
            return _multi_positive_distributed(image_features, text_features, scale, bias,
                                               _rank_ids(n, group, image_features.device), None, eps, group=group,
                                               local_loss=local_loss, gather_with_grad=gather_with_grad,
                                               backend=backend, chunk_size=chunk_size, debias=tau, prefixes=prefixes)
        impl = distributed.clip_loss_local if local_loss else distributed.clip_loss_ring
        return impl(image_features, text_features, scale, bias, group=group, gather_with_grad=gather_with_grad,
                    label_smoothing=eps, backend=backend, chunk_size=chunk_size)
    if backend == "reference":
        return reference.clip_loss_reference(image_features, text_features, scale, bias, label_smoothing=eps,
                                             pos_offset=pos_offset, debias=tau).to(image_features.dtype)
    if tau or prefixes is not None:  # one positive per row (row i's at column pos_offset + i), on the general target
        dev = image_features.device
        target = Target(torch.arange(image_features.shape[0], device=dev) + pos_offset,
                        torch.arange(text_features.shape[0], device=dev), debias=tau)
        if prefixes is not None:
            return prefix_target_loss(image_features, text_features, scale, bias, target, *prefixes,
                                      label_smoothing=eps, backend=backend, chunk_size=chunk_size)
        return target_engine_loss(image_features, text_features, scale, None, target, backend=backend,
                                  chunk_size=chunk_size)
    return clip_engine_loss(image_features, text_features, scale, bias, label_smoothing=eps,
                            pos_offset=pos_offset, backend=backend, chunk_size=chunk_size)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
                pos_offset: Optional[int] = None, negative_only: bool = False, process_group=None,
                backend: str = "auto", chunk_size: Optional[int] = None, matryoshka_dims=None,
                matryoshka_weights=None) -> torch.Tensor:
    """SigLIP's sigmoid loss without the N×N logits matrix.

    ``l_ij = s·x_i·y_j + b``, ``z_ij = +1`` where ``j == pos_offset + i`` else ``−1`` (all ``−1`` with
    ``negative_only``, the form of text shards from other ranks; ``Na < Nb`` needs an explicit
    ``pos_offset``)::

        L = −(1/Na)·Σ_ij log σ(z_ij·l_ij) = (1/Na)·Σ_ij softplus(−z_ij·l_ij)

    Divided by the number of rows Na (open_clip, big_vision), not Na·Nb. open_clip initialises
    ``s = 10`` and ``b = −10``. ``matryoshka_dims`` (d₁ > d₂ > …, within D) and ``matryoshka_weights`` (default all 1): the loss
    is ``Σ_k w_k · L(prefix_{d_k})`` (docs/losses.md §2.7) over the first d_k features, each prefix
    L2-normalised (the full D too). Returns a 0-d tensor in the features' dtype (computed in fp32).

    With ``process_group`` (W ranks, n local pairs each) this is open_clip's distributed
    ``SigLipLoss`` on each rank: the own shard with its positives plus every other rank's text shard as
    negatives, divided by n; the shards travel around a ring, so memory per rank does not grow with W,
    and each text shard's gradient is the sum of every rank's contribution.
    """
    scale, bias = check_common(image_features, text_features, logit_scale, logit_bias)
    prefixes = None
    if matryoshka_dims is not None:
        dims, weights = check_matryoshka(matryoshka_dims, matryoshka_weights, image_features.shape[1])
        if one_pass(backend, image_features, "sigmoid_prefix_fused"):
            prefixes = (dims, weights)  # every prefix in one pass over D (at each step of the ring too)
        else:
            kw = dict(pos_offset=pos_offset, negative_only=negative_only, process_group=process_group,
                      backend=backend, chunk_size=chunk_size)
            return matryoshka_sum(lambda d: siglip_loss(prefix(image_features, d, True),
                                                        prefix(text_features, d, True), logit_scale, logit_bias,
                                                        **kw), dims, weights)
    elif matryoshka_weights is not None:
        raise ValueError("matryoshka_weights needs matryoshka_dims")
    if not isinstance(negative_only, bool):
        raise TypeError(f"negative_only must be a bool, got {type(negative_only).__name__}")
    if not negative_only:
        pos_offset = check_pos_offset(pos_offset, image_features.shape[0], text_features.shape[0])
    chunk_size = check_chunk_size(chunk_size)
    group = distributed_setup(process_group, image_features, text_features, backend)
    if group is not None:
        from ..distributed import siglip_loss_ring

        if negative_only or pos_offset != 0:
            raise ValueError("negative_only and pos_offset are not used by the distributed loss: "
                             "the other ranks' shards are the negatives")
        return siglip_loss_ring(image_features, text_features, scale, bias, group=group, backend=backend,
                                chunk_size=chunk_size, prefixes=prefixes)
    if backend == "reference":
        return reference.siglip_loss_reference(image_features, text_features, scale, bias, pos_offset=pos_offset,
                                               negative_only=negative_only).to(image_features.dtype)
    if prefixes is not None:
        dims, weights = prefixes
        return siglip_prefix_engine_loss(image_features, text_features, scale, bias,
                                         prefix_scales(image_features, dims, True),
                                         prefix_scales(text_features, dims, True), dims, weights,
                                         pos_offset=None if negative_only else pos_offset, backend=backend,
                                         chunk_size=chunk_size)
    return siglip_engine_loss(image_features, text_features, scale, bias,
                              pos_offset=None if negative_only else pos_offset,
                              backend=backend, chunk_size=chunk_size)


def negatives_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    negatives: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    form: str = "global",
    negative_mask: Optional[torch.Tensor] = None,
    false_negative_margin: Optional[float] = None,
    labels: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
) -> torch.Tensor:
    """CLIP with K extra text negatives per image (NegCLIP, DeGLA, HQ-CLIP; docs/losses.md §2.1).

    ``image_features`` X (B, D), ``text_features`` Y (B, D), ``negatives`` N (B, K, D) owner-major
    (``negatives[i]`` are image i's), ``S = s·X·Cᵀ + b``:

    * ``form="global"``: the columns are ``C = [Y; N_flat]`` (B + B·K). Image→text: row i's
      positive is column i (with ``labels``, every text column whose pair shares its id); text→image
      over the B text columns; ``L = ½(L_i2t + L_t2i)``. The engine never forms B×B(1+K).
    * ``form="own"``: row i against ``[y_i, n_i1..n_iK]`` only, target 0 (a B×(1+K) matrix).

    ``negative_mask`` (B, K) bool: False drops that negative slot (padding). ``false_negative_margin``
    m: a negative column j of row i is dropped when ``x_i·c_j > x_i·y_i − m`` (GISTEmbed's rule, in
    similarity units before the scale; in both directions; never a positive). A row whose negatives are
    all dropped keeps its positive (loss 0 for it, never NaN). ``label_smoothing`` spreads ε over each
    row's kept columns. Returns a 0-d tensor in the features' dtype (fp32 under autocast).
    """
    scale, bias = check_common(image_features, text_features, logit_scale, logit_bias)
    eps = check_label_smoothing(label_smoothing)
    chunk_size = check_chunk_size(chunk_size)
    b, d = image_features.shape
    if text_features.shape[0] != b:
        raise ValueError(f"negatives_clip_loss needs paired batches: image_features has {b} rows, "
                         f"text_features {text_features.shape[0]}")
    if not isinstance(negatives, torch.Tensor):
        raise TypeError(f"negatives must be a (B, K, D) tensor, got {type(negatives).__name__}")
    if negatives.dim() != 3 or negatives.shape[0] != b or negatives.shape[2] != d:
        raise ValueError(f"negatives must be (B={b}, K, D={d}), owner-major, got shape {tuple(negatives.shape)}")
    if negatives.dtype != image_features.dtype or negatives.device != image_features.device:
        raise TypeError(f"negatives ({negatives.dtype}, {negatives.device}) must match image_features "
                        f"({image_features.dtype}, {image_features.device})")
    k = negatives.shape[1]
    if form not in ("global", "own"):
        raise ValueError(f"form must be 'global' or 'own', got {form!r}")
    if form == "own" and k == 0:
        raise ValueError("form='own' needs at least one negative per image (negatives has K=0)")
    if negative_mask is not None:
        negative_mask = check_mask("negative_mask", negative_mask, (b, k), image_features.device)  # False: drop
    if false_negative_margin is not None:
        if isinstance(false_negative_margin, bool) or not isinstance(false_negative_margin, (int, float)):
            raise TypeError(f"false_negative_margin must be a float, got {type(false_negative_margin).__name__}")
        if not 0 <= false_negative_margin < float("inf"):
            raise ValueError(f"false_negative_margin must be finite and >= 0, got {false_negative_margin}")
    if labels is not None:
        if form == "own":
            raise ValueError("labels make in-batch texts positives: they apply to form='global' only")
        labels = check_labels("labels", labels, b, image_features.device)
    group = distributed_setup(process_group, image_features, text_features, backend)
    if group is not None:
        return _negatives_distributed(image_features, text_features, negatives, scale, bias, form, negative_mask,
                                      false_negative_margin, labels, eps, group=group, backend=backend,
                                      chunk_size=chunk_size)
    if backend == "reference":
        return reference.negatives_clip_loss_reference(
            image_features, text_features, negatives, scale, bias, form=form, negative_mask=negative_mask,
            false_negative_margin=false_negative_margin, labels=labels,
            label_smoothing=eps).to(image_features.dtype)
    if form == "own":
        if not isinstance(backend, str) or backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        return _own_negatives_loss(image_features, text_features, negatives, scale, bias, negative_mask,
                                   false_negative_margin, eps)
    dev = image_features.device
    ids = torch.arange(b, device=dev) if labels is None else labels
    columns = torch.cat([text_features, negatives.reshape(b * k, d)])
    target = _negatives_target(ids, b, k, negative_mask, false_negative_margin, dev)
    return target_engine_loss(image_features, columns, scale, bias, target, label_smoothing=eps,
                              backend=backend, chunk_size=chunk_size)


def _global_ids(local_ids, group):
    from ..distributed import all_gather_no_grad

    return all_gather_no_grad(local_ids, group)


def _negatives_target(ids, b, k, negative_mask, margin, device):
    """The global form's target: columns [Y; N_flat], row i's positives the texts sharing its id."""
    col_ids = torch.cat([ids, torch.full((b * k,), -1, dtype=torch.int64, device=device)])
    col_keep = None
    if negative_mask is not None:
        col_keep = torch.cat([torch.ones(b, dtype=torch.bool, device=device), negative_mask.reshape(b * k)])
    return Target(ids, col_ids, col_keep=col_keep, pair_offset=0, margin=margin)


def _negatives_distributed(x, y, negatives, scale, bias, form, negative_mask, margin, labels, eps, *, group,
                           backend, chunk_size):
    """negatives_clip_loss of the W ranks' batches as one batch (every rank returns it; each rank's
    inputs receive their slice of its gradient): the global form from this rank's rows against the
    gathered texts and negatives (each rank's negatives travel with its texts); the own form, whose
    rows are independent, as the mean of the ranks' own losses."""
    from ..distributed import (all_gather_no_grad, group_rank_and_size, mean_over_ranks, shared_parameter,
                              target_loss_global)

    b, d = x.shape
    k = negatives.shape[1]
    if form == "own":
        if not isinstance(backend, str) or backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        scale, bias = shared_parameter(scale, group), shared_parameter(bias, group)
        return mean_over_ranks(_own_negatives_loss(x, y, negatives, scale, bias, negative_mask, margin, eps), group)
    rank, world = group_rank_and_size(group)
    dev = x.device
    local_ids = labels if labels is not None else torch.arange(b, device=dev) + rank * b
    ids = _global_ids(local_ids, group)
    mask = None if negative_mask is None else all_gather_no_grad(negative_mask.to(torch.uint8), group).bool()
    target = _negatives_target(ids, world * b, k, mask, margin, dev)
    return target_loss_global(x, [y, negatives.reshape(b * k, d)], scale, bias, target, group=group,
                              label_smoothing=eps, symmetric=True, backend=backend, chunk_size=chunk_size)


def _rank_ids(n, group, device):
    """Ids of this rank's n pairs, distinct across the ranks of ``group`` (rank·n + i)."""
    from ..distributed import group_rank_and_size

    return torch.arange(n, device=device) + group_rank_and_size(group)[0] * n


def _multi_positive_distributed(x, y, scale, bias, labels, pair_mask, eps, *, group, local_loss, gather_with_grad,
                                backend, chunk_size, debias=0.0, prefixes=None):
    """clip_loss(labels=...) on W ranks, in open_clip's modes: ``local_loss=False``, the loss of all
    ranks' pairs on every rank (from this rank's rows, the column statistics merged across ranks);
    ``local_loss=True``, ½[TCE(s·X_r·Y_allᵀ) + TCE(s·Y_r·X_allᵀ)] over this rank's rows. ``labels``
    are this rank's; ``pair_mask`` is the global (N, N) mask, the same on every rank. ``prefixes``
    (Matryoshka's dims and weights): the loss summed over them in one pass over D."""
    from ..distributed import (all_gather_no_grad, all_gather_with_grad, group_rank_and_size,
                              target_loss_global)

    rank, world = group_rank_and_size(group)
    n = x.shape[0]
    ids = _global_ids(labels, group)
    if pair_mask is not None and tuple(pair_mask.shape) != (world * n, world * n):
        raise ValueError(f"with a process_group pair_mask is the global (N={world * n}, N={world * n}) mask, "
                         f"got {tuple(pair_mask.shape)}")
    if not local_loss:
        return target_loss_global(x, [y], scale, bias, Target(ids, ids, mask=pair_mask, debias=debias), group=group,
                                  label_smoothing=eps, symmetric=True, backend=backend, chunk_size=chunk_size,
                                  gather_with_grad=gather_with_grad, prefixes=prefixes)
    from ..targets import rows_of

    gather = all_gather_with_grad if gather_with_grad else all_gather_no_grad
    all_x, all_y = gather(x, group), gather(y, group)
    rows = slice(rank * n, (rank + 1) * n)
    i2t = rows_of(Target(ids, ids, mask=pair_mask, debias=debias), rows.start, rows.stop)
    t2i = rows_of(Target(ids, ids, mask=None if pair_mask is None else pair_mask.T.contiguous(), debias=debias),
                  rows.start, rows.stop)
    kw = dict(label_smoothing=eps, symmetric=False, backend=backend, chunk_size=chunk_size)
    if prefixes is not None:
        return (prefix_target_loss(x, all_y, scale, bias, i2t, *prefixes, **kw)
                + prefix_target_loss(y, all_x, scale, bias, t2i, *prefixes, **kw)) / 2
    return (target_engine_loss(x, all_y, scale, bias, i2t, **kw) + target_engine_loss(y, all_x, scale, bias, t2i, **kw)) / 2


def _own_negatives_loss(x, y, negatives, scale, bias, negative_mask, margin, eps):
    """The own form: a B×(1+K) logits matrix (nothing quadratic to avoid), CE with target 0 over each
    row's kept entries."""
    from ..ops.engine import autocast_off, loss_dtype

    out_dtype = loss_dtype(x)
    acc = torch.promote_types(x.dtype, torch.float32)
    with autocast_off(x.device.type):
        # one product for the positive and the negatives, so that the margin compares like with like
        sim = torch.einsum("bd,bkd->bk", x.to(acc), torch.cat([y[:, None, :], negatives], dim=1).to(acc))
        keep = torch.ones_like(sim, dtype=torch.bool)
        if negative_mask is not None:
            keep[:, 1:] = negative_mask
        if margin is not None:
            keep[:, 1:] &= sim[:, 1:].detach() <= sim[:, :1].detach() - margin
        logits = scale.to(acc) * sim + (0.0 if bias is None else bias.to(acc))
        log_p = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), dim=1)
        row = -(1.0 - eps) * log_p[:, 0]
        if eps:
            row = row - eps * torch.where(keep, log_p, 0.0).sum(dim=1) / keep.sum(dim=1)
        return row.mean().to(out_dtype)


def ntxent_loss(
    out0: torch.Tensor,
    out1: torch.Tensor,
    *,
    temperature: float = 0.5,
    negatives: Optional[torch.Tensor] = None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
    process_group=None,
) -> torch.Tensor:
    """NT-Xent (SimCLR, SimCSE; lightly's ``NTXentLoss``; docs/losses.md §1.4).

    Without ``negatives``: ``Z = normalize([out0; out1])`` (2N, D), ``S = Z·Zᵀ/τ`` with the diagonal
    excluded, the positive of row i is row ``(i + N) mod 2N``; the cross-entropy averaged over the 2N
    rows. With ``process_group`` (W ranks, N rows each) the columns are every rank's 2·N·W rows,
    gathered with gradients (each rank receives the sum of every rank's gradient of its rows, lightly's
    ``gather_distributed``), and the loss is the mean over this rank's 2N rows.

    With ``negatives`` (K, D), a memory bank's vectors (used as given, without gradient): row i of
    ``normalize(out0)`` against its positive ``normalize(out1)_i`` and the K negatives only,
    ``L = mean_i CE([z0_i·z1_i, z0_i·negativesᵀ]/τ, 0)`` (lightly's loss with a memory bank).

    The engine never forms the 2N×2N (or N×K) matrix. Returns a 0-d tensor in the inputs' dtype (fp32
    under autocast).
    """
    check_features("out0", out0, "out1", out1)
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have one shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
    temperature = check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    n, d = out0.shape
    if negatives is not None:
        if not isinstance(negatives, torch.Tensor):
            raise TypeError(f"negatives must be a (K, D) tensor, got {type(negatives).__name__}")
        if negatives.dim() != 2 or negatives.shape[1] != d:
            raise ValueError(f"negatives must be (K, D={d}), got shape {tuple(negatives.shape)}")
        if negatives.device != out0.device or not negatives.is_floating_point():
            raise TypeError(f"negatives ({negatives.dtype}, {negatives.device}) must be floating point on "
                            f"out0's device ({out0.device})")
        if process_group is not None:
            raise ValueError("ntxent_loss with memory-bank negatives is a per-rank loss: pass process_group=None")
    group = distributed_setup(process_group, out0, out1, backend)
    if backend == "reference":
        if negatives is not None:
            return reference.ntxent_bank_loss_reference(out0, out1, negatives, temperature=temperature).to(out0.dtype)
        return reference.ntxent_loss_reference(out0, out1, temperature=temperature).to(out0.dtype)
    z0 = torch.nn.functional.normalize(out0, dim=1)
    z1 = torch.nn.functional.normalize(out1, dim=1)
    dev = z0.device
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float64, device=dev)
    idx = torch.arange(n, device=dev)
    if negatives is not None:
        k = negatives.shape[0]
        unowned = torch.full((k,), -1, dtype=torch.int64, device=dev)
        # row i keeps its own view and the bank (the other views are another item's: rule 2)
        target = Target(idx, torch.cat([idx, unowned]), row_owner=idx, col_owner=torch.cat([idx, unowned]),
                        own_rule=torch.full((n,), 2, dtype=torch.int64, device=dev))
        cols = torch.cat([z1, negatives.detach().to(z1.dtype)])
        return target_engine_loss(z0, cols, inv_t, None, target, symmetric=False, backend=backend,
                                  chunk_size=chunk_size)
    rows = torch.cat([z0, z1])
    offset, cols = 0, rows
    if group is not None:
        from ..distributed import all_gather_with_grad, group_rank_and_size

        rank, world = group_rank_and_size(group)
        offset = rank * n
        cols = torch.cat([all_gather_with_grad(z0, group), all_gather_with_grad(z1, group)])
    m = cols.shape[0] // 2
    ids = (idx + offset).repeat(2)
    col_ids = torch.arange(m, device=dev).repeat(2)
    exclude = torch.cat([idx + offset, idx + offset + m])  # each row's own view
    return target_engine_loss(rows, cols, inv_t, None, Target(ids, col_ids, exclude_col=exclude), symmetric=False,
                              backend=backend, chunk_size=chunk_size)
