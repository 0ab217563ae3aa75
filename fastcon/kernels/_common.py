"""Host-side pieces shared by the chunked backends (plain PyTorch and Triton)."""
from __future__ import annotations

import functools
import os
from typing import Callable, List, Optional, Tuple

import torch

_MiB = 1 << 20
_DEFAULT_CHUNK_BYTES_CPU = 32 * _MiB
_DEFAULT_CACHE_BYTES = {"cpu": 96 * _MiB, "cuda": 0}
# On a GPU the chunk budget is this share of the device's total memory (never of what happens to be
# free, so that a run's chunk plan, and with it its rounding, is the same every time), within bounds:
# 80 GB gives 320 MiB, 141 GB (H200) 564 MiB.
GPU_CHUNK_SHARE = 256
GPU_CHUNK_BYTES_MIN = 64 * _MiB
GPU_CHUNK_BYTES_MAX = 1024 * _MiB
GPU_CHUNK_RULE = (f"1/{GPU_CHUNK_SHARE} of the GPU's total memory, {GPU_CHUNK_BYTES_MIN // _MiB} to "
                  f"{GPU_CHUNK_BYTES_MAX // _MiB} MiB (FASTCON_CHUNK_BYTES overrides)")


def _env_bytes(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def gpu_chunk_bytes(total_memory: int) -> int:
    """The default chunk budget of a GPU with ``total_memory`` bytes: 1/GPU_CHUNK_SHARE of it, in
    whole MiB, within [GPU_CHUNK_BYTES_MIN, GPU_CHUNK_BYTES_MAX]."""
    share = (int(total_memory) // GPU_CHUNK_SHARE) // _MiB * _MiB
    return max(GPU_CHUNK_BYTES_MIN, min(GPU_CHUNK_BYTES_MAX, share))


@functools.lru_cache(maxsize=None)
def _cuda_total_memory(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).total_memory)


def gpu_budget(total_memory: int) -> int:
    """The chunk budget of a GPU with ``total_memory`` bytes: ``FASTCON_CHUNK_BYTES`` if set, else
    ``gpu_chunk_bytes`` (also for a named device that is not here: ``fastcon-bench plan``)."""
    return _env_bytes("FASTCON_CHUNK_BYTES") or gpu_chunk_bytes(total_memory)


def chunk_bytes(device: torch.device) -> int:
    """The engine's working-memory budget per chunk (``FASTCON_CHUNK_BYTES``; default 32 MiB on CPU,
    ``gpu_budget`` of the device's total memory on a GPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return gpu_budget(_cuda_total_memory(index))
    return _env_bytes("FASTCON_CHUNK_BYTES") or _DEFAULT_CHUNK_BYTES_CPU


def cache_bytes(device: torch.device) -> int:
    """Bytes of first-pass logits kept for the gradient pass (``FASTCON_CACHE_BYTES``; default 96 MiB
    on CPU, where it saves a matrix product, 0 on GPU, where recomputing is cheaper than the traffic)."""
    value = _env_bytes("FASTCON_CACHE_BYTES")
    return value if value is not None else _DEFAULT_CACHE_BYTES.get(torch.device(device).type, 0)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(n: int, chunk_rows: int):
    """(start, stop) of consecutive row chunks of at most ``chunk_rows`` rows."""
    for start in range(0, n, chunk_rows):
        yield start, min(n, start + chunk_rows)


_MIN_TORCH_OUT_DTYPE = (2, 8)  # torch.mm(..., out_dtype=torch.float32) for bf16/fp16 on CUDA


def _torch_version() -> Tuple[int, int]:
    return tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def cuda_half_gemm_ok() -> Tuple[bool, Optional[str]]:
    """Whether this torch multiplies bf16/fp16 CUDA matrices into an fp32 result, and if not, why."""
    if _torch_version() >= _MIN_TORCH_OUT_DTYPE:
        return True, None
    return False, (f"bf16/fp16 losses on CUDA need torch >= 2.8 (torch.mm with out_dtype=torch.float32, "
                   f"tensor-core GEMMs with fp32 output); found torch {torch.__version__}. Upgrade torch, "
                   "or pass float32 features")


def mm_acc(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` in the accumulation dtype (called with autocast off). bf16/fp16 on CUDA: tensor-core
    GEMMs with an fp32 result (``out_dtype``, torch >= 2.8; an older torch is an error, never a
    silent fp32 GEMM). bf16/fp16 on the CPU, where torch has no such GEMM: the operands widened to
    fp32, which gives the same exact products, accumulated in fp32."""
    if x.dtype in (torch.float32, torch.float64):
        return x @ y
    if x.is_cuda:
        ok, reason = cuda_half_gemm_ok()
        if not ok:
            raise RuntimeError(f"fastcon: {reason}")
        return torch.mm(x, y, out_dtype=torch.float32)
    return x.float() @ y.float()


ChunkStats = Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def stats_pass(a: torch.Tensor, b: torch.Tensor, chunk_rows: int, cache_bytes: int,
               chunk_stats: ChunkStats) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """Pass 1 of the engine: for each row chunk, the dot products ``a[r0:r1]·bᵀ`` and a backend's
    statistics epilogue ``chunk_stats(dot, r0, r1, row_lse, col_lse, pos_logit)`` (which fills the
    chunk's rows of row_lse and pos_logit and merges its column LSE into col_lse).

    Returns (row_lse, col_lse, pos_logit, cached), the LSEs in float64: ``cached`` holds the dot products of the leading
    chunks whose total fits ``cache_bytes``, for the gradient pass to reuse instead of recomputing.
    """
    na, nb = a.shape[0], b.shape[0]
    acc = acc_dtype(a.dtype)
    row_lse = torch.empty(na, dtype=torch.float64, device=a.device)
    pos_logit = torch.zeros(na, dtype=acc, device=a.device)
    col_lse = torch.full((nb,), float("-inf"), dtype=torch.float64, device=a.device)
    cached, kept = [], 0
    for r0, r1 in row_chunks(na, chunk_rows):
        dot = mm_acc(a[r0:r1], b.T)
        chunk_stats(dot, r0, r1, row_lse, col_lse, pos_logit)
        size = dot.numel() * dot.element_size()
        if len(cached) * chunk_rows == r0 and kept + size <= cache_bytes:
            cached.append(dot)
            kept += size
    return row_lse, col_lse, pos_logit, cached


def take_cached(cached, k: int):
    """Pass 2's use of pass 1's cache: the ``k``-th cached chunk of dot products (None past the cached
    ones), released from a list as it is taken, so that pass 2 holds a cached chunk only while it uses it."""
    if cached is None or k >= len(cached):
        return None
    dot = cached[k]
    if isinstance(cached, list):
        cached[k] = None
    return dot


def mask_columns_without_positive(col_lse: torch.Tensor, pos_offset: int, na: int) -> torch.Tensor:
    """+inf outside [pos_offset, pos_offset + na): those columns have no column-softmax term."""
    col_lse[:pos_offset] = float("inf")
    col_lse[pos_offset + na:] = float("inf")
    return col_lse


def two_pass_softmax(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes,
                     chunk_stats: ChunkStats, softmax_grad):
    """``softmax_fused`` of the contract for a chunked backend: ``stats_pass`` with the backend's
    statistics epilogue, the columns without a positive masked, then the backend's ``softmax_grad``
    reusing the cached chunks."""
    row_lse, col_lse, pos_logit, cached = stats_pass(a, b, chunk_rows, cache_bytes, chunk_stats)
    mask_columns_without_positive(col_lse, pos_offset, a.shape[0])
    grads = softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows,
                         _cached=cached)
    return (row_lse, col_lse, pos_logit) + grads


def lse_parts(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """float64 log-sum-exp of ``logits`` along ``dim``, formed from its parts (the maximum, an exact
    logit, plus the log of the sum of exp(logits − max) in the logits' dtype), so that no rounding at
    the magnitude of the logits enters it. A max of ±inf gives the shift 0, as torch.logsumexp."""
    if logits.shape[dim] == 0:  # an empty set of logits: LSE −inf
        shape = list(logits.shape)
        del shape[dim]
        return torch.full(shape, float("-inf"), dtype=torch.float64, device=logits.device)
    m = logits.amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = (logits - shift).exp_().sum(dim=dim, keepdim=True)  # one temporary of the logits' size
    return (shift.double() + torch.log(total.double())).squeeze(dim)


def split_lse(lse: torch.Tensor, dtype: torch.dtype):
    """(hi, lo) in ``dtype`` with hi + lo = lse (float64) to twice the precision of ``dtype``:
    ``(S − hi) − lo`` then keeps the precision of ``S − lse``. +inf gives (inf, 0)."""
    hi = lse.to(dtype)
    lo = (lse - hi.double()).to(dtype)
    return hi, torch.where(torch.isinf(hi), torch.zeros_like(lo), lo)


TRITON_PRODUCERS = ("auto", "matmul", "cublas")


def producer_setting() -> str:
    """``FASTCON_TRITON_PRODUCER`` (empty or unset: ``auto``), checked: where the Triton backend's tiles
    of dot products come from (``kernels.triton.plan.producer``)."""
    choice = os.environ.get("FASTCON_TRITON_PRODUCER", "auto") or "auto"
    if choice not in TRITON_PRODUCERS:
        raise ValueError(f"FASTCON_TRITON_PRODUCER must be one of {', '.join(TRITON_PRODUCERS)}, got {choice!r}")
    return choice
