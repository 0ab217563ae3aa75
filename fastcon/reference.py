"""Plain-PyTorch reference losses: the specification and the test oracle.

Everything here materialises the full logits matrix, computes in fp32 (or the input's precision when
``upcast=False``), and follows ``shared/specs/LOSSES.md`` literally. Nothing in the fused paths calls
these functions; tests compare the fused paths against them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _logits(a, b, logit_scale, logit_bias, upcast: bool):
    if upcast:  # at least fp32; float64 stays float64
        acc = torch.promote_types(a.dtype, torch.float32)
        a, b = a.to(acc), b.to(acc)
        logit_scale = torch.as_tensor(logit_scale, dtype=acc)
        if logit_bias is not None:
            logit_bias = torch.as_tensor(logit_bias, dtype=acc)
    logits = logit_scale * (a @ b.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    label_smoothing: float = 0.0,
    pos_offset: int = 0,
    upcast: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE (LOSSES.md 1.1), materialised.

    ``S = s·X·Yᵀ + b`` with X: (Na, D) and Y: (Nb, D). The positive of row ``i`` is column
    ``pos_offset + i``. ``L = ½[CE(S, pos) + CE(S[:, cols]ᵀ, i)]`` where ``cols`` are the Na columns
    that own a positive; with ``Na == Nb`` and ``pos_offset == 0`` this is open_clip's ``ClipLoss``.
    Label smoothing follows ``F.cross_entropy`` (targets ``(1−ε)·onehot + ε/n_classes``).
    """
    na, nb = image_features.shape[0], text_features.shape[0]
    if pos_offset < 0 or pos_offset + na > nb:
        raise ValueError(f"pos_offset={pos_offset} with Na={na} rows needs Nb >= {pos_offset + na}, got Nb={nb}")
    logits = _logits(image_features, text_features, logit_scale, logit_bias, upcast)
    labels = torch.arange(na, device=logits.device) + pos_offset
    row = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    col_logits = logits[:, pos_offset:pos_offset + na].T
    col = F.cross_entropy(col_logits, torch.arange(na, device=logits.device), label_smoothing=label_smoothing)
    return (row + col) / 2


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    pos_offset: int = 0,
    negative_only: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """SigLIP sigmoid loss (LOSSES.md 1.2), materialised.

    ``l = s·X·Yᵀ + b``; ``z_ij = +1`` where ``j == pos_offset + i`` else ``−1`` (all ``−1`` with
    ``negative_only``); ``L = −(1/Na)·Σ_ij logσ(z_ij·l_ij)``, open_clip's ``SigLipLoss`` on one rank.
    """
    na, nb = image_features.shape[0], text_features.shape[0]
    logits = _logits(image_features, text_features, logit_scale, logit_bias, upcast)
    labels = -torch.ones_like(logits)
    if not negative_only:
        if pos_offset < 0 or pos_offset + na > nb:
            raise ValueError(f"pos_offset={pos_offset} with Na={na} rows needs Nb >= {pos_offset + na}, got Nb={nb}")
        idx = torch.arange(na, device=logits.device)
        labels[idx, idx + pos_offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / na


def _as_f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.double()
    return torch.tensor(float(x), dtype=torch.float64)


def clip_loss_explicit(image_features, text_features, logit_scale, logit_bias=None, *,
                       label_smoothing: float = 0.0, pos_offset: int = 0) -> torch.Tensor:
    """An independent float64 formulation of ``clip_loss_reference`` (explicit log-softmax sums),
    used to check the reference itself."""
    a, b = image_features.double(), text_features.double()
    logits = _as_f64(logit_scale) * (a @ b.T)
    if logit_bias is not None:
        logits = logits + _as_f64(logit_bias)
    na, nb = logits.shape
    eps = label_smoothing
    idx = torch.arange(na, device=logits.device)
    row_logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    row_t = torch.full_like(logits, eps / nb)
    row_t[idx, idx + pos_offset] += 1 - eps
    row = -(row_t * row_logp).sum() / na
    sub = logits[:, pos_offset:pos_offset + na]
    col_logp = sub - torch.logsumexp(sub, dim=0, keepdim=True)
    col_t = torch.full_like(sub, eps / na)
    col_t[idx, idx] += 1 - eps
    col = -(col_t * col_logp).sum() / na
    return (row + col) / 2


def siglip_loss_explicit(image_features, text_features, logit_scale, logit_bias=None, *,
                         pos_offset: int = 0) -> torch.Tensor:
    """Independent float64 formulation of SigLIP via ``L·Na = Σ softplus(l) − Σ_i l_{i, off+i}``."""
    a, b = image_features.double(), text_features.double()
    logits = _as_f64(logit_scale) * (a @ b.T)
    if logit_bias is not None:
        logits = logits + _as_f64(logit_bias)
    na = logits.shape[0]
    idx = torch.arange(na, device=logits.device)
    return (F.softplus(logits).sum() - logits[idx, idx + pos_offset].sum()) / na
