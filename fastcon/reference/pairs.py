"""Reference losses over pairs, materialising every similarity: the decoupled contrastive loss
(docs/losses.md §1.7) and pytorch-metric-learning's NT-Xent and SupCon (§1.8), in at least fp32."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["dcl_loss_reference", "pair_ntxent_loss_reference", "supcon_loss_reference", "label_pairs_reference"]


def _acc(x):
    return torch.promote_types(x.dtype, torch.float32)


def dcl_loss_reference(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.1,
                       weights0: Optional[torch.Tensor] = None, weights1: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``½·(mean_i ℓ0_i + mean_i ℓ1_i)`` with ``ℓ0_i = −w0_i·S01_ii + LSE_{j≠i}[S00_ij, S01_ij]`` over
    ``S00 = z0·z0ᵀ/τ`` and ``S01 = z0·z1ᵀ/τ`` (the positive and the own view left out), ℓ1 the same with
    the views swapped; weights None: 1."""
    acc = _acc(out0)
    z0, z1 = F.normalize(out0.to(acc), dim=1), F.normalize(out1.to(acc), dim=1)
    n = z0.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=z0.device)

    def one(x, y, w):
        same, cross = x @ x.T / temperature, x @ y.T / temperature
        negatives = torch.cat([same[off].view(n, n - 1), cross[off].view(n, n - 1)], dim=1)
        pos = torch.diagonal(cross)
        if w is not None:
            pos = pos * w.to(acc)
        return (torch.logsumexp(negatives, dim=1) - pos).mean()

    return 0.5 * (one(z0, z1, weights0) + one(z1, z0, weights1))


def label_pairs_reference(labels: torch.Tensor, ref_labels: torch.Tensor, same: bool):
    """The (N, M) masks of positive pairs (equal labels, without the diagonal when ``same``: the
    embeddings are their own references) and negative pairs (different labels)."""
    pos = labels[:, None] == ref_labels[None, :]
    neg = ~pos
    if same:
        pos = pos & ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return pos, neg


def _cosine(embeddings, ref_emb, temperature):
    acc = _acc(embeddings)
    z = F.normalize(embeddings.to(acc), dim=1)
    r = z if ref_emb is None else F.normalize(ref_emb.to(acc), dim=1)
    return z @ r.T / temperature


def pair_ntxent_loss_reference(embeddings: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                               temperature: float = 0.07, ref_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """pytorch-metric-learning's NT-Xent over the (N, M) masks of positive and negative pairs: for
    each positive pair (a, p), ``−log(e^{S_ap} / (e^{S_ap} + Σ_{n: neg[a, n]} e^{S_an}))`` with
    ``S = cos/τ``, averaged over the positive pairs (0 without a positive or a negative pair)."""
    s = _cosine(embeddings, ref_emb, temperature)
    if not pos.any() or not neg.any():
        return s.sum() * 0
    lse_neg = torch.logsumexp(s.masked_fill(~neg, float("-inf")), dim=1, keepdim=True).expand_as(s)
    per_pair = torch.logaddexp(s, lse_neg) - s
    return per_pair[pos].mean()


def supcon_loss_reference(embeddings: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float = 0.1,
                          ref_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
    """pytorch-metric-learning's SupCon over the (N, M) masks of positive and negative pairs: row i's
    loss ``LSE_{K_i} S − mean_{P_i} S`` over its kept pairs K_i = P_i ∪ N_i and positives P_i
    (``S = cos/τ``), averaged over the rows whose loss is above zero (its AvgNonZeroReducer; 0
    without a positive or a negative pair)."""
    s = _cosine(embeddings, ref_emb, temperature)
    if not pos.any() or not neg.any():
        return s.sum() * 0
    keep = pos | neg
    lse = torch.logsumexp(s.masked_fill(~keep, float("-inf")), dim=1)
    n_pos = pos.sum(dim=1)
    has = n_pos > 0
    rows = lse[has] - (s * pos).sum(dim=1)[has] / n_pos[has]
    rows = rows[rows > 0]
    return rows.mean() if rows.numel() else s.sum() * 0
