"""fastcon: fused contrastive losses (CLIP, SigLIP) at O(N·D) memory, on GPU (Triton) and CPU (C++)."""
import torch as _torch

from ._version import __version__

_MIN_TORCH = (2, 7)  # the oldest torch tested (with its Triton, 3.3: make test-compat); README "Versions"
if tuple(int(p) for p in _torch.__version__.split("+")[0].split(".")[:2]) < _MIN_TORCH:
    raise ImportError(f"fastcon {__version__} needs torch >= {'.'.join(map(str, _MIN_TORCH))}, "
                      f"found torch {_torch.__version__}")
from . import functional
from .losses import (ClipLoss, CoCaLoss, DCLLoss, DCLWLoss, DistillClipLoss, FILIPLoss, MaxSimLoss, MoCHiLoss,
                     NTXentLoss, SigLipLoss)
from ._info import backend_info
from .gradcache import cached_step

__all__ = ["ClipLoss", "SigLipLoss", "DistillClipLoss", "CoCaLoss", "NTXentLoss", "DCLLoss", "DCLWLoss", "MoCHiLoss",
           "FILIPLoss",
           "MaxSimLoss", "functional", "backend_info", "cached_step", "__version__"]
