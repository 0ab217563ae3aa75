"""Soft targets (distillation) on the Triton backends, in the Triton interpreter: the chunked path
(fastcon/kernels/triton/target.py: the teacher's tile beside the student's in both epilogues) with
each producer of the student's tiles (its cuBLAS chunks; "triton-matmul": formed with tl.dot in the
epilogue kernels), and the fused tile kernels (fastcon/kernels/triton/fused_target.py: the student's tiles
formed with tl.dot, G in registers). The teacher's tiles are read from its cuBLAS chunks on every
path. FC.distill_loss on each against the float64 reference, and each one's two passes against
torch_chunked's on soft targets with dropped pairs, smoothing and the hardness penalty."""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from fastcon import targets as T
from fastcon.kernels import torch_chunked
from helpers import assert_close_rel, make_features
from test_soft_targets import _check

pytestmark = pytest.mark.interpreter


@pytest.fixture(params=["triton", "triton-matmul", "triton_fused"])
def backend(request, monkeypatch):
    """The backend name to call: "triton-matmul" is backend="triton" on the matmul producer."""
    if request.param == "triton-matmul":
        monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
        return "triton"
    return request.param


def _impl(backend):
    """The module of a Triton backend's general target: its target_stats, target_grad and
    target_softmax_fused."""
    from fastcon.kernels.triton import fused, target

    return {"triton": target, "triton_fused": fused}[backend]


@pytest.mark.parametrize("kind,kw", [("clip", {}), ("hycd", {}), ("hycd", dict(alpha=0.2, temperature=0.4)),
                                     ("hycd", dict(alpha=1.0)), ("cwcl", {})])
@pytest.mark.parametrize("n,d,chunk", [(1, 4, None), (37, 16, 5)])
def test_distill_loss_triton_against_reference(kind, kw, n, d, chunk, backend):
    x, y = make_features(n, n, d)
    tx, ty = make_features(n, n, d, seed=4)
    s = torch.tensor(14.3)
    rtol, atol = 2e-5, 2e-6  # as tests/test_soft_targets.py in fp32
    if kind == "hycd":  # the logit scales are not used by this kind
        _check(lambda a, b: FC.distill_loss(a, b, 99.0, tx, ty, 7.0, kind=kind, chunk_size=chunk, backend=backend,
                                            **kw),
               lambda a, b: R.distill_loss_reference(a, b, 99.0, tx.double(), ty.double(), 7.0, kind=kind, **kw),
               [x, y], rtol=rtol, atol=atol)
        return
    _check(lambda a, b, c: FC.distill_loss(a, b, c, tx, ty, 20.0, kind=kind, chunk_size=chunk, backend=backend, **kw),
           lambda a, b, c: R.distill_loss_reference(a, b, c, tx.double(), ty.double(), 20.0, kind=kind, **kw),
           [x, y, s], rtol=rtol, atol=atol)


def test_distill_loss_triton_confident_teacher_and_uneven_chunks(backend):
    """A teacher sure of the diagonal (Q ≈ 1 there) and chunks that split the rows unevenly."""
    x, y = make_features(40, 40, 8, seed=2)
    _check(lambda a, b, c: FC.distill_loss(a, b, c, x, y, 80.0, kind="clip", chunk_size=16, backend=backend),
           lambda a, b, c: R.distill_loss_reference(a, b, c, x.double(), y.double(), 80.0, kind="clip"),
           [x, y, torch.tensor(30.0)], rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------------------------------
# The two passes against torch_chunked's on soft targets with dropped pairs

def _soft_target(n, kind, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    ta, tb = make_features(n, n, 6, seed=seed + 7)
    labels = torch.arange(n) % (n // 3 if case == "labels" else n)
    fields = dict(row_ids=labels, col_ids=labels)
    if kind == "softmax":
        fields.update(teacher=T.Teacher(ta, tb, torch.tensor(9.0)), soft=0.4,
                      hard=0.6 if case != "labels" else None, entropy=True)
    else:  # a linear teacher with an eps large enough that the rows' mass is visibly below 1
        fields.update(teacher=T.Teacher(ta, tb, kind=T.TEACHER_LINEAR, c0=0.5, c1=0.5, eps=0.5), soft=1.0,
                      hard=0.0)
    excl = torch.randint(0, n, (n,), generator=g)
    excl[labels[excl] == labels] = -1  # never one of the row's positives
    excl[::5] = -1
    fields.update(exclude_col=excl)
    # dropped columns where the hard targets need no positive (a linear teacher's here have no hard
    # weight); not with smoothing in both directions, where torch_chunked's column counts of a
    # col_keep-only chunk are wrong (its keep mask is one broadcast row)
    if kind == "linear" and case != "labels":
        fields.update(col_keep=torch.rand(n, generator=g) > 0.25)
    if case == "penalty":
        fields.update(penalty=2.0, penalty_cols=torch.rand(n, generator=g) > 0.5)
    return T.Target(**fields)


def _close(got, want, *, rtol, atol=0.0, name):
    """Equal where infinite (a row or column with no kept pair), close elsewhere."""
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(got[~finite].double(), want[~finite].double()), name
    assert_close_rel(got[finite], want[finite], rtol=rtol, atol=atol, name=name)


def _passes(impl, a, b, scale, bias, target, eps, symmetric, chunk, teacher, weights=None):
    st, cached = impl.target_stats(a, b, scale, bias, target, symmetric, bool(eps), chunk, 1 << 20, teacher)
    if weights is None:
        return st
    return impl.target_grad(a, b, scale, bias, target, weights, chunk, cached)


@pytest.mark.parametrize("kind", ["softmax", "linear"])
@pytest.mark.parametrize("case,symmetric,eps", [("exclude", True, 0.0), ("labels", True, 0.1), ("penalty", False, 0.0),
                                                ("exclude", False, 0.1)])
def test_soft_target_passes_match_torch(kind, case, symmetric, eps, backend):
    TT = _impl(backend)
    n, d, chunk = 30, 8, 7
    a, b = make_features(n, n, d, seed=3)
    scale, bias = torch.tensor(12.0), torch.tensor(-1.5)
    target = _soft_target(n, kind, case)
    teacher = T.teacher_norms(target, T.teacher_stats(torch_chunked.target_stats, target, symmetric, chunk), symmetric)
    mine = T.teacher_norms(target, T.teacher_stats(TT.target_stats, target, symmetric, chunk), symmetric)
    _close(mine.row_norm, teacher.row_norm, rtol=1e-6, name="teacher row norm")
    if symmetric:
        _close(mine.col_norm, teacher.col_norm, rtol=1e-6, name="teacher col norm")
    st_t = _passes(torch_chunked, a, b, scale, bias, target, eps, symmetric, chunk, teacher)
    st_m = _passes(TT, a, b, scale, bias, target, eps, symmetric, chunk, teacher)
    fields = ["row_lse", "row_sum_pos", "cross_row"] + (["ent_row"] if target.entropy else [])
    if symmetric:
        fields += ["col_lse", "col_sum_pos", "cross_col"] + (["ent_col"] if target.entropy else [])
    for f in fields:
        _close(getattr(st_m, f), getattr(st_t, f), rtol=2e-6, atol=1e-6, name=f)
    assert torch.equal(st_m.row_pos, st_t.row_pos.float()) and torch.equal(st_m.t_row_norm, st_t.t_row_norm)
    loss_t, weights = T.loss_and_weights(target, st_t, eps, symmetric, torch.float32)
    loss_m, _ = T.loss_and_weights(target, st_m, eps, symmetric, torch.float32)
    assert_close_rel(loss_m, loss_t, rtol=2e-6, atol=1e-6, name="loss")
    if kind == "linear":
        assert weights.row_mass is not None and float((1 - weights.row_mass).abs().min()) > 1e-3
    got = _passes(TT, a, b, scale, bias, target, eps, symmetric, chunk, teacher, weights)
    want = _passes(torch_chunked, a, b, scale, bias, target, eps, symmetric, chunk, teacher, weights)
    # Σ G·dot and Σ G add n² fp32 terms of |G| <= 2/n, each rounded once, in the backend's own order:
    # their error budget is about n²·2⁻²⁴·(2/n) (they cancel to ~0 here, so no relative bound holds)
    budget = 2 * n * 2.0 ** -24
    for name, g, w in zip(["grad a", "grad b", "grad scale", "grad bias"], got, want):
        assert_close_rel(g, w, rtol=1e-5, atol=1e-7 if g.dim() else budget, name=name)


def test_soft_target_grad_through_the_engine_matches_torch(backend):
    """The whole loss of a soft target with dropped pairs (two_pass_target) on both backends, fp32."""
    TT = _impl(backend)

    n = 24
    a, b = make_features(n, n, 8, seed=5)
    scale, bias = torch.tensor(20.0), torch.tensor(0.0)
    target = _soft_target(n, "softmax", "exclude", seed=1)
    out_t = torch_chunked.target_softmax_fused(a, b, scale, bias, target, 0.05, True, 5, True)
    out_m = TT.target_softmax_fused(a, b, scale, bias, target, 0.05, True, 5, True)
    for name, g, w in zip(["loss", "grad a", "grad b", "grad scale", "grad bias"], out_m, out_t):
        assert_close_rel(g, w, rtol=1e-5, atol=1e-7, name=name)
