"""The peak-RSS rise of one CLIP step (fp32, forward and backward, ``backend="auto"``) in a fresh
process, with the inputs allocated before it; ``--warmup`` runs a smaller step first, or another
first-time cost alone, to see what the first call pays once.

    python benchmarks/first_call_rss.py --batch 16384 --dim 512
    python benchmarks/first_call_rss.py --batch 16384 --warmup clip64

Warm-ups: ``none``; ``clip64`` (a 64-row CLIP step, the direct C++ call); ``mm`` (a first GEMM);
``autograd`` (a first backward); ``extension`` (loading the C++ extension).
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--warmup", default="none", choices=("none", "clip64", "mm", "autograd", "extension"))
    args = p.parse_args(argv)
    import fastcon.functional as FC
    from fastcon.bench.measure import rss_bytes

    g = torch.Generator().manual_seed(0)

    def unit_rows():  # normalised in place: no temporary raises the peak that the rise is measured from
        x = torch.randn(args.batch, args.dim, generator=g)
        return x.div_(x.norm(dim=1, keepdim=True)).requires_grad_()

    a, b = unit_rows(), unit_rows()
    s = torch.tensor(10.0, requires_grad=True)
    if args.warmup == "clip64":
        FC.clip_loss(a[:64], b[:64], s).backward()
        a.grad = b.grad = s.grad = None
    elif args.warmup == "mm":
        torch.mm(torch.randn(256, args.dim), torch.randn(args.dim, 256))
    elif args.warmup == "autograd":
        (torch.ones(3, requires_grad=True) * 2).sum().backward()
    elif args.warmup == "extension":
        from fastcon.ops import engine

        engine.cpp_module()
    before, resident = rss_bytes("VmHWM"), rss_bytes("VmRSS")
    FC.clip_loss(a, b, s).backward()
    peak = rss_bytes("VmHWM")
    rise = peak - before
    compilers = [m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules]
    grads = 2 * args.batch * args.dim * 4
    print(f"N={args.batch} D={args.dim} warm-up={args.warmup}: peak RSS rise {rise / 2**20:.0f} MiB "
          f"({(peak - resident) / 2**20:.0f} MiB above the resident set before the call, of which the gradients "
          f"are {grads / 2**20:.0f}), {torch.get_num_threads()} threads, compiler modules imported: "
          f"{', '.join(compilers) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
