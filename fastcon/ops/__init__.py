"""Engine operations as ``torch.library`` custom ops, each dispatching to one backend."""
from . import late  # noqa: F401  (registers fastcon::late_interaction and its gradient with the package)
from .engine import clip_engine_loss, resolve_backend, siglip_engine_loss

__all__ = ["clip_engine_loss", "siglip_engine_loss", "resolve_backend"]
