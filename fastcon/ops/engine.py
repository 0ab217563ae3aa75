"""The engine as ``torch.library`` custom ops: backend choice, chunk sizing, autocast, and the loss
assembly that is the same for every backend.

A backend computes the O(N²) parts (LSE statistics, positive logits, softplus sums and their
gradients, see ``fastcon/kernels/__init__.py``); the O(N·D) label-smoothing sums are plain autograd
here, so that every backend shares them.

Two operators carry the engine, each returning the loss and the gradient of every tensor input::

    fastcon::softmax_loss(a, b, scale, bias, backend, pos_offset, label_smoothing, symmetric,
                          chunk_size, need_grad, mm_dtype) -> (loss, grad_a, grad_b, grad_scale, grad_bias)
    fastcon::sigmoid_loss(a, b, scale, bias, backend, pos_offset, chunk_size, need_grad, mm_dtype)
                          -> (loss, grad_a, grad_b, grad_scale, grad_bias)

(``fastcon::softmax_loss_triton`` and ``fastcon::sigmoid_loss_triton`` are the same operators for the
Triton backends, registered with ``torch.library.triton_op`` where torch has it, so that
``torch.compile`` traces into the kernel launches; ``triton_ops()`` registers them when a Triton
backend is first chosen.) ``backend`` is a resolved backend name, never a
Python object; the gradients are empty tensors when ``need_grad`` is false. The gradients are
computed inside the forward ("gradient in forward"): the second pass needs the complete statistics
of the first, so doing it at once costs no extra FLOPs, lets the CPU backend reuse the first pass's
logits chunks, and leaves the registered backward a multiplication by the upstream gradient. Each op
has a fake kernel (shapes and dtypes only) for FakeTensor, ``torch.compile`` and ``opcheck``.

Autocast: the ops run with autocast disabled inside. Under ``torch.autocast`` the wrappers below pass
the autocast dtype as ``mm_dtype``: the op rounds the features to it for the GEMMs (fp32
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
from typing import List, Optional, Tuple

import torch
from torch import Tensor

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

def _cpp_module() -> ModuleType:
    return importlib.import_module("fastcon.kernels.cpp")


def _triton_available(device: torch.device) -> Tuple[bool, Optional[str]]:
    try:
        from fastcon.kernels import triton as triton_backend
    except ImportError as exc:  # pragma: no cover - the package always ships it
        return False, f"fastcon.kernels.triton failed to import: {exc}"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    return triton_backend.available(device)


def backend_module(name: str) -> ModuleType:
    """The module implementing the engine contract for a resolved backend name."""
    if name == "torch":
        return importlib.import_module("fastcon.kernels.torch_chunked")
    if name == "cpp":
        return _cpp_module()
    if name == "triton":
        return importlib.import_module("fastcon.kernels.triton.chunked")
    if name == "triton_fused":
        return importlib.import_module("fastcon.kernels.triton.fused")
    raise ValueError(f"not an engine backend: {name!r}")


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
            ok, _ = _triton_available(device)
            backend = "triton" if ok and dtype != torch.float64 else "torch"
        elif device.type == "cpu":
            cpp = _cpp_module()
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
        cpp = _cpp_module()
        if not cpp.AVAILABLE:
            raise RuntimeError(f"backend='cpp' is unavailable: {cpp.REASON}")
        return backend
    # triton, triton_fused
    ok, reason = _triton_available(device)
    if not ok:
        raise RuntimeError(f"backend={backend!r} is unavailable on {device}: {reason}")
    if dtype == torch.float64:
        raise TypeError(f"backend={backend!r} supports float32, bfloat16 and float16 inputs, got float64")
    if device.type == "cpu" and dtype == torch.bfloat16:
        raise TypeError(f"backend={backend!r} on CPU tensors (Triton interpreter) supports float32 and float16; "
                        "the interpreter has no bfloat16")
    triton_ops()
    return backend


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, ModuleType]:
    """(name, module implementing the engine contract) for a ``backend=`` name."""
    name = resolve_name(backend, device, dtype)
    return name, backend_module(name)


_DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"


def _assume_constant(fn):
    """``fn``'s result is a constant to ``torch.compile`` (it is called once at trace time), so its
    imports, environment reads and warnings never break a graph. ``torch.compiler.
    assume_constant_result`` imports Dynamo (a second of import time) only to set one attribute on
    ``fn``; while Dynamo is not loaded, the attribute is set here directly (tests/test_compile.py
    checks that Dynamo still reads that attribute)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    setattr(fn, _DYNAMO_CONSTANT_MARK, True)
    return fn


@_assume_constant
def _traced_backend_name(backend: str, device_type: str, dtype: torch.dtype) -> str:
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


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient is kept in until the backward: fp32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def final_grads(inputs, grads, factor: float):
    """``factor·grad`` for each input, kept wide (fp32 or float64): the backward multiplies by the
    upstream gradient first and rounds once to the input's dtype afterwards, so that neither a small
    factor like 1/(2N) nor an fp16 loss scale meets a bf16/fp16 rounding in between."""
    return tuple((g if factor == 1.0 else g * factor).to(_wide(x.dtype)) for x, g in zip(inputs, grads))


def save_final_grads(ctx, inputs, grads, factor: float) -> None:
    """Saves ``final_grads`` on ``ctx`` for the inputs that need a gradient (None for the others),
    and the inputs' dtypes for ``scaled_grads``."""
    need = ctx.needs_input_grad
    ctx.grad_dtypes = tuple(x.dtype for x in inputs)
    ctx.save_for_backward(*[
        (g * factor).to(_wide(x.dtype)) if need[k] and g is not None else None
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


def _no_grads(a: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(a.new_empty((0,)) for _ in range(4))


def _grad_likes(a, b, scale, bias) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(t, dtype=_wide(t.dtype), memory_format=torch.contiguous_format)
                 for t in (a, b, scale, bias))


# ---------------------------------------------------------------------------------------------------
# The operators

def _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype):
    """(backend module, operands, scale and bias in the accumulation dtype, rows per chunk) of one
    engine call, inside an op (autocast off)."""
    x, y = engine_operands(a, b, backend, mm_dtype)
    acc = acc_dtype(x.dtype)
    chunk_rows = chunk_rows_for(x.shape[0], y.shape[0], x.device, chunk_size, backend)
    return backend_module(backend), x, y, scale.to(acc), bias.to(acc), chunk_rows


def _softmax_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, backend: str, pos_offset: int,
                  label_smoothing: float, symmetric: bool, chunk_size: int, need_grad: bool,
                  mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The symmetric InfoNCE without smoothing sums, in float64:
    (1/(2·Na))·Σ_i [(row_lse_i − (1−ε)·S_{i,c0+i}) + (col_lse_{c0+i} − (1−ε)·S_{i,c0+i})], c0 =
    ``pos_offset`` (only the first bracket over Na when not ``symmetric``), and its gradients. The
    positive logits come from the same tiles as the LSEs."""
    with autocast_off(a.device.type):
        impl, x, y, s, c, chunk_rows = _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        na = x.shape[0]
        w_col = 1.0 if symmetric else 0.0
        denom = (2 if symmetric else 1) * na
        eps = label_smoothing
        # The C++ kernels (fp32/float64, no fp16 lift) take the loss's 1/denom into their weights, which
        # spares two passes over each gradient; the other backends scale their gradients afterwards.
        fold = 1.0 / denom if backend == "cpp" else 1.0
        if need_grad:
            row_lse, col_lse, pos_logit, *grads = impl.softmax_fused(
                x, y, s, c, pos_offset, fold, w_col * fold, (1.0 + w_col) * (1.0 - eps) * fold, chunk_rows,
                cache_bytes(x.device))
        else:
            row_lse, col_lse, pos_logit = impl.lse_stats(x, y, s, c, pos_offset, chunk_rows)
        # Per-row differences in float64: each is small next to the LSE and the logit it subtracts.
        target = (1.0 - eps) * pos_logit.double()
        terms = row_lse - target
        if symmetric:
            terms = terms + (col_lse[pos_offset:pos_offset + na] - target)
        loss = terms.sum() / denom
        if not need_grad:
            return (loss,) + _no_grads(a)
        return (loss,) + final_grads((a, b, scale, bias), grads, 1.0 / denom / fold)


def _softmax_loss_fake(a, b, scale, bias, backend, pos_offset, label_smoothing, symmetric, chunk_size, need_grad,
                       mm_dtype):
    loss = a.new_empty((), dtype=torch.float64)
    return (loss,) + (_grad_likes(a, b, scale, bias) if need_grad else _no_grads(a))


def _sigmoid_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, backend: str, pos_offset: int,
                  chunk_size: int, need_grad: bool,
                  mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(1/Na)·Σ_ij softplus(−z_ij·S_ij), z = +1 only at j = i + pos_offset (``pos_offset >= Nb``: no
    positives), in the accumulation dtype, and its gradients."""
    with autocast_off(a.device.type):
        impl, x, y, s, c, chunk_rows = _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        na = x.shape[0]
        fold = 1.0 / na if backend == "cpp" else 1.0  # as in _softmax_loss
        loss_sum, *grads = impl.sigmoid_fused(x, y, s, c, pos_offset, fold, chunk_rows, need_grad)
        loss = loss_sum / na
        if not need_grad:
            return (loss,) + _no_grads(a)
        return (loss,) + final_grads((a, b, scale, bias), grads, 1.0 / na / fold)


def _sigmoid_loss_fake(a, b, scale, bias, backend, pos_offset, chunk_size, need_grad, mm_dtype):
    loss = a.new_empty((), dtype=acc_dtype(a.dtype))
    return (loss,) + (_grad_likes(a, b, scale, bias) if need_grad else _no_grads(a))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.grad_dtypes = tuple(t.dtype for t in inputs[:4])


def _backward_of(n_other_args: int):
    def backward(ctx, grad_loss, *_unused):
        forbid_double_backward()
        saved = ctx.saved_tensors
        if saved[2].dim() == 1:  # the (0,)-shaped placeholders: a scale gradient is 0-d
            raise RuntimeError("fastcon: the engine op was called with need_grad=False, so it computed no "
                               "gradients; call it with need_grad=True when its inputs require grad")
        return scaled_grads(saved, grad_loss, ctx.grad_dtypes) + (None,) * n_other_args
    return backward


_SOFTMAX_OTHER_ARGS = 7  # backend, pos_offset, label_smoothing, symmetric, chunk_size, need_grad, mm_dtype
_SIGMOID_OTHER_ARGS = 5  # backend, pos_offset, chunk_size, need_grad, mm_dtype
HAS_TRITON_OP = hasattr(torch.library, "triton_op")


def _register(name: str, fn, fake, n_other: int, triton: bool):
    if triton and HAS_TRITON_OP:
        # The body is traceable (torch ops and wrap_triton launches), so torch.compile derives the
        # fake kernel by tracing it and sees the Triton kernels themselves.
        op = torch.library.triton_op(name, fn, mutates_args=())
    else:
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
    op.register_autograd(_backward_of(n_other), setup_context=_setup_context)
    return op


softmax_loss = _register("fastcon::softmax_loss", _softmax_loss, _softmax_loss_fake, _SOFTMAX_OTHER_ARGS, False)
sigmoid_loss = _register("fastcon::sigmoid_loss", _sigmoid_loss, _sigmoid_loss_fake, _SIGMOID_OTHER_ARGS, False)
_TRITON_OPS: dict = {}


def _shipped_triton_kernels() -> list:
    """Every Triton kernel the Triton backends launch (through ``launch``, which torch's scan of a
    triton_op's source does not see)."""
    import triton

    from fastcon.kernels.triton import chunked, fused, gemm, target

    return [v for m in (chunked, fused, gemm, target) for v in vars(m).values()
            if isinstance(v, triton.runtime.JITFunction)]


def triton_ops():
    """Registers ``fastcon::softmax_loss_triton`` and ``fastcon::sigmoid_loss_triton`` on first use
    (registering a triton_op imports Inductor, a second of import time that CPU users need not pay).
    Their kernels are recorded for torch.compile's cache key, so that edited kernels are recompiled."""
    if not _TRITON_OPS:
        _TRITON_OPS["softmax"] = _register("fastcon::softmax_loss_triton", _softmax_loss, _softmax_loss_fake,
                                           _SOFTMAX_OTHER_ARGS, True)
        _TRITON_OPS["sigmoid"] = _register("fastcon::sigmoid_loss_triton", _sigmoid_loss, _sigmoid_loss_fake,
                                           _SIGMOID_OTHER_ARGS, True)
        registry = getattr(getattr(torch._library, "triton", None), "triton_ops_to_kernels", None)
        if HAS_TRITON_OP and isinstance(registry, dict):
            try:
                kernels = _shipped_triton_kernels()
            except ImportError:  # triton missing: the backends report it when used
                kernels = []
            for name in ("fastcon::softmax_loss_triton", "fastcon::sigmoid_loss_triton"):
                registry[name] = kernels
    return _TRITON_OPS["softmax"], _TRITON_OPS["sigmoid"]


# ---------------------------------------------------------------------------------------------------
# O(N·D) helper of label smoothing

class _ColumnSum(torch.autograd.Function):
    """Σ_i a_i in the accumulation dtype, of the rows as the GEMMs see them (rounded to ``mm_dtype``
    under autocast), with the gradient of that sum passed straight to ``a`` in its own dtype (no
    rounding of the gradient to the autocast dtype)."""

    @staticmethod
    def forward(ctx, a, acc, mm_dtype):
        ctx.shape, ctx.dtype = a.shape, a.dtype
        with autocast_off(a.device.type):
            x = a if mm_dtype is None else a.to(mm_dtype)
            return x.sum(dim=0, dtype=acc)

    @staticmethod
    def backward(ctx, grad):
        return grad.expand(ctx.shape).to(ctx.dtype), None, None


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
# Direct calls: a small problem on the CPU (at most SMALL_LOGITS logits, N = 1,024 square) skips
# the torch.library dispatcher. On the C++ backend outside autocast the whole loss is one C++ operator with its own
# autograd node (``kernels.cpp.direct_loss``: CLIP with its smoothing, SigLIP), which also spares the
# Python glue of the operator's body; elsewhere (the torch backend, autocast) the body runs through a
# plain autograd function. Same kernels, same numbers (tests/test_direct_calls.py), same saved
# gradients; what it skips is a fixed cost of 0.1 to 0.3 ms a call, most of the time below a few
# hundred rows, where the materialised formula would otherwise be faster. Under torch.compile, and
# for tensor subclasses (FakeTensor), the registered operator runs.

SMALL_LOGITS = 1 << 20


def direct_call(name: str, a: Tensor, b: Tensor) -> bool:
    """Whether this engine call may skip the dispatcher (see above)."""
    if name not in ("cpp", "torch") or a.device.type != "cpu" or a.shape[0] * b.shape[0] > SMALL_LOGITS:
        return False
    if type(a) not in (Tensor, torch.nn.Parameter) or type(b) not in (Tensor, torch.nn.Parameter):
        return False
    return not torch.compiler.is_compiling()


class _Direct(torch.autograd.Function):
    """``body(a, b, scale, bias, *other) -> (loss, grad_a, grad_b, grad_scale, grad_bias)`` (an engine
    operator's body) as an autograd function: the loss, and in the backward the saved gradients times
    the upstream gradient (``scaled_grads``), as the registered operator's autograd does."""

    @staticmethod
    def forward(ctx, body, a, b, scale, bias, *other):
        loss, *grads = body(a, b, scale, bias, *other)
        ctx.save_for_backward(*grads)
        ctx.grad_dtypes = tuple(t.dtype for t in (a, b, scale, bias))
        ctx.n_other = len(other)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (None,) + _backward_of(ctx.n_other)(ctx, grad_loss)


def _cpp_direct(name: str, a: Tensor, b: Tensor, mm_dtype: Optional[torch.dtype]) -> bool:
    """Whether this call may go to the C++ backend's own direct loss (``kernels.cpp.direct_loss``),
    which also spares the Python glue of the operator's body: a direct call on the C++ backend
    outside autocast (which would change the GEMMs' dtype or the loss's)."""
    return name == "cpp" and mm_dtype is None and loss_dtype(a) == a.dtype and direct_call(name, a, b)


def _cpp_direct_loss(kind: str, a, b, scale, bias, pos_offset: int, chunk_size: Optional[int], *,
                     symmetric: bool = True, label_smoothing: float = 0.0) -> Tensor:
    """``kernels.cpp.direct_loss`` of ``kind`` ("softmax" or "sigmoid") with the chunk rows and the
    pass-1 cache the registered operator would get (the sigmoid loss keeps no cache)."""
    cpp = _cpp_module()
    kinds = {"softmax": cpp.DIRECT_SOFTMAX, "sigmoid": cpp.DIRECT_SIGMOID}
    cache = cache_bytes(a.device) if kind == "softmax" else 0
    return cpp.direct_loss(a, b, scale, bias, kinds[kind], pos_offset, symmetric, label_smoothing,
                           chunk_rows_for(a.shape[0], b.shape[0], a.device, chunk_size, "cpp"), cache)


def _engine_loss(body, op, a, b, scale, bias, name: str, *other) -> Tensor:
    """The loss of one engine operator call: ``body`` directly where ``direct_call`` allows, else the
    registered operator ``op``."""
    if direct_call(name, a, b):
        return _Direct.apply(body, a, b, scale, bias, name, *other)
    return op(a, b, scale, bias, name, *other)[0]


def clip_engine_loss(a, b, scale, bias, *, label_smoothing: float, pos_offset: int, backend: str,
                     chunk_size: Optional[int], symmetric: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (docs/losses.md §1.1) on the engine; arguments already validated. With
    ``symmetric=False`` only the row direction: (1/Na)·Σ_i CE(S_i·, pos_offset + i)."""
    mm_dtype = autocast_gemm_dtype(a)
    name = _traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    eps = label_smoothing
    if _cpp_direct(name, a, b, mm_dtype):
        return _cpp_direct_loss("softmax", a, b, scale, bias, pos_offset, chunk_size, symmetric=symmetric,
                                label_smoothing=eps)
    out_dtype = loss_dtype(a)
    acc = acc_dtype(a.dtype)
    scale, bias = engine_scalars(scale, bias, acc, a.device)
    na, nb = a.shape[0], b.shape[0]
    op = torch.ops.fastcon.softmax_loss_triton if name in TRITON_BACKENDS else softmax_loss
    loss = _engine_loss(_softmax_loss, op, a, b, scale, bias, name, int(pos_offset), float(eps), bool(symmetric),
                        int(chunk_size or 0), needs_grad(a, b, scale, bias), mm_dtype)
    if eps > 0:
        # The smoothing targets ε/Nb add −(ε/Nb)·Σ_ij S_ij to the row terms, and Σ_ij S_ij =
        # s·(Σ_i a_i)·(Σ_j b_j) + Na·Nb·b; likewise ε/Na for the columns that own a positive. Two column
        # sums, O(N·D), no N×N; their dot product in float64.
        denom = (2 if symmetric else 1) * na
        sum_a = _ColumnSum.apply(a, acc, mm_dtype).double()
        sum_b = _ColumnSum.apply(b, acc, mm_dtype).double()
        s64, b64 = scale.double(), bias.double()
        total = (eps / nb) * (s64 * (sum_a @ sum_b) + na * nb * b64)
        if symmetric:
            sum_b_pos = _ColumnSum.apply(b[pos_offset:pos_offset + na], acc, mm_dtype).double()
            total = total + (eps / na) * (s64 * (sum_b_pos @ sum_a) + na * na * b64)
        loss = loss - total / denom
    return loss.to(acc).to(out_dtype)


def siglip_engine_loss(a, b, scale, bias, *, pos_offset: Optional[int], backend: str,
                       chunk_size: Optional[int]) -> torch.Tensor:
    """SigLIP (docs/losses.md §1.2) on the engine; ``pos_offset=None`` means negatives only."""
    mm_dtype = autocast_gemm_dtype(a)
    name = _traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    offset = b.shape[0] if pos_offset is None else pos_offset
    if _cpp_direct(name, a, b, mm_dtype):
        return _cpp_direct_loss("sigmoid", a, b, scale, bias, offset, chunk_size)
    out_dtype = loss_dtype(a)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    op = torch.ops.fastcon.sigmoid_loss_triton if name in TRITON_BACKENDS else sigmoid_loss
    loss = _engine_loss(_sigmoid_loss, op, a, b, scale, bias, name, int(offset), int(chunk_size or 0),
                        needs_grad(a, b, scale, bias), mm_dtype)
    return loss.to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# The general target (fastcon/kernels/targets.py). Its executable statement is the torch backend's;
# the C++ backend, the chunked Triton path and the fused Triton tile kernels (D <= 256) have its two
# passes; its backend is chosen as for the other losses (``_traced_backend_name``).

def _target_softmax_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, target_tensors: List[Optional[Tensor]],
                         backend: str, pair_offset: int, margin: Optional[float],
                         numbers: List[float], label_smoothing: float, symmetric: bool,
                         chunk_size: int, cache_limit: int, need_grad: bool,
                         mm_dtype: Optional[torch.dtype]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The softmax loss of a general target (``fastcon.kernels.torch_chunked.target_softmax_fused``) in
    float64, and its gradients. The target's tensors come as one list (``targets.TENSOR_FIELDS``), its
    numbers as another (``targets.NUMBER_FIELDS``); ``cache_limit`` bounds the bytes of pass-1 logits kept for pass 2 (−1: ``cache_bytes()``)."""
    from fastcon.kernels.targets import target_from

    with backend_context(a.device.type):
        impl, x, y, s, c, chunk_rows = _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = target_from(target_tensors, pair_offset, margin, numbers)
        limit = cache_bytes(x.device) if cache_limit < 0 else cache_limit
        loss, *grads = impl.target_softmax_fused(x, y, s, c, target, label_smoothing, symmetric, chunk_rows,
                                                 need_grad, limit)
        if not need_grad:
            return (loss,) + _no_grads(a)
        return (loss,) + final_grads((a, b, scale, bias), grads, 1.0)


def _target_softmax_loss_fake(a, b, scale, bias, target_tensors, backend, pair_offset, margin, numbers,
                              label_smoothing, symmetric, chunk_size, cache_limit, need_grad, mm_dtype):
    loss = a.new_empty((), dtype=torch.float64)
    return (loss,) + (_grad_likes(a, b, scale, bias) if need_grad else _no_grads(a))


_TARGET_OTHER_ARGS = 11  # target_tensors .. mm_dtype: the arguments after a, b, scale, bias
target_softmax_loss = _register("fastcon::target_softmax_loss", _target_softmax_loss, _target_softmax_loss_fake,
                                _TARGET_OTHER_ARGS, False)


def target_engine_loss(a, b, scale, bias, target, *, label_smoothing: float = 0.0, symmetric: bool = True,
                       backend: str = "auto", chunk_size: Optional[int] = None,
                       cache_limit: Optional[int] = None) -> torch.Tensor:
    """A general-target softmax loss on the engine (``target``: a ``fastcon.kernels.targets.Target``);
    arguments already validated. ``cache_limit``: bytes of pass-1 logits kept for pass 2 (None: the
    backend's default, ``FASTCON_CACHE_BYTES``). Returns the fp32 (float64 for float64 inputs) loss
    in ``loss_dtype(a)``."""
    from fastcon.kernels.targets import target_numbers, target_tensors

    out_dtype = loss_dtype(a)
    mm_dtype = autocast_gemm_dtype(a)
    name = _traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    t = target
    loss, *_ = target_softmax_loss(a, b, scale, bias, target_tensors(t), name,
                                   int(t.pair_offset),
                                   None if t.margin is None else float(t.margin), target_numbers(t),
                                   float(label_smoothing), bool(symmetric),
                                   int(chunk_size or 0), -1 if cache_limit is None else int(cache_limit),
                                   needs_grad(a, b, scale, bias), mm_dtype)
    return loss.to(acc_dtype(a.dtype)).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# A soft target's two losses from one pass: the contrastive loss of its hard targets and the soft
# cross-entropy against the teacher share the student's LSEs (open_clip's DistillClipLoss returns the
# two). Pass 1 runs in the forward; pass 2 runs in the backward, once, for the gradient of
# g_hard·L_hard + g_soft·L_soft (G = P − (g_hard·Q_hard + g_soft·Q_soft)/(g_hard + g_soft), times the
# sum), so the pair costs the GEMMs of one loss.

_PAIR_STATS = ("row_lse", "row_pos", "row_keep", "col_lse", "col_pos", "col_keep", "t_row_norm", "t_col_norm")


def target_passes(backend: str):
    """(target_stats, target_grad) of a resolved backend: its two passes of the general target."""
    if backend == "triton":
        from fastcon.kernels.triton import target as impl
    else:
        impl = backend_module(backend)
    return impl.target_stats, impl.target_grad


def _pair_targets(target):
    """(the hard part, the soft part) of a soft target: Q_hard = (1−ε)·[pos]/|P| + ε/|K|, Q_soft = Qt."""
    return target._replace(soft=0.0, hard=None, entropy=False), target._replace(hard=0.0, entropy=False)


def _target_pair_loss(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, target_tensors: List[Optional[Tensor]],
                      backend: str, pair_offset: int, numbers: List[float], label_smoothing: float, symmetric: bool,
                      chunk_size: int, mm_dtype: Optional[torch.dtype]) -> List[Tensor]:
    """[L_hard, L_soft (float64), then the statistics pass 2 needs (``_PAIR_STATS``)]: the teacher's
    pass and pass 1 of a soft target, both losses from the same LSEs."""
    from fastcon.kernels.targets import loss_and_weights, target_from, teacher_norms, teacher_stats

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = target_from(target_tensors, pair_offset, None, numbers)
        stats_fn, _ = target_passes(backend)
        teacher = teacher_norms(target, teacher_stats(stats_fn, target, symmetric, chunk_rows), symmetric)
        st, _ = stats_fn(x, y, s, c, target, symmetric, bool(label_smoothing), chunk_rows, 0, teacher)
        hard, soft = _pair_targets(target)
        l_hard, _ = loss_and_weights(hard, st, label_smoothing, symmetric, s.dtype)
        l_soft, _ = loss_and_weights(soft, st, 0.0, symmetric, s.dtype)
        empty = a.new_empty((0,), dtype=torch.float64)
        out = [l_hard.double(), l_soft.double()]
        for f in _PAIR_STATS:
            v = getattr(st, f) if f != "t_col_norm" else teacher.col_norm
            out.append(empty if v is None or (f.startswith("col") and not symmetric) else v)
        return out


def _target_pair_loss_fake(a, b, scale, bias, target_tensors, backend, pair_offset, numbers, label_smoothing,
                           symmetric, chunk_size, mm_dtype):
    na, nb = a.shape[0], b.shape[0]
    acc = acc_dtype(a.dtype)
    f64 = torch.float64
    cols = nb if symmetric else 0
    return [a.new_empty((), dtype=f64), a.new_empty((), dtype=f64),
            a.new_empty((na,), dtype=f64), a.new_empty((na,), dtype=acc), a.new_empty((na,), dtype=acc),
            a.new_empty((cols,), dtype=f64), a.new_empty((cols,), dtype=acc), a.new_empty((cols,), dtype=acc),
            a.new_empty((na,), dtype=f64), a.new_empty((cols,), dtype=f64)]


def _target_pair_grad(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, target_tensors: List[Optional[Tensor]],
                      backend: str, pair_offset: int, numbers: List[float], label_smoothing: float, symmetric: bool,
                      chunk_size: int, mm_dtype: Optional[torch.dtype], stats: List[Tensor],
                      upstream: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pass 2 of ``_target_pair_loss`` for the upstream gradients ``upstream = (g_hard, g_soft)``: the
    (wide) gradients of g_hard·L_hard + g_soft·L_soft with respect to a, b, scale and bias."""
    from fastcon.kernels.targets import TargetStats, loss_and_weights, target_from

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = target_from(target_tensors, pair_offset, None, numbers)
        _, grad_fn = target_passes(backend)
        st = dict(zip(_PAIR_STATS, stats))
        na, nb = x.shape[0], y.shape[0]
        zeros = lambda n: torch.zeros(n, dtype=torch.float64, device=x.device)  # noqa: E731
        if not symmetric:
            st.update(col_lse=torch.full((nb,), float("-inf"), dtype=torch.float64, device=x.device),
                      col_pos=torch.zeros(nb, dtype=st["row_pos"].dtype, device=x.device),
                      col_keep=torch.zeros(nb, dtype=st["row_pos"].dtype, device=x.device), t_col_norm=None)
        full = TargetStats(row_sum_pos=zeros(na), row_sum_keep=zeros(na), col_sum_pos=zeros(nb), col_sum_keep=zeros(nb),
                           cross_row=zeros(na), cross_col=zeros(nb), **st)
        g_hard, g_soft = (float(v) for v in upstream.double().cpu())
        eps = label_smoothing
        hard, soft = _pair_targets(target)
        total = g_hard + g_soft
        if total != 0.0:  # one pass: P − Q of the mixed targets, times the sum
            u, v = g_hard / total, g_soft / total
            parts = [(total, target._replace(hard=u * (1.0 - eps), soft=v * target.soft, entropy=False), u * eps)]
        else:  # g_soft = −g_hard: no softmax term is left, the two parts apart
            parts = [(g_hard, hard, eps), (g_soft, soft, 0.0)]
        grads = None
        for factor, t, e in parts:
            _, weights = loss_and_weights(t, full, e, symmetric, s.dtype)
            g = grad_fn(x, y, s, c, t, weights, chunk_rows)
            g = [factor * v for v in g]
            grads = g if grads is None else [p + q for p, q in zip(grads, g)]
        return final_grads((a, b, scale, bias), grads, 1.0)


def _target_pair_grad_fake(a, b, scale, bias, target_tensors, backend, pair_offset, numbers, label_smoothing,
                           symmetric, chunk_size, mm_dtype, stats, upstream):
    return _grad_likes(a, b, scale, bias)


_PAIR_OTHER = ("target_tensors", "backend", "pair_offset", "numbers", "label_smoothing", "symmetric", "chunk_size",
               "mm_dtype")


def _pair_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], *output[2:], *[t for t in inputs[4] if t is not None])
    ctx.present = [t is not None for t in inputs[4]]
    ctx.other = inputs[5:]


def _pair_backward(ctx, grads_out):
    forbid_double_backward()
    saved = ctx.saved_tensors
    a, b, scale, bias = saved[:4]
    stats = list(saved[4:4 + len(_PAIR_STATS)])
    rest = iter(saved[4 + len(_PAIR_STATS):])
    tensors = [next(rest) if p else None for p in ctx.present]
    g = [torch.zeros((), dtype=torch.float64, device=a.device) if t is None else t.reshape(()) for t in grads_out[:2]]
    upstream = torch.stack([t.to(device=a.device, dtype=torch.float64) for t in g])
    wide = target_pair_grad(a, b, scale, bias, tensors, *ctx.other, stats, upstream)
    out = [None if not ctx.needs_input_grad[k] else w.to(x.dtype) for k, (x, w) in enumerate(zip((a, b, scale, bias),
                                                                                                 wide))]
    return tuple(out) + (None,) * len(_PAIR_OTHER)


target_pair_loss = torch.library.custom_op("fastcon::target_pair_loss", _target_pair_loss, mutates_args=())
target_pair_loss.register_fake(_target_pair_loss_fake)
target_pair_grad = torch.library.custom_op("fastcon::target_pair_grad", _target_pair_grad, mutates_args=())
target_pair_grad.register_fake(_target_pair_grad_fake)
target_pair_loss.register_autograd(_pair_backward, setup_context=_pair_setup)


def target_pair_engine_loss(a, b, scale, bias, target, *, label_smoothing: float = 0.0, symmetric: bool = True,
                            backend: str = "auto", chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(L_hard, L_soft) of a soft ``target`` (a ``fastcon.kernels.targets.Target`` with a teacher,
    no margin, no entropy term) from one engine pass: the contrastive loss of its hard positives (with
    ``label_smoothing``) and the soft cross-entropy against the teacher, each with its own gradient
    (pass 2 in the backward, once for both). Returns the two losses in ``loss_dtype(a)``."""
    from fastcon.kernels.targets import target_numbers, target_tensors

    if target.margin is not None or target.entropy or not target.soft:
        raise ValueError("target_pair_engine_loss takes a soft target without margin or entropy term")
    out_dtype = loss_dtype(a)
    mm_dtype = autocast_gemm_dtype(a)
    name = _traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    out = target_pair_loss(a, b, scale, bias, target_tensors(target), name, int(target.pair_offset),
                           target_numbers(target), float(label_smoothing), bool(symmetric), int(chunk_size or 0),
                           mm_dtype)
    return tuple(v.to(acc_dtype(a.dtype)).to(out_dtype) for v in out[:2])


# ---------------------------------------------------------------------------------------------------
# Each row's LSE over its kept pairs, differentiable: for losses whose rows meet logits from outside
# the tiles (a positive given apart, synthetic negatives), combined with them in O(N) autograd. Pass 1
# in the forward; pass 2 in the backward with the upstream gradient u_i of each row's LSE as the row's
# target mass: G_ij = u_i·exp(S_ij − LSE_i) on the kept pairs.

def _lse_target(target):
    return target._replace(soft=0.0, hard=0.0, entropy=False, teacher_a=None, teacher_b=None, teacher_scale=None)


def _target_row_lse(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, target_tensors: List[Optional[Tensor]],
                    backend: str, pair_offset: int, numbers: List[float], chunk_size: int,
                    mm_dtype: Optional[torch.dtype]) -> Tensor:
    """(Na,) float64: the LSE of each row of ``s·A·Bᵀ + b`` over the target's kept pairs (−inf where
    none is kept)."""
    from fastcon.kernels.targets import target_from

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = _lse_target(target_from(target_tensors, pair_offset, None, numbers))
        stats_fn, _ = target_passes(backend)
        st, _ = stats_fn(x, y, s, c, target, False, False, chunk_rows, 0)
        return st.row_lse.clone()


def _target_row_lse_fake(a, b, scale, bias, target_tensors, backend, pair_offset, numbers, chunk_size, mm_dtype):
    return a.new_empty((a.shape[0],), dtype=torch.float64)


def _target_row_lse_grad(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, target_tensors: List[Optional[Tensor]],
                         backend: str, pair_offset: int, numbers: List[float], chunk_size: int,
                         mm_dtype: Optional[torch.dtype], row_lse: Tensor,
                         upstream: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (wide) gradients of Σ_i u_i·LSE_i (``upstream`` = u) with respect to a, b, scale and bias."""
    from fastcon.kernels.targets import TargetWeights, target_from

    with backend_context(a.device.type):
        _, x, y, s, c, chunk_rows = _backend_inputs(a, b, scale, bias, backend, chunk_size, mm_dtype)
        target = _lse_target(target_from(target_tensors, pair_offset, None, numbers))
        _, grad_fn = target_passes(backend)
        u = upstream.to(torch.float64)
        peak = float(u.abs().max()) if u.numel() else 0.0
        if peak == 0.0 or not peak < float("inf"):
            if peak != 0.0:
                raise ValueError("the upstream gradient of a row LSE is not finite")
            return tuple(torch.zeros_like(t, dtype=_wide(t.dtype)) for t in (a, b, scale, bias))
        acc = s.dtype
        zeros = torch.zeros(x.shape[0], dtype=acc, device=x.device)
        # |mass| <= 1 (the bound the Triton path's fp16 lift assumes); the peak is the row weight
        weights = TargetWeights(row_lse, zeros, zeros, peak, row_mass=(u / peak).to(acc))
        grads = grad_fn(x, y, s, c, target, weights, chunk_rows)
        return final_grads((a, b, scale, bias), grads, 1.0)


def _target_row_lse_grad_fake(a, b, scale, bias, target_tensors, backend, pair_offset, numbers, chunk_size,
                              mm_dtype, row_lse, upstream):
    return _grad_likes(a, b, scale, bias)


_ROW_LSE_OTHER = 6  # target_tensors, backend, pair_offset, numbers, chunk_size, mm_dtype


def _row_lse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], output, *[t for t in inputs[4] if t is not None])
    ctx.present = [t is not None for t in inputs[4]]
    ctx.other = inputs[5:]


def _row_lse_backward(ctx, grad):
    forbid_double_backward()
    saved = ctx.saved_tensors
    a, b, scale, bias, row_lse = saved[:5]
    rest = iter(saved[5:])
    tensors = [next(rest) if p else None for p in ctx.present]
    wide = target_row_lse_grad(a, b, scale, bias, tensors, *ctx.other, row_lse, grad.to(torch.float64))
    out = [None if not ctx.needs_input_grad[k] else w.to(x.dtype) for k, (x, w) in enumerate(zip((a, b, scale, bias),
                                                                                                 wide))]
    return tuple(out) + (None,) * _ROW_LSE_OTHER


target_row_lse_op = torch.library.custom_op("fastcon::target_row_lse", _target_row_lse, mutates_args=())
target_row_lse_op.register_fake(_target_row_lse_fake)
target_row_lse_grad = torch.library.custom_op("fastcon::target_row_lse_grad", _target_row_lse_grad, mutates_args=())
target_row_lse_grad.register_fake(_target_row_lse_grad_fake)
target_row_lse_op.register_autograd(_row_lse_backward, setup_context=_row_lse_setup)


def target_row_lse(a, b, scale, bias, target, *, backend: str = "auto", chunk_size: Optional[int] = None) -> Tensor:
    """(Na,) float64: each row's LSE of ``S = s·A·Bᵀ + b`` over the kept pairs of ``target`` (its
    positives and soft fields are not used), with the gradient of any weighting of the rows (pass 2 in
    the backward). float64, so that a caller who subtracts a logit of its own (LSE − S_pos cancels to
    a small loss) keeps the precision of the engine's float64 LSE. Memory O((Na + Nb)·D + chunk·Nb)."""
    from fastcon.kernels.targets import target_numbers, target_tensors

    mm_dtype = autocast_gemm_dtype(a)
    name = _traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    scale, bias = engine_scalars(scale, bias, acc_dtype(a.dtype), a.device)
    target = _lse_target(target)
    return target_row_lse_op(a, b, scale, bias, target_tensors(target), name, int(target.pair_offset),
                             target_numbers(target), int(chunk_size or 0), mm_dtype)
