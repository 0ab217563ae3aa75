"""Time of a compiled training step's loss head against eager, in one run.

The step normalises the features (as CLIP and SigLIP models do before the loss) and calls fastcon's
``ClipLoss`` or ``SigLipLoss``, forward and backward: ``torch.compile(step, fullgraph=True)`` against
the same step in eager mode, same inputs, interleaved rounds, median of ``--repeat`` timed calls
after warm-up (compilation excluded). Also checks that both give the same loss and gradients.

    python benchmarks/compile_step.py --batch 4096 --dim 512 --json benchmarks/results/training-loop/cpu-compile-step.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import fastcon


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "cpu"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.batch, args.dim, generator=g).to(device)
    y0 = (x0 + torch.randn(args.batch, args.dim, generator=g).to(device))
    rows = []
    for name, loss_fn, bias_value in (("clip", fastcon.ClipLoss(backend=args.backend), 0.0),
                                      ("siglip", fastcon.SigLipLoss(backend=args.backend), -10.0)):
        def step(x, y, log_scale, bias):
            return loss_fn(F.normalize(x, dim=-1), F.normalize(y, dim=-1), log_scale.exp(), bias)

        leaves = [x0.clone().requires_grad_(), y0.clone().requires_grad_(),
                  torch.tensor(2.659, device=device, requires_grad=True),
                  torch.tensor(bias_value, device=device, requires_grad=True)]
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)

        def run(fn):
            out = fn(*leaves)
            grads = torch.autograd.grad(out, leaves)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out.detach(), grads

        t0 = time.perf_counter()
        c_out, c_grads = run(compiled)
        compile_s = time.perf_counter() - t0
        e_out, e_grads = run(step)
        max_rel = max(((c - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                      for c, e in zip((c_out,) + c_grads[:3], (e_out,) + e_grads[:3]))
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeat):  # interleaved, so that drifts in the machine hit both alike
            for label, fn in (("eager", step), ("compiled", compiled)):
                t0 = time.perf_counter()
                run(fn)
                times[label].append(time.perf_counter() - t0)
        row = {
            "loss": name, "batch": args.batch, "dim": args.dim, "dtype": "float32", "device": args.device,
            "device_name": torch.cuda.get_device_name() if device.type == "cuda" else _cpu_name(),
            "backend": args.backend, "eager_ms": 1e3 * statistics.median(times["eager"]),
            "compiled_ms": 1e3 * statistics.median(times["compiled"]),
            "eager_min_max_ms": [1e3 * min(times["eager"]), 1e3 * max(times["eager"])],
            "compiled_min_max_ms": [1e3 * min(times["compiled"]), 1e3 * max(times["compiled"])],
            "first_compiled_call_s": compile_s, "max_rel_diff_compiled_vs_eager": max_rel,
            "torch": torch.__version__, "fastcon": fastcon.__version__, "git": _git_sha(),
            "threads": torch.get_num_threads(),
        }
        row["ratio_compiled_over_eager"] = row["compiled_ms"] / row["eager_ms"]
        rows.append(row)
        print(f"{name:6s} N={args.batch} D={args.dim}: eager {row['eager_ms']:.1f} ms, compiled "
              f"{row['compiled_ms']:.1f} ms (x{row['ratio_compiled_over_eager']:.2f}), first compiled call "
              f"{compile_s:.1f} s, max rel diff {max_rel:.2g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
