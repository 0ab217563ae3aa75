"""Terms added to a contrastive loss on the same pairs: distillation from a teacher's soft targets
(open_clip's DistillClipLoss, HyCD, CWCL; docs/losses.md §1.3) and alignment and uniformity (§1.5)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import check_features, check_label_smoothing, check_scalar
from ..targets import TEACHER_LINEAR, Target, Teacher
from ..ops import target_engine_loss
from ._checks import check_chunk_size, check_common, check_modes, distributed_setup


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
    check_modes(local_loss, gather_with_grad)
    chunk_size = check_chunk_size(chunk_size)
    if kind == "hycd":
        scale, _ = check_common(image_features, text_features, 1.0, None)
    else:
        scale, _ = check_common(image_features, text_features, logit_scale, None)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"distill_loss needs paired batches: image_features has {image_features.shape[0]} rows, "
                         f"text_features {text_features.shape[0]}")
    tx = _check_teacher("teacher_image_features", teacher_image_features, image_features) if kind != "cwcl" \
        else None
    ty = _check_teacher("teacher_text_features", teacher_text_features, text_features,
                        own=kind == "cwcl" and teacher_text_features is text_features)
    if kind == "clip":
        teacher_scale = check_scalar("teacher_logit_scale", teacher_logit_scale, image_features.device)
    group = distributed_setup(process_group, image_features, text_features, backend)
    if backend == "reference":
        return reference.distill_loss_reference(
            image_features, text_features, scale, tx if tx is not None else ty, ty,
            teacher_logit_scale if kind == "clip" else None, kind=kind, alpha=alpha,
            temperature=temperature).to(image_features.dtype)
    acc = torch.promote_types(image_features.dtype, torch.float32)
    dev = image_features.device
    # the teacher's scale or weights, and the target's soft-target numbers, by kind
    if kind == "clip":
        teacher, numbers = dict(scale=teacher_scale.detach().to(device=dev, dtype=acc).reshape(())), dict(soft=1.0)
    elif kind == "hycd":
        scale = torch.tensor(1.0 / temperature, dtype=acc, device=dev)
        teacher, numbers = dict(scale=scale), dict(soft=1.0 - alpha, hard=alpha, entropy=True)
    else:  # CWCL's weights between the frozen modality's (unit) rows, for both directions
        tx = ty = torch.nn.functional.normalize(ty, dim=1)
        teacher, numbers = dict(kind=TEACHER_LINEAR, c0=0.5, c1=0.5, eps=1e-8), dict(soft=1.0)
    post = temperature ** 2 if kind == "hycd" else 1.0
    if group is not None:
        return post * _distill_distributed(image_features, text_features, scale, tx, ty, teacher, numbers, group=group,
                                           local_loss=local_loss, gather_with_grad=gather_with_grad,
                                           backend=backend, chunk_size=chunk_size)
    ids = torch.arange(image_features.shape[0], device=dev)
    target = Target(ids, ids, teacher=Teacher(tx, ty, **teacher), **numbers)
    return post * target_engine_loss(image_features, text_features, scale, None, target, symmetric=True,
                                     backend=backend, chunk_size=chunk_size)


def distill_clip_losses(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                        teacher_logit_scale, *, label_smoothing: float = 0.0, backend: str = "auto",
                        chunk_size: Optional[int] = None):
    """(``clip_loss``, ``distill_loss(kind="clip")``) of one process from one engine pass: both share the
    student's LSEs, the teacher's pass and pass 1 run once, and pass 2 once in the backward for the
    gradient of any weighting of the two (open_clip's DistillClipLoss on one process)."""
    from ..ops import target_pair_engine_loss

    scale, _ = check_common(image_features, text_features, logit_scale, None)
    eps = check_label_smoothing(label_smoothing)
    chunk_size = check_chunk_size(chunk_size)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"distillation needs paired batches: image_features has {image_features.shape[0]} rows, "
                         f"text_features {text_features.shape[0]}")
    tx = _check_teacher("teacher_image_features", teacher_image_features, image_features)
    ty = _check_teacher("teacher_text_features", teacher_text_features, text_features)
    teacher_scale = check_scalar("teacher_logit_scale", teacher_logit_scale, image_features.device)
    dev = image_features.device
    acc = torch.promote_types(image_features.dtype, torch.float32)
    ids = torch.arange(image_features.shape[0], device=dev)
    target = Target(ids, ids, teacher=Teacher(tx, ty, teacher_scale.detach().to(device=dev, dtype=acc).reshape(())),
                    soft=1.0)
    return target_pair_engine_loss(image_features, text_features, scale, None, target, label_smoothing=eps,
                                   backend=backend, chunk_size=chunk_size)


def _distill_distributed(x, y, scale, tx, ty, teacher, numbers, *, group, local_loss, gather_with_grad, backend,
                         chunk_size):
    """distill_loss on W ranks in open_clip's modes: ``local_loss=False``, the loss of the global batch
    on every rank (this rank's rows against the gathered columns, the column statistics of the
    student and of the teacher merged across ranks); ``local_loss=True``, open_clip's local form
    ½[soft CE of this rank's image rows over all texts + of its text rows over all images]."""
    from ..distributed import all_gather_no_grad, all_gather_with_grad, group_rank_and_size, target_loss_global
    from ..targets import rows_of

    rank, world = group_rank_and_size(group)
    n = x.shape[0]
    ids = torch.arange(world * n, device=x.device)
    all_tx, all_ty = all_gather_no_grad(tx, group), all_gather_no_grad(ty, group)
    if not local_loss:
        target = Target(ids, ids, teacher=Teacher(all_tx, all_ty, **teacher), **numbers)
        return target_loss_global(x, [y], scale, None, target, group=group, label_smoothing=0.0, symmetric=True,
                                  backend=backend, chunk_size=chunk_size, gather_with_grad=gather_with_grad)
    gather = all_gather_with_grad if gather_with_grad else all_gather_no_grad
    all_x, all_y = gather(x, group), gather(y, group)
    r0, r1 = rank * n, (rank + 1) * n
    i2t = rows_of(Target(ids, ids, teacher=Teacher(all_tx, all_ty, **teacher), **numbers), r0, r1)
    t2i = rows_of(Target(ids, ids, teacher=Teacher(all_ty, all_tx, **teacher), **numbers), r0, r1)
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
    chunk_size = check_chunk_size(chunk_size)
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
