"""Engine operations as ``torch.library`` custom ops, each dispatching to one backend."""
from .engine import clip_engine_loss, resolve_backend, siglip_engine_loss

__all__ = ["clip_engine_loss", "siglip_engine_loss", "resolve_backend"]
