"""The engine's operations as ``torch.library`` operators, each dispatching to one backend:
``engine`` (dispatch: backend choice, autocast, gradient conventions), ``registry`` (how an operator
is defined), and the operators by family: ``softmax`` (CLIP, SigLIP), ``target`` (the general
target), ``prefix`` (Matryoshka in one pass over D), ``late`` (late interaction)."""
from .engine import resolve_backend
from .late import late_interaction
from .softmax import clip_engine_loss, siglip_engine_loss
from .prefix import (has_prefix_passes, prefix_scales, prefix_target_loss, siglip_prefix_engine_loss,
                     target_prefix_engine_loss)
from .target import target_engine_loss, target_pair_engine_loss, target_row_lse

__all__ = ["clip_engine_loss", "siglip_engine_loss", "target_engine_loss", "target_pair_engine_loss", "target_row_lse",
           "has_prefix_passes", "prefix_scales", "prefix_target_loss", "siglip_prefix_engine_loss", "target_prefix_engine_loss",
           "late_interaction", "resolve_backend"]
