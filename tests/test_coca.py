"""fastcon.CoCaLoss against open_clip's CoCaLoss: signatures, attributes, tuple and dict returns, losses
and gradients (image and text features, caption logits, logit scale) in one process, the zero-weight
contrastive path, padding, and every (local_loss, gather_with_grad) mode on two gloo ranks (ours and
open_clip's in the same processes, on the same collectives); then bad inputs.

open_clip's package ``__init__`` imports torchvision, which this test environment lacks, so its
``loss.py`` is loaded on its own (``fastcon.bench.providers._load_open_clip_loss``, as tests/test_modules.py
does); the comparisons skip, with a reason, where open_clip is not installed.
"""
import datetime
import importlib.util
import inspect

import pytest
import torch
import torch.nn.functional as F

import fastcon
from helpers import assert_close_rel, close_gloo, make_features, run_gloo

MODES = [(False, False), (False, True), (True, False), (True, True)]
RTOL = 1e-5  # fp32, relative to the largest entry


def _open_clip_loss():
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch; make test does)")
    from fastcon.bench.providers import _load_open_clip_loss

    return _load_open_clip_loss()


@pytest.fixture(scope="module")
def oc():
    return _open_clip_loss()


def _caption_data(b, t, v, *, seed=0, pad_id=0, pad_fraction=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < pad_fraction] = pad_id
    labels[:, -1] = pad_id  # trailing padding, as tokenised captions have
    labels[:, 0] = torch.where(labels[:, 0] == pad_id, (pad_id + 1) % v, labels[:, 0])  # a kept token per row
    return logits, labels


def _run(module, x, y, logits, labels, scale, **kw):
    """(losses, gradients of x, y, logits, scale) of one call, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, y, logits, scale)]
    out = module(leaves[0], leaves[1], leaves[2], labels, leaves[3], **kw)
    losses = list(out.values()) if isinstance(out, dict) else list(out)
    total = sum(loss for loss in losses if loss.requires_grad)
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return out, grads


def _compare_grads(ours, theirs, rtol=RTOL):
    for name, g, e in zip(("image_features", "text_features", "logits", "logit_scale"), ours, theirs):
        assert (g is None) == (e is None), name
        if e is not None:
            assert g.dtype == e.dtype and g.shape == e.shape, name
            assert_close_rel(g, e, rtol=rtol, atol=1e-7, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------------
# One process


def _positional(fn):
    params = list(inspect.signature(fn).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [(p.name, p.default) for p in params if p.kind in kinds]


def test_signatures_and_attributes_match_open_clip(oc):
    assert _positional(fastcon.CoCaLoss.__init__) == _positional(oc.CoCaLoss.__init__)
    assert _positional(fastcon.CoCaLoss.forward) == _positional(oc.CoCaLoss.forward)
    kw_only = [p.name for p in inspect.signature(fastcon.CoCaLoss.__init__).parameters.values()
               if p.kind == inspect.Parameter.KEYWORD_ONLY]
    assert kw_only == ["label_smoothing", "backend", "chunk_size", "process_group"]
    ours, theirs = fastcon.CoCaLoss(2.0, 1.0, pad_id=5), oc.CoCaLoss(2.0, 1.0, pad_id=5)
    assert isinstance(ours, fastcon.ClipLoss)
    for attr in ("caption_loss_weight", "clip_loss_weight", "local_loss", "gather_with_grad", "rank", "world_size"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert isinstance(ours.caption_loss, torch.nn.CrossEntropyLoss) and ours.caption_loss.ignore_index == 5
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("caption_w,clip_w,pad_id", [(2.0, 1.0, 0), (1.0, 0.5, 3), (1, 2, -100)])
def test_losses_and_gradients_equal_open_clip(oc, caption_w, clip_w, pad_id):
    x, y = make_features(33, 33, 24, seed=2)
    logits, labels = _caption_data(33, 9, 17, seed=3, pad_id=pad_id)
    scale = torch.tensor(14.3)
    (got_clip, got_cap), got_g = _run(fastcon.CoCaLoss(caption_w, clip_w, pad_id), x, y, logits, labels, scale)
    (want_clip, want_cap), want_g = _run(oc.CoCaLoss(caption_w, clip_w, pad_id), x, y, logits, labels, scale)
    for got, want, name in ((got_clip, want_clip, "clip"), (got_cap, want_cap, "caption")):
        assert got.shape == want.shape == () and got.dtype == want.dtype == torch.float32, name
        assert_close_rel(got, want, rtol=RTOL, name=f"{name} loss")
    _compare_grads(got_g, want_g)
    # The dict return: the same keys and values.
    got, got_g = _run(fastcon.CoCaLoss(caption_w, clip_w, pad_id), x, y, logits, labels, scale, output_dict=True)
    want, _ = _run(oc.CoCaLoss(caption_w, clip_w, pad_id), x, y, logits, labels, scale, output_dict=True)
    assert list(got) == list(want) == ["contrastive_loss", "caption_loss"]
    for key in got:
        assert_close_rel(got[key], want[key], rtol=RTOL, name=key)
    _compare_grads(got_g, want_g)


def test_keyword_extras_reach_the_contrastive_loss():
    x, y = make_features(12, 12, 8)
    logits, labels = _caption_data(12, 4, 7)
    scale = torch.tensor(10.0)
    clip, cap = fastcon.CoCaLoss(1.0, 3.0, label_smoothing=0.1, backend="torch", chunk_size=5)(
        x, y, logits, labels, scale)
    assert_close_rel(clip, 3.0 * fastcon.functional.clip_loss(x, y, scale, label_smoothing=0.1), rtol=RTOL)
    assert_close_rel(cap, F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=0), rtol=0.0)


@pytest.mark.parametrize("clip_w", [0, 0.0])
def test_zero_clip_weight_is_open_clips_int64_zero(oc, clip_w):
    x, y = make_features(6, 6, 8)
    logits, labels = _caption_data(6, 5, 11)
    scale = torch.tensor(10.0)
    (got_clip, got_cap), got_g = _run(fastcon.CoCaLoss(1.5, clip_w), x, y, logits, labels, scale)
    (want_clip, want_cap), want_g = _run(oc.CoCaLoss(1.5, clip_w), x, y, logits, labels, scale)
    assert got_clip.dtype == want_clip.dtype == torch.int64 and got_clip.shape == () and got_clip.item() == 0
    assert got_clip.device == logits.device and not got_clip.requires_grad
    assert torch.equal(got_cap, want_cap)
    assert got_g[0] is None and got_g[1] is None and got_g[3] is None  # the features are not used
    _compare_grads(got_g, want_g)
    # The features are not read at all, as in open_clip: an unpaired batch is no error here.
    fastcon.CoCaLoss(1.5, clip_w)(x, y[:3], logits, labels, scale)
    out = fastcon.CoCaLoss(1.5, clip_w)(x, y, logits, labels, scale, output_dict=True)
    assert (out["contrastive_loss"] + out["caption_loss"]).dtype == torch.float32


def test_pad_tokens_are_ignored():
    pad = 4
    logits, labels = _caption_data(5, 7, 9, seed=1, pad_id=pad, pad_fraction=0.4)
    x, y = make_features(5, 5, 8)
    loss = fastcon.CoCaLoss(1.0, 1.0, pad_id=pad)
    mask = labels != pad
    assert 0 < mask.sum() < mask.numel()
    _, cap = loss(x, y, logits, labels, 10.0)
    expected = F.cross_entropy(logits[mask].double(), labels[mask])  # the mean over the kept tokens only
    assert_close_rel(cap, expected, rtol=1e-6)
    # Changing the logits of padded tokens changes nothing; their gradient is zero.
    changed = logits.clone()
    changed[~mask] = 100.0 * torch.randn_like(changed[~mask])
    assert torch.equal(loss(x, y, changed, labels, 10.0)[1], cap)
    z = logits.clone().requires_grad_(True)
    loss(x, y, z, labels, 10.0)[1].backward()
    assert torch.all(z.grad[~mask] == 0) and torch.all(z.grad[mask].abs().sum(-1) > 0)


def test_all_padding_is_nan_as_open_clip(oc):
    x, y = make_features(3, 3, 8)
    logits = torch.randn(3, 4, 6)
    labels = torch.zeros(3, 4, dtype=torch.long)
    assert torch.isnan(oc.CoCaLoss(1.0, 1.0)(x, y, logits, labels, 10.0)[1])
    assert torch.isnan(fastcon.CoCaLoss(1.0, 1.0)(x, y, logits, labels, 10.0)[1])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_other_integer_labels_are_cast(dtype):
    """An extension: open_clip's cross-entropy takes int64 labels only."""
    x, y = make_features(4, 4, 8)
    logits, labels = _caption_data(4, 6, 10, seed=7)
    loss = fastcon.CoCaLoss(1.0, 1.0)
    assert torch.equal(loss(x, y, logits, labels.to(dtype), 10.0)[1], loss(x, y, logits, labels, 10.0)[1])


def test_unpaired_batch_is_a_value_error():
    a, _ = make_features(6, 6, 8)
    _, b = make_features(9, 9, 8, seed=1)
    logits, labels = _caption_data(6, 3, 5)
    with pytest.raises(ValueError, match=r"6 rows.*9.*clip_loss"):
        fastcon.CoCaLoss(1.0, 1.0)(a, b, logits, labels, 10.0)


# ---------------------------------------------------------------------------------------------------
# Bad inputs

@pytest.mark.parametrize("args,kwargs,exc,match", [
    (("2", 1.0), {}, TypeError, "caption_loss_weight"),
    ((2.0, None), {}, TypeError, "clip_loss_weight"),
    ((True, 1.0), {}, TypeError, "caption_loss_weight"),
    ((1.0, 1.0, 0.5), {}, TypeError, "pad_id"),
    ((1.0, 1.0), dict(pad_id="0"), TypeError, "pad_id"),
    ((1.0, 1.0), dict(pad_id=True), TypeError, "pad_id"),
    ((1.0, 1.0), dict(use_horovod=True), ValueError, "horovod"),
    ((1.0, 1.0), dict(rank=2, world_size=2), ValueError, "rank"),
])
def test_bad_constructor_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastcon.CoCaLoss(*args, **kwargs)


def _bad_inputs():
    logits, labels = _caption_data(4, 6, 10)
    return [
        ("logits 2-D", logits[:, 0], labels, ValueError, r"logits must have shape \(B, T, V\)"),
        ("logits 4-D", logits[None], labels, ValueError, r"logits must have shape \(B, T, V\)"),
        ("logits integer", labels[..., None].expand(4, 6, 10), labels, TypeError, "logits must be a floating"),
        ("logits a list", logits.tolist(), labels, TypeError, "logits must be a tensor"),
        ("labels float", logits, labels.float(), TypeError, "labels must be integer"),
        ("labels bool", logits, labels > 0, TypeError, "labels must be integer"),
        ("labels 1-D", logits, labels[:, 0], ValueError, r"labels must have shape \(B, T\)"),
        ("labels 3-D", logits, labels[..., None], ValueError, r"labels must have shape \(B, T\)"),
        ("batch mismatch", logits, labels[:3], ValueError, "batch sizes differ.*logits has 4.*labels has 3"),
        ("token mismatch", logits, labels[:, :5], ValueError, "token counts differ.*T=6.*T=5"),
        ("labels None", logits, None, TypeError, "labels must be an integer tensor"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_forward_inputs(case):
    _, logits, labels, exc, match = case
    x, y = make_features(4, 4, 8)
    for clip_w in (1.0, 0.0):  # checked before the contrastive part, whether it runs or not
        with pytest.raises(exc, match=match):
            fastcon.CoCaLoss(1.0, clip_w)(x, y, logits, labels, 10.0)


# ---------------------------------------------------------------------------------------------------
# Two gloo ranks: every mode, ours and open_clip's CoCaLoss in the same processes. One spawn runs the
# four modes (spawning and the engine's first distributed call cost seconds a process); each mode is
# then checked, and reported, by its own parametrised case.

def _gloo_worker(rank, world, port, out):
    import traceback

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from fastcon.bench.providers import _load_open_clip_loss

        oc = _load_open_clip_loss()
        results = {}
        for local_loss, gather_with_grad in MODES:
            errs = results[local_loss, gather_with_grad] = {}
            kw = dict(rank=rank, world_size=world, local_loss=local_loss, gather_with_grad=gather_with_grad)
            for n in (1, 6):
                # Unpaired random rows: a contrastive loss of order log(2n), never a rounding residue near 0.
                x, y = make_features(n, n, 16, seed=10 * n + rank, paired=False)
                if n > 1:  # a text row on both ranks
                    y[0] = make_features(n, n, 16, seed=10 * n + (rank + 1) % world, paired=False)[1][0]
                logits, labels = _caption_data(n, 5, 13, seed=100 * n + rank)
                scale = torch.tensor(10.0 + n)  # the same on every rank: a replicated parameter, as in training
                want, want_g = _run(oc.CoCaLoss(2.0, 0.7, **kw), x, y, logits, labels, scale, output_dict=True)
                got, got_g = _run(fastcon.CoCaLoss(2.0, 0.7, **kw), x, y, logits, labels, scale, output_dict=True)
                assert want["contrastive_loss"].item() > 0.05, want  # a loss well above rounding
                for key in ("contrastive_loss", "caption_loss"):
                    errs[f"n={n} {key}"] = abs(got[key].item() - want[key].item()) / abs(want[key].item())
                for name, g, e in zip(("image", "text", "logits", "scale"), got_g, want_g):
                    errs[f"n={n} grad {name}"] = ((g - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
        out.put((rank, results))
    except Exception:
        out.put((rank, traceback.format_exc()))
    finally:
        close_gloo()


@pytest.fixture(scope="module")
def gloo_results(oc):
    return run_gloo(_gloo_worker, 2, timeout=120)


@pytest.mark.parametrize("local_loss,gather_with_grad", MODES)
def test_every_mode_on_two_gloo_ranks_equals_open_clip(gloo_results, local_loss, gather_with_grad):
    assert sorted(gloo_results) == [0, 1]
    for rank, results in gloo_results.items():
        assert isinstance(results, dict), f"rank {rank} failed:\n{results}"
        errs = results[local_loss, gather_with_grad]
        worst = max(errs, key=errs.get)
        assert errs[worst] < 2e-5, (rank, worst, errs)
