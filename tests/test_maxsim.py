"""MaxSim (ColBERT/ColPali, docs/losses.md §3.4) on every backend of the token-level engine against the
materialised B_q×n_q×B_d×n_d reference in float64: ragged query and document padding, negative
similarities, extra negative documents of another length, a scale that requires grad, exact ties (the
gradient to the lowest document token), loss and every gradient; and against PyLate's own scores."""
import importlib.util
import os
import sys
import types

import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from fastcon.kernels import cpp
from helpers import assert_close_rel, assert_compiles_like_eager, assert_grads_within_fp32_formula, winner_token_case

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter), "auto"]


def _tokens(b, n, d, g, dtype):
    return torch.nn.functional.normalize(torch.randn(b, n, d, generator=g, dtype=dtype), dim=-1)


def _mask(b, n, g):
    return torch.arange(n)[None, :] < torch.randint(1, n + 1, (b,), generator=g)[:, None]


def _data(bq, nq, nd, d, *, m=0, nn=0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, docs = _tokens(bq, nq, d, g, dtype), _tokens(bq, nd, d, g, dtype)
    qm, dm = _mask(bq, nq, g), _mask(bq, nd, g)
    neg = _tokens(m, nn, d, g, dtype) if m else None
    nm = _mask(m, nn, g) if m else None
    return q, docs, qm, dm, neg, nm


# the Triton interpreter runs fp32 only (float64 there is a TypeError, tests/test_filip.py)
BACKEND_DTYPES = [(b, t) for b in ("torch", "cpp", "auto") for t in (torch.float64, torch.float32)] + [
    pytest.param("triton", torch.float32, marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("bq,nq,nd,d,m,nn,chunk", [(1, 3, 5, 4, 0, 0, None), (6, 7, 12, 8, 3, 9, 4),
                                                   (5, 4, 70, 16, 2, 70, None)])
def test_maxsim_loss_against_reference(backend, dtype, bq, nq, nd, d, m, nn, chunk):
    q, docs, qm, dm, neg, nm = _data(bq, nq, nd, d, m=m, nn=nn, dtype=dtype)
    rtol = 1e-11 if dtype == torch.float64 else 2e-5
    scale = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    leaves = [q.clone().requires_grad_(), docs.clone().requires_grad_(), scale]
    truth = [q.double().requires_grad_(), docs.double().requires_grad_(), scale.detach().double().requires_grad_()]
    if m:
        leaves.append(neg.clone().requires_grad_())
        truth.append(neg.double().requires_grad_())
    kw = dict(query_mask=qm, doc_mask=dm, negatives_mask=nm)
    out = FC.maxsim_loss(*leaves[:2], scale=leaves[2], negatives=leaves[3] if m else None, backend=backend,
                         chunk_size=chunk, **kw)
    want = R.maxsim_loss_reference(*truth[:2], scale=truth[2], negatives=truth[3] if m else None, **kw)
    assert out.dtype == dtype
    assert_close_rel(out, want, rtol=rtol, name="loss")
    for g, e, name in zip(torch.autograd.grad(out, leaves), torch.autograd.grad(want, truth),
                          ("queries", "docs", "scale", "negatives")):
        assert_close_rel(g, e, rtol=rtol, atol=rtol * 1e-3, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_scores_negative_similarities_and_padding(backend):
    """Every q·d < 0 with padded documents: a zero-filled pad would win each max."""
    q, docs, qm, dm, _, _ = _data(4, 5, 9, 8, dtype=torch.float32)
    q, docs = q.abs(), -docs.abs()
    scores = FC.maxsim_scores(q, docs, query_mask=qm, doc_mask=dm, backend=backend)
    want = R.maxsim_scores_reference(q.double(), docs.double(), query_mask=qm, doc_mask=dm)
    assert (scores < 0).all()
    assert_close_rel(scores, want, rtol=2e-6, name="scores")


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_ties_send_the_gradient_to_the_lowest_doc_token(backend):
    q, docs, _, _, _, _ = _data(3, 4, 5, 8, dtype=torch.float32)
    docs = torch.cat([docs[:, :1], docs[:, :1], docs[:, 1:]], dim=1)  # doc tokens 0 and 1 equal
    leaf = docs.clone().requires_grad_()
    (g,) = torch.autograd.grad(FC.maxsim_scores(q, leaf, backend=backend).sum(), [leaf])
    assert g[:, 1].abs().max() == 0 and g[:, 0].abs().max() > 0


@pytest.mark.skipif(not cpp.AVAILABLE, reason=f"C++ extension unavailable: {cpp.REASON}")
@pytest.mark.parametrize("chunk", [None, 5])
def test_maxsim_cpp_gradient_of_a_doc_token_that_wins_every_query_token(chunk):
    """Document 0's only real token is the argmax of every token of every query (the queries lean
    toward it), so its gradient sums B·n_q = 1200 gathered rows: the C++ backend's fp32 gradients of
    both inputs stay within twice the error of the materialised fp32 formula, both against float64."""
    q, docs, dm = winner_token_case(24, 50, 77, 64, seed=2)
    assert_grads_within_fp32_formula(
        lambda q, docs: FC.maxsim_loss(q, docs, doc_mask=dm, backend="cpp", chunk_size=chunk),
        lambda q, docs: R.maxsim_loss_reference(q, docs, doc_mask=dm), [q, docs], ("queries", "docs"))


def test_maxsim_compiles():
    q, docs, qm, dm, _, _ = _data(4, 5, 6, 8, dtype=torch.float32)

    def step(q, docs):
        return FC.maxsim_loss(q, docs, query_mask=qm, doc_mask=dm, scale=5.0)

    assert_compiles_like_eager(step, [q.clone().requires_grad_(), docs.clone().requires_grad_()])


def test_maxsim_bad_input():
    q, docs, qm, dm, neg, nm = _data(3, 4, 5, 8, m=2, nn=5)
    with pytest.raises(ValueError, match="B_q and B_d"):
        FC.maxsim_loss(q, docs[:2])
    with pytest.raises(ValueError, match="doc_mask"):
        FC.maxsim_scores(q, docs, doc_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no real token"):
        FC.maxsim_scores(q, docs, doc_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="negatives_mask"):
        FC.maxsim_loss(q, docs, negatives_mask=nm)
    with pytest.raises(ValueError, match="negatives must be"):
        FC.maxsim_loss(q, docs, negatives=neg[:, :, :3])
    with pytest.raises(ValueError, match="feature dimension"):
        FC.maxsim_scores(q, docs[:, :, :3])
    with pytest.raises(TypeError, match="scale"):
        FC.maxsim_loss(q, docs, scale="1")


# ------------------------------------------------------------------ against PyLate, when installed
def _pylate_colbert_scores():
    """PyLate's ``colbert_scores``, its scoring module loaded without the package's __init__ (which
    imports the datasets library)."""
    spec = importlib.util.find_spec("pylate")
    if spec is None:
        pytest.skip("pylate is not installed (pip install --no-deps pylate; make test does)")
    root = spec.submodule_search_locations[0]
    saved = {k: sys.modules.get(k) for k in ("pylate", "pylate.utils", "pylate.scores")}
    try:
        for name in saved:
            if name not in sys.modules:
                stub = types.ModuleType(name)
                stub.__path__ = [os.path.join(root, *name.split(".")[1:])]
                sys.modules[name] = stub
        from pylate.scores.colbert import colbert_scores
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
    return colbert_scores


def test_maxsim_scores_equal_pylate():
    colbert_scores = _pylate_colbert_scores()
    q, docs, qm, dm, _, _ = _data(5, 6, 9, 16, dtype=torch.float32)
    ours = FC.maxsim_scores(q, docs, query_mask=qm, doc_mask=dm)
    # PyLate multiplies the padding by zero: equal to ours wherever a real document token is >= 0, i.e.
    # without document padding
    theirs = colbert_scores(q, docs, queries_mask=qm.float(), backend="torch")
    assert_close_rel(FC.maxsim_scores(q, docs, query_mask=qm), theirs, rtol=2e-6, name="unpadded docs")
    # with padded documents and negative similarities PyLate's zero pad wins the max: its score is ours
    # with each max clamped at 0 for the documents that have padding
    q, docs = q.abs(), -docs.abs()
    theirs = colbert_scores(q, docs, queries_mask=qm.float(), documents_mask=dm.float(), backend="torch")
    ours = FC.maxsim_scores(q, docs, query_mask=qm, doc_mask=dm)
    padded = ~dm.all(1)
    assert (ours < 0).all()
    assert (theirs[:, padded] == 0).all()
    assert_close_rel(theirs[:, ~padded], ours[:, ~padded], rtol=2e-6, name="docs without padding")


def test_maxsim_module():
    import fastcon

    q, docs, qm, dm, neg, nm = _data(3, 4, 5, 8, m=2, nn=6)
    module = fastcon.MaxSimLoss(scale=4.0)
    assert_close_rel(module(q, docs, qm, dm, neg, nm),
                     FC.maxsim_loss(q, docs, query_mask=qm, doc_mask=dm, negatives=neg, negatives_mask=nm, scale=4.0),
                     rtol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_maxsim_nan_in_a_real_token_poisons_its_pairs_only_and_padding_is_ignored(backend):
    q, docs, qm, dm, _, _ = _data(3, 4, 6, 8, dtype=torch.float32)
    dm[1, 4:] = False
    docs = docs.clone()
    docs[1, 5, 0] = float("nan")  # a padded token of document 1: ignored
    want = R.maxsim_scores_reference(q.double(), docs.double(), query_mask=qm, doc_mask=dm)
    scores = FC.maxsim_scores(q, docs, query_mask=qm, doc_mask=dm, backend=backend)
    assert torch.isfinite(scores).all()
    assert_close_rel(scores, want, rtol=2e-6, name="scores")
    docs[2, 0, 3] = float("nan")  # a real token of document 2: its column is NaN, the others are not
    scores = FC.maxsim_scores(q, docs, query_mask=qm, doc_mask=dm, backend=backend)
    assert torch.isnan(scores[:, 2]).all() and torch.isfinite(scores[:, :2]).all()


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("nq,nd", [(4, 6), (3, 300)])
def test_late_interaction_shapes_of_each_statistic(backend, nq, nd):
    """(0, B_d) for an unwanted statistic on every backend, in both orientations of the Triton kernels."""
    from fastcon.ops.late import late_interaction

    q, docs, qm, dm, _, _ = _data(3, nq, nd, 8, dtype=torch.float32)
    sx_ref, sy_ref = late_interaction(q, docs, qm, dm, backend="torch")
    for want_x, want_y in ((True, False), (False, True), (False, False), (True, True)):
        sx, sy = late_interaction(q, docs, qm, dm, want_x=want_x, want_y=want_y, backend=backend)
        assert tuple(sx.shape) == ((3, 3) if want_x else (0, 3)) and tuple(sy.shape) == ((3, 3) if want_y else (0, 3))
        if want_x:
            assert_close_rel(sx, sx_ref, rtol=2e-6, name="sx")
        if want_y:
            assert_close_rel(sy, sy_ref, rtol=2e-6, name="sy")


@pytest.mark.interpreter
def test_triton_fp16_gradient_weights_are_lifted():
    """Upstream gradients far below fp16's normal range (1e-7): the weights are lifted by a power of two
    before their fp16 cast, so the (fp32) gradients of the op keep fp16's relative precision."""
    from fastcon.ops.late import late_interaction_grad

    q, docs, qm, dm, _, _ = _data(4, 5, 7, 16, dtype=torch.float32)
    q16, d16 = q.half(), docs.half()
    w = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) * 1e-7
    truth = [q16.double().requires_grad_(), d16.double().requires_grad_()]
    want = R.maxsim_scores_reference(*truth, query_mask=qm, doc_mask=dm)
    expected = torch.autograd.grad((want * w.double()).sum(), truth)
    got = late_interaction_grad(q16, d16, qm, dm, w, None, "triton", 2, None)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        assert_close_rel(g, e, rtol=2e-3, name="fp16 gradient")
