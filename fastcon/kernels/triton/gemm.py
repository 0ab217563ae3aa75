"""The GEMM glue of the gradient products: G's buffer and its fp16 lift, and ``grad_a = s·G·B``,
``grad_b += Gᵀ·A`` (``grad_gemms``), the latter with an in-place fp32-accumulating GEMM,
``C = α·X·Y (+ C)`` (``mm_accumulate``).

The chunked Triton path accumulates the gradient of B over row chunks, ``grad_b += Gᵀ·A_c``, with G
and A_c in bf16/fp16 and grad_b in fp32. cuBLAS through torch has no such in-place mixed-dtype
product (``addmm`` with ``out_dtype`` wants the accumulator in the operands' dtype), and a product
into a temporary followed by ``add_`` moves three Nb×D fp32 tensors through memory per chunk; this
kernel reads and writes ``C`` once per chunk. X and Y are addressed by strides, so ``Gᵀ`` costs no
copy. ``α`` is a host factor (the inverse of the power of two that G was lifted by before its cast,
``grad_tile_scale``), optionally times a device scalar.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._common import mm_acc
from . import launch
from .configs import gemm_config


@triton.jit
def _mm_accumulate_kernel(
    x_ptr, y_ptr, c_ptr, alpha_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_yk, stride_yn, stride_cm, stride_cn,
    alpha_factor,
    ACCUMULATE: tl.constexpr, ALPHA_FROM_PTR: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] = α·X[M, K]·Y[K, N] (+ C with ACCUMULATE), fp32 accumulation, α = alpha_factor, times
    alpha_ptr[0] with ALPHA_FROM_PTR.
    Programs walk the output tiles in groups of GROUP_M row tiles, so that neighbours share Y tiles in L2."""
    pid = tl.program_id(0).to(tl.int64)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # times the row stride of G: past 2^31 at large N
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(y_ptr + offs_k[:, None] * stride_yk + offs_n[None, :] * stride_yn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(x, y, acc, input_precision=INPUT_PRECISION)
    if ALPHA_FROM_PTR:
        out = acc * (tl.load(alpha_ptr).to(tl.float32) * alpha_factor)
    else:
        out = acc * alpha_factor
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        out += tl.load(c, mask=mask, other=0.0)
    tl.store(c, out, mask=mask)


def mm_accumulate(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor, alpha_factor: float = 1.0,
                  alpha: Optional[torch.Tensor] = None, accumulate: bool = True) -> torch.Tensor:
    """``out = alpha_factor·alpha·(x @ y) (+ out)`` in place. x (M, K) and y (K, N) of one dtype
    (bf16, fp16 or fp32; any strides), out (M, N) fp32, ``alpha`` an optional one-element device
    tensor (read by the kernel, so that a scale that lives on the device needs no host sync)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[0]:
        raise ValueError(f"mm_accumulate: cannot multiply {tuple(x.shape)} by {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise TypeError(f"mm_accumulate: x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if out.dtype != torch.float32 or tuple(out.shape) != (x.shape[0], y.shape[1]):
        raise ValueError(f"mm_accumulate: out must be float32 of shape {(x.shape[0], y.shape[1])}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    m, k = x.shape
    n = y.shape[1]
    if m == 0 or n == 0:
        return out
    cfg = gemm_config(str(x.dtype).replace("torch.", ""))
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    launch(_mm_accumulate_kernel)[grid](
        x, y, out, out if alpha is None else alpha, m, n, k,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        float(alpha_factor),
        ACCUMULATE=bool(accumulate), ALPHA_FROM_PTR=alpha is not None,
        INPUT_PRECISION="ieee",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ------------------------------------------------------------------------------ gradient products
def grad_buffer(a: torch.Tensor, rows: int, nb: int):
    """Buffer for G in the dtype of the gradient GEMMs (None for fp32: G is written in place)."""
    if a.dtype == torch.float32:
        return None
    return torch.empty((rows, nb), dtype=a.dtype, device=a.device)


_FP16_LIFT_LIMIT = 32768.0  # half of fp16's largest finite value (65504), rounded to a power of two


def grad_tile_scale(dtype: torch.dtype, bound: float) -> float:
    """The power of two that G (|G| <= ``bound``) is multiplied by before its cast to ``dtype`` for
    the gradient GEMMs, whose inverse is folded into their α. Softmax gradients are about 1/N: at
    N = 65,536 that is 1.5e-5, below fp16's smallest normal number (6.1e-5), where the cast would keep
    few of its bits; lifted to just under fp16's range they keep all eleven. bf16 has fp32's exponent
    range and fp32 no cast: 1 for both. The factor depends on the loss weights only, never on the
    data, so results are deterministic and no device value is read."""
    if dtype != torch.float16 or bound <= 0:
        return 1.0
    return float(2.0 ** math.floor(math.log2(_FP16_LIFT_LIMIT / bound)))


def grad_gemms(g, a_c, b, scale, grad_a_c, grad_b, g_scale: float, accumulate_a: bool = False) -> None:
    """grad_a_c = s·G·B (``accumulate_a``: +=, the device scale read by the GEMM); grad_b += Gᵀ·A_c in
    place (fp32 accumulation; s applied to grad_b at the end). ``g`` holds G·g_scale (a power of
    two), undone in the products' α."""
    inv = 1.0 / g_scale
    if accumulate_a:
        mm_accumulate(g, b, grad_a_c, inv, alpha=scale)
    elif g.dtype == torch.float32:
        torch.mul(g @ b, scale, out=grad_a_c)
    else:
        torch.mul(mm_acc(g, b), scale * inv, out=grad_a_c)
    if g.dtype == torch.float32:
        grad_b.addmm_(g.T, a_c)
    else:
        mm_accumulate(g.T, a_c, grad_b, inv)


def compile_specs():
    """The kernel at its shipped configuration for bf16 and fp16 (fp32 never takes this path), as
    dicts for ``triton.compile(ASTSource(...))`` (tests/test_triton_compile.py)."""
    tri = {"bfloat16": "bf16", "float16": "fp16"}
    specs = []
    for dtype, short in tri.items():
        cfg = gemm_config(dtype)
        # Gᵀ as X: unit stride along M (the runtime specialises strides equal to 1), the row stride
        # of G along K
        consts = {"stride_xm": 1, "stride_yn": 1, "stride_cn": 1, "ACCUMULATE": True, "ALPHA_FROM_PTR": False,
                  "INPUT_PRECISION": "ieee",
                  "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m}
        sig = {"x_ptr": "*" + short, "y_ptr": "*" + short, "c_ptr": "*fp32", "alpha_ptr": "*fp32",
               "M": "i32", "N": "i32", "K": "i32",
               "stride_xm": "constexpr", "stride_xk": "i32", "stride_yk": "i32", "stride_yn": "constexpr",
               "stride_cm": "i32", "stride_cn": "constexpr", "alpha_factor": "fp32"}
        for key in consts:
            sig[key] = "constexpr"
        specs.append(dict(name="mm_accumulate", fn=_mm_accumulate_kernel, signature=sig, constexprs=consts,
                          num_warps=cfg.num_warps, num_stages=cfg.num_stages, uses_dot=True, dtype=dtype,
                          config=cfg))
    return specs
