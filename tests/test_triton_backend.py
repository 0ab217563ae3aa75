"""Triton backend (``fastcon.kernels.triton.chunked`` with each producer of its tiles, and ``.fused``)
against the plain-PyTorch statement of the contract, ``fastcon.kernels.torch_chunked``. ``"matmul"``
is the chunked module with ``FASTCON_TRITON_PRODUCER=matmul``: its epilogue kernels form their tiles
with tl.dot (``tiles.dot_tile``) instead of reading torch.mm's chunks.

On CPU the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 before
triton is imported): fp32, small shapes; those tests are marked ``interpreter`` and skipped when
TRITON_INTERPRET is not 1. Tests marked ``cuda`` compare bf16/fp16/fp32 on a GPU with
an fp64 ground truth (run them with TRITON_INTERPRET=0 on a GPU machine).
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from fastcon.kernels import torch_chunked as ref

pytest.importorskip("triton")

MODS = ["chunked", "fused", "matmul"]


def _mod(name):
    return importlib.import_module(f"fastcon.kernels.triton.{'chunked' if name == 'matmul' else name}")


@pytest.fixture(autouse=True)
def _producer(request, monkeypatch):
    """The chunked module's producer for this test's ``mod``: cuBLAS chunks, or the matmul producer."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul" if params.get("mod") == "matmul" else "cublas")


def _inputs(na, nb, d, scale, bias, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed + na * 7 + nb * 13 + d)
    a = torch.nn.functional.normalize(torch.randn(na, d, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(nb, d, generator=g, dtype=torch.float64), dim=1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype),
            torch.tensor(scale, dtype=acc, device=device), torch.tensor(bias, dtype=acc, device=device))


def _close(got, want, logit_mag, name, rtol=1e-5, atol_per_logit=2e-6):
    if want is None:
        assert got is None, name
        return
    assert got is not None, name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    got, want = got.double(), want.double()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{name}: finite pattern differs"
    assert torch.equal(got[~fin], want[~fin]), f"{name}: infinities differ"
    # atol: fp32 rounding of logits of size |s|+|b| propagates into every output; scale it so
    # that sums over many terms (grad_scale, grad_bias, loss) get a budget ∝ their magnitude.
    atol = atol_per_logit * (1.0 + logit_mag) * max(1.0, want[fin].abs().max().item() if fin.any() else 1.0)
    err = (got[fin] - want[fin]).abs()
    tol = atol + rtol * want[fin].abs()
    assert bool((err <= tol).all()), f"{name}: max err {err.max().item():.3g} (atol {atol:.3g})"


CASES = [
    # na, nb, d, scale, bias, chunk_rows
    (1, 1, 3, 1.0, 0.0, 4),
    (3, 257, 64, 14.3, -10.0, 2),
    (127, 3, 200, 100.0, 0.0, 50),
    (257, 127, 3, 100.0, -10.0, 100),
    (127, 257, 200, 14.3, 0.0, 128),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("na,nb,d,scale,bias,chunk", CASES)
def test_lse_stats(mod, na, nb, d, scale, bias, chunk):
    a, b, s, bb = _inputs(na, nb, d, scale, bias)
    mag = abs(scale) + abs(bias)
    for pos_offset in sorted({0, min(2, nb), nb}):
        got = _mod(mod).lse_stats(a, b, s, bb, pos_offset, chunk)
        want = ref.lse_stats(a, b, s, bb, pos_offset, chunk)
        for n, x, y in zip(("row_lse", "col_lse", "pos_logit"), got, want):
            _close(x, y, mag, f"{n} pos_offset={pos_offset}")


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("na,nb,d,scale,bias,chunk", CASES)
def test_softmax_grad(mod, na, nb, d, scale, bias, chunk):
    a, b, s, bb = _inputs(na, nb, d, scale, bias)
    row_lse, col_lse, _ = ref.lse_stats(a, b, s, bb, 0, chunk)
    col_lse = col_lse.clone()
    col_lse[::3] = float("inf")  # +inf LSE: that column's term is 0
    for pos_offset, w_row, w_col, w_pos in ((0, 0.5, 0.5, 1.0), (1, 1.0, 0.0, 1.0), (nb, 0.5, 0.5, 0.0)):
        got = _mod(mod).softmax_grad(a, b, s, bb, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk)
        want = ref.softmax_grad(a, b, s, bb, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk)
        for n, x, y in zip(("grad_a", "grad_b", "grad_scale", "grad_bias"), got, want):
            _close(x, y, abs(scale) + abs(bias), f"{n} pos={pos_offset} w=({w_row},{w_col},{w_pos})")


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("na,nb,d,scale,bias,chunk", [CASES[1], CASES[3], CASES[4]])
def test_softmax_fused(mod, na, nb, d, scale, bias, chunk):
    a, b, s, bb = _inputs(na, nb, d, scale, bias)
    pos_offset = max(0, min(1, nb - na))
    for cache_bytes in (0, 1 << 30):
        got = _mod(mod).softmax_fused(a, b, s, bb, pos_offset, 0.5, 0.5, 1.0, chunk, cache_bytes)
        want = ref.softmax_fused(a, b, s, bb, pos_offset, 0.5, 0.5, 1.0, chunk, cache_bytes)
        names = ("row_lse", "col_lse", "pos_logit", "grad_a", "grad_b", "grad_scale", "grad_bias")
        for n, x, y in zip(names, got, want):
            _close(x, y, abs(scale) + abs(bias), n)


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("na,nb,d,scale,bias,chunk", CASES)
def test_sigmoid_fused(mod, na, nb, d, scale, bias, chunk):
    a, b, s, bb = _inputs(na, nb, d, scale, bias)
    for pos_offset in sorted({0, min(2, nb), nb, nb + 5}):
        for need_grad in (True, False):
            got = _mod(mod).sigmoid_fused(a, b, s, bb, pos_offset, 0.3, chunk, need_grad)
            want = ref.sigmoid_fused(a, b, s, bb, pos_offset, 0.3, chunk, need_grad)
            for n, x, y in zip(("loss", "grad_a", "grad_b", "grad_scale", "grad_bias"), got, want):
                _close(x, y, abs(scale) + abs(bias), f"{n} pos_offset={pos_offset} grad={need_grad}")


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", MODS)
def test_split_paths(mod, monkeypatch):
    """More programs than row blocks: column/row splits with partial buffers merged in order."""
    from fastcon.kernels.triton import plan as tplan

    m = _mod(mod)
    monkeypatch.setattr(tplan, "PROGRAMS_PER_LAUNCH_CPU", 64)
    a, b, s, bb = _inputs(70, 300, 40, 14.3, -10.0)
    got = m.softmax_fused(a, b, s, bb, 100, 0.5, 0.5, 1.0, 33, 0)
    want = ref.softmax_fused(a, b, s, bb, 100, 0.5, 0.5, 1.0, 33, 0)
    for n, x, y in zip(("row_lse", "col_lse", "pos_logit", "ga", "gb", "gs", "gbias"), got, want):
        _close(x, y, 24.3, n)
    got = m.sigmoid_fused(a, b, s, bb, 3, 1.0, 33, True)
    want = ref.sigmoid_fused(a, b, s, bb, 3, 1.0, 33, True)
    for n, x, y in zip(("loss", "ga", "gb", "gs", "gbias"), got, want):
        _close(x, y, 24.3, n)


@pytest.mark.interpreter
@pytest.mark.parametrize("budget", [3000, 20000])
def test_matmul_blocks_within_a_budget(budget, monkeypatch):
    """The matmul producer under a small chunk budget: pass 1 in several row chunks (their float64
    column partials within the budget), pass 2 in row × column blocks (G within the budget), the
    gradient of A accumulated over the column blocks; the same results as the contract's."""
    from fastcon.kernels.triton import chunked
    from fastcon.kernels.triton import plan as tplan

    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
    monkeypatch.setenv("FASTCON_CHUNK_BYTES", str(budget))
    na, nb = 70, 300
    plan = tplan.matmul_plan(na, nb, torch.float32, na, budget)
    assert plan.grad_rows < na and plan.grad_cols < nb and (plan.stats_rows < na or budget > 3000)
    a, b, s, bb = _inputs(na, nb, 40, 14.3, -10.0)
    for pos in (0, 100, 299):
        got = chunked.softmax_fused(a, b, s, bb, pos, 0.5, 0.5, 1.0, na, 0)
        want = ref.softmax_fused(a, b, s, bb, pos, 0.5, 0.5, 1.0, na, 0)
        for n, x, y in zip(("row_lse", "col_lse", "pos_logit", "ga", "gb", "gs", "gbias"), got, want):
            _close(x, y, 24.3, f"{n} pos={pos}")
        got = chunked.sigmoid_fused(a, b, s, bb, pos, 0.7, na, True)
        want = ref.sigmoid_fused(a, b, s, bb, pos, 0.7, na, True)
        for n, x, y in zip(("loss", "ga", "gb", "gs", "gbias"), got, want):
            _close(x, y, 24.3, f"{n} pos={pos}")


@pytest.mark.parametrize("n,dtype,memory", [(65536, torch.bfloat16, 80 << 30), (1 << 20, torch.bfloat16, 141 << 30),
                                            (1 << 20, torch.float16, 40 << 30), (300, torch.bfloat16, 80 << 30)])
def test_matmul_plan(n, dtype, memory):
    """The matmul producer's chunks: the G block and pass 1's float64 column partials fit the device's
    budget, and at N = 1M the blocks are thousands of rows (B and the gradients are re-read
    N / rows times, not N / 64)."""
    from fastcon.kernels._common import gpu_chunk_bytes
    from fastcon.kernels.triton import configs
    from fastcon.kernels.triton import plan as tplan

    budget = gpu_chunk_bytes(memory)
    assert budget == max(64 << 20, min(1 << 30, memory // 256 // (1 << 20) * (1 << 20)))
    plan = tplan.matmul_plan(n, n, dtype, n, budget)
    cfg = configs.matmul_config("stats", "bfloat16")
    assert plan.grad_rows * plan.grad_cols * 2 <= budget
    assert -(-plan.stats_rows // cfg.block_m) * n * 8 <= budget or plan.stats_rows == cfg.block_m
    if n >= 65536:
        assert plan.stats_rows >= 2048 and plan.grad_rows >= 4096 and plan.grad_cols >= 4096
    else:
        assert plan == (n, n, n)
    assert tplan.matmul_plan(n, n, dtype, 1000, budget).grad_rows <= 1000  # chunk_size= caps the rows
    # the general target's partials: 32 bytes per column for each 64-row block of its kernels
    target = tplan.matmul_plan(n, n, dtype, n, budget, col_bytes=32, partial_rows=64)
    assert -(-target.stats_rows // 64) * n * 32 <= budget or target.stats_rows == cfg.block_m
    assert target.stats_rows % cfg.block_m == 0 or target.stats_rows == n
    # soft targets: the teacher's fp32 chunk beside G in each pass-2 block, whose blocks stay aligned
    soft = tplan.matmul_plan(n, n, dtype, n, budget, block_bytes=2 + 4)
    assert soft.grad_rows * soft.grad_cols * 6 <= budget
    assert soft.grad_cols % cfg.block_n == 0 or soft.grad_cols == n
    if n >= 65536:
        assert soft.grad_rows >= 2048 and soft.grad_cols >= 2048
    # and pass 1's rows of the teacher's chunk, aligned as the plan's (at least one row block)
    rows = tplan.aligned_memory_rows(n, n, n, budget, dtype)
    assert rows == n or (rows % cfg.block_m == 0 and (rows * n * 4 <= budget or rows == cfg.block_m))
    beside = tplan.aligned_memory_rows(n, n, n, budget, dtype, partial_bytes=0.5)  # with partials beside it
    assert beside <= rows and (beside == n or beside * n * 4.5 <= budget or beside == cfg.block_m)


def test_producer_choice(monkeypatch):
    """auto: the matmul producer for bf16/fp16 on a GPU, but not for soft targets, fp32 or the
    interpreter; an explicit choice applies to all; a bad one names the variable."""
    from fastcon.kernels.triton import plan as tplan

    monkeypatch.delenv("FASTCON_TRITON_PRODUCER", raising=False)
    half = (torch.bfloat16, torch.float16)
    assert all(tplan.producer_for(dt, True) == "matmul" for dt in half)
    assert all(tplan.producer_for(dt, True, soft=True) == "cublas" for dt in half)
    assert tplan.producer_for(torch.float32, True) == "cublas"
    assert tplan.producer_for(torch.bfloat16, False) == "cublas"
    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
    assert tplan.producer_for(torch.bfloat16, True, soft=True) == "matmul"
    assert tplan.producer_for(torch.float32, False, soft=True) == "matmul"
    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "cublas")
    assert tplan.producer_for(torch.bfloat16, True) == "cublas"
    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "tma")
    with pytest.raises(ValueError, match="FASTCON_TRITON_PRODUCER"):
        tplan.producer_for(torch.bfloat16, True)


@pytest.mark.interpreter
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_matmul_producer_through_the_engine(loss, monkeypatch):
    """The public losses on the Triton backend with the matmul producer, against the materialising
    reference: the loss and the gradients of every input (the engine offers the backend all rows and
    the backend chunks them)."""
    import fastcon.functional as FC
    from fastcon import reference as R

    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
    monkeypatch.setenv("FASTCON_CHUNK_BYTES", "6000")
    a, b, s, bb = (t.clone().requires_grad_() for t in _inputs(61, 61, 24, 20.0, -5.0))
    if loss == "clip":
        fns = (lambda: FC.clip_loss(a, b, s, backend="triton"), lambda: R.clip_loss_reference(a, b, s))
        leaves = (a, b, s)
    else:
        fns = (lambda: FC.siglip_loss(a, b, s, bb, backend="triton"), lambda: R.siglip_loss_reference(a, b, s, bb))
        leaves = (a, b, s, bb)
    results = []
    for f in fns:
        value = f()
        results.append((value, torch.autograd.grad(value, leaves)))
    (got, g_got), (want, g_want) = results
    _close(got.detach().double(), want.detach().double(), 25.0, "loss")
    for name, x, y in zip(("a", "b", "scale", "bias"), g_got, g_want):
        _close(x, y, 25.0, f"grad {name}")



    a, b, s, bb = _inputs(4, 4, 257, 1.0, 0.0)
    with pytest.raises(ValueError, match="D=257"):
        _mod("fused").lse_stats(a, b, s, bb, 0, 4)


@pytest.mark.parametrize("mod", MODS)
def test_float64_not_supported(mod):
    a, b, s, bb = _inputs(4, 4, 8, 1.0, 0.0, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        _mod(mod).lse_stats(a, b, s, bb, 0, 4)


def test_available():
    from fastcon.kernels import triton as tb

    ok, why = tb.available(torch.device("cpu"))
    assert ok == (os.environ.get("TRITON_INTERPRET") == "1")
    assert ok or "TRITON_INTERPRET=1" in why


# ------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("mod", MODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("na,nb,d", [(1000, 1537, 64), (513, 2048, 200), (2048, 1000, 128), (300, 700, 256)])
def test_cuda_against_fp64(mod, dtype, na, nb, d):
    m = _mod(mod)
    scale, bias = 14.3, -10.0
    a, b, s, bb = _inputs(na, nb, d, scale, bias, dtype=dtype, device="cuda")
    # Ground truth in fp64 from the inputs as rounded to `dtype`.
    a64, b64 = a.double(), b.double()
    s64, bb64 = s.double(), bb.double()
    # Budget: G is rounded to bf16/fp16 before the gradient GEMMs (relative 2^-8 / 2^-11), dots are
    # fp32 (TF32x3 in the fused fp32 path).
    rtol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]

    def check(got, want, name):
        got, want = got.double(), want.double()
        fin = torch.isfinite(want)
        err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
        ref_mag = want[fin].abs().max().item() if fin.any() else 1.0
        assert err <= rtol * max(ref_mag, 1e-3) + 1e-5 * (scale + abs(bias)), f"{name}: {err:.3g} vs {ref_mag:.3g}"

    pos = max(0, min(3, nb - na))
    got = m.softmax_fused(a, b, s, bb, pos, 0.5, 0.5, 1.0, 512, 1 << 28)
    want = ref.softmax_fused(a64, b64, s64, bb64, pos, 0.5, 0.5, 1.0, 512, 1 << 28)
    for n, x, y in zip(("row_lse", "col_lse", "pos_logit", "ga", "gb", "gs", "gbias"), got, want):
        check(x, y, n)
    got = m.sigmoid_fused(a, b, s, bb, 3, 1.0 / na, 512, True)
    want = ref.sigmoid_fused(a64, b64, s64, bb64, 3, 1.0 / na, 512, True)
    for n, x, y in zip(("loss", "ga", "gb", "gs", "gbias"), got, want):
        check(x, y, n)


# ------------------------------------------------------------------------------------- precision
def _confident_pairs(n=64, d=32, seed=0):
    """Unit image rows near a common direction and their texts ``image + 0.05·noise`` (normalised),
    so that at scale 100 every row's positive is its maximum and the per-row losses spread over
    ~1e-7..1e-3. Entries are rounded to multiples of 2^-10: every dot product is then exact in fp32
    whatever the summation order (torch.mm, the interpreter's tl.dot), so each path sees the same
    fp32 logits fp32(100·dot), and the float64 reference is taken from exactly those logits."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    img = torch.nn.functional.normalize(u + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    a, b = (torch.round(x * 1024) / 1024 for x in (img, txt))
    s64 = (a @ b.T * 100.0).float().double()  # the fp32 logits, exactly, in float64
    return a.float(), b.float(), s64


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", MODS)
def test_confident_rows_precision(mod):
    """A confident row's loss ``row_lse − pos_logit`` (~1e-5) and its gradient (P − 1 ~ loss) are far
    below ulp(100) ≈ 7.6e-6: the float64 LSEs (formed as max + log1p of the excess) and the hi/lo
    split with expm1 at the positive must keep them to fp32 relative precision."""
    m = _mod(mod)
    a, b, s64 = _confident_pairs()
    n = a.shape[0]
    s = torch.tensor(100.0)
    bias = torch.tensor(0.0)
    assert bool((s64.argmax(dim=1) == torch.arange(n)).all())
    row64, col64 = torch.logsumexp(s64, dim=1), torch.logsumexp(s64, dim=0)
    loss64 = row64 - s64.diagonal()

    row_lse, col_lse, pos_logit = m.lse_stats(a, b, s, bias, 0, n)
    assert row_lse.dtype == torch.float64 and col_lse.dtype == torch.float64
    loss = row_lse - pos_logit.double()
    rel = ((loss - loss64).abs() / loss64)
    band = (loss64 >= 1e-5) & (loss64 <= 1e-3)
    assert int(band.sum()) >= 16
    assert rel[band].max().item() <= 2e-6, f"loss rel err {rel[band].max().item():.3g}"
    small = loss64 >= 1e-7
    assert rel[small].max().item() <= 5e-6, f"loss rel err (>=1e-7) {rel[small].max().item():.3g}"
    assert (row_lse - row64).abs().max().item() <= 1e-12 * 100 + 1e-9
    assert (col_lse - col64).abs().max().item() <= 1e-12 * 100 + 1e-9

    # gradient of w_row·CE(rows) + w_col·CE(cols) with w_pos = 2: float64 from the same logits
    g64 = torch.exp(s64 - row64[:, None]) + torch.exp(s64 - col64[None, :]) - 2.0 * torch.eye(n, dtype=torch.float64)
    want_a = 100.0 * g64 @ b.double()
    want_b = 100.0 * g64.T @ a.double()
    for lse_pair in ((row_lse, col_lse), (row64, col64)):
        grad_a, grad_b, _, _ = m.softmax_grad(a, b, s, bias, *lse_pair, 0, 1.0, 1.0, 2.0, n)
        for name, got, want in (("grad_a", grad_a, want_a), ("grad_b", grad_b, want_b)):
            err = (got.double() - want).abs()
            assert err.max().item() <= 1e-4 * want.abs().max().item(), f"{name}: {err.max().item():.3g}"
            # row by row, down to the rows whose loss is ~1e-6
            row_mag = want.abs().amax(dim=1)
            worst = (err.amax(dim=1) / row_mag).max().item()
            assert worst <= 1e-4, f"{name}: worst per-row rel err {worst:.3g}"
    assert bool((loss64 < 3e-6).any())  # the set holds rows with a loss ~1e-6


@pytest.mark.interpreter
@pytest.mark.parametrize("mod", MODS)
def test_lse_split_infinite(mod):
    """+inf LSEs (masked columns / rows) give a zero term, never NaN, including at the positive."""
    m = _mod(mod)
    a, b, s64 = _confident_pairs(n=16)
    s, bias = torch.tensor(100.0), torch.tensor(0.0)
    row64 = torch.logsumexp(s64, dim=1)
    col = torch.full((16,), float("inf"), dtype=torch.float64)
    grad_a, grad_b, gs, gb = m.softmax_grad(a, b, s, bias, row64, col, 0, 1.0, 1.0, 1.0, 16)
    g64 = torch.exp(s64 - row64[:, None]) - torch.eye(16, dtype=torch.float64)
    want = 100.0 * g64 @ b.double()
    assert bool(torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all())
    assert (grad_a.double() - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def _expm1_kernel():
    """A kernel applying the shared tiles' expm1 (module-level names: Triton resolves a kernel's
    globals in its module)."""
    import triton
    import triton.language as tl

    from fastcon.kernels.triton import tiles

    @triton.jit
    def kernel(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(out_ptr + offs, EXPM1(tl.load(x_ptr + offs)))

    globals()["EXPM1"] = tiles.expm1
    return kernel


@pytest.mark.interpreter
def test_expm1_is_minus_one_where_exp_is_subnormal():
    """P − 1 at a positive far below its row's LSE (s = 100): exp(x) is a subnormal fp32 number for
    x in (−103.3, −87.3), whose log is inexact; expm1 must still give −1 there (and be accurate near 0)."""
    x = torch.tensor([-200.0, -103.0, -100.0, -95.0, -90.0, -87.5, -50.0, -5.78, -1e-5, 0.0, 1e-5, 3.0,
                      float("-inf"), -1e-3, 1e-3, 0.5])
    out = torch.empty_like(x)
    _expm1_kernel()[(1,)](x, out, N=16)
    assert torch.allclose(out, torch.expm1(x.double()).float(), rtol=2e-6, atol=0.0)


@pytest.mark.interpreter
def test_autotuning_is_opt_in_and_keeps_both_passes_on_one_configuration(monkeypatch):
    """FASTCON_TRITON_AUTOTUNE=1: the first call of a key times each candidate once (here a timer that
    prefers the second), both passes then take the chosen configuration, and the results are the
    contract's; without the variable the fixed configuration runs and nothing is timed."""
    from fastcon.kernels.triton import chunked, configs
    from fastcon.kernels.triton import plan as tplan

    fixed = configs.MATMUL_CONFIGS[("softmax", "float32")]
    other = configs.Config(block_m=16, block_n=32, num_warps=4, num_stages=2, block_k=16, occupancy=1)
    monkeypatch.setitem(configs.MATMUL_CANDIDATES, ("softmax", "float32"), [fixed, other])
    monkeypatch.setitem(configs.MATMUL_CANDIDATES, ("sigmoid", "float32"), [fixed, other])
    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
    monkeypatch.setattr(tplan, "_TUNED", {})
    timed = []

    def fake_time(run):
        run()
        timed.append(1)
        return float(len(timed) % 2)  # the second candidate of each family is the fastest

    monkeypatch.setattr(tplan, "_time", fake_time)
    a, b, s, bb = _inputs(40, 50, 24, 14.3, -10.0)

    monkeypatch.delenv("FASTCON_TRITON_AUTOTUNE", raising=False)
    chunked.softmax_fused(a, b, s, bb, 3, 0.5, 0.5, 1.0, 40, 0)
    assert not timed and not tplan._TUNED

    monkeypatch.setenv("FASTCON_TRITON_AUTOTUNE", "1")
    for _ in range(2):  # the second call reuses the choice
        got = chunked.softmax_fused(a, b, s, bb, 3, 0.5, 0.5, 1.0, 40, 0)
        want = ref.softmax_fused(a, b, s, bb, 3, 0.5, 0.5, 1.0, 40, 0)
        for n, x, y in zip(("row_lse", "col_lse", "pos_logit", "ga", "gb", "gs", "gbias"), got, want):
            _close(x, y, 24.3, n)
        got = chunked.sigmoid_fused(a, b, s, bb, 3, 0.7, 40, True)
        want = ref.sigmoid_fused(a, b, s, bb, 3, 0.7, 40, True)
        for n, x, y in zip(("loss", "ga", "gb", "gs", "gbias"), got, want):
            _close(x, y, 24.3, n)
    assert len(timed) == 4  # two candidates of two families, once
    assert sorted(k[0] for k in tplan._TUNED) == ["sigmoid", "softmax"]
    assert all(cfg == other for cfg in tplan._TUNED.values())
    assert tplan.tuned_config("stats", a) == tplan.tuned_config("softmax_grad", a) == other


def test_a_triton_older_than_the_oldest_tested_is_refused_with_its_version(monkeypatch):
    import fastcon.kernels.triton as tb
    from fastcon.kernels.triton import configs

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(configs, "RELEASE", (3, 1))
    ok, reason = tb.available(torch.device("cpu"))
    assert not ok and "older than the oldest release" in reason and "triton>=3.3" in reason
    monkeypatch.setattr(configs, "RELEASE", tb.MIN_TRITON)
    assert tb.available(torch.device("cpu")) == (True, None)
