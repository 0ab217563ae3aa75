"""The general-target losses against the implementations users would replace, on the CPU, fwd+bwd:
working memory (peak resident set beyond the inputs and their gradients) and wall time, each provider
in a fresh process, all of one case in one run.

    python benchmarks/target_peers.py --case negatives        # vs the materialising reference
    python benchmarks/target_peers.py --case mnrl             # vs sentence-transformers' MNRL, CachedMNRL
    python benchmarks/target_peers.py --case ntxent           # vs lightly (needs lightly: .venv-peers)
    python benchmarks/target_peers.py --case distill          # vs open_clip's DistillClipLoss
    python benchmarks/target_peers.py --case align_uniform    # vs the materialised formula
    python benchmarks/target_peers.py --case mochi            # vs the materialising reference
    python benchmarks/target_peers.py --case m2mix            # vs the materialising reference
    python benchmarks/target_peers.py --case topk             # vs a chunked torch.topk loop (forward only)
    python benchmarks/target_peers.py --case filip            # vs the materialising reference

Cases (fp32): negatives_clip_loss B=8192, K=7, D=512; MNRL with 3 hard negatives B=8192, D=384 (the
loss alone, embeddings given; the cached losses from mini-batches of 32 embeddings, as their
``calculate_loss``); NTXentLoss N=8192, D=256; DistillClipLoss N=16384, D=512 against open_clip's (the
sum of its two outputs); align_uniform_loss (with the cross term) N=16384, D=512 against the
materialised formula; MoCHi B=4096, K=65536, D=256, (N, s, s′) = (1024, 1024, 128), one set of draws;
m²-mix B=8192, D=512, λ = 0.3, both against their materialising references; topk_similarity
N=M=262144, D=512, k=10 against a loop of torch.topk over blocks of 1024 rows (no gradient).
``--scale 0.25`` runs each at a quarter of the batch.
Writes a JSON list of rows to ``--out`` (default: print only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

CASES = {
    "negatives": dict(batch=8192, dim=512, k=7, providers=["fastcon", "reference"]),
    "mnrl": dict(batch=8192, dim=384, k=3, providers=["fastcon", "sentence_transformers", "fastcon_cached",
                                                      "sentence_transformers_cached"]),
    "ntxent": dict(batch=8192, dim=256, k=0, providers=["fastcon", "lightly"]),
    "distill": dict(batch=16384, dim=512, k=0, providers=["fastcon", "open_clip"]),
    "align_uniform": dict(batch=16384, dim=512, k=0, providers=["fastcon", "reference"]),
    "mochi": dict(batch=4096, dim=256, k=65536, providers=["fastcon", "reference"]),
    "m2mix": dict(batch=8192, dim=512, k=0, providers=["fastcon", "reference"]),
    "topk": dict(batch=262144, dim=512, k=10, providers=["fastcon", "torch_topk"]),
    "filip": dict(batch=128, dim=256, k=0, providers=["fastcon", "reference"]),
}
FILIP_TOKENS = (196, 77)  # patches, caption tokens
TOPK_BLOCK = 1024
MOCHI = dict(top_n=1024, n_mix=1024, n_query_mix=128)
MINI_BATCH = 32


def _unit(t):
    import torch

    return torch.nn.functional.normalize(t, dim=-1)


def build(case: str, provider: str, b: int, d: int, k: int):
    """(step, leaves): ``step()`` runs the loss forward and backward on fresh gradients of ``leaves``."""
    import torch

    g = torch.Generator().manual_seed(0)
    if case == "negatives":
        import fastcon.functional as FC
        from fastcon import reference as R

        x = _unit(torch.randn(b, d, generator=g))
        y = _unit(x + 0.8 * _unit(torch.randn(b, d, generator=g)))
        negs = _unit(torch.randn(b, k, d, generator=g))
        leaves = [t.requires_grad_() for t in (x, y, negs)]
        scale = torch.tensor(14.3)
        if provider == "fastcon":
            fn = lambda: FC.negatives_clip_loss(*leaves, scale)  # noqa: E731
        else:
            fn = lambda: R.negatives_clip_loss_reference(*leaves, scale, upcast=False)  # noqa: E731
    elif case == "mnrl":
        import torch.nn as nn

        q = torch.randn(b, d, generator=g)
        docs = [q + torch.randn(b, d, generator=g)] + [torch.randn(b, d, generator=g) for _ in range(k)]
        stub = nn.Sequential(nn.Identity())  # CachedMNRL's constructor inspects its model's first module
        if provider.startswith("fastcon"):
            from fastcon.integrations import sentence_transformers as mod
        else:
            from sentence_transformers.sentence_transformer import losses as mod
        if provider.endswith("cached"):
            loss = mod.CachedMultipleNegativesRankingLoss(stub, mini_batch_size=MINI_BATCH)
            # the loss stage of GradCache: embeddings in mini-batches, the loss and its backward to them
            leaves = [t[i:i + MINI_BATCH].clone().requires_grad_() for t in [q] + docs for i in range(0, b, MINI_BATCH)]
            per_col = len(leaves) // (1 + len(docs))
            reps = [leaves[c * per_col:(c + 1) * per_col] for c in range(1 + len(docs))]
            return (lambda: loss.calculate_loss(reps, None, with_backward=True)), leaves
        loss = mod.MultipleNegativesRankingLoss(stub)
        leaves = [t.requires_grad_() for t in [q] + docs]
        fn = lambda: loss.compute_loss_from_embeddings(leaves, None)  # noqa: E731
    elif case == "ntxent":
        x = torch.randn(b, d, generator=g)
        y = x + 0.8 * torch.randn(b, d, generator=g)
        leaves = [t.requires_grad_() for t in (x, y)]
        if provider == "fastcon":
            import fastcon

            loss = fastcon.NTXentLoss()
        else:
            from lightly.loss import NTXentLoss

            loss = NTXentLoss()
        fn = lambda: loss(*leaves)  # noqa: E731
    elif case == "distill":
        x = _unit(torch.randn(b, d, generator=g))
        y = _unit(x + 0.8 * _unit(torch.randn(b, d, generator=g)))
        tx = _unit(x + 0.3 * _unit(torch.randn(b, d, generator=g)))
        ty = _unit(y + 0.3 * _unit(torch.randn(b, d, generator=g)))
        scale, t_scale = torch.tensor(14.3, requires_grad=True), torch.tensor(25.0)
        leaves = [t.requires_grad_() for t in (x, y)] + [scale]
        if provider == "fastcon":
            import fastcon

            loss = fastcon.DistillClipLoss()
        else:
            from fastcon.bench.providers import _load_open_clip_loss

            loss = _load_open_clip_loss().DistillClipLoss()
        fn = lambda: sum(loss(leaves[0], leaves[1], leaves[2], tx, ty, t_scale))  # noqa: E731
    elif case == "align_uniform":
        import fastcon.functional as FC
        from fastcon import reference as R

        x = torch.randn(b, d, generator=g)
        y = x + 0.8 * torch.randn(b, d, generator=g)
        leaves = [t.requires_grad_() for t in (x, y)]
        if provider == "fastcon":
            fn = lambda: FC.align_uniform_loss(*leaves, cross=True)  # noqa: E731
        else:
            fn = lambda: R.align_uniform_loss_reference(*leaves, cross=True)  # noqa: E731
    elif case == "mochi":
        import fastcon.functional as FC
        from fastcon import reference as R

        q = _unit(torch.randn(b, d, generator=g))
        key = _unit(q + 0.5 * _unit(torch.randn(b, d, generator=g)))
        queue = _unit(torch.randn(k, d, generator=g))
        mixes = FC.draw_mixes(b, MOCHI["top_n"], MOCHI["n_mix"], MOCHI["n_query_mix"], g, q.device)
        leaves = [q.requires_grad_()]
        if provider == "fastcon":
            fn = lambda: FC.mochi_loss(q, key, queue, **MOCHI, mixes=mixes)  # noqa: E731
        else:
            fn = lambda: R.mochi_loss_reference(q, key, queue, mixes, top_n=MOCHI["top_n"])  # noqa: E731
    elif case == "m2mix":
        import fastcon.functional as FC
        from fastcon import reference as R

        x = _unit(torch.randn(b, d, generator=g))
        y = _unit(x + 0.8 * _unit(torch.randn(b, d, generator=g)))
        leaves = [t.requires_grad_() for t in (x, y)]
        if provider == "fastcon":
            fn = lambda: FC.m2mix_loss(*leaves, lam=0.3)  # noqa: E731
        else:
            fn = lambda: R.m2mix_loss_reference(*leaves, 0.3)  # noqa: E731
    elif case == "filip":
        import fastcon.functional as FC
        from fastcon import reference as R

        n1, n2 = FILIP_TOKENS
        p = _unit(torch.randn(b, n1, d, generator=g))
        t = _unit(torch.randn(b, n2, d, generator=g))
        tm = torch.arange(n2)[None, :] < torch.randint(8, n2 + 1, (b,), generator=g)[:, None]
        scale = torch.tensor(14.3, requires_grad=True)
        leaves = [p.requires_grad_(), t.requires_grad_(), scale]
        if provider == "fastcon":
            fn = lambda: FC.filip_loss(p, t, scale, token_mask=tm)  # noqa: E731
        else:
            fn = lambda: R.filip_loss_reference(p, t, scale, token_mask=tm)  # noqa: E731
    elif case == "topk":
        import fastcon.functional as FC

        x = _unit(torch.randn(b, d, generator=g))
        y = _unit(x + 0.8 * _unit(torch.randn(b, d, generator=g)))
        leaves = []
        if provider == "fastcon":
            return (lambda: FC.topk_similarity(x, y, k)), leaves

        def chunked_topk():
            out = [torch.topk(x[r0:r0 + TOPK_BLOCK] @ y.T, k, dim=1) for r0 in range(0, b, TOPK_BLOCK)]
            return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])
        return chunked_topk, leaves
    else:
        raise ValueError(case)

    def step():
        for t in leaves:
            t.grad = None
        fn().backward()
    return step, leaves


def run_one(case: str, provider: str, scale: float, repeat: int) -> dict:
    import torch

    from fastcon.bench.measure import (GLIBC_SETTLED, _PeakMemory, cpu_name, set_malloc_thresholds, time_fields,
                                       wall_times)

    cfg = CASES[case]
    b, d, k = max(1, int(cfg["batch"] * scale)), cfg["dim"], cfg["k"]
    warnings.simplefilter("ignore")
    small, _ = build(case, provider, 64, d, k)
    small()  # one-time costs (thread pools, the auto backend's notice) outside the measurements
    step, leaves = build(case, provider, b, d, k)
    grads = sum(t.numel() * t.element_size() for t in leaves)
    with _PeakMemory(torch.device("cpu")) as mem:
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
    set_malloc_thresholds(*GLIBC_SETTLED)
    times = [first] if first > 60 else []
    if not times:
        step()  # one call to settle the heap
        times = wall_times(step, repeat)
    row = dict(case=case, provider=provider, batch=b, dim=d, k=k, dtype="float32",
               working_mib=max(mem.peak - grads, 0) / 2**20, memory_method=mem.method + ", less the gradients",
               device_name=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__)
    row.update(time_fields(times))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), required=True)
    p.add_argument("--providers", default=None, help="comma-separated subset of the case's providers")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the case's batch")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker: one provider, JSON on stdout
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.case, args.one, args.scale, args.repeat)))
        return 0
    providers = args.providers.split(",") if args.providers else CASES[args.case]["providers"]
    rows = []
    for provider in providers:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 << 10), HF_HUB_OFFLINE="1")
        out = subprocess.run([sys.executable, __file__, "--case", args.case, "--one", provider, "--scale",
                              str(args.scale), "--repeat", str(args.repeat)], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{provider}: failed\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{args.case:9s} {provider:30s} B={row['batch']:6d} D={row['dim']:4d} K={row['k']}: "
              f"{row['median_ms']:10.1f} ms  {row['working_mib']:9.1f} MiB", flush=True)
    base = rows[0]
    for row in rows[1:]:
        print(f"  {base['provider']} / {row['provider']}: time {base['median_ms'] / row['median_ms']:.2f}x, "
              f"working memory {base['working_mib'] / max(row['working_mib'], 1e-9):.3f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
