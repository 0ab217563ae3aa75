"""The C++ CPU engine (``torch.ops.fastcon.*`` via ``fastcon.kernels.cpp``) against the executable
contract ``fastcon.kernels.torch_chunked`` (and dense float64 computations), plus the precision of
the float64 LSEs on confident pairs, gradcheck, opcheck and input validation."""
import math

import pytest
import torch

from fastcon.kernels import cpp
from fastcon.kernels import torch_chunked as ref

pytestmark = pytest.mark.skipif(not cpp.AVAILABLE, reason=f"C++ extension unavailable: {cpp.REASON}")

# (Na, Nb, D, chunk_rows): Na != Nb, Na = 1, D = 3, chunk_rows dividing Na or not, one chunk or many.
SHAPES = [
    (96, 96, 32, 32),
    (100, 130, 24, 33),
    (130, 70, 16, 64),
    (1, 17, 3, 1),
    (7, 40, 3, 2),
    (257, 300, 40, 1000),
]


def _inputs(na, nb, d, scale=8.0, bias=-2.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * na + nb)
    a = torch.nn.functional.normalize(torch.randn(na, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(nb, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return a, b, torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)


def _close(name, got, want, atol):
    assert got.dtype == want.dtype, name
    assert got.shape == want.shape, name
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ"
    assert torch.equal(got[~finite], want[~finite]), f"{name}: non-finite entries differ"
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def _logit_mag(scale, bias):
    # |S| <= |s|·|a|·|b| + |b| with unit-norm rows
    return abs(float(scale)) + abs(float(bias)) + 1.0


def _check_grads(names, got, want, na, weight, mag):
    """grad_a, grad_b, grad_scale, grad_bias: errors relative to the size of the summed terms."""
    for name, g, w in zip(names, got, want):
        if w.dim() == 0:  # a sum over Na·Nb terms with |G| summing to about weight·Na
            atol = 1e-5 * weight * max(na, 1) * (mag if name == "grad_scale" else 1.0)
        else:
            atol = 1e-5 * (w.abs().max().item() + weight) * mag
        _close(name, g, w, atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pos_offset", [0, 3, 10_000])
def test_lse_stats(shape, pos_offset):
    na, nb, d, chunk = shape
    a, b, s, bias = _inputs(na, nb, d)
    got = cpp.lse_stats(a, b, s, bias, pos_offset, chunk)
    want = ref.lse_stats(a, b, s, bias, pos_offset, chunk)
    atol = 1e-6 * _logit_mag(s, bias)
    for name, x, y in zip(("row_lse", "col_lse", "pos_logit"), got, want):
        _close(name, x, y, atol)
    assert got[0].dtype == got[1].dtype == torch.float64 and got[2].dtype == torch.float32


def test_lse_stats_large_logits():
    # logits up to ±300: needs max-shifted exponentials everywhere, in rows and columns
    a, b, s, bias = _inputs(70, 90, 8, scale=300.0, bias=5.0)
    got = cpp.lse_stats(a, b, s, bias, 0, 16)
    want = ref.lse_stats(a, b, s, bias, 0, 16)
    for name, x, y in zip(("row_lse", "col_lse", "pos_logit"), got, want):
        assert torch.isfinite(x).all(), name
        _close(name, x, y, 1e-6 * 306)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cache", ["none", "partial", "all"])
def test_softmax_fused(shape, cache):
    na, nb, d, chunk = shape
    a, b, s, bias = _inputs(na, nb, d)
    pos_offset = max(0, min(5, nb - na))
    chunk_bytes = min(chunk, na) * nb * 4
    cache_bytes = {"none": 0, "partial": chunk_bytes + chunk_bytes // 2, "all": na * nb * 4}[cache]
    w_row, w_col, w_pos = 1.0, 0.5, 1.8
    got = cpp.softmax_fused(a, b, s, bias, pos_offset, w_row, w_col, w_pos, chunk, cache_bytes)
    want = ref.softmax_fused(a, b, s, bias, pos_offset, w_row, w_col, w_pos, chunk, cache_bytes)
    mag = _logit_mag(s, bias)
    for name, x, y in zip(("row_lse", "col_lse", "pos_logit"), got[:3], want[:3]):
        _close(name, x, y, 1e-6 * mag)
    assert got[0].dtype == got[1].dtype == torch.float64
    assert all(x.dtype == torch.float32 for x in got[2:])
    _check_grads(("grad_a", "grad_b", "grad_scale", "grad_bias"), got[3:], want[3:], na, w_row + w_col + w_pos, mag)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_col", [0.0, 0.7])
def test_softmax_grad_with_inf_col_lse(shape, w_col):
    na, nb, d, chunk = shape
    a, b, s, bias = _inputs(na, nb, d)
    row_lse, col_lse, _ = ref.lse_stats(a, b, s, bias, 0, chunk)
    col_lse[::3] = float("inf")  # masked columns contribute nothing
    pos_offset = 2 if nb > 2 else 0
    got = cpp.softmax_grad(a, b, s, bias, row_lse, col_lse, pos_offset, 0.6, w_col, 1.3, chunk)
    want = ref.softmax_grad(a, b, s, bias, row_lse, col_lse, pos_offset, 0.6, w_col, 1.3, chunk)
    _check_grads(("grad_a", "grad_b", "grad_scale", "grad_bias"), got, want, na, 0.6 + w_col + 1.3,
                 _logit_mag(s, bias))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pos_offset", [0, 4, 10_000])
@pytest.mark.parametrize("need_grad", [True, False])
def test_sigmoid_fused(shape, pos_offset, need_grad):
    na, nb, d, chunk = shape
    a, b, s, bias = _inputs(na, nb, d, scale=10.0, bias=-10.0)
    got = cpp.sigmoid_fused(a, b, s, bias, pos_offset, 0.75, chunk, need_grad)
    want = ref.sigmoid_fused(a, b, s, bias, pos_offset, 0.75, chunk, need_grad)
    mag = _logit_mag(s, bias)
    _close("loss_sum", got[0], want[0], 1e-6 * na * nb)
    if not need_grad:
        assert all(g is None for g in got[1:])
        return
    _check_grads(("grad_a", "grad_b", "grad_scale", "grad_bias"), got[1:], want[1:], na * max(nb, 1) / 4, 0.75, mag)


def _dense_softmax(a, b, scale, bias, pos_offset, w_row, w_col, w_pos):
    """The softmax contract computed densely in float64 (outputs in the contract's dtypes)."""
    dt = a.dtype
    a64, b64 = a.double(), b.double()
    s, bb = float(scale), float(bias)
    logits = s * (a64 @ b64.T) + bb
    na, nb = logits.shape
    row_lse, col_lse = torch.logsumexp(logits, dim=1), torch.logsumexp(logits, dim=0)
    target = torch.zeros_like(logits)
    rows = torch.arange(max(0, min(na, nb - pos_offset)))
    target[rows, rows + pos_offset] = 1.0
    pos_logit = (logits * target).sum(dim=1)
    col_used = torch.full_like(col_lse, float("inf"))
    used = slice(min(pos_offset, nb), min(pos_offset + na, nb))
    col_used[used] = col_lse[used]
    g = w_row * torch.exp(logits - row_lse[:, None]) + w_col * torch.exp(logits - col_used[None, :]) - w_pos * target
    grads = (s * g @ b64, s * g.T @ a64, (g * (a64 @ b64.T)).sum(), g.sum())
    return (row_lse, col_used, pos_logit.to(dt)) + tuple(x.to(dt) for x in grads)


@pytest.mark.parametrize("na,nb,d", [(0, 5, 3), (4, 0, 3), (4, 5, 0)])
def test_empty_dimensions(na, nb, d):
    a, b = torch.randn(na, d), torch.randn(nb, d)
    s, bias = torch.tensor(2.0), torch.tensor(0.5)
    dense = _dense_softmax(a, b, s, bias, 0, 1.0, 1.0, 2.0)
    dense_stats = _dense_softmax(a, b, s, bias, 1, 1.0, 1.0, 2.0)
    dense_stats = (dense_stats[0], torch.logsumexp(s * (a.double() @ b.double().T) + bias, dim=0), dense_stats[2])
    for got, want in [
        (cpp.lse_stats(a, b, s, bias, 1, 2), dense_stats),
        (cpp.softmax_fused(a, b, s, bias, 0, 1.0, 1.0, 2.0, 2, 100), dense),
        (cpp.sigmoid_fused(a, b, s, bias, 0, 1.0, 2, True), ref.sigmoid_fused(a, b, s, bias, 0, 1.0, 2, True)),
    ]:
        for x, y in zip(got, want):
            _close("out", x, y, 1e-5 * max(na, 1) * 4)


def test_float64_matches():
    a, b, s, bias = _inputs(50, 61, 12, dtype=torch.float64)
    got = cpp.softmax_fused(a, b, s, bias, 3, 1.0, 1.0, 2.0, 16, 16 * 61 * 8)
    want = ref.softmax_fused(a, b, s, bias, 3, 1.0, 1.0, 2.0, 16, 16 * 61 * 8)
    for x, y in zip(got, want):
        assert x.dtype == torch.float64
        _close("out", x, y, 1e-10)
    got = cpp.sigmoid_fused(a, b, s, bias, 3, 0.5, 16, True)
    want = ref.sigmoid_fused(a, b, s, bias, 3, 0.5, 16, True)
    for x, y in zip(got, want):
        _close("out", x, y, 1e-10)


def test_lse_ties_and_constant_logits():
    # every logit equal (zero features): each LSE is bias + log(count), from terms that all sit at the max
    a, b = torch.zeros(5, 3), torch.zeros(7, 3)
    s, bias = torch.tensor(4.0), torch.tensor(0.25)
    row_lse, col_lse, _ = cpp.lse_stats(a, b, s, bias, 0, 2)
    torch.testing.assert_close(row_lse, torch.full((5,), 0.25 + math.log(7), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(col_lse, torch.full((7,), 0.25 + math.log(5), dtype=torch.float64), rtol=0, atol=1e-12)
    # repeated rows and columns: ties at the max in several rows of a tile and across chunks / threads
    a0, b0, s, bias = _inputs(6, 5, 4, scale=20.0, bias=1.0)
    a, b = a0.repeat(40, 1), b0.repeat(3, 1)
    got = cpp.softmax_fused(a, b, s, bias, 0, 1.0, 1.0, 2.0, 7, 0)
    want = _dense_softmax(a, b, s, bias, 0, 1.0, 1.0, 2.0)
    for name, x, y in zip(("row_lse", "col_lse"), got[:2], want[:2]):
        _close(name, x, y, 1e-6 * 22)
    _check_grads(("grad_a", "grad_b", "grad_scale", "grad_bias"), got[3:], want[3:], 240, 4.0, 22.0)


# ---------------------------------------------------------------------------------------------------
# float64 LSEs: the precision of a confident row's loss and gradient


def _confident_pairs(spread, n=64, d=32, noise=0.05, seed=0):
    """Unit rows clustered around a common direction (``spread`` sets how far apart), each text the
    image plus 0.05·noise: with scale 100 the margins make per-row losses of ~1e-6 .. 1e-2."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=g, dtype=torch.float64)
    img = torch.nn.functional.normalize(base + spread * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    a, b = img.float(), txt.float()
    s, bias = torch.tensor(100.0), torch.tensor(0.0)
    logits = ((a @ b.T) * s + bias).double()  # the fp32 logits, rounded as the engine forms them
    return a, b, s, bias, logits


@pytest.mark.parametrize("fused", [False, True])
def test_lse_precision_confident_rows(fused):
    a, b, s, bias, logits = _confident_pairs(0.5)
    n = a.shape[0]
    if fused:
        row_lse, col_lse, pos_logit = cpp.softmax_fused(a, b, s, bias, 0, 1.0, 1.0, 2.0, 16, 1 << 30)[:3]
    else:
        row_lse, col_lse, pos_logit = cpp.lse_stats(a, b, s, bias, 0, 16)
    assert row_lse.dtype == col_lse.dtype == torch.float64
    pos = logits.diagonal()
    torch.testing.assert_close(pos_logit.double(), pos, rtol=0, atol=1e-5)
    for name, lse, want_lse in (("row", row_lse, torch.logsumexp(logits, 1)),
                                ("col", col_lse, torch.logsumexp(logits, 0))):
        want = want_lse - pos  # the per-row (per-column) loss term
        got = lse - pos_logit.double()
        sel = (want > 1e-5) & (want < 1e-3)
        assert int(sel.sum()) >= n // 4, f"{name}: too few confident rows to test ({int(sel.sum())})"
        rel = ((got - want).abs() / want)[sel]
        assert rel.max() <= 2e-6, f"{name}: loss term off by {rel.max():.2e} relative"
        # the same LSEs rounded to fp32 lose the term: the test discriminates
        rel32 = ((lse.float().double() - pos_logit.double() - want).abs() / want)[sel]
        assert rel32.max() > 1e-2


@pytest.mark.parametrize("spread", [0.5, 0.75])
def test_softmax_grad_precision_confident(spread):
    a, b, s, bias, logits = _confident_pairs(spread)
    n = a.shape[0]
    row_lse, col_lse = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
    loss = 0.5 * ((row_lse - logits.diagonal()).mean() + (col_lse - logits.diagonal()).mean())
    if spread > 0.6:
        assert 1e-7 < loss < 1e-5  # the regime where an fp32 LSE leaves nothing of P − 1
    g = torch.exp(logits - row_lse[:, None]) + torch.exp(logits - col_lse[None, :])
    g -= 2.0 * torch.eye(n, dtype=torch.float64)
    want_a, want_b = 100.0 * g @ b.double(), 100.0 * g.T @ a.double()
    got = cpp.softmax_grad(a, b, s, bias, row_lse, col_lse, 0, 1.0, 1.0, 2.0, 16)
    fused = cpp.softmax_fused(a, b, s, bias, 0, 1.0, 1.0, 2.0, 16, 1 << 30)
    for name, x, want in (("grad_a", got[0], want_a), ("grad_b", got[1], want_b),
                          ("fused grad_a", fused[3], want_a), ("fused grad_b", fused[4], want_b)):
        err = ((x.double() - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-4, f"{name}: off by {err:.2e} relative to max|expected| (loss {loss:.1e})"


def test_deterministic_and_thread_count():
    a, b, s, bias = _inputs(300, 280, 32)
    run = lambda: cpp.softmax_fused(a, b, s, bias, 0, 1.0, 1.0, 2.0, 64, 1 << 30)  # noqa: E731
    first, second = run(), run()
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(single, first):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------------------
# gradcheck (float64) of small differentiable compositions


class _SoftmaxStats(torch.autograd.Function):
    """Σ row_lse + Σ col_lse[pos cols] − w_pos·Σ pos_logit, gradient from the engine's second pass."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, pos_offset, w_pos, fused):
        na = a.shape[0]
        if fused:
            row_lse, col_lse, pos_logit, *grads = cpp.softmax_fused(
                a, b, scale, bias, pos_offset, 1.0, 1.0, w_pos, 4, 4 * b.shape[0] * 8)
        else:
            row_lse, col_lse, pos_logit = cpp.lse_stats(a, b, scale, bias, pos_offset, 3)
            col_mask = torch.full_like(col_lse, float("inf"))
            col_mask[pos_offset:pos_offset + na] = col_lse[pos_offset:pos_offset + na]
            grads = cpp.softmax_grad(a, b, scale, bias, row_lse, col_mask, pos_offset, 1.0, 1.0, w_pos, 3)
        ctx.save_for_backward(*grads)
        return row_lse.sum() + col_lse[pos_offset:pos_offset + na].sum() - w_pos * pos_logit.sum()

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(g * grad_out for g in ctx.saved_tensors) + (None, None, None)


class _Sigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, pos_offset, w):
        loss, *grads = cpp.sigmoid_fused(a, b, scale, bias, pos_offset, w, 3, True)
        ctx.save_for_backward(*grads)
        return loss * w

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(g * grad_out for g in ctx.saved_tensors) + (None, None)


def _grad_inputs(na, nb, d):
    a, b, s, bias = _inputs(na, nb, d, scale=3.0, bias=-0.5, dtype=torch.float64, seed=7)
    return tuple(t.clone().requires_grad_() for t in (a, b, s, bias))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("na,nb,pos_offset", [(6, 6, 0), (5, 9, 2)])
def test_gradcheck_softmax(fused, na, nb, pos_offset):
    inputs = _grad_inputs(na, nb, 4)
    fn = lambda a, b, s, bias: _SoftmaxStats.apply(a, b, s, bias, pos_offset, 1.5, fused)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("na,nb,pos_offset", [(6, 6, 0), (5, 9, 2), (4, 3, 5)])
def test_gradcheck_sigmoid(na, nb, pos_offset):
    inputs = _grad_inputs(na, nb, 4)
    fn = lambda a, b, s, bias: _Sigmoid.apply(a, b, s, bias, pos_offset, 0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# opcheck and input validation


def _opcheck_cases():
    a, b, s, bias = _inputs(9, 11, 5)
    row_lse, col_lse, _ = ref.lse_stats(a, b, s, bias, 1, 4)
    return [
        ("lse_stats", (a, b, s, bias, 1, 4)),
        ("softmax_grad", (a, b, s, bias, row_lse, col_lse, 1, 1.0, 0.5, 2.0, 4)),
        ("softmax_fused", (a, b, s, bias, 1, 1.0, 1.0, 2.0, 4, 4 * 11 * 4)),
        ("sigmoid_fused", (a, b, s, bias, 1, 1.0, 4, True)),
        ("sigmoid_fused", (a, b, s, bias, 1, 1.0, 4, False)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fastcon, name).default, args)


def test_bad_inputs_raise():
    a, b, s, bias = _inputs(8, 9, 4)
    op = torch.ops.fastcon
    with pytest.raises(RuntimeError, match="2-D"):
        op.lse_stats(a[0], b, s, bias, 0, 4)
    with pytest.raises(RuntimeError, match="same feature dimension"):
        op.lse_stats(a, b[:, :3].contiguous(), s, bias, 0, 4)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        op.lse_stats(a.to(torch.int32), b.to(torch.int32), s, bias, 0, 4)
    with pytest.raises(RuntimeError, match="same dtype"):
        op.lse_stats(a, b.double(), s, bias, 0, 4)
    with pytest.raises(RuntimeError, match="chunk_rows"):
        op.lse_stats(a, b, s, bias, 0, 0)
    with pytest.raises(RuntimeError, match="chunk_rows"):
        op.sigmoid_fused(a, b, s, bias, 0, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        op.softmax_fused(a[:, ::2], b[:, ::2], s, bias, 0, 1.0, 1.0, 2.0, 4, 0)
    with pytest.raises(RuntimeError, match="0-d"):
        op.softmax_fused(a, b, s.reshape(1), bias, 0, 1.0, 1.0, 2.0, 4, 0)
    with pytest.raises(RuntimeError, match="row_lse"):
        op.softmax_grad(a, b, s, bias, torch.zeros(3, dtype=torch.float64), torch.zeros(9, dtype=torch.float64), 0,
                        1.0, 1.0, 2.0, 4)
    with pytest.raises(RuntimeError, match="row_lse must be a float64 tensor"):
        op.softmax_grad(a, b, s, bias, torch.zeros(8), torch.zeros(9, dtype=torch.float64), 0, 1.0, 1.0, 2.0, 4)
    with pytest.raises(RuntimeError, match="col_lse must be a float64 tensor"):
        op.softmax_grad(a, b, s, bias, torch.zeros(8, dtype=torch.float64), torch.zeros(9), 0, 1.0, 1.0, 2.0, 4)
    with pytest.raises(RuntimeError, match="pos_offset"):
        op.sigmoid_fused(a, b, s, bias, -1, 1.0, 4, True)
    assert not math.isnan(float(cpp.lse_stats(a, b, s, bias, 0, 4)[0].sum()))
