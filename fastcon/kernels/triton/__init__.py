"""Triton GPU backend of the fastcon engine.

Two implementations of the four engine operations of ``fastcon/kernels/__init__.py``:

* ``fastcon.kernels.triton.chunked``: row chunks of the dot products come from ``torch.mm`` (fp32
  output), fused Triton epilogue kernels do the rest (any D).
* ``fastcon.kernels.triton.fused``: tile kernels that keep ``S`` in registers (D <= 256).

Importing this package imports neither triton nor touches CUDA; the submodules import triton and are
imported only when used.
"""
from __future__ import annotations

import os

import torch

_INTERPRET_REASON = "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before triton is imported"


def available(device: torch.device) -> tuple[bool, str | None]:
    """Whether the Triton backend can run on tensors of ``device``, and if not, why."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            return False, f"triton cannot be imported: {exc}"
        return True, None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, _INTERPRET_REASON
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return False, f"triton cannot be imported: {exc}"
        return True, None
    return False, f"the Triton backend does not run on {device.type} tensors"
