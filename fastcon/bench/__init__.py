"""``fastcon-bench``: time and peak memory of fastcon's losses against the reference and the peers.

    fastcon-bench [run] [options]       a sweep (the default: a short one on the best local device)
    fastcon-bench compare OLD NEW       regressions between two --json files (--fail-if median:5%)
    fastcon-bench summary FILES         the README's fastcon-vs-peers tables from --json files
    fastcon-bench peak                  the device's dense matrix-product throughput
    fastcon-bench plan                  the engine's chunk plan on a GPU and its roofline time (an estimate)
    fastcon-bench decide OUT_DIR        which of auto's open choices a GPU sweep's rows support

Each case runs in a fresh subprocess, so that one case's memory cannot hide in another's and an
out-of-memory case becomes a row (status ``oom``) instead of ending the sweep. In it: one call whose
peak memory is measured (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak resident set,
VmHWM reset through ``/proc/self/clear_refs``, minus the resident set before the call; both minus the
gradients of the inputs), then the correctness check (loss and every gradient against the float64
reference on the first ``--check-rows`` rows), then the timing (CPU: wall clock of ``--repeat``
calls, glibc's allocator thresholds settled as in a training loop; CUDA: CUDA events through
``triton.testing.do_bench``). TFLOP/s count 2·N²·D per GEMM-equivalent of
the minimal O(N)-memory engine: 8·N²·D for ``full`` (forward+backward), 2·N²·D for ``fwd``, 6·N²·D
for ``bwd``. fastcon computes its gradients inside the forward when inputs require grad, so its
``bwd`` time is only the scaling by the upstream gradient: compare ``full`` across providers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import List, Optional

from .providers import LOSSES, PROVIDERS, availability, default_providers, predicted_bytes
from .report import format_markdown, format_table, write_csv, write_plots

__all__ = ["main"]

DTYPES = ("float32", "bfloat16", "float16", "float64")
DEFAULTS = {  # device: (batches, dim, dtype)
    "cpu": ("1024,4096", "512", "float32"),
    "cuda": ("8192,32768,65536", "768", "bfloat16"),
}


def _git_sha() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _meta(device: str) -> dict:
    import torch

    import fastcon
    from .measure import device_name

    return {"device_name": device_name(torch.device(device)), "fastcon_version": fastcon.__version__,
            "torch": torch.__version__, "triton": _version("triton"), "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_sha": _git_sha(), "device": device,
            "triton_producer": os.environ.get("FASTCON_TRITON_PRODUCER") or "auto",
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _run_in_subprocess(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "fastcon.bench", "_worker", json.dumps(case)]
    # Large blocks straight from mmap, so that freed memory leaves the resident set and glibc's
    # adaptive threshold cannot make one allocation's size depend on an earlier one.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(case, status="timeout", error=f"more than {timeout:g} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return dict(json.loads(lines[-1]), status="ok")
    status, error = classify_failure(proc.returncode, proc.stderr)
    return dict(case, status=status, error=error)


def classify_failure(returncode: int, stderr: Optional[str]):
    """(status, error) of a worker that failed: ``oom`` (an out-of-memory error, or killed by the
    kernel's OOM killer), ``skipped`` (the provider cannot run the case) or ``error``."""
    err = (stderr or "").strip().splitlines()
    text = err[-1] if err else f"exit code {returncode}"
    if "out of memory" in text.lower() or returncode in (-9, 137):
        return "oom", (text if err else "killed (SIGKILL), most likely by the out-of-memory killer")[-300:]
    if "ProviderUnavailable" in text:
        return "skipped", text.split("ProviderUnavailable:", 1)[-1].strip()[-300:]
    return "error", text[-300:]


def _worker(payload: str) -> int:
    from .measure import run_case, run_dist_case, run_peak

    case = json.loads(payload)
    if case["loss"] == "matmul":
        row = run_peak(case)
    elif case.get("world_size", 1) > 1:
        row = run_dist_case(case)
    else:
        row = run_case(case)
    print(json.dumps(row))
    return 0


class _Progress:
    """One line per finished case on stderr; on a terminal, a bar for the case that is running."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()

    def _bar(self) -> str:
        filled = int(20 * self.done / max(self.total, 1))
        return "[" + "#" * filled + "-" * (20 - filled) + f"] {self.done}/{self.total}"

    def start(self, label: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\033[K{self._bar()} running {label}")
            sys.stderr.flush()

    def finish(self, label: str, row: dict) -> None:
        self.done += 1
        status = row.get("status")
        detail = (f" {row['median_ms']:.1f} ms, {row['peak_mib']:.1f} MiB" if status == "ok"
                  else f" ({row.get('error', '')[:80]})" if row.get("error") else "")
        prefix = "\r\033[K" if self.tty else ""
        sys.stderr.write(f"{prefix}[{self.done}/{self.total}] {label}: {status}{detail}\n")
        sys.stderr.flush()


def _int_list(text: str, name: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} takes a comma list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--{name} takes positive integers, got {text!r}")
    return values


def _name_list(text: str, allowed, name: str) -> List[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"--{name}: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose from {', '.join(allowed)}")
    return values


def _output_options(p) -> None:
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file (Liger-Kernel's layout)")
    p.add_argument("--markdown", default=None, help="write the table as Markdown to this file")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write time- and memory-vs-batch PNGs to DIR (needs matplotlib: pip install 'fastcon[bench]')")


def _write_outputs(args, rows) -> None:
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.csv:
        write_csv(rows, args.csv)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows))
    if args.plot:
        for path in write_plots(rows, args.plot):
            print(f"wrote {path}", file=sys.stderr)


def _resolve_device(p, device: Optional[str]) -> str:
    """``--device``, defaulting to cuda where there is a GPU; a usage error if cuda has none."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return device


def _check_outputs(p, args) -> None:
    """Every output can be written, checked before anything runs (not after an hour of cases): its
    folder exists and is writable, the path is not a folder; ``--plot`` has matplotlib."""
    for flag in ("json", "csv", "markdown"):
        path = getattr(args, flag)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            p.error(f"--{flag} {path}: is a folder; give a file name")
        if not os.path.isdir(folder):
            p.error(f"--{flag} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            p.error(f"--{flag} {path}: not writable")
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            p.error("--plot needs matplotlib (pip install 'fastcon[bench]')")
        parent = os.path.dirname(os.path.abspath(args.plot))
        if os.path.exists(args.plot) and not os.path.isdir(args.plot):
            p.error(f"--plot {args.plot}: is a file; give a folder")
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            p.error(f"--plot {args.plot}: cannot create it in {parent}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Raw description, and each option's default in its help (where it has one to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _run_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="fastcon-bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=_HelpFormatter)
    p.add_argument("--loss", default="clip,siglip", help=f"comma list of {', '.join(LOSSES)}")
    p.add_argument("--providers", default=None,
                   help=f"comma list of {', '.join(PROVIDERS)}; one that cannot run here is reported as skipped "
                        "(default: fastcon, the reference and each loss's own peers)")
    p.add_argument("--batch", default=None, help="comma list of N (default: 1024,4096 on CPU; 8192,32768,65536 on CUDA)")
    p.add_argument("--dim", default=None, help="comma list of D (default: 512 on CPU, 768 on CUDA)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--mode", default="full", choices=("fwd", "bwd", "full"),
                   help="time the forward, the backward after it, or both")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--world-size", type=int, default=1,
                   help="W > 1: W local ranks (gloo on CPU, NCCL on GPU); --batch is the per-rank batch")
    p.add_argument("--local-loss", type=int, default=1, choices=(0, 1),
                   help="with --world-size: open_clip's local_loss mode of CLIP (gather_with_grad is on)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per case on CPU, at least")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of timed calls per case on CPU, at least: more calls until they add up to it "
                        "(on a GPU, triton.testing.do_bench repeats by time)")
    p.add_argument("--check-rows", type=int, default=2048, help="rows of the correctness check")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    p.add_argument("--profile", action="store_true",
                   help="also split one call into matrix products and the rest (torch.profiler): columns GEMM ms "
                        "and epilogue ms")
    _output_options(p)
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="run nothing: print (and write) the rows of earlier --json files")
    args = p.parse_args(argv)
    _check_outputs(p, args)

    if args.from_json:
        from .report import load_rows

        rows, _ = load_rows(args.from_json)
        _write_outputs(args, rows)
        return 0

    import torch

    device = _resolve_device(p, args.device)
    if args.world_size < 1:
        p.error("--world-size must be >= 1")
    if args.repeat < 1 or not args.min_time >= 0:
        p.error("--repeat must be >= 1 and --min-time >= 0")
    if args.world_size > 1 and args.mode != "full":
        p.error("--world-size > 1 measures forward+backward only (--mode full)")
    if args.world_size > 1 and device == "cuda" and torch.cuda.device_count() < args.world_size:
        p.error(f"--world-size {args.world_size} needs as many GPUs; {torch.cuda.device_count()} visible")
    batches, dims, dtype = DEFAULTS[device]
    try:
        losses = _name_list(args.loss, LOSSES, "loss")
        providers = None if args.providers is None else _name_list(args.providers, PROVIDERS, "providers")
        batches = _int_list(args.batch or batches, "batch")
        dims = _int_list(args.dim or dims, "dim")
    except ValueError as exc:
        p.error(str(exc))
    dtype = args.dtype or dtype
    if device == "cpu" and dtype in ("bfloat16", "float16") and any(x.startswith("fastcon-triton")
                                                                     for x in providers or ()):
        p.error("the Triton interpreter on CPU runs float32 only")

    meta = _meta(device)
    cases = [dict(loss=loss, provider=provider, batch=n, dim=d, dtype=dtype, mode=args.mode, device=device,
                  repeat=args.repeat, min_time=args.min_time, check_rows=args.check_rows, profile=args.profile)
             for loss in losses for n in batches for d in dims for provider in providers or default_providers(loss)]
    progress = _Progress(len(cases))
    rows = []
    for case in cases:
        if args.world_size > 1:
            case.update(world_size=args.world_size, local_loss=bool(args.local_loss))
        label = f"{case['loss']} {case['provider']} N={case['batch']} D={case['dim']}"
        ok, reason = availability(case["provider"], case["loss"], device, args.world_size)
        if ok:
            ok, reason = _fits(case, device)
        progress.start(label)
        row = _run_in_subprocess(case, args.timeout) if ok else dict(case, status="skipped", error=reason)
        row = dict(row, **meta)
        rows.append(row)
        progress.finish(label, row)
        if args.json:  # the rows so far, so that a sweep stopped by a time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    _write_outputs(args, rows)
    return 0


def _device_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _fits(case: dict, device: str):
    """(True, None), or (False, why) for a case whose O(N²) buffers alone exceed the device's memory:
    it becomes a ``skipped`` row computed from its size, before anything runs."""
    need = predicted_bytes(case["provider"], case["loss"], case["batch"], case["dim"])
    if need is None:
        return True, None
    have = _device_memory(device)
    if need <= have:
        return True, None
    gib = 1 << 30
    return False, (f"needs at least {need / gib:.0f} GiB for its N x N buffers at N={case['batch']}; "
                   f"the {device} device has {have / gib:.0f} GiB")


# fastcon-bench peak's N = D: large enough for the device's peak, a few seconds a call on a CPU
PEAK_SIZE = {"cuda": 8192, "cpu": 4096}


def _peak_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog="fastcon-bench peak", formatter_class=_HelpFormatter,
                                description="The dense matrix-product throughput (N×D times D×N) of the device, "
                                            "the figure the losses' TFLOP/s are judged against.")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--batch", type=int, default=None, help="N (default: 8192 on CUDA, 4096 on CPU)")
    p.add_argument("--dim", type=int, default=None, help="D (default: N)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls")
    _output_options(p)
    args = p.parse_args(argv)
    _check_outputs(p, args)
    device = _resolve_device(p, args.device)
    n = args.batch or PEAK_SIZE[device]
    case = dict(loss="matmul", provider="torch.mm", batch=n, dim=args.dim or n,
                dtype=args.dtype or DEFAULTS[device][2], mode="fwd", device=device, repeat=args.repeat)
    row = dict(_run_in_subprocess(case, 900.0), **_meta(device))
    _write_outputs(args, [row])
    return 0 if row.get("status") == "ok" else 1


def _summary_main(argv: List[str]) -> int:
    from .report import load_rows, replace_block, summary_markdown

    p = argparse.ArgumentParser(prog="fastcon-bench summary",
                                description="fastcon against each peer (time, memory and their ratios), one table per "
                                            "device, from --json files; --update rewrites the generated block of a "
                                            "Markdown file, --check fails if that block is out of date.")
    p.add_argument("files", nargs="+", help="JSON files written by fastcon-bench --json")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--update", metavar="MARKDOWN", help="replace the generated block of this file")
    group.add_argument("--check", metavar="MARKDOWN", help="exit 1 if this file's generated block differs")
    args = p.parse_args(argv)
    try:
        rows, sources = load_rows(args.files)
    except (OSError, ValueError) as exc:
        p.error(str(exc))
    block = summary_markdown(rows, sources)
    target = args.update or args.check
    if not target:
        print(block, end="")
        return 0
    with open(target) as f:
        text = f.read()
    try:
        new_text = replace_block(text, block)
    except ValueError as exc:
        p.error(f"{target}: {exc}")
    if args.check:
        if new_text != text:
            print(f"{target}: the generated benchmark summary is out of date; run "
                  f"fastcon-bench summary {' '.join(args.files)} --update {target}", file=sys.stderr)
            return 1
        return 0
    with open(target, "w") as f:
        f.write(new_text)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command == "_worker":
        return _worker(argv[1])
    if command == "compare":
        from .compare import main as compare_main

        return compare_main(argv[1:])
    if command == "summary":
        return _summary_main(argv[1:])
    if command == "peak":
        return _peak_main(argv[1:])
    if command == "plan":
        from .plan import main as plan_main

        return plan_main(argv[1:])
    if command == "decide":
        from .decide import main as decide_main

        return decide_main(argv[1:])
    return _run_main(argv[1:] if command == "run" else argv)
