"""Every loss under torch.autocast on the CPU: C++ and torch backends in bf16 and fp16, the Triton
kernels through the interpreter in fp16 (the interpreter has no bf16).

Three properties, each able to fail on its own:

* dtypes: the loss is fp32 (as open_clip's cross-entropy under autocast), each gradient is in its
  input's own dtype (fp32 features, fp32 scale and bias);
* the GEMMs take the features rounded to the autocast dtype, everything else stays wide: the loss
  and gradients equal the float64 reference evaluated on the rounded features, to fp32 accuracy;
* the error budget: against the float64 truth on the unrounded features, fastcon's loss and
  gradients are no worse than open_clip's loss under the same autocast (its code when installed,
  else its formulas restated), plus a small tolerance.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fastcon
import fastcon.functional as FC
from fastcon import reference as R
from helpers import make_features

CASES = [  # (backend, autocast dtype)
    ("cpp", torch.bfloat16),
    ("torch", torch.bfloat16),
    ("cpp", torch.float16),
    pytest.param("triton", torch.float16, marks=pytest.mark.interpreter),
    pytest.param("triton_fused", torch.float16, marks=pytest.mark.interpreter),
]
SHAPES = [(97, 64), (160, 640)]
TOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4}


def _open_clip_losses():
    """open_clip's ClipLoss and SigLipLoss (its loss module, when installed), else None."""
    if importlib.util.find_spec("open_clip") is None:
        return None
    from fastcon.bench.providers import _load_open_clip_loss

    module = _load_open_clip_loss()
    return module.ClipLoss(), module.SigLipLoss()


def _open_clip_clip(a, b, s, bias):
    losses = _open_clip_losses()
    if losses is not None:
        return losses[0](a, b, s)
    # open_clip's ClipLoss restated: logits in the autocast dtype, fp32 cross-entropy
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(s * a @ b.T, labels) + F.cross_entropy(s * b @ a.T, labels)) / 2


def _open_clip_siglip(a, b, s, bias):
    losses = _open_clip_losses()
    if losses is not None:
        return losses[1](a, b, s, bias)
    logits = s * a @ b.T + bias
    labels = 2 * torch.eye(a.shape[0]) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


LOSSES = {
    "clip": (lambda a, b, s, bias, **kw: FC.clip_loss(a, b, s, **kw), R.clip_loss_reference, _open_clip_clip, None),
    "siglip": (FC.siglip_loss, R.siglip_loss_reference, _open_clip_siglip, -10.0),
}


def _inputs(n, d, bias_value, dtype=torch.float32):
    a, b = make_features(n, n, d)
    leaves = [a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(), torch.tensor(30.0, dtype=dtype,
                                                                                         requires_grad=True)]
    if bias_value is not None:
        leaves.append(torch.tensor(bias_value, dtype=dtype, requires_grad=True))
    return leaves


def _loss_and_grads(fn, leaves, **kw):
    bias = leaves[3] if len(leaves) > 3 else None
    out = fn(*leaves[:3], bias, **kw)
    return out, torch.autograd.grad(out, leaves)


def _rel(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("n,d", SHAPES)
def test_autocast_loss_and_gradients(loss, backend, dtype, n, d):
    if backend == "triton_fused" and d > 256:
        pytest.skip("the fully fused path covers D <= 256")
    fn, ref, peer, bias_value = LOSSES[loss]
    leaves = _inputs(n, d, bias_value)
    with torch.autocast("cpu", dtype=dtype):
        out, grads = _loss_and_grads(fn, leaves, backend=backend, chunk_size=n // 3 + 1)
        peer_out, peer_grads = _loss_and_grads(peer, leaves)
    assert out.dtype == torch.float32 and out.shape == ()
    for g, x in zip(grads, leaves):
        assert g.dtype == x.dtype == torch.float32 and g.shape == x.shape

    # 1. The GEMMs saw the rounded features, nothing else was rounded.
    rounded = [leaves[0].detach().to(dtype).double().requires_grad_(),
               leaves[1].detach().to(dtype).double().requires_grad_()] + \
              [t.detach().double().requires_grad_() for t in leaves[2:]]
    exact, exact_grads = _loss_and_grads(ref, rounded)
    assert _rel(out, exact) <= 1e-5, f"loss {out.item()} vs float64 on rounded features {exact.item()}"
    # The C++ and torch backends keep G in fp32; the Triton kernels cast it to the GEMM dtype for the
    # tensor-core gradient products (fp16: 11 bits), which bounds the feature gradients' agreement.
    g_tol = 2e-5 if backend in ("cpp", "torch") else 2.0 ** -10
    for name, g, e in zip(["image", "text", "scale", "bias"], grads, exact_grads):
        if name == "bias" and loss == "clip":
            continue  # the CLIP loss does not depend on the bias: its gradient is rounding noise
        tol = g_tol if name in ("image", "text") else 2e-5
        assert _rel(g, e) <= tol, f"grad {name}: {_rel(g, e):.3g} from the float64 gradient of the rounded features"

    # 2. No worse than open_clip under the same autocast, against the truth on the fp32 features.
    truth_leaves = [t.detach().double().requires_grad_() for t in leaves]
    truth, truth_grads = _loss_and_grads(ref, truth_leaves)
    tol = TOL[dtype]
    assert _rel(out, truth) <= _rel(peer_out, truth) + tol
    for name, g, p, t in zip(["image", "text", "scale", "bias"], grads, peer_grads, truth_grads):
        if name == "bias" and loss == "clip":
            continue
        assert _rel(g, t) <= _rel(p, t) + tol, f"grad {name}: {_rel(g, t):.3g} vs open_clip's {_rel(p, t):.3g}"


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_autocast_with_label_smoothing_and_rectangular_offset(backend):
    a, b = make_features(40, 90, 32, pos_offset=25)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    s = torch.tensor(14.3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FC.clip_loss(x, y, s, label_smoothing=0.1, pos_offset=25, backend=backend)
    grads = torch.autograd.grad(out, [x, y, s])
    xr, yr = a.bfloat16().double().requires_grad_(), b.bfloat16().double().requires_grad_()
    sr = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    exact = R.clip_loss_reference(xr, yr, sr, label_smoothing=0.1, pos_offset=25)
    exact_grads = torch.autograd.grad(exact, [xr, yr, sr])
    assert out.dtype == torch.float32
    # the smoothing sums, too, are of the features as the GEMMs see them
    assert _rel(out, exact) <= 1e-5
    for g, e in zip(grads, exact_grads):
        assert g.dtype == torch.float32 and _rel(g, e) <= 2e-5


@pytest.mark.parametrize("module", ["clip", "siglip"])
def test_modules_under_autocast_return_fp32(module):
    a, b = make_features(33, 33, 16)
    s = torch.tensor(10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if module == "clip":
            out = fastcon.ClipLoss()(a, b, s, output_dict=True)["contrastive_loss"]
        else:
            out = fastcon.SigLipLoss()(a, b, s, torch.tensor(-10.0))
    assert out.dtype == torch.float32


def test_half_inputs_under_autocast_of_the_same_dtype_are_not_recast():
    a, b = make_features(20, 20, 8, dtype=torch.bfloat16)
    s = torch.tensor(10.0)
    plain = FC.clip_loss(a, b, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = FC.clip_loss(a, b, s)
    assert plain.dtype == torch.bfloat16 and inside.dtype == torch.float32
    assert abs(plain.float().item() - inside.item()) <= 0.01 * abs(inside.item())


def test_float64_inputs_ignore_autocast():
    a, b = make_features(20, 20, 8, dtype=torch.float64)
    s = torch.tensor(10.0, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FC.clip_loss(a, b, s, backend="torch")
    assert out.dtype == torch.float64
    assert abs(out.item() - R.clip_loss_reference(a, b, s).item()) <= 1e-12


@pytest.mark.interpreter
def test_triton_bf16_under_interpreter_is_a_clear_error():
    a, b = make_features(8, 8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="no bfloat16"):
            FC.clip_loss(a, b, torch.tensor(10.0), backend="triton")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_fp16_features_with_a_loss_scale_keep_their_gradients(backend):
    """fp16 training scales the loss (here by 2^15) so that small gradients survive fp16: the engine
    keeps its gradients wide until the upstream gradient is applied and rounds once after, so every
    element of the scaled gradient is the fp16 rounding of the true one (rounded before the scale,
    the entries below fp16's normal range, about 1e-5 unscaled here, would lose their bits)."""
    n = 2048
    a, b = make_features(n, n, 32, dtype=torch.float16)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    s = torch.tensor(14.3)
    loss_scale = 2.0 ** 15
    (FC.clip_loss(x, y, s, backend=backend).float() * loss_scale).backward()
    xr, yr = a.double().requires_grad_(), b.double().requires_grad_()
    (R.clip_loss_reference(xr, yr, s.double()) * loss_scale).backward()
    for g, r in ((x.grad, xr.grad), (y.grad, yr.grad)):
        assert g.dtype == torch.float16
        err = (g.double() - r).abs()
        # an fp16 rounding of each element, plus fp32 cancellation in the sums over N (1e-6 of the
        # largest); rounded before the scale, some 2,000 elements of each miss this bound
        bound = 2.0 ** -10 * r.abs() + 1e-6 * r.abs().max()
        assert (err <= bound).all(), f"{int((err > bound).sum())} elements off by more than an fp16 rounding"
