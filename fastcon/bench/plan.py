"""``fastcon-bench plan``: what the engine would run for one loss on a GPU, and the roofline time that
implies. An estimate, never a measurement.

The plan is the engine's own. The chunked Triton backend's functions (``fastcon/kernels/triton/
chunked.py``, with the host plans of ``triton/plan.py``) run on meta tensors (shapes only: nothing is
allocated and no GPU is needed), taking their CUDA branches: the producer a GPU would use
(``plan.producer_for``: the matmul producer for bf16/fp16, cuBLAS for fp32), the chunk budget of the
named device's memory (``gpu_budget``), its SM count for the persistent grids, and, for the cuBLAS
producer, the fp32-output tensor-core GEMM of ``mm_acc``. A dispatch mode records every tensor op
they issue: the cuBLAS GEMMs, copies, fills and in-place updates. The Triton launches are recorded
instead of run. For each call:

* FLOPs: 2·M·N·K for a matrix product (cuBLAS, fastcon's in-place Triton GEMM, or the tiles an
  epilogue kernel forms itself with the matmul producer), 0 for the rest (the epilogues'
  exponentials are not counted);
* bytes: each tensor argument and result once. A kernel streaming its operands once moves that much;
  a GEMM re-reading tiles from HBM moves more;
* transcendentals: per logit of an epilogue kernel, its exp2/log/reciprocal count (``SFU_PER_LOGIT``);
* time: max(FLOPs / peak, bytes / bandwidth, transcendentals / SFU rate) with the device's spec-sheet
  peaks (dense bf16/fp16 for half inputs, fp32 for fp32 inputs: torch.mm leaves TF32 off by
  default). A kernel whose tensor-core and special-function work do not overlap takes longer.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional

# Spec-sheet peaks (dense, no sparsity): TFLOP/s by dtype class, HBM TB/s, memory GiB, SMs, and the
# special-function units' rate in T ops/s (16 a clock per SM at the boost clock: exp2, log2, rcp).
# Transcendentals per logit of each epilogue kernel (exp2 of the row and column terms, the log and
# the reciprocal of the sigmoid's softplus and σ), counted from the kernels; the merge kernels' are
# O(N).
SFU_PER_LOGIT = {"_chunk_stats_kernel": 2, "_chunk_grad_kernel": 2, "_chunk_grad_kernel[sigmoid]": 3}
DEVICES: Dict[str, dict] = {
    "h100": dict(name="NVIDIA H100 SXM5 80GB", half=989.4, float32=66.9, hbm=3.35, memory_gib=80, sms=132,
                 sfu=4.18),
    "h200": dict(name="NVIDIA H200 141GB", half=989.4, float32=66.9, hbm=4.8, memory_gib=141, sms=132, sfu=4.18),
    "a100": dict(name="NVIDIA A100 SXM4 80GB", half=312.0, float32=19.5, hbm=2.039, memory_gib=80, sms=108,
                 sfu=2.44),
}
PLAN_LOSSES = ("clip", "siglip")
_VIEWS = {"view", "_unsafe_view", "t", "transpose", "slice", "select", "as_strided", "alias", "detach",
          "expand", "reshape", "unsqueeze", "squeeze", "permute", "narrow", "empty", "empty_strided",
          "empty_like", "lift_fresh"}


class Call(NamedTuple):
    kind: str  # "torch" (an aten op: cuBLAS or an elementwise kernel) or "triton"
    name: str
    flops: float
    bytes: float
    sfu: float = 0.0  # transcendental operations


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _tensors(values):
    import torch

    seen, out = set(), []
    for v in values:
        for t in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def _gemm_flops(name: str, args) -> float:
    def dims(x, y):
        return 2.0 * x.shape[0] * x.shape[1] * y.shape[-1]

    if name in ("mm", "matmul"):
        return dims(args[0], args[1])
    if name in ("addmm", "addmm_"):
        return dims(args[1], args[2])
    return 0.0


@contextlib.contextmanager
def _recording(calls: List[Call], budget: int, sms: int):
    """Record every aten op (below FakeTensorMode) and every Triton launch of the chunked backend, as on
    a GPU with a chunk budget of ``budget`` bytes and ``sms`` SMs."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastcon.kernels.triton import chunked, gemm
    from fastcon.kernels.triton import plan as tplan

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in _VIEWS:
                outs = [] if name.endswith("_") else _tensors([out])  # in place: the result is an input
                moved = sum(_nbytes(t) for t in _tensors(list(args) + list((kwargs or {}).values())) + outs)
                calls.append(Call("torch", name, _gemm_flops(name, args), float(moved)))
            return out

    def launch(kernel):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "triton")

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    named = dict(zip(kernel.arg_names, args), **kwargs)  # launched by position or by name
                    cols = named.get("N", named.get("W", 0))  # (the general target's kernels call it W)
                    flops = 0.0
                    if name == "_mm_accumulate_kernel":
                        flops = 2.0 * named["M"] * named["N"] * named["K"]
                    elif kwargs.get("MATMUL"):  # an epilogue kernel forming its own tiles
                        flops = 2.0 * named["R"] * cols * named["D"]
                    label = name + ("[sigmoid]" if kwargs.get("SIGMOID") else "")
                    sfu = SFU_PER_LOGIT.get(label, 0) * float(named.get("R", 0)) * float(cols)
                    calls.append(Call("triton", label + ("[matmul]" if kwargs.get("MATMUL") else ""), flops,
                                      float(sum(_nbytes(t) for t in _tensors(tuple(named.values())))), sfu))
                return run
        return Grid()

    from fastcon.kernels import _common

    def mm_acc_cuda(x, y):  # mm_acc's CUDA branch (meta tensors are not CUDA tensors)
        if x.dtype in (torch.float32, torch.float64):
            return x @ y
        return torch.mm(x, y, out_dtype=torch.float32)

    def on_gpu(a):  # the producer of ``a`` on a GPU
        return tplan.producer_for(a.dtype, True)

    # every module that reads each name (``from ... import`` binds it there too)
    patches = [(m, "launch", launch) for m in (chunked, gemm, tplan)]
    patches += [(m, "mm_acc", mm_acc_cuda) for m in (chunked, gemm, _common)]
    patches += [(m, "producer", on_gpu) for m in (chunked, tplan)]
    patches += [(chunked, "chunk_bytes", lambda device: budget), (tplan, "sm_count", lambda device: sms),
                (tplan, "programs_per_launch", lambda device: tplan.PROGRAMS_PER_LAUNCH_CUDA)]
    saved = [(m, k, getattr(m, k)) for m, k, _ in patches]
    for m, k, v in patches:
        setattr(m, k, v)
    try:
        with Recorder():
            yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def chunk_plan(n: int, d: int, dtype: str, device: str) -> dict:
    """The chunks the engine would take for N×N at D on ``device`` (a DEVICES key): the producer, the
    budget, and the rows (and pass-2 columns) per chunk."""
    import torch

    from fastcon.kernels._common import gpu_budget
    from fastcon.kernels.triton import plan as tplan

    spec = DEVICES[device]
    budget = gpu_budget(int(spec["memory_gib"] * (1 << 30)))
    tdtype = getattr(torch, dtype)
    prod = tplan.producer_for(tdtype, True)
    out = dict(producer=prod, budget_bytes=budget)
    if prod == "matmul":
        p = tplan.matmul_plan(n, n, tdtype, n, budget)
        elt = torch.empty((), dtype=tdtype).element_size()
        out.update(stats_rows=p.stats_rows, grad_rows=p.grad_rows, grad_cols=p.grad_cols,
                   g_block_bytes=p.grad_rows * p.grad_cols * elt)
    else:
        rows = tplan.memory_rows(n, n, n, budget)
        out.update(stats_rows=rows, grad_rows=rows, grad_cols=n, g_block_bytes=rows * n * 4)
    return out


def trace(loss: str, n: int, d: int, dtype: str, device: str = "h100") -> tuple:
    """(chunk plan, calls) of one forward+backward of ``loss`` at N×N, D on the chunked Triton backend
    as ``device`` (a DEVICES key) would run it."""
    import torch

    from fastcon.kernels.triton import chunked

    if loss not in PLAN_LOSSES:
        raise ValueError(f"plan covers {', '.join(PLAN_LOSSES)}, got {loss!r}")
    meta = torch.device("meta")
    chunks = chunk_plan(n, d, dtype, device)
    calls: List[Call] = []
    a = torch.empty(n, d, dtype=getattr(torch, dtype), device=meta)
    b = torch.empty(n, d, dtype=getattr(torch, dtype), device=meta)
    s = torch.empty((), dtype=torch.float32, device=meta)
    c = torch.empty((), dtype=torch.float32, device=meta)
    with _recording(calls, chunks["budget_bytes"], DEVICES[device]["sms"]):
        # the engine's Triton call: all rows offered, the backend chunks within the budget
        if loss == "clip":  # the weights of the symmetric loss, as ops.softmax passes them
            chunked.softmax_fused(a, b, s, c, 0, 1.0, 1.0, 2.0, n, 0)
        else:
            chunked.sigmoid_fused(a, b, s, c, 0, 1.0, n, True)
    return chunks, calls


def plan(loss: str, n: int, d: int, dtype: str, device: str) -> dict:
    """The plan of one case: per kernel (calls, FLOPs, bytes, estimated ms) and the totals."""
    key = resolve_device(device)
    spec = DEVICES[key]
    peak = (spec["half"] if dtype in ("bfloat16", "float16") else spec["float32"]) * 1e12
    bandwidth = spec["hbm"] * 1e12
    sfu_rate = spec["sfu"] * 1e12
    chunks, calls = trace(loss, n, d, dtype, key)
    kernels: "OrderedDict[str, dict]" = OrderedDict()
    for call in calls:
        k = kernels.setdefault(f"{call.kind}:{call.name}", dict(calls=0, flops=0.0, bytes=0.0, sfu=0.0, ms=0.0))
        k["calls"] += 1
        k["flops"] += call.flops
        k["bytes"] += call.bytes
        k["sfu"] += call.sfu
        # a roofline of three roofs: the tensor cores, HBM and the special-function units
        k["ms"] += max(call.flops / peak, call.bytes / bandwidth, call.sfu / sfu_rate) * 1e3
    total_ms = sum(k["ms"] for k in kernels.values())
    # the work fastcon-bench counts: 8·N²·D for CLIP (pass 1, its recomputation, the two gradient
    # products), 6·N²·D for SigLIP (one pass and the two gradient products)
    minimal = (8.0 if loss == "clip" else 6.0) * n * n * d
    return dict(loss=loss, batch=n, dim=d, dtype=dtype, device=spec["name"], chunks=chunks,
                chunk_rows=chunks["grad_rows"], kernels=kernels, total_ms=total_ms,
                total_flops=sum(k["flops"] for k in kernels.values()),
                total_bytes=sum(k["bytes"] for k in kernels.values()),
                peak_fraction=(minimal / peak * 1e3) / total_ms if total_ms else 0.0,
                note="from the engine's own plan on meta tensors and spec-sheet peaks; not a measurement")


def resolve_device(device: str) -> str:
    """A DEVICES key for ``device`` (h100, h200, a100, or local: the CUDA device here, by its name)."""
    if device in DEVICES:
        return device
    if device != "local":
        raise ValueError(f"--device must be one of {', '.join(DEVICES)} or local, got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device local: no CUDA device here; name one of " + ", ".join(DEVICES))
    name = torch.cuda.get_device_name().lower()
    for key in DEVICES:
        if key in name:
            return key
    raise ValueError(f"--device local: no spec-sheet peaks for {name!r}; name one of {', '.join(DEVICES)}")


def format_plan(p: dict) -> str:
    lines = [f"{p['loss']} N={p['batch']} D={p['dim']} {p['dtype']} on {p['device']} (ESTIMATE: {p['note']})",
             _format_chunks(p["chunks"], p["batch"]),
             f"{'kernel':44s} {'calls':>6s} {'GFLOP':>10s} {'GB moved':>10s} {'G transc.':>10s} {'est. ms':>9s}"]
    for name, k in p["kernels"].items():
        lines.append(f"{name:44s} {k['calls']:6d} {k['flops'] / 1e9:10.1f} {k['bytes'] / 1e9:10.2f} "
                     f"{k['sfu'] / 1e9:10.1f} {k['ms']:9.2f}")
    lines.append(f"{'total':44s} {'':6s} {p['total_flops'] / 1e9:10.1f} {p['total_bytes'] / 1e9:10.2f} {'':10s} "
                 f"{p['total_ms']:9.2f}")
    lines.append(f"the minimal products at the dense peak take {100 * p['peak_fraction']:.0f}% of that estimate")
    return "\n".join(lines)


def _format_chunks(c: dict, n: int) -> str:
    mib = 1 << 20
    return (f"chunk plan ({c['producer']} producer, budget {c['budget_bytes'] / mib:.0f} MiB): pass 1 in "
            f"{-(-n // c['stats_rows'])} chunks of {c['stats_rows']} rows; pass 2 in blocks of {c['grad_rows']} x "
            f"{c['grad_cols']} ({-(-n // c['grad_rows']) * -(-n // c['grad_cols'])} blocks, G "
            f"{c['g_block_bytes'] / mib:.0f} MiB)")


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="fastcon-bench plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", default="clip", choices=PLAN_LOSSES)
    ap.add_argument("--batch", type=int, default=65536, help="N")
    ap.add_argument("--dim", type=int, default=768, help="D")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="h100", type=str.lower,
                    help=f"{', '.join(DEVICES)} or local, in any case (default: h100)")
    ap.add_argument("--json", default=None, help="write the plan to this JSON file")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.dim < 1:
        ap.error("--batch and --dim must be positive")
    try:
        p = plan(args.loss, args.batch, args.dim, args.dtype, args.device)
    except ValueError as exc:
        ap.error(str(exc))
    print(format_plan(p))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(p, f, indent=1)
    return 0
