"""Argument checks shared by the loss families of ``fastcon.functional``: the features with their scale
and bias, ``chunk_size``, open_clip's distributed flags and the process group."""
from __future__ import annotations

from .._validation import check_features, check_scalar


def check_common(image_features, text_features, logit_scale, logit_bias, *, bias_required=False):
    check_features("image_features", image_features, "text_features", text_features)
    device = image_features.device
    scale = check_scalar("logit_scale", logit_scale, device)
    bias = check_scalar("logit_bias", logit_bias, device, required=bias_required)
    return scale, bias


def check_debias(debias) -> float:
    """The debiased loss's class prior τ⁺ (docs/losses.md §2.5): a float in [0, 1); 0 is the plain loss."""
    if isinstance(debias, bool) or not isinstance(debias, (int, float)):
        raise TypeError(f"debias must be a float in [0, 1), got {type(debias).__name__}")
    if not 0.0 <= debias < 1.0:
        raise ValueError(f"debias must be in [0, 1), got {debias}")
    return float(debias)


def check_chunk_size(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be a non-negative int (0 or None: automatic), got {chunk_size!r}")
    return chunk_size or None


def check_modes(local_loss, gather_with_grad):
    """open_clip's two distributed flags, bools."""
    for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def distributed_setup(process_group, image_features, text_features, backend):
    """None for a single-process call (no group, or a group of one); else the group, after checking
    that every rank holds the same number of pairs."""
    if process_group is None:
        return None
    from ..distributed import check_equal_batch, group_rank_and_size

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
