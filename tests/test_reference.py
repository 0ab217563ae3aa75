"""The reference losses against independent formulations (open_clip's code semantics restated,
float64 explicit sums, F.logsigmoid on materialised logits)."""
import pytest
import torch
import torch.nn.functional as F

from fastcon import reference as R
from helpers import assert_close_rel, make_features


def open_clip_style_clip(img, txt, s, bias=None):
    # open_clip ClipLoss.get_logits + forward on one rank.
    logits_per_image = s * img @ txt.T
    logits_per_text = s * txt @ img.T
    if bias is not None:
        logits_per_image = logits_per_image + bias
        logits_per_text = logits_per_text + bias
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def open_clip_style_siglip(img, txt, s, bias):
    logits = s * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


@pytest.mark.parametrize("n,d", [(1, 3), (3, 64), (127, 640)])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("bias", [None, -2.5])
def test_clip_reference_matches_open_clip_semantics(n, d, scale, bias):
    a, b = make_features(n, n, d, dtype=torch.float64)
    ref = R.clip_loss_reference(a, b, scale, bias, upcast=False)
    assert_close_rel(ref, open_clip_style_clip(a, b, scale, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("na,nb,off", [(3, 3, 0), (5, 9, 4), (127, 257, 100)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bias", [None, 1.5])
def test_clip_reference_matches_explicit_sums(na, nb, off, eps, bias):
    a, b = make_features(na, nb, 16, dtype=torch.float64, pos_offset=off)
    ref = R.clip_loss_reference(a, b, 14.3, bias, label_smoothing=eps, pos_offset=off, upcast=False)
    exp = R.clip_loss_explicit(a, b, 14.3, bias, label_smoothing=eps, pos_offset=off)
    assert_close_rel(ref, exp, rtol=1e-12, atol=1e-12)


def test_clip_batch_of_one_is_zero():
    a, b = make_features(1, 1, 8)
    assert R.clip_loss_reference(a, b, 100.0).item() == 0.0


@pytest.mark.parametrize("n,d", [(1, 3), (3, 64), (127, 640)])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.0), (100.0, -5.0)])
def test_siglip_reference_matches_open_clip_and_softplus_identity(n, d, scale, bias):
    a, b = make_features(n, n, d, dtype=torch.float64)
    ref = R.siglip_loss_reference(a, b, scale, bias, upcast=False)
    assert_close_rel(ref, open_clip_style_siglip(a, b, scale, bias), rtol=1e-12, atol=1e-12)
    assert_close_rel(ref, R.siglip_loss_explicit(a, b, scale, bias), rtol=1e-12, atol=1e-12)
    # HF's form: mean over rows of the row sums.
    logits = scale * a @ b.T + bias
    hf = -(F.logsigmoid((2 * torch.eye(n, dtype=a.dtype) - 1) * logits).sum(dim=1)).mean()
    assert_close_rel(ref, hf, rtol=1e-12, atol=1e-12)


def test_siglip_negative_only():
    a, b = make_features(4, 6, 8, dtype=torch.float64)
    ref = R.siglip_loss_reference(a, b, 10.0, -10.0, negative_only=True, upcast=False)
    logits = 10.0 * a @ b.T - 10.0
    assert_close_rel(ref, F.softplus(logits).sum() / 4, rtol=1e-12)


def test_reference_rejects_bad_offset():
    a, b = make_features(4, 5, 8)
    with pytest.raises(ValueError, match="pos_offset"):
        R.clip_loss_reference(a, b, 1.0, pos_offset=2)
