"""Decoupled contrastive learning (Yeh et al., 2021; lightly's ``DCLLoss`` and ``DCLWLoss``;
docs/losses.md §1.7): NT-Xent with the positive left out of the denominator, and its von Mises-Fisher
weighting of the positive."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..ops import target_row_lse
from ..targets import Target
from ._checks import check_chunk_size, distributed_setup
from .._validation import check_features, check_temperature


def negative_mises_fisher_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """DCLW's weights of the positives (lightly's ``negative_mises_fisher_weights``): ``w_i = 2 −
    N·softmax_i(⟨out0_i, out1_i⟩ / σ)`` over the batch, on the detached inputs (no gradient), shape (N,).
    The mean of the weights is 1; a pair whose views agree more than the others' weighs less."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    sim = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    return 2.0 - out0.shape[0] * torch.softmax(sim, dim=0)


def _weights(weight_fn, a, b, n):
    """``weight_fn(a, b)`` checked: a tensor of n weights (with whatever gradient it carries)."""
    w = weight_fn(a, b)
    if not isinstance(w, torch.Tensor) or w.shape != (n,):
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weight_fn must return a tensor of one weight per pair, shape ({n},), got {shape}")
    return w


def dcl_loss(out0: torch.Tensor, out1: torch.Tensor, *, temperature: float = 0.1,
             weight_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
             process_group=None, backend: str = "auto", chunk_size: Optional[int] = None) -> torch.Tensor:
    """The decoupled contrastive loss of two views, lightly's ``DCLLoss`` (docs/losses.md §1.7).

    ``z0 = normalize(out0)``, ``z1 = normalize(out1)`` (N, D); over the columns ``C = [z0; z1]`` of
    every rank (M = W·N pairs, gathered with gradient under ``process_group``), row i of z0::

        ℓ0_i = −w0_i·(z0_i·z1_i)/τ + log Σ_{c ∈ C, c ∉ {z0_i, z1_i}} exp(z0_i·c/τ)

    (the positive and the row's own view left out of the denominator), ℓ1 the same from z1;
    ``L = ½·(mean_i ℓ0_i + mean_i ℓ1_i)``. ``weight_fn(z0, z1)`` gives w0 (and ``weight_fn(z1, z0)``
    w1), one weight per local pair, with any gradient it carries; None: all 1. DCLW is
    ``weight_fn = partial(negative_mises_fisher_weights, sigma=σ)``.

    The denominators are the engine's row LSE (``ops.target_row_lse``, both views' rows in one call,
    each row's own pair dropped by ownership), so no (N × 2M) matrix is formed: memory O(M·D + chunk·M).
    Returns a 0-d tensor in the inputs' dtype; gradients reach out0 and out1."""
    check_features("out0", out0, "out1", out1)
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have one shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
    temperature = check_temperature(temperature)
    if weight_fn is not None and not callable(weight_fn):
        raise TypeError(f"weight_fn must be a callable (out0, out1) -> weights, got {type(weight_fn).__name__}")
    chunk_size = check_chunk_size(chunk_size)
    group = distributed_setup(process_group, out0, out1, backend)
    n = out0.shape[0]
    rank, world = 0, 1
    if group is not None:
        from ..distributed import group_rank_and_size

        rank, world = group_rank_and_size(group)
    if n * world < 2:
        raise ValueError(f"the decoupled loss needs at least two pairs (the negatives are the other pairs' views), "
                         f"got {n * world}")
    z0, z1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    w0 = w1 = None
    if weight_fn is not None:
        w0, w1 = _weights(weight_fn, z0, z1, n), _weights(weight_fn, z1, z0, n)
    if backend == "reference":
        if group is not None:
            raise ValueError("backend='reference' has no distributed form")
        return reference.dcl_loss_reference(out0, out1, temperature=temperature, weights0=w0,
                                            weights1=w1).to(out0.dtype)
    c0, c1 = z0, z1
    if group is not None:
        from ..distributed import all_gather_with_grad

        c0, c1 = all_gather_with_grad(z0, group), all_gather_with_grad(z1, group)
    dev = out0.device
    m = c0.shape[0]
    own = torch.arange(n, device=dev) + rank * n  # each row's pair among the M
    item = torch.arange(m, device=dev)
    target = Target(torch.full((2 * n,), -1, dtype=torch.int64, device=dev),
                    torch.full((2 * m,), -1, dtype=torch.int64, device=dev),
                    row_owner=own.repeat(2), col_owner=item.repeat(2),
                    own_rule=torch.ones(2 * n, dtype=torch.int64, device=dev))  # rule 1: drop the own pair's views
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float64, device=dev)
    lse = target_row_lse(torch.cat([z0, z1]), torch.cat([c0, c1]), inv_t, None, target, backend=backend,
                         chunk_size=chunk_size)
    acc = torch.promote_types(out0.dtype, torch.float32)
    pos = (z0.to(acc) * z1.to(acc)).sum(dim=1) / temperature
    pos_w = 2 * pos if w0 is None else (w0 + w1) * pos
    loss = (lse.sum() - pos_w.sum().double()) / (2 * n)
    return loss.to(out0.dtype)
