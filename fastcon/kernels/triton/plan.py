"""Host side shared by the Triton kernel modules: input checks, the producer of the epilogues' tiles,
launch grids and work items, the chunk and block plans within a budget of bytes, autotuning of the
matmul producer's configuration, and the LSE merge launch.

* Producer (``producer``): the epilogue kernels form their tiles of dot products with ``tl.dot``
  (the matmul producer: bf16/fp16 on a GPU, no logit in memory), or ``torch.mm`` writes each row
  chunk of fp32 dot products that the kernels read (the cuBLAS producer); ``tile_producer`` gives a
  launch's constexprs and configuration; ``TargetTiles`` the general target's, the teacher's tiles
  of a soft target always from its cuBLAS chunks.
* Plans: the cuBLAS producer's row chunks (``memory_rows``); the matmul producer's pass 1 in row
  chunks whose column partials fit the budget and pass 2 in row × column blocks whose G fits it
  (``matmul_plan``); the work items (row block × column split) of a launch, persistent on the matmul
  producer (``work_items``).
* Autotuning (``FASTCON_TRITON_AUTOTUNE=1``, ``autotune``): the first call of a key times the
  family's candidate configurations and keeps the fastest for both passes.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import NamedTuple

import torch
import triton

from .._common import mm_acc, producer_setting
from . import launch
from .configs import (FUSED_FP32_PRECISION, MATMUL_FAMILY, SUPPORTED_DTYPES, chunked_config, dtype_class, fused_config,
                      matmul_candidates, matmul_config)
from .tiles import merge_lse_kernel


# ---------------------------------------------------------------------------------------- inputs
def dtype_name(a: torch.Tensor) -> str:
    return str(a.dtype).replace("torch.", "")


def check_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    """TypeError for a dtype the kernels do not take, ValueError for operands that do not match."""
    name = dtype_name(a)
    if name not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the fastcon Triton backend supports float32, bfloat16 and float16 inputs, got {name}; "
            "use fastcon.kernels.torch_chunked for float64"
        )
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError("a and b must have the same dtype and device")


def check_fused_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    """``check_inputs`` and the fused tile kernels' limit, D <= 256 (ValueError beyond)."""
    check_inputs(a, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same D, got {a.shape[1]} and {b.shape[1]}")
    fused_config("lse", dtype_name(a), a.shape[1])


def dot_precision(a: torch.Tensor) -> str:
    """``tl.dot``'s input precision for operands like ``a``: TF32x3 for fp32 (``FUSED_FP32_PRECISION``),
    the operands' own for bf16/fp16."""
    return FUSED_FP32_PRECISION if a.dtype == torch.float32 else "ieee"


# -------------------------------------------------------------------------------------- producer
def producer(a: torch.Tensor, soft: bool = False) -> str:
    """Where this call's tiles of dot products come from (``FASTCON_TRITON_PRODUCER``): ``"matmul"``,
    the epilogue kernels form them with tl.dot (``tiles.dot_tile``: no logit in memory), or ``"cublas"``,
    ``torch.mm`` writes each chunk and the kernels read it. ``auto`` (the default): the matmul
    producer for bf16/fp16 on a GPU; cuBLAS for fp32 (its fp32 GEMM has no TF32 rounding), in the
    interpreter, and for soft targets (``soft``: distillation, whose teacher's chunk is in memory
    either way; ``matmul`` forms the student's tiles there too, until a GPU measurement says which
    wins: benchmarks/gpu_sweep.sh)."""
    return producer_for(a.dtype, a.is_cuda, soft)


def producer_for(dtype: torch.dtype, on_gpu: bool, soft: bool = False) -> str:
    """``producer`` of inputs of ``dtype`` on a GPU (``on_gpu``) or in the interpreter."""
    choice = producer_setting()
    if choice == "auto":
        return "matmul" if on_gpu and dtype in (torch.bfloat16, torch.float16) and not soft else "cublas"
    return choice


class TileProducer(NamedTuple):
    """How an epilogue launch gets its tiles: the keyword arguments of ``tiles.dot_tile``'s constexprs
    and the launch configuration."""
    matmul: bool
    cfg: object

    def consts(self, a: torch.Tensor) -> dict:
        prec = dot_precision(a) if self.matmul else "ieee"
        return dict(MATMUL=self.matmul, INPUT_PRECISION=prec, BLOCK_M=self.cfg.block_m, BLOCK_N=self.cfg.block_n,
                    BLOCK_K=self.cfg.block_k or 16, num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)


def tile_producer(a: torch.Tensor, kernel: str) -> TileProducer:
    """This call's producer for ``kernel``: the matmul producer at its (tuned) configuration, or the
    cuBLAS producer's chunk epilogue at its own."""
    if producer(a) == "matmul":
        return TileProducer(True, tuned_config(kernel, a))
    return TileProducer(False, chunked_config(kernel))


# Soft targets on the matmul producer: the student's tiles are formed in the kernels, the teacher's
# read from its fp32 cuBLAS chunks (``target._Teacher.chunk``), at the configuration of their own family
# (``configs.MATMUL_CONFIGS["target_soft", ...]``), with ``FASTCON_TRITON_PRODUCER=matmul`` (``auto``
# keeps the cuBLAS producer for them until measured: ``producer``). Forming the teacher's tile
# with tl.dot beside the student's spilled registers at every configuration tried (two pipelined K
# loops beside the soft epilogue: 8 B to 2 KiB of stack on sm_80 / sm_90), so the teacher keeps one
# producer everywhere, and its own pass (``target.teacher_stats``) runs on it: its normalisers come from the
# same GEMMs of its features (to the rounding of a cuBLAS chunk of another shape, where the passes'
# chunks differ).
class TargetTiles:
    """The producer of the general target's tiles for one call (``producer``): the cuBLAS chunks of
    dot products, or the matmul producer, which forms the student's tiles from the features in the
    kernels. The teacher's tiles (soft targets) are always read from its cuBLAS chunks
    (``target._Teacher.chunk``). ``cfg`` given (the fused tile kernels, ``fused_target.py``): the
    matmul producer at that configuration."""

    def __init__(self, a, target, kernel: str, cublas: bool = False, cfg=None):
        name = dtype_name(a)
        self.target = target
        if cfg is not None:
            self.matmul, self.cfg = True, cfg
        else:
            self.matmul = not cublas and producer(a, soft=bool(target.soft)) == "matmul"
            self.cfg = (matmul_config(kernel, name, soft=bool(target.soft)) if self.matmul
                        else chunked_config(kernel))
        self.prod = TileProducer(self.matmul, self.cfg)

    def operands(self, a, b, tch, r0, r1, c0, c1):
        """(dot, a_c, b_k, tdot) of rows [r0, r1) × columns [c0, c1): the student's chunk in memory
        (cuBLAS) with stand-ins for the features, or the features with a stand-in for the chunk; the
        teacher's chunk (or a dummy)."""
        tdot = tch.chunk(r0, r1, c0, c1)
        if not self.matmul:
            dot = mm_acc(a[r0:r1], b[c0:c1].T)
            return dot, dot, dot, tdot
        a_c = a[r0:r1]
        return a_c, a_c, b[c0:c1], tdot

    def consts(self, a):
        return self.prod.consts(a)


# ---------------------------------------------------------------------------------- grids, items
# Programs per launch that the column split aims at (about 4 waves on an H100's 132 SMs); the
# interpreter runs programs one after another, so it aims low.
PROGRAMS_PER_LAUNCH_CUDA = 528
PROGRAMS_PER_LAUNCH_CPU = 2


def programs_per_launch(device: torch.device) -> int:
    """The programs a launch's column split aims at on ``device``."""
    return PROGRAMS_PER_LAUNCH_CUDA if device.type == "cuda" else PROGRAMS_PER_LAUNCH_CPU


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 for the interpreter, which runs programs in turn)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _grid(rows: int, cols: int, block_m: int, block_n: int, device: torch.device, target: int = 0):
    """(row blocks, column splits, column tiles per split) aiming at about ``target`` work items
    (default programs_per_launch)."""
    m_blocks = triton.cdiv(rows, block_m)
    n_tiles = triton.cdiv(cols, block_n)
    splits = max(1, min(n_tiles, triton.cdiv(target or programs_per_launch(device), m_blocks)))
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    return m_blocks, splits, per_split


class WorkItems(NamedTuple):
    """The work items of one epilogue launch (row blocks × column splits) and its grid."""
    m_blocks: int
    splits: int
    per_split: int
    n_items: int
    grid: tuple


ITEMS_PER_PROGRAM = 8  # a persistent grid's work items per program: the last round idles at most 1/8


def work_items(rows: int, cols: int, cfg, device: torch.device) -> WorkItems:
    """Work items of an epilogue over rows × cols; a persistent configuration (``cfg.occupancy``)
    launches ``occupancy`` programs per SM that take the items in turn (about ITEMS_PER_PROGRAM each,
    where the shape allows), any other one program each."""
    programs = cfg.occupancy * sm_count(device) if cfg.occupancy else 0
    m_blocks, splits, per_split = _grid(rows, cols, cfg.block_m, cfg.block_n, device,
                                        max(programs_per_launch(device), ITEMS_PER_PROGRAM * programs))
    n_items = m_blocks * splits
    programs = n_items if not cfg.occupancy else min(n_items, programs)
    return WorkItems(m_blocks, splits, per_split, n_items, (max(1, programs),))


def split_tiles(n_tiles: int, parallel: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split) of n_tiles so that parallel × splits approaches
    ``programs_per_launch`` (the fused tile kernels' grids)."""
    splits = max(1, min(n_tiles, triton.cdiv(programs_per_launch(device), max(parallel, 1))))
    per = triton.cdiv(max(n_tiles, 1), splits)
    return triton.cdiv(max(n_tiles, 1), per), per


# ----------------------------------------------------------------------------------- chunk plans
def memory_rows(na: int, nb: int, chunk_rows: int, budget: int, elt_bytes: float = 4) -> int:
    """Rows per chunk of the cuBLAS producer: at most ``chunk_rows``, and an fp32 chunk of dot
    products over ``nb`` columns within ``budget`` bytes (``chunk_bytes`` of the device); ``elt_bytes``:
    the bytes held per element of that chunk, when more than its own 4 sit beside it."""
    return max(1, min(na, chunk_rows, int(budget // (elt_bytes * max(nb, 1)))))


def aligned_memory_rows(na: int, nb: int, chunk_rows: int, budget: int, dtype: torch.dtype,
                        partial_bytes: float = 0.0) -> int:
    """``memory_rows`` for a pass of the matmul producer that holds an fp32 chunk over ``nb`` columns
    beside the tiles it forms (a soft target's teacher), and ``partial_bytes`` per element of that
    chunk beside it (pass 1's column partials, per row block): where the budget is what splits the
    rows, rounded down to a multiple of ``matmul_plan``'s row alignment (the CLIP statistics kernel's
    block_m, which every matmul configuration's divides), so that its chunks start where that plan's
    do."""
    rows = memory_rows(na, nb, chunk_rows, budget, 4 + partial_bytes)
    if rows >= min(na, chunk_rows):
        return rows
    unit = matmul_config("stats", str(dtype).replace("torch.", "")).block_m
    return max(unit, rows // unit * unit)


class MatmulPlan(NamedTuple):
    """The chunks of the matmul producer within a budget of bytes: pass 1 (statistics) in chunks of
    ``stats_rows`` rows, whose float64 column partials (one row per row block) fit; pass 2 (G and the
    gradient products) in blocks of ``grad_rows`` × ``grad_cols``, whose G in the gradient dtype
    fits. Both at most ``chunk_rows`` rows, the pass-2 block about square: the gradient of B is read
    and written once per row block (N/grad_rows times) and that of A once per column block, which at
    thousands of rows is far below the products' own time."""
    stats_rows: int
    grad_rows: int
    grad_cols: int


def matmul_plan(na: int, nb: int, dtype: torch.dtype, chunk_rows: int, budget: int,
                col_bytes: int = 8, partial_rows: int = 0, block_bytes: int = 0) -> MatmulPlan:
    """``MatmulPlan`` of Na × Nb within ``budget`` bytes; ``col_bytes``: pass 1's partials per row
    block and column (a float64 LSE for the CLIP losses; the general target adds its fp32 sums), one
    row block per ``partial_rows`` rows (its kernel's block_m; by default the CLIP statistics
    kernel's); ``block_bytes``: the bytes per element of a pass-2 block (by default G's, in
    ``dtype``; soft targets add the teacher's fp32 chunk beside it). The chunks are multiples of that
    kernel's block_m and block_n, which every matmul configuration divides, so that each logit sits at
    the same place of its tile in both passes."""
    cfg = matmul_config("stats", str(dtype).replace("torch.", ""))
    elt = block_bytes or torch.empty((), dtype=dtype).element_size()
    blocks = budget // (col_bytes * max(nb, 1))  # row blocks of partials that fit
    stats_rows = max(cfg.block_m, blocks * (partial_rows or cfg.block_m) // cfg.block_m * cfg.block_m)
    side = max(cfg.block_m, math.isqrt(budget // elt) // cfg.block_m * cfg.block_m)
    grad_rows = max(1, min(na, chunk_rows, side))
    grad_cols = max(cfg.block_n, budget // (elt * grad_rows) // cfg.block_n * cfg.block_n)
    return MatmulPlan(max(1, min(na, chunk_rows, stats_rows)), grad_rows, max(1, min(nb, grad_cols)))


def matmul_stats_rows(target, na: int, nb: int, chunk_rows: int, budget: int, dtype: torch.dtype, symmetric: bool,
                      cfg) -> int:
    """Pass 1's rows per chunk on the matmul producer (configuration ``cfg``): the float64 LSE and fp32
    sums of each (row block, column) within ``budget`` bytes, and with soft targets the teacher's fp32
    chunk beside them, the chunks aligned as ``matmul_plan``'s (``fused_target.target_grad`` takes the
    same rows for its teacher's chunks)."""
    from ...targets import guided

    col_bytes = (8 + 4 * (6 if target.soft else 4)) if symmetric else 1
    rows = matmul_plan(na, nb, dtype, chunk_rows, budget, col_bytes=col_bytes, partial_rows=cfg.block_m).stats_rows
    if target.soft or guided(target):  # (a guide's chunk, as a teacher's)
        rows = aligned_memory_rows(na, nb, rows, budget, dtype, partial_bytes=col_bytes / cfg.block_m)
    return rows


# ---------------------------------------------------------------------------------- autotuning
AUTOTUNE_ENV = "FASTCON_TRITON_AUTOTUNE"
_TUNED: dict = {}  # (family, dtype class, D, device) -> the configuration autotune chose


def _tune_key(family: str, a: torch.Tensor) -> tuple:
    """Tuning is per loss family, dtype class, D (rounded up to a power of two) and device."""
    name = torch.cuda.get_device_name(a.device) if a.is_cuda else str(a.device)
    d = max(16, 1 << max(0, int(a.shape[1]) - 1).bit_length())
    return family, dtype_class(dtype_name(a)), d, name


def tuned_config(kernel: str, a: torch.Tensor):
    """The matmul producer's configuration of ``kernel`` for inputs like ``a``: the family's fixed one,
    or with ``FASTCON_TRITON_AUTOTUNE=1`` the one ``autotune`` chose for this key."""
    fixed = matmul_config(kernel, dtype_name(a))
    if os.environ.get(AUTOTUNE_ENV) != "1":
        return fixed
    return _TUNED.get(_tune_key(MATMUL_FAMILY[kernel], a), fixed)


def _time(run) -> float:
    """Milliseconds of ``run()``: CUDA events through triton.testing.do_bench on a GPU, one timed call
    after a warm-up elsewhere (the interpreter: tuning there only exercises the logic)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(triton.testing.do_bench(run, warmup=5, rep=20))
    run()
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3


def autotune(family: str, a: torch.Tensor, run) -> None:
    """With ``FASTCON_TRITON_AUTOTUNE=1``, the first call of a key (``_tune_key``) times ``run(cfg)``
    (a launch of the family's heaviest kernel on a sample of the call's own inputs) for each of the
    family's candidates (``configs.MATMUL_CANDIDATES``) and keeps the fastest for the rest of the
    process; both passes of a loss then take that one configuration. Off (the default), every call
    takes the fixed configuration: results never depend on timing."""
    if os.environ.get(AUTOTUNE_ENV) != "1" or torch.compiler.is_compiling():
        return  # (under torch.compile the traced launches take what was chosen before, or the fixed one)
    key = _tune_key(family, a)
    if key in _TUNED:
        return
    candidates = matmul_candidates(family, key[1])
    times = [(_time(lambda c=cfg: run(c)), i) for i, cfg in enumerate(candidates)]
    _TUNED[key] = candidates[min(times)[1]]


# ------------------------------------------------------------------------------------ launches
def merge_lse(part: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
    """out[n] = LSE over k of the float64 partials part[k, n] (⊕ out[n] itself with ``accumulate``),
    by ``tiles.merge_lse_kernel``."""
    cfg = chunked_config("merge")
    k, n = part.shape
    grid = (triton.cdiv(n, cfg.block_n),)
    launch(merge_lse_kernel)[grid](
        part, out, k, n, part.stride(0), part.stride(1),
        ACCUMULATE=accumulate, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def epilogue_operands(dot, a_c, b):
    """(dot, a, b) pointers of an epilogue launch: the unused side is a stand-in (never read)."""
    if dot is None:
        return a_c, a_c, b
    return dot, dot, dot
