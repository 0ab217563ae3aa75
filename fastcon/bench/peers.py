"""The peers' losses that ``fastcon-bench`` builds beyond their plain calls, and their memory.

sentence-transformers' MatryoshkaLoss and GISTEmbed losses as peers, from
embeddings (the bench's ``fn(a, b, logit_scale, logit_bias)``): their own classes computing what
their ``forward`` computes after the embedding pass.

* ``matryoshka_mnrl``: ``MatryoshkaLoss(MultipleNegativesRankingLoss)`` is their MNRL on each prefix
  shrunk by their ``shrink``, weights 1; the cached form runs their ``CachedMultipleNegativesRankingLoss``
  ``calculate_loss`` under their cached-loss decorator on mini-batches of the embeddings;
* ``gist``: their ``CachedGISTEmbedLoss.calculate_loss`` on the embeddings and the guide's, with their
  mini-batch (the cached form) or the whole batch as one mini-batch (the same arithmetic as
  ``GISTEmbedLoss``, whose ``forward`` has no entry from embeddings).

The cached forms back-propagate inside the loss, as theirs do (GradCache): the gradients with respect
to the embeddings are kept and handed back by the autograd node around them."""
from __future__ import annotations

import torch

ST_MINI_BATCH = 32  # the mini-batch of sentence-transformers' cached losses (their default)


def matryoshka_dims(d: int):
    """matryoshka_mnrl's dims: D, 2D/3, D/3, D/6, D/12 (384, 256, 128, 64, 32 at D = 384)."""
    return tuple(sorted({max(1, d * k // 12) for k in (12, 8, 4, 2, 1)}, reverse=True))


def gist_guide(a, b):
    """gist's guide embeddings of the same texts (no gradient): a model that mostly agrees with the
    student, ``a + b/2`` and ``b + a/2``."""
    a, b = a.detach(), b.detach()
    return a + 0.5 * b, b + 0.5 * a


class _GradCached(torch.autograd.Function):
    """A loss that back-propagates into mini-batch copies of its inputs while it is computed
    (``run(reps)`` with ``reps`` a list of mini-batch lists per input): its value, and in the backward
    the kept gradients times the upstream gradient."""

    @staticmethod
    def forward(ctx, run, chunk, *xs):
        reps = [[t.detach().requires_grad_() for t in x.split(chunk)] for x in xs]
        with torch.enable_grad():
            value = run(reps)
        ctx.save_for_backward(*[torch.cat([t.grad if t.grad is not None else torch.zeros_like(t) for t in r])
                                for r in reps])
        return value.detach()

    @staticmethod
    def backward(ctx, grad):
        return (None, None) + tuple(grad * g for g in ctx.saved_tensors)


def _bare(cls, **attributes):
    """One of their loss modules without its model (the loss from embeddings reads only these)."""
    loss = cls.__new__(cls)
    torch.nn.Module.__init__(loss)
    for name, value in attributes.items():
        setattr(loss, name, value)
    return loss


def st_embedding_loss(loss: str, cached: bool, mnrl_scale: float):
    """Their ``matryoshka_mnrl`` or ``gist`` loss (``cached``: the mini-batched form) as
    ``fn(a, b, logit_scale, logit_bias)``; an ImportError where sentence-transformers lacks it."""
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.losses.matryoshka import CachedLossDecorator, shrink

    if loss == "matryoshka_mnrl":
        if not cached:
            mnrl = losses.MultipleNegativesRankingLoss(None, scale=mnrl_scale)

            def matryoshka(a, b, s, bias):
                return sum(mnrl.compute_loss_from_embeddings([shrink(a, d), shrink(b, d)], None)
                           for d in matryoshka_dims(a.shape[1]))
            return matryoshka
        cmnrl = losses.CachedMultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()), scale=mnrl_scale,
                                                          mini_batch_size=ST_MINI_BATCH)

        def cached_matryoshka(a, b, s, bias):
            dims = matryoshka_dims(a.shape[1])
            decorated = CachedLossDecorator(cmnrl.calculate_loss, dims, [1] * len(dims))
            return _GradCached.apply(lambda reps: decorated(reps, with_backward=True), ST_MINI_BATCH, a, b)
        return cached_matryoshka
    gist = _bare(losses.CachedGISTEmbedLoss, temperature=0.01, similarity_fct=torch.nn.CosineSimilarity(dim=-1),
                 margin_strategy="absolute", margin=0.0, contrast_anchors=True, contrast_positives=True,
                 gather_across_devices=False, mini_batch_size=ST_MINI_BATCH, show_progress_bar=False,
                 cross_entropy_loss=torch.nn.CrossEntropyLoss())

    def gist_loss(a, b, s, bias):
        ga, gb = gist_guide(a, b)
        chunk = ST_MINI_BATCH if cached else a.shape[0]
        gist.mini_batch_size = chunk
        guide = [list(ga.split(chunk)), list(gb.split(chunk))]
        return _GradCached.apply(lambda reps: gist.calculate_loss(reps, guide, with_backward=True), chunk, a, b)
    return gist_loss


def st_predicted_bytes(loss: str, cached: bool, n: int, d: int) -> int:
    """A lower bound of their peak memory: their cosine similarity broadcasts a (rows, n, D) product
    before its sum (GIST; four blocks of rows × n), and MNRL holds each prefix's n × n logits and
    softmax until the backward (five prefixes), or one mini-batch's of them (cached)."""
    rows = ST_MINI_BATCH if cached else n
    if loss == "gist":
        return 4 * rows * n * d
    return (2 if cached else 2 * len(matryoshka_dims(d))) * 4 * rows * n


def pml_predicted_bytes(loss: str, n: int) -> int:
    """A lower bound of pytorch-metric-learning's peak on the 2N embeddings (M = 2N, labels the pairs for
    NT-Xent): NT-Xent lists every pair's indices (int64, about M² negative pairs) and compares each of
    its M positive pairs with every negative pair (M × M² masks and products, about 16 bytes an entry);
    SupCon holds the M × M similarities with their positive and negative masks and log-probabilities."""
    m = 2 * n
    if loss == "pml_ntxent":
        return 16 * m * m * m + 16 * m * m
    return 4 * 4 * m * m
