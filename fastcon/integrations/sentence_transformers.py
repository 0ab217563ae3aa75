"""sentence-transformers' MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss with
the loss on fastcon's engine (docs/losses.md §2.4)::

    from fastcon.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)              # as sentence_transformers.losses'

The classes subclass sentence-transformers' own, so constructors, ``forward(sentence_features,
labels)``, ``compute_loss_from_embeddings``, ``get_config_dict`` and trainer integration are theirs; only
the loss computation is replaced. Where theirs forms the (B, B·(1+m)) similarity matrix of every
direction (and CachedMNRL one per mini-batch of rows), ours runs
``fastcon.functional.multiple_negatives_ranking_loss``: O(B·(2+m)·D) memory beyond one chunk of rows.
The cached loss keeps the three-step mini-batch gradient caching of the embeddings (GradCache).

Supported similarity functions: ``sentence_transformers.util.cos_sim`` and ``dot_score``. Extra
keyword-only options: ``backend`` and ``chunk_size`` (fastcon's). sentence-transformers is an optional
dependency: this module imports without it, and the classes say what to install.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"]  # noqa: F822 (built lazily)

_INSTALL = "pip install 'fastcon[sentence-transformers]' (or pip install sentence-transformers)"


def _import_st():
    try:
        from sentence_transformers import util
        from sentence_transformers.sentence_transformer import losses
    except ImportError as err:
        raise ImportError(f"fastcon.integrations.sentence_transformers needs sentence-transformers: {_INSTALL}") \
            from err
    return losses, util


def _similarity_name(fn) -> str:
    """'cos' or 'dot' for the similarity functions the engine computes; a ValueError otherwise."""
    _, util = _import_st()
    if fn is util.cos_sim or fn is getattr(util, "cos_sim", None):
        return "cos"
    if fn is util.dot_score:
        return "dot"
    name = getattr(fn, "__name__", type(fn).__name__)
    raise ValueError(f"fastcon's MultipleNegativesRankingLoss computes similarity_fct=cos_sim or dot_score "
                     f"(sentence_transformers.util), got {name!r}; use sentence_transformers.losses for others")


def _world(queries, docs, gather: bool):
    """(world queries, world docs, this rank's offset): the rows of every rank when gathering, with
    gradients flowing home (each rank receives the sum of every rank's gradient of its rows)."""
    import torch.distributed as dist

    if not (gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return queries, docs, 0
    from fastcon.distributed import all_gather_with_grad

    group = dist.group.WORLD
    return (all_gather_with_grad(queries, group), [all_gather_with_grad(d, group) for d in docs],
            dist.get_rank() * queries.shape[0])


def _engine_loss(loss, embeddings, backend, chunk_size, cache_limit=None):
    from fastcon.functional import multiple_negatives_ranking_loss

    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    queries, docs = embeddings[0], list(embeddings[1:])
    world_q, world_d, offset = _world(queries, docs, loss.gather_across_devices)
    b = queries.shape[0]
    if offset or world_q is not queries:
        # this rank's rows as slices of the gathered tensors, as sentence-transformers takes them
        queries, docs = world_q[offset:offset + b], [d[offset:offset + b] for d in world_d]
    return multiple_negatives_ranking_loss(
        queries, docs, scale=float(loss.scale), similarity=_similarity_name(loss.similarity_fct),
        directions=loss.directions, partition_mode=loss.partition_mode, hardness_mode=loss.hardness_mode,
        hardness_strength=float(loss.hardness_strength), backend=backend, chunk_size=chunk_size,
        rank_offset=offset, world_queries=world_q if world_q is not queries else None,
        world_docs=world_d if world_q is not queries else None, cache_limit=cache_limit)


@functools.lru_cache(maxsize=None)
def _classes():
    losses, util = _import_st()
    cos_sim = util.cos_sim

    class MultipleNegativesRankingLoss(losses.MultipleNegativesRankingLoss):
        __doc__ = (f"sentence-transformers' MultipleNegativesRankingLoss (same constructor and forward) with "
                   f"the loss on fastcon's engine. Extra keyword-only options: ``backend`` and ``chunk_size``.\n\n"
                   f"{losses.MultipleNegativesRankingLoss.__init__.__doc__ or ''}")

        def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, gather_across_devices: bool = False,
                     directions=("query_to_doc",), partition_mode="joint", hardness_mode=None,
                     hardness_strength: float = 0.0, *, backend: str = "auto", chunk_size=None) -> None:
            super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                             gather_across_devices=gather_across_devices, directions=directions,
                             partition_mode=partition_mode, hardness_mode=hardness_mode,
                             hardness_strength=hardness_strength)
            _similarity_name(self.similarity_fct)
            self.backend, self.chunk_size = backend, chunk_size

        def compute_loss_from_embeddings(self, embeddings, labels=None) -> torch.Tensor:
            return _engine_loss(self, list(embeddings), self.backend, self.chunk_size)

    class CachedMultipleNegativesRankingLoss(losses.CachedMultipleNegativesRankingLoss):
        __doc__ = ("sentence-transformers' CachedMultipleNegativesRankingLoss (same constructor and forward; "
                   "the mini-batch gradient caching of the embeddings kept) with the loss computed at once on "
                   "fastcon's engine instead of per mini-batch of rows. Extra keyword-only options: "
                   "``backend`` and ``chunk_size`` (default: ``mini_batch_size`` rows of the stacked "
                   "product per chunk, no logits kept between the two passes: at most the working memory of "
                   "theirs).")

        def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, mini_batch_size: int = 32,
                     mini_batch_num_tokens=None, gather_across_devices: bool = False, directions=("query_to_doc",),
                     partition_mode="joint", show_progress_bar: bool = False, hardness_mode=None,
                     hardness_strength: float = 0.0, *, backend: str = "auto", chunk_size=None) -> None:
            super().__init__(model, scale=scale, similarity_fct=similarity_fct,
                             mini_batch_size=mini_batch_size, mini_batch_num_tokens=mini_batch_num_tokens,
                             gather_across_devices=gather_across_devices, directions=directions,
                             partition_mode=partition_mode, show_progress_bar=show_progress_bar,
                             hardness_mode=hardness_mode, hardness_strength=hardness_strength)
            _similarity_name(self.similarity_fct)
            self.backend, self.chunk_size = backend, chunk_size

        def compute_loss_from_embeddings(self, embeddings, labels=None) -> torch.Tensor:
            """The loss of whole-batch embeddings (no gradient caching), as the uncached loss's."""
            # chunks of mini_batch_size rows and no logits kept between the passes: the working memory
            # of theirs at most
            chunk = self.chunk_size if self.chunk_size is not None else self.mini_batch_size
            return _engine_loss(self, list(embeddings), self.backend, chunk, cache_limit=0)

        def calculate_loss(self, reps, labels=None, *, with_backward: bool = False) -> torch.Tensor:
            loss = self.compute_loss_from_embeddings([torch.cat(r) for r in reps], labels)
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

    MultipleNegativesRankingLoss.__module__ = CachedMultipleNegativesRankingLoss.__module__ = __name__
    return {"MultipleNegativesRankingLoss": MultipleNegativesRankingLoss,
            "CachedMultipleNegativesRankingLoss": CachedMultipleNegativesRankingLoss}


def __getattr__(name):
    if name in __all__:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
