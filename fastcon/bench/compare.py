"""``fastcon-bench compare OLD.json NEW.json --fail-if median:5%``: regressions between two runs.

Rows are matched on what defines a case (loss, provider, N, D, dtype, mode, device, world size,
local mode). Each ``--fail-if METRIC:LIMIT`` fails the comparison (exit code 1) when a matched case
got worse by more than LIMIT: a relative limit (``5%``) or an absolute one in the metric's unit
(``median:2`` = 2 ms). Metrics: ``median``, ``min``, ``max`` (ms), ``peak`` (MiB), ``tflops`` (worse
means lower) and ``err`` (max rel err). A case that ran in OLD and did not run in NEW is a
regression too.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Tuple

from .report import load_rows, provider_label

METRICS = {"median": ("median_ms", "ms", False), "min": ("min_ms", "ms", False), "max": ("max_ms", "ms", False),
           "peak": ("peak_mib", "MiB", False), "tflops": ("tflops", "TFLOP/s", True),
           "err": ("max_rel_err", "", False)}


def case_key(r) -> tuple:
    return (r["loss"], r["provider"], r["batch"], r["dim"], r["dtype"], r["mode"], r.get("device"),
            r.get("world_size", 1), bool(r.get("local_loss")))


def parse_limit(text: str) -> Tuple[str, float, bool]:
    """'median:5%' -> ('median', 0.05, True); 'peak:10' -> ('peak', 10.0, False)."""
    name, sep, limit = text.partition(":")
    if not sep or name not in METRICS:
        raise ValueError(f"--fail-if takes METRIC:LIMIT with METRIC one of {', '.join(METRICS)}, got {text!r}")
    relative = limit.endswith("%")
    try:
        value = float(limit[:-1] if relative else limit)
    except ValueError:
        raise ValueError(f"--fail-if {text!r}: the limit must be a number or a percentage") from None
    if value < 0:
        raise ValueError(f"--fail-if {text!r}: the limit must be >= 0")
    return name, value / 100 if relative else value, relative


def _worse_by(old: float, new: float, higher_is_better: bool) -> Tuple[float, float]:
    """(absolute, relative) amount by which new is worse than old (negative: better)."""
    delta = (old - new) if higher_is_better else (new - old)
    return delta, delta / abs(old) if old else (0.0 if delta == 0 else float("inf"))


def compare(old_rows: List[dict], new_rows: List[dict], limits: List[Tuple[str, float, bool]]):
    """(lines of the report, list of failures)."""
    old: Dict[tuple, dict] = {case_key(r): r for r in old_rows}
    new: Dict[tuple, dict] = {case_key(r): r for r in new_rows}
    shown = [name for name, _, _ in limits] or ["median", "peak"]
    shown = list(dict.fromkeys(shown))
    lines = [f"{'case':<52} " + " ".join(f"{m + ' old':>12} {m + ' new':>12} {'change':>8}" for m in shown)]
    failures: List[str] = []
    for key in list(old) + [k for k in new if k not in old]:
        o, n = old.get(key), new.get(key)
        r = n or o
        label = f"{r['loss']} {provider_label(r)} N={r['batch']} D={r['dim']} {r['dtype']} {r['mode']}"
        if o is None or n is None:
            lines.append(f"{label:<52} only in {'NEW' if o is None else 'OLD'}")
            if n is None and o.get("status") == "ok":
                failures.append(f"{label}: ran in OLD, missing from NEW")
            continue
        if o.get("status") != "ok" or n.get("status") != "ok":
            lines.append(f"{label:<52} status {o.get('status')} -> {n.get('status')}")
            if o.get("status") == "ok":
                failures.append(f"{label}: ran in OLD, {n.get('status')} in NEW")
            continue
        parts = []
        for m in shown:
            a, b = float(o[METRICS[m][0]]), float(n[METRICS[m][0]])
            parts.append(f"{a:12.4g} {b:12.4g} {(b - a) / abs(a) * 100 if a else 0.0:+7.1f}%")
        lines.append(f"{label:<52} " + " ".join(parts))
        for name, limit, relative in limits:
            field, unit, higher = METRICS[name]
            absolute, rel = _worse_by(float(o[field]), float(n[field]), higher)
            amount = rel if relative else absolute
            if amount > limit:
                shown_limit = f"{limit * 100:g}%" if relative else f"{limit:g} {unit}".rstrip()
                failures.append(f"{label}: {name} {o[field]:.4g} -> {n[field]:.4g} (worse by "
                                f"{rel * 100:.1f}%, limit {shown_limit})")
    return lines, failures


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastcon-bench compare", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="JSON file of the baseline run (fastcon-bench --json)")
    p.add_argument("new", help="JSON file of the run to judge")
    p.add_argument("--fail-if", action="append", default=[], metavar="METRIC:LIMIT",
                   help="e.g. median:5%% or peak:10%% (repeatable)")
    args = p.parse_args(argv)
    try:
        limits = [parse_limit(t) for t in args.fail_if]
        old_rows, _ = load_rows([args.old])
        new_rows, _ = load_rows([args.new])
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    lines, failures = compare(old_rows, new_rows, limits)
    print("\n".join(lines))
    if failures:
        print(f"\n{len(failures)} regression(s):")
        print("\n".join(f"  {f}" for f in failures))
        return 1
    print("\nno regression" + (" beyond " + ", ".join(args.fail_if) if args.fail_if else ""))
    return 0
