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


def _no_distribution(process_group, loss):
    if process_group is not None:
        raise NotImplementedError(
            f"{loss}(process_group=...) is the distributed loss, which is not implemented yet "
            "(tracked as the 'distributed' issue); call it without process_group on each rank's local batch")


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    label_smoothing: float = 0.0,
    pos_offset: int = 0,
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
    """
    scale, bias = _check_common(image_features, text_features, logit_scale, logit_bias)
    eps = check_label_smoothing(label_smoothing)
    check_pos_offset(pos_offset, image_features.shape[0], text_features.shape[0])
    chunk_size = _check_chunk_size(chunk_size)
    _no_distribution(process_group, "clip_loss")
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
    """
    scale, bias = _check_common(image_features, text_features, logit_scale, logit_bias)
    if not isinstance(negative_only, bool):
        raise TypeError(f"negative_only must be a bool, got {type(negative_only).__name__}")
    if not negative_only:
        check_pos_offset(pos_offset, image_features.shape[0], text_features.shape[0])
    chunk_size = _check_chunk_size(chunk_size)
    _no_distribution(process_group, "siglip_loss")
    if backend == "reference":
        return reference.siglip_loss_reference(image_features, text_features, scale, bias, pos_offset=pos_offset,
                                               negative_only=negative_only).to(image_features.dtype)
    return siglip_engine_loss(image_features, text_features, scale, bias,
                              pos_offset=None if negative_only else pos_offset,
                              backend=backend, chunk_size=chunk_size)
