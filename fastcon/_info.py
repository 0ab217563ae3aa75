"""``fastcon.backend_info()``: which backends are usable here, and why not."""
from __future__ import annotations

import importlib
import os
import platform

import torch

from ._version import __version__
from .kernels import contract
from .ops import engine, registry


def backend_info() -> dict:
    """A dict describing the backends on this machine: for each backend whether it is usable and, if
    not, why; what ``backend="auto"`` picks per device; the chunk and cache budgets in bytes; the
    kernels that are not implemented yet."""
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
                       "origin": (cpp.ORIGIN or None) if cpp.AVAILABLE else None}
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
        "triton_producer": ("FASTCON_TRITON_PRODUCER=" + (os.environ.get("FASTCON_TRITON_PRODUCER") or "auto") +
                            ": auto takes the matmul producer (the epilogue kernels form their tiles with tl.dot, "
                            "no logit in memory) for bf16/fp16 on a GPU, except soft targets; cuBLAS chunks with "
                            "fp32 output otherwise"),
    }
    info["ops"] = {
        "custom_ops": [op.name for op in registry.OPS.values() if not op.triton],
        "triton_ops": [op.name for op in registry.OPS.values() if op.triton],
        "triton_op_registration": "torch.library.triton_op" if registry.HAS_TRITON_OP else "torch.library.custom_op",
        "eager_calls": ("plain tensors outside torch.compile run each operator's body through an autograd "
                        "function; the registered operators run under torch.compile and for tensor subclasses"),
        "autocast": "features rounded to the autocast dtype for the GEMMs; statistics fp32/float64; fp32 loss",
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
    info["auto"] = {
        "cpu": "cpp" if cpp.AVAILABLE else "torch",
        "cuda": "triton" if backends["triton"]["available"] and cuda else "torch",
    }
    return info
