"""The modules are drop-ins for open_clip's: signatures, return types, output_dict, dtypes."""
import inspect

import pytest
import torch

import fastcon
from fastcon import reference as R
from helpers import assert_close_rel, leaf, make_features


def test_constructor_signatures_match_open_clip():
    clip = inspect.signature(fastcon.ClipLoss.__init__).parameters
    assert list(clip)[1:6] == ["local_loss", "gather_with_grad", "cache_labels", "rank", "world_size"]
    assert [clip[k].default for k in list(clip)[1:6]] == [False, False, False, 0, 1]
    sig = inspect.signature(fastcon.SigLipLoss.__init__).parameters
    assert list(sig)[1:6] == ["cache_labels", "rank", "world_size", "dist_impl", "chunk_size"]
    fwd = inspect.signature(fastcon.ClipLoss.forward).parameters
    assert list(fwd)[1:] == ["image_features", "text_features", "logit_scale", "logit_bias", "output_dict"]
    fwd = inspect.signature(fastcon.SigLipLoss.forward).parameters
    assert list(fwd)[1:] == ["image_features", "text_features", "logit_scale", "logit_bias", "output_dict"]


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
    assert info["backends"]["cpp"] == {"available": False, "reason": reason, "devices": ["cpu"]}
    assert info["auto"]["cpu"] == "torch"
