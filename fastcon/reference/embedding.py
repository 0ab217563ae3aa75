"""The reference losses of sentence-embedding training beyond MNRL (docs/losses.md §2.6): GISTEmbed's
guided in-batch negatives, materialised as sentence-transformers' ``GISTEmbedLoss`` states them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GIST_MARGIN_STRATEGIES", "gist_loss_reference"]

GIST_MARGIN_STRATEGIES = ("absolute", "relative")


def gist_loss_reference(anchor: torch.Tensor, positive: torch.Tensor, guide_anchor: torch.Tensor,
                        guide_positive: torch.Tensor, negatives=None, guide_negatives=None, *,
                        temperature: float = 0.01, margin_strategy: str = "absolute", margin: float = 0.0,
                        contrast_anchors: bool = True, contrast_positives: bool = True, offset: int = 0) -> torch.Tensor:
    """GISTEmbed (docs/losses.md §2.6), materialised: cosine similarities of the student (A, P, N) and
    of the guide (G_A, G_P, G_N), each row i one softmax over the blocks ``A_i·Pᵀ``, ``A_i·Aᵀ``
    (``contrast_anchors``), ``P_i·Pᵀ`` (``contrast_positives``) and ``A_i·Nᵀ`` (every negative of
    every row; ``negatives`` (B, D) or (B, m, D)), divided by ``temperature``. A pair is dropped when
    its guide similarity exceeds row i's threshold ``θ_i − margin`` (absolute) or ``θ_i − |θ_i|·margin``
    (relative), ``θ_i = G_A,i·G_P,i``; the positive ``(A_i, P_i)`` never is, and ``A_i·A_i``, ``P_i·P_i``
    always are. The loss is the cross-entropy of row i at ``P_i``, the mean over the rows.

    Gathered across ranks (``gather_across_devices``): ``positive``, ``negatives`` and their guides hold
    every rank's rows and ``anchor`` this rank's, whose positives are rows ``offset + i``; the
    anchor-anchor block is this rank's, the positive-positive block this rank's positives against all."""
    if margin_strategy not in GIST_MARGIN_STRATEGIES:
        raise ValueError(f"margin_strategy must be one of {GIST_MARGIN_STRATEGIES}, got {margin_strategy!r}")
    acc = torch.promote_types(anchor.dtype, torch.float32)
    norm = lambda t: F.normalize(t.to(acc), dim=-1)  # noqa: E731
    a, p, ga, gp = norm(anchor), norm(positive), norm(guide_anchor), norm(guide_positive)
    b = a.shape[0]
    rows = torch.arange(b, device=a.device)
    own = torch.zeros((b, p.shape[0]), dtype=torch.bool, device=a.device)
    own[rows, offset + rows] = True  # each anchor's positive (and each positive itself)
    eye = torch.eye(b, dtype=torch.bool, device=a.device)
    g_ap = ga @ gp.T
    theta = g_ap.diagonal(offset)[:, None]
    bound = theta - margin if margin_strategy == "absolute" else theta - theta.abs() * margin

    def masked(sim, guide_sim, protect=None):
        drop = guide_sim > bound
        if protect is not None:
            drop = drop & ~protect
        return sim.masked_fill(drop, float("-inf"))

    blocks = [masked(a @ p.T, g_ap, own)]
    if contrast_anchors:
        blocks.append(masked(a @ a.T, ga @ ga.T).masked_fill(eye, float("-inf")))
    if contrast_positives:
        mine, g_mine = p[offset:offset + b], gp[offset:offset + b]
        blocks.append(masked(mine @ p.T, g_mine @ gp.T).masked_fill(own, float("-inf")))
    if negatives is not None:
        n, gn = norm(negatives).reshape(-1, a.shape[1]), norm(guide_negatives).reshape(-1, ga.shape[1])
        blocks.append(masked(a @ n.T, ga @ gn.T))
    scores = torch.cat(blocks, dim=1) / temperature
    return F.cross_entropy(scores, offset + rows)
