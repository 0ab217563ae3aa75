"""pytorch-metric-learning's ``NTXentLoss`` and ``SupConLoss`` on fastcon's engine (docs/losses.md §1.8)::

    from fastcon.integrations.pytorch_metric_learning import NTXentLoss, SupConLoss
    loss = SupConLoss(temperature=0.1)                   # as pytorch_metric_learning.losses'
    loss(embeddings, labels)                             # or (embeddings, labels, indices_tuple, ref_emb, ref_labels)

Same constructor defaults, ``forward(embeddings, labels=None, indices_tuple=None, ref_emb=None,
ref_labels=None)`` and numbers as PML's with its defaults: the cosine similarity over the temperature,
NT-Xent per positive pair against the anchor's negatives averaged over the positive pairs (its
MeanReducer), SupCon per row averaged over the rows whose loss is above zero (its AvgNonZeroReducer).
Where PML builds N×N pair masks and index lists of every pair (its users' out-of-memory errors at
large batches), with labels these run on the engine in O(N·D) memory plus one entry per positive pair
(NT-Xent). Mined pairs (``indices_tuple``) are used as listed. Other distances, reducers and
embedding regularizers are a ValueError naming what is supported. pytorch-metric-learning itself is
not needed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import functional as FC
from .._validation import check_temperature

__all__ = ["NTXentLoss", "SupConLoss"]


def _is_default(obj, class_name: str, **attrs) -> bool:
    """Whether ``obj`` is PML's ``class_name`` with its default settings (read by name: PML need not
    be installed)."""
    return type(obj).__name__ == class_name and all(getattr(obj, k, v) == v for k, v in attrs.items())


class _PMLPairLoss(nn.Module):
    _loss = None
    _reducer = ""

    def __init__(self, temperature: float, *, distance=None, reducer=None, embedding_regularizer=None,
                 embedding_reg_weight: float = 1, collect_stats=None, backend: str = "auto",
                 chunk_size: Optional[int] = None):
        super().__init__()
        name = type(self).__name__
        if distance is not None and not _is_default(distance, "CosineSimilarity", power=1, normalize_embeddings=True,
                                                    is_inverted=True):
            raise ValueError(f"fastcon's {name} supports PML's default distance, CosineSimilarity() (power 1, "
                             f"normalised embeddings), got {type(distance).__name__}")
        if reducer is not None and not _is_default(reducer, self._reducer, low=0, high=None):
            raise ValueError(f"fastcon's {name} supports PML's default reducer, {self._reducer}(), got "
                             f"{type(reducer).__name__}")
        if embedding_regularizer is not None:
            raise ValueError(f"fastcon's {name} takes no embedding_regularizer (PML's default, None); add the "
                             f"regularizer's term to the loss yourself")
        check_temperature(temperature)
        self.temperature = temperature
        self.embedding_reg_weight = embedding_reg_weight
        self.collect_stats = collect_stats
        self.backend, self.chunk_size = backend, chunk_size

    def forward(self, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None, indices_tuple=None,
                ref_emb: Optional[torch.Tensor] = None, ref_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return type(self)._loss(embeddings, labels, indices_tuple=indices_tuple, ref_emb=ref_emb,
                                ref_labels=ref_labels, temperature=self.temperature, backend=self.backend,
                                chunk_size=self.chunk_size)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class NTXentLoss(_PMLPairLoss):
    """pytorch-metric-learning's ``NTXentLoss(temperature=0.07)``: each positive pair (a, p) scored
    against the anchor's negatives, ``−log(e^{S_ap} / (e^{S_ap} + Σ_{n ∈ N_a} e^{S_an}))``, ``S =
    cos/τ``, averaged over the positive pairs (``fastcon.functional.pair_ntxent_loss``)."""

    _loss = staticmethod(FC.pair_ntxent_loss)
    _reducer = "MeanReducer"

    def __init__(self, temperature: float = 0.07, **kwargs):
        super().__init__(temperature, **kwargs)


class SupConLoss(_PMLPairLoss):
    """pytorch-metric-learning's ``SupConLoss(temperature=0.1)``: row i's ``LSE_{K_i} S − mean_{P_i} S``,
    ``S = cos/τ``, averaged over the rows whose loss is above zero (``fastcon.functional.supcon_loss``)."""

    _loss = staticmethod(FC.supcon_loss)
    _reducer = "AvgNonZeroReducer"

    def __init__(self, temperature: float = 0.1, **kwargs):
        super().__init__(temperature, **kwargs)
