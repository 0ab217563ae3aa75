"""Matryoshka representation learning (docs/losses.md §2.7): a loss summed over nested prefixes of the
embeddings, ``Σ_k w_k · L(prefix_{d_k}(A), prefix_{d_k}(B))``. The argument checks and the prefixes
shared by the losses that take ``matryoshka_dims`` (MNRL, CLIP, SigLIP, GISTEmbed): on a backend with
the engine's prefix passes, all prefixes in one pass over D (``one_pass``; the prefix norms as row and
column scales, ``ops.prefix_scales``); elsewhere one engine call per prefix (``matryoshka_sum``)."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def check_matryoshka(dims, weights, d: int) -> Tuple[Tuple[int, ...], Tuple[float, ...]]:
    """``matryoshka_dims`` (strictly descending ints in [1, D]) and ``matryoshka_weights`` (finite
    numbers, one per dim; None: all 1) as tuples; a TypeError or ValueError naming what is wrong."""
    if isinstance(dims, (int, torch.Tensor)) or not isinstance(dims, Sequence):
        raise TypeError(f"matryoshka_dims must be a sequence of ints, got {type(dims).__name__}")
    dims = tuple(dims)
    if not dims:
        raise ValueError("matryoshka_dims must hold at least one dimension")
    for k in dims:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"matryoshka_dims must hold ints, got {k!r} ({type(k).__name__})")
    if any(k < 1 or k > d for k in dims):
        raise ValueError(f"matryoshka_dims must lie in [1, D={d}], got {list(dims)}")
    if any(x <= y for x, y in zip(dims, dims[1:])):
        raise ValueError(f"matryoshka_dims must be strictly descending (d₁ > d₂ > …), got {list(dims)}")
    if weights is None:
        return dims, (1.0,) * len(dims)
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    weights = tuple(weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights must have one weight per dim ({len(dims)}), got {len(weights)}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"matryoshka_weights must be finite numbers, got {w!r}")
    return dims, tuple(float(w) for w in weights)


def prefix(x: Optional[torch.Tensor], d: int, normalize: bool) -> Optional[torch.Tensor]:
    """The first ``d`` features of ``x`` (along its last dim), L2-normalised with ``normalize`` (in at
    least fp32, as sentence-transformers' ``shrink``; back in x's dtype)."""
    if x is None:
        return None
    x = x[..., :d]
    if not normalize:
        return x
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), p=2, dim=-1).to(x.dtype)


def one_pass(backend: str, x: torch.Tensor, operation: str = "target_prefix_stats") -> bool:
    """Whether the prefixes of a loss on ``x`` run in one engine pass over D: the backend that
    ``backend=`` resolves to has the prefix ``operation`` (``kernels.contract``: target_prefix_stats
    for the general target's losses, sigmoid_prefix_fused for SigLIP), and it is not the reference."""
    from ..ops import has_prefix_passes
    from ..ops.engine import autocast_gemm_dtype

    return backend != "reference" and has_prefix_passes(backend, x.device.type, autocast_gemm_dtype(x) or x.dtype,
                                                        operation)


def matryoshka_sum(loss_at: Callable[[int], torch.Tensor], dims, weights) -> torch.Tensor:
    """``Σ_k w_k · loss_at(d_k)``: the loss of every prefix, each on the engine."""
    total = None
    for d, w in zip(dims, weights):
        term = loss_at(d) * w
        total = term if total is None else total + term
    return total
