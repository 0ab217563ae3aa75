"""Dispatch of the engine operators: backend choice, autocast, chunk sizing, the direct C++ call of a
small loss, and the gradient conventions every operator shares.

The operators themselves live by family: ``fastcon.ops.softmax`` (CLIP's softmax and SigLIP's
sigmoid losses), ``fastcon.ops.target`` (the general target: its loss, a soft target's pair of
losses, each row's LSE) and ``fastcon.ops.late`` (late interaction); each is an
``fastcon.ops.registry.EngineOp``. A backend computes the O(N²) parts (the contract in
``fastcon/kernels/__init__.py``); the O(N·D) terms are plain autograd in the operator modules, so
that every backend shares them.

"Gradient in forward": an operator computes the gradients of its inputs inside its forward (the
second pass needs the complete statistics of the first, so doing it at once costs no extra FLOPs and
lets the CPU backend reuse the first pass's logits chunks), and its backward multiplies them by the
upstream gradient (``scaled_grads``). The general target's operators that return several losses or
per-row values run their second pass in the backward instead.

Autocast: the operators run with autocast disabled inside. Under ``torch.autocast`` the callers pass
the autocast dtype as ``mm_dtype``: the operator rounds the features to it for the GEMMs (fp32
accumulation; on the CPU the rounded values are multiplied in fp32, the same products), keeps every
statistic in fp32/float64, and returns each gradient in its input's own dtype; the loss is fp32, as
open_clip's under autocast.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastcon._log import log_call
from fastcon.kernels import contract
from fastcon.kernels.contract import Backend
from fastcon.kernels._common import (GPU_CHUNK_RULE, acc_dtype, cache_bytes,  # noqa: F401 (re-exported)
                                     chunk_bytes)

BACKENDS = ("auto", "cpp", "triton", "triton_fused", "torch", "reference")
TRITON_BACKENDS = ("triton", "triton_fused")
_HALF = (torch.bfloat16, torch.float16)

_warned_cpp_fallback = False


def chunk_rows_for(na: int, nb: int, device: torch.device, chunk_size: Optional[int],
                   backend: Optional[str] = None) -> int:
    """Rows per chunk: ``chunk_size`` if given; else, for the Triton backends, all of them (they plan
    their chunks within ``chunk_bytes`` themselves, by pass: ``kernels/triton/chunked.py``); else
    what fits ``chunk_bytes`` at fp32."""
    if chunk_size:
        return max(1, min(int(chunk_size), na))
    if backend in TRITON_BACKENDS:
        return max(1, na)
    return max(1, min(na, chunk_bytes(device) // (4 * max(nb, 1))))


# ---------------------------------------------------------------------------------------------------
# Backend choice

def cpp_module() -> ModuleType:
    return importlib.import_module("fastcon.kernels.cpp")


def triton_available(device: torch.device) -> Tuple[bool, Optional[str]]:
    try:
        from fastcon.kernels import triton as triton_backend
    except ImportError as exc:  # pragma: no cover - the package always ships it
        return False, f"fastcon.kernels.triton failed to import: {exc}"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    return triton_backend.available(device)


def backend_module(name: str) -> Backend:
    """The engine operations of a resolved backend name (``fastcon.kernels.contract``)."""
    return contract.backend(name)


def resolve_name(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Maps a ``backend=`` name to the engine backend that runs tensors of ``device`` and ``dtype``
    (the dtype the GEMMs see), with a clear error where that backend cannot run them."""
    global _warned_cpp_fallback
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        raise ValueError("backend='reference' is handled by fastcon.functional, not by the engine")
    if backend == "auto":
        if device.type == "cuda":
            ok, _ = triton_available(device)
            backend = "triton" if ok and dtype != torch.float64 else "torch"
        elif device.type == "cpu":
            cpp = cpp_module()
            if cpp.AVAILABLE:
                backend = "cpp"
            else:
                if not _warned_cpp_fallback:
                    warnings.warn(
                        f"fastcon: the C++ extension is unavailable ({cpp.REASON}); CPU losses use the "
                        "chunked PyTorch path, which is slower. See fastcon.backend_info().",
                        RuntimeWarning, stacklevel=5)
                    _warned_cpp_fallback = True
                backend = "torch"
        else:
            backend = "torch"
    if backend == "torch":
        return backend
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        cpp = cpp_module()
        if not cpp.AVAILABLE:
            raise RuntimeError(f"backend='cpp' is unavailable: {cpp.REASON}")
        return backend
    # triton, triton_fused
    ok, reason = triton_available(device)
    if not ok:
        raise RuntimeError(f"backend={backend!r} is unavailable on {device}: {reason}")
    if dtype == torch.float64:
        raise TypeError(f"backend={backend!r} supports float32, bfloat16 and float16 inputs, got float64")
    if device.type == "cpu" and dtype == torch.bfloat16:
        raise TypeError(f"backend={backend!r} on CPU tensors (Triton interpreter) supports float32 and float16; "
                        "the interpreter has no bfloat16")
    return backend


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Backend]:
    """(name, its engine operations) for a ``backend=`` name."""
    name = resolve_name(backend, device, dtype)
    return name, backend_module(name)


_DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"


def assume_constant(fn):
    """``fn``'s result is a constant to ``torch.compile`` (it is called once at trace time), so its
    imports, environment reads and warnings never break a graph. ``torch.compiler.
    assume_constant_result`` imports Dynamo (a second of import time) only to set one attribute on
    ``fn``; while Dynamo is not loaded, the attribute is set here directly (tests/test_compile.py
    checks that Dynamo still reads that attribute)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    setattr(fn, _DYNAMO_CONSTANT_MARK, True)
    return fn


@assume_constant
def traced_backend_name(backend: str, device_type: str, dtype: torch.dtype) -> str:
    return resolve_name(backend, torch.device(device_type), dtype)


# ---------------------------------------------------------------------------------------------------
# Autocast

def autocast_gemm_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype that autocast asks the GEMMs of ``x`` to run in, or None (autocast off, float64
    inputs, which autocast leaves alone, or inputs already in that dtype)."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    if x.dtype == torch.float64 or x.dtype == dtype:
        return None
    return dtype


def loss_dtype(x: Tensor) -> torch.dtype:
    """Dtype of the returned loss: fp32 under autocast (open_clip's cross-entropy is an fp32 op
    there), else the features' own dtype."""
    device_type = x.device.type
    if x.dtype != torch.float64 and device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.float32
    return x.dtype


def autocast_off(device_type: str):
    """A context in which the engine's own products are not re-cast by an enclosing autocast."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def backend_context(device_type: str):
    """For callers that drive a backend directly on real tensors (the distributed ring): autocast
    off, and Triton kernels launched as they are (see ``fastcon.kernels.triton.direct_launches``)."""
    from fastcon.kernels.triton import direct_launches

    with autocast_off(device_type), direct_launches():
        yield


def engine_operands(a: Tensor, b: Tensor, backend: str, mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor]:
    """The features as the backend multiplies them: rounded to ``mm_dtype`` (autocast), widened to
    fp32 for the C++ backend (which computes in fp32/float64), contiguous."""
    if mm_dtype is not None:
        a, b = a.to(mm_dtype), b.to(mm_dtype)
    if backend == "cpp" and a.dtype in _HALF:
        a, b = a.float(), b.float()
    return a.contiguous(), b.contiguous()


# ---------------------------------------------------------------------------------------------------
# Gradients

def needs_grad(*tensors) -> bool:
    """Whether the engine must produce gradients: grad mode is on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forbid_double_backward() -> None:
    """The gradients are computed in the forward, so they are constants to autograd: a second
    derivative through them would silently be zero. ``create_graph=True`` (grad mode on inside the
    backward) is therefore an error rather than a wrong Hessian."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "fastcon's fused losses do not support double backward (create_graph=True): their gradients "
            "are computed in the forward pass and have no graph; use backend='reference' for higher-order "
            "derivatives")


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient is kept in until the backward: fp32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def final_grads(inputs, grads, factor: float):
    """``factor·grad`` for each input, kept wide (fp32 or float64): the backward multiplies by the
    upstream gradient first and rounds once to the input's dtype afterwards, so that neither a small
    factor like 1/(2N) nor an fp16 loss scale meets a bf16/fp16 rounding in between."""
    return tuple((g if factor == 1.0 else g * factor).to(wide_dtype(x.dtype)) for x, g in zip(inputs, grads))


def save_final_grads(ctx, inputs, grads, factor: float) -> None:
    """Saves ``final_grads`` on ``ctx`` for the inputs that need a gradient (None for the others,
    absent inputs among them), and the inputs' dtypes for ``scaled_grads``."""
    need = ctx.needs_input_grad
    ctx.grad_dtypes = tuple(None if x is None else x.dtype for x in inputs)
    ctx.save_for_backward(*[
        (g * factor).to(wide_dtype(x.dtype)) if need[k] and g is not None else None
        for k, (x, g) in enumerate(zip(inputs, grads))])


def _is_unit(grad_output: Tensor) -> bool:
    """An eager CPU upstream gradient of exactly 1 (``loss.backward()``), read without a device sync;
    never under tracing, where the value is not known."""
    return (type(grad_output) is Tensor and grad_output.device.type == "cpu" and grad_output.numel() == 1
            and not torch.compiler.is_compiling() and float(grad_output) == 1.0)


def scaled_grads(saved, grad_output, dtypes):
    """The saved (wide) gradients times the upstream gradient, each rounded once to its input's dtype
    (an upstream gradient of 1 multiplies nothing)."""
    unit = _is_unit(grad_output)
    out = []
    for t, dtype in zip(saved, dtypes):
        out.append(None if t is None else (t if unit else t * grad_output.to(t.dtype)).to(dtype))
    return tuple(out)


def no_grads(a: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(a.new_empty((0,)) for _ in range(4))


def grad_likes(a, b, scale, bias) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t, dtype=wide_dtype(t.dtype), memory_format=torch.contiguous_format)
                 for t in (a, b, scale, bias))


# ---------------------------------------------------------------------------------------------------

def backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype):
    """(backend operations, operands, scale and bias in the accumulation dtype, rows per chunk) of one
    engine call, inside an op (autocast off)."""
    x, y = engine_operands(a, b, backend, mm_dtype)
    acc = acc_dtype(x.dtype)
    chunk_rows = chunk_rows_for(x.shape[0], y.shape[0], x.device, chunk_size, backend)
    return backend_module(backend), x, y, scale.to(acc), bias.to(acc), chunk_rows



def saved_grads_backward(ctx, grad_loss, *_unused):
    """The backward of an operator whose forward returned (loss, its gradients...) and saved the
    gradients (``save_output_grads``): the upstream gradient times each, None for the other inputs."""
    forbid_double_backward()
    saved = ctx.saved_tensors
    if saved[2].dim() == 1:  # the (0,)-shaped placeholders: a scale gradient is 0-d
        raise RuntimeError("fastcon: the engine op was called with need_grad=False, so it computed no "
                           "gradients; call it with need_grad=True when its inputs require grad")
    return input_grads(ctx, scaled_grads(saved, grad_loss, ctx.grad_dtypes))


def input_grads(ctx, grads) -> tuple:
    """``grads`` of an operator's first inputs, and None for the rest of its ``ctx.n_inputs`` inputs."""
    return tuple(grads) + (None,) * (ctx.n_inputs - len(grads))


def save_output_grads(ctx, inputs, output):
    """``setup_context`` of an operator returning (loss, the gradients of its first inputs...)."""
    ctx.save_for_backward(*output[1:])
    ctx.grad_dtypes = tuple(t.dtype for t in inputs[:len(output) - 1])
    ctx.n_inputs = len(inputs)


def engine_scalars(scale: Tensor, bias: Optional[Tensor], dtype: torch.dtype, device) -> Tuple[Tensor, Tensor]:
    """``scale`` and ``bias`` as 0-d tensors of the accumulation dtype (bias 0 when None), keeping
    their autograd history."""
    scale = scale.to(device=device, dtype=dtype).reshape(())
    if bias is None:
        bias = torch.zeros((), dtype=dtype, device=device)
    else:
        bias = bias.to(device=device, dtype=dtype).reshape(())
    return scale, bias


def prepare_inputs(a, b, scale, bias, backend, chunk_size):
    """(backend name, autocast GEMM dtype or None, a, b, scale, bias, chunk_rows) for callers that
    drive a backend themselves (the distributed ring): they take ``engine_operands(a, b, name,
    mm_dtype)`` inside their autograd function, so that the gradients of the features come back in
    the features' own dtype, as the engine operators' do."""
    mm_dtype = autocast_gemm_dtype(a)
    name = resolve_name(backend, a.device, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    chunk_rows = chunk_rows_for(a.shape[0], b.shape[0], a.device, chunk_size, name)
    return name, mm_dtype, a, b, scale, bias, chunk_rows


# ---------------------------------------------------------------------------------------------------
# The direct C++ loss: a small problem on the CPU (at most SMALL_LOGITS logits, N = 1,024 square) on
# the C++ backend outside autocast is one C++ operator with its own autograd node
# (``kernels.cpp.direct_loss``: CLIP with its smoothing, SigLIP), which spares the Python glue of the
# operator's body, a fixed cost of 0.1 to 0.3 ms a call that matters below a few hundred rows, where
# the materialised formula would otherwise be faster. Same kernels, same numbers
# (tests/test_direct_calls.py), same saved gradients. Under torch.compile, and for tensor subclasses
# (FakeTensor), the registered operator runs.

SMALL_LOGITS = 1 << 20


def direct_call(name: str, a: Tensor, b: Tensor) -> bool:
    """Whether this engine call is small enough, on real CPU tensors, for a direct call (see above)."""
    if name not in ("cpp", "torch") or a.device.type != "cpu" or a.shape[0] * b.shape[0] > SMALL_LOGITS:
        return False
    if type(a) not in (Tensor, torch.nn.Parameter) or type(b) not in (Tensor, torch.nn.Parameter):
        return False
    return not torch.compiler.is_compiling()


def cpp_direct(name: str, a: Tensor, b: Tensor, mm_dtype: Optional[torch.dtype]) -> bool:
    """Whether this call may go to the C++ backend's own direct loss (``kernels.cpp.direct_loss``),
    which also spares the Python glue of the operator's body: a direct call on the C++ backend
    outside autocast (which would change the GEMMs' dtype or the loss's)."""
    return name == "cpp" and mm_dtype is None and loss_dtype(a) == a.dtype and direct_call(name, a, b)


def cpp_direct_loss(kind: str, a, b, scale, bias, pos_offset: int, chunk_size: Optional[int], *,
                     symmetric: bool = True, label_smoothing: float = 0.0) -> Tensor:
    """``kernels.cpp.direct_loss`` of ``kind`` ("softmax" or "sigmoid") with the chunk rows and the
    pass-1 cache the registered operator would get (the sigmoid loss keeps no cache)."""
    cpp = cpp_module()
    log_call(f"direct_loss[{kind}]", "eager, one C++ operator with its own autograd node (a small CPU call)",
             ("cpp", a, b))
    kinds = {"softmax": cpp.DIRECT_SOFTMAX, "sigmoid": cpp.DIRECT_SIGMOID}
    cache = cache_bytes(a.device) if kind == "softmax" else 0
    return cpp.direct_loss(a, b, scale, bias, kinds[kind], pos_offset, symmetric, label_smoothing,
                           chunk_rows_for(a.shape[0], b.shape[0], a.device, chunk_size, "cpp"), cache)


