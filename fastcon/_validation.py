"""Argument checking shared by the functional and module APIs (clear errors, never ``assert``)."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def compiling() -> bool:
    """True while torch.compile traces (a data-dependent check there would break the graph)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _check_float_tensor(name: str, value, what: str, shape: str, shape_ok) -> None:
    """``value`` is a tensor (else a ``TypeError``: ``name`` must be ``what``), of the shape described by
    ``shape`` (``shape_ok(value)``, else a ``ValueError``) and of a floating-point dtype (else a
    ``TypeError``), checked in this order."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if not shape_ok(value):
        raise ValueError(f"{name} must be {shape}, got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def check_features(name_a: str, a, name_b: str, b) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        _check_float_tensor(name, t, "a torch.Tensor", "2-D (batch, dim)", lambda x: x.dim() == 2)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has unsupported dtype {t.dtype}; use float32, bfloat16, float16 or float64")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); the loss needs at least one row")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has feature dimension 0 (shape {tuple(t.shape)})")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature dimensions differ: {name_a} has shape {tuple(a.shape)}, {name_b} has shape {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} ({a.dtype}) and {name_b} ({b.dtype}) must have the same dtype")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; put both on one device")


def check_token_features(name: str, t) -> None:
    """A (batch, tokens, dim) set of token features: a floating tensor of a supported dtype, nothing
    empty."""
    _check_float_tensor(name, t, "a torch.Tensor", "3-D (batch, tokens, dim)", lambda x: x.dim() == 3)
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; use float32, bfloat16, float16 or float64")
    for axis, what in enumerate(("an empty batch", "no tokens", "feature dimension 0")):
        if t.shape[axis] == 0:
            raise ValueError(f"{name} has {what} (shape {tuple(t.shape)}); the loss needs at least one of each")


def check_mask(name: str, mask, shape: tuple, device: torch.device) -> torch.Tensor:
    """A mask of ``shape``, True (or 1) for what is real: a bool tensor or an integer tensor of 0s and
    1s (tokenizers' attention masks), given back as bool on ``device``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool or 0/1 integer tensor of shape {shape}, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or 0/1 integer tensor of shape {shape}, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not compiling() and bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1 (True: real), got values "
                             f"{sorted(set(mask.unique().tolist()) - {0, 1})[:4]}")
        mask = mask != 0
    return mask.to(device)


def check_scalar(name: str, value, device: torch.device, *, required: bool = True) -> Optional[torch.Tensor]:
    """Returns a tensor for a Python number or a one-element tensor; rejects non-finite values."""
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a one-element tensor, got bool")
    if isinstance(value, numbers.Real):  # Python and NumPy numbers; float64 keeps them exact
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be finite, got {value}")
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    _check_float_tensor(name, value, "a float or a one-element tensor", "a scalar (one element)",
                        lambda v: v.numel() == 1)
    if value.device.type != "cpu" and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the features are on {device}")
    # A check of finiteness needs the value on the host: it is done only when the value is already
    # there (a device-to-host copy would synchronise every step); on GPU a NaN scale gives a NaN loss.
    # Under torch.compile the check would be a data-dependent branch (a graph break): it is left out
    # there, as on the GPU.
    if value.device.type == "cpu" and not compiling():
        number = value.item()  # one element on the host: a read, not a kernel
        if not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {number}")
    return value


def check_temperature(temperature) -> float:
    """A temperature τ: a positive finite number (the logits are similarities / τ)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return float(temperature)


def check_label_smoothing(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {value}")
    return float(value)


def check_pos_offset(pos_offset: Optional[int], na: int, nb: int) -> int:
    """The column of row 0's positive: None for a paired batch (0), an explicit int for the rectangular
    form (Na rows against Nb > Na columns), where no default is safe to guess."""
    if pos_offset is None:
        if na != nb:
            raise ValueError(f"image_features has {na} rows and text_features {nb}: the rectangular form needs an "
                             f"explicit pos_offset, the column of row 0's positive (0 to {nb - na})")
        return 0
    if isinstance(pos_offset, bool) or not isinstance(pos_offset, int):
        raise TypeError(f"pos_offset must be an int, got {type(pos_offset).__name__}")
    if pos_offset < 0 or pos_offset + na > nb:
        raise ValueError(
            f"pos_offset={pos_offset}: the positives of {na} rows occupy columns "
            f"[{pos_offset}, {pos_offset + na}), which must lie inside the {nb} columns")
    return pos_offset


def check_labels(name: str, labels, n: int, device: torch.device) -> torch.Tensor:
    """Integer class ids, one per row: a 1-D int tensor of length ``n`` on the features' device (CPU ids
    are moved), every id >= 0."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have one id per row: shape ({n},), got {tuple(labels.shape)}")
    if labels.device.type != "cpu" and labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")
    # (on a GPU this reads one number back: a negative id would otherwise surface later as a row
    # without a positive)
    if not compiling() and n and int(labels.min()) < 0:
        raise ValueError(f"{name} must be >= 0 (ids of classes), got a minimum of {int(labels.min())}")
    return labels.to(device=device, dtype=torch.int64)
