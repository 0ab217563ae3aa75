"""Small CPU problems run the engine operator's body through a plain autograd function (ops.engine
``direct_call``): the same loss and gradients as the registered operator, to the last bit, and as the float64 reference,
for CLIP (with smoothing and a rectangular offset) and SigLIP, under an upstream gradient other than 1;
the operator everywhere else."""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from fastcon.ops import engine
from helpers import assert_close_rel, leaf, make_features


def _registered(monkeypatch):
    monkeypatch.setattr(engine, "direct_call", lambda *args: False)


@pytest.mark.parametrize("backend", ["cpp", "torch", "auto"])
@pytest.mark.parametrize("loss", ["clip", "clip_smooth_offset", "siglip"])
def test_direct_call_equals_the_registered_operator(monkeypatch, backend, loss):
    a, b = make_features(12, 15, 8)
    s = torch.tensor(9.0)

    def run(**kw):
        xa, xb, xs = leaf(a), leaf(b), leaf(s)
        if loss == "clip":
            out = FC.clip_loss(xa, xb[:12], xs, **kw)
        elif loss == "clip_smooth_offset":
            out = FC.clip_loss(xa, xb, xs, label_smoothing=0.1, pos_offset=3, **kw)
        else:
            out = FC.siglip_loss(xa, xb, xs, -4.0, **kw)
        (3.0 * out).backward()  # an upstream gradient other than 1
        return [out.detach()] + [t.grad for t in (xa, xb, xs)]

    direct = run(backend=backend)
    # the float64 reference, its gradients times the same upstream 3
    xa, xb, xs = leaf(a.double()), leaf(b.double()), leaf(s.double())
    if loss == "clip":
        want = R.clip_loss_reference(xa, xb[:12], xs)
    elif loss == "clip_smooth_offset":
        want = R.clip_loss_reference(xa, xb, xs, label_smoothing=0.1, pos_offset=3)
    else:
        want = R.siglip_loss_reference(xa, xb, xs, -4.0)
    (3.0 * want).backward()
    for x, y in zip(direct, [want.detach(), xa.grad, xb.grad, xs.grad]):
        assert_close_rel(x, y, rtol=1e-5, name=loss)
    _registered(monkeypatch)
    registered = run(backend=backend)
    for x, y in zip(direct, registered):
        torch.testing.assert_close(x, y, rtol=2e-7, atol=0)


def test_direct_call_only_for_small_real_cpu_tensors():
    a, b = torch.zeros(8, 4), torch.zeros(8, 4)
    assert engine.direct_call("cpp", a, b) and engine.direct_call("torch", a, b)
    assert not engine.direct_call("triton", a, b)
    big = torch.zeros(engine.SMALL_LOGITS // 8 + 1, 4)
    assert not engine.direct_call("cpp", big, b)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fa = mode.from_tensor(a)
    assert not engine.direct_call("cpp", fa, b)
