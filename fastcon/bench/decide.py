"""``fastcon-bench decide``: which of ``backend="auto"``'s open choices a sweep's measurements support.

Two choices of the Triton backend are left open until a GPU has measured them (benchmarks/gpu_sweep.sh):

* **the general target: fused tile kernels or the chunked path.** ``auto`` runs the general target
  (class ids, NT-Xent, MNRL, distillation...) on the chunked path; ``backend="triton_fused"`` keeps each
  tile's G in registers instead. Read from the rows of providers ``fastcon-triton`` (chunked) and
  ``fastcon-triton_fused`` of the same case.
* **soft targets: the matmul producer or cuBLAS chunks.** ``auto`` forms a soft target's student tiles
  from cuBLAS chunks (``fastcon/kernels/triton/plan.py``, ``producer_for``);
  ``FASTCON_TRITON_PRODUCER=matmul`` forms them in the epilogue kernels. Read from the ``distill`` rows
  whose ``triton_producer`` is ``matmul`` against those run with ``auto`` (providers ``fastcon`` or
  ``fastcon-triton`` on the same device).

A choice is supported when the alternative is faster by more than ``--margin`` (default 5%) in every
measured case of a D range, with at most ``--memory`` (default 10%, and 1 MiB) more working memory;
slower in every case keeps the default; anything else is "no verdict". Only rows with status ``ok``
count.
"""
from __future__ import annotations

import argparse
import glob
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Tuple

# Upper ends of the D ranges a verdict is given for (the kernels' configurations change at these).
D_RANGES = (64, 128, 256, 512, 1024, 1 << 30)


def _d_range(d: int) -> str:
    lo = 1
    for hi in D_RANGES:
        if d <= hi:
            return f"D {lo}-{hi}" if hi < (1 << 30) else f"D > {lo - 1}"
        lo = hi + 1
    raise AssertionError(d)


def _key(r: dict) -> tuple:
    return (r.get("device_name"), r.get("dtype"), r.get("loss"), int(r.get("batch", 0)), int(r.get("dim", 0)),
            r.get("mode"))


def _pairs(rows: List[dict], default, alternative) -> List[Tuple[dict, dict]]:
    """(default's row, alternative's row) of every case that both ran (``default``/``alternative``:
    predicates on a row). A case measured twice keeps its first row."""
    first: Dict[tuple, dict] = OrderedDict()
    second: Dict[tuple, dict] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        if default(r):
            first.setdefault(_key(r), r)
        elif alternative(r):
            second.setdefault(_key(r), r)
    return [(first[k], second[k]) for k in first if k in second]


def _lean(a: dict, b: dict, memory: float) -> bool:
    """``b`` takes at most ``memory`` (a fraction) and 1 MiB more working memory than ``a``."""
    return b["peak_mib"] <= (1 + memory) * a["peak_mib"] + 1.0


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}" if y > 0 else "-"


def _verdict(pairs: List[Tuple[dict, dict]], margin: float, memory: float) -> str:
    faster = [b["median_ms"] < (1 - margin) * a["median_ms"] and _lean(a, b, memory) for a, b in pairs]
    slower = [b["median_ms"] > a["median_ms"] for a, b in pairs]
    if all(faster):
        return "take the alternative"
    if all(slower):
        return "keep the default"
    return "no verdict"


def _choice(title: str, default_name: str, alt_name: str, where: str, pairs, margin, memory) -> List[str]:
    out = [f"## {title}", ""]
    if not pairs:
        return out + [f"No case measured both ({default_name} and {alt_name}): no verdict.", ""]
    out += [f"| device | dtype | loss | N | D | {default_name} | {alt_name} | time ratio | memory ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        out.append(f"| {a.get('device_name')} | {a['dtype']} | {a['loss']} | {a['batch']} | {a['dim']} | "
                   f"{a['median_ms']:.3g} ms, {a['peak_mib']:.0f} MiB | "
                   f"{b['median_ms']:.3g} ms, {b['peak_mib']:.0f} MiB | "
                   f"{_ratio(b['median_ms'], a['median_ms'])} | {_ratio(b['peak_mib'], a['peak_mib'])} |")
    out.append("")
    groups: Dict[tuple, list] = OrderedDict()
    for a, b in pairs:
        groups.setdefault((a.get("device_name"), a["dtype"], _d_range(int(a["dim"]))), []).append((a, b))
    for (device, dtype, span), group in groups.items():
        verdict = _verdict(group, margin, memory)
        what = {"take the alternative": f"{alt_name} wins every case: make it auto's choice ({where})",
                "keep the default": f"{default_name} wins every case: keep auto's choice",
                "no verdict": "mixed: no verdict, keep auto's choice"}[verdict]
        cases = f"{len(group)} case" + ("s" if len(group) > 1 else "")
        out.append(f"- {device}, {dtype}, {span} ({cases}): {what}.")
    return out + [""]


def _is_cpu(r: dict) -> bool:
    return r.get("device") == "cpu"


def decide_markdown(rows: Iterable[dict], margin: float = 0.05, memory: float = 0.10) -> str:
    """The report of ``fastcon-bench decide`` on benchmark rows."""
    rows = list(rows)
    producer = lambda r: r.get("triton_producer", "auto") or "auto"  # noqa: E731
    fused = _pairs(rows, lambda r: r.get("provider") == "fastcon-triton" and producer(r) == "auto",
                   lambda r: r.get("provider") == "fastcon-triton_fused" and producer(r) == "auto")
    distill = [r for r in rows if r.get("loss") == "distill"]
    on_triton = lambda r: r.get("provider") == "fastcon-triton" or (  # noqa: E731
        r.get("provider") == "fastcon" and not _is_cpu(r))
    soft = _pairs(distill, lambda r: on_triton(r) and producer(r) == "auto",
                  lambda r: on_triton(r) and producer(r) == "matmul")
    out = ["# What the measurements say about auto's open choices", ""]
    if any(_is_cpu(a) for pair in fused + soft for a in pair):
        out += ["CPU rows (the Triton interpreter) are here to check the report; they say nothing of a GPU.", ""]
    out += _choice("The general target: fused tile kernels against the chunked path", "chunked", "fused",
                   "fastcon/ops/engine.py, the general target's auto backend", fused, margin, memory)
    out += _choice("Soft targets: the matmul producer against cuBLAS chunks", "cuBLAS", "matmul",
                   "fastcon/kernels/triton/plan.py, producer_for's soft case", soft, margin, memory)
    return "\n".join(out).rstrip() + "\n"


def _files(paths: List[str]) -> List[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "*.json")))
        else:
            files.append(p)
    return files


def main(argv: Optional[List[str]] = None) -> int:
    from .report import load_rows

    p = argparse.ArgumentParser(prog="fastcon-bench decide", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="a sweep's output folder (its *.json) or JSON files of fastcon-bench")
    p.add_argument("--margin", type=float, default=0.05, help="how much faster the alternative must be (default 0.05)")
    p.add_argument("--memory", type=float, default=0.10,
                   help="how much more working memory the alternative may take (default 0.10)")
    args = p.parse_args(argv)
    if not 0 <= args.margin < 1 or args.memory < 0:
        p.error("--margin must be in [0, 1) and --memory >= 0")
    files = _files(args.paths)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        p.error(f"no such file: {', '.join(missing)}" if missing else "no JSON files found")
    rows, _ = load_rows(files)
    print(decide_markdown(rows, args.margin, args.memory), end="")
    return 0
