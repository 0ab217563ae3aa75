"""Which backend and path ran each engine call: the ``logging`` logger ``"fastcon"`` at DEBUG, which
``FASTCON_LOG=1`` turns on (to standard error) when fastcon is imported."""
from __future__ import annotations

import logging
import os
import sys

import torch

logger = logging.getLogger("fastcon")
if os.environ.get("FASTCON_LOG", "") not in ("", "0"):
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("fastcon: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG)


def log_call(op: str, path: str, args) -> None:
    """One line for an engine call: the operator, its backend (the call's first string argument, the
    resolved backend name every operator takes), its first two tensors' device, dtype and shapes, and
    the path it takes."""
    if torch.compiler.is_compiling() or not logger.isEnabledFor(logging.DEBUG):  # nothing traced
        return
    tensors = [t for t in args if isinstance(t, torch.Tensor)][:2]
    backend = next((a for a in args if isinstance(a, str)), "?")
    where = f"{tensors[0].device.type}, {tensors[0].dtype}, " if tensors else ""
    shapes = " and ".join(str(tuple(t.shape)) for t in tensors)
    logger.debug("%s on backend %s (%s%s): %s", op.replace("fastcon::", ""), backend, where, shapes, path)
