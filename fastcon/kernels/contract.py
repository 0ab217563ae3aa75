"""The backend contract as code: the engine operations every backend exposes (their mathematics is in
``fastcon/kernels/__init__.py``), where each backend keeps them, and the one lookup the ops layer
uses (``backend(name)``).

A backend's operations may live in several modules (the Triton path keeps CLIP's kernels, the
general target's and the token family's apart); ``BACKEND_MODULES`` lists them and the first module
that defines an operation provides it. A backend that lacks an operation says so in one of its
modules with ``MISSING = {"operation": "why"}``: ``backend(name)`` then gives a function that raises
``NotImplementedError`` with that reason, and ``fastcon.backend_info()`` lists it
(``missing_operations``). Every other
operation must be defined, with the parameters of the torch backend's (tests/test_contract.py).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, Dict, NamedTuple, Tuple

OPERATIONS: Tuple[str, ...] = (
    "lse_stats",             # CLIP's pass 1: row and column LSEs, positive logits
    "softmax_grad",          # CLIP's pass 2
    "softmax_fused",         # both passes of CLIP's loss
    "sigmoid_fused",         # SigLIP's loss and gradients (one pass)
    "sigmoid_prefix_fused",  # ... at every Matryoshka prefix, one pass over D
    "target_stats",          # the general target's pass 1
    "teacher_stats",         # a soft target's teacher pass (the normalisers of its targets)
    "target_grad",           # the general target's pass 2
    "target_softmax_fused",  # both passes of a general target's loss
    "target_prefix_stats",   # the general target's pass 1 at every Matryoshka prefix, one pass over D
    "target_prefix_grad",    # ... and its pass 2
    "late_stats",            # late interaction: sums of maxima over token pairs
    "late_grad",             # their gradients (argmaxes recomputed)
)

BACKEND_MODULES: Dict[str, Tuple[str, ...]] = {
    "torch": ("fastcon.kernels.torch_chunked", "fastcon.kernels.late"),
    "cpp": ("fastcon.kernels.cpp",),
    "triton": ("fastcon.kernels.triton.chunked", "fastcon.kernels.triton.target", "fastcon.kernels.triton.late",
               "fastcon.kernels.triton.prefix"),
    "triton_fused": ("fastcon.kernels.triton.fused", "fastcon.kernels.triton.fused_target",
                     "fastcon.kernels.triton.late", "fastcon.kernels.triton.prefix"),
}

Backend = NamedTuple("Backend", [("name", str)] + [(op, Callable) for op in OPERATIONS])
Backend.__doc__ = "One backend's engine operations, by name (``contract.OPERATIONS``)."


def _missing(name: str, op: str, reason: str) -> Callable:
    def missing(*args, **kwargs):
        error = NotImplementedError(f"backend {name!r} has no {op}: {reason}")
        raise error

    missing.__name__ = op
    missing.missing_reason = reason
    return missing


@functools.lru_cache(maxsize=None)
def backend(name: str) -> Backend:
    """The engine operations of backend ``name`` (imports its modules)."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"not an engine backend: {name!r} (one of {tuple(BACKEND_MODULES)})")
    modules = [importlib.import_module(m) for m in BACKEND_MODULES[name]]
    missing: Dict[str, str] = {}
    for m in modules:
        missing.update(getattr(m, "MISSING", {}))
    ops = {}
    for op in OPERATIONS:
        fn = next((getattr(m, op) for m in modules if callable(getattr(m, op, None))), None)
        if fn is None:
            if op not in missing:
                raise RuntimeError(f"backend {name!r} neither defines {op} nor declares it missing")
            fn = _missing(name, op, missing[op])
        ops[op] = fn
    return Backend(name=name, **ops)


def missing_operations(name: str) -> Dict[str, str]:
    """The operations backend ``name`` declares it lacks, with the reason (imports its modules)."""
    return {op: fn.missing_reason for op, fn in backend(name)._asdict().items()
            if hasattr(fn, "missing_reason")}
