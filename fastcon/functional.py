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
from ._validation import check_features, check_label_smoothing, check_labels, check_pos_offset, check_scalar
from .ops import clip_engine_loss, siglip_engine_loss
from .ops.engine import BACKENDS as _BACKENDS
from .ops.engine import target_engine_loss

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
    smoothing ε then spreads over the row's columns). Returns a 0-d tensor in the features' dtype
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
    for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if labels is not None:
        n = image_features.shape[0]
        if text_features.shape[0] != n or pos_offset != 0:
            raise ValueError(f"labels need paired batches with pos_offset=0: image_features has {n} rows, "
                             f"text_features {text_features.shape[0]}, pos_offset={pos_offset}")
        labels = check_labels("labels", labels, n, image_features.device)
        if process_group is not None:
            raise NotImplementedError("clip_loss(labels=...) with a process_group is not implemented yet")
        if backend == "reference":
            return reference.multi_positive_clip_loss_reference(
                image_features, text_features, scale, bias, labels=labels, label_smoothing=eps).to(image_features.dtype)
        return target_engine_loss(image_features, text_features, scale, bias, row_ids=labels, col_ids=labels,
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
    if process_group is not None:
        raise NotImplementedError("negatives_clip_loss with a process_group is not implemented yet")
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
    col_ids = torch.cat([ids, torch.full((b * k,), -1, dtype=torch.int64, device=dev)])
    col_keep = None
    if negative_mask is not None:
        col_keep = torch.cat([torch.ones(b, dtype=torch.bool, device=dev), negative_mask.reshape(b * k)])
    return target_engine_loss(image_features, columns, scale, bias, row_ids=ids, col_ids=col_ids, col_keep=col_keep,
                              pair_offset=0, margin=false_negative_margin, label_smoothing=eps,
                              backend=backend, chunk_size=chunk_size)


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
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """NT-Xent (SimCLR, SimCSE; lightly's ``NTXentLoss`` without a memory bank; docs/losses.md §1.4).

    ``Z = normalize([out0; out1])`` (2N, D), ``S = Z·Zᵀ/τ`` with the diagonal excluded, the positive of
    row i is row ``(i + N) mod 2N``; the cross-entropy averaged over the 2N rows. The engine never
    forms the 2N×2N matrix. Returns a 0-d tensor in the inputs' dtype (fp32 under autocast).
    """
    check_features("out0", out0, "out1", out1)
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have one shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    chunk_size = _check_chunk_size(chunk_size)
    if backend == "reference":
        return reference.ntxent_loss_reference(out0, out1, temperature=temperature).to(out0.dtype)
    n = out0.shape[0]
    z = torch.nn.functional.normalize(torch.cat([out0, out1]), dim=1)
    ids = torch.arange(n, device=z.device).repeat(2)
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float64, device=z.device)
    return target_engine_loss(z, z, inv_t, None, row_ids=ids, col_ids=ids, exclude_offset=0,
                              symmetric=False, backend=backend, chunk_size=chunk_size)
