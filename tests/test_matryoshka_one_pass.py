"""Matryoshka prefixes in one pass over D (``fastcon.ops.target_prefix_engine_loss``, the
``target_prefix_stats``/``target_prefix_grad`` operations of the torch and C++ backends):

* the engine operator against an independent float64 statement, ``Σ_k w_k·L_k`` of one
  ``target_engine_loss`` call per prefix on the explicitly scaled prefixes
  ``A[:, :d_k]·r_k`` and ``B[:, :d_k]·c_k``: the loss and the gradients of all six inputs (a, b,
  scale, bias, row_scale, col_scale), for every option of the general target (ids, shared labels,
  smoothing, excluded columns, column masks, column ranges, row groups, the hardness penalty, the
  margin rule on the student's and on a guide's similarities, the debiased loss, a dense mask),
  prefixes with and without the full D, zero and negative prefix weights, odd sizes and small chunks;
* exactly zero gradient on the feature columns past the largest prefix;
* that the C++ backend runs the prefixes in one pass (each prefix operation called once, the
  per-call target passes never);
* ``multiple_negatives_ranking_loss(matryoshka_dims=...)`` on torch and cpp against
  ``backend="reference"`` (the per-prefix float64 reference), cos and dot, hard negatives and
  directions;
* soft targets with prefixes are a ValueError;
* the C++ backend's peak memory at N = 4096 (no N×N allocation);
* every distributed form of CLIP (local, global, labels, pair mask, debiased; with and without the
  gathered features' gradient) and SigLIP's ring over 2 gloo ranks against the per-prefix sum of
  the same distributed loss, each in one pass.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcon.functional as FC
from fastcon.kernels import contract
from fastcon.ops import target_engine_loss
from fastcon.ops import target_prefix_engine_loss
from fastcon.targets import TEACHER_GUIDE, Target, Teacher
from helpers import assert_close_rel, make_features

BACKENDS = ["torch", "cpp"]
D = 24
DIMS_WEIGHTS = [
    ((24, 13, 5), (1.0, 0.5, 2.0)),   # the full D is a prefix
    ((20, 7, 1), (1.0, 0.5, 2.0)),    # features past d_1 unused; a one-feature prefix
    ((24, 9, 2), (0.0, -0.5, 1.5)),   # a zero and a negative weight
]


# ---------------------------------------------------------------------------------------------------
# Targets: each builder takes (na, nb, a, b, dtype) and returns the target (guide features in dtype)

def _ids(na, nb):
    """Row i's positive is column i; columns past Na are negatives of every row."""
    return torch.arange(na), torch.cat([torch.arange(na), torch.full((nb - na,), -1)])


def _plain(na, nb, a, b, dtype):
    return Target(*_ids(na, nb))


def _shared(na, nb, a, b, dtype):
    ids = torch.arange(na) % 5  # several positives per row and per column
    return Target(ids, ids)


def _exclude_col(na, nb, a, b, dtype):
    exclude = (torch.arange(na) + 3) % nb
    exclude[::4] = -1
    return Target(*_ids(na, nb), exclude_col=exclude)


def _col_keep(na, nb, a, b, dtype):
    ids = torch.arange(na) % 7
    keep = torch.ones(nb, dtype=torch.bool)
    keep[[3, 10, 17, 20]] = False  # class 3 keeps its positive at column 24
    return Target(ids, ids, col_keep=keep)


def _col_range(na, nb, a, b, dtype):
    i = torch.arange(na)
    lo = (i // 4) * 3
    lo = torch.minimum(lo, i)
    hi = torch.clamp(i + 2 + i % 5, max=nb)
    return Target(*_ids(na, nb), col_range=torch.stack([lo, hi], dim=1).contiguous())


def _row_group(na, nb, a, b, dtype):
    m = na // 2  # rows m + i join row i's softmax (a joint partition of two stacked products)
    row_ids = torch.cat([torch.arange(m), torch.full((na - m,), -1)])
    col_ids = torch.cat([torch.arange(m), torch.full((nb - m,), -1)])
    return Target(row_ids, col_ids, row_group=torch.arange(m).repeat(2))


def _penalty(na, nb, a, b, dtype):
    return Target(*_ids(na, nb), penalty=3.0, penalty_cols=torch.arange(nb) % 3 != 0,
                  penalty_rows=torch.arange(na) % 4 != 1)


def _margin(na, nb, a, b, dtype):
    return Target(*_ids(na, nb), margin=0.02)


def _margin_relative(na, nb, a, b, dtype):
    return Target(*_ids(na, nb), margin=0.1, margin_relative=True)


def _guide(na, nb, a, b, dtype):
    """GISTEmbed's guide: a noisy linear map of the features decides the margin rule (the same pairs
    are dropped at every prefix)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(D, 10, generator=g, dtype=torch.float64)
    ga = F.normalize(a.double() @ w + 0.3 * torch.randn(na, 10, generator=g, dtype=torch.float64), dim=-1)
    gb = F.normalize(b.double() @ w, dim=-1)
    return Target(*_ids(na, nb), margin=0.05, teacher=Teacher(ga.to(dtype), gb.to(dtype), kind=TEACHER_GUIDE))


def _debias(na, nb, a, b, dtype):
    ids = torch.arange(na)
    return Target(ids, ids, debias=0.2)


def _mask(na, nb, a, b, dtype):
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(na, nb, generator=g) > 0.3
    mask |= torch.eye(na, nb, dtype=torch.bool)
    return Target(*_ids(na, nb), mask=mask)


# name: (builder, Na, Nb, symmetric, label_smoothing, with a bias, chunk_size)
CASES = {
    "ids-symmetric": (_plain, 19, 23, True, 0.0, True, 7),
    "ids-rows": (_plain, 19, 23, False, 0.0, True, 7),
    "shared-labels": (_shared, 30, 30, True, 0.0, True, 7),
    "smoothing": (_shared, 30, 30, True, 0.1, True, 7),
    "exclude-col": (_exclude_col, 25, 25, True, 0.0, True, 6),
    "col-keep": (_col_keep, 28, 28, True, 0.0, True, 7),
    "col-range": (_col_range, 19, 23, False, 0.0, True, 5),
    "row-group": (_row_group, 24, 23, False, 0.0, True, 7),
    "penalty": (_penalty, 19, 23, False, 0.0, True, 7),
    "margin": (_margin, 19, 23, False, 0.0, True, 7),
    "margin-relative": (_margin_relative, 19, 23, False, 0.1, True, 7),
    "guide": (_guide, 19, 23, False, 0.0, True, 7),
    "debias": (_debias, 24, 24, True, 0.0, False, 7),
    "mask": (_mask, 19, 23, True, 0.0, True, None),
}


def _inputs(na, nb, dims, seed):
    """fp32 features (unit over the full D, so that prefixes have norms below 1), the logit scale and
    bias, and random row and column scales in [0.5, 2]."""
    a, b = make_features(na, nb, D, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    rs = 0.5 + 1.5 * torch.rand(na, len(dims), generator=g)
    cs = 0.5 + 1.5 * torch.rand(nb, len(dims), generator=g)
    return a, b, torch.tensor(9.0), torch.tensor(-0.7), rs, cs


def _per_prefix(a, b, scale, bias, rs, cs, target, dims, weights, **kw):
    """The independent statement: ``Σ_k w_k·L_k``, one engine call per prefix on the scaled prefixes."""
    total = 0.0
    for k, (d, w) in enumerate(zip(dims, weights)):
        x, y = a[:, :d] * rs[:, k:k + 1], b[:, :d] * cs[:, k:k + 1]
        total = total + w * target_engine_loss(x, y, scale, bias, target, backend="torch", **kw)
    return total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims,weights", DIMS_WEIGHTS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("case", list(CASES))
def test_engine_against_per_prefix_calls(case, dims, weights, backend):
    _check_engine(case, dims, weights, backend)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_triton_engine_against_per_prefix_calls(case):
    """The Triton backends' prefix passes (cuBLAS chunks accumulated over D, the general target's
    Triton epilogues on each prefix's tile) on the interpreter; triton_fused shares them."""
    _check_engine(case, *DIMS_WEIGHTS[1], "triton" if case != "guide" else "triton_fused")


def _check_engine(case, dims, weights, backend):
    build, na, nb, symmetric, eps, with_bias, chunk = CASES[case]
    a, b, scale, bias, rs, cs = _inputs(na, nb, dims, seed=na + nb)
    tensors = [a, b, scale, bias, rs, cs] if with_bias else [a, b, scale, rs, cs]
    ours = [t.detach().clone().requires_grad_() for t in tensors]
    truth = [t.detach().double().requires_grad_() for t in tensors]
    if not with_bias:
        ours.insert(3, None)
        truth.insert(3, None)
    kw = dict(label_smoothing=eps, symmetric=symmetric)
    out = target_prefix_engine_loss(*ours, build(na, nb, a, b, torch.float32), dims, weights, backend=backend,
                                    chunk_size=chunk, **kw)
    target64 = build(na, nb, a, b, torch.float64)
    expected = _per_prefix(*truth, target64, dims, weights, **kw)
    if target64.margin is not None:  # the rule drops pairs: without it the loss is another
        plain = _per_prefix(*[t.detach() if t is not None else None for t in truth],
                            target64._replace(margin=None, teacher=None), dims, weights, **kw)
        assert abs(plain.item() - expected.item()) > 1e-3 * abs(expected.item())
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close_rel(out, expected, rtol=2e-5, atol=1e-6, name="loss")
    leaves = [t for t in ours if t is not None]
    grads = torch.autograd.grad(out, leaves)
    expected_grads = torch.autograd.grad(expected, [t for t in truth if t is not None])
    names = ["a", "b", "scale"] + (["bias"] if with_bias else []) + ["row_scale", "col_scale"]
    for name, t, g, e in zip(names, leaves, grads, expected_grads):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close_rel(g, e, rtol=2e-5, atol=1e-6, name=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_past_the_largest_prefix(backend):
    """With d_1 < D the features past d_1 take no part in any logit: their gradient is exactly 0, on
    the engine and through MNRL's prefix norms."""
    dims, weights = (17, 6, 2), (1.0, 0.5, 2.0)
    a, b, scale, bias, rs, cs = _inputs(19, 23, dims, seed=5)
    a, b = a.requires_grad_(), b.requires_grad_()
    target_prefix_engine_loss(a, b, scale, bias, rs, cs, _plain(19, 23, a, b, torch.float32), dims, weights,
                              symmetric=False, backend=backend, chunk_size=7).backward()
    for x in (a, b):
        assert bool((x.grad[:, dims[0]:] == 0).all()) and bool((x.grad[:, :dims[0]] != 0).any())
    q, p = make_features(16, 16, D, seed=6)
    q, p = q.requires_grad_(), p.requires_grad_()
    FC.multiple_negatives_ranking_loss(q, [p], directions=("query_to_doc", "doc_to_query"), matryoshka_dims=dims,
                                       matryoshka_weights=weights, backend=backend, chunk_size=5).backward()
    for x in (q, p):
        assert bool((x.grad[:, dims[0]:] == 0).all()) and bool((x.grad[:, :dims[0]] != 0).any())


def _counting(module, name, calls):
    """``module.name`` counting its calls in ``calls[name]``."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return real(*args, **kwargs)
    return wrapper


def test_cpp_runs_the_prefixes_in_one_pass(monkeypatch):
    """A Matryoshka MNRL on the C++ backend, forward and backward, is one call of each prefix pass
    (all K prefixes inside; the operator forms its gradients with the loss), and no per-prefix call of
    the plain target passes."""
    from fastcon.kernels import cpp

    calls = {}

    for name in ("target_prefix_stats", "target_prefix_grad", "target_stats", "target_grad"):
        monkeypatch.setattr(cpp, name, _counting(cpp, name, calls))
    contract.backend.cache_clear()  # the operations are looked up once per backend name
    try:
        q, p = make_features(21, 21, D, seed=8)
        n = make_features(21, 21, D, seed=9)[1]
        leaves = [t.requires_grad_() for t in (q, p, n)]
        loss = FC.multiple_negatives_ranking_loss(leaves[0], leaves[1:], directions=("query_to_doc", "doc_to_query"),
                                                  matryoshka_dims=(24, 12, 6, 3), backend="cpp", chunk_size=8)
        loss.backward()
    finally:
        contract.backend.cache_clear()
    assert calls == {"target_prefix_stats": 1, "target_prefix_grad": 1}
    assert all(t.grad is not None for t in leaves)


def _short(directions):
    """query_to_doc + doc_to_query -> "qd+dq" (test ids)."""
    return "+".join(x[0] + x.split("_")[-1][0] for x in directions)


MNRL_DIRECTIONS = [("query_to_doc",), ("query_to_doc", "doc_to_query"), ("query_to_doc", "query_to_query"),
                   ("query_to_doc", "doc_to_query", "query_to_query", "doc_to_doc")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("directions", MNRL_DIRECTIONS, ids=_short)
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-11, 1e-14), (torch.float32, 2e-5, 1e-6)],
                         ids=["f64", "f32"])
def test_mnrl_against_the_per_prefix_reference(backend, similarity, directions, dtype, rtol, atol):
    """The one-pass MNRL (queries, positives and one hard negative per query) against
    ``backend="reference"``, which sums the materialised float64 reference over the prefixes."""
    b = 13
    g = torch.Generator().manual_seed(len(directions))
    q = torch.randn(b, D, generator=g, dtype=torch.float64)
    docs = [q + torch.randn(b, D, generator=g, dtype=torch.float64) for _ in range(2)]
    kw = dict(scale=20.0 if similarity == "cos" else 0.4, similarity=similarity, directions=directions,
              matryoshka_dims=(20, 11, 4), matryoshka_weights=(1.0, 0.5, 2.0))
    ours = [t.to(dtype).requires_grad_() for t in [q] + docs]
    truth = [t.clone().requires_grad_() for t in [q] + docs]
    out = FC.multiple_negatives_ranking_loss(ours[0], ours[1:], backend=backend, chunk_size=6, **kw)
    expected = FC.multiple_negatives_ranking_loss(truth[0], truth[1:], backend="reference", **kw)
    assert out.dtype == dtype and out.shape == ()
    assert_close_rel(out, expected, rtol=rtol, atol=atol, name="loss")
    names = ["queries", "positives", "negatives"]
    for name, gr, e in zip(names, torch.autograd.grad(out, ours), torch.autograd.grad(expected, truth)):
        assert_close_rel(gr, e, rtol=rtol, atol=atol, name=f"grad of {name}")


def _against_reference(fn, tensors, backend, rtol=2e-5, atol=1e-6):
    """``fn(*leaves, backend)`` on fp32 leaves (the one pass) against ``fn(*float64 leaves,
    "reference")`` (the per-prefix reference): the loss and the gradient of every leaf."""
    ours = [t.float().requires_grad_() for t in tensors]
    truth = [t.double().requires_grad_() for t in tensors]
    out, expected = fn(*ours, backend), fn(*truth, "reference")
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close_rel(out, expected, rtol=rtol, atol=atol, name="loss")
    for k, (gr, e) in enumerate(zip(torch.autograd.grad(out, ours), torch.autograd.grad(expected, truth))):
        assert_close_rel(gr, e, rtol=rtol, atol=atol, name=f"grad of input {k}")


CLIP_OPTIONS = {
    "plain": dict(),
    "bias+smoothing": dict(bias=True, label_smoothing=0.1),
    "labels": dict(labels=True),
    "debias": dict(debias=0.1),
    "rectangular": dict(pos_offset=4),
}


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("option", list(CLIP_OPTIONS))
def test_clip_and_siglip_against_the_per_prefix_reference(option, backend):
    """CLIP (the general target, both directions) and SigLIP (sigmoid_prefix_fused) over prefixes in one
    pass against the reference summed over the prefixes, with the scale's and the bias's gradients."""
    opt = dict(CLIP_OPTIONS[option])
    a, b = make_features(17, 17 + opt.get("pos_offset", 0), D, seed=13, paired=False)
    s, bias = torch.tensor(12.0), torch.tensor(-3.0)
    kw = dict(matryoshka_dims=(24, 11, 3), matryoshka_weights=(1.0, 0.25, 2.0), chunk_size=5)
    if opt.pop("labels", False):
        opt["labels"] = torch.arange(17) % 4
    with_bias = opt.pop("bias", False)
    leaves = [a, b, s] + ([bias] if with_bias else [])
    _against_reference(lambda *t: FC.clip_loss(*t[:-1], backend=t[-1], **opt, **kw), leaves, backend)
    if option in ("plain", "rectangular"):
        sig = dict(pos_offset=opt.get("pos_offset", 0))
        _against_reference(lambda *t: FC.siglip_loss(*t[:-1], backend=t[-1], **sig, **kw), [a, b, s, bias], backend)
        _against_reference(lambda *t: FC.siglip_loss(*t[:-1], backend=t[-1], negative_only=True, **kw),
                           [a, b, s, bias], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("contrast", [(True, True), (False, True), (True, False)], ids=["both", "pos", "anchors"])
def test_gist_against_the_per_prefix_reference(contrast, backend):
    """GISTEmbed over the student's prefixes in one pass (the guide's tile once per chunk for every
    prefix, the guide's embeddings whole) against the reference summed over the prefixes."""
    a, p = make_features(15, 15, D, seed=14)
    n = make_features(15, 15, D, seed=15)[1].reshape(15, 1, D)
    ga, gp = make_features(15, 15, 10, seed=16)
    gn = make_features(15, 15, 10, seed=17)[1].reshape(15, 1, 10)
    ca, cp = contrast

    def loss(x, y, z, be):
        cast = (lambda t: t.to(x.dtype))  # noqa: E731 (the guide in the student's dtype)
        return FC.gist_loss(x, y, cast(ga), cast(gp), negatives=z, guide_negatives=cast(gn), margin=0.05,
                            contrast_anchors=ca, contrast_positives=cp, temperature=0.05,
                            matryoshka_dims=(20, 9, 4), matryoshka_weights=(1.0, 2.0, 0.5), backend=be,
                            chunk_size=7)

    _against_reference(loss, [a, p, n], backend)


def test_cpp_runs_siglip_prefixes_in_one_pass(monkeypatch):
    """A Matryoshka SigLIP on the C++ backend is one call of sigmoid_prefix_fused, none of sigmoid_fused."""
    from fastcon.kernels import cpp

    calls = []
    for name in ("sigmoid_prefix_fused", "sigmoid_fused"):
        real = getattr(cpp, name)
        monkeypatch.setattr(cpp, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    contract.backend.cache_clear()
    try:
        a, b = make_features(40, 40, D, seed=18)
        FC.siglip_loss(a.requires_grad_(), b, 10.0, -10.0, matryoshka_dims=(24, 8), backend="cpp").backward()
    finally:
        contract.backend.cache_clear()
    assert calls == ["sigmoid_prefix_fused"] and a.grad is not None


def test_soft_targets_with_prefixes_are_an_error():
    dims = (24, 8)
    a, b, scale, bias, rs, cs = _inputs(12, 12, dims, seed=11)
    tx, ty = make_features(12, 12, 6, seed=12)
    ids = torch.arange(12)
    target = Target(ids, ids, teacher=Teacher(tx, ty, torch.tensor(25.0)), soft=0.5)
    with pytest.raises(ValueError, match="soft targets"):
        target_prefix_engine_loss(a.requires_grad_(), b, scale, bias, rs, cs, target, dims, (1.0, 1.0),
                                  backend="torch")


_PEAK = r"""
import torch
torch.set_num_threads(2)
import fastcon.functional as FC
from fastcon.bench.measure import rss_bytes

n, d, dims = 4096, 256, (256, 128, 64, 32)
g = torch.Generator().manual_seed(0)
# a small call first: loading the extension and the first GEMMs are not the loss's memory
x = torch.randn(64, d, generator=g, requires_grad=True)
FC.multiple_negatives_ranking_loss(x, [x.detach() + 1], matryoshka_dims=dims, backend="cpp").backward()
q = torch.randn(n, d, generator=g).requires_grad_()
p = torch.randn(n, d, generator=g).requires_grad_()
resident = rss_bytes("VmRSS")
FC.multiple_negatives_ranking_loss(q, [p], matryoshka_dims=dims, backend="cpp").backward()
print(rss_bytes("VmHWM") - resident)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS/VmHWM from /proc/self/status")
def test_cpp_peak_memory_holds_chunks_not_the_logits():
    """MNRL with K = 4 prefixes at N = 4096, D = 256 on the C++ backend, 16 MiB chunks: nothing of
    size N×N (64 MiB at fp32) is allocated, and the K prefixes share one chunk budget. The ops layer
    gives prefix calls chunk_bytes/(4·N)/(K+1) rows, so pass 2's accumulator plus its K G tiles are at
    most chunk_bytes (pass 1's accumulator, scaled tile and K logits buffers, (K+2)/(K+1) of it, come
    before the gradients exist). While pass 2 runs, the wide fp32 gradients of queries and docs
    (2·N·D·4) and the stacked columns (a copy of the docs, N·D·4) are alive, and the (N, K) scales and
    their gradients beside them. Bound: chunk_bytes + 3·N·D·4 + 4·N·K·4 + 16 MiB for BLAS, OpenMP and
    the allocator (44 MiB; about 33 MiB measured). glibc's mmap threshold is pinned so that freed
    blocks go back at once: with its dynamic threshold the resident set also holds freed heap blocks,
    depending on the order of allocations rather than on what is alive."""
    chunk, n, d, k = 16 << 20, 4096, 256, 4
    env = dict(os.environ, FASTCON_CHUNK_BYTES=str(chunk), MALLOC_MMAP_THRESHOLD_=str(128 << 10))
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True, env=env)
    peak = int(out.stdout)
    bound = chunk + 3 * n * d * 4 + 4 * n * k * 4 + (16 << 20)
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB above the resident set, bound {bound / 2**20:.1f} MiB"
    assert peak < n * n * 4, f"peak {peak / 2**20:.1f} MiB: as much as an N×N fp32 matrix"


_DIST_MODES = {  # name: (loss, its keyword arguments, does it take logit_bias)
    "clip local": ("clip", dict(local_loss=True, label_smoothing=0.1), False),
    "clip local, gathered with grad": ("clip", dict(local_loss=True, gather_with_grad=True, label_smoothing=0.1),
                                       False),
    "clip global": ("clip", dict(label_smoothing=0.1), False),  # (a bias: zero gradient up to rounding)
    "clip global, gathered with grad": ("clip", dict(gather_with_grad=True), False),
    "clip labels, pair mask": ("clip", dict(labels=True, pair_mask=True, label_smoothing=0.05), False),
    "clip labels, local": ("clip", dict(labels=True, local_loss=True), False),
    "clip debiased": ("clip", dict(debias=0.1), False),
    "siglip ring": ("siglip", {}, True),
}


def _dist_worker(rank, world, port, out):
    """Every distributed form of CLIP and SigLIP over Matryoshka prefixes in one pass against the
    per-prefix sum of the same distributed loss on explicitly normalised prefixes: the loss and the
    gradients of the features, the logit scale and the bias, each rank's loss weighted by its own
    upstream gradient (rank + 1). Counts the C++ prefix passes each one-pass loss calls."""
    import torch.distributed as dist

    from helpers import close_gloo

    from fastcon.kernels import cpp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = {}

    for name in ("target_prefix_stats", "sigmoid_prefix_fused"):
        setattr(cpp, name, _counting(cpp, name, calls))
    contract.backend.cache_clear()
    try:
        dims, weights = (24, 10, 3), (1.0, 0.5, 2.0)
        n = 6
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
        labels = torch.tensor([0, 1, 1, 2, 3, 0]) + 10 * rank  # shared within the rank
        mask = torch.rand(world * n, world * n, generator=torch.Generator().manual_seed(7)) > 0.2
        mask.fill_diagonal_(True)
        res = {}
        for mode, (loss_name, kw, with_bias) in _DIST_MODES.items():
            kw = dict(kw, process_group=dist.group.WORLD, backend="cpp")
            kw.update(labels=labels if kw.get("labels") else None, pair_mask=mask if kw.get("pair_mask") else None)
            fn = FC.clip_loss if loss_name == "clip" else FC.siglip_loss
            if loss_name == "siglip":
                kw.pop("labels"), kw.pop("pair_mask")
            runs, counted = [], None
            for one in (True, False):
                leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(8.0, requires_grad=True)]
                if with_bias:
                    leaves.append(torch.tensor(-3.0, requires_grad=True))
                before = sum(calls.values())
                if one:
                    loss = fn(*leaves, matryoshka_dims=dims, matryoshka_weights=weights, **kw)
                else:
                    loss = sum(w * fn(F.normalize(leaves[0][:, :d], dim=1), F.normalize(leaves[1][:, :d], dim=1),
                                      *leaves[2:], **kw) for d, w in zip(dims, weights))
                grads = torch.autograd.grad(loss * (rank + 1), leaves)
                counted = counted if not one else sum(calls.values()) - before
                runs.append([loss.detach()] + list(grads))
            res[mode] = (max(((p - q).abs().max() / q.abs().max().clamp_min(1e-6)).item() for p, q in zip(*runs)),
                         counted)
        out.put((rank, res))
    except Exception as exc:  # reported to the test, which fails on it
        import traceback

        out.put((rank, {"error": traceback.format_exc()}))
    finally:
        close_gloo()


def test_distributed_clip_and_siglip_in_one_pass():
    """Over 2 gloo ranks on the C++ backend: each distributed form runs its prefixes in one pass (the
    local loss one stats pass per half, the global forms one, the SigLIP ring one per step of the ring
    and one more lap for the text shards' gradient, as the ranks' upstream gradients differ) and
    equals the per-prefix sum."""
    from helpers import run_gloo

    expected_calls = {"clip local": 2, "clip local, gathered with grad": 2, "clip global": 1,
                      "clip global, gathered with grad": 1, "clip labels, pair mask": 1, "clip labels, local": 2,
                      "clip debiased": 1, "siglip ring": 4}
    for rank, res in run_gloo(_dist_worker, 2, timeout=300).items():
        assert "error" not in res, (rank, res["error"])
        for mode, (err, calls) in res.items():
            assert calls == expected_calls[mode], (rank, mode, calls)
            assert err < 2e-5, (rank, mode, err)
