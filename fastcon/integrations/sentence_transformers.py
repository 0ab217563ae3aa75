"""sentence-transformers' MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss,
GISTEmbedLoss, CachedGISTEmbedLoss and MatryoshkaLoss with the loss on fastcon's engine
(docs/losses.md §2.4, §2.6, §2.7)::

    from fastcon.integrations.sentence_transformers import MultipleNegativesRankingLoss
    loss = MultipleNegativesRankingLoss(model)              # as sentence_transformers.losses'

The classes subclass sentence-transformers' own, so constructors, ``forward(sentence_features,
labels)``, ``compute_loss_from_embeddings``, ``get_config_dict`` and trainer integration are theirs; only
the loss computation is replaced. Where theirs forms the (B, B·(1+m)) similarity matrix of every
direction (and CachedMNRL one per mini-batch of rows), ours runs
``fastcon.functional.multiple_negatives_ranking_loss``: O(B·(2+m)·D) memory beyond one chunk of rows.
The cached loss keeps the three-step mini-batch gradient caching of the embeddings (GradCache).
The GIST losses form the guide model's similarity tile beside the student's and drop false negatives
in the tile (``fastcon.functional.gist_loss``), where theirs builds a B×B guide matrix beside every
student matrix. ``MatryoshkaLoss`` wrapping one of these four runs every dimension in one call of the
engine loss from embeddings computed once (theirs runs the whole inner loss once per dimension); around
any other loss it is theirs.

Supported similarity functions: ``sentence_transformers.util.cos_sim`` and ``dot_score``. Extra
keyword-only options: ``backend`` and ``chunk_size`` (fastcon's). sentence-transformers is an optional
dependency: this module imports without it, and the classes say what to install.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",  # noqa: F822 (built lazily)
           "GISTEmbedLoss", "CachedGISTEmbedLoss", "MatryoshkaLoss"]

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

    group = _gather_group(gather)
    if group is None:
        return queries, docs, 0
    from fastcon.distributed import all_gather_with_grad

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
    dims, weights = _matryoshka_of(loss)
    similarity = _similarity_name(loss.similarity_fct)
    return multiple_negatives_ranking_loss(
        queries, docs, scale=float(loss.scale), similarity="cos" if dims else similarity,
        directions=loss.directions, partition_mode=loss.partition_mode, hardness_mode=loss.hardness_mode,
        hardness_strength=float(loss.hardness_strength), backend=backend, chunk_size=chunk_size,
        rank_offset=offset, world_queries=world_q if world_q is not queries else None,
        world_docs=world_d if world_q is not queries else None, cache_limit=cache_limit, matryoshka_dims=dims,
        matryoshka_weights=weights)


def _matryoshka_of(loss):
    """(dims, weights) a wrapping ``MatryoshkaLoss`` set for this step, or (None, None). Its ``shrink``
    normalises every prefix whatever the similarity: a dot product of unit prefixes, the cosine."""
    return getattr(loss, "matryoshka", None) or (None, None)


def _gather_group(gather: bool):
    """The process group of ``gather_across_devices`` (None on one process)."""
    import torch.distributed as dist

    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _gist_loss(loss, embeddings, guide_embeddings, backend, chunk_size, cache_limit=None):
    """GISTEmbed on the engine from the student's and the guide's column embeddings (anchor,
    positive, then any negatives)."""
    from fastcon.functional import gist_loss

    if len(embeddings) < 2 or len(guide_embeddings) != len(embeddings):
        raise ValueError(f"Expected at least 2 embeddings and as many from the guide, got {len(embeddings)} and "
                         f"{len(guide_embeddings)}")
    anchor, positive, *negs = embeddings
    dev = anchor.device
    g_anchor, g_positive, *g_negs = (g.to(dev) for g in guide_embeddings)
    dims, weights = _matryoshka_of(loss)
    return gist_loss(anchor, positive, g_anchor, g_positive, negatives=torch.stack(negs, 1) if negs else None,
                     guide_negatives=torch.stack(g_negs, 1) if g_negs else None,
                     temperature=float(loss.temperature), margin_strategy=loss.margin_strategy,
                     margin=float(loss.margin), contrast_anchors=bool(loss.contrast_anchors),
                     contrast_positives=bool(loss.contrast_positives),
                     process_group=_gather_group(loss.gather_across_devices), backend=backend, chunk_size=chunk_size,
                     cache_limit=cache_limit, matryoshka_dims=dims, matryoshka_weights=weights)


def _embed(model, features):
    """Each column's ``sentence_embedding`` (one merged forward pass where sentence-transformers has it)."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # (older releases: one forward per column)
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


def _guide_features(loss, features):
    """The guide's inputs: the same features, or with another tokenizer (``must_retokenize``) the
    texts decoded with the student's and tokenized by the guide, as sentence-transformers does."""
    if not loss.must_retokenize:
        return [dict(f) for f in features]  # (shallow copies: the guide writes its outputs into them)
    from sentence_transformers.util import batch_to_device

    out = []
    for f in features:
        ids = f["input_ids"]
        if "cu_seq_lens_q" in f:  # packed sequences: one row of ids cut at the sequence boundaries
            flat, cuts = ids[0].tolist(), f["cu_seq_lens_q"].tolist()
            ids = [flat[s:e] for s, e in zip(cuts[:-1], cuts[1:])]
        texts = loss.tokenizer.batch_decode(ids, skip_special_tokens=True)
        out.append(batch_to_device(loss.guide.preprocess(texts), loss.guide.device))
    return out


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

    class GISTEmbedLoss(losses.GISTEmbedLoss):
        __doc__ = ("sentence-transformers' GISTEmbedLoss (same constructor, forward and config) with the loss on "
                   "fastcon's engine: the guide's similarities are formed tile by tile beside the student's and "
                   "decide the false negatives there (``fastcon.functional.gist_loss``), with no B×B matrix of "
                   "either model. Any number of negative columns. Extra keyword-only options: ``backend`` and "
                   "``chunk_size``.")

        def __init__(self, model, guide, temperature: float = 0.01, margin_strategy="absolute", margin: float = 0.0,
                     contrast_anchors: bool = True, contrast_positives: bool = True,
                     gather_across_devices: bool = False, *, backend: str = "auto", chunk_size=None) -> None:
            super().__init__(model, guide, temperature=temperature, margin_strategy=margin_strategy, margin=margin,
                             contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
                             gather_across_devices=gather_across_devices)
            self.backend, self.chunk_size = backend, chunk_size

        def forward(self, sentence_features, labels=None) -> torch.Tensor:
            features = list(sentence_features)
            guide_features = _guide_features(self, features)
            embeddings = _embed(self.model, features)
            with torch.no_grad():
                guide_embeddings = _embed(self.guide, guide_features)
            return self.compute_loss_from_embeddings(embeddings, guide_embeddings)

        def compute_loss_from_embeddings(self, embeddings, guide_embeddings) -> torch.Tensor:
            """The loss of the student's and the guide's column embeddings (anchor, positive, negatives)."""
            return _gist_loss(self, list(embeddings), list(guide_embeddings), self.backend, self.chunk_size)

    class CachedGISTEmbedLoss(losses.CachedGISTEmbedLoss):
        __doc__ = ("sentence-transformers' CachedGISTEmbedLoss (same constructor and forward; the mini-batch "
                   "gradient caching of the embeddings kept) with the loss computed at once on fastcon's engine "
                   "instead of per mini-batch of anchors. Extra keyword-only options: ``backend`` and "
                   "``chunk_size`` (default: ``mini_batch_size`` rows of the stacked product per chunk, no logits "
                   "kept between the two passes).")

        def __init__(self, model, guide, temperature: float = 0.01, mini_batch_size: int = 32,
                     mini_batch_num_tokens=None, show_progress_bar: bool = False, margin_strategy="absolute",
                     margin: float = 0.0, contrast_anchors: bool = True, contrast_positives: bool = True,
                     gather_across_devices: bool = False, *, backend: str = "auto", chunk_size=None) -> None:
            super().__init__(model, guide, temperature=temperature, mini_batch_size=mini_batch_size,
                             mini_batch_num_tokens=mini_batch_num_tokens, show_progress_bar=show_progress_bar,
                             margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast_anchors,
                             contrast_positives=contrast_positives, gather_across_devices=gather_across_devices)
            self.backend, self.chunk_size = backend, chunk_size

        def compute_loss_from_embeddings(self, embeddings, guide_embeddings) -> torch.Tensor:
            """The loss of whole-batch embeddings (no gradient caching), as the uncached loss's."""
            chunk = self.chunk_size if self.chunk_size is not None else self.mini_batch_size
            return _gist_loss(self, list(embeddings), list(guide_embeddings), self.backend, chunk, cache_limit=0)

        def calculate_loss(self, reps, reps_guided, *, with_backward: bool = False) -> torch.Tensor:
            if len(reps) != len(reps_guided):
                raise ValueError("reps and reps_guided must have the same length")
            loss = self.compute_loss_from_embeddings([torch.cat(r) for r in reps], [torch.cat(r) for r in reps_guided])
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

    engine_losses = (MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss, GISTEmbedLoss,
                     CachedGISTEmbedLoss)

    class MatryoshkaLoss(losses.MatryoshkaLoss):
        __doc__ = ("sentence-transformers' MatryoshkaLoss (same constructor, forward and config: the dims sorted "
                   "descending with their weights, ``n_dims_per_step`` dims drawn with Python's ``random``). "
                   "Around fastcon's MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss, GISTEmbedLoss "
                   "or CachedGISTEmbedLoss the embeddings are computed once and every dimension's loss runs in one "
                   "call of the engine loss (``matryoshka_dims`` of ``fastcon.functional``), each prefix "
                   "normalised as their ``shrink`` does; around any other loss it is theirs.")

        def __init__(self, model, loss, matryoshka_dims, matryoshka_weights=None, n_dims_per_step: int = -1) -> None:
            super().__init__(model, loss, matryoshka_dims, matryoshka_weights=matryoshka_weights,
                             n_dims_per_step=n_dims_per_step)
            self.engine = isinstance(loss, engine_losses)
            if self.engine:
                # theirs wraps a cached loss's calculate_loss to run once per dim; ours takes every dim at once
                loss.__dict__.pop("calculate_loss", None)

        def forward(self, sentence_features, labels=None) -> torch.Tensor:
            if not self.engine:
                return super().forward(sentence_features, labels)
            import random

            chosen = range(len(self.matryoshka_dims))
            if 0 < self.n_dims_per_step < len(chosen):
                chosen = sorted(random.sample(chosen, self.n_dims_per_step))
            self.loss.matryoshka = (tuple(self.matryoshka_dims[k] for k in chosen),
                                    tuple(float(self.matryoshka_weights[k]) for k in chosen))
            try:
                return self.loss(sentence_features, labels)
            finally:
                self.loss.matryoshka = None

    classes = {"MultipleNegativesRankingLoss": MultipleNegativesRankingLoss,
               "CachedMultipleNegativesRankingLoss": CachedMultipleNegativesRankingLoss,
               "GISTEmbedLoss": GISTEmbedLoss, "CachedGISTEmbedLoss": CachedGISTEmbedLoss,
               "MatryoshkaLoss": MatryoshkaLoss}
    for cls in classes.values():
        cls.__module__ = __name__
    return classes


def __getattr__(name):
    if name in __all__:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
