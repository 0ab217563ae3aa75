"""fastcon.integrations.sentence_transformers.MatryoshkaLoss against sentence-transformers' own: one
training step of all-MiniLM-L6-v2 with MatryoshkaLoss around each of fastcon's engine losses (MNRL,
CachedMNRL, GISTEmbed, CachedGISTEmbed; all dims in one engine call) and around a loss of theirs (their
behaviour), with every dim and with ``n_dims_per_step`` (the same dims drawn from the same seed); the
float64 copy of the models as the error budget; the constructor."""
import inspect
import random
import warnings

import pytest

from helpers import assert_close_rel
from test_st_gist import _step as gist_step  # noqa: E402
from test_st_gist import models  # noqa: F401 (the fixture)

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import util as st_util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402

from fastcon.integrations import sentence_transformers as ours  # noqa: E402

DIMS, WEIGHTS = [64, 384, 128, 256, 32], [1, 2, 1, 0.5, 1]  # (unsorted: both sort them with their weights)


def _step(model, loss, seed=0):
    random.seed(seed)  # n_dims_per_step draws with Python's random, theirs and ours alike
    return gist_step(model, loss)


INNER = {
    "mnrl": lambda lib, m, g: lib.MultipleNegativesRankingLoss(m, scale=5.0),
    "mnrl-dot": lambda lib, m, g: lib.MultipleNegativesRankingLoss(m, scale=0.5, similarity_fct=st_util.dot_score),
    "cached-mnrl": lambda lib, m, g: lib.CachedMultipleNegativesRankingLoss(m, scale=5.0, mini_batch_size=4),
    "gist": lambda lib, m, g: lib.GISTEmbedLoss(m, g, temperature=0.2),
    "cached-gist": lambda lib, m, g: lib.CachedGISTEmbedLoss(m, g, temperature=0.2, mini_batch_size=4),
}


@pytest.mark.parametrize("inner,n_dims,float64", [("mnrl", -1, True), ("mnrl-dot", 2, False),
                                                   ("cached-mnrl", -1, False), ("cached-mnrl", 3, False),
                                                   ("gist", -1, True), ("cached-gist", 2, False)])
def test_training_step_against_theirs(models, inner, n_dims, float64):  # noqa: F811
    model, guide, model64, guide64 = models
    make = INNER[inner]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_t, grads_t = _step(model, st_losses.MatryoshkaLoss(model, make(st_losses, model, guide), DIMS, WEIGHTS,
                                                                n_dims_per_step=n_dims))
        mine = ours.MatryoshkaLoss(model, make(ours, model, guide), DIMS, WEIGHTS, n_dims_per_step=n_dims)
        loss_o, grads_o = _step(model, mine)
        if float64:
            loss_64, grads_64 = _step(model64, st_losses.MatryoshkaLoss(model64, make(st_losses, model64, guide64),
                                                                        DIMS, WEIGHTS, n_dims_per_step=n_dims))
    assert mine.engine and mine.loss.matryoshka is None  # the engine path ran, and left nothing set
    assert loss_t > 0.5
    assert_close_rel(loss_o, loss_t, rtol=1e-5, name="loss against theirs")
    assert_close_rel(grads_o, grads_t, rtol=1e-4, atol=1e-7, name="parameter gradients against theirs")
    if float64:
        err_t = (grads_t - grads_64).norm() / grads_64.norm()
        err_o = (grads_o - grads_64).norm() / grads_64.norm()
        assert err_o <= max(2 * err_t, 1e-5), (float(err_o), float(err_t))


def test_around_a_loss_of_theirs_it_is_theirs(models):  # noqa: F811
    model = models[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _step(model, st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), DIMS,
                                                       WEIGHTS, n_dims_per_step=2))
        wrapped = ours.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), DIMS, WEIGHTS,
                                      n_dims_per_step=2)
        mine = _step(model, wrapped)
    assert not wrapped.engine
    assert_close_rel(mine[0], theirs[0], rtol=0, name="loss")
    assert_close_rel(mine[1], theirs[1], rtol=0, name="gradients")


def test_constructor_and_config_match_theirs(models):  # noqa: F811
    model = models[0]
    assert issubclass(ours.MatryoshkaLoss, st_losses.MatryoshkaLoss)
    p_mine = inspect.signature(ours.MatryoshkaLoss.__init__).parameters
    p_theirs = inspect.signature(st_losses.MatryoshkaLoss.__init__).parameters
    assert list(p_mine) == list(p_theirs)
    for name in p_theirs:
        assert p_mine[name].default == p_theirs[name].default, name
    mine = ours.MatryoshkaLoss(model, ours.MultipleNegativesRankingLoss(model), DIMS, WEIGHTS)
    theirs = st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), DIMS, WEIGHTS)
    assert mine.matryoshka_dims == theirs.matryoshka_dims == (384, 256, 128, 64, 32)
    assert mine.matryoshka_weights == theirs.matryoshka_weights == (2, 0.5, 1, 1, 1)
    assert mine.get_config_dict() == theirs.get_config_dict()
    with pytest.raises(ValueError, match="exceed"):
        ours.MatryoshkaLoss(model, ours.MultipleNegativesRankingLoss(model), [512, 64])
    with pytest.raises(ValueError, match="same length"):
        ours.MatryoshkaLoss(model, ours.MultipleNegativesRankingLoss(model), [256, 64], [1.0])
