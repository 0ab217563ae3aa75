"""Functional contrastive losses.

All options are keyword-only. ``backend`` is one of ``"auto"`` (Triton on CUDA, C++ on CPU),
``"cpp"``, ``"triton"`` (chunked GEMMs with fused Triton epilogues), ``"triton_fused"`` (tile kernels
whose logits never leave on-chip memory; D <= 256), ``"torch"`` (chunked plain PyTorch) and
``"reference"`` (materialised, for testing). ``chunk_size`` is the number of rows per logits chunk
(default: what fits ``FASTCON_CHUNK_BYTES``). ``process_group`` distributes the loss over
``torch.distributed`` (None: no distribution).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._validation import _compiling, check_features, check_label_smoothing, check_labels, check_pos_offset, check_scalar
from .ops import clip_engine_loss, siglip_engine_loss
from .ops.engine import BACKENDS as _BACKENDS
from .ops.engine import loss_dtype as _loss_dtype
from .ops.engine import target_engine_loss
from .kernels.targets import Target

__all__ = ["clip_loss", "siglip_loss", "negatives_clip_loss", "ntxent_loss"]


def _check_common(image_features, text_features, logit_scale, logit_bias, *, bias_required=False):
    check_features("image_features", image_features, "text_features", text_features)
    device = image_features.device
    scale = check_scalar("logit_scale", logit_scale, device)
    bias = check_scalar("logit_bias", logit_bias, device, required=bias_required)
    return scale, bias


def _check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be a non-negative int (0 or None: automatic), got {chunk_size!r}")
    return chunk_size or None


def _check_modes(local_loss, gather_with_grad):
    """open_clip's two distributed flags, bools."""
    for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _distributed_setup(process_group, image_features, text_features, backend):
    """None for a single-process call (no group, or a group of one); else the group, after checking
    that every rank holds the same number of pairs."""
    if process_group is None:
        return None
    from .distributed import check_equal_batch, group_rank_and_size

    _, world = group_rank_and_size(process_group)
    if world == 1:
        return None
    if backend == "reference":
        raise ValueError("backend='reference' has no distributed form; gather the features and call it on one rank")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(
            f"the distributed losses need paired local batches: image_features has {image_features.shape[0]} rows, "
            f"text_features {text_features.shape[0]}")
    check_equal_batch(image_features.shape[0], image_features.device, process_group)
    return process_group


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    label_smoothing: float = 0.0,
    pos_offset: int = 0,
    labels: Optional[torch.Tensor] = None,
    pair_mask: Optional[torch.Tensor] = None,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE without the N×N logits matrix.

    ``S = s·X·Yᵀ + b`` with X = ``image_features`` (Na, D), Y = ``text_features`` (Nb, D),
    s = ``logit_scale`` (already exponentiated, as open_clip passes it), b = ``logit_bias``::

        L = ½·[ (1/Na)·Σ_i CE(S_i·, pos_offset + i) + (1/Na)·Σ_i CE(S_·(pos_offset+i), i) ]

    The column term runs over the Na columns that own a positive; with ``Na == Nb`` and
    ``pos_offset == 0`` this is open_clip's ``ClipLoss``. ``label_smoothing`` ε uses the targets
    ``(1−ε)·onehot + ε/n_classes`` of ``F.cross_entropy``. ``labels`` (N integer class ids, paired
    batches): pairs that share an id are positives of one another in both directions, and each row's
    loss is the mean of −log p over its positives (SupCon's outside form, docs/losses.md §2.1; the
    smoothing ε then spreads over the row's columns). ``pair_mask`` (N, N) bool, paired batches: False
    drops the pair (i, j) from both directions, as if its logit were −∞ (known duplicates, a mask of
    one's own); the one O(N²) input, for users who have one. Returns a 0-d tensor in the features' dtype
    (computed in fp32); gradients reach both feature tensors, ``logit_scale`` and ``logit_bias``.
    Memory: O((Na + Nb)·D + chunk·Nb).

    With ``process_group`` (W ranks, each passing its local n pairs; ``pos_offset`` must be 0) this
    is open_clip's distributed ``ClipLoss`` on each rank: ``local_loss=False`` returns the global loss
    over the N = W·n pairs, computed from this rank's n rows of the N×N matrix with the text shards
    travelling around a ring; ``local_loss=True`` returns ½[CE(s·X_r·Y_allᵀ) + CE(s·Y_r·X_allᵀ)] with
    labels offset by rank·n. ``gather_with_grad`` gives the gathered features a gradient, exactly as
    open_clip's all_gather with autograd does (in the global mode that multiplies the feature gradients
    by the sum of the ranks' upstream gradients, W for ``loss.backward()`` everywhere).
    """
    scale, bias = _check_common(image_features, text_features, logit_scale, logit_bias)
    eps = check_label_smoothing(label_smoothing)
    check_pos_offset(pos_offset, image_features.shape[0], text_features.shape[0])
    chunk_size = _check_chunk_size(chunk_size)
    _check_modes(local_loss, gather_with_grad)
    if labels is not None or pair_mask is not None:
        n = image_features.shape[0]
        if text_features.shape[0] != n or pos_offset != 0:
            raise ValueError(f"labels and pair_mask need paired batches with pos_offset=0: image_features has {n} "
                             f"rows, text_features {text_features.shape[0]}, pos_offset={pos_offset}")
        if labels is None:
            labels = torch.arange(n, device=image_features.device)
        labels = check_labels("labels", labels, n, image_features.device)
        group = _distributed_setup(process_group, image_features, text_features, backend)
        if pair_mask is not None:
            if not isinstance(pair_mask, torch.Tensor) or pair_mask.dtype != torch.bool:
                raise TypeError("pair_mask must be a boolean tensor (False drops a pair)")
            if group is None and tuple(pair_mask.shape) != (n, n):
                raise ValueError(f"pair_mask must be (N={n}, N={n}), got {tuple(pair_mask.shape)}")
            pair_mask = pair_mask.to(image_features.device)
        if group is not None:
            return _multi_positive_distributed(image_features, text_features, scale, bias, labels, pair_mask, eps,
                                               group=group, local_loss=local_loss,
                                               gather_with_grad=gather_with_grad, backend=backend,
                                               chunk_size=chunk_size)
        if backend == "reference":
            return reference.multi_positive_clip_loss_reference(
                image_features, text_features, scale, bias, labels=labels, label_smoothing=eps,
                pair_mask=pair_mask).to(image_features.dtype)
        return target_engine_loss(image_features, text_features, scale, bias, Target(labels, labels, mask=pair_mask),
                                  label_smoothing=eps, backend=backend, chunk_size=chunk_size)
    group = _distributed_setup(process_group, image_features, text_features, backend)
    if group is not None:
        from . import distributed

        if pos_offset != 0:
            raise ValueError("pos_offset must be 0 in the distributed loss (the positives are the paired rows)")
        impl = distributed.clip_loss_local if local_loss else distributed.clip_loss_ring
        return impl(image_features, text_features, scale, bias, group=group, gather_with_grad=gather_with_grad,
                    label_smoothing=eps, backend=backend, chunk_size=chunk_size)
    if backend == "reference":
        return reference.clip_loss_reference(image_features, text_features, scale, bias,
                                             label_smoothing=eps, pos_offset=pos_offset).to(image_features.dtype)
    return clip_engine_loss(image_features, text_features, scale, bias, label_smoothing=eps,
                            pos_offset=pos_offset, backend=backend, chunk_size=chunk_size)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    pos_offset: int = 0,
    negative_only: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss without the N×N logits matrix.

    ``l_ij = s·x_i·y_j + b``, ``z_ij = +1`` where ``j == pos_offset + i`` else ``−1`` (all ``−1`` with
    ``negative_only``, the form of text shards from other ranks)::

        L = −(1/Na)·Σ_ij log σ(z_ij·l_ij) = (1/Na)·Σ_ij softplus(−z_ij·l_ij)

    Divided by the number of rows Na (open_clip, big_vision), not Na·Nb. open_clip initialises
    ``s = 10`` and ``b = −10``. Returns a 0-d tensor in the features' dtype (computed in fp32).

    With ``process_group`` (W ranks, n local pairs each) this is open_clip's distributed
    ``SigLipLoss`` on each rank: the own shard with its positives plus every other rank's text shard as
    negatives, divided by n; the shards travel around a ring, so memory per rank does not grow with W,
    and each text shard's gradient is the sum of every rank's contribution.
    """
    scale, bias = _check_common(image_features, text_features, logit_scale, logit_bias)
    if not isinstance(negative_only, bool):
        raise TypeError(f"negative_only must be a bool, got {type(negative_only).__name__}")
    if not negative_only:
        check_pos_offset(pos_offset, image_features.shape[0], text_features.shape[0])
    chunk_size = _check_chunk_size(chunk_size)
    group = _distributed_setup(process_group, image_features, text_features, backend)
    if group is not None:
        from .distributed import siglip_loss_ring

        if negative_only or pos_offset != 0:
            raise ValueError("negative_only and pos_offset are not used by the distributed loss: "
                             "the other ranks' shards are the negatives")
        return siglip_loss_ring(image_features, text_features, scale, bias, group=group, backend=backend,
                                chunk_size=chunk_size)
    if backend == "reference":
        return reference.siglip_loss_reference(image_features, text_features, scale, bias, pos_offset=pos_offset,
                                               negative_only=negative_only).to(image_features.dtype)
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
    scale, bias = _check_common(image_features, text_features, logit_scale, logit_bias)
    eps = check_label_smoothing(label_smoothing)
    chunk_size = _check_chunk_size(chunk_size)
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
        if not isinstance(negative_mask, torch.Tensor) or negative_mask.dtype != torch.bool:
            raise TypeError("negative_mask must be a boolean tensor (False drops a negative)")
        if tuple(negative_mask.shape) != (b, k):
            raise ValueError(f"negative_mask must be (B={b}, K={k}), got {tuple(negative_mask.shape)}")
        negative_mask = negative_mask.to(image_features.device)
    if false_negative_margin is not None:
        if isinstance(false_negative_margin, bool) or not isinstance(false_negative_margin, (int, float)):
            raise TypeError(f"false_negative_margin must be a float, got {type(false_negative_margin).__name__}")
        if not 0 <= false_negative_margin < float("inf"):
            raise ValueError(f"false_negative_margin must be finite and >= 0, got {false_negative_margin}")
    if labels is not None:
        if form == "own":
            raise ValueError("labels make in-batch texts positives: they apply to form='global' only")
        labels = check_labels("labels", labels, b, image_features.device)
    group = _distributed_setup(process_group, image_features, text_features, backend)
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
    from .distributed import all_gather_no_grad

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
    from .distributed import (all_gather_no_grad, group_rank_and_size, mean_over_ranks, shared_parameter,
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


def _multi_positive_distributed(x, y, scale, bias, labels, pair_mask, eps, *, group, local_loss, gather_with_grad,
                                backend, chunk_size):
    """clip_loss(labels=...) on W ranks, in open_clip's modes: ``local_loss=False``, the loss of all
    ranks' pairs on every rank (from this rank's rows, the column statistics merged across ranks);
    ``local_loss=True``, ½[TCE(s·X_r·Y_allᵀ) + TCE(s·Y_r·X_allᵀ)] over this rank's rows. ``labels``
    are this rank's; ``pair_mask`` is the global (N, N) mask, the same on every rank."""
    from .distributed import (all_gather_no_grad, all_gather_with_grad, group_rank_and_size,
                              target_loss_global)

    rank, world = group_rank_and_size(group)
    n = x.shape[0]
    ids = _global_ids(labels, group)
    if pair_mask is not None and tuple(pair_mask.shape) != (world * n, world * n):
        raise ValueError(f"with a process_group pair_mask is the global (N={world * n}, N={world * n}) mask, "
                         f"got {tuple(pair_mask.shape)}")
    if not local_loss:
        return target_loss_global(x, [y], scale, bias, Target(ids, ids, mask=pair_mask), group=group,
                                  label_smoothing=eps, symmetric=True, backend=backend, chunk_size=chunk_size,
                                  gather_with_grad=gather_with_grad)
    from .kernels.targets import rows_of

    gather = all_gather_with_grad if gather_with_grad else all_gather_no_grad
    all_x, all_y = gather(x, group), gather(y, group)
    rows = slice(rank * n, (rank + 1) * n)
    i2t = rows_of(Target(ids, ids, mask=pair_mask), rows.start, rows.stop)
    t2i = rows_of(Target(ids, ids, mask=None if pair_mask is None else pair_mask.T.contiguous()), rows.start,
                  rows.stop)
    kw = dict(label_smoothing=eps, symmetric=False, backend=backend, chunk_size=chunk_size)
    return (target_engine_loss(x, all_y, scale, bias, i2t, **kw) + target_engine_loss(y, all_x, scale, bias, t2i, **kw)) / 2


def _own_negatives_loss(x, y, negatives, scale, bias, negative_mask, margin, eps):
    """The own form: a B×(1+K) logits matrix (nothing quadratic to avoid), CE with target 0 over each
    row's kept entries."""
    from .ops.engine import autocast_off, loss_dtype

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
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    chunk_size = _check_chunk_size(chunk_size)
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
    group = _distributed_setup(process_group, out0, out1, backend)
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
        from .distributed import all_gather_with_grad, group_rank_and_size

        rank, world = group_rank_and_size(group)
        offset = rank * n
        cols = torch.cat([all_gather_with_grad(z0, group), all_gather_with_grad(z1, group)])
    m = cols.shape[0] // 2
    ids = (idx + offset).repeat(2)
    col_ids = torch.arange(m, device=dev).repeat(2)
    exclude = torch.cat([idx + offset, idx + offset + m])  # each row's own view
    return target_engine_loss(rows, cols, inv_t, None, Target(ids, col_ids, exclude_col=exclude), symmetric=False,
                              backend=backend, chunk_size=chunk_size)


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
    gradient pass (None: the default; 0 for the least memory).
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
    chunk_size = _check_chunk_size(chunk_size)
    docs = _mnrl_docs(queries, docs)
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
            hardness_mode=hardness_mode, hardness_strength=hardness_strength).to(queries.dtype)

    if similarity == "cos":
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
    target = Target(row_ids, col_ids, exclude_col=exclude_col, row_group=row_group,
                    row_owner=row_owner, col_owner=col_owner, own_rule=own_rule, col_range=col_range,
                    penalty=penalty, penalty_cols=penalty_cols, penalty_mode=penalty_mode,
                    penalty_rows=penalty_rows)
    scale_t = torch.tensor(float(scale), dtype=torch.float64, device=dev)
    return target_engine_loss(rows, cols, scale_t, None, target, symmetric=False, backend=backend,
                              chunk_size=chunk_size, cache_limit=cache_limit)


DISTILL_KINDS = reference.DISTILL_KINDS


def _check_teacher(name, teacher, student, *, own=False):
    """A teacher feature tensor of the student's shape, dtype and device, detached (with a warning when
    it required grad: a teacher is not trained by the distillation term; none when it is the
    student's own tensor, ``own``, as CWCL's frozen modality may be)."""
    import warnings

    if not isinstance(teacher, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(teacher).__name__}")
    if teacher.shape != student.shape:
        raise ValueError(f"{name} must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}")
    if teacher.device != student.device or not teacher.is_floating_point():
        raise TypeError(f"{name} ({teacher.dtype}, {teacher.device}) must be floating point on the student's device "
                        f"({student.device})")
    if teacher.requires_grad and torch.is_grad_enabled() and not own:
        warnings.warn(f"fastcon: {name} requires grad; the distillation term treats the teacher as fixed and "
                      "detaches it", UserWarning, stacklevel=3)
    return teacher.detach().to(student.dtype)


def distill_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    teacher_logit_scale=None,
    *,
    kind: str = "clip",
    alpha: float = 0.5,
    temperature: float = 1.0,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    process_group=None,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The distillation term between the student ``S = s·X·Yᵀ`` and a teacher, without the B×B
    matrices (docs/losses.md §1.3), both directions averaged (the teacher never receives a gradient):

    * ``"clip"`` (open_clip's DistillClipLoss): ``½[softCE(S, softmax_row(T)) + softCE(Sᵀ,
      softmax_row(Tᵀ))]`` with ``T = s_t·X̃·Ỹᵀ``;
    * ``"hycd"``: ``P = α·I + (1−α)·softmax(T/τ)`` and ``τ²·KL(P ‖ softmax(S/τ))`` (batchmean) per
      direction, on the similarities without the logit scales: ``logit_scale`` and
      ``teacher_logit_scale`` are not used by this kind;
    * ``"cwcl"``: the image side is trained against the frozen text modality ``teacher_text_features``
      (it may be the student's own ``text_features``): weights ``½ + ½·q̂_i·q̂_j``, image→text over each
      row normalised over the texts, and our reverse term text→image normalised over the images
      (``teacher_image_features`` and ``teacher_logit_scale`` are not used).

    The teacher's tile is computed beside the student's in each chunk, from the teacher's features
    (a pass of its own gives the teacher's normalisers first): memory O(N·D + chunk·N). Returns a 0-d
    tensor in the features' dtype.

    With ``process_group`` (W ranks, each passing its local n pairs and its teacher's n pairs) this is
    open_clip's distributed DistillClipLoss term on each rank: ``local_loss=False`` returns the loss
    of the global batch of N = W·n pairs (each rank computes its own rows against the gathered
    columns; the student's and the teacher's column statistics are merged across ranks);
    ``local_loss=True`` returns ½[softCE of this rank's image rows over all N texts + of its text rows
    over all N images], as open_clip's local form. ``gather_with_grad`` as in ``clip_loss``. Every
    kind takes these modes, with the same meaning of rows and columns.
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {DISTILL_KINDS}, got {kind!r}")
    for name, value in (("alpha", alpha), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    _check_modes(local_loss, gather_with_grad)
    chunk_size = _check_chunk_size(chunk_size)
    if kind == "hycd":
        scale, _ = _check_common(image_features, text_features, 1.0, None)
    else:
        scale, _ = _check_common(image_features, text_features, logit_scale, None)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"distill_loss needs paired batches: image_features has {image_features.shape[0]} rows, "
                         f"text_features {text_features.shape[0]}")
    tx = _check_teacher("teacher_image_features", teacher_image_features, image_features) if kind != "cwcl" \
        else None
    ty = _check_teacher("teacher_text_features", teacher_text_features, text_features,
                        own=kind == "cwcl" and teacher_text_features is text_features)
    if kind == "clip":
        teacher_scale = check_scalar("teacher_logit_scale", teacher_logit_scale, image_features.device)
    group = _distributed_setup(process_group, image_features, text_features, backend)
    if backend == "reference":
        return reference.distill_loss_reference(
            image_features, text_features, scale, tx if tx is not None else ty, ty,
            teacher_logit_scale if kind == "clip" else None, kind=kind, alpha=alpha,
            temperature=temperature).to(image_features.dtype)
    acc = torch.promote_types(image_features.dtype, torch.float32)
    dev = image_features.device
    numbers = {}  # the target's numbers and the teacher's scale, by kind
    if kind == "clip":
        numbers = dict(teacher_scale=teacher_scale.detach().to(device=dev, dtype=acc).reshape(()), soft=1.0)
    elif kind == "hycd":
        scale = torch.tensor(1.0 / temperature, dtype=acc, device=dev)
        numbers = dict(teacher_scale=scale, soft=1.0 - alpha, hard=alpha, entropy=True)
    else:  # CWCL's weights between the frozen modality's (unit) rows, for both directions
        tx = ty = torch.nn.functional.normalize(ty, dim=1)
        numbers = dict(teacher_kind=1, teacher_c0=0.5, teacher_c1=0.5, teacher_eps=1e-8, soft=1.0)
    post = temperature ** 2 if kind == "hycd" else 1.0
    if group is not None:
        return post * _distill_distributed(image_features, text_features, scale, tx, ty, numbers, group=group,
                                           local_loss=local_loss, gather_with_grad=gather_with_grad,
                                           backend=backend, chunk_size=chunk_size)
    ids = torch.arange(image_features.shape[0], device=dev)
    target = Target(ids, ids, teacher_a=tx, teacher_b=ty, **numbers)
    return post * target_engine_loss(image_features, text_features, scale, None, target, symmetric=True,
                                     backend=backend, chunk_size=chunk_size)


def distill_clip_losses(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                        teacher_logit_scale, *, label_smoothing: float = 0.0, backend: str = "auto",
                        chunk_size: Optional[int] = None):
    """(``clip_loss``, ``distill_loss(kind="clip")``) of one process from one engine pass: both share the
    student's LSEs, the teacher's pass and pass 1 run once, and pass 2 once in the backward for the
    gradient of any weighting of the two (open_clip's DistillClipLoss on one process)."""
    from .ops.engine import target_pair_engine_loss

    scale, _ = _check_common(image_features, text_features, logit_scale, None)
    eps = check_label_smoothing(label_smoothing)
    chunk_size = _check_chunk_size(chunk_size)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"distillation needs paired batches: image_features has {image_features.shape[0]} rows, "
                         f"text_features {text_features.shape[0]}")
    tx = _check_teacher("teacher_image_features", teacher_image_features, image_features)
    ty = _check_teacher("teacher_text_features", teacher_text_features, text_features)
    teacher_scale = check_scalar("teacher_logit_scale", teacher_logit_scale, image_features.device)
    dev = image_features.device
    acc = torch.promote_types(image_features.dtype, torch.float32)
    ids = torch.arange(image_features.shape[0], device=dev)
    target = Target(ids, ids, teacher_a=tx, teacher_b=ty,
                    teacher_scale=teacher_scale.detach().to(device=dev, dtype=acc).reshape(()), soft=1.0)
    return target_pair_engine_loss(image_features, text_features, scale, None, target, label_smoothing=eps,
                                   backend=backend, chunk_size=chunk_size)


def _distill_distributed(x, y, scale, tx, ty, numbers, *, group, local_loss, gather_with_grad, backend, chunk_size):
    """distill_loss on W ranks in open_clip's modes: ``local_loss=False``, the loss of the global batch
    on every rank (this rank's rows against the gathered columns, the column statistics of the
    student and of the teacher merged across ranks); ``local_loss=True``, open_clip's local form
    ½[soft CE of this rank's image rows over all texts + of its text rows over all images]."""
    from .distributed import all_gather_no_grad, all_gather_with_grad, group_rank_and_size, target_loss_global
    from .kernels.targets import rows_of

    rank, world = group_rank_and_size(group)
    n = x.shape[0]
    ids = torch.arange(world * n, device=x.device)
    all_tx, all_ty = all_gather_no_grad(tx, group), all_gather_no_grad(ty, group)
    if not local_loss:
        target = Target(ids, ids, teacher_a=all_tx, teacher_b=all_ty, **numbers)
        return target_loss_global(x, [y], scale, None, target, group=group, label_smoothing=0.0, symmetric=True,
                                  backend=backend, chunk_size=chunk_size, gather_with_grad=gather_with_grad)
    gather = all_gather_with_grad if gather_with_grad else all_gather_no_grad
    all_x, all_y = gather(x, group), gather(y, group)
    r0, r1 = rank * n, (rank + 1) * n
    i2t = rows_of(Target(ids, ids, teacher_a=all_tx, teacher_b=all_ty, **numbers), r0, r1)
    t2i = rows_of(Target(ids, ids, teacher_a=all_ty, teacher_b=all_tx, **numbers), r0, r1)
    kw = dict(symmetric=False, backend=backend, chunk_size=chunk_size)
    return (target_engine_loss(x, all_y, scale, None, i2t, **kw) + target_engine_loss(y, all_x, scale, None, t2i, **kw)) / 2


def align_uniform_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float = 2.0,
    t: float = 2.0,
    cross: bool = False,
    return_terms: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
):
    """Alignment and uniformity (Wang & Isola; the contrastive-gap paper; docs/losses.md §1.5), the rows
    normalised inside:

    * ``align = mean_i ‖x_i − y_i‖^α``;
    * ``uniform = ½[U(x) + U(y)]``, ``U(z) = log mean_{i<j} exp(−t‖z_i − z_j‖²)``;
    * with ``cross``, ``cross_uniform = log mean_{i≠j} exp(−t‖x_i − y_j‖²)`` (ordered pairs).

    Returns ``total`` (the sum of the terms), or with ``return_terms`` a dict of the terms and ``total``,
    in the inputs' dtype (computed in fp32 at least, the rows normalised in fp32).
    Each uniformity is one LSE of ``2t·a·b`` over the pairs on the engine (a single group of rows with
    the diagonal excluded, no targets), in fp32 from the dot products, never from ``2 − 2·cos`` in
    low precision: ``‖a − b‖² = 2 − 2a·b`` for unit rows, so ``U = LSE_{i≠j}(2t·a_i·a_j) − 2t −
    log(n(n−1))`` (the mean over i<j equals the mean over ordered pairs).
    """
    check_features("x", x, "y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    for name, value in (("alpha", alpha), ("t", t)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 < t < float("inf"):
        raise ValueError(f"t must be a positive finite number, got {t}")
    if not 0.0 < alpha < float("inf"):
        raise ValueError(f"alpha must be a positive finite number, got {alpha}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 rows, got {n}")
    chunk_size = _check_chunk_size(chunk_size)
    if backend == "reference":
        return reference.align_uniform_loss_reference(x, y, alpha=alpha, t=t, cross=cross, return_terms=return_terms)
    import math

    dev = x.device
    acc = torch.promote_types(x.dtype, torch.float32)
    # normalised in fp32 (at least): bf16 unit rows would be rounded again before the dot products
    xn, yn = torch.nn.functional.normalize(x.to(acc), dim=1), torch.nn.functional.normalize(y.to(acc), dim=1)
    two_t = torch.tensor(2.0 * t, dtype=acc, device=dev)
    idx = torch.arange(n, device=dev)
    none = torch.full((n,), -1, dtype=torch.int64, device=dev)
    one_group = torch.zeros(n, dtype=torch.int64, device=dev)
    offset = 2.0 * t + math.log(n * (n - 1))

    def lse_pairs(a, b, exclude):
        # one group of every row, no positives or soft targets: the loss is the LSE over the kept pairs
        target = Target(none, none, exclude_col=idx if exclude else None, row_group=one_group, hard=0.0)
        return target_engine_loss(a, b, two_t, None, target, symmetric=False, backend=backend,
                                  chunk_size=chunk_size)

    terms = {"align": (xn - yn).norm(dim=1).pow(alpha).mean(),
             "uniform": (lse_pairs(xn, xn, True) + lse_pairs(yn, yn, True)) / 2 - offset}
    if cross:  # x_i against y_j, i ≠ j
        terms["cross_uniform"] = lse_pairs(xn, yn, True) - offset
    terms["total"] = sum(v for v in terms.values())
    terms = {k: v.to(x.dtype) for k, v in terms.items()}
    return terms if return_terms else terms["total"]


def _slerp_eps(dtype: torch.dtype) -> float:
    """The clamp of the cosine in ``slerp``: sin θ stays >= sqrt(2·eps) (about 1.4e-3 in fp32)."""
    return 1e-6 if dtype in (torch.float32, torch.bfloat16, torch.float16) else 1e-12


def slerp(a: torch.Tensor, b: torch.Tensor, lam) -> torch.Tensor:
    """Spherical interpolation of unit rows ``a``, ``b`` (..., D) (docs/losses.md §2.3)::

        slerp(a, b; λ) = [sin(λθ)·a + sin((1−λ)θ)·b] / sin θ,   θ = arccos(a·b)

    (λ weighs ``a``: λ = 1 gives ``a``). The cosine is clamped to [−1+ε, 1−ε] (ε = 1e-6 in fp32 and
    below, 1e-12 in float64), and where ``a·b > 1−ε`` (θ → 0) the rows are interpolated linearly and
    normalised instead: the value and its gradient stay finite at θ → 0 and θ → π. ``lam``: a float
    in [0, 1] or a tensor broadcasting against (..., 1) (it may require grad). Returns (..., D) in the
    inputs' dtype, computed in at least fp32."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("slerp takes tensors a and b")
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(f"slerp needs a and b of one shape (..., D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise TypeError(f"slerp needs floating-point a and b of one dtype, got {a.dtype} and {b.dtype}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float, torch.Tensor)):
        raise TypeError(f"lam must be a float or a tensor, got {type(lam).__name__}")
    if not isinstance(lam, torch.Tensor) and not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    acc = torch.promote_types(a.dtype, torch.float32)
    x, y = a.to(acc), b.to(acc)
    lam = lam.to(acc) if isinstance(lam, torch.Tensor) else lam
    eps = _slerp_eps(a.dtype)
    dot = (x * y).sum(-1, keepdim=True)
    tiny = dot > 1.0 - eps
    theta = torch.acos(dot.clamp(-1.0 + eps, 1.0 - eps))
    arc = (torch.sin(lam * theta) * x + torch.sin((1 - lam) * theta) * y) / torch.sin(theta)
    line = torch.nn.functional.normalize(lam * x + (1 - lam) * y, dim=-1)
    return torch.where(tiny, line, arc).to(a.dtype)


def _m2mix_direction(rows, mixed, pos_logit, scale, *, backend, chunk_size):
    """CE over rows i of ``[rows_i·mixed_j·scale (j ≠ i), pos_logit_i]``, target the last: each row's LSE
    over the mixed columns but its own (the engine's row LSE), joined with its positive logit given
    from outside the tile (O(N) autograd)."""
    from .ops.engine import target_row_lse

    n = rows.shape[0]
    idx = torch.arange(n, device=rows.device)
    none = torch.full((n,), -1, dtype=torch.int64, device=rows.device)
    lse = target_row_lse(rows, mixed, scale, None, Target(none, none, exclude_col=idx), backend=backend,
                         chunk_size=chunk_size)
    return (torch.logaddexp(lse, pos_logit) - pos_logit).mean()


def m2mix_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    lam=None,
    beta: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    temperature: float = 0.07,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """m²-mix, geodesic multimodal mixup (docs/losses.md §2.3), without the N×N matrices::

        m_j = slerp(x_j, y_j; λ)
        A_ij = x_i·m_j,  C_ij = y_i·m_j  (i ≠ j);  A_ii = C_ii = x_i·y_i
        L = CE(A/τ, i) + CE(C/τ, i)      (a sum, as the paper's code; each CE the mean over rows)

    ``image_features`` x and ``text_features`` y (N, D) are unit rows (normalise them first, as CLIP
    does). The gradients flow through the interpolation into x and y. ``lam``: a float in [0, 1] or a
    0-d tensor; with ``lam=None`` one ``λ ~ Beta(beta, beta)`` is drawn per call from ``generator`` (or
    torch's global generator), and ``beta`` is required. The paper adds ``w·L`` (w = 0.01) to the CLIP
    loss. On the engine each CE is the row LSE over the mixed columns but the row's own
    (``ops.engine.target_row_lse``: one N×N pass of GEMMs, memory O(N·D)), joined in O(N) with the
    positive logit ``x_i·y_i/τ`` given from outside the tile. Returns a 0-d tensor in the features'
    dtype.
    """
    check_features("image_features", image_features, "text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(f"m2mix_loss needs paired batches of one shape, got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    chunk_size = _check_chunk_size(chunk_size)
    if lam is None:
        if beta is None:
            raise ValueError("m2mix_loss(lam=None) draws λ ~ Beta(beta, beta): pass beta (the paper's code uses "
                             "0.1 to 1), or a fixed lam")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < float("inf"):
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lam = float(torch.distributions.Beta(float(beta), float(beta)).sample())
    elif isinstance(lam, torch.Tensor):
        if lam.dim() != 0 or not lam.is_floating_point():
            raise ValueError(f"lam must be a 0-d floating-point tensor, got shape {tuple(lam.shape)}, {lam.dtype}")
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float in [0, 1] or a 0-d tensor, got {type(lam).__name__}")
    elif not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    x, y = image_features, text_features
    if backend == "reference":
        return reference.m2mix_loss_reference(x, y, lam, temperature=temperature, slerp=slerp)
    m = slerp(x, y, lam)
    acc = torch.promote_types(x.dtype, torch.float32)
    scale = torch.tensor(1.0 / temperature, dtype=acc, device=x.device)
    # the replaced diagonal of both products, in float64 beside the float64 row LSEs (the loss cancels)
    pos = (x.double() * y.double()).sum(1) / temperature
    loss = (_m2mix_direction(x, m, pos, scale, backend=backend, chunk_size=chunk_size)
            + _m2mix_direction(y, m, pos, scale, backend=backend, chunk_size=chunk_size))
    return loss.to(x.dtype)


_MIX_KEYS = ("pair_ranks", "alpha", "query_ranks", "beta")


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _draw_mixes(b, top_n, n_mix, n_query_mix, generator, device):
    """MoCHi's draws: ranks uniform over the top-N (with replacement), α ~ U(0, 1), β ~ U(0, 0.5)."""
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    kw = dict(generator=generator, device=gen_dev)
    high = max(top_n, 1)
    mixes = {"pair_ranks": torch.randint(high, (b, n_mix, 2), **kw), "alpha": torch.rand((b, n_mix), **kw),
             "query_ranks": torch.randint(high, (b, n_query_mix), **kw),
             "beta": 0.5 * torch.rand((b, n_query_mix), **kw)}
    return {k: v.to(device) for k, v in mixes.items()}


def _check_mixes(mixes, b, top_n, n_mix, n_query_mix, device):
    if not isinstance(mixes, dict) or set(mixes) != set(_MIX_KEYS):
        raise ValueError(f"mixes must be a dict with the keys {_MIX_KEYS}")
    shapes = {"pair_ranks": (b, n_mix, 2), "alpha": (b, n_mix), "query_ranks": (b, n_query_mix),
              "beta": (b, n_query_mix)}
    out = {}
    for key, shape in shapes.items():
        v = mixes[key]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
            raise ValueError(f"mixes[{key!r}] must be a tensor of shape {shape}, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if key.endswith("ranks"):
            if v.dtype != torch.int64:
                raise TypeError(f"mixes[{key!r}] must be int64, got {v.dtype}")
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= top_n):
                raise ValueError(f"mixes[{key!r}] must be ranks in [0, top_n={top_n})")
        else:
            if not v.is_floating_point():
                raise TypeError(f"mixes[{key!r}] must be floating point, got {v.dtype}")
            if v.numel() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"mixes[{key!r}] must be finite")
        out[key] = v.to(device)
    return out


def mochi_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.2,
    top_n: int = 1024,
    n_mix: int = 1024,
    n_query_mix: int = 128,
    generator: Optional[torch.Generator] = None,
    mixes: Optional[dict] = None,
    return_mixes: bool = False,
    in_batch: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
):
    """MoCHi, hard negative mixing (docs/losses.md §2.2), without the B×K similarity matrix or the
    synthetic points of the whole batch::

        top_i   = the top_n negatives n of query i by q_i·n, hardest first (ties: the lower index)
        h_im    = normalize(α_im·n_a + (1−α_im)·n_b),  a, b = top_i[pair_ranks_im]  (m < n_mix)
        h′_im   = normalize(β_im·sg(q_i) + (1−β_im)·n_c), c = top_i[query_ranks_im]  (m < n_query_mix)
        L       = mean_i CE([q_i·k_i, q_i·Nᵀ, q_i·h_i·ᵀ, q_i·h′_i·ᵀ]/τ, 0)

    ``q`` (B, D) the queries (with gradient); ``k`` (B, D) their positive keys and ``queue`` (K, D) the
    negatives N, both used without gradient (detached) and as given (MoCo normalises them first); the
    synthetic points are normalised after mixing (``F.normalize``'s eps 1e-12), detached and never
    enqueued. With ``in_batch=True`` the negatives are the batch's own keys (``queue`` must be None)
    and each query's own key is left out of its negatives and its top-N.

    The draws (ranks uniform over the top-N with replacement, α ~ U(0, 1), β ~ U(0, 0.5)) come from
    ``generator`` (or torch's global generator), or are given in ``mixes``: ``pair_ranks`` (B, n_mix, 2)
    and ``query_ranks`` (B, n_query_mix) int64, ``alpha`` (B, n_mix), ``beta`` (B, n_query_mix). With
    ``return_mixes`` the result is ``(loss, mixes)``. ``top_n``, ``n_mix`` or ``n_query_mix`` of 0 turn
    their part off (``top_n=0`` with mixing asked for is an error).

    What is materialised: the top-N indices and similarities (B, top_n), the logits and norms of the
    synthetic points (B, n_mix + n_query_mix), and for a chunk of queries at a time its gathered rows
    (about 32 MiB): no synthetic point is formed, ``q·h`` and its norm come from the dot products
    ``q·n_a``, ``q·n_b``, ``n_a·n_b`` (``ops.mixing.mixed_logits``), and q's gradient is a combination of
    its top-N rows. The LSE over the
    queue is the engine's row LSE (``ops.engine.target_row_lse``: memory O((B + K)·D + chunk·K)); the
    top-N selection runs as chunked matrix products and sorts (``ops.mixing.top_negatives``) on every
    backend. Returns a 0-d tensor in q's dtype.
    """
    from .ops.engine import target_row_lse
    from .ops.mixing import mixed_logits, top_negatives

    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be tensors")
    check_features("q", q, "k", k)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape (B, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if not isinstance(in_batch, bool):
        raise TypeError(f"in_batch must be a bool, got {type(in_batch).__name__}")
    if in_batch:
        if queue is not None:
            raise ValueError("in_batch=True takes the batch's own keys as the negatives: pass queue=None")
        negatives = k
    else:
        if queue is None:
            raise ValueError("mochi_loss needs a queue of negatives (K, D), or in_batch=True")
        check_features("q", q, "queue", queue)
        negatives = queue
    for name, value in (("temperature", temperature),):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    top_n, n_mix, n_query_mix = (_check_count(n, v) for n, v in
                                 (("top_n", top_n), ("n_mix", n_mix), ("n_query_mix", n_query_mix)))
    available = negatives.shape[0] - (1 if in_batch else 0)
    if top_n == 0 and (n_mix or n_query_mix):
        raise ValueError(f"top_n=0 turns mixing off, but n_mix={n_mix} and n_query_mix={n_query_mix} ask for it")
    if top_n > available:
        what = "the other keys of the batch" if in_batch else "the queue's K"
        raise ValueError(f"top_n={top_n} is more than {what}: {available} negatives")
    chunk_size = _check_chunk_size(chunk_size)
    b, dev = q.shape[0], q.device
    k_d, neg_d = k.detach(), negatives.detach()
    if mixes is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        mixes = _draw_mixes(b, top_n, n_mix, n_query_mix, generator, dev)
    else:
        mixes = _check_mixes(mixes, b, top_n, n_mix, n_query_mix, dev)
    acc = torch.promote_types(q.dtype, torch.float32)
    if backend == "reference":
        loss = reference.mochi_loss_reference(q.to(acc), k_d.to(acc), None if in_batch else neg_d.to(acc),
                                              mixes, temperature=temperature, top_n=top_n,
                                              in_batch=in_batch).to(q.dtype)
        return (loss, mixes) if return_mixes else loss
    scale = torch.tensor(1.0 / temperature, dtype=acc, device=dev)
    none = torch.full((b,), -1, dtype=torch.int64, device=dev)
    target = Target(none, torch.full((neg_d.shape[0],), -1, dtype=torch.int64, device=dev),
                    exclude_col=torch.arange(b, device=dev) if in_batch else None)
    lse_neg = target_row_lse(q, neg_d, scale, None, target, backend=backend, chunk_size=chunk_size)
    pos = (q.double() * k_d.double()).sum(1) / temperature
    extra = [pos[:, None]]
    if top_n and (n_mix or n_query_mix):
        top, top_vals = top_negatives(q, neg_d, top_n, exclude_own=in_batch)
        extra.append(mixed_logits(q, neg_d, top, top_vals, mixes["pair_ranks"], mixes["alpha"], mixes["query_ranks"],
                                  mixes["beta"]).double() / temperature)
    lse = torch.logaddexp(lse_neg, torch.logsumexp(torch.cat(extra, dim=1), dim=1))
    loss = (lse - pos).mean().to(q.dtype)
    return (loss, mixes) if return_mixes else loss


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
    for name, t in (("visual_tokens", visual_tokens), ("word_embeddings", word_embeddings)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (B, tokens, D) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
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
        if not isinstance(word_mask, torch.Tensor) or word_mask.dtype != torch.bool or \
                tuple(word_mask.shape) != tuple(e.shape[:2]):
            raise ValueError(f"word_mask must be a bool tensor of shape {tuple(e.shape[:2])}")
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


def topk_similarity(x: torch.Tensor, y: torch.Tensor, k: int, *, chunk_size: Optional[int] = None):
    """(values, indices), each (N, k): the ``k`` largest entries of each row of ``x·yᵀ`` (x (N, D),
    y (M, D)) and their columns, largest first, without the N×M matrix (docs/losses.md §4): rows in
    blocks, columns streamed in chunks, each block's running top-k merged with a chunk's candidates
    by a stable sort, so that exact ties in the computed values go to the lower index. Equal to
    ``torch.topk`` of the materialised matrix on data without near-ties. Memory O(N·k + block·chunk);
    no gradient. Values in at least fp32."""
    from .ops.mixing import top_negatives

    check_features("x", x, "y", y)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= y.shape[0]:
        raise ValueError(f"k must be an int in [1, {y.shape[0]}] (y's rows), got {k!r}")
    chunk_size = _check_chunk_size(chunk_size)
    n = x.shape[0]
    cols = max(k + 1, chunk_size or 8192)  # columns per chunk
    block = max(1, (32 << 20) // (4 * cols))  # rows per block: a 32 MiB chunk of similarities
    values, indices = [], []
    with torch.no_grad():
        for r0 in range(0, n, block):
            idx, vals = top_negatives(x[r0:r0 + block], y, k, chunk_cols=cols)
            values.append(vals)
            indices.append(idx)
    if not values:
        return x.new_empty((0, k), dtype=torch.promote_types(x.dtype, torch.float32)), \
            torch.empty((0, k), dtype=torch.int64, device=x.device)
    return torch.cat(values), torch.cat(indices)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10), *,
                     chunk_size: Optional[int] = None) -> dict:
    """Recall@k of paired sets in both directions (image i's match is text i): ``{"image_to_text":
    {k: fraction of images whose text is among the k most similar texts, ...}, "text_to_image": {...}}``,
    from ``topk_similarity`` (no N×N matrix; a tie at the k-th place goes to the lower index, which can
    count a match that a tie-breaking by chance would not). Similarities are the dot products of the
    features as given (normalise them first for cosine)."""
    check_features("image_features", image_features, "text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(f"retrieval_recall needs paired sets of one shape, got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    ks = tuple(ks)
    n = image_features.shape[0]
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n for k in ks):
        raise ValueError(f"ks must be ints in [1, {n}] (the number of pairs), got {ks}")
    top = max(ks)
    target = torch.arange(n, device=image_features.device)[:, None]
    out = {}
    for name, (a, b) in (("image_to_text", (image_features, text_features)),
                         ("text_to_image", (text_features, image_features))):
        _, idx = topk_similarity(a, b, top, chunk_size=chunk_size)
        hit = idx == target
        out[name] = {k: float(hit[:, :k].any(1).double().mean()) for k in ks}
    return out


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
    from .ops.engine import target_row_lse

    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (B, P, D) tensor")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape (B, P, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if detach not in ("key", "query", None):
        raise ValueError(f"detach must be 'key', 'query' or None, got {detach!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    b, p, d = q.shape
    if pos_mask is not None:
        if not isinstance(pos_mask, torch.Tensor) or pos_mask.dtype != torch.bool or tuple(pos_mask.shape) != (b, p, p):
            raise ValueError(f"pos_mask must be a bool tensor of shape {(b, p, p)}")
        if not bool(pos_mask.any()):
            raise ValueError("pos_mask has no positive pair")
    chunk_size = _check_chunk_size(chunk_size)
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
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (B, n, D) tensor")
        if first is None:
            first = (name, t)
        elif t.dtype != first[1].dtype or t.device != first[1].device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must have the dtype and device of {first[0]} "
                            f"({first[1].dtype}, {first[1].device})")
        shape = tuple(t.shape[:2])
        if mask is None:
            mask = torch.ones(shape, dtype=torch.bool, device=t.device)
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            raise ValueError(f"{mask_name} must be a bool tensor of shape {shape} (True: real)")
        if not _compiling():  # a data-dependent check: eager only (as check_scalar's finiteness check)
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
    chunk_size = _check_chunk_size(chunk_size)
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
    chunk_size = _check_chunk_size(chunk_size)
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
    if not isinstance(docs, torch.Tensor) or not isinstance(queries, torch.Tensor) or docs.dim() != 3 or \
            queries.dim() != 3:
        raise ValueError("queries and docs must be (B, n, D) tensors")
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
