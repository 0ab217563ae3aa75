"""Bad input gives a ValueError/TypeError naming the argument; never a crash or a silent number."""
import math

import pytest
import torch

import fastcon
import fastcon.functional as FC

LOSSES = [FC.clip_loss, FC.siglip_loss]


def feats(n=4, d=8, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize("loss", LOSSES)
def test_empty_batch(loss):
    a, b = torch.randn(0, 8), torch.randn(0, 8)
    with pytest.raises(ValueError, match="image_features.*empty"):
        loss(a, b, 1.0, backend="torch")


@pytest.mark.parametrize("loss", LOSSES)
def test_dim_mismatch(loss):
    with pytest.raises(ValueError, match=r"image_features has shape \(4, 8\).*text_features has shape \(4, 7\)"):
        loss(torch.randn(4, 8), torch.randn(4, 7), 1.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_dimensional_features(loss):
    with pytest.raises(ValueError, match="text_features must be 2-D"):
        loss(torch.randn(4, 8), torch.randn(8), 1.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_dtype(loss):
    with pytest.raises(TypeError, match="image_features must be a floating-point"):
        loss(torch.ones(4, 8, dtype=torch.int64), torch.ones(4, 8, dtype=torch.int64), 1.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_mixed_dtypes(loss):
    with pytest.raises(TypeError, match="same dtype"):
        loss(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), 1.0)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("scale", [torch.ones(2), torch.ones(1, 3)])
def test_non_scalar_scale(loss, scale):
    a, b = feats()
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        loss(a, b, scale)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("scale", [math.inf, math.nan, torch.tensor(math.inf), torch.tensor(math.nan)])
def test_non_finite_scale(loss, scale):
    a, b = feats()
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        loss(a, b, scale)


@pytest.mark.parametrize("loss", LOSSES)
def test_non_finite_bias_and_bad_types(loss):
    a, b = feats()
    with pytest.raises(ValueError, match="logit_bias must be finite"):
        loss(a, b, 1.0, float("nan"))
    with pytest.raises(TypeError, match="logit_scale must be a float"):
        loss(a, b, "10")
    with pytest.raises(TypeError, match="logit_scale must be a floating-point"):
        loss(a, b, torch.tensor(10))
    with pytest.raises(TypeError, match="image_features must be a torch.Tensor"):
        loss([[1.0]], b, 1.0)


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_backend_and_chunk(loss):
    a, b = feats()
    with pytest.raises(ValueError, match="backend must be one of"):
        loss(a, b, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size"):
        loss(a, b, 1.0, chunk_size=-1)


def test_clip_bad_label_smoothing_and_offset():
    a, b = feats()
    with pytest.raises(ValueError, match="label_smoothing"):
        FC.clip_loss(a, b, 1.0, label_smoothing=1.5)
    with pytest.raises(ValueError, match="pos_offset=1"):
        FC.clip_loss(a, b, 1.0, pos_offset=1)


@pytest.mark.parametrize("loss", LOSSES)
def test_rectangular_batch_needs_an_explicit_pos_offset(loss):
    a, b = torch.randn(6, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match="6 rows and text_features 8.*explicit pos_offset"):
        loss(a, b, torch.tensor(10.0), torch.tensor(-1.0))
    ref = loss(a, b, torch.tensor(10.0), torch.tensor(-1.0), pos_offset=2, backend="reference")
    assert torch.allclose(loss(a, b, torch.tensor(10.0), torch.tensor(-1.0), pos_offset=2), ref, rtol=1e-5)
    paired = loss(a, b[:6], torch.tensor(10.0), torch.tensor(-1.0))  # paired: None means 0
    assert torch.equal(paired, loss(a, b[:6], torch.tensor(10.0), torch.tensor(-1.0), pos_offset=0))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, b = feats()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        FC.clip_loss(a, b, 1.0, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_non_finite_features_give_nan_not_a_crash(backend):
    a, b = feats()
    a[1, 2] = float("nan")
    assert torch.isnan(FC.clip_loss(a, b, 10.0, backend=backend))
    assert torch.isnan(FC.siglip_loss(a, b, 10.0, -10.0, backend=backend))
    a[1, 2] = float("inf")
    assert not torch.isfinite(FC.clip_loss(a, b, 10.0, backend=backend))


def test_distributed_arguments():
    a, b = feats()
    with pytest.raises(RuntimeError, match="not initialised"):
        fastcon.ClipLoss(world_size=2, rank=1)(a, b, 10.0)
    with pytest.raises(RuntimeError, match="not initialised"):
        fastcon.SigLipLoss(world_size=2, rank=0)(a, b, 10.0, -10.0)
    with pytest.raises(ValueError, match="rank"):
        fastcon.ClipLoss(world_size=2, rank=2)
    with pytest.raises(ValueError, match="dist_impl"):
        fastcon.SigLipLoss(dist_impl="ring")
    with pytest.raises(TypeError, match="local_loss"):
        FC.clip_loss(a, b, 1.0, local_loss=1)


def test_cuda_half_gemm_needs_torch_2_8(monkeypatch):
    from fastcon.kernels import _common

    monkeypatch.setattr(_common, "_torch_version", lambda: (2, 7))
    ok, reason = _common.cuda_half_gemm_ok()
    assert not ok and "torch >= 2.8" in reason and "out_dtype" in reason
    info = fastcon.backend_info()
    assert info["gemm"]["cuda_half"].startswith("unavailable") and "torch >= 2.8" in info["gemm"]["cuda_half"]
    monkeypatch.setattr(_common, "_torch_version", lambda: (2, 8))
    assert _common.cuda_half_gemm_ok() == (True, None)


def test_backend_info_names_the_engine_ops():
    from fastcon.ops import softmax

    softmax.triton_ops()
    info = fastcon.backend_info()
    for name in info["ops"]["custom_ops"] + info["ops"]["triton_ops"]:
        ns, op = name.split("::")
        assert hasattr(getattr(torch.ops, ns), op)


TOKEN_LOSSES = {
    "filip": lambda x, y, m=None: FC.filip_loss(x, y, 10.0, token_mask=m),
    "maxsim": lambda x, y, m=None: FC.maxsim_loss(x, y, doc_mask=m),
    "pooled": lambda x, y, m=None: FC.pooled_alignment_loss(x, y, word_mask=m),
}


@pytest.mark.parametrize("name", sorted(TOKEN_LOSSES))
def test_token_losses_share_one_rule_for_bad_input(name):
    """Token losses: an empty batch (or no tokens) is a ValueError as for every other loss; a wrong
    dtype a TypeError and a wrong shape a ValueError, each naming what it received; a mask is bool or
    0/1 integers (tokenizers' attention masks) and gives the bool mask's loss."""
    loss = TOKEN_LOSSES[name]
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 4), torch.randn(3, 6, 4)
    for empty in ((x[:0], y[:0]), (x[:, :0], y)):
        with pytest.raises(ValueError, match="empty batch|no tokens"):
            loss(*empty)
    with pytest.raises(TypeError, match="floating-point.*got dtype torch.int64"):
        loss(x.long(), y)
    with pytest.raises(ValueError, match=r"3-D.*got shape \(3, 4\)"):
        loss(x[:, 0], y)
    bool_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]).bool()
    want = loss(x, y, bool_mask)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        assert torch.equal(loss(x, y, bool_mask.to(dtype)), want)
    with pytest.raises(TypeError, match="mask.*got dtype torch.float32"):
        loss(x, y, bool_mask.float())
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 6\), got shape \(3, 5\)"):
        loss(x, y, bool_mask[:, :5])
    with pytest.raises(ValueError, match="only 0 and 1.*2"):
        loss(x, y, bool_mask.long() * 2)


def test_pair_and_negative_masks_follow_the_same_rule():
    torch.manual_seed(0)
    a, b, neg = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 2, 4)
    pair = torch.rand(5, 5) > 0.3
    pair.fill_diagonal_(True)
    want = FC.clip_loss(a, b, 5.0, pair_mask=pair)
    assert torch.equal(FC.clip_loss(a, b, 5.0, pair_mask=pair.long()), want)
    with pytest.raises(TypeError, match="pair_mask.*got dtype torch.float32"):
        FC.clip_loss(a, b, 5.0, pair_mask=pair.float())
    keep = torch.tensor([[1, 0], [1, 1], [0, 0], [1, 1], [0, 1]])
    want = FC.negatives_clip_loss(a, b, neg, 5.0, negative_mask=keep.bool())
    assert torch.equal(FC.negatives_clip_loss(a, b, neg, 5.0, negative_mask=keep), want)
    with pytest.raises(ValueError, match="negative_mask must hold only 0 and 1"):
        FC.negatives_clip_loss(a, b, neg, 5.0, negative_mask=keep * 3)
