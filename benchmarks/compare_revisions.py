"""fastcon-bench of two (or more) revisions of fastcon in one run, interleaved case by case, so that a
change can be checked for speed regressions on the same machine at the same time.

    python benchmarks/compare_revisions.py --rev ef35398 --rev HEAD --loss clip,siglip \
        --batch 4096,16384 --dim 512 --out benchmarks/results/...json

Each revision is checked out into a temporary worktree with its C++ extension built in place (by this
Python, against this torch); every case then runs ``python -m fastcon.bench`` once per revision,
alternating, with the revision first on ``PYTHONPATH``. With ``--rounds R`` every case runs R times per
revision, the order of the revisions reversed every other round, so that neither is always first.
Prints, per case, each revision's time and its ratio to the first revision: the median of its
calls' medians and, with ``--stat min``, the fastest call of any round (the figure a shared, loaded
machine moves least: load only ever adds time).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sha(rev: str) -> str:
    return subprocess.check_output(["git", "rev-parse", "--short", rev], cwd=ROOT, text=True).strip()


def _checkout(rev: str, base: str) -> str:
    path = os.path.join(base, _sha(rev))
    subprocess.check_call(["git", "worktree", "add", "--detach", "-f", path, rev], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.check_call([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path,
                          stdout=subprocess.DEVNULL)
    return path


def _env(path: str) -> dict:
    return dict(os.environ, PYTHONPATH=path + os.pathsep + os.environ.get("PYTHONPATH", ""))


@functools.lru_cache(maxsize=None)
def _same_sampling(path: str) -> tuple:
    """The options that give every revision's bench the same number of timed calls: a bench that
    repeats by time (``--min-time``) is held to ``--repeat`` calls, as an older one takes."""
    text = subprocess.run([sys.executable, "-m", "fastcon.bench", "--help"], cwd=path, env=_env(path),
                          capture_output=True, text=True).stdout
    return ("--min-time", "0") if "--min-time" in text else ()


def _run(path: str, loss: str, n: int, d: int, repeat: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    subprocess.check_call([sys.executable, "-m", "fastcon.bench", "--loss", loss, "--providers", "fastcon",
                           "--batch", str(n), "--dim", str(d), "--device", "cpu", "--repeat", str(repeat),
                           *_same_sampling(path), "--json", out], cwd=path, env=_env(path),
                          stdout=subprocess.DEVNULL)
    with open(out) as f:
        (row,) = json.load(f)
    os.unlink(out)
    if row["status"] != "ok":
        raise SystemExit(f"{loss} N={n} at {path}: {row}")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", action="append", required=True, help="a git revision (give two or more)")
    p.add_argument("--loss", default="clip,siglip")
    p.add_argument("--batch", default="4096,16384")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="runs per case and revision, alternating the order")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="median: the median of the rounds' median calls; min: the fastest call of any round")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    base = tempfile.mkdtemp(prefix="fastcon-revs-")
    paths = {}
    try:
        for rev in args.rev:
            paths[rev] = _checkout(rev, base)
        rows = []
        for loss in args.loss.split(","):
            for n in (int(x) for x in args.batch.split(",")):
                runs = {rev: [] for rev in args.rev}
                for k in range(args.rounds):
                    for rev in (args.rev if k % 2 == 0 else args.rev[::-1]):
                        row = _run(paths[rev], loss, n, args.dim, args.repeat)
                        row["revision"], row["round"] = _sha(rev), k
                        rows.append(row)
                        runs[rev].append(row)
                if args.stat == "min":
                    times = {rev: min(r["min_ms"] for r in rs) for rev, rs in runs.items()}
                else:
                    times = {rev: statistics.median(r["median_ms"] for r in rs) for rev, rs in runs.items()}
                first = times[args.rev[0]]
                cells = "  ".join(f"{_sha(r)} {t:9.1f} ms ({t / first:.3f}x)" for r, t in times.items())
                print(f"{loss:7s} N={n:6d} D={args.dim}: {cells}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    finally:
        for path in paths.values():
            subprocess.call(["git", "worktree", "remove", "--force", path], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
