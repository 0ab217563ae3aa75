"""Loss modules with open_clip's constructors, ``forward`` signatures and return types."""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from . import functional as FC
from ._validation import check_temperature

_SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_world(rank, world_size):
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def _init_open_clip(module, *, cache_labels, rank, world_size, process_group, backend, chunk_size):
    """Checks and stores what ``ClipLoss`` and ``SigLipLoss`` share: open_clip's ``cache_labels``,
    ``rank`` and ``world_size`` (``_check_world``), and fastcon's ``process_group``, ``backend`` and
    ``chunk_size``, as attributes of ``module``."""
    _check_world(rank, world_size)
    module.process_group = process_group
    module.cache_labels = cache_labels
    module.rank = rank
    module.world_size = world_size
    module.backend = backend
    module.chunk_size = chunk_size


def _group_for(module, process_group):
    """The process group of a module with world_size > 1, checked against its rank and world_size."""
    if module.world_size == 1:
        return None
    import torch.distributed as dist

    from .distributed import group_rank_and_size

    group = process_group if process_group is not None else dist.group.WORLD
    rank, world = group_rank_and_size(group)
    if (rank, world) != (module.rank, module.world_size):
        raise ValueError(
            f"{type(module).__name__}(rank={module.rank}, world_size={module.world_size}) does not match the "
            f"process group, where this process is rank {rank} of {world}")
    return group


def _check_paired(module, image_features, text_features):
    """open_clip's modules take N matched pairs: an unpaired batch is an error, as it is there."""
    if (isinstance(image_features, torch.Tensor) and isinstance(text_features, torch.Tensor)
            and image_features.dim() == 2 and text_features.dim() == 2
            and image_features.shape[0] != text_features.shape[0]):
        name = type(module).__name__
        raise ValueError(
            f"{name} needs paired batches: image_features has {image_features.shape[0]} rows but "
            f"text_features has {text_features.shape[0]} (open_clip's {name} takes N matched pairs). "
            f"For a rectangular batch use fastcon.functional.{'clip_loss' if isinstance(module, ClipLoss) else 'siglip_loss'}"
            f" with an explicit pos_offset (text row pos_offset + i is image row i's positive).")


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss``: symmetric InfoNCE at O(N·D) memory.

    ``forward(image_features (N, D), text_features (N, D), logit_scale, logit_bias=None,
    output_dict=False)`` returns ``L = ½·[CE(S, i) + CE(Sᵀ, i)]`` with ``S = s·X·Yᵀ + b`` (``b = 0``
    without a bias) as a 0-d tensor, or ``{"contrastive_loss": L}``. ``logit_scale`` is the
    exponentiated scale, as open_clip passes it. The batch must be paired (the same N on both sides,
    as in open_clip; a ``ValueError`` otherwise): the rectangular form is
    ``fastcon.functional.clip_loss(..., pos_offset=...)``.

    The positional parameters are open_clip's, in its order and with its defaults. The four
    ``(local_loss, gather_with_grad)`` modes give each rank open_clip's loss and gradients; see
    ``fastcon.functional.clip_loss``. ``cache_labels`` is accepted for compatibility (there are no
    labels to cache); ``use_horovod=True`` is a ``ValueError`` (use torch.distributed).
    Keyword-only extras: ``label_smoothing``, ``backend`` (see ``fastcon.functional``), ``chunk_size``,
    ``process_group`` (default: the world group when ``world_size > 1``); and of ``forward``,
    ``labels`` (N integer class ids: pairs sharing an id are positives of one another, see
    ``fastcon.functional.clip_loss``; with ``world_size > 1`` each rank passes the ids of its own pairs).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, label_smoothing: float = 0.0,
                 backend: str = "auto", chunk_size: Optional[int] = None, process_group=None):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss(use_horovod=True) is not supported by fastcon: horovod is not used; "
                             "run under torch.distributed (the world group, or pass process_group=)")
        _init_open_clip(self, cache_labels=cache_labels, rank=rank, world_size=world_size,
                        process_group=process_group, backend=backend, chunk_size=chunk_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.use_horovod = use_horovod
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False, *,
                labels=None):
        _check_paired(self, image_features, text_features)
        loss = FC.clip_loss(image_features, text_features, logit_scale, logit_bias, labels=labels,
                            label_smoothing=self.label_smoothing, local_loss=self.local_loss,
                            gather_with_grad=self.gather_with_grad, process_group=_group_for(self, self.process_group),
                            backend=self.backend, chunk_size=self.chunk_size)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """Drop-in for open_clip's ``DistillClipLoss`` (its constructor, ClipLoss's): the student's CLIP loss
    and the distillation term against a teacher, at O(N·D) memory.

    ``forward(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
    dist_logit_scale, output_dict=False)`` returns ``(contrastive_loss, distill_loss)``, or a dict with
    those keys: the contrastive loss as ``ClipLoss``, the distillation term
    ``½[softCE(S, softmax_row(T)) + softCE(Sᵀ, softmax_row(Tᵀ))]`` with ``T = s_t·X̃·Ỹᵀ`` (the teacher
    detached; ``fastcon.functional.distill_loss(kind="clip")``, docs/losses.md §1.3). With
    ``world_size > 1`` both terms follow open_clip's ``(local_loss, gather_with_grad)`` modes: each rank
    gets open_clip's losses and gradients (the teacher's features are gathered without gradient). On
    one process both come from one engine pass (``fastcon.functional.distill_clip_losses``): they share
    the student's LSEs, and the gradient pass runs once in the backward for any weighting of the two.
    """

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict: bool = False):
        group = _group_for(self, self.process_group)
        if group is None and self.backend != "reference":  # one engine pass for both
            _check_paired(self, image_features, text_features)
            contrastive, distill = FC.distill_clip_losses(
                image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
                label_smoothing=self.label_smoothing, backend=self.backend, chunk_size=self.chunk_size)
            if output_dict:
                return {"contrastive_loss": contrastive, "distill_loss": distill}
            return contrastive, distill
        contrastive = super().forward(image_features, text_features, logit_scale)
        distill = FC.distill_loss(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                                  dist_logit_scale, kind="clip", local_loss=self.local_loss,
                                  gather_with_grad=self.gather_with_grad,
                                  process_group=group, backend=self.backend, chunk_size=self.chunk_size)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's ``SigLipLoss``: the sigmoid loss at O(N·D) memory.

    ``forward(image_features (N, D), text_features (N, D), logit_scale, logit_bias, output_dict=False)``
    returns ``L = −(1/N)·Σ_ij log σ(z_ij·(s·x_i·y_j + b))`` with ``z = 2I − 1`` (a 0-d tensor), or
    ``{"contrastive_loss": L}``. ``logit_bias`` is required, as in open_clip (which initialises it to
    −10; ``s`` to 10); ``None`` is a ``ValueError``. The batch must be paired (the same N on both
    sides; a ``ValueError`` otherwise): the rectangular form is
    ``fastcon.functional.siglip_loss(..., pos_offset=...)``.

    The positional parameters are open_clip's, in its order and with its defaults. With
    ``world_size > 1`` every ``dist_impl`` computes the same loss and gradients (a ring exchange of
    the text shards; the name is accepted for compatibility). ``cache_labels`` is accepted for
    compatibility. Keyword-only extras: ``chunk_size`` (rows per chunk, 0 = automatic; bounds the
    working memory of forward *and* backward), ``backend``, ``process_group``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, chunk_size: int = 0, backend: str = "auto",
                 process_group=None):
        super().__init__()
        _init_open_clip(self, cache_labels=cache_labels, rank=rank, world_size=world_size,
                        process_group=process_group, backend=backend, chunk_size=chunk_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in _SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {_SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        self.dist_impl = dist_impl

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        if logit_bias is None:
            raise ValueError("SigLipLoss needs logit_bias (a learnable scalar; open_clip initialises it to -10). "
                             "For the loss without a bias use fastcon.functional.siglip_loss(..., logit_bias=None)")
        _check_paired(self, image_features, text_features)
        loss = FC.siglip_loss(image_features, text_features, logit_scale, logit_bias,
                              process_group=_group_for(self, self.process_group),
                              backend=self.backend, chunk_size=self.chunk_size)
        return {"contrastive_loss": loss} if output_dict else loss


class _MemoryBank(nn.Module):
    """A FIFO of past ``out1`` vectors (lightly's memory bank): ``bank`` (size, dim), initialised with
    random unit rows, and ``bank_ptr``, where the next batch is written. A batch that reaches the end
    fills the bank up to it, the rest of that batch is dropped, and the pointer returns to 0."""

    def __init__(self, size, gather_distributed: bool):
        super().__init__()
        self.size = size
        self.gather_distributed = gather_distributed
        self.register_buffer("bank", torch.empty(size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        with torch.no_grad():
            self.bank = nn.functional.normalize(torch.randn(size).type_as(self.bank), dim=-1)

    @torch.no_grad()
    def enqueue(self, batch: torch.Tensor) -> None:
        import torch.distributed as dist

        if self.gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from .distributed import all_gather_no_grad

            batch = all_gather_no_grad(batch, dist.group.WORLD)
        n, ptr, size = batch.shape[0], int(self.bank_ptr), self.size[0]
        if ptr + n >= size:
            self.bank[ptr:] = batch[:size - ptr].detach().to(self.bank)
            self.bank_ptr.zero_()
        else:
            self.bank[ptr:ptr + n] = batch.detach().to(self.bank)
            self.bank_ptr[0] = ptr + n


def _bank_size(memory_bank_size):
    """lightly 1.6's ``memory_bank_size``: 0 (no bank) or a (num_features, dim) tuple."""
    if isinstance(memory_bank_size, bool):
        raise TypeError("memory_bank_size must be 0 or a (num_features, dim) tuple, got a bool")
    if isinstance(memory_bank_size, int):
        if memory_bank_size < 0:
            raise ValueError(f"Illegal memory bank size {memory_bank_size}, all entries must be non-negative.")
        if memory_bank_size > 0:
            raise ValueError(
                f"memory_bank_size={memory_bank_size} does not give the feature dimension: pass "
                f"memory_bank_size=({memory_bank_size}, dim), or 0 for no memory bank (as lightly >= 1.6)")
        return None
    if isinstance(memory_bank_size, (str, bytes)):
        raise TypeError(f"memory_bank_size must be 0 or a (num_features, dim) tuple, got {memory_bank_size!r}")
    try:
        size = tuple(int(x) for x in memory_bank_size)
    except (TypeError, ValueError):
        raise TypeError(f"memory_bank_size must be 0 or a (num_features, dim) tuple, got "
                        f"{type(memory_bank_size).__name__}") from None
    if len(size) != 2 or any(x < 0 for x in size):
        raise ValueError(f"Illegal memory bank size {memory_bank_size}: expected (num_features, dim) >= 0")
    return None if size[0] == 0 else size


class NTXentLoss(nn.Module):
    """NT-Xent (SimCLR; with a memory bank, MoCo's form) with lightly's constructor and ``forward``
    (docs/losses.md §1.4), on the engine (``fastcon.functional.ntxent_loss``), never forming 2N×2N.

    ``forward(out0, out1)``, each (N, D), L2-normalised inside. Without a bank: 2N rows, row i's
    positive its other view, its own similarity excluded, CE averaged over the 2N rows; with
    ``gather_distributed=True`` the columns are every rank's views (gathered with gradient; each
    rank's loss and gradients are lightly's). With ``memory_bank_size=(K, dim)``: each row of out0
    against its positive in out1 and the bank's K vectors only (no in-batch negatives, no gradient into
    the bank); the bank, a FIFO of normalised ``out1``, is updated after it is read, and only when
    ``out0`` requires grad (so that evaluating the loss leaves it unchanged). The bank is the module's
    state (``memory_bank.bank``, ``memory_bank.bank_ptr``), as in lightly.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False, *,
                 backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not temperature > 1e-8 or temperature == float("inf"):
            raise ValueError(f"Illegal temperature {temperature}: it must be a finite number > 1e-8")
        size = _bank_size(memory_bank_size)
        self.temperature = float(temperature)
        self.gather_distributed = _check_gather(gather_distributed)
        self.memory_bank = _MemoryBank(size, self.gather_distributed) if size is not None else None
        self.backend, self.chunk_size = backend, chunk_size

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        kw = dict(temperature=self.temperature, backend=self.backend, chunk_size=self.chunk_size)
        if self.memory_bank is not None:
            if out1.dim() != 2 or out1.shape[1] != self.memory_bank.size[1]:
                raise ValueError(f"out1 has shape {tuple(out1.shape)}; the memory bank holds vectors of dim "
                                 f"{self.memory_bank.size[1]}")
            negatives = self.memory_bank.bank.clone().to(out0.device)
            loss = FC.ntxent_loss(out0, out1, negatives=negatives, **kw)
            if out0.requires_grad:
                self.memory_bank.enqueue(nn.functional.normalize(out1.detach(), dim=1))
            return loss
        return FC.ntxent_loss(out0, out1, process_group=_world_group(self.gather_distributed), **kw)


def _world_group(gather_distributed: bool):
    """The default process group when ``gather_distributed`` and more than one rank runs, else None."""
    if not gather_distributed:
        return None
    import torch.distributed as dist

    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def _check_gather(gather_distributed) -> bool:
    """``gather_distributed`` as a bool, after checking that torch.distributed exists where it is asked
    for."""
    gather_distributed = bool(gather_distributed)
    if gather_distributed:
        import torch.distributed as dist

        if not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch lacks")
    return gather_distributed


class DCLLoss(nn.Module):
    """Decoupled contrastive learning (Yeh et al., 2021) with lightly's constructor and ``forward``
    (docs/losses.md §1.7), on the engine (``fastcon.functional.dcl_loss``), never forming the N×2N
    similarities.

    ``forward(out0, out1)``, each (N, D), L2-normalised inside: row i of each view against every
    other pair's two views (its own positive left out of the denominator), minus its weighted
    positive ``w_i·(z0_i·z1_i)/τ``; the mean over the rows, averaged over the two directions.
    ``weight_fn(out0, out1) -> (N,)`` weighs the positives (None: 1). With ``gather_distributed=True``
    the negatives are every rank's views, gathered with gradient (each rank's loss and gradients are
    lightly's)."""

    def __init__(self, temperature: float = 0.1, weight_fn=None, gather_distributed: bool = False, *,
                 backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        check_temperature(temperature)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be a callable (out0, out1) -> weights, got {type(weight_fn).__name__}")
        self.temperature = float(temperature)
        self.weight_fn = weight_fn
        self.gather_distributed = _check_gather(gather_distributed)
        self.backend, self.chunk_size = backend, chunk_size

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        return FC.dcl_loss(out0, out1, temperature=self.temperature, weight_fn=self.weight_fn,
                           process_group=_world_group(self.gather_distributed), backend=self.backend,
                           chunk_size=self.chunk_size)


class DCLWLoss(DCLLoss):
    """Weighted decoupled contrastive learning with lightly's constructor: ``DCLLoss`` whose positives
    are weighted by the negative von Mises-Fisher weights ``w_i = 2 − N·softmax_i(z0_i·z1_i/σ)``
    (``fastcon.functional.negative_mises_fisher_weights``, no gradient through them)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 backend: str = "auto", chunk_size: Optional[int] = None):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        super().__init__(temperature, functools.partial(FC.negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed, backend=backend, chunk_size=chunk_size)
        self.sigma = sigma


def _check_coca_weight(name, value):
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (int or float), got {type(value).__name__}")
    return value


def _check_caption(logits, labels):
    """CoCa's captioning inputs: logits (B, T, V) floating, labels (B, T) integer token ids (cast to int64,
    which cross_entropy needs)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a tensor of shape (B, T, V), got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer tensor of shape (B, T), got {type(labels).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V) (batch, tokens, vocabulary), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, T) (batch, tokens), got {tuple(labels.shape)}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes differ: logits has {logits.shape[0]} rows (shape {tuple(logits.shape)}) but "
                         f"labels has {labels.shape[0]} (shape {tuple(labels.shape)})")
    if labels.shape[1] != logits.shape[1]:
        raise ValueError(f"token counts differ: logits has T={logits.shape[1]} (shape {tuple(logits.shape)}) but "
                         f"labels has T={labels.shape[1]} (shape {tuple(labels.shape)})")
    return labels if labels.dtype == torch.long else labels.long()


class CoCaLoss(ClipLoss):
    """Drop-in for open_clip's ``CoCaLoss`` (its constructor, ``forward`` and return types): the CLIP loss
    on the engine, at O(N·D) memory, beside CoCa's captioning cross-entropy.

    ``forward(image_features (N, D), text_features (N, D), logits (B, T, V), labels (B, T), logit_scale,
    output_dict=False)`` returns ``(w_clip·L_clip, w_cap·L_cap)``, or ``{"contrastive_loss": w_clip·L_clip,
    "caption_loss": w_cap·L_cap}``, with ``w_clip = clip_loss_weight``, ``w_cap = caption_loss_weight``:

    - ``L_clip = ½·[CE(S, i) + CE(Sᵀ, i)]``, ``S = s·X·Yᵀ``: ``ClipLoss.forward(image_features,
      text_features, logit_scale)``, so every ``(local_loss, gather_with_grad)`` mode and the keyword-only
      extras (``label_smoothing``, ``backend``, ``chunk_size``, ``process_group``) act as in ``ClipLoss``;
    - ``L_cap = −(1/|M|)·Σ_{(b,t)∈M} log softmax(z_bt)[y_bt]`` over the tokens
      ``M = {(b, t) : y_bt ≠ pad_id}``, ``z = logits``, ``y = labels``: open_clip's
      ``nn.CrossEntropyLoss(ignore_index=pad_id)`` on ``logits.permute(0, 2, 1)`` (the ``caption_loss``
      attribute, as there), materialised as there (B·T·V) and computed on each rank's own batch; NaN when
      every token is ``pad_id``, as in torch. ``label_smoothing`` does not apply to it (open_clip has none).

    With a falsy ``clip_loss_weight`` the contrastive loss is not computed (no collective runs, the
    features are not read) and is ``torch.tensor(0, device=logits.device)``: an **int64** 0-d zero, exactly
    open_clip's value (a sum with the float caption loss is float). ``labels`` of any integer dtype are
    accepted (cast to int64; open_clip's cross-entropy takes int64 only). Bad inputs are a ``TypeError`` or
    ``ValueError`` naming the argument: ``logits`` not (B, T, V) floating, ``labels`` not (B, T) integer,
    batch or token counts that differ, ``pad_id`` not an int, weights not numbers. docs/losses.md §1.6.
    """

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id: int = 0, local_loss: bool = False,
                 gather_with_grad: bool = False, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, label_smoothing: float = 0.0, backend: str = "auto",
                 chunk_size: Optional[int] = None, process_group=None):
        import numbers

        _check_coca_weight("caption_loss_weight", caption_loss_weight)
        _check_coca_weight("clip_loss_weight", clip_loss_weight)
        if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral):
            raise TypeError(f"pad_id must be an int (the padding token id), got {type(pad_id).__name__}")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod, label_smoothing=label_smoothing,
                         backend=backend, chunk_size=chunk_size, process_group=process_group)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=int(pad_id))

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict: bool = False):
        labels = _check_caption(logits, labels)
        if self.clip_loss_weight:
            if (isinstance(image_features, torch.Tensor) and isinstance(text_features, torch.Tensor)
                    and image_features.dim() == 2 and text_features.dim() == 2
                    and image_features.shape[0] != text_features.shape[0]):
                raise ValueError(
                    f"CoCaLoss needs paired batches: image_features has {image_features.shape[0]} rows but "
                    f"text_features has {text_features.shape[0]} (open_clip's CoCaLoss takes N matched pairs). "
                    f"For a rectangular batch use fastcon.functional.clip_loss with an explicit pos_offset.")
            clip_loss = super().forward(image_features, text_features, logit_scale)
            clip_loss = self.clip_loss_weight * clip_loss
        else:
            clip_loss = torch.tensor(0, device=logits.device)  # open_clip's int64 zero
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels)
        caption_loss = caption_loss * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


class MoCHiLoss(nn.Module):
    """MoCHi's hard negative mixing (docs/losses.md §2.2) as a module: ``forward(q, k, queue=None, *,
    generator=None, mixes=None, return_mixes=False)`` returns
    ``fastcon.functional.mochi_loss(q, k, queue, ...)`` with this module's settings: the InfoNCE of the
    queries ``q`` (B, D) against their keys ``k`` (B, D), the queue (K, D) and, per query, ``n_mix``
    synthetic negatives mixed from pairs of its ``top_n`` hardest and ``n_query_mix`` mixed from itself
    and one of them, at ``temperature``. Defaults are the paper's (N, s, s′) = (1024, 1024, 128) and
    MoCo v2's τ = 0.2. ``in_batch=True`` takes the batch's other keys as the negatives (no queue)."""

    def __init__(self, temperature: float = 0.2, top_n: int = 1024, n_mix: int = 1024, n_query_mix: int = 128, *,
                 in_batch: bool = False, backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature, self.top_n, self.n_mix, self.n_query_mix = temperature, top_n, n_mix, n_query_mix
        self.in_batch, self.backend, self.chunk_size = in_batch, backend, chunk_size

    def forward(self, q, k, queue=None, *, generator=None, mixes=None, return_mixes: bool = False):
        return FC.mochi_loss(q, k, queue, temperature=self.temperature, top_n=self.top_n, n_mix=self.n_mix,
                             n_query_mix=self.n_query_mix, generator=generator, mixes=mixes,
                             return_mixes=return_mixes, in_batch=self.in_batch, backend=self.backend,
                             chunk_size=self.chunk_size)


class FILIPLoss(nn.Module):
    """FILIP's token-wise late-interaction loss as a module: ``forward(patches, tokens, logit_scale,
    token_mask=None, patch_mask=None)`` returns ``fastcon.functional.filip_loss`` (docs/losses.md §3.1)
    with this module's ``label_smoothing``, ``backend`` and ``chunk_size``."""

    def __init__(self, *, label_smoothing: float = 0.0, backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        self.label_smoothing, self.backend, self.chunk_size = label_smoothing, backend, chunk_size

    def forward(self, patches, tokens, logit_scale, token_mask=None, patch_mask=None):
        return FC.filip_loss(patches, tokens, logit_scale, token_mask=token_mask, patch_mask=patch_mask,
                             label_smoothing=self.label_smoothing, backend=self.backend, chunk_size=self.chunk_size)


class MaxSimLoss(nn.Module):
    """The in-batch contrastive MaxSim loss of ColBERT/ColPali training (PyLate's ``Contrastive`` on
    precomputed embeddings) as a module: ``forward(queries, docs, query_mask=None, doc_mask=None,
    negatives=None, negatives_mask=None)`` returns ``fastcon.functional.maxsim_loss`` (docs/losses.md
    §3.4) with ``scale`` = 1/temperature (PyLate's default temperature is 1)."""

    def __init__(self, *, scale: float = 1.0, backend: str = "auto", chunk_size: Optional[int] = None):
        super().__init__()
        self.scale, self.backend, self.chunk_size = scale, backend, chunk_size

    def forward(self, queries, docs, query_mask=None, doc_mask=None, negatives=None, negatives_mask=None):
        return FC.maxsim_loss(queries, docs, query_mask=query_mask, doc_mask=doc_mask, scale=self.scale,
                              negatives=negatives, negatives_mask=negatives_mask, backend=self.backend,
                              chunk_size=self.chunk_size)
