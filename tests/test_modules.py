"""The modules are drop-ins for open_clip's: signatures, return types, output_dict, dtypes."""
import importlib.util
import inspect

import pytest
import torch

import fastcon
from fastcon import reference as R
from helpers import assert_close_rel, leaf, make_features


def _positional(fn):
    """(name, default) of the parameters after ``self`` that can be passed positionally."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [(p.name, p.default) for p in params if p.kind in kinds]


def _keyword_only(fn):
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]


# open_clip 3.x, spelled out so that the test runs without open_clip installed too.
OPEN_CLIP_INIT = {
    "ClipLoss": [("local_loss", False), ("gather_with_grad", False), ("cache_labels", False), ("rank", 0),
                 ("world_size", 1), ("use_horovod", False)],
    "SigLipLoss": [("cache_labels", False), ("rank", 0), ("world_size", 1), ("dist_impl", None)],
}
_E = inspect.Parameter.empty
OPEN_CLIP_FORWARD = {
    "ClipLoss": [("image_features", _E), ("text_features", _E), ("logit_scale", _E), ("logit_bias", None),
                 ("output_dict", False)],
    "SigLipLoss": [("image_features", _E), ("text_features", _E), ("logit_scale", _E), ("logit_bias", _E),
                   ("output_dict", False)],
}


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_constructor_signatures_match_open_clip(name):
    cls = getattr(fastcon, name)
    assert _positional(cls.__init__) == OPEN_CLIP_INIT[name]
    assert _positional(cls.forward) == OPEN_CLIP_FORWARD[name]
    assert _keyword_only(cls.forward) == (["labels"] if name == "ClipLoss" else [])
    assert "chunk_size" in _keyword_only(cls.__init__) and "backend" in _keyword_only(cls.__init__)


def test_siglip_chunk_size_is_keyword_only():
    assert fastcon.SigLipLoss(chunk_size=7).chunk_size == 7
    assert fastcon.SigLipLoss().chunk_size == 0
    with pytest.raises(TypeError):
        fastcon.SigLipLoss(False, 0, 1, None, 7)


def test_clip_use_horovod_is_a_clear_error():
    assert fastcon.ClipLoss(use_horovod=False).use_horovod is False
    with pytest.raises(ValueError, match="horovod"):
        fastcon.ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="horovod"):
        fastcon.ClipLoss(False, False, False, 0, 1, True)


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_unpaired_batch_is_a_value_error(name):
    a, _ = make_features(6, 6, 8)
    _, b = make_features(9, 9, 8, seed=1)
    module = getattr(fastcon, name)()
    for x, y in ((a, b), (b, a)):
        with pytest.raises(ValueError) as info:
            module(x, y, 10.0, -10.0)
        msg = str(info.value)
        assert "6" in msg and "9" in msg and "pos_offset" in msg, msg
    # The rectangular form stays available in fastcon.functional with an explicit pos_offset.
    fn = fastcon.functional.clip_loss if name == "ClipLoss" else fastcon.functional.siglip_loss
    assert torch.isfinite(fn(a, b, 10.0, -10.0, pos_offset=3, backend="torch"))


def test_siglip_needs_logit_bias():
    a, b = make_features(5, 5, 8)
    with pytest.raises(TypeError, match="logit_bias"):
        fastcon.SigLipLoss()(a, b, 10.0)
    with pytest.raises(ValueError, match="SigLipLoss needs logit_bias"):
        fastcon.SigLipLoss()(a, b, 10.0, None)
    with pytest.raises(ValueError, match="-10"):
        fastcon.SigLipLoss()(a, b, 10.0, None, output_dict=True)


# ------------------------------------------------------------------ against open_clip, when installed
def _open_clip_loss():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch; make test does)")
    from fastcon.bench.providers import _load_open_clip_loss

    return _load_open_clip_loss()


@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_signatures_equal_installed_open_clip(name):
    oc = getattr(_open_clip_loss(), name)
    ours = getattr(fastcon, name)
    # Every parameter of open_clip's constructor, positionally in its order with its defaults; ours may
    # add keyword-only ones after them.
    assert _positional(ours.__init__) == [(p.name, p.default) for p in
                                          list(inspect.signature(oc.__init__).parameters.values())[1:]]
    # forward: open_clip's parameters, kinds and defaults; ours may add keyword-only ones after them
    ours_fwd = [(p.name, p.default, p.kind) for p in inspect.signature(ours.forward).parameters.values()
                if p.kind != inspect.Parameter.KEYWORD_ONLY]
    assert ours_fwd == [(p.name, p.default, p.kind) for p in inspect.signature(oc.forward).parameters.values()]


@pytest.mark.parametrize("bias", [None, -3.0])
@pytest.mark.parametrize("name", ["ClipLoss", "SigLipLoss"])
def test_values_equal_installed_open_clip(name, bias):
    oc_module = getattr(_open_clip_loss(), name)()
    ours = getattr(fastcon, name)()
    if name == "SigLipLoss" and bias is None:
        bias = -10.0  # required by both
    a, b = make_features(37, 37, 24, seed=5)
    scale = torch.tensor(14.3)
    bias_t = None if bias is None else torch.tensor(bias)
    args = (scale,) if bias_t is None else (scale, bias_t)
    want = oc_module(a, b, *args)
    got = ours(a, b, *args)
    assert got.shape == want.shape == () and got.dtype == want.dtype == torch.float32
    assert_close_rel(got, want, rtol=1e-5, name=name)
    out_oc, out = oc_module(a, b, *args, output_dict=True), ours(a, b, *args, output_dict=True)
    assert set(out) == set(out_oc) == {"contrastive_loss"}
    assert_close_rel(out["contrastive_loss"], out_oc["contrastive_loss"], rtol=1e-5, name=name)
    # Unpaired: ours is a clear ValueError where open_clip fails.
    with pytest.raises(ValueError, match="pos_offset"):
        ours(a, b[:30], *((scale,) if bias_t is None else (scale, bias_t)))


def test_modules_own_no_parameters_or_buffers():
    for m in (fastcon.ClipLoss(), fastcon.SigLipLoss()):
        assert not list(m.parameters()) and not list(m.buffers())


def test_clip_module_output_dict_and_gradients():
    a, b = make_features(50, 50, 32)
    a, b = leaf(a), leaf(b)
    logit_scale = torch.nn.Parameter(torch.tensor(2.659)).exp()
    out = fastcon.ClipLoss()(a, b, logit_scale, output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0
    ref = R.clip_loss_reference(a.detach(), b.detach(), logit_scale.detach())
    assert_close_rel(out["contrastive_loss"], ref, rtol=1e-5)
    out["contrastive_loss"].backward()
    assert a.grad is not None and b.grad is not None


def test_siglip_module_bias_receives_gradient():
    a, b = make_features(20, 20, 16)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = fastcon.SigLipLoss()(a, b, scale, bias)
    loss.backward()
    assert scale.grad is not None and bias.grad is not None and bias.grad.item() != 0.0
    assert fastcon.SigLipLoss()(a, b, scale, bias, output_dict=True)["contrastive_loss"].shape == ()


def test_clip_bias_receives_gradient():
    a, b = make_features(20, 20, 16)
    bias = torch.tensor(-1.0, requires_grad=True)
    scale = torch.tensor([14.3], requires_grad=True)  # one-element (1,) scales are accepted too
    fastcon.ClipLoss()(a, b, scale, bias).backward()
    assert bias.grad is not None and scale.grad is not None and scale.grad.shape == (1,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_on_cpu_keep_dtype(dtype):
    a, b = make_features(16, 16, 8, dtype=dtype)
    a, b = leaf(a), leaf(b)
    loss = fastcon.ClipLoss()(a, b, 10.0)
    assert loss.dtype == dtype
    loss.backward()
    assert a.grad.dtype == dtype
    ref = R.clip_loss_reference(a.detach(), b.detach(), 10.0)
    assert abs(loss.float().item() - ref.item()) <= 1e-2 * abs(ref.item()) + 1e-2


def test_backend_info_reports_every_backend():
    info = fastcon.backend_info()
    for name in ("cpp", "triton", "triton_fused", "torch", "reference"):
        entry = info["backends"][name]
        assert isinstance(entry["available"], bool)
        assert entry["available"] or entry["reason"]
    assert info["auto"]["cpu"] in ("cpp", "torch")


def test_no_grad_skips_the_gradient_pass(monkeypatch):
    from fastcon.kernels import torch_chunked

    def forbidden(*args, **kwargs):
        raise AssertionError("the gradient pass ran under no_grad")

    monkeypatch.setattr(torch_chunked, "softmax_fused", forbidden)
    monkeypatch.setattr(torch_chunked, "softmax_grad", forbidden)
    a, b = make_features(9, 9, 8)
    a, b = leaf(a), leaf(b)
    scale = torch.tensor(10.0, requires_grad=True)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            loss = fastcon.functional.clip_loss(a, b, scale, backend="torch")
        assert_close_rel(loss, R.clip_loss_reference(a.detach(), b.detach(), 10.0), rtol=1e-5)
        with mode():
            siglip = fastcon.functional.siglip_loss(a, b, scale, -5.0, backend="torch")
        assert_close_rel(siglip, R.siglip_loss_reference(a.detach(), b.detach(), 10.0, -5.0), rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_double_backward_is_a_clear_error(loss_name):
    a, b = make_features(6, 6, 4)
    a = leaf(a)
    fn = fastcon.functional.clip_loss if loss_name == "clip" else fastcon.functional.siglip_loss
    loss = fn(a, b, 10.0, backend="torch") + 0.5 * (a ** 2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, a, create_graph=True)
    # A plain backward after a forward under create_graph-free use still works.
    fn(leaf(a.detach()), b, 10.0, backend="torch").backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_half_precision_gradients_within_the_reference_budget(dtype, loss_name):
    """On the chunked torch path (the Triton paths save gradients the same way): no worse than the
    reference computed in the same precision, against fp32 on the same rounded inputs."""
    a32, b32 = make_features(300, 300, 48)
    a, b = a32.to(dtype), b32.to(dtype)
    scale = 30.0
    fn = fastcon.functional.clip_loss if loss_name == "clip" else fastcon.functional.siglip_loss
    ref = R.clip_loss_reference if loss_name == "clip" else R.siglip_loss_reference
    extra = () if loss_name == "clip" else (-5.0,)

    def grads(f, x, y, **kw):
        x, y = leaf(x), leaf(y)
        f(x, y, scale, *extra, **kw).float().backward()
        return x.grad.float(), y.grad.float()

    truth = grads(ref, a.float(), b.float())
    ours = grads(fn, a, b, backend="torch")
    low = grads(lambda *args: ref(*args, upcast=False), a, b)
    for o, l, t in zip(ours, low, truth):
        err_ours = ((o - t).abs().max() / t.abs().max()).item()
        err_low = ((l - t).abs().max() / t.abs().max()).item()
        assert err_ours <= err_low + 1e-3, (err_ours, err_low)
        # No systematic scale error: the gradient's overall size matches the truth's.
        assert abs((o * t).sum().item() / (t * t).sum().item() - 1.0) < 2e-3


def test_missing_extension_falls_back_to_torch_with_one_warning(monkeypatch):
    from fastcon.kernels import cpp
    from fastcon.ops import engine

    reason = "fastcon was built without the C++ extension fastcon._C (test)"
    monkeypatch.setattr(cpp, "AVAILABLE", False)
    monkeypatch.setattr(cpp, "REASON", reason)
    monkeypatch.setattr(engine, "_warned_cpp_fallback", False)
    a, b = make_features(12, 12, 8)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension is unavailable"):
        loss = fastcon.ClipLoss()(a, b, 10.0)
    assert_close_rel(loss, R.clip_loss_reference(a, b, 10.0), rtol=1e-5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once per process
        fastcon.SigLipLoss()(a, b, 10.0, -10.0)
    with pytest.raises(RuntimeError, match="backend='cpp' is unavailable"):
        fastcon.functional.clip_loss(a, b, 10.0, backend="cpp")
    info = fastcon.backend_info()
    assert info["backends"]["cpp"] == {"available": False, "reason": reason, "devices": ["cpu"], "origin": None,
                                       "simd": None}
    assert info["auto"]["cpu"] == "torch"


def test_clip_module_takes_labels_keyword_only():
    a, b = make_features(24, 24, 16)
    ids = torch.arange(24) % 5
    out = fastcon.ClipLoss(backend="torch")(a, b, torch.tensor(14.3), labels=ids)
    ref = R.multi_positive_clip_loss_reference(a.double(), b.double(), 14.3, labels=ids)
    assert_close_rel(out, ref, rtol=1e-5)
