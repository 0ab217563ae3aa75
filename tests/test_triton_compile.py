"""GPU compile gate for the Triton backend (no GPU needed).

Every shipped launch configuration (``fastcon/kernels/triton/configs.py``, enumerated through
``chunked.compile_specs()``, ``fused.compile_specs()``, ``fused_target.compile_specs()``,
``gemm.compile_specs()``, ``target.compile_specs()`` and ``late.compile_specs()``) is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` for sm_80 and sm_90 and each
supported dtype, then its cubin is read with Triton's bundled ``cuobjdump`` (its facts kept by the cubin's
hash: ``_cubin_facts``).
The tables are the installed Triton release's (``configs.RELEASE_TABLES``), compiled with its options
(``configs.COMPILE_OPTIONS``, as every launch is). Checked:

* no local memory / stack (register spills),
* shared memory within the chip's per-block limit (sm_80: 163 KiB, sm_90: 227 KiB),
* tensor-core instructions in the SASS of every kernel that uses ``tl.dot``
  (HMMA on sm_80; HGMMA or HMMA on sm_90), and HGMMA (wgmma) on sm_90 for the bf16/fp16 matmul
  producer of the epilogue kernels (``tiles.dot_tile``);
* for the matmul producer: its K loop pipelined (cp.async in the PTX; compiled with D divisible by
  16, as the runtime specialises D = 512, 768, ...), and registers and shared memory within the
  programs per SM that its configuration states (``Config.occupancy``: registers·threads·occupancy
  <= 64 Ki, (shared memory + 1 KiB)·occupancy <= the SM's 164 KiB on sm_80, 228 KiB on sm_90).

conftest.py sets TRITON_INTERPRET=1, under which ``@triton.jit`` gives interpreter objects, so the
compilation runs in two worker subprocesses with TRITON_INTERPRET removed from their environment.
Pointer and leading-stride arguments are marked 16-divisible, as the runtime specializes them for
aligned contiguous tensors, and so are the sizes a spec names ``divisible`` (D of the matmul
producer; the general target's R and W, which stand as its chunks' row strides); unit inner strides
are constants, as the runtime specializes 1-valued ints.

``python tests/test_triton_compile.py`` prints the table of configurations with registers, shared
memory and spills.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FASTCON_GATE_CAPS=90 compiles for one chip (make test-gate-gpu-image: the GPU machine's sm_90)
CAPS = tuple(int(c) for c in os.environ.get("FASTCON_GATE_CAPS", "80,90").split(","))
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SMEM_RESERVED = 1024  # per resident block, by the driver
REGS_PER_SM = 65536
WORKERS = 2


# ------------------------------------------------------------------------------------ worker side
def _load_specs():
    from fastcon.kernels.triton import chunked, fused, fused_target, gemm, late, target

    return (chunked.compile_specs() + fused.compile_specs() + fused_target.compile_specs() + gemm.compile_specs()
            + target.compile_specs() + late.compile_specs())


def _spec_id(spec) -> str:
    cfg = spec["config"]
    bd = f",D{spec['block_d']}" if "block_d" in spec else ""
    return (f"{spec['name']}-{spec['dtype']}{bd}-m{cfg.block_m}n{cfg.block_n}"
            f"w{cfg.num_warps}s{cfg.num_stages}" + (f"k{cfg.block_k}" if getattr(cfg, "block_k", 0) else ""))


def _res_usage(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("REG:"):
            for item in line.split():
                key, _, val = item.partition(":")
                if val.isdigit():
                    out[key] = int(val)
    return out


def _cubin_facts(cubin: bytes, triton) -> tuple:
    """(resource usage, HMMA count, HGMMA count) of a cubin, read with Triton's bundled ``cuobjdump``.
    Disassembling takes nearly all of the gate's time (Triton caches the compiles themselves), so the
    facts are kept by the cubin's SHA-256 in FASTCON_GATE_CACHE (default ~/.cache/fastcon/gate): the
    same bytes disassemble the same way."""
    cache = os.environ.get("FASTCON_GATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastcon", "gate")
    key = os.path.join(cache, hashlib.sha256(cubin + triton.__version__.encode()).hexdigest() + ".json")
    try:
        with open(key) as f:
            usage, hmma, hgmma = json.load(f)
        return usage, hmma, hgmma
    except (OSError, ValueError):
        pass
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", path],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(bindir, "cuobjdump"), "-sass", path],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    facts = (_res_usage(res), sass.count("HMMA"), sass.count("HGMMA"))
    os.makedirs(cache, exist_ok=True)
    tmp = f"{key}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(facts, f)
    os.replace(tmp, key)  # whole or absent, with two workers writing
    return facts


def _compile_one(spec, cap: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    sig = spec["signature"]
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        kind = sig.get(name)
        if kind is None or kind == "constexpr":
            continue
        if (kind.startswith("*") or (name.startswith("stride_") and kind.startswith("i"))
                or name in spec.get("divisible", ())):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, spec["constexprs"], attrs)
    from fastcon.kernels.triton.configs import COMPILE_OPTIONS

    options = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"], **COMPILE_OPTIONS)
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    usage, hmma, hgmma = _cubin_facts(kernel.asm["cubin"], triton)
    return {
        "id": _spec_id(spec), "cap": cap, "uses_dot": spec["uses_dot"],
        "regs": usage.get("REG"), "local": usage.get("LOCAL"), "stack": usage.get("STACK"),
        "static_shared": usage.get("SHARED", 0), "dyn_shared": int(kernel.metadata.shared),
        "hmma": hmma, "hgmma": hgmma,
        "ptx_wgmma": "wgmma" in kernel.asm["ptx"],
        "cp_async": kernel.asm["ptx"].count("cp.async"),
        "threads": 32 * spec["num_warps"], "occupancy": getattr(spec["config"], "occupancy", 0),
        "pipelined": bool(spec.get("pipelined")), "wgmma_required": bool(spec.get("wgmma_required")),
    }


def _worker(jobs):
    specs = _load_specs()
    out = []
    for idx, cap in jobs:
        try:
            out.append(_compile_one(specs[idx], cap))
        except Exception as exc:  # reported, the test fails on it
            out.append({"id": _spec_id(specs[idx]), "cap": cap, "error": f"{type(exc).__name__}: {exc}"[:4000]})
    json.dump(out, sys.stdout)


# ------------------------------------------------------------------------------------ parent side
def _spec_ids():
    return [_spec_id(s) for s in _load_specs()]


def compile_all() -> dict:
    n = len(_load_specs())
    jobs = [(i, cap) for i in range(n) for cap in CAPS]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for w in range(WORKERS):
        mine = jobs[w::WORKERS]
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(mine)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    results = {}
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"compile worker failed ({p.returncode}):\n{stderr[-4000:]}")
        for r in json.loads(stdout):
            results[(r["id"], r["cap"])] = r
    return results


@pytest.fixture(scope="session")
def compiled():
    pytest.importorskip("triton")
    return compile_all()


try:
    _IDS = _spec_ids()
except Exception:  # triton missing: the fixture skips
    _IDS = []


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("spec_id", _IDS)
def test_compiles_for_gpu(compiled, spec_id, cap):
    r = compiled[(spec_id, cap)]
    assert "error" not in r, r.get("error")
    assert r["local"] == 0 and r["stack"] == 0, f"register spills (local memory): {r}"
    shared = r["dyn_shared"] + r["static_shared"]
    assert shared <= SMEM_LIMIT[cap], f"shared memory {shared} B > {SMEM_LIMIT[cap]} B on sm_{cap}"
    assert r["regs"] is not None and r["regs"] <= 255
    if r["uses_dot"]:
        if cap == 80:
            assert r["hmma"] > 0, f"no HMMA in the sm_80 SASS of {spec_id}"
        else:
            assert r["hgmma"] > 0 or r["hmma"] > 0, f"no HGMMA/HMMA in the sm_90 SASS of {spec_id}"
    if r["wgmma_required"] and cap == 90:
        assert r["hgmma"] > 0, f"no HGMMA (wgmma) in the sm_90 SASS of {spec_id}: {r}"
    if r["pipelined"]:
        assert r["cp_async"] > 0, f"the K loop of {spec_id} is not pipelined on sm_{cap} (no cp.async): {r}"
    if r["occupancy"]:
        # the persistent grid runs `occupancy` programs per SM: registers and shared memory must allow it
        regs = r["regs"] * r["threads"] * r["occupancy"]
        assert regs <= REGS_PER_SM, (f"{spec_id}: {r['regs']} registers x {r['threads']} threads x "
                                     f"{r['occupancy']} programs > {REGS_PER_SM} on sm_{cap}")
        smem = (shared + SMEM_RESERVED) * r["occupancy"]
        assert smem <= SMEM_PER_SM[cap], (f"{spec_id}: {shared} B of shared memory x {r['occupancy']} programs "
                                          f"> {SMEM_PER_SM[cap]} B on sm_{cap}")


def test_configs_table_is_enumerated():
    from fastcon.kernels.triton import configs

    ids = " ".join(_IDS)
    for (kernel, _cls, bd) in configs.FUSED_CONFIGS:
        assert f"fused_{kernel}" in ids and f"D{bd}" in ids
    for kernel in configs.CHUNKED_CONFIGS:
        assert kernel.split("_")[0] in ids
    for (family, _cls), cfg in configs.MATMUL_CONFIGS.items():
        kernels = [k for k, f in configs.MATMUL_FAMILY.items() if f == family.removesuffix("_soft")]
        tag = f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}k{cfg.block_k}"
        assert any(f"[mm" in i and tag in i and any(k.split("_")[0] in i for k in kernels) for i in _IDS), (family, tag)


def _print_table():
    results = compile_all()
    print(f"{'kernel / dtype / config':64s} {'sm':>3s} {'regs':>4s} {'smem B':>7s} {'spill':>5s} {'mma':>10s}")
    for (sid, cap), r in results.items():
        if "error" in r:
            print(f"{sid:64s} {cap:3d} ERROR {r['error'][:200]}")
            continue
        mma = f"HGMMA{r['hgmma']}" if r["hgmma"] else (f"HMMA{r['hmma']}" if r["hmma"] else "-")
        print(f"{sid:64s} {cap:3d} {r['regs']:4d} {r['dyn_shared'] + r['static_shared']:7d} "
              f"{r['local'] + r['stack']:5d} {mma:>10s}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.path.insert(0, ROOT)
        _worker([tuple(j) for j in json.loads(sys.argv[2])])
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        sys.path.insert(0, ROOT)
        _print_table()
