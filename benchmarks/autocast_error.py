"""How far autocast moves each backend's loss and gradients from its fp32 result, beside open_clip.

For each backend: the loss and the largest gradient difference (relative to the largest fp32
gradient) of ``clip_loss`` and ``siglip_loss`` under ``torch.autocast("cpu", dtype)`` against the
same backend without autocast, and the same for open_clip's formulas (its loss module when
installed), so that the two deviations are read side by side. The Triton backends run through the
interpreter (TRITON_INTERPRET=1), which has fp16 but no bf16.

    TRITON_INTERPRET=1 python benchmarks/autocast_error.py --json benchmarks/results/training-loop/cpu-autocast.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch
import torch.nn.functional as F

import fastcon.functional as FC


def _features(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(a + 0.8 * F.normalize(torch.randn(n, d, generator=g), dim=-1), dim=-1)
    return a, b


def _open_clip(loss):
    if importlib.util.find_spec("open_clip") is not None:
        from fastcon.bench.providers import _load_open_clip_loss

        module = _load_open_clip_loss()
        if loss == "clip":
            clip = module.ClipLoss()
            return lambda a, b, s, bias: clip(a, b, s)
        siglip = module.SigLipLoss()
        return lambda a, b, s, bias: siglip(a, b, s, bias)

    def restated(a, b, s, bias):
        labels = torch.arange(a.shape[0])
        if loss == "clip":
            return (F.cross_entropy(s * a @ b.T, labels) + F.cross_entropy(s * b @ a.T, labels)) / 2
        z = 2 * torch.eye(a.shape[0]) - 1
        return -F.logsigmoid(z * (s * a @ b.T + bias)).sum() / a.shape[0]
    return restated


def _run(fn, a, b, s, bias, dtype):
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(), s.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = fn(*leaves, bias)
    return out.float(), torch.autograd.grad(out, leaves)


def _compare(fn, a, b, s, bias, dtype):
    ref, ref_grads = _run(fn, a, b, s, bias, None)
    out, grads = _run(fn, a, b, s, bias, dtype)
    grad_diff = max(((g.double() - r.double()).abs().max() / r.double().abs().max()).item()
                    for g, r in zip(grads[:2], ref_grads[:2]))
    return {"loss_fp32": ref.item(), "loss_autocast": out.item(), "loss_dtype": str(out.dtype),
            "loss_rel_diff": abs(out.item() - ref.item()) / abs(ref.item()),
            "max_feature_grad_rel_diff": grad_diff,
            "grad_dtypes": sorted({str(g.dtype) for g in grads})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--interp-batch", type=int, default=256, help="batch of the Triton interpreter cases")
    p.add_argument("--interp-dim", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cases = [("cpp", torch.bfloat16), ("torch", torch.bfloat16), ("cpp", torch.float16)]
    if os.environ.get("TRITON_INTERPRET") == "1":
        cases += [("triton", torch.float16), ("triton_fused", torch.float16)]
    rows = []
    for backend, dtype in cases:
        n, d = (args.interp_batch, args.interp_dim) if backend.startswith("triton") else (args.batch, args.dim)
        a, b = _features(n, d)
        for loss in ("clip", "siglip"):
            s = torch.tensor(14.3 if loss == "clip" else 10.0)
            bias = torch.tensor(-10.0) if loss == "siglip" else None
            fc = FC.clip_loss if loss == "clip" else FC.siglip_loss
            ours = _compare(lambda x, y, t, c: fc(x, y, t, c, backend=backend), a, b, s, bias, dtype)
            peer = _compare(_open_clip(loss), a, b, s, bias, dtype)
            row = {"loss": loss, "backend": backend, "autocast_dtype": str(dtype).replace("torch.", ""),
                   "batch": n, "dim": d, **ours,
                   "open_clip_loss_rel_diff": peer["loss_rel_diff"],
                   "open_clip_max_feature_grad_rel_diff": peer["max_feature_grad_rel_diff"]}
            rows.append(row)
            print(f"{loss:6s} {backend:12s} {row['autocast_dtype']:8s} N={n} D={d}: loss {row['loss_rel_diff']:.2e} "
                  f"grad {row['max_feature_grad_rel_diff']:.2e} (open_clip: loss {row['open_clip_loss_rel_diff']:.2e}, "
                  f"grad {row['open_clip_max_feature_grad_rel_diff']:.2e}); loss {row['loss_dtype']}, "
                  f"grads {','.join(row['grad_dtypes'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
