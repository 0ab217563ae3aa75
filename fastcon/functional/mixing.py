"""Losses that mix embeddings on the sphere: ``slerp``, m²-mix (geodesic multimodal mixup;
docs/losses.md §2.3) and MoCHi's hard negative mixing (§2.2) with its draws."""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import check_features, check_temperature
from ..targets import Target
from ._checks import check_chunk_size


def _slerp_eps(dtype: torch.dtype) -> float:
    """The clamp of the cosine in ``slerp``: sin θ stays >= sqrt(2·eps) (about 1.4e-3 in fp32)."""
    return 1e-6 if dtype in (torch.float32, torch.bfloat16, torch.float16) else 1e-12


def slerp(a: torch.Tensor, b: torch.Tensor, lam) -> torch.Tensor:
    """Spherical interpolation of unit rows ``a``, ``b`` (..., D) (docs/losses.md §2.3)::

        slerp(a, b; λ) = [sin(λθ)·a + sin((1−λ)θ)·b] / sin θ,   θ = arccos(a·b)

    (λ weighs ``a``: λ = 1 gives ``a``). The cosine is clamped to [−1+ε, 1−ε] (ε = 1e-6 in fp32 and
    below, 1e-12 in float64), and where ``a·b > 1−ε`` (θ → 0) the rows are interpolated linearly and
    normalised instead: the value and its gradient stay finite at θ → 0 and θ → π. ``lam``: a float
    in [0, 1] or a tensor broadcasting against (..., 1) (it may require grad). Returns (..., D) in the
    inputs' dtype, computed in at least fp32."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("slerp takes tensors a and b")
    if a.shape != b.shape or a.dim() < 1:
        raise ValueError(f"slerp needs a and b of one shape (..., D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise TypeError(f"slerp needs floating-point a and b of one dtype, got {a.dtype} and {b.dtype}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float, torch.Tensor)):
        raise TypeError(f"lam must be a float or a tensor, got {type(lam).__name__}")
    if not isinstance(lam, torch.Tensor) and not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    acc = torch.promote_types(a.dtype, torch.float32)
    x, y = a.to(acc), b.to(acc)
    lam = lam.to(acc) if isinstance(lam, torch.Tensor) else lam
    eps = _slerp_eps(a.dtype)
    dot = (x * y).sum(-1, keepdim=True)
    tiny = dot > 1.0 - eps
    theta = torch.acos(dot.clamp(-1.0 + eps, 1.0 - eps))
    arc = (torch.sin(lam * theta) * x + torch.sin((1 - lam) * theta) * y) / torch.sin(theta)
    line = torch.nn.functional.normalize(lam * x + (1 - lam) * y, dim=-1)
    return torch.where(tiny, line, arc).to(a.dtype)


def _m2mix_direction(rows, mixed, pos_logit, scale, *, backend, chunk_size):
    """CE over rows i of ``[rows_i·mixed_j·scale (j ≠ i), pos_logit_i]``, target the last: each row's LSE
    over the mixed columns but its own (the engine's row LSE), joined with its positive logit given
    from outside the tile (O(N) autograd)."""
    from ..ops import target_row_lse

    n = rows.shape[0]
    idx = torch.arange(n, device=rows.device)
    none = torch.full((n,), -1, dtype=torch.int64, device=rows.device)
    lse = target_row_lse(rows, mixed, scale, None, Target(none, none, exclude_col=idx), backend=backend,
                         chunk_size=chunk_size)
    return (torch.logaddexp(lse, pos_logit) - pos_logit).mean()


def m2mix_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    lam=None,
    beta: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    temperature: float = 0.07,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """m²-mix, geodesic multimodal mixup (docs/losses.md §2.3), without the N×N matrices::

        m_j = slerp(x_j, y_j; λ)
        A_ij = x_i·m_j,  C_ij = y_i·m_j  (i ≠ j);  A_ii = C_ii = x_i·y_i
        L = CE(A/τ, i) + CE(C/τ, i)      (a sum, as the paper's code; each CE the mean over rows)

    ``image_features`` x and ``text_features`` y (N, D) are unit rows (normalise them first, as CLIP
    does). The gradients flow through the interpolation into x and y. ``lam``: a float in [0, 1] or a
    0-d tensor; with ``lam=None`` one ``λ ~ Beta(beta, beta)`` is drawn per call from ``generator`` (or
    torch's global generator), and ``beta`` is required. The paper adds ``w·L`` (w = 0.01) to the CLIP
    loss. On the engine each CE is the row LSE over the mixed columns but the row's own
    (``ops.target.target_row_lse``: one N×N pass of GEMMs, memory O(N·D)), joined in O(N) with the
    positive logit ``x_i·y_i/τ`` given from outside the tile. Returns a 0-d tensor in the features'
    dtype.
    """
    check_features("image_features", image_features, "text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(f"m2mix_loss needs paired batches of one shape, got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    check_temperature(temperature)
    chunk_size = check_chunk_size(chunk_size)
    if lam is None:
        if beta is None:
            raise ValueError("m2mix_loss(lam=None) draws λ ~ Beta(beta, beta): pass beta (the paper's code uses "
                             "0.1 to 1), or a fixed lam")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < float("inf"):
            raise ValueError(f"beta must be a positive finite number, got {beta!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lam = float(torch.distributions.Beta(float(beta), float(beta)).sample())
    elif isinstance(lam, torch.Tensor):
        if lam.dim() != 0 or not lam.is_floating_point():
            raise ValueError(f"lam must be a 0-d floating-point tensor, got shape {tuple(lam.shape)}, {lam.dtype}")
    elif isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float in [0, 1] or a 0-d tensor, got {type(lam).__name__}")
    elif not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    x, y = image_features, text_features
    if backend == "reference":
        return reference.m2mix_loss_reference(x, y, lam, temperature=temperature, slerp=slerp)
    m = slerp(x, y, lam)
    acc = torch.promote_types(x.dtype, torch.float32)
    scale = torch.tensor(1.0 / temperature, dtype=acc, device=x.device)
    # the replaced diagonal of both products, in float64 beside the float64 row LSEs (the loss cancels)
    pos = (x.double() * y.double()).sum(1) / temperature
    loss = (_m2mix_direction(x, m, pos, scale, backend=backend, chunk_size=chunk_size)
            + _m2mix_direction(y, m, pos, scale, backend=backend, chunk_size=chunk_size))
    return loss.to(x.dtype)


_MIX_KEYS = ("pair_ranks", "alpha", "query_ranks", "beta")


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def draw_mixes(b, top_n, n_mix, n_query_mix, generator, device):
    """MoCHi's draws: ranks uniform over the top-N (with replacement), α ~ U(0, 1), β ~ U(0, 0.5).

    Returns the ``mixes`` dict that ``mochi_loss`` draws for a batch of ``b`` queries (its keys and
    shapes are described there), on ``device``; pass it as ``mochi_loss(..., mixes=...)`` to repeat
    a call's draws."""
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    kw = dict(generator=generator, device=gen_dev)
    high = max(top_n, 1)
    mixes = {"pair_ranks": torch.randint(high, (b, n_mix, 2), **kw), "alpha": torch.rand((b, n_mix), **kw),
             "query_ranks": torch.randint(high, (b, n_query_mix), **kw),
             "beta": 0.5 * torch.rand((b, n_query_mix), **kw)}
    return {k: v.to(device) for k, v in mixes.items()}


def _check_mixes(mixes, b, top_n, n_mix, n_query_mix, device):
    if not isinstance(mixes, dict) or set(mixes) != set(_MIX_KEYS):
        raise ValueError(f"mixes must be a dict with the keys {_MIX_KEYS}")
    shapes = {"pair_ranks": (b, n_mix, 2), "alpha": (b, n_mix), "query_ranks": (b, n_query_mix),
              "beta": (b, n_query_mix)}
    out = {}
    for key, shape in shapes.items():
        v = mixes[key]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
            raise ValueError(f"mixes[{key!r}] must be a tensor of shape {shape}, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if key.endswith("ranks"):
            if v.dtype != torch.int64:
                raise TypeError(f"mixes[{key!r}] must be int64, got {v.dtype}")
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= top_n):
                raise ValueError(f"mixes[{key!r}] must be ranks in [0, top_n={top_n})")
        else:
            if not v.is_floating_point():
                raise TypeError(f"mixes[{key!r}] must be floating point, got {v.dtype}")
            if v.numel() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"mixes[{key!r}] must be finite")
        out[key] = v.to(device)
    return out


def mochi_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: Optional[torch.Tensor] = None,
    *,
    temperature: float = 0.2,
    top_n: int = 1024,
    n_mix: int = 1024,
    n_query_mix: int = 128,
    generator: Optional[torch.Generator] = None,
    mixes: Optional[dict] = None,
    return_mixes: bool = False,
    in_batch: bool = False,
    backend: str = "auto",
    chunk_size: Optional[int] = None,
):
    """MoCHi, hard negative mixing (docs/losses.md §2.2), without the B×K similarity matrix or the
    synthetic points of the whole batch::

        top_i   = the top_n negatives n of query i by q_i·n, hardest first (ties: the lower index)
        h_im    = normalize(α_im·n_a + (1−α_im)·n_b),  a, b = top_i[pair_ranks_im]  (m < n_mix)
        h′_im   = normalize(β_im·sg(q_i) + (1−β_im)·n_c), c = top_i[query_ranks_im]  (m < n_query_mix)
        L       = mean_i CE([q_i·k_i, q_i·Nᵀ, q_i·h_i·ᵀ, q_i·h′_i·ᵀ]/τ, 0)

    ``q`` (B, D) the queries (with gradient); ``k`` (B, D) their positive keys and ``queue`` (K, D) the
    negatives N, both used without gradient (detached) and as given (MoCo normalises them first); the
    synthetic points are normalised after mixing (``F.normalize``'s eps 1e-12), detached and never
    enqueued. With ``in_batch=True`` the negatives are the batch's own keys (``queue`` must be None)
    and each query's own key is left out of its negatives and its top-N.

    The draws (ranks uniform over the top-N with replacement, α ~ U(0, 1), β ~ U(0, 0.5)) come from
    ``generator`` (or torch's global generator), or are given in ``mixes``: ``pair_ranks`` (B, n_mix, 2)
    and ``query_ranks`` (B, n_query_mix) int64, ``alpha`` (B, n_mix), ``beta`` (B, n_query_mix). With
    ``return_mixes`` the result is ``(loss, mixes)``. ``top_n``, ``n_mix`` or ``n_query_mix`` of 0 turn
    their part off (``top_n=0`` with mixing asked for is an error).

    What is materialised: the top-N indices and similarities (B, top_n), the logits and norms of the
    synthetic points (B, n_mix + n_query_mix), and for a chunk of queries at a time its gathered rows
    (about 32 MiB): no synthetic point is formed, ``q·h`` and its norm come from the dot products
    ``q·n_a``, ``q·n_b``, ``n_a·n_b`` (``ops.mixing.mixed_logits``), and q's gradient is a combination of
    its top-N rows. The LSE over the
    queue is the engine's row LSE (``ops.target.target_row_lse``: memory O((B + K)·D + chunk·K)); the
    top-N selection runs as chunked matrix products and sorts (``ops.mixing.top_negatives``) on every
    backend. Returns a 0-d tensor in q's dtype.
    """
    from ..ops import target_row_lse
    from ..kernels.mixing import mixed_logits, top_negatives

    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be tensors")
    check_features("q", q, "k", k)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have one shape (B, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if not isinstance(in_batch, bool):
        raise TypeError(f"in_batch must be a bool, got {type(in_batch).__name__}")
    if in_batch:
        if queue is not None:
            raise ValueError("in_batch=True takes the batch's own keys as the negatives: pass queue=None")
        negatives = k
    else:
        if queue is None:
            raise ValueError("mochi_loss needs a queue of negatives (K, D), or in_batch=True")
        check_features("q", q, "queue", queue)
        negatives = queue
    for name, value in (("temperature", temperature),):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    top_n, n_mix, n_query_mix = (_check_count(n, v) for n, v in
                                 (("top_n", top_n), ("n_mix", n_mix), ("n_query_mix", n_query_mix)))
    available = negatives.shape[0] - (1 if in_batch else 0)
    if top_n == 0 and (n_mix or n_query_mix):
        raise ValueError(f"top_n=0 turns mixing off, but n_mix={n_mix} and n_query_mix={n_query_mix} ask for it")
    if top_n > available:
        what = "the other keys of the batch" if in_batch else "the queue's K"
        raise ValueError(f"top_n={top_n} is more than {what}: {available} negatives")
    chunk_size = check_chunk_size(chunk_size)
    b, dev = q.shape[0], q.device
    k_d, neg_d = k.detach(), negatives.detach()
    if mixes is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        mixes = draw_mixes(b, top_n, n_mix, n_query_mix, generator, dev)
    else:
        mixes = _check_mixes(mixes, b, top_n, n_mix, n_query_mix, dev)
    acc = torch.promote_types(q.dtype, torch.float32)
    if backend == "reference":
        loss = reference.mochi_loss_reference(q.to(acc), k_d.to(acc), None if in_batch else neg_d.to(acc),
                                              mixes, temperature=temperature, top_n=top_n,
                                              in_batch=in_batch).to(q.dtype)
        return (loss, mixes) if return_mixes else loss
    scale = torch.tensor(1.0 / temperature, dtype=acc, device=dev)
    none = torch.full((b,), -1, dtype=torch.int64, device=dev)
    target = Target(none, torch.full((neg_d.shape[0],), -1, dtype=torch.int64, device=dev),
                    exclude_col=torch.arange(b, device=dev) if in_batch else None)
    lse_neg = target_row_lse(q, neg_d, scale, None, target, backend=backend, chunk_size=chunk_size)
    pos = (q.double() * k_d.double()).sum(1) / temperature
    extra = [pos[:, None]]
    if top_n and (n_mix or n_query_mix):
        top, top_vals = top_negatives(q, neg_d, top_n, exclude_own=in_batch)
        extra.append(mixed_logits(q, neg_d, top, top_vals, mixes["pair_ranks"], mixes["alpha"], mixes["query_ranks"],
                                  mixes["beta"]).double() / temperature)
    lse = torch.logaddexp(lse_neg, torch.logsumexp(torch.cat(extra, dim=1), dim=1))
    loss = (lse - pos).mean().to(q.dtype)
    return (loss, mixes) if return_mixes else loss
