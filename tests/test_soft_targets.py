"""Soft targets and regularisers on the engine: FC.distill_loss (clip, hycd, cwcl: the
teacher's tile beside the student's, torch backend) and FC.align_uniform_loss (one LSE over the pairs,
every backend), against the float64 references, loss and every gradient."""
import warnings

import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from helpers import assert_close_rel, assert_compiles_like_eager, make_features

UNIFORM_BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
                    pytest.param("triton_fused", marks=pytest.mark.interpreter), "auto"]


def _teacher(n, d, seed=4, dtype=torch.float32):
    return make_features(n, n, d, seed=seed, dtype=dtype)


def _check(fn, ref, tensors, *, rtol, atol=1e-7):
    ours = [t.detach().clone().requires_grad_() for t in tensors]
    truth = [t.detach().double().requires_grad_() for t in tensors]
    out = fn(*ours)
    expected = ref(*truth)
    assert out.dtype == tensors[0].dtype and out.shape == ()
    assert_close_rel(out, expected, rtol=rtol, atol=atol, name="loss")
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, ours), torch.autograd.grad(expected, truth))):
        assert g.dtype == tensors[i].dtype
        assert_close_rel(g, e, rtol=rtol, atol=1e-8, name=f"grad {i}")


@pytest.mark.parametrize("kind,kw", [("clip", {}), ("hycd", {}), ("hycd", dict(alpha=0.2, temperature=0.4)),
                                     ("hycd", dict(alpha=1.0)), ("cwcl", {})])
@pytest.mark.parametrize("n,d,chunk", [(1, 4, None), (37, 16, 5), (130, 32, None)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "cpp", "auto"])
def test_distill_loss_against_reference(kind, kw, n, d, chunk, dtype, backend):
    x, y = make_features(n, n, d, dtype=dtype)
    tx, ty = _teacher(n, d, dtype=dtype)
    s = torch.tensor(14.3, dtype=dtype)
    # fp32: a loss near 0 is a difference of logits of size s, rounded at ulp(s)
    rtol, atol = (1e-11, 1e-12) if dtype == torch.float64 else (2e-5, 2e-6)
    if kind == "hycd":  # the logit scales are not used by this kind
        _check(lambda a, b: FC.distill_loss(a, b, 99.0, tx, ty, 7.0, kind=kind, chunk_size=chunk, backend=backend,
                                            **kw),
               lambda a, b: R.distill_loss_reference(a, b, 99.0, tx.double(), ty.double(), 7.0, kind=kind, **kw),
               [x, y], rtol=rtol, atol=atol)
        return
    _check(lambda a, b, c: FC.distill_loss(a, b, c, tx, ty, 20.0, kind=kind, chunk_size=chunk, backend=backend,
                                           **kw),
           lambda a, b, c: R.distill_loss_reference(a, b, c, tx.double(), ty.double(), 20.0, kind=kind, **kw),
           [x, y, s], rtol=rtol, atol=atol)


def test_distill_teacher_scale_as_a_tensor_gets_no_gradient():
    x, y = make_features(20, 20, 8)
    tx, ty = _teacher(20, 8)
    st = torch.tensor(30.0, requires_grad=True)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    out = FC.distill_loss(*leaves, 10.0, tx, ty, st, kind="clip")
    out.backward()
    assert st.grad is None and leaves[0].grad is not None


def test_cwcl_with_the_students_own_text_features():
    """The frozen modality may be the student's own text features: no gradient through the weights."""
    x, y = make_features(25, 25, 8, dtype=torch.float64)
    _check(lambda a, b: FC.distill_loss(a, b, 12.0, None, b, kind="cwcl"),
           lambda a, b: R.distill_loss_reference(a, b, 12.0, a, b.detach(), None, kind="cwcl"), [x, y], rtol=1e-11)


@pytest.mark.interpreter
def test_distill_on_the_fused_tile_kernels_needs_d_at_most_256():
    """The fused tile kernels keep a row block's gradient in registers: D <= 256."""
    x, y = make_features(8, 8, 300)
    tx, ty = _teacher(8, 300)
    with pytest.raises(ValueError, match="D <= 256"):
        FC.distill_loss(x, y, 10.0, tx, ty, 10.0, backend="triton_fused")


def test_distill_bad_input():
    x, y = make_features(8, 8, 4)
    tx, ty = _teacher(8, 4)
    with pytest.raises(ValueError, match="teacher_image_features must have the student's shape"):
        FC.distill_loss(x, y, 10.0, tx[:5], ty, 10.0)
    with pytest.raises(ValueError, match="teacher_text_features must have the student's shape"):
        FC.distill_loss(x, y, 10.0, tx, ty[:, :3], 10.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        FC.distill_loss(x, y, 10.0, tx, ty, 10.0, kind="hycd", alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        FC.distill_loss(x, y, 10.0, tx, ty, 10.0, kind="hycd", temperature=0.0)
    with pytest.raises(ValueError, match="kind"):
        FC.distill_loss(x, y, 10.0, tx, ty, 10.0, kind="kd")
    with pytest.raises(ValueError, match="teacher_logit_scale is required"):
        FC.distill_loss(x, y, 10.0, tx, ty, None, kind="clip")
    with pytest.warns(UserWarning, match="requires grad"):
        FC.distill_loss(x, y, 10.0, tx.clone().requires_grad_(), ty, 10.0)


@pytest.mark.parametrize("backend", UNIFORM_BACKENDS)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("n,d,chunk,alpha,t", [(2, 3, None, 2.0, 2.0), (33, 16, 7, 2.0, 2.0), (64, 8, None, 1.0, 0.5)])
def test_align_uniform_against_reference(backend, cross, n, d, chunk, alpha, t):
    x, y = make_features(n, n, d, seed=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _check(lambda a, b: FC.align_uniform_loss(a, b, alpha=alpha, t=t, cross=cross, backend=backend,
                                                  chunk_size=chunk),
               lambda a, b: R.align_uniform_loss_reference(a, b, alpha=alpha, t=t, cross=cross), [x, y], rtol=2e-5)


def test_align_uniform_terms_and_low_precision():
    x, y = make_features(200, 200, 32)
    terms = FC.align_uniform_loss(x, y, cross=True, return_terms=True)
    expected = R.align_uniform_loss_reference(x.double(), y.double(), cross=True, return_terms=True)
    assert set(terms) == set(expected)
    for k in terms:
        assert_close_rel(terms[k], expected[k], rtol=1e-5, atol=1e-6, name=k)
    # bf16 features: the uniformity comes from the fp32 dot products of the rounded rows
    xb, yb = x.bfloat16(), y.bfloat16()
    got = FC.align_uniform_loss(xb, yb, return_terms=True)["uniform"]
    exact = R.align_uniform_loss_reference(xb.double(), yb.double(), return_terms=True)["uniform"]
    assert abs(got.float().item() - exact.item()) <= 1e-2 * abs(exact.item())


def test_align_uniform_bad_input():
    x, y = make_features(6, 6, 4)
    with pytest.raises(ValueError, match="t must be"):
        FC.align_uniform_loss(x, y, t=0.0)
    with pytest.raises(ValueError, match="alpha must be"):
        FC.align_uniform_loss(x, y, alpha=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        FC.align_uniform_loss(x, y[:5])
    with pytest.raises(ValueError, match="at least 2 rows"):
        FC.align_uniform_loss(x[:1], y[:1])


# ---------------------------------------------------------------------------------------------------
# DistillClipLoss, the module

def _open_clip_loss_module():
    import importlib.util

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch; make test does)")
    from fastcon.bench.providers import _load_open_clip_loss

    return _load_open_clip_loss()


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_distill_clip_loss_module_against_open_clip(backend):
    import inspect

    import fastcon

    theirs_cls = _open_clip_loss_module().DistillClipLoss
    assert list(inspect.signature(fastcon.DistillClipLoss.forward).parameters) == \
        list(inspect.signature(theirs_cls.forward).parameters)
    x, y = make_features(50, 50, 16)
    tx, ty = _teacher(50, 16)
    s, st = torch.tensor(14.3), torch.tensor(25.0)
    ours_mod, theirs_mod = fastcon.DistillClipLoss(backend=backend), theirs_cls()
    for k, key in enumerate(("contrastive_loss", "distill_loss")):
        leaves_o = [x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_()]
        leaves_t = [x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_()]
        out_o = ours_mod(*leaves_o, tx, ty, st)[k]
        out_t = theirs_mod(*leaves_t, tx, ty, st)[k]
        assert_close_rel(out_o, out_t, rtol=2e-6, name=key)
        for g, e in zip(torch.autograd.grad(out_o, leaves_o), torch.autograd.grad(out_t, leaves_t)):
            assert_close_rel(g, e, rtol=2e-5, atol=1e-8, name=f"{key} grad")
    as_dict = ours_mod(x, y, s, tx, ty, st, output_dict=True)
    assert set(as_dict) == {"contrastive_loss", "distill_loss"}


@pytest.mark.parametrize("teacher_kind", [0, 1])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_soft_target_with_dropped_pairs_matches_the_torch_backend(teacher_kind, entropy, symmetric):
    """The C++ teacher producer against the torch backend's (the executable spec) on a soft target with
    dropped pairs (an excluded column in some rows, dropped extra columns), a hard share and the
    entropy: loss and every gradient, float64 (equal to rounding) and fp32."""
    from fastcon.targets import Target, Teacher
    from fastcon.ops import target_engine_loss

    n, extra, d = 29, 6, 12
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        x, y = make_features(n, n + extra, d, dtype=dtype)
        tx, ty = make_features(n, n + extra, d, seed=4, dtype=dtype)
        ids = torch.arange(n)
        col_ids = torch.cat([ids, torch.full((extra,), -1)])  # the extra columns are negatives only
        exclude = torch.where(ids % 3 == 0, (ids + 1) % n, -1)  # never a row's own positive
        col_keep = torch.arange(n + extra) % 4 != 1
        col_keep[:n] = True
        kw = dict(kind=1, c0=0.5, c1=0.5, eps=1e-3) if teacher_kind else dict(scale=torch.tensor(9.0, dtype=dtype))
        target = Target(ids, col_ids, exclude_col=exclude, col_keep=col_keep, teacher=Teacher(tx, ty, **kw), soft=0.6,
                        hard=0.4, entropy=entropy)
        out = []
        for backend in ("torch", "cpp"):
            leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(),
                      torch.tensor(11.0, dtype=dtype, requires_grad=True)]
            loss = target_engine_loss(*leaves, None, target, symmetric=symmetric, backend=backend, chunk_size=8)
            out.append([loss] + list(torch.autograd.grad(loss, leaves)))
        for k, (p, q) in enumerate(zip(*out)):
            assert_close_rel(q, p, rtol=tol, atol=tol * 0.1, name=f"{dtype} output {k}")


PAIR_BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
                 pytest.param("triton_fused", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", PAIR_BACKENDS)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 2.0), (1.0, 0.0), (0.0, 1.0), (1.0, -1.0), None])
def test_distill_clip_losses_any_weighting(backend, weights):
    """The pair from one engine pass (pass 2 in the backward, once): each loss equals its own
    reference and the gradient of any weighting of the two (one output alone, opposite weights,
    None: only the distillation term backpropagated) equals the reference's; label smoothing on the
    contrastive part."""
    dtype, rtol = (torch.float32, 2e-5) if backend.startswith("triton") else (torch.float64, 1e-11)
    n, d = 29, 16
    x, y = make_features(n, n, d, dtype=dtype)
    tx, ty = _teacher(n, d, dtype=dtype)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(14.3, dtype=dtype,
                                                                               requires_grad=True)]
    truth = [x.double().requires_grad_(), y.double().requires_grad_(), torch.tensor(14.3, dtype=torch.float64,
                                                                                  requires_grad=True)]
    c, dl = FC.distill_clip_losses(*leaves, tx, ty, 20.0, label_smoothing=0.1, backend=backend, chunk_size=8)
    c_ref = FC.clip_loss(*truth, label_smoothing=0.1, backend="reference")
    d_ref = FC.distill_loss(*truth, tx.double(), ty.double(), 20.0, backend="reference")
    assert c.dtype == dtype and dl.dtype == dtype
    assert_close_rel(c, c_ref, rtol=rtol, name="contrastive")
    assert_close_rel(dl, d_ref, rtol=rtol, name="distill")
    out, expected = (dl, d_ref) if weights is None else (weights[0] * c + weights[1] * dl,
                                                          weights[0] * c_ref + weights[1] * d_ref)
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, leaves), torch.autograd.grad(expected, truth))):
        assert_close_rel(g, e, rtol=rtol, atol=rtol * 1e-3, name=f"grad {i}")


def test_distill_clip_losses_compile_and_opcheck():
    """The pair's two ops (pass 1 in the forward, pass 2 in the backward) under torch.compile
    (fullgraph) and opcheck."""
    from fastcon.targets import Target, Teacher
    from fastcon.targets.wire import wire_args

    x, y = make_features(20, 20, 8)
    tx, ty = _teacher(20, 8)

    def step(p, q, s):
        c, dl = FC.distill_clip_losses(torch.nn.functional.normalize(p, dim=-1), q, s.exp(), tx, ty, 25.0,
                                       backend="torch")
        return c + 0.5 * dl

    leaves = [(2 * x).requires_grad_(), y.clone().requires_grad_(), torch.tensor(2.0, requires_grad=True)]
    assert_compiles_like_eager(step, leaves)
    ids = torch.arange(20)
    target = Target(ids, ids, teacher=Teacher(tx, ty, torch.tensor(25.0)), soft=1.0)
    args = (x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(14.3, requires_grad=True),
            torch.tensor(0.0), *wire_args(target, 20, 20), "cpp", 0.1, True, 6, None)
    torch.library.opcheck(torch.ops.fastcon.target_pair_loss.default, args)
