"""``fastcon-bench``: time and peak memory of fastcon's losses against the reference and peers.

Each case runs in a fresh subprocess (so one case's memory cannot hide another's, and an OOM is a row,
not a crash). Before timing (after the memory run), the case's loss and gradients are compared, as the largest error relative to the largest value of the loss and each gradient against
the float64 reference (on the first ``--check-rows`` rows when N is larger, to keep the check's N² memory small).

Time: median of ``--repeat`` runs with min/max (CPU: wall clock after a warm-up; CUDA: CUDA events via
``triton.testing.do_bench``). Memory: CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated
before the call; CPU: the process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs``
before the call) minus the resident set before it. Both exclude the inputs; the gradients of the
inputs (2·N·D elements) are subtracted too, so the figure is the loss's *working* memory.
FLOP/s count 2·N²·D per GEMM-equivalent: 8·N²·D for forward+backward, 2·N²·D for the forward.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROVIDERS = ("fastcon", "fastcon-cpp", "fastcon-torch", "fastcon-triton", "fastcon-triton_fused",
             "reference", "open_clip")


# ------------------------------------------------------------------------------------------ providers
def _load_open_clip_loss():
    """open_clip's loss module, loaded from the installed package without importing the package
    (whose ``__init__`` needs torchvision). None when open_clip is not installed."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def make_loss_fn(loss: str, provider: str):
    import fastcon
    from fastcon import reference as R

    if provider.startswith("fastcon"):
        backend = provider.split("-", 1)[1] if "-" in provider else "auto"
        if loss == "clip":
            return lambda a, b, s, bias: fastcon.functional.clip_loss(a, b, s, bias, backend=backend)
        return lambda a, b, s, bias: fastcon.functional.siglip_loss(a, b, s, bias, backend=backend)
    if provider == "reference":
        if loss == "clip":
            return lambda a, b, s, bias: R.clip_loss_reference(a, b, s, bias, upcast=False)
        return lambda a, b, s, bias: R.siglip_loss_reference(a, b, s, bias, upcast=False)
    if provider == "open_clip":
        module = _load_open_clip_loss()
        if module is None:
            raise ModuleNotFoundError("open_clip is not installed (pip install --no-deps open-clip-torch)")
        if loss == "clip":
            fn = module.ClipLoss()
            return lambda a, b, s, bias: fn(a, b, s, bias) if bias is not None else fn(a, b, s)
        fn = module.SigLipLoss()
        return lambda a, b, s, bias: fn(a, b, s, bias)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


# ------------------------------------------------------------------------------------------ worker
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(n, d, dtype, device, seed=0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(a + 0.8 * F.normalize(torch.randn(n, d, generator=g), dim=-1), dim=-1)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _scalars(loss, device):
    import torch

    s = torch.tensor(14.3 if loss == "clip" else 10.0, device=device, requires_grad=True)
    bias = None if loss == "clip" else torch.tensor(-10.0, device=device, requires_grad=True)
    return s, bias


def _max_rel_err(loss, fn, n, d, dtype, device):
    import torch
    from fastcon import reference as R

    a, b = _inputs(n, d, dtype, device, seed=1)
    s, bias = _scalars(loss, device)
    outs = []
    for f in (fn, None):
        # The truth is the reference in float64 on the same (rounded) inputs.
        cast = (lambda t: t) if f is not None else (lambda t: None if t is None else t.detach().double())
        xa, xb = cast(a).clone().requires_grad_(), cast(b).clone().requires_grad_()
        xs, xbias = cast(s).requires_grad_(), cast(bias)
        if xbias is not None:
            xbias.requires_grad_()
        leaves = [xa, xb, xs] + ([xbias] if xbias is not None else [])
        if f is None:
            ref = R.clip_loss_reference if loss == "clip" else R.siglip_loss_reference
            val = ref(xa, xb, xs, xbias, upcast=False)
        else:
            val = f(xa, xb, xs, xbias)
        outs.append([val.detach().double()] + [g.double() for g in torch.autograd.grad(val, leaves)])
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(*outs))


def run_case(case: dict) -> dict:
    import torch

    loss, provider, n, d, mode = case["loss"], case["provider"], case["batch"], case["dim"], case["mode"]
    dtype = getattr(torch, case["dtype"])
    device = torch.device(case["device"])
    row = dict(case)
    fn = make_loss_fn(loss, provider)
    a, b = _inputs(n, d, dtype, device)
    s, bias = _scalars(loss, device)
    grad_bytes = 2 * n * d * a.element_size()

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(a, b, s, bias)
        xa, xb = a.detach().requires_grad_(), b.detach().requires_grad_()
        out = fn(xa, xb, s, bias)
        out.backward()
        return out

    cuda = device.type == "cuda"
    # Memory of one call (fresh process: nothing cached from earlier cases).
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        row["memory_method"] = "torch.cuda.max_memory_allocated"
    else:
        import gc

        gc.collect()
        ok = _reset_peak_rss()
        base = _rss_bytes("VmRSS")
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        peak = _rss_bytes("VmHWM") - base
        row["memory_method"] = "peak RSS (VmHWM after clear_refs) minus RSS before" if ok else "ru_maxrss"
    if mode != "fwd":
        peak -= grad_bytes
    row["peak_mib"] = max(peak, 0) / 2**20

    # Correctness before timing (after the memory run, so that its buffers cannot hide in the baseline).
    check_rows = min(n, case.get("check_rows", 2048))
    row["check_rows"] = check_rows
    row["max_rel_err"] = _max_rel_err(loss, fn, check_rows, d, dtype, device)

    times = []
    if cuda:
        from triton.testing import do_bench

        times_ms = do_bench(step, warmup=case.get("warmup_ms", 25), rep=case.get("rep_ms", 100),
                            return_mode="all")
        times = [t / 1e3 for t in times_ms]
    else:
        reps = case.get("repeat", 3)
        if first > 20:  # very slow cases: the memory run is the only run
            times = [first]
        for _ in range(reps if first <= 20 else 0):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    row["median_ms"] = statistics.median(times) * 1e3
    row["min_ms"] = min(times) * 1e3
    row["max_ms"] = max(times) * 1e3
    flops = (2 if mode == "fwd" else 8) * n * n * d
    row["tflops"] = flops / (row["median_ms"] / 1e3) / 1e12
    row["device_name"] = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    row["threads"] = torch.get_num_threads()
    return row


# ------------------------------------------------------------------------------------------ distributed
def _dist_loss_fn(loss, provider, rank, world, local_loss):
    """Per-rank loss for ``--world-size`` cases: fastcon's distributed modules; ``reference``:
    open_clip's formulas on features all-gathered with gradient (materialised local×global logits,
    global×global without ``local_loss``); ``open_clip``: its own modules."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import fastcon
    from fastcon import reference as R
    from fastcon.distributed import all_gather_with_grad

    if provider.startswith("fastcon"):
        backend = provider.split("-", 1)[1] if "-" in provider else "auto"
        if loss == "clip":
            return fastcon.ClipLoss(local_loss, True, rank=rank, world_size=world, backend=backend)
        return fastcon.SigLipLoss(rank=rank, world_size=world, backend=backend)
    if provider == "open_clip":
        module = _load_open_clip_loss()
        if module is None:
            raise ModuleNotFoundError("open_clip is not installed (pip install --no-deps open-clip-torch)")
        if loss == "clip":
            return module.ClipLoss(local_loss, True, rank=rank, world_size=world)
        return module.SigLipLoss(rank=rank, world_size=world)
    if provider != "reference":
        raise ValueError(f"unknown provider {provider!r}")
    group = dist.group.WORLD

    def row_ce(x, all_y, s, bias, offset):
        logits = s * (x @ all_y.T) + (0 if bias is None else bias)
        return F.cross_entropy(logits, torch.arange(x.shape[0], device=x.device) + offset)

    def reference_loss(a, b, s, bias=None):
        n = a.shape[0]
        all_a, all_b = all_gather_with_grad(a, group), all_gather_with_grad(b, group)
        if loss == "siglip":
            return R.siglip_loss_reference(a, all_b, s, bias, pos_offset=rank * n, upcast=False)
        if local_loss:
            return (row_ce(a, all_b, s, bias, rank * n) + row_ce(b, all_a, s, bias, rank * n)) / 2
        return R.clip_loss_reference(all_a, all_b, s, bias, upcast=False)
    return reference_loss


def _dist_rank(rank, case, port, queue):
    import datetime

    import torch
    import torch.distributed as dist

    world = case["world_size"]
    device = torch.device(case["device"])
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        n, d, loss = case["batch"], case["dim"], case["loss"]
        dtype = getattr(torch, case["dtype"])
        fn = _dist_loss_fn(loss, case["provider"], rank, world, case.get("local_loss", True))
        a, b = _inputs(n, d, dtype, device, seed=100 + rank)
        s, bias = _scalars(loss, device)
        grad_bytes = 2 * n * d * a.element_size()

        def step():
            xa, xb = a.detach().requires_grad_(), b.detach().requires_grad_()
            out = fn(xa, xb, s, bias) if bias is not None else fn(xa, xb, s)
            out.backward()
            return out

        import gc

        gc.collect()
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_bytes("VmRSS")
        value = step().item()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_bytes("VmHWM") - base
        times = []
        for _ in range(case.get("repeat", 3)):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        queue.put(dict(rank=rank, loss_value=value, peak=max(peak - grad_bytes, 0), times=times))
    except Exception as exc:  # reported as the case's error row
        queue.put(dict(rank=rank, error=f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def run_dist_case(case: dict) -> dict:
    """A ``--world-size`` case: W local ranks; per-rank memory is the largest of the ranks, the step
    time the median over repeats of the slowest rank."""
    import socket

    import torch
    import torch.multiprocessing as mp

    world = case["world_size"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_dist_rank, args=(r, case, port, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in range(world)]
    for proc in procs:
        proc.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(errors[0])
    results.sort(key=lambda r: r["rank"])
    slowest = [max(r["times"][k] for r in results) for k in range(len(results[0]["times"]))]
    row = dict(case)
    row["peak_mib"] = max(r["peak"] for r in results) / 2**20
    row["median_ms"] = statistics.median(slowest) * 1e3
    row["min_ms"], row["max_ms"] = min(slowest) * 1e3, max(slowest) * 1e3
    row["rank_losses"] = [r["loss_value"] for r in results]
    n, d = case["batch"], case["dim"]
    big_n = n * world
    # FLOPs of the whole global step, per rank: 8·n·N·D (one row block of the N×N matrix).
    row["tflops"] = 8 * n * big_n * d / (row["median_ms"] / 1e3) / 1e12
    row["max_rel_err"] = float("nan")
    row["device_name"] = _cpu_name() if case["device"] == "cpu" else torch.cuda.get_device_name(0)
    row["threads"] = max(1, (os.cpu_count() or 1) // world)
    return row


# ------------------------------------------------------------------------------------------ driver
def _git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _run_in_subprocess(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "fastcon.bench", "--_worker", json.dumps(case)]
    # Large blocks straight from mmap, so that freed memory leaves the resident set and glibc's
    # adaptive threshold cannot make one allocation's size depend on an earlier one.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(case, status="timeout")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
        return dict(json.loads(lines[-1]), status="ok")
    err = (proc.stderr or "").strip().splitlines()
    text = err[-1] if err else f"exit code {proc.returncode}"
    status = "oom" if ("out of memory" in text.lower() or proc.returncode in (-9, 137)) else "error"
    if "ModuleNotFoundError" in text or "is not installed" in text or "unavailable" in text:
        status = "skipped"
    return dict(case, status=status, error=text[-300:])


def _fill_distributed_agreement(rows):
    """Distributed rows: ``max_rel_err`` is the largest relative difference of a rank's loss from the
    reference provider's loss on the same rank and data (the gradients are checked by the tests)."""
    refs = {(r["loss"], r["batch"], r["dim"], r["world_size"]): r["rank_losses"] for r in rows
            if r.get("status") == "ok" and r.get("world_size", 1) > 1 and r["provider"] == "reference"}
    for r in rows:
        key = (r["loss"], r["batch"], r["dim"], r.get("world_size", 1))
        if r.get("status") == "ok" and key in refs:
            r["max_rel_err"] = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(r["rank_losses"], refs[key]))


def _provider_label(r) -> str:
    if r.get("world_size", 1) > 1:
        local = r.get('local_loss') and r['loss'] == 'clip'
        return f"{r['provider']} W={r['world_size']}{' local' if local else ''}"
    return r["provider"]


_COLUMNS = ("loss", "provider", "N", "D", "dtype", "mode", "median ms", "min-max ms", "peak MiB", "TFLOP/s",
            "max rel err")


def _cells(r):
    """The row's cells in _COLUMNS order (an error row: the status in place of the figures)."""
    head = [r["loss"], _provider_label(r), str(r["batch"]), str(r["dim"]), r["dtype"], r["mode"]]
    if r.get("status") != "ok":
        return head + [f"{r.get('status')}: {r.get('error', '')[:60]}"] + [""] * 4
    return head + [f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}-{r['max_ms']:.1f}", f"{r['peak_mib']:.1f}",
                   f"{r['tflops']:.3f}", f"{r['max_rel_err']:.2e}"]


def _format_table(rows):
    table = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(row[k]) for row in table) for k in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if k < 6 else cell.rjust(w) for k, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def _format_markdown(rows):
    devices = sorted({r.get("device_name", r.get("device", "?")) for r in rows})
    out = [f"Device: {', '.join(devices)}. fastcon {rows[0].get('fastcon_version')}, torch {rows[0].get('torch')}, "
           f"git {rows[0].get('git_sha')}. Working memory excludes the inputs and their gradients.", "",
           "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="fastcon-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="clip", help="comma list: clip,siglip")
    p.add_argument("--providers", default="fastcon,reference,open_clip", help=f"comma list of {PROVIDERS}")
    p.add_argument("--batch", default=None, help="comma list of N (default: 1024,4096 on CPU)")
    p.add_argument("--dim", default="512", help="comma list of D")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mode", default="full", choices=("fwd", "full"))
    p.add_argument("--world-size", type=int, default=1,
                   help="W > 1: W local ranks (gloo on CPU, NCCL on GPU), --batch is the per-rank batch")
    p.add_argument("--local-loss", type=int, default=1, choices=(0, 1),
                   help="with --world-size: open_clip's local_loss mode (gather_with_grad is on)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--check-rows", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    p.add_argument("--json", default=None, help="write rows to this JSON file")
    p.add_argument("--markdown", default=None, help="write the table as Markdown to this file")
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="run nothing: print (and --markdown) the rows of earlier --json files")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        case = json.loads(args._worker)
        row = run_dist_case(case) if case.get("world_size", 1) > 1 else run_case(case)
        print(json.dumps(row))
        return 0

    if args.from_json:
        rows = [row for path in args.from_json for row in json.load(open(path))]
        print(_format_table(rows))
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(_format_markdown(rows))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batches = [int(x) for x in (args.batch or ("8192,32768,65536" if device == "cuda" else "1024,4096")).split(",")]
    meta = {"fastcon_version": __import__("fastcon").__version__, "torch": torch.__version__,
            "python": platform.python_version(), "git_sha": _git_sha(), "device": device}
    rows = []
    for loss in args.loss.split(","):
        for n in batches:
            for d in (int(x) for x in args.dim.split(",")):
                for provider in args.providers.split(","):
                    case = dict(loss=loss, provider=provider, batch=n, dim=d, dtype=args.dtype, mode=args.mode,
                                device=device, repeat=args.repeat, check_rows=args.check_rows)
                    if args.world_size > 1:
                        case.update(world_size=args.world_size, local_loss=bool(args.local_loss))
                    row = dict(_run_in_subprocess(case, args.timeout), **meta)
                    rows.append(row)
                    print(f"[{len(rows)}] {loss} {provider} N={n} D={d}: {row.get('status')}"
                          + (f" {row['median_ms']:.1f} ms, {row['peak_mib']:.1f} MiB" if row.get("status") == "ok" else ""),
                          file=sys.stderr, flush=True)
    _fill_distributed_agreement(rows)
    print(_format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_format_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
