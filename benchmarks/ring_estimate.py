"""How much of the ring's communication hides behind its computation: a model, not a measurement.

Counts what ``fastcon/distributed.py`` really sends per hop and the FLOPs each ring step computes, then
converts both to time with an assumed matrix throughput and an assumed point-to-point bandwidth.

Per rank (local batch n, dimension D, W ranks, input dtype of e bytes), CLIP's global mode:

* statistics lap: W steps, each a pass 1 over one n×n block (one GEMM, 2·n²·D FLOPs) while the next
  text shard (n·D·e bytes) and the partial column LSE of the previous one (n·8 bytes) travel one hop;
  then the column LSE goes one last hop home (not overlapped).
* gradient lap: W steps, each a pass 2 over one n×n block (three GEMMs, 6·n²·D FLOPs) while the next
  shard, its column LSE (n·8) and the previous shard's fp32 gradient accumulator (n·D·4) travel; then
  the accumulator goes one last hop home (not overlapped).

SigLIP is one lap like the gradient lap, without the LSE (2·n²·D FLOPs for the logits and 4·n²·D
for the gradients per step). A hop is
hidden when it takes no longer than the step it overlaps; what exceeds the step, and the final hops,
are exposed. Latency (tens of microseconds per hop) and the SMs that NCCL's kernels take from the
GEMMs are not modelled: read the result as a lower bound on the exposed time.

    python benchmarks/ring_estimate.py --world 8 --local-n 8192 --dim 768 --dtype bf16
"""
from __future__ import annotations

import argparse

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def estimate(world: int, n: int, d: int, elem: int, tflops: float, gbps: float) -> dict:
    flop_rate, byte_rate = tflops * 1e12, gbps * 1e9
    shard, lse, acc = n * d * elem, n * 8, n * d * 4
    laps = {
        # name: (FLOPs per step, bytes per overlapped hop, bytes of the final hop home)
        "clip stats": (2 * n * n * d, shard + lse, lse),
        "clip grad": (6 * n * n * d, shard + lse + acc, acc),
        "siglip": (6 * n * n * d, shard + acc, acc),
    }
    out = {}
    for name, (flops, hop, home) in laps.items():
        step_s, hop_s = flops / flop_rate, hop / byte_rate
        hops = world - 1  # hops that overlap a step; the first step computes the own shard
        exposed = hops * max(0.0, hop_s - step_s) + home / byte_rate
        comm = hops * hop_s + home / byte_rate
        out[name] = dict(step_ms=step_s * 1e3, hop_ms=hop_s * 1e3, hop_mb=hop / 1e6, lap_ms=world * step_s * 1e3,
                         comm_ms=comm * 1e3, exposed_ms=exposed * 1e3, hidden=1.0 - exposed / comm if comm else 1.0)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--local-n", type=int, default=8192)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--tflops", type=float, nargs="+", default=[550.0],
                   help="achieved matrix throughput of the loss kernels, TFLOP/s")
    p.add_argument("--gbps", type=float, nargs="+", default=[300.0, 50.0],
                   help="point-to-point bandwidth per GPU and direction, GB/s (e.g. NVLink in a node, "
                        "InfiniBand between nodes)")
    args = p.parse_args(argv)
    print(f"W={args.world}, local N={args.local_n}, D={args.dim}, {args.dtype}; per rank, one forward+backward")
    print(f"{'TFLOP/s':>8} {'GB/s':>6} {'lap':<11} {'step ms':>8} {'hop MB':>7} {'hop ms':>7} {'lap ms':>7} "
          f"{'comm ms':>8} {'exposed ms':>10} {'hidden':>7}")
    for tflops in args.tflops:
        for gbps in args.gbps:
            res = estimate(args.world, args.local_n, args.dim, DTYPE_BYTES[args.dtype], tflops, gbps)
            for name, r in res.items():
                print(f"{tflops:8.0f} {gbps:6.0f} {name:<11} {r['step_ms']:8.3f} {r['hop_mb']:7.1f} {r['hop_ms']:7.3f} "
                      f"{r['lap_ms']:7.2f} {r['comm_ms']:8.3f} {r['exposed_ms']:10.3f} {r['hidden']:7.0%}")


if __name__ == "__main__":
    main()
