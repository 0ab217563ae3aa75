"""Every launch configuration the Triton backend ships, in one table.

Nothing here imports triton: the table is plain data, read by the kernel modules and ``plan.py`` at
launch time and enumerated by the compile gate (``tests/test_triton_compile.py``), which compiles
each entry for sm_80 and sm_90 and checks registers, spills, shared memory and tensor-core use.

Chunked path (``chunked.py``): the epilogue kernels read the fp32 dot-product chunk written by
``torch.mm``; they are memory-bound, so one configuration serves every input dtype (only the dtype of
the gradient tile ``G`` they write changes with it).

Fused path (``fused.py``): tile kernels that form ``S`` with ``tl.dot``. Entries are keyed by kernel,
dtype class (``"half"``: bfloat16 and float16, ``"float32"``: float32 run as TF32x3 on tensor cores)
and ``BLOCK_D``, the feature dimension padded to a power of two (one of ``FUSED_BLOCK_D``).
``block_m`` is always the tile over rows of A and ``block_n`` the tile over rows of B:

* ``lse``:  one program per (row group, column split); A tile resident, loops over B tiles.
* ``rows``: gradient of A (and the scalar partials / sigmoid loss); A tile and a
  ``block_m × BLOCK_D`` fp32 accumulator resident, loops over B tiles.
* ``cols``: gradient of B; B tile and a ``block_n × BLOCK_D`` accumulator resident, loops over A tiles.
* ``target``: the general target's three kernels (pass 1's statistics, pass 2's rows and columns),
  one configuration for all of them; ``block_d`` is the width of pass 2's accumulators.
"""
from __future__ import annotations

from typing import NamedTuple


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # fused kernels only: 0 keeps the A (or B) tile resident for the whole loop (one tl.dot over
    # BLOCK_D); otherwise S is formed over D in block_k slices re-read from L1/L2, which bounds the
    # registers of the TF32x3 fp32 path. The matmul producer: the K slice of its tl.dot loop.
    block_k: int = 0
    # the general target's fused kernels: the width of pass 2's gradient accumulators (D in slices of
    # it, each slice forming the tiles again); 0: the whole BLOCK_D.
    block_d: int = 0
    # persistent kernels (the matmul producer): programs per SM the configuration is designed for.
    # The grid is that many programs per SM, and the compile gate checks that registers and shared
    # memory allow it (registers·threads·occupancy <= 64 Ki, shared memory·occupancy <= the SM's).
    occupancy: int = 0


# ---------------------------------------------------------------------------------------- chunked
CHUNKED_CONFIGS: dict[str, Config] = {
    # S = s·dot + b, row LSE partials and per-row-block column LSE partials of one chunk.
    "stats": Config(block_m=32, block_n=128, num_warps=8, num_stages=1),
    # G in place (fp32) or into a bf16/fp16 buffer, plus Σ G·dot and Σ G partials.
    "softmax_grad": Config(block_m=32, block_n=64, num_warps=4, num_stages=1),
    # Σ softplus(−z·S) and (optionally) G = w·(σ(S) − [positive]).
    "sigmoid": Config(block_m=32, block_n=128, num_warps=8, num_stages=1),
    # The general target's epilogues (target.py): the pair decisions keep several int64 and boolean
    # tiles live beside the logits, hence smaller tiles than the CLIP epilogues' (no register spills on
    # sm_80 / sm_90 in any shipped variant: tests/test_triton_compile.py). Both passes on 16 × 64 tiles
    # over 4 warps: on 32 × 32 over 8 warps ptxas held some soft-target variants of pass 1 to 128
    # registers (two blocks an SM) with a few words on the stack.
    "target_stats": Config(block_m=16, block_n=64, num_warps=4, num_stages=1),
    "target_grad": Config(block_m=16, block_n=64, num_warps=4, num_stages=1),
    # Deterministic merge of LSE partials along their leading axis (block_m unused).
    "merge": Config(block_m=1, block_n=256, num_warps=4, num_stages=1),
}

# The matmul producer (``tiles.dot_tile`` with MATMUL): the epilogue kernels above form their own
# tiles of dot products with tl.dot over D (any D), so that no logit goes to memory. One
# configuration per dtype class serves every kernel of a loss: the two passes of a softmax loss must
# accumulate each logit in the same order (same block_k and instruction shape) for P − 1 of a
# confident positive to come out exact. ``occupancy`` is the number of programs per SM (persistent
# grid) that the configuration was designed for; the compile gate holds it to that.
MATMUL_CONFIGS: dict[tuple[str, str], Config] = {
    # (loss family, dtype class). "softmax": the statistics and gradient kernels of CLIP-style losses
    # (one configuration for both passes); "sigmoid": SigLIP's one pass.
    # bf16/fp16 softmax: a 128×64 fp32 accumulator over 8 warps (32 registers a thread), the K loop
    # in 64-wide slices pipelined over three stages of 128×64 + 64×64 half tiles (72 KiB of shared
    # memory on sm_90); the epilogue's tiles take the registers to about 240, so one program per SM.
    # 128×128 tiles (half the L2 traffic per FLOP) spill in every softmax kernel.
    ("softmax", "half"): Config(block_m=128, block_n=64, num_warps=8, num_stages=3, block_k=64, occupancy=1),
    # bf16/fp16 sigmoid: 64×64 over 4 warps (about 240 registers a thread in the gradient kernel, 128
    # threads), two programs per SM; 128×64 spills its gradient kernel on sm_90.
    ("sigmoid", "half"): Config(block_m=64, block_n=64, num_warps=4, num_stages=3, block_k=64, occupancy=2),
    # fp32 (the interpreter's tests; on a GPU fp32 inputs keep the cuBLAS producer unless
    # FASTCON_TRITON_PRODUCER=matmul, with TF32x3 dots): small tiles
    ("softmax", "float32"): Config(block_m=32, block_n=32, num_warps=4, num_stages=2, block_k=32, occupancy=2),
    ("sigmoid", "float32"): Config(block_m=32, block_n=32, num_warps=4, num_stages=2, block_k=32, occupancy=2),
}
MATMUL_CONFIGS.update({
    # The general target with hard targets (target.py; soft targets are the "target_soft" family): its pair
    # decisions keep int64 and boolean tiles beside the logits; 64×64 over 8 warps (up to about 220
    # registers a thread in the heaviest variant: all pair rules, symmetric, smoothing), one program
    # per SM. 64×32 spills there at 4 or 8 warps.
    ("target", "half"): Config(block_m=64, block_n=64, num_warps=8, num_stages=3, block_k=64, occupancy=1),
    ("target", "float32"): Config(block_m=32, block_n=32, num_warps=4, num_stages=2, block_k=32, occupancy=1),
    # Soft targets (distillation): the student's tile formed with tl.dot, the teacher's read from its
    # fp32 chunk beside it, the soft epilogue's teacher probabilities and cross terms on top of the pair
    # decisions. 64×64 spills in the soft variants; 64×32 over 8 warps with k32 is clean in every
    # variant on sm_80 and sm_90 (k64 spills in the heaviest), with wgmma on sm_90 (32-row tiles take
    # mma), up to 255 registers a thread. fp32 (TF32x3): 32×16 over 8 warps is clean in every soft
    # variant of a sweep (up to 226 registers; the gate compiles the heaviest); at 4 warps a linear
    # teacher's gradient kernel spills 8 B on sm_80, 16×32 the same, 32×32 up to 296 B.
    ("target_soft", "half"): Config(block_m=64, block_n=32, num_warps=8, num_stages=3, block_k=32, occupancy=1),
    ("target_soft", "float32"): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32, occupancy=1),
})
MATMUL_FAMILY = {"stats": "softmax", "softmax_grad": "softmax", "sigmoid": "sigmoid", "target_stats": "target",
                 "target_grad": "target"}


# Autotuning (opt-in, ``FASTCON_TRITON_AUTOTUNE=1``: ``plan.autotune``): the configurations a family
# may take instead of its fixed one, each compile-gated like it (tests/test_triton_compile.py). Every
# candidate's block_m divides 128 and its block_n divides 64, the alignment of the chunks that
# ``plan.matmul_plan`` forms from the fixed "softmax" configuration.
MATMUL_CANDIDATES: dict[tuple[str, str], list] = {
    ("softmax", "half"): [MATMUL_CONFIGS[("softmax", "half")],
                          Config(block_m=128, block_n=64, num_warps=8, num_stages=4, block_k=64, occupancy=1),
                          Config(block_m=64, block_n=64, num_warps=4, num_stages=3, block_k=64, occupancy=2),
                          Config(block_m=64, block_n=64, num_warps=4, num_stages=4, block_k=64, occupancy=2)],
    ("sigmoid", "half"): [MATMUL_CONFIGS[("sigmoid", "half")],
                          Config(block_m=64, block_n=64, num_warps=4, num_stages=2, block_k=64, occupancy=2),
                          Config(block_m=128, block_n=64, num_warps=8, num_stages=2, block_k=64, occupancy=1)],
}


def matmul_candidates(family: str, cls: str) -> list:
    """The configurations autotuning may choose from for a family and dtype class ("half" or
    "float32"): its candidates, or its fixed configuration alone."""
    return MATMUL_CANDIDATES.get((family, cls), [MATMUL_CONFIGS[(family, cls)]])


def matmul_config(kernel: str, dtype_name: str, soft: bool = False) -> Config:
    """The matmul producer's configuration of an epilogue kernel (``stats``, ``softmax_grad``,
    ``sigmoid``, ``target_stats``, ``target_grad``): the one of its loss family (with ``soft``, the
    general target's soft-target family)."""
    family = MATMUL_FAMILY[kernel]
    if soft:
        if family != "target":
            raise ValueError(f"soft targets are a variant of the general target's kernels, not of {kernel!r}")
        family = "target_soft"
    return MATMUL_CONFIGS[(family, dtype_class(dtype_name))]


# Input dtypes each path accepts (names as in torch).
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# ------------------------------------------------------------------------------------------ fused
FUSED_MAX_D = 256
FUSED_BLOCK_D = (64, 128, 256)

FUSED_CONFIGS: dict[tuple[str, str, int], Config] = {
    # --- bfloat16 / float16 inputs, fp32 accumulation (resident A/B tile, one tl.dot over BLOCK_D)
    ("lse", "half", 64): Config(block_m=128, block_n=32, num_warps=8, num_stages=3),
    ("lse", "half", 128): Config(block_m=128, block_n=32, num_warps=8, num_stages=3),
    ("lse", "half", 256): Config(block_m=64, block_n=32, num_warps=4, num_stages=3),
    ("rows", "half", 64): Config(block_m=128, block_n=64, num_warps=8, num_stages=3),
    ("rows", "half", 128): Config(block_m=64, block_n=32, num_warps=4, num_stages=3),
    ("rows", "half", 256): Config(block_m=64, block_n=32, num_warps=8, num_stages=2),
    ("cols", "half", 64): Config(block_m=64, block_n=128, num_warps=8, num_stages=3),
    ("cols", "half", 128): Config(block_m=128, block_n=64, num_warps=8, num_stages=2),
    ("cols", "half", 256): Config(block_m=32, block_n=64, num_warps=8, num_stages=2),
    # --- float32 inputs (TF32x3 dots: three tensor-core products, close to fp32 accuracy; the
    #     hi/lo operand split triples register use, hence small tiles and block_k slices)
    # The lse and rows/cols kernels of one D use the same block_k, so that a logit is accumulated in
    # the same order in both passes: P − 1 of a confident positive at s = 100 needs the identical S.
    ("lse", "float32", 64): Config(block_m=32, block_n=32, num_warps=4, num_stages=2, block_k=32),
    ("lse", "float32", 128): Config(block_m=32, block_n=64, num_warps=4, num_stages=2, block_k=32),
    ("lse", "float32", 256): Config(block_m=32, block_n=64, num_warps=4, num_stages=2, block_k=32),
    ("rows", "float32", 64): Config(block_m=32, block_n=32, num_warps=4, num_stages=2, block_k=32),
    ("rows", "float32", 128): Config(block_m=32, block_n=32, num_warps=8, num_stages=2, block_k=32),
    ("rows", "float32", 256): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32),
    ("cols", "float32", 64): Config(block_m=32, block_n=32, num_warps=4, num_stages=2, block_k=32),
    ("cols", "float32", 128): Config(block_m=32, block_n=32, num_warps=8, num_stages=2, block_k=32),
    ("cols", "float32", 256): Config(block_m=32, block_n=32, num_warps=8, num_stages=2, block_k=32),
    # --- the general target (fused_target.py: pass 1 on target.target_stats_kernel with the matmul producer,
    #     pass 2 on the target rows/cols kernels): one configuration per dtype class serves all of
    #     them, so that each logit is accumulated in the same order in both passes. Tiles are formed
    #     over D in block_k slices (never a resident operand); pass 2's gradient accumulators are
    #     block_d wide, D taken in slices of it (each slice forms its tiles again: at D = 256, two
    #     slices). Chosen on the compile gate (every shipped variant, sm_80 and sm_90): 64×32 over 8
    #     warps, k32, 128-wide slices is clean in every variant, with wgmma on sm_90 (up to 255
    #     registers in the soft ones); 256-wide spills 32-72 B in the soft rows and columns kernels
    #     on sm_80; 64×64 and 32×64 spill with 128-wide accumulators, 32-row tiles take mma, not
    #     wgmma, on sm_90, and k64 spills 80 B in the heaviest rows kernel on sm_80. fp32 (TF32x3,
    #     three products per dot): 32×16 over 8 warps with 128-wide slices is clean in every variant
    #     (up to 235 registers); at 4 warps the same spills 8 B (a row LSE's masses on sm_90), 32×32
    #     up to 900 B, 16×16 and 16×32 8 B in some variant.
    ("target", "half", 64): Config(block_m=64, block_n=32, num_warps=8, num_stages=3, block_k=32, block_d=64),
    ("target", "half", 128): Config(block_m=64, block_n=32, num_warps=8, num_stages=3, block_k=32, block_d=128),
    ("target", "half", 256): Config(block_m=64, block_n=32, num_warps=8, num_stages=3, block_k=32, block_d=128),
    ("target", "float32", 64): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32, block_d=64),
    ("target", "float32", 128): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32, block_d=128),
    ("target", "float32", 256): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32, block_d=128),
}

# ---------------------------------------------------------------------------- per Triton release
def triton_release() -> tuple[int, int]:
    """(major, minor) of the installed Triton, read from its package metadata (triton is not
    imported); (0, 0) where it is not installed."""
    try:
        from importlib.metadata import version

        major, minor = version("triton").split(".")[:2]
        return int(major), int(minor)
    except Exception:  # not installed, or a version string of another form
        return (0, 0)


# The tables above compile without spills under the newest Triton (3.9). A release whose compiler
# allocates registers differently gets what it needs here, and the compile gate, which runs under the
# installed Triton, checks that release's tables (tests/test_triton_compile.py; `make test-compat`
# runs it under each tested release).
#
# Triton 3.6 (torch 2.11's) bundles ptxas 12.8, which without a register limit held 16 kernel
# variants to 128 or 168 registers and spilled 8 to 80 B: every kernel is compiled there with
# ``.maxnreg 255`` (``options``: passed at every launch by ``fastcon.kernels.triton.launch`` and by the
# gate). Eleven variants still spilled on sm_80 at 255 registers; their families take smaller tiles or
# more warps on 3.6 (each entry clean on sm_80 and sm_90, with wgmma on sm_90 where 3.9 has it):
# SigLIP's bf16/fp16 matmul producer 64×64 over 8 warps (one program per SM, not two), the general
# target's 64×32 tiles with hard targets and 64×16 with soft ones, and its fused tile kernels 64×16.
# SigLIP's bf16/fp16 matmul producer where 64×64 over 4 warps spills: the same tiles over 8 warps.
_SIGMOID_HALF_W8 = Config(block_m=64, block_n=64, num_warps=8, num_stages=3, block_k=64, occupancy=1)
RELEASE_TABLES: dict[tuple[int, int], dict] = {
    # Triton 3.3 (torch 2.7's, the oldest pair tested): 20 variants spilled on sm_90, and a register
    # limit of 255 made two more spill (no ``options`` here). Autotuning keeps CLIP's fixed bf16/fp16
    # configuration alone (its three candidates spilled), the fused fp32 rows and columns kernels
    # take 32×16 tiles over 8 warps (as on 3.8), late interaction's bf16/fp16 gradient products 8
    # warps, and its fp32 statistics over 16- and 32-token sides 8 warps.
    (3, 3): dict(
        candidates={("softmax", "half"): [MATMUL_CONFIGS[("softmax", "half")]]},
        fused={(kernel, "float32", bd): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32)
               for kernel in ("rows", "cols") for bd in FUSED_BLOCK_D},
        late={
            **{(kernel, "half", 0): Config(block_m=64, block_n=64, num_warps=8, num_stages=2, block_k=64)
               for kernel in ("dx", "dy")},
            **{("tiles", "float32", by): Config(block_m=32, block_n=by, num_warps=8, num_stages=1, block_k=32)
               for by in (16, 32)},
        },
    ),
    (3, 6): dict(
        options=dict(maxnreg=255),
        matmul={
            ("sigmoid", "half"): _SIGMOID_HALF_W8,
            ("target", "half"): Config(block_m=64, block_n=32, num_warps=8, num_stages=3, block_k=64, occupancy=1),
            ("target_soft", "half"): Config(block_m=64, block_n=16, num_warps=8, num_stages=3, block_k=32,
                                            occupancy=1),
        },
        candidates={
            ("sigmoid", "half"): [_SIGMOID_HALF_W8,
                                  Config(block_m=128, block_n=64, num_warps=8, num_stages=2, block_k=64, occupancy=1)],
        },
        fused={("target", "half", bd): Config(block_m=64, block_n=16, num_warps=8, num_stages=3, block_k=32,
                                              block_d=min(bd, 128)) for bd in FUSED_BLOCK_D},
    ),
    # Triton 3.8 (torch 2.14's): the same register limit cleared 7 of the 19 variants that spilled on
    # sm_90; the rest take: SigLIP's fp16 matmul producer 64×64 over 8 warps (its autotuning
    # candidates spilled too), the general target's fp32 tiles 32×16 over 8 warps, the fused fp32
    # rows and columns kernels 32×16 over 8 warps, the fused bf16/fp16 rows kernel at D <= 64 128×32,
    # and late interaction's fp32 statistics over a 256-token side 16 rows a tile.
    (3, 8): dict(
        options=dict(maxnreg=255),
        matmul={
            ("sigmoid", "half"): _SIGMOID_HALF_W8,
            ("target", "float32"): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32,
                                          occupancy=1),
        },
        candidates={
            ("sigmoid", "half"): [_SIGMOID_HALF_W8],
        },
        fused={
            ("rows", "half", 64): Config(block_m=128, block_n=32, num_warps=8, num_stages=3),
            **{(kernel, "float32", bd): Config(block_m=32, block_n=16, num_warps=8, num_stages=2, block_k=32)
               for kernel in ("rows", "cols") for bd in FUSED_BLOCK_D},
        },
        late={("tiles", "float32", 256): Config(block_m=16, block_n=256, num_warps=8, num_stages=1, block_k=32)},
    ),
}
RELEASE = triton_release()  # the installed Triton's (major, minor), read once
_RELEASE = RELEASE_TABLES.get(RELEASE, {})
MATMUL_CONFIGS.update(_RELEASE.get("matmul", {}))
MATMUL_CANDIDATES.update(_RELEASE.get("candidates", {}))
FUSED_CONFIGS.update(_RELEASE.get("fused", {}))
# Late interaction's configurations are computed (``late.late_config``); a release's entries, keyed
# (kernel, dtype class, the on-chip token side), replace what it computes.
LATE_CONFIGS: dict = dict(_RELEASE.get("late", {}))
# Compile options of every kernel launch beyond its configuration (``launch`` adds them).
COMPILE_OPTIONS: dict = dict(_RELEASE.get("options", {}))


# ------------------------------------------------------------------------------------------- gemm
class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# ``grad_b += α·Gᵀ·A_c`` in place (gemm.py), bf16/fp16 operands, fp32 accumulator: 128×128 output
# tiles (64 fp32 accumulators per thread at 8 warps), three stages of 128×64 + 64×128 half tiles
# (96 KiB of shared memory, within sm_80's 163 KiB).
GEMM_CONFIGS: dict[str, GemmConfig] = {
    "half": GemmConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3),
    # fp32 operands (used only by the interpreter tests and explicit calls): smaller K slices
    "float32": GemmConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=2),
}


def gemm_config(dtype_name: str) -> GemmConfig:
    return GEMM_CONFIGS[dtype_class(dtype_name)]


# Dot-product precision of fp32 inputs in the fused kernels ("ieee" would avoid tensor cores).
FUSED_FP32_PRECISION = "tf32x3"


def dtype_class(dtype_name: str) -> str:
    if dtype_name in ("bfloat16", "float16"):
        return "half"
    if dtype_name == "float32":
        return "float32"
    raise TypeError(
        f"the fastcon Triton backend supports float32, bfloat16 and float16 inputs, got {dtype_name}; "
        "use fastcon.kernels.torch_chunked for float64"
    )


def fused_block_d(d: int) -> int:
    if d > FUSED_MAX_D:
        raise ValueError(f"the fused Triton path supports D <= {FUSED_MAX_D}, got D={d}; use the chunked path")
    for bd in FUSED_BLOCK_D:
        if d <= bd:
            return bd
    raise AssertionError("unreachable")


def fused_config(kernel: str, dtype_name: str, d: int) -> tuple[Config, int]:
    bd = fused_block_d(d)
    return FUSED_CONFIGS[(kernel, dtype_class(dtype_name), bd)], bd


def chunked_config(kernel: str) -> Config:
    return CHUNKED_CONFIGS[kernel]
