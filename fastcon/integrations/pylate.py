"""PyLate's ColBERT losses ``Contrastive``, ``CachedContrastive`` and ``Distillation`` with the MaxSim
scores on fastcon's token-level engine (docs/losses.md §3.4)::

    from fastcon.integrations.pylate import Contrastive
    loss = Contrastive(model=model)                  # as pylate.losses.Contrastive

The classes subclass PyLate's own, so constructors, ``forward(sentence_features, labels)``, the
skiplist masks, query expansion, ``gather_across_devices`` and trainer integration are theirs; only
the scoring and the loss are replaced:

* ``Contrastive`` and ``CachedContrastive``: each query against every document of every set (the
  positives and the negatives, every rank's with ``gather_across_devices``), ``CE(scores/temperature)``
  with query i's positive its own positive document, averaged (``size_average``) or summed, times the
  number of ranks when gathered (as PyLate). The scores come from ``fastcon.functional.maxsim_scores``:
  no (queries × documents × query tokens × document tokens) tensor, where PyLate forms one per
  document set (or per ``score_mini_batch_size`` queries).
* ``Distillation``: each query against its own candidate documents, the KL divergence of the
  student's (min-max normalised) scores from the teacher's ``labels``, as PyLate; the scores in
  chunks of queries, each query token's gradient sent to its best document token.

Two choices, stated in docs/losses.md §3.4:

* Padding. PyLate multiplies the scores of padded (and skiplisted) document tokens by zero instead of
  leaving them out, so a query token whose real document tokens all score below zero takes 0 from the
  padding (seen early in ColBERT training). By default these losses give PyLate's numbers (the
  document embeddings multiplied by their mask); ``mask_padding=True`` leaves padded tokens out of the
  max instead.
* CachedContrastive's gradients. PyLate 1.6.0's ``CachedContrastive(size_average=True)`` returns the
  mean loss but caches the gradients of the sum (B times too large); this one caches the gradients of
  the loss it returns.

Extra keyword-only options: ``mask_padding``, ``backend``, ``chunk_size`` (fastcon's). The scores are
ColBERT's MaxSim (another ``score_metric`` is a ValueError); ``score_mini_batch_size`` is accepted
and has no effect (the engine bounds the memory of the scores itself); half inputs are scored in fp32.
PyLate is an optional dependency: this module imports without it, and the classes say what to install.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["Contrastive", "CachedContrastive", "Distillation"]  # noqa: F822 (built lazily)

_INSTALL = "pip install pylate (it pins its own sentence-transformers)"
_KD_CHUNK = 64  # queries per chunk of Distillation's scores


def _import_pylate():
    try:
        from pylate import losses
        from pylate.losses.contrastive import extract_skiplist_mask
        from pylate.utils import all_gather, all_gather_with_gradients, get_rank, get_world_size
    except ImportError as err:
        raise ImportError(f"fastcon.integrations.pylate needs PyLate: {_INSTALL} ({err})") from err
    return losses, extract_skiplist_mask, (all_gather, all_gather_with_gradients, get_rank, get_world_size)


def _model_attr(model, name):
    """An attribute of a ColBERT model, or of the model inside a (Distributed)DataParallel wrapper."""
    return getattr(model, name) if hasattr(model, name) else getattr(model.module, name)


def _pad_tokens(tensors, masks):
    """The document sets padded to one token count and concatenated: (documents, their masks, the
    tokens that are theirs rather than added here). The added tokens are left out of every max."""
    n = max(t.shape[1] for t in tensors)
    out, out_masks, own = [], [], []
    for t, m in zip(tensors, masks):
        extra = n - t.shape[1]
        out.append(F.pad(t, (0, 0, 0, extra)) if extra else t)
        out_masks.append(F.pad(m.bool(), (0, extra), value=False) if extra else m.bool())
        ones = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
        own.append(F.pad(ones, (0, extra), value=False) if extra else ones)
    return torch.cat(out), torch.cat(out_masks), torch.cat(own)


def _token_scores(queries, docs, q_mask, d_mask, own, mask_padding, backend, chunk_size):
    """MaxSim scores (B_q, B_d) on the engine with PyLate's masks: the query mask (or none); the
    documents' padding multiplied out (PyLate's numbers) or, with ``mask_padding``, masked; tokens
    added to even out the sets' lengths (``own`` False) always masked."""
    from .. import functional as FC

    qm = None if q_mask is None else q_mask.bool()
    if mask_padding:
        return FC.maxsim_scores(queries, docs, query_mask=qm, doc_mask=d_mask, backend=backend,
                                chunk_size=chunk_size)
    return FC.maxsim_scores(queries, docs * d_mask.unsqueeze(-1).to(docs.dtype), query_mask=qm, doc_mask=own,
                            backend=backend, chunk_size=chunk_size)


def contrastive_loss(queries, doc_sets, q_mask, doc_masks, *, temperature: float, size_average: bool,
                     gather: bool, mask_padding: bool = False, backend: str = "auto", chunk_size=None):
    """PyLate's contrastive loss from embeddings: queries (B, n_q, D) against every document of every
    set in ``doc_sets`` (positives first, each (B, n_d, D); gathered from every rank with gradients
    when ``gather``), ``CE(scores / temperature, positive)``, mean (``size_average``) or sum, times the
    number of ranks when gathered."""
    _, _, (all_gather, all_gather_with_gradients, get_rank, get_world_size) = _import_pylate()
    b = queries.shape[0]
    offset, world = 0, 1
    if gather:
        doc_sets = [torch.cat(all_gather_with_gradients(d)) for d in doc_sets]
        doc_masks = [torch.cat(all_gather(m)) for m in doc_masks]
        offset, world = get_rank() * b, get_world_size()
    docs, d_mask, own = _pad_tokens(doc_sets, doc_masks)
    scores = _token_scores(queries, docs, q_mask, d_mask, own, mask_padding, backend, chunk_size)
    labels = torch.arange(b, device=queries.device) + offset  # the own positive: set 0, this rank's block
    loss = F.cross_entropy(scores / temperature, labels, reduction="mean" if size_average else "sum")
    return loss * world if gather else loss


class _PairedMaxSim(torch.autograd.Function):
    """scores[i, j] = Σ_t qm[i, t]·max_s S[i, j, t, s], S = q[i, t]·d[i, j, s]: each query against its
    own candidates, in chunks of queries (no (B, k, n_q, n_d) tensor beyond a chunk), in fp32 (float64
    for float64 inputs; autocast off). The document mask multiplies S (PyLate's numbers) or, with
    ``masked``, leaves the padded tokens out of the max. The backward, chunked the same way, sends each
    query token's gradient to its argmax document token (ties: the lowest index)."""

    @staticmethod
    def forward(ctx, q, d, q_mask, d_mask, masked):
        b, k = d.shape[:2]
        acc = torch.promote_types(q.dtype, torch.float32)
        scores = torch.empty(b, k, dtype=acc, device=q.device)
        best = torch.empty(b, k, q.shape[1], dtype=torch.int64, device=q.device)
        keep = d_mask.bool().unsqueeze(2)
        qm = None if q_mask is None else q_mask.to(acc)
        with torch.autocast(q.device.type, enabled=False):
            for s in range(0, b, _KD_CHUNK):
                e = s + _KD_CHUNK
                sim = torch.einsum("ash,abth->abst", q[s:e].to(acc), d[s:e].to(acc))
                sim = sim.masked_fill(~keep[s:e], float("-inf") if masked else 0.0)
                top, idx = sim.max(dim=-1)
                if qm is not None:
                    top = top * qm[s:e].unsqueeze(1)
                scores[s:e] = top.sum(dim=-1)
                best[s:e] = idx
        ctx.save_for_backward(q, d, q_mask, d_mask, best)
        return scores

    @staticmethod
    def backward(ctx, grad):
        q, d, q_mask, d_mask, best = ctx.saved_tensors
        acc = grad.dtype
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device) if ctx.needs_input_grad[0] else None
        grad_d = torch.zeros(d.shape, dtype=acc, device=d.device) if ctx.needs_input_grad[1] else None
        for s in range(0, q.shape[0], _KD_CHUNK):
            e = s + _KD_CHUNK
            idx = best[s:e]
            # each query token's weight, times the mask of the token it took (0 for a padded one taken
            # through PyLate's zeroed score, whose value does not depend on the features)
            w = grad[s:e].unsqueeze(-1) * torch.gather(d_mask[s:e].to(acc), 2, idx)
            if q_mask is not None:
                w = w * q_mask[s:e].to(acc).unsqueeze(1)
            if grad_q is not None:
                picked = torch.gather(d[s:e].to(acc), 2, idx.unsqueeze(-1).expand(*idx.shape, d.shape[-1]))
                grad_q[s:e] = (w.unsqueeze(-1) * picked).sum(dim=1)
            if grad_d is not None:
                contrib = w.unsqueeze(-1) * q[s:e].to(acc).unsqueeze(1)
                grad_d[s:e].scatter_add_(2, idx.unsqueeze(-1).expand_as(contrib), contrib)
        return (None if grad_q is None else grad_q.to(q.dtype)), (None if grad_d is None else grad_d.to(d.dtype)), \
            None, None, None


def _check_score_metric(score_metric, accepted: bool, name: str) -> None:
    """None or PyLate's default scorer (``accepted``), else a ValueError: these losses score with
    ColBERT's MaxSim on the engine."""
    if score_metric is None or accepted:
        return
    raise ValueError(f"fastcon's {name} scores with ColBERT's MaxSim (PyLate's default score_metric); "
                     f"another score_metric ({getattr(score_metric, '__name__', type(score_metric).__name__)}) "
                     f"is not supported")


def _build(name):
    losses, extract_skiplist_mask, _ = _import_pylate()
    from pylate.scores import ColBERTScores, colbert_kd_scores

    class Contrastive(losses.Contrastive):
        __doc__ = (f"PyLate's ``Contrastive`` with the MaxSim scores on fastcon's token-level engine "
                   f"(fastcon.integrations.pylate).\n\n{losses.Contrastive.__doc__ or ''}")

        def __init__(self, model, score_metric=None, score_mini_batch_size=None, size_average: bool = True,
                     gather_across_devices: bool = False, temperature: float = 1.0, *, mask_padding: bool = False,
                     backend: str = "auto", chunk_size=None):
            _check_score_metric(score_metric, type(score_metric) is ColBERTScores, "Contrastive")
            super().__init__(model, score_metric, score_mini_batch_size, size_average, gather_across_devices,
                             temperature)
            self.mask_padding, self.backend, self.chunk_size = bool(mask_padding), backend, chunk_size

        def forward(self, sentence_features, labels=None):
            embeddings = [F.normalize(self.model(f)["token_embeddings"], p=2, dim=-1) for f in sentence_features]
            masks = extract_skiplist_mask(sentence_features=sentence_features,
                                          skiplist=_model_attr(self.model, "skiplist"))
            q_mask = None if _model_attr(self.model, "do_query_expansion") else masks[0]
            return contrastive_loss(embeddings[0], embeddings[1:], q_mask, masks[1:], temperature=self.temperature,
                                    size_average=self.size_average, gather=self.gather_across_devices,
                                    mask_padding=self.mask_padding, backend=self.backend, chunk_size=self.chunk_size)

    class CachedContrastive(losses.CachedContrastive):
        __doc__ = (f"PyLate's ``CachedContrastive`` with the MaxSim scores on fastcon's token-level engine and "
                   f"the gradients of the loss it returns (fastcon.integrations.pylate).\n\n"
                   f"{losses.CachedContrastive.__doc__ or ''}")

        def __init__(self, model, score_metric=None, mini_batch_size: int = 32, score_mini_batch_size=None,
                     size_average: bool = True, gather_across_devices: bool = False, show_progress_bar: bool = False,
                     temperature: float = 1.0, *, mask_padding: bool = False, backend: str = "auto",
                     chunk_size=None):
            _check_score_metric(score_metric, type(score_metric) is ColBERTScores, "CachedContrastive")
            super().__init__(model, score_metric, mini_batch_size, score_mini_batch_size, size_average,
                             gather_across_devices, show_progress_bar, temperature)
            self.mask_padding, self.backend, self.chunk_size = bool(mask_padding), backend, chunk_size

        def calculate_loss(self, reps, masks, with_backward: bool = False):
            queries = torch.cat(reps[0])
            q_mask = None if _model_attr(self.model, "do_query_expansion") else masks[0]
            loss = contrastive_loss(queries, [torch.cat(r) for r in reps[1:]], q_mask, list(masks[1:]),
                                    temperature=self.temperature, size_average=self.size_average,
                                    gather=self.gather_across_devices, mask_padding=self.mask_padding,
                                    backend=self.backend, chunk_size=self.chunk_size)
            if with_backward:
                loss.backward()
                loss = loss.detach()
            return loss

    class Distillation(losses.Distillation):
        __doc__ = (f"PyLate's ``Distillation`` with each query's scores against its candidates in chunks of "
                   f"queries (fastcon.integrations.pylate).\n\n{losses.Distillation.__doc__ or ''}")

        def __init__(self, model, score_metric=None, size_average: bool = True, normalize_scores: bool = True, *,
                     mask_padding: bool = False):
            _check_score_metric(score_metric, score_metric is colbert_kd_scores, "Distillation")
            super().__init__(model, size_average=size_average, normalize_scores=normalize_scores)
            self.mask_padding = bool(mask_padding)

        def forward(self, sentence_features, labels):
            q = F.normalize(self.model(sentence_features[0])["token_embeddings"], p=2, dim=-1)
            d = F.normalize(self.model(sentence_features[1])["token_embeddings"], p=2, dim=-1)
            b = q.shape[0]
            d = d.view(b, -1, *d.shape[1:])
            masks = extract_skiplist_mask(sentence_features=sentence_features,
                                          skiplist=_model_attr(self.model, "skiplist"))
            d_mask = masks[1].view(b, -1, *masks[1].shape[1:])
            q_mask = None if _model_attr(self.model, "do_query_expansion") else masks[0]
            if self.mask_padding and not bool(d_mask.bool().any(-1).all()):
                raise ValueError("mask_padding=True needs at least one real token in every document")
            scores = _PairedMaxSim.apply(q, d, q_mask, d_mask, self.mask_padding)
            if self.normalize_scores:
                top = scores.max(dim=1, keepdim=True).values
                low = scores.min(dim=1, keepdim=True).values
                scores = (scores - low) / (top - low + 1e-8)
            return self.loss_function(F.log_softmax(scores, dim=-1), F.log_softmax(labels, dim=-1))

    cls = {"Contrastive": Contrastive, "CachedContrastive": CachedContrastive, "Distillation": Distillation}[name]
    cls.__qualname__, cls.__module__ = name, __name__  # (picklable: the module resolves the name)
    return cls


@functools.lru_cache(maxsize=None)
def _class(name):
    return _build(name)


def __getattr__(name):
    if name in __all__:
        return _class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
