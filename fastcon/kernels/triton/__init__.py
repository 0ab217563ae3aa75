"""Triton GPU backend of the fastcon engine.

Two implementations of the engine operations of ``fastcon/kernels/__init__.py``, and the modules
they share, by role:

* ``chunked``: the ``"triton"`` backend (any D): CLIP's and SigLIP's epilogue kernels over tiles of
  dot products from one of two producers: the kernels form the tiles themselves with tl.dot (the
  matmul producer: bf16/fp16 on a GPU, no logit in memory), or ``torch.mm`` writes row chunks with
  fp32 output that the kernels read; ``target``: the general target's epilogue kernels, launchers and
  host classes on the same producers;
* ``fused``: the ``"triton_fused"`` backend, tile kernels that keep ``S`` in registers (D <= 256);
  ``fused_target``: the general target's (G in registers too);
* ``tiles``: the ``@triton.jit`` tile maths the kernels of more than one module call (LSE parts, the
  producer's tiles and work items, the softmax, sigmoid and general-target tiles);
* ``plan``: the host side they share (input checks, producer choice, grids, chunk plans,
  autotuning, the LSE merge launch);
* ``gemm``: the gradient products (G's buffer and fp16 lift, the in-place fp32-accumulating GEMM);
* ``configs``: the launch configurations (plain data); ``late``: late interaction's kernels.

Importing this package imports neither triton nor touches CUDA; the submodules import triton and are
imported only when used. Kernels are launched through ``launch(kernel)[grid](...)``: inside the
``triton_op`` engine operators that lets ``torch.compile`` trace the launch.
"""
from __future__ import annotations

import contextlib
import os

import torch

_INTERPRET_REASON = "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before triton is imported"


MIN_TRITON = (3, 3)  # the oldest release tested (with torch 2.7: make test-compat)


def _importable() -> str | None:
    """Why the installed Triton cannot serve (None where it can)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported: {exc}"
    from . import configs

    release = configs.RELEASE
    if release != (0, 0) and release < MIN_TRITON:
        return (f"triton {triton.__version__} is older than the oldest release fastcon is tested with, "
                f"{'.'.join(map(str, MIN_TRITON))} (pip install 'triton>={'.'.join(map(str, MIN_TRITON))}')")
    return None


def available(device: torch.device) -> tuple[bool, str | None]:
    """Whether the Triton backend can run on tensors of ``device``, and if not, why."""
    device = torch.device(device)
    if device.type == "cuda":
        reason = _importable()
        return reason is None, reason
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, _INTERPRET_REASON
        reason = _importable()
        return reason is None, reason
    return False, f"the Triton backend does not run on {device.type} tensors"


def launch(kernel):
    """``kernel`` through ``torch.library.wrap_triton`` (torch >= 2.6), so that its launch is traced
    inside a ``triton_op`` under ``torch.compile`` and FakeTensor; in the eager body of a triton_op
    (and under ``direct_launches``) wrap_triton gives back the kernel itself. The kernel itself where
    torch has no wrapper or the Triton interpreter runs it (the wrapper knows compiled kernels only).
    Every launch gets the installed Triton release's compile options (``configs.COMPILE_OPTIONS``,
    such as a register limit; torch's wrapper and the interpreter both pass over backend options)."""
    from .configs import COMPILE_OPTIONS

    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is not None and os.environ.get("TRITON_INTERPRET") != "1":
        kernel = wrap(kernel)
    return _WithOptions(kernel, COMPILE_OPTIONS) if COMPILE_OPTIONS else kernel


class _WithOptions:
    """``kernel[grid](**kwargs)`` with ``options`` added to the keyword arguments of the launch."""

    def __init__(self, kernel, options: dict):
        self.kernel, self.options = kernel, options

    def __getitem__(self, grid):
        run = self.kernel[grid]
        return lambda *args, **kwargs: run(*args, **self.options, **kwargs)


def direct_launches():
    """A context in which ``launch`` gives the kernels themselves: for callers that run the backend
    on real tensors outside the engine's triton_op operators (the distributed ring), where the
    traceable wrapper would send every launch through a dispatcher round trip."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:  # torch < 2.6: launch never wraps
        return contextlib.nullcontext()
    return set_wrap_triton_enabled(False)
