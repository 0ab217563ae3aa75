"""``fastcon.backend_info()``: which backends are usable here, and why not."""
from __future__ import annotations

import importlib
import math
import os
import platform

import torch

from ._version import __version__
from .kernels import contract
from .kernels._common import producer_setting
from .ops import engine, registry


def backend_info(pretty: bool = False):
    """A dict describing the backends on this machine: for each backend whether it is usable and, if
    not, why; what ``backend="auto"`` picks per device (on CUDA: what it would pick with a GPU, with
    ``cuda_available`` saying whether there is one); the chunk and cache budgets in bytes; the SIMD
    build of the C++ kernels this CPU runs; the kernels that are not implemented yet.

    ``pretty=True`` gives the same as a short text table instead (``python -m fastcon info`` prints
    it). ``FASTCON_LOG=1`` (or the ``logging`` logger ``"fastcon"`` at DEBUG) logs the backend and
    path of every engine call."""
    if pretty:
        return format_info(backend_info())
    cpu = torch.device("cpu")
    cpp = importlib.import_module("fastcon.kernels.cpp")
    cuda = torch.cuda.is_available()
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": cuda,
        "backends": {},
        "not_implemented": [],
    }
    for key, fn in (("chunk_bytes", engine.chunk_bytes), ("cache_bytes", engine.cache_bytes)):
        try:
            # without a GPU here, the GPU budget is stated as the rule (it scales with the device)
            fixed = cuda or key == "cache_bytes" or os.environ.get("FASTCON_CHUNK_BYTES")
            gpu = fn(torch.device("cuda")) if fixed else engine.GPU_CHUNK_RULE
            info[key] = {"cpu": fn(cpu), "cuda": gpu}
        except ValueError as exc:  # a malformed FASTCON_* variable: report it, the losses will raise it
            info[key] = {"error": str(exc)}
    backends = info["backends"]
    backends["cpp"] = {"available": bool(cpp.AVAILABLE), "reason": cpp.REASON, "devices": ["cpu"],
                       "origin": (cpp.ORIGIN or None) if cpp.AVAILABLE else None, "simd": cpp.simd_level()}
    backends["torch"] = {"available": True, "reason": None, "devices": ["cpu", "cuda"]}
    backends["reference"] = {"available": True, "reason": None, "devices": ["cpu", "cuda"]}
    triton_spec = importlib.util.find_spec("triton")
    for name in ("triton", "triton_fused"):
        if triton_spec is None:
            entry = {"available": False, "reason": "triton is not installed (pip install triton)"}
        else:
            device = torch.device("cuda") if cuda else cpu
            ok, reason = engine.triton_available(device)
            entry = {"available": ok, "reason": reason, "device": str(device),
                     "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}
        backends[name] = entry
    from .kernels._common import cuda_half_gemm_ok

    half_ok, half_reason = cuda_half_gemm_ok()
    info["gemm"] = {
        "cuda_half": ("torch.mm(out_dtype=torch.float32): bf16/fp16 tensor-core GEMMs with fp32 output"
                      if half_ok else f"unavailable: {half_reason}"),
        "cuda_half_grad_b": "Triton GEMM accumulating in place into the fp32 gradient (fastcon/kernels/triton/gemm.py)",
        "cpu_half": ("operands widened to fp32 (torch has no bf16/fp16 GEMM with fp32 output on the CPU): "
                     "the same exact products, accumulated in fp32"),
        "fp16_grad_lift": "G times a power of two before its fp16 cast, undone in the GEMMs' alpha",
    }
    try:
        producer = producer_setting()
        info["gemm"]["triton_producer"] = (
            f"FASTCON_TRITON_PRODUCER={producer}: auto takes the matmul producer (the epilogue kernels form their "
            "tiles with tl.dot, no logit in memory) for bf16/fp16 on a GPU, except soft targets; cuBLAS chunks "
            "with fp32 output otherwise")
    except ValueError as exc:  # reported here; a Triton call raises it
        info["gemm"]["triton_producer"] = {"error": str(exc)}
    info["ops"] = {
        "custom_ops": [op.name for op in registry.OPS.values() if not op.triton],
        "triton_ops": [op.name for op in registry.OPS.values() if op.triton],
        "triton_op_registration": "torch.library.triton_op" if registry.HAS_TRITON_OP else "torch.library.custom_op",
        "eager_calls": ("plain tensors outside torch.compile run each operator's body through an autograd "
                        "function; the registered operators run under torch.compile and for tensor subclasses"),
        "autocast": "features rounded to the autocast dtype for the GEMMs; statistics fp32/float64; fp32 loss",
        "direct_calls": (f"CLIP and SigLIP on CPU tensors with at most {engine.SMALL_LOGITS:,} logits (N = "
                         f"{math.isqrt(engine.SMALL_LOGITS):,} square) on the cpp backend run as one C++ operator "
                         "with its own autograd node (ops.engine.direct_call)"),
        "late_interaction": "token-level family (FILIP, MaxSim): torch spec fastcon/kernels/late.py, C++ "
                            "csrc/cpu/late.cpp, Triton fastcon/kernels/triton/late.py (triton and triton_fused name "
                            "the same kernels)",
    }
    for name, entry in backends.items():  # the contract's operations of each usable backend
        if name == "reference" or not entry["available"]:
            continue
        missing = contract.missing_operations(name)
        entry["operations"] = [op for op in contract.OPERATIONS if op not in missing]
        entry["missing_operations"] = missing
        info["not_implemented"] += [f"{name}.{op}: {why}" for op, why in missing.items()]
    on_gpu, why_not = engine.triton_available(torch.device("cuda"))  # no GPU needed: Triton's import
    info["auto"] = {
        "cpu": "cpp" if cpp.AVAILABLE else "torch",
        "cuda": "triton" if on_gpu else "torch",
    }
    if not on_gpu:
        info["auto"]["cuda_reason"] = why_not
    return info


def _budget(entry: dict, device: str) -> str:
    if "error" in entry:
        return entry["error"]
    value = entry[device]
    return f"{value / 2**20:g} MiB" if isinstance(value, int) else str(value)


def format_info(info: dict) -> str:
    """``backend_info()`` as a short text table."""
    lines = [f"fastcon {info['version']}, torch {info['torch']}, Python {info['python']}; "
             f"CUDA device: {'yes' if info['cuda_available'] else 'none'}", ""]
    rows = [("backend", "usable", "runs on", "notes")]
    for name, entry in info["backends"].items():
        devices = entry.get("devices") or [entry.get("device", "")]
        notes = []
        if not entry["available"]:
            notes.append(entry.get("reason") or "")
        if entry.get("simd"):
            notes.append(f"SIMD {entry['simd']}")
        if entry.get("origin"):
            notes.append(str(entry["origin"]))
        if entry.get("interpreter"):
            notes.append("Triton interpreter")
        if entry.get("missing_operations"):
            notes.append("missing: " + ", ".join(entry["missing_operations"]))
        if name == "reference":
            notes.append("materialised N x N, for testing")
        rows.append((name, "yes" if entry["available"] else "no", ", ".join(d for d in devices if d),
                     "; ".join(n for n in notes if n)))
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    auto = info["auto"]
    cuda = auto["cuda"] + (f" ({auto['cuda_reason']})" if auto.get("cuda_reason") else "")
    lines += ["", f"backend='auto': CPU tensors -> {auto['cpu']}; CUDA tensors -> {cuda}",
              f"small CPU calls: {info['ops']['direct_calls']}",
              f"chunk budget: CPU {_budget(info['chunk_bytes'], 'cpu')}, CUDA {_budget(info['chunk_bytes'], 'cuda')}; "
              f"pass-1 cache: CPU {_budget(info['cache_bytes'], 'cpu')}, CUDA {_budget(info['cache_bytes'], 'cuda')}"]
    producer = info["gemm"]["triton_producer"]
    if isinstance(producer, dict):
        lines.append(f"FASTCON_TRITON_PRODUCER: {producer['error']}")
    lines.append("not implemented: " + ("; ".join(info["not_implemented"]) or "nothing"))
    lines.append("FASTCON_LOG=1 logs the backend and path of every call")
    return "\n".join(line.rstrip() for line in lines)
