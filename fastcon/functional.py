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
from ._validation import check_features, check_label_smoothing, check_pos_offset, check_scalar
from .ops import clip_engine_loss, siglip_engine_loss

__all__ = ["clip_loss", "siglip_loss"]


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
    ``(1−ε)·onehot + ε/n_classes`` of ``F.cross_entropy``. Returns a 0-d tensor in the features' dtype
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
