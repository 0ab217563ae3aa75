"""Gradient caching: a contrastive loss over a large batch, computed once per optimizer step, while
the encoders only ever hold one micro-batch of activations (the GradCache method of Gao et al., 2021).

1. Every micro-batch is encoded without autograd (its RNG state is kept, so dropout replays exactly).
2. The embeddings of all micro-batches are concatenated and the loss is computed once, with gradients
   to the embeddings (and to whatever else the loss uses, e.g. the logit scale).
3. Every micro-batch is encoded again with autograd and its slice of the embedding gradients is
   back-propagated through the encoder.

The loss runs once per step, not once per micro-batch (open_clip's ``--accum-freq`` recomputes the
whole loss for every micro-batch), and with fastcon's losses it needs O(N·D) memory, so the batch is
bounded by the embeddings, not by the logits.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["cached_step"]

Embeddings = Union[torch.Tensor, Tuple[torch.Tensor, ...], List[torch.Tensor]]


def _as_tuple(out: Embeddings, what: str) -> Tuple[torch.Tensor, ...]:
    items = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{what} must return a tensor or a tuple of tensors, got {type(out).__name__}")
    return items


class _RngState:
    """The CPU and CUDA generator states at one point, to replay a forward with the same dropout."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def restored(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


def cached_step(
    encode: Callable[[Any], Embeddings],
    micro_batches: Sequence[Any],
    loss_fn: Callable[..., torch.Tensor],
    *,
    no_sync: Optional[Callable[[], ContextManager]] = None,
    preserve_rng: bool = True,
) -> torch.Tensor:
    """Back-propagates ``loss_fn`` over the concatenation of all micro-batches, one micro-batch of
    encoder activations at a time; returns the loss (detached). Call ``optimizer.step()`` after it.

    ``encode(micro_batch)`` returns the embeddings of one micro-batch: a tensor or a tuple of tensors
    (e.g. ``(image_features, text_features)``), each with the micro-batch as dim 0.
    ``loss_fn(*embeddings)`` receives the concatenated embeddings (same order) and returns a scalar;
    parameters it uses directly (a logit scale) receive their gradients as usual.
    ``no_sync``: e.g. ``ddp_model.no_sync``, entered for every replay but the last, so DDP reduces the
    gradients once. ``preserve_rng``: replay each micro-batch with the random state of its first
    forward (exact gradients with dropout).

    Example::

        def encode(batch):
            images, texts = batch
            return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)

        loss = fastcon.cached_step(encode, micro_batches,
                                   lambda img, txt: clip_loss(img, txt, model.logit_scale.exp()))
        optimizer.step(); optimizer.zero_grad()
    """
    if len(micro_batches) == 0:
        raise ValueError("micro_batches is empty")
    states: List[Optional[_RngState]] = []
    cached: List[Tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_RngState() if preserve_rng else None)
            cached.append(_as_tuple(encode(batch), "encode"))
    arity = len(cached[0])
    if any(len(c) != arity for c in cached):
        raise ValueError("encode returned a different number of tensors for different micro-batches")
    leaves = [torch.cat([c[k] for c in cached]).detach().requires_grad_() for k in range(arity)]
    loss = loss_fn(*leaves)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return a scalar tensor")
    loss.backward()
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    # Each output may have its own rows per micro-batch (e.g. k captions per image): slice per output.
    offsets = [[0] for _ in range(arity)]
    for c in cached:
        for k in range(arity):
            offsets[k].append(offsets[k][-1] + c[k].shape[0])
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (no_sync is None or last) else no_sync()
        rng = states[i].restored() if states[i] is not None else contextlib.nullcontext()
        with sync, rng:
            out = _as_tuple(encode(batch), "encode")
            if [t.shape for t in out] != [t.shape for t in cached[i]]:
                raise ValueError(
                    f"micro-batch {i} encoded to shapes {[tuple(t.shape) for t in out]} on replay but "
                    f"{[tuple(t.shape) for t in cached[i]]} the first time; encode must be deterministic in shape")
            pieces = [g[offsets[k][i]:offsets[k][i + 1]] for k, g in enumerate(grads)]
            pairs = [(t, g) for t, g in zip(out, pieces) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return loss.detach()
