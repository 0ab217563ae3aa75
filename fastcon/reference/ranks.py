"""Distributed oracles: every rank of a torch.distributed job simulated in one process."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import siglip_loss_reference


def _check_rank_batches(image_features_per_rank, text_features_per_rank):
    world_size = len(image_features_per_rank)
    if world_size == 0 or len(text_features_per_rank) != world_size:
        raise ValueError(f"need one image and one text tensor per rank, got {len(image_features_per_rank)} "
                         f"image and {len(text_features_per_rank)} text tensors")
    image_sizes = [int(x.shape[0]) for x in image_features_per_rank]
    text_sizes = [int(y.shape[0]) for y in text_features_per_rank]
    if len(set(image_sizes + text_sizes)) != 1:
        raise ValueError(f"every rank needs the same local batch size; image rows per rank {image_sizes}, "
                         f"text rows per rank {text_sizes}")
    return world_size, image_sizes[0]


def _rank_leaves(tensors, dtype):
    return [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]


def _scalar_leaf(value, dtype):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):  # a Python number: no detour through fp32
        value = torch.tensor(float(value), dtype=torch.float64)
    return value.detach().to(dtype).clone().requires_grad_(True)


def _accumulate(total, grad):
    if grad is None:
        return total
    return grad.clone() if total is None else total + grad


def _rank_results(image_features_per_rank, text_features_per_rank, logit_scale, logit_bias, rank_loss,
                  upstream=None):
    """Runs ``rank_loss(r, images, texts, scale, bias) -> L_r`` for every rank r on fresh leaves (every
    rank's features, the scale and the bias, in the features' dtype promoted to at least fp32; bias None
    without one) and routes each rank's gradients home: what rank r's loss puts on rank q's features
    (possible only through a gather with autograd) is added to rank q's gradient, as the backward of such
    a gather (reduce-scatter SUM) does. The scale and bias gradients stay on the rank that computed the
    loss. ``upstream[r]`` is the gradient rank r back-propagates into its loss (default 1)."""
    world_size, _ = _check_rank_batches(image_features_per_rank, text_features_per_rank)
    acc = torch.promote_types(image_features_per_rank[0].dtype, torch.float32)
    grad_image = [None] * world_size
    grad_text = [None] * world_size
    results = []
    for r in range(world_size):
        images = _rank_leaves(image_features_per_rank, acc)
        texts = _rank_leaves(text_features_per_rank, acc)
        scale, bias = _scalar_leaf(logit_scale, acc), _scalar_leaf(logit_bias, acc)
        loss = rank_loss(r, images, texts, scale, bias)
        inputs = images + texts + [scale] + ([bias] if bias is not None else [])
        weight = torch.tensor(1.0 if upstream is None else float(upstream[r]), dtype=loss.dtype, device=loss.device)
        grads = torch.autograd.grad(loss, inputs, grad_outputs=weight, allow_unused=True)
        for q in range(world_size):
            grad_image[q] = _accumulate(grad_image[q], grads[q])
            grad_text[q] = _accumulate(grad_text[q], grads[world_size + q])
        grad_scale = grads[2 * world_size]
        grad_bias = grads[2 * world_size + 1] if bias is not None else None
        results.append({
            "loss": loss.detach(),
            "grad_scale": torch.zeros_like(scale) if grad_scale is None else grad_scale,
            "grad_bias": None if bias is None else (torch.zeros_like(bias) if grad_bias is None else grad_bias),
        })
    for r, res in enumerate(results):
        res["grad_image"] = grad_image[r] if grad_image[r] is not None else torch.zeros_like(images[r])
        res["grad_text"] = grad_text[r] if grad_text[r] is not None else torch.zeros_like(texts[r])
    return results


def clip_loss_ranks_reference(
    image_features_per_rank,
    text_features_per_rank,
    logit_scale,
    logit_bias=None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    label_smoothing: float = 0.0,
    upstream=None,
) -> list:
    """open_clip's ``ClipLoss(local_loss, gather_with_grad, rank=r, world_size=W)`` on every rank, in one
    process. Returns one dict per rank: ``loss``, ``grad_image``, ``grad_text``, ``grad_scale``,
    ``grad_bias`` (None without a bias), the values that rank sees after ``loss.backward()`` (upstream
    gradient ``upstream[r]``, default 1, on every rank; no DDP averaging).

    Rank r holds ``X_r``, ``Y_r`` (n, D), the same n on every rank; ``X_all = [X_0; …; X_{W−1}]`` (N = W·n
    rows), likewise ``Y_all``. Computed in the features' dtype promoted to at least fp32.

    - ``local_loss=True``: ``P_img = s·X_r·Y_allᵀ + b``, ``P_txt = s·Y_r·X_allᵀ + b``, labels
      ``r·n + i``. ``local_loss=False``: ``P_img = s·X_all·Y_allᵀ + b``, ``P_txt`` = the transpose of
      ``s·X_all·Y_allᵀ`` plus b (the bias enters once per direction; see the note below), labels ``i``.
    - ``L_r = ½·[CE(P_img, labels) + CE(P_txt, labels)]`` with ``label_smoothing`` as in
      ``F.cross_entropy`` (ε/N spread over the N classes of every row).
    - ``gather_with_grad=True``: the gather carries autograd, so rank r's feature gradient is
      ``Σ_q ∂L_q/∂X_r`` (reduce-scatter SUM). ``False``: the gathered copies carry no gradient; with
      ``local_loss=False`` open_clip puts the rank's own tensors back into its slot, so the gradient is
      ``∂L_r/∂X_r`` through that slot; with ``local_loss=True`` only through the local ``X_r``/``Y_r``
      factors of ``P_img``/``P_txt``.
      With W = 1 there is no gather (open_clip skips it) and every mode is ``clip_loss_reference``.
    - ``grad_scale``/``grad_bias`` of rank r are ``∂L_r/∂s``, ``∂L_r/∂b`` (no gather involved).

    Consequences (all tested): for ``local_loss=False`` every rank's loss is the global loss L of the
    concatenated batch; with ``gather_with_grad`` the feature gradients are W·∂L/∂X (both local modes),
    without it and ``local_loss=False`` they are ∂L/∂X; ``mean_r L_r = L`` with ``local_loss=True``.

    Note: open_clip adds the bias in place (``logits_per_image += b; logits_per_text += b``) after
    ``logits_per_text = logits_per_image.T``, so with ``world_size > 1, local_loss=False`` the two
    tensors alias and both directions get ``2b``. This oracle adds b once, as in every other mode. It
    makes no difference: a bias shared by all logits of a row cancels in the softmax, so the CLIP loss
    does not depend on b and ``∂L/∂b = 0`` (up to rounding) in every mode.
    """
    def rank_loss(r, images, texts, scale, bias):
        world_size, n = len(images), images[r].shape[0]
        if gather_with_grad or world_size == 1:  # open_clip gathers nothing on one rank
            gathered_images, gathered_texts = list(images), list(texts)
        else:  # dist.all_gather: values only
            gathered_images = [x.detach() for x in images]
            gathered_texts = [y.detach() for y in texts]
            if not local_loss:  # open_clip puts the local tensors back so that they get a gradient
                gathered_images[r], gathered_texts[r] = images[r], texts[r]
        all_images, all_texts = torch.cat(gathered_images), torch.cat(gathered_texts)
        if local_loss:
            logits_per_image = scale * (images[r] @ all_texts.T)
            logits_per_text = scale * (texts[r] @ all_images.T)
            labels = torch.arange(n, device=all_images.device) + r * n
        else:
            logits_per_image = scale * (all_images @ all_texts.T)
            logits_per_text = logits_per_image.T
            labels = torch.arange(world_size * n, device=all_images.device)
        if bias is not None:
            logits_per_image, logits_per_text = logits_per_image + bias, logits_per_text + bias
        return (F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
                + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)) / 2

    return _rank_results(image_features_per_rank, text_features_per_rank, logit_scale, logit_bias, rank_loss,
                         upstream)


def siglip_loss_ranks_reference(
    image_features_per_rank,
    text_features_per_rank,
    logit_scale,
    logit_bias=None,
    *,
    upstream=None,
) -> list:
    """open_clip's ``SigLipLoss(rank=r, world_size=W)`` on every rank, in one process (every ``dist_impl``
    computes this). Returns one dict per rank like ``clip_loss_ranks_reference``.

    ``L_r = (1/n)·Σ_ij softplus(−z_ij·(s·x_i·y_j + b))`` over ``X_r × Y_r`` with ``z = 2I − 1``, plus
    ``(1/n)·Σ_{q≠r} Σ_ij softplus(s·x_i·y^(q)_j + b)``: other ranks' text shards are negatives only. The
    shards travel with autograd, so rank r's text gradient is ``Σ_q ∂L_q/∂Y_r``, while its image, scale
    and bias gradients are ``∂L_r/∂·``. Hence ``Σ_r L_r = W·L`` and every feature gradient is ``W·∂L/∂·``
    for the global SigLIP loss L of the concatenated batch (divided by N = W·n).
    """
    def rank_loss(r, images, texts, scale, bias):
        loss = siglip_loss_reference(images[r], texts[r], scale, bias, upcast=False)
        for q in range(len(texts)):
            if q != r:
                loss = loss + siglip_loss_reference(images[r], texts[q], scale, bias, negative_only=True,
                                                    upcast=False)
        return loss

    return _rank_results(image_features_per_rank, text_features_per_rank, logit_scale, logit_bias, rank_loss,
                         upstream)

