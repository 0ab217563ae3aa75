"""Functional contrastive losses.

All options are keyword-only. ``backend`` is one of ``"auto"`` (Triton on CUDA, C++ on CPU),
``"cpp"``, ``"triton"`` (chunked GEMMs with fused Triton epilogues), ``"triton_fused"`` (tile kernels
whose logits never leave on-chip memory; D <= 256), ``"torch"`` (chunked plain PyTorch) and
``"reference"`` (materialised, for testing). ``chunk_size`` is the number of rows per logits chunk
(default: what fits ``FASTCON_CHUNK_BYTES``). ``process_group`` distributes the loss over
``torch.distributed`` (None: no distribution).

The functions live in one module per loss family; all are reached as ``fastcon.functional.NAME``:

* ``global_losses``: ``clip_loss``, ``siglip_loss``, ``negatives_clip_loss``, ``ntxent_loss``;
* ``dcl``: ``dcl_loss`` (decoupled contrastive learning), ``negative_mises_fisher_weights``;
* ``metric_learning``: ``pair_ntxent_loss``, ``supcon_loss`` (pytorch-metric-learning's forms);
* ``mnrl``: ``multiple_negatives_ranking_loss``;
* ``gist``: ``gist_loss`` (GISTEmbed's guided negatives);
* ``distill``: ``distill_loss``, ``distill_clip_losses``, ``align_uniform_loss``;
* ``mixing``: ``slerp``, ``m2mix_loss``, ``draw_mixes``, ``mochi_loss``;
* ``tokens``: ``pooled_alignment_loss``, ``patch_nce_loss``, ``filip_similarities``, ``maxsim_scores``,
  ``maxsim_loss``, ``filip_loss``;
* ``retrieval``: ``topk_similarity``, ``retrieval_recall``.

``_checks`` holds the argument checks the families share.
"""
from .dcl import dcl_loss, negative_mises_fisher_weights
from .distill import DISTILL_KINDS, align_uniform_loss, distill_clip_losses, distill_loss
from .gist import MARGIN_STRATEGIES, gist_loss
from .global_losses import clip_loss, negatives_clip_loss, ntxent_loss, siglip_loss
from .mixing import draw_mixes, m2mix_loss, mochi_loss, slerp
from .metric_learning import pair_ntxent_loss, supcon_loss
from .mnrl import HARDNESS_MODES, MNRL_DIRECTIONS, multiple_negatives_ranking_loss
from .retrieval import retrieval_recall, topk_similarity
from .tokens import filip_loss, filip_similarities, maxsim_loss, maxsim_scores, patch_nce_loss, pooled_alignment_loss


__all__ = [
    "clip_loss", "siglip_loss", "negatives_clip_loss", "ntxent_loss",
    "dcl_loss", "negative_mises_fisher_weights", "pair_ntxent_loss", "supcon_loss",
    "multiple_negatives_ranking_loss", "gist_loss",
    "distill_loss", "distill_clip_losses", "align_uniform_loss",
    "slerp", "m2mix_loss", "draw_mixes", "mochi_loss",
    "pooled_alignment_loss", "patch_nce_loss", "filip_similarities", "maxsim_scores", "maxsim_loss", "filip_loss",
    "topk_similarity", "retrieval_recall",
    # accepted values of kind, directions, hardness_mode, margin_strategy
    "DISTILL_KINDS", "MNRL_DIRECTIONS", "HARDNESS_MODES", "MARGIN_STRATEGIES",
]
