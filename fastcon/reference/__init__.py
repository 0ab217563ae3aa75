"""Plain-PyTorch reference losses: the specification and the test oracle.

Everything here materialises the full logits matrix, computes in fp32 (or the input's precision when
``upcast=False``), and follows ``docs/losses.md`` literally. Nothing in the fused paths calls
these functions; tests compare the fused paths against them. ``losses`` holds the losses of one
process (``embedding`` those of sentence-embedding training beyond MNRL, ``pairs`` DCL and
pytorch-metric-learning's pair losses), ``ranks`` the distributed oracles (every rank of a job simulated in one process).
"""
from .embedding import GIST_MARGIN_STRATEGIES, gist_loss_reference
from .losses import *  # noqa: F401,F403
from .losses import __all__ as _losses_all
from .pairs import dcl_loss_reference, label_pairs_reference, pair_ntxent_loss_reference, supcon_loss_reference
from .ranks import clip_loss_ranks_reference, siglip_loss_ranks_reference

__all__ = list(_losses_all) + ["GIST_MARGIN_STRATEGIES", "gist_loss_reference", "clip_loss_ranks_reference",
                               "siglip_loss_ranks_reference", "dcl_loss_reference", "label_pairs_reference",
                               "pair_ntxent_loss_reference", "supcon_loss_reference"]
