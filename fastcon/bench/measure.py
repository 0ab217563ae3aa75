"""One benchmark case, measured inside its own worker process.

Memory: CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; CPU: the
process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` before the call) minus
the resident set before it. Both exclude the inputs, and the gradients of the inputs (2·N·D elements)
are subtracted too, so the figure is the loss's *working* memory. Time: CPU: wall clock of at least
``repeat`` calls and at least ``min_time`` seconds of them after the memory call, with glibc's
allocator thresholds as a training loop settles them (``set_malloc_thresholds``); CUDA: CUDA events
through ``triton.testing.do_bench``.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time

from .providers import TOKEN_SHAPES, make_dist_loss_fn, make_loss_fn

# Forward+backward FLOPs in units of 2·Na·Nb·D (one GEMM-equivalent): the minimal O(N)-memory engine
# computes S once for the statistics, then S again and two products for the gradients.
GEMMS = {"fwd": 1, "bwd": 3, "full": 4}
SLOW_CALL_S = 20.0  # a first call slower than this is the only timed call


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def rss_bytes(field: str) -> int:
    """``VmRSS`` (the resident set now) or ``VmHWM`` (its peak) of this process in bytes, from
    ``/proc/self/status`` (0 where there is none): the process's own figures, where ``ru_maxrss`` also
    counts the resident set of a parent that forked it."""
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


# Where glibc's dynamic thresholds settle in a loop that frees what it allocates: blocks up to 32 MiB
# reused from the heap, larger ones mapped afresh (and page-faulted) on every call.
GLIBC_SETTLED = (32 << 20, 64 << 20)


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> None:
    """Fixes glibc's mmap and trim thresholds (no-op where glibc is not the allocator).

    The benchmark worker starts with a 128 KiB mmap threshold (set by the driver), so that the memory
    call's peak resident set is exact; for the timing it moves to ``GLIBC_SETTLED``, the state of a
    training loop, since at 128 KiB every large allocation would pay its page faults on every call, a
    cost the users' runs do not have."""
    import ctypes
    import ctypes.util

    if not 0 <= mmap_bytes <= 32 << 20 or not 0 <= trim_bytes < 1 << 31:
        raise ValueError(f"glibc takes an mmap threshold of at most 32 MiB and a trim threshold below 2 GiB, "
                         f"got {mmap_bytes} and {trim_bytes}")
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, int(mmap_bytes))
    mallopt(m_trim_threshold, int(trim_bytes))


class _PeakMemory:
    """Peak bytes allocated by the code inside the ``with`` block, beyond what existed before it."""

    def __init__(self, device):
        self.device, self.peak = device, 0
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                       else "peak RSS (VmHWM after clear_refs) minus RSS before")

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if not _reset_peak_rss():
                self.method = "peak RSS since process start minus RSS before (no /proc/self/clear_refs)"
            self.base = rss_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = rss_bytes("VmHWM") - self.base
        return False


def make_inputs(n, d, dtype, device, seed=0, loss=None):
    """Unit rows, each text row correlated with its image row (a trained model's batch; clip_debias's
    barely); for a
    token-level loss, n items of ``TOKEN_SHAPES[loss]`` unit tokens each, item i of b made from the
    tokens of item i of a (cycled to b's count) plus twice as much noise (a loss well above 0)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(seed)
    if loss in TOKEN_SHAPES:
        n1, n2 = TOKEN_SHAPES[loss]
        a = F.normalize(torch.randn(n, n1, d, generator=g), dim=-1)
        src = a[:, torch.arange(n2) % n1]
        b = F.normalize(src + 2.0 * F.normalize(torch.randn(n, n2, d, generator=g), dim=-1), dim=-1)
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    # clip_debias: an early batch, positives barely above chance (cos ≈ 0.16), where the correction
    # acts; at a trained batch's 0.8 every row meets the floor and the loss is ~1e-9
    noise = 6.0 if loss == "clip_debias" else 0.8
    b = F.normalize(a + noise * F.normalize(torch.randn(n, d, generator=g), dim=-1), dim=-1)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def make_scalars(loss, device):
    """open_clip's trained CLIP scale (14.3) without bias; SigLIP's initial scale 10 and bias −10."""
    import torch

    if loss in ("ntxent", "mnrl", "align_uniform", "m2mix", "mochi", "maxsim", "dcl", "pml_ntxent", "supcon"):
        # a constant temperature / scale
        return torch.tensor(1.0, device=device), None
    s = torch.tensor(10.0 if loss == "siglip" else 14.3, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True) if loss == "siglip" else None
    return s, bias


def rel_err_f64(fn, ref, inputs) -> float:
    """Largest error of ``fn(*inputs)`` and of its gradient with respect to each input, relative to the
    largest value of that output, against ``ref`` on the same inputs in float64. The features (the
    first two inputs) are differentiated, the others where they require grad; None passes through; a
    gradient that reaches no input is zeros in both (MoCHi's keys)."""
    import torch

    outs = []
    for f64 in (False, True):
        leaves = [None if t is None else (t.detach().double() if f64 else t.detach()).clone().requires_grad_(
            k < 2 or t.requires_grad) for k, t in enumerate(inputs)]
        value = (ref if f64 else fn)(*leaves)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = torch.autograd.grad(value, wrt, allow_unused=True)
        outs.append([value.detach().double()] + [torch.zeros_like(t, dtype=torch.float64) if g is None else g.double()
                                                 for t, g in zip(wrt, grads)])
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item() for x, y in zip(*outs))


def max_rel_err(loss, fn, n, d, dtype, device) -> float:
    """``rel_err_f64`` of the loss and every gradient against the float64 reference on the same
    (rounded) inputs."""
    from .providers import reference_fn

    a, b = make_inputs(n, d, dtype, device, seed=1, loss=loss)
    s, bias = make_scalars(loss, device)
    return rel_err_f64(fn, reference_fn(loss), (a, b, s, bias))


def _step(fn, a, b, s, bias, mode):
    """The timed call of ``mode``: fwd (no grad), bwd (the backward of a forward done here once), full."""
    import torch

    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(a, b, s, bias)
        return fwd
    if mode == "full":
        def full():
            xa, xb = a.detach().requires_grad_(), b.detach().requires_grad_()
            out = fn(xa, xb, s, bias)
            out.backward()
            return out
        return full
    xa, xb = a.detach().requires_grad_(), b.detach().requires_grad_()
    out = fn(xa, xb, s, bias)

    def bwd():
        xa.grad = xb.grad = None
        out.backward(retain_graph=True)
        return out
    return bwd


def _quantile(values, q):
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# CPU timing repeats by time, as triton.testing.do_bench does on a GPU: at least ``repeat`` calls and
# at least MIN_TIME_S of them (a 0.3 ms case gets thousands of samples, a 5 s case its ``repeat``),
# at most MAX_SAMPLES.
MIN_TIME_S = 1.0
MAX_SAMPLES = 10_000


def wall_times(call, repeat: int, min_time_s: float = 0.0):
    """Seconds of each call by the wall clock (CPU): ``repeat`` calls, and more until they add up to
    ``min_time_s`` (at most ``MAX_SAMPLES``), with Python's garbage collector paused."""
    times = []
    enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land in whichever call it interrupts
    try:
        while len(times) < repeat or (sum(times) < min_time_s and len(times) < MAX_SAMPLES):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    finally:
        if enabled:
            gc.enable()
    return times


def time_fields(times_s) -> dict:
    ms = [t * 1e3 for t in times_s]
    return dict(median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms), p20_ms=_quantile(ms, 0.2),
                p80_ms=_quantile(ms, 0.8), samples=len(ms))


# The matrix products of a CPU profile, out of place or in place (addmm_): their self time is the BLAS
# kernel's; on a GPU, the kernels whose names say so (cuBLAS, CUTLASS, and fastcon's own GEMM kernels).
CPU_GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::addmv", "aten::mv",
                "aten::dot")
GPU_GEMM_WORDS = ("gemm", "xmma", "cutlass", "_mm_")


def profile_split(step, cuda: bool) -> dict:
    """One call of ``step`` under ``torch.profiler``: ``gemm_ms``, the time in matrix products (the self
    time of aten::mm, addmm, addmm_, bmm, … on the CPU; on a GPU the device time of the kernels named like
    GEMMs), and ``epilogue_ms``, the rest of the call (on the CPU its wall time less the GEMMs: the
    epilogues, autograd and Python; on a GPU the device time of every other kernel)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    events = prof.key_averages()
    if cuda:
        def device_us(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

        kernels = [(e.key.lower(), device_us(e)) for e in events if device_us(e) > 0]
        gemm = sum(t for name, t in kernels if any(w in name for w in GPU_GEMM_WORDS)) / 1e3
        return {"gemm_ms": gemm, "epilogue_ms": sum(t for _, t in kernels) / 1e3 - gemm, "profile_wall_ms": wall_ms}
    gemm = sum(e.self_cpu_time_total for e in events if e.key.rstrip("_") in CPU_GEMM_OPS) / 1e3
    return {"gemm_ms": gemm, "epilogue_ms": max(wall_ms - gemm, 0.0), "profile_wall_ms": wall_ms}


def warm_rows(loss: str, provider: str, n: int) -> int:
    """The rows of a case's warm-up call, which takes the path of the measured call: torch.compile
    specialises on the shape, so it warms up on the case itself; so does a case small enough for the
    engine's direct C++ call (``ops.engine.direct_call``: at most ``SMALL_LOGITS`` logits, square);
    a larger one warms up on the fewest rows above that, the operator's path; a token-level case on
    64 items."""
    from fastcon.ops.engine import SMALL_LOGITS

    direct = math.isqrt(SMALL_LOGITS)
    if provider in ("torch_compile", "fastcon_compile") or (loss not in TOKEN_SHAPES and n <= direct):
        return n
    return min(n, 64 if loss in TOKEN_SHAPES else direct + 1)


def run_case(case: dict) -> dict:
    import torch

    loss, provider, n, d, mode = case["loss"], case["provider"], case["batch"], case["dim"], case["mode"]
    dtype = getattr(torch, case["dtype"])
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    row = dict(case)
    fn = make_loss_fn(loss, provider, d)
    a, b = make_inputs(n, d, dtype, device, loss=loss)
    s, bias = make_scalars(loss, device)
    # A warm-up outside the measurements: one-time costs (thread pools, library workspaces, Triton's
    # compilation, imports) are not the loss's. It runs through the path of the measured call.
    warm = warm_rows(loss, provider, n)
    _step(fn, a[:warm], b[:warm], s, bias, mode)()
    step = _step(fn, a, b, s, bias, mode)
    with _PeakMemory(device) as mem:
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
    peak = mem.peak - ((a.numel() + b.numel()) * a.element_size() if mode != "fwd" else 0)
    row["memory_method"] = mem.method
    row["peak_mib"] = max(peak, 0) / 2**20

    # Correctness before timing (after the memory call, so that its buffers cannot hide in the baseline).
    check_rows = min(n, case.get("check_rows", 16 if loss in TOKEN_SHAPES else 2048))
    row["check_rows"] = check_rows
    row["max_rel_err"] = max_rel_err(loss, fn, check_rows, d, dtype, device)

    if cuda:
        from triton.testing import do_bench

        times = [t / 1e3 for t in do_bench(step, warmup=case.get("warmup_ms", 25), rep=case.get("rep_ms", 100),
                                           return_mode="all")]
    elif first > SLOW_CALL_S:
        # Very slow cases: the memory call is the only call (its page faults at the 128 KiB mmap
        # threshold included).
        times = [first]
    else:
        set_malloc_thresholds(*GLIBC_SETTLED)
        step()  # one call to settle the heap
        times = wall_times(step, case.get("repeat", 3), case.get("min_time", MIN_TIME_S))
    row.update(time_fields(times))
    if case.get("profile"):
        row.update(profile_split(step, cuda))
    # NT-Xent: the 2N×2N product of both views; alignment/uniformity: three N×N products (x·x, y·y, x·y);
    # distill: the student's N×N (the nominal CLIP count; the teacher's products are not counted); m²-mix:
    # two N×N products (x·m, y·m); MoCHi: the N×4N product with the queue; DCL and the PML cases: the
    # 2N×2N product of both views
    # the token-level losses: B² pairs of n₁×n₂ token products (FILIP's and MaxSim's counts)
    rows_cols = {"ntxent": (2 * n) ** 2, "align_uniform": 3 * n * n, "m2mix": 2 * n * n, "mochi": 4 * n * n,
                 "dcl": (2 * n) ** 2, "pml_ntxent": (2 * n) ** 2, "supcon": (2 * n) ** 2}.get(
        loss, n * n) * (TOKEN_SHAPES[loss][0] * TOKEN_SHAPES[loss][1] if loss in TOKEN_SHAPES else 1)
    row["tflops"] = 2 * GEMMS[mode] * rows_cols * d / (row["median_ms"] / 1e3) / 1e12
    row["device_name"] = device_name(device)
    row["threads"] = torch.get_num_threads()
    return row


def run_peak(case: dict) -> dict:
    """The dense matrix-product throughput of the device in ``case["dtype"]``: the FLOP/s that the
    loss kernels' TFLOP/s are judged against. ``batch``×``dim`` times ``dim``×``batch``."""
    import torch

    n, d = case["batch"], case["dim"]
    dtype, device = getattr(torch, case["dtype"]), torch.device(case["device"])
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    y = torch.randn(d, n, generator=g).to(device=device, dtype=dtype)
    if device.type == "cuda":
        from triton.testing import do_bench

        times = [t / 1e3 for t in do_bench(lambda: x @ y, warmup=100, rep=500, return_mode="all")]
    else:
        x @ y
        times = wall_times(lambda: x @ y, case.get("repeat", 3))
    row = dict(case, **time_fields(times), peak_mib=0.0, max_rel_err=0.0, check_rows=0,
               memory_method="-", device_name=device_name(device), threads=torch.get_num_threads())
    row["tflops"] = 2 * n * n * d / (row["median_ms"] / 1e3) / 1e12
    return row


# ------------------------------------------------------------------------------------------ distributed
def _dist_rel_err(fn, case, rank, world, n, device) -> float:
    """This rank's ``rel_err_f64`` of its loss and every gradient (features, scale, bias) against the
    float64 per-rank reference (open_clip's formulas on features gathered with gradient:
    ``make_dist_loss_fn``'s ``reference``) on the same rounded inputs: what ``max_rel_err`` means for
    a single device too. Collective: every rank runs it."""
    import torch

    loss = case["loss"]
    ref = make_dist_loss_fn(loss, "reference", rank, world, case.get("local_loss", True))
    a, b = make_inputs(n, case["dim"], getattr(torch, case["dtype"]), device, seed=200 + rank)
    s, bias = make_scalars(loss, device)
    return rel_err_f64(fn, ref, (a, b, s) + ((bias,) if bias is not None else ()))


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
        fn = make_dist_loss_fn(loss, case["provider"], rank, world, case.get("local_loss", True))
        a, b = make_inputs(n, d, getattr(torch, case["dtype"]), device, seed=100 + rank)
        s, bias = make_scalars(loss, device)
        step = _step(lambda *x: fn(*x) if bias is not None else fn(*x[:3]), a, b, s, bias, "full")
        dist.barrier()
        with _PeakMemory(device) as mem:
            value = step().item()
        if device.type == "cpu":
            set_malloc_thresholds(*GLIBC_SETTLED)
            step()
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
        err = _dist_rel_err(fn, case, rank, world, min(n, case.get("check_rows", 2048)), device)
        queue.put(dict(rank=rank, loss_value=value, peak=max(mem.peak - 2 * n * d * a.element_size(), 0),
                       times=times, memory_method=mem.method, max_rel_err=err))
    except Exception as exc:  # reported as the case's error row
        queue.put(dict(rank=rank, error=f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def run_dist_case(case: dict) -> dict:
    """A ``--world-size`` case: W local ranks; per-rank memory is the largest of the ranks, the step
    time the median over repeats of the slowest rank."""
    import socket

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
    row = dict(case, **time_fields(slowest))
    row["peak_mib"] = max(r["peak"] for r in results) / 2**20
    row["memory_method"] = results[0]["memory_method"]
    row["rank_losses"] = [r["loss_value"] for r in results]
    n, d = case["batch"], case["dim"]
    # FLOPs of this rank's share of the global step: 8·n·N·D (one row block of the N×N matrix).
    row["tflops"] = 8 * n * n * world * d / (row["median_ms"] / 1e3) / 1e12
    row["max_rel_err"] = max(r["max_rel_err"] for r in results)  # the worst rank's
    import torch

    row["device_name"] = device_name(torch.device(case["device"]))
    row["threads"] = max(1, (os.cpu_count() or 1) // world)
    return row
