"""CLIP on its own softmax engine against CLIP as the general target with every option off (positives
by ids i == i), C++ backend, fp32, D = 512, forward + backward; the two alternating, median of the
repeats (docs/engine.md, "What the engine does not fold together").

    python benchmarks/clip_vs_target.py
"""
import statistics
import time

import torch

from fastcon.targets import Target
from fastcon.ops import clip_engine_loss, target_engine_loss

torch.manual_seed(0)
d = 512
for n, reps in ((1024, 15), (4096, 5), (16384, 3)):
    a = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    ids = torch.arange(n)
    t = Target(ids, ids)
    runs = {
        "clip": lambda: clip_engine_loss(a, b, s, None, label_smoothing=0.0, pos_offset=0, backend="cpp", chunk_size=None),
        "target": lambda: target_engine_loss(a, b, s, None, t, symmetric=True, backend="cpp"),
    }
    vals = {k: f().item() for k, f in runs.items()}  # warm-up, and the two agree
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, f in runs.items():
            for x in (a, b, s):
                x.grad = None
            t0 = time.perf_counter(); f().backward(); times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"N={n}: clip {med['clip']*1e3:.1f} ms, target {med['target']*1e3:.1f} ms, ratio {med['target']/med['clip']:.3f}; "
          f"loss {vals['clip']:.6f} vs {vals['target']:.6f}", flush=True)
