"""fastcon: fused contrastive losses (CLIP, SigLIP) at O(N·D) memory, on GPU (Triton) and CPU (C++)."""
from ._version import __version__
from . import functional
from .losses import ClipLoss, SigLipLoss
from ._info import backend_info
from .gradcache import cached_step

__all__ = ["ClipLoss", "SigLipLoss", "functional", "backend_info", "cached_step", "__version__"]
