"""The reference losses of one process (see ``fastcon.reference``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["clip_loss_reference", "siglip_loss_reference", "clip_loss_explicit", "siglip_loss_explicit",
           "target_cross_entropy_reference", "multi_positive_clip_loss_reference", "negatives_clip_loss_reference",
           "ntxent_loss_reference", "debiased_rows_reference", "debiased_clip_loss_reference",
           "MNRL_DIRECTIONS", "mnrl_loss_reference", "ntxent_bank_loss_reference",
           "DISTILL_KINDS", "distill_loss_reference", "distill_clip_loss_reference", "align_uniform_loss_reference",
           "slerp_reference", "m2mix_loss_reference", "mochi_top_indices", "mochi_loss_reference",
           "pooled_alignment_loss_reference", "patch_nce_loss_reference", "filip_similarities_reference",
           "filip_loss_reference", "maxsim_scores_reference", "maxsim_loss_reference"]


def _logits(a, b, logit_scale, logit_bias, upcast: bool):
    if upcast:  # at least fp32; float64 stays float64
        acc = torch.promote_types(a.dtype, torch.float32)
        a, b = a.to(acc), b.to(acc)
        logit_scale = torch.as_tensor(logit_scale, dtype=acc)
        if logit_bias is not None:
            logit_bias = torch.as_tensor(logit_bias, dtype=acc)
    logits = logit_scale * (a @ b.T)
    if logit_bias is not None:
        logits = logits + logit_bias
    return logits


def clip_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None, *,
                        label_smoothing: float = 0.0, pos_offset: int = 0, debias: float = 0.0,
                        upcast: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE (docs/losses.md §1.1), materialised.

    ``S = s·X·Yᵀ + b`` with X: (Na, D) and Y: (Nb, D). The positive of row ``i`` is column
    ``pos_offset + i``. ``L = ½[CE(S, pos) + CE(S[:, cols]ᵀ, i)]`` where ``cols`` are the Na columns
    that own a positive; with ``Na == Nb`` and ``pos_offset == 0`` this is open_clip's ``ClipLoss``.
    Label smoothing follows ``F.cross_entropy`` (targets ``(1−ε)·onehot + ε/n_classes``).
    ``debias`` τ⁺ > 0: each CE is the debiased loss of docs/losses.md §2.5 instead (no bias, no
    smoothing).
    """
    na, nb = image_features.shape[0], text_features.shape[0]
    if pos_offset < 0 or pos_offset + na > nb:
        raise ValueError(f"pos_offset={pos_offset} with Na={na} rows needs Nb >= {pos_offset + na}, got Nb={nb}")
    logits = _logits(image_features, text_features, logit_scale, logit_bias, upcast)
    labels = torch.arange(na, device=logits.device) + pos_offset
    if debias:
        if logit_bias is not None or label_smoothing:
            raise ValueError("the debiased loss takes no logit_bias and no label_smoothing")
        return debiased_clip_loss_reference(image_features, text_features, logit_scale, debias, pos_offset=pos_offset,
                                            upcast=upcast)
    row = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    col_logits = logits[:, pos_offset:pos_offset + na].T
    col = F.cross_entropy(col_logits, torch.arange(na, device=logits.device), label_smoothing=label_smoothing)
    return (row + col) / 2


def debiased_clip_loss_reference(image_features, text_features, logit_scale, tau_plus: float, *, pos_offset: int = 0,
                                 pair_mask=None, upcast: bool = True) -> torch.Tensor:
    """CLIP whose two cross-entropies are the debiased loss (docs/losses.md §2.5), materialised: row
    i's positive is column ``pos_offset + i``, and the column direction runs over the Na columns that
    own one. ``pair_mask`` (Na, Nb) bool drops the pairs where it is False from both directions."""
    na = image_features.shape[0]
    logits = _logits(image_features, text_features, logit_scale, None, upcast)
    scale = torch.as_tensor(logit_scale, dtype=logits.dtype, device=logits.device)
    idx = torch.arange(na, device=logits.device)
    keep = None if pair_mask is None else pair_mask.to(logits.device)
    owned = slice(pos_offset, pos_offset + na)
    row = debiased_rows_reference(logits, idx + pos_offset, keep, tau_plus, scale).mean()
    col = debiased_rows_reference(logits[:, owned].T, idx, None if keep is None else keep[:, owned].T, tau_plus,
                                  scale).mean()
    return (row + col) / 2


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    pos_offset: int = 0,
    negative_only: bool = False,
    upcast: bool = True,
) -> torch.Tensor:
    """SigLIP sigmoid loss (docs/losses.md §1.2), materialised.

    ``l = s·X·Yᵀ + b``; ``z_ij = +1`` where ``j == pos_offset + i`` else ``−1`` (all ``−1`` with
    ``negative_only``); ``L = −(1/Na)·Σ_ij logσ(z_ij·l_ij)``, open_clip's ``SigLipLoss`` on one rank.
    """
    na, nb = image_features.shape[0], text_features.shape[0]
    logits = _logits(image_features, text_features, logit_scale, logit_bias, upcast)
    labels = -torch.ones_like(logits)
    if not negative_only:
        if pos_offset < 0 or pos_offset + na > nb:
            raise ValueError(f"pos_offset={pos_offset} with Na={na} rows needs Nb >= {pos_offset + na}, got Nb={nb}")
        idx = torch.arange(na, device=logits.device)
        labels[idx, idx + pos_offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / na


def _as_f64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.double()
    return torch.tensor(float(x), dtype=torch.float64)


def clip_loss_explicit(image_features, text_features, logit_scale, logit_bias=None, *,
                       label_smoothing: float = 0.0, pos_offset: int = 0) -> torch.Tensor:
    """An independent float64 formulation of ``clip_loss_reference`` (explicit log-softmax sums),
    used to check the reference itself."""
    a, b = image_features.double(), text_features.double()
    logits = _as_f64(logit_scale) * (a @ b.T)
    if logit_bias is not None:
        logits = logits + _as_f64(logit_bias)
    na, nb = logits.shape
    eps = label_smoothing
    idx = torch.arange(na, device=logits.device)
    row_logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    row_t = torch.full_like(logits, eps / nb)
    row_t[idx, idx + pos_offset] += 1 - eps
    row = -(row_t * row_logp).sum() / na
    sub = logits[:, pos_offset:pos_offset + na]
    col_logp = sub - torch.logsumexp(sub, dim=0, keepdim=True)
    col_t = torch.full_like(sub, eps / na)
    col_t[idx, idx] += 1 - eps
    col = -(col_t * col_logp).sum() / na
    return (row + col) / 2


def siglip_loss_explicit(image_features, text_features, logit_scale, logit_bias=None, *,
                         pos_offset: int = 0) -> torch.Tensor:
    """Independent float64 formulation of SigLIP via ``L·Na = Σ softplus(l) − Σ_i l_{i, off+i}``."""
    a, b = image_features.double(), text_features.double()
    logits = _as_f64(logit_scale) * (a @ b.T)
    if logit_bias is not None:
        logits = logits + _as_f64(logit_bias)
    na = logits.shape[0]
    idx = torch.arange(na, device=logits.device)
    return (F.softplus(logits).sum() - logits[idx, idx + pos_offset].sum()) / na


# ---------------------------------------------------------------------------------------------------
# The general target (docs/losses.md §1.1 multi-positive, §1.4, §2.1): the specification of the
# engine's target description, materialised.

def target_cross_entropy_reference(logits: torch.Tensor, positives: torch.Tensor, keep: Optional[torch.Tensor] = None,
                                   *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Row-wise cross-entropy with a set of positives per row, averaged over the rows.

    ``positives`` and ``keep`` are boolean (R, C); the softmax of row ``i`` runs over its kept columns
    ``K_i`` (every column without ``keep``; an excluded column is as if its logit were −∞), and its
    target spreads ``1 − ε`` uniformly over its positives ``P_i ⊆ K_i`` and ``ε`` uniformly over
    ``K_i``::

        loss_i = −Σ_{j ∈ K_i} q_ij·log p_ij,   q_ij = (1−ε)·[j ∈ P_i]/|P_i| + ε/|K_i|

    With ε = 0 this is SupCon's "outside" form, the mean over the positives of −log p_ip (the
    denominator over every kept column, positives included); with one positive per row and every
    column kept it is ``F.cross_entropy(logits, target, label_smoothing=ε)``. A row with no kept
    positive is an error naming it.
    """
    if positives.shape != logits.shape or (keep is not None and keep.shape != logits.shape):
        raise ValueError(f"positives {tuple(positives.shape)} and keep "
                         f"{None if keep is None else tuple(keep.shape)} must have the logits' shape {tuple(logits.shape)}")
    if keep is None:
        keep = torch.ones_like(positives)
    pos = positives & keep
    n_pos = pos.sum(dim=1)
    if bool((n_pos == 0).any()):
        row = int(torch.nonzero(n_pos == 0)[0])
        raise ValueError(f"row {row} has no positive among its kept columns")
    masked = logits.masked_fill(~keep, float("-inf"))
    log_p = masked - torch.logsumexp(masked, dim=1, keepdim=True)
    log_p = log_p.masked_fill(~keep, 0.0)  # excluded columns carry no target (and no NaN from −∞·0)
    q = (1.0 - label_smoothing) * pos.to(logits.dtype) / n_pos[:, None].to(logits.dtype)
    if label_smoothing:
        q = q + label_smoothing * keep.to(logits.dtype) / keep.sum(dim=1, keepdim=True).to(logits.dtype)
    return -(q * log_p).sum(dim=1).mean()


def debiased_rows_reference(logits: torch.Tensor, positive: torch.Tensor, keep: Optional[torch.Tensor],
                            tau_plus: float, scale) -> torch.Tensor:
    """(R,) the debiased loss of each row (docs/losses.md §2.5), materialised::

        N_g = max((Σ_n e^{S_n} − τ⁺·M·e^{S_p}) / (1 − τ⁺), M·e^{−s}),   ℓ = log(e^{S_p} + N_g) − S_p

    ``logits`` (R, C), ``positive`` (R,) the positive's column, ``keep`` (R, C) bool (None: all kept)
    and the negatives every other kept column (M of them), ``scale`` s. The exponentials are shifted by
    each row's largest term, so large s stays finite."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    keep = torch.ones_like(logits, dtype=torch.bool) if keep is None else keep
    negatives = keep.clone()
    negatives[rows, positive] = False
    m = negatives.sum(dim=1).to(logits.dtype)
    s_p = logits[rows, positive]
    scale = torch.as_tensor(scale, dtype=logits.dtype, device=logits.device)
    shift = torch.maximum(logits.masked_fill(~keep, float("-inf")).amax(dim=1), -scale).detach()
    neg = torch.exp(logits - shift[:, None]).masked_fill(~negatives, 0.0).sum(dim=1)
    e_p = torch.exp(s_p - shift)
    n_g = torch.maximum((neg - tau_plus * m * e_p) / (1.0 - tau_plus), m * torch.exp(-scale - shift))
    return torch.log(e_p + n_g) - (s_p - shift)


def _check_labels(labels, n, name="labels"):
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} ids, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got dtype {labels.dtype}")


def multi_positive_clip_loss_reference(image_features, text_features, logit_scale, logit_bias=None, *, labels,
                                       label_smoothing: float = 0.0, pair_mask=None,
                                       upcast: bool = True) -> torch.Tensor:
    """CLIP over class ids (docs/losses.md §1.1, multi-positive): pairs that share an id are positives
    of one another in both directions, ``L = ½[TCE(S, P) + TCE(Sᵀ, Pᵀ)]`` with ``P_ij = [labels_i ==
    labels_j]`` and TCE ``target_cross_entropy_reference``. Unique ids give ``clip_loss_reference``.
    ``pair_mask`` (N, N) bool drops the pairs where it is False from both directions; a column whose
    positives are all dropped has no column term (the mean runs over the other columns)."""
    n = image_features.shape[0]
    if text_features.shape[0] != n:
        raise ValueError(f"labels need paired batches: {n} image rows, {text_features.shape[0]} text rows")
    _check_labels(labels, n)
    logits = _logits(image_features, text_features, logit_scale, logit_bias, upcast)
    labels = labels.to(logits.device)
    pos = labels[:, None] == labels[None, :]
    if pair_mask is None:
        return (target_cross_entropy_reference(logits, pos, label_smoothing=label_smoothing)
                + target_cross_entropy_reference(logits.T, pos.T, label_smoothing=label_smoothing)) / 2
    keep = pair_mask.to(logits.device)
    owned = (pos & keep).any(dim=0)
    return (target_cross_entropy_reference(logits, pos, keep, label_smoothing=label_smoothing)
            + target_cross_entropy_reference(logits.T[owned], pos.T[owned], keep.T[owned],
                                             label_smoothing=label_smoothing)) / 2


def negatives_clip_loss_reference(image_features, text_features, negatives, logit_scale, logit_bias=None, *,
                                  form: str = "global", negative_mask=None, false_negative_margin=None,
                                  labels=None, label_smoothing: float = 0.0, upcast: bool = True) -> torch.Tensor:
    """CLIP with K extra text negatives per image (docs/losses.md §2.1), materialised.

    ``negatives`` (B, K, D), owner-major: ``negatives[i]`` are image ``i``'s hard negatives.

    * ``form="global"``: columns ``[Y; N_flat]`` (B + B·K). Image→text: row ``i``'s positive is column
      ``i`` (with ``labels``, every text column whose pair shares its id), every other column a
      negative. Text→image over the B text columns and the B images (the negatives own no column
      term). ``L = ½(L_i2t + L_t2i)``.
    * ``form="own"``: row ``i`` against ``[y_i, n_i1..n_iK]`` only, target 0; ``L = L_i2t``.

    ``negative_mask`` (B, K) bool: False drops that negative (a padded slot). ``false_negative_margin``
    m (GISTEmbed's rule, in similarity units before the scale): a negative column ``j`` of row ``i`` is
    dropped when ``x_i·c_j > x_i·y_i − m`` (for a text column, in both directions). Dropped columns are
    as if their logits were −∞; a row keeps
    at least its positive, so its loss is defined (0 with a single positive and every negative dropped).
    """
    b, d = image_features.shape
    if negatives.dim() != 3 or negatives.shape[0] != b or negatives.shape[2] != d:
        raise ValueError(f"negatives must be (B={b}, K, D={d}), got {tuple(negatives.shape)}")
    k = negatives.shape[1]
    if form not in ("global", "own"):
        raise ValueError(f"form must be 'global' or 'own', got {form!r}")
    if form == "own" and k == 0:
        raise ValueError("form='own' needs K >= 1 negatives per image")
    if negative_mask is not None and tuple(negative_mask.shape) != (b, k):
        raise ValueError(f"negative_mask must be (B={b}, K={k}), got {tuple(negative_mask.shape)}")
    if false_negative_margin is not None and false_negative_margin < 0:
        raise ValueError(f"false_negative_margin must be >= 0, got {false_negative_margin}")
    if labels is not None:
        if form == "own":
            raise ValueError("labels make in-batch texts positives: they apply to form='global' only")
        _check_labels(labels, b)
    acc = torch.promote_types(image_features.dtype, torch.float32) if upcast else image_features.dtype
    x, y, neg = image_features.to(acc), text_features.to(acc), negatives.to(acc)
    dev = x.device
    slot_ok = torch.ones(b, k, dtype=torch.bool, device=dev) if negative_mask is None else negative_mask.to(dev)
    if form == "own":
        cols = torch.cat([y[:, None, :], neg], dim=1)            # (B, 1+K, D)
        sim = torch.einsum("bd,bkd->bk", x, cols)
        pos = torch.zeros_like(sim, dtype=torch.bool)
        pos[:, 0] = True
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), slot_ok], dim=1)
    else:
        cols = torch.cat([y, neg.reshape(b * k, d)], dim=0)       # (B + B·K, D)
        sim = x @ cols.T
        pos = torch.zeros_like(sim, dtype=torch.bool)
        if labels is None:
            pos[torch.arange(b), torch.arange(b)] = True
        else:
            lab = labels.to(dev)
            pos[:, :b] = lab[:, None] == lab[None, :]
        # a slot's mask holds for every row: a padded negative is no column at all
        keep = torch.cat([torch.ones(b, b, dtype=torch.bool, device=dev), slot_ok.reshape(1, b * k).expand(b, -1)],
                         dim=1)
    if false_negative_margin is not None:
        own = sim[:, 0] if form == "own" else sim[torch.arange(b), torch.arange(b)]
        keep = keep & (pos | (sim <= own[:, None] - false_negative_margin))
    logits = _logits(x, cols, logit_scale, logit_bias, upcast) if form == "global" else None
    if form == "own":
        logits = torch.as_tensor(logit_scale, dtype=acc) * sim
        if logit_bias is not None:
            logits = logits + torch.as_tensor(logit_bias, dtype=acc)
        return target_cross_entropy_reference(logits, pos, keep, label_smoothing=label_smoothing)
    i2t = target_cross_entropy_reference(logits, pos, keep, label_smoothing=label_smoothing)
    # text→image: the B text columns against the B images, the same positives and dropped pairs
    # transposed (a false negative is one in both directions)
    t2i = target_cross_entropy_reference(logits[:, :b].T, pos[:, :b].T, keep[:, :b].T, label_smoothing=label_smoothing)
    return (i2t + t2i) / 2


def ntxent_loss_reference(out0: torch.Tensor, out1: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (docs/losses.md §1.4; SimCLR, lightly's ``NTXentLoss`` without a memory bank):
    ``Z = normalize([out0; out1])`` (2N×D), ``S = Z·Zᵀ/τ`` with the diagonal excluded, the positive of
    row ``i`` is row ``(i + N) mod 2N``; CE averaged over the 2N rows."""
    if out0.shape != out1.shape or out0.dim() != 2:
        raise ValueError(f"out0 and out1 must be (N, D) of one shape, got {tuple(out0.shape)} and {tuple(out1.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    acc = torch.promote_types(out0.dtype, torch.float32)
    z = F.normalize(torch.cat([out0, out1]).to(acc), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    logits = z @ z.T / temperature
    idx = torch.arange(n2, device=z.device)
    pos = torch.zeros(n2, n2, dtype=torch.bool, device=z.device)
    pos[idx, (idx + n) % n2] = True
    keep = idx[:, None] != idx[None, :]
    return target_cross_entropy_reference(logits, pos, keep)


MNRL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def mnrl_loss_reference(queries: torch.Tensor, docs, scale: float = 20.0, *, similarity: str = "cos",
                        directions=("query_to_doc",), partition_mode: str = "joint",
                        hardness_mode: Optional[str] = None, hardness_strength: float = 0.0,
                        debias: float = 0.0) -> torch.Tensor:
    """Multiple-negatives ranking (docs/losses.md §2.4), materialising every block: queries Q (B, D),
    ``docs`` a list [P, N_1, .., N_m] of (B, D), candidates C = [P; N_1; ..; N_m].

    The blocks of row i: query_to_doc ``Q_i·C`` (the positive: P_i), query_to_query ``Q_i·Q`` without
    ``Q_i·Q_i``, doc_to_query ``P_i·Q``, doc_to_doc ``P_i·C`` without query i's own documents. Logits:
    ``scale·sim`` plus ``strength·sg(sim)`` on the query_to_doc negatives that ``hardness_mode`` names.
    joint: ``L_i = LSE(all blocks of row i) − S_{i,P_i}``; per_direction: the mean over the blocks of
    their LSEs instead. The loss is the mean over the B rows. ``debias`` τ⁺ > 0: the debiased loss
    (docs/losses.md §2.5) of each joint row, or of each direction's block (per_direction), instead."""
    acc = torch.promote_types(queries.dtype, torch.float32)
    q = queries.to(acc)
    ds = [d.to(acc) for d in docs]
    if similarity == "cos":
        q, ds = F.normalize(q, dim=1), [F.normalize(d, dim=1) for d in ds]
    b, n_docs = q.shape[0], len(ds)
    c = torch.cat(ds)
    p = ds[0]
    idx = torch.arange(b, device=q.device)
    owner = idx.repeat(n_docs)
    own = idx[:, None] == owner[None, :]  # (B, B·n_docs): query i's own documents
    blocks = {"query_to_doc": q @ c.T}
    if "query_to_query" in directions:
        blocks["query_to_query"] = (q @ q.T).masked_fill(torch.eye(b, dtype=torch.bool, device=q.device),
                                                         float("-inf"))
    if "doc_to_query" in directions:
        blocks["doc_to_query"] = p @ q.T
    if "doc_to_doc" in directions:
        blocks["doc_to_doc"] = (p @ c.T).masked_fill(own, float("-inf"))
    raw = blocks["query_to_doc"]
    logits = {k: scale * v for k, v in blocks.items()}
    if hardness_mode is not None and hardness_strength > 0:
        positive = own & (torch.arange(b * n_docs, device=q.device)[None, :] < b)
        chosen = {"in_batch_negatives": ~own, "hard_negatives": own & ~positive,
                  "all_negatives": ~positive}[hardness_mode]
        logits["query_to_doc"] = logits["query_to_doc"] + hardness_strength * torch.where(chosen, raw.detach(), 0.0)
    pos = logits["query_to_doc"][idx, idx]
    if debias:
        if partition_mode == "joint":
            joint = torch.cat(list(logits.values()), dim=1)
            return debiased_rows_reference(joint, idx, torch.isfinite(joint), debias, scale).mean()
        return torch.stack([debiased_rows_reference(v, idx, torch.isfinite(v), debias, scale)
                            for v in logits.values()]).mean()
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(logits.values()), dim=1), dim=1)
    else:
        log_z = torch.stack([torch.logsumexp(v, dim=1) for v in logits.values()]).mean(0)
    return (log_z - pos).mean()


def ntxent_bank_loss_reference(out0: torch.Tensor, out1: torch.Tensor, negatives: torch.Tensor,
                               temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent with a memory bank (docs/losses.md §1.4, lightly's ``NTXentLoss(memory_bank_size>0)``):
    ``z = normalize(out·)``, row i's logits ``[z0_i·z1_i, z0_i·negativesᵀ]/τ`` (the bank used as given,
    without gradient), CE with target 0, the mean over the N rows."""
    acc = torch.promote_types(out0.dtype, torch.float32)
    z0, z1 = F.normalize(out0.to(acc), dim=1), F.normalize(out1.to(acc), dim=1)
    pos = (z0 * z1).sum(dim=1, keepdim=True)
    logits = torch.cat([pos, z0 @ negatives.detach().to(acc).T], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


# ---------------------------------------------------------------------------------------------------
# Soft targets and regularisers (docs/losses.md §1.3, §1.5)

DISTILL_KINDS = ("clip", "hycd", "cwcl")


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(1/R)·Σ_i [−Σ_j targets_ij · log softmax_j(logits_i)]: a soft cross-entropy over the rows."""
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def distill_loss_reference(image_features, text_features, logit_scale, teacher_image_features,
                           teacher_text_features, teacher_logit_scale, *, kind: str = "clip", alpha: float = 0.5,
                           temperature: float = 1.0) -> torch.Tensor:
    """The distillation term between a student ``S = s·X·Yᵀ`` and a teacher (docs/losses.md §1.3),
    materialised, in at least fp32; the teacher's inputs carry no gradient. Both directions, averaged:

    * ``clip`` (open_clip's DistillClipLoss): ``½[softCE(S, softmax_row(T)) + softCE(Sᵀ,
      softmax_row(Tᵀ))]``, ``T = s_t·X̃·Ỹᵀ``;
    * ``hycd``: on the similarities without the logit scales (``S = X·Yᵀ``, ``T = X̃·Ỹᵀ``; the scale
      arguments are not used), ``P = α·I + (1−α)·softmax(T/τ)`` per direction and
      ``τ²·KL(P ‖ softmax(S/τ))`` with batchmean (the sum over the matrix divided by B);
    * ``cwcl``: the image side is trained against the frozen text modality, whose features are
      ``teacher_text_features`` q (``teacher_image_features`` and ``teacher_logit_scale`` are not
      used): ``w_ij = ½ + ½·q̂_i·q̂_j`` (q̂ = q normalised), image→text ``softCE(S, w / (Σ_j w_ij + 1e-8))``
      over each row, and our reverse term text→image ``softCE(Sᵀ, wᵀ / (Σ_i w_ij + 1e-8))`` (text j
      against the images, with the same weights, normalised over the images; w is symmetric)."""
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {DISTILL_KINDS}, got {kind!r}")
    acc = torch.promote_types(image_features.dtype, torch.float32)
    x, y = image_features.to(acc), text_features.to(acc)
    tx, ty = teacher_image_features.detach().to(acc), teacher_text_features.detach().to(acc)
    b = x.shape[0]
    if kind == "clip":
        s = _logits(x, y, logit_scale, None, True)
        t = _logits(tx, ty, torch.as_tensor(teacher_logit_scale).detach(), None, True)
        return (_soft_ce(s, torch.softmax(t, dim=1)) + _soft_ce(s.T, torch.softmax(t.T, dim=1))) / 2
    if kind == "hycd":
        s, t = x @ y.T / temperature, tx @ ty.T / temperature
        eye = torch.eye(b, dtype=acc, device=x.device)

        def kl(student, teacher):
            p = alpha * eye + (1 - alpha) * torch.softmax(teacher, dim=1)
            return (torch.xlogy(p, p) - p * torch.log_softmax(student, dim=1)).sum() / b * temperature ** 2
        return (kl(s, t) + kl(s.T, t.T)) / 2
    s = _logits(x, y, logit_scale, None, True)
    q = F.normalize(ty, dim=1)
    w = 0.5 + 0.5 * (q @ q.T)
    rows = w / (w.sum(dim=1, keepdim=True) + 1e-8)
    cols = w.T / (w.sum(dim=0)[:, None] + 1e-8)
    return (_soft_ce(s, rows) + _soft_ce(s.T, cols)) / 2


def distill_clip_loss_reference(image_features, text_features, logit_scale, dist_image_features,
                                dist_text_features, dist_logit_scale):
    """open_clip's DistillClipLoss on one process: (contrastive_loss, distill_loss), the CLIP loss of the
    student and the ``clip`` distillation term."""
    return (clip_loss_reference(image_features, text_features, logit_scale),
            distill_loss_reference(image_features, text_features, logit_scale, dist_image_features,
                                   dist_text_features, dist_logit_scale, kind="clip"))


def align_uniform_loss_reference(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 2.0, t: float = 2.0,
                                 cross: bool = False, return_terms: bool = False):
    """Alignment and uniformity (docs/losses.md §1.5) from pairwise distances of the normalised rows,
    materialised, in at least fp32:

    * ``align = mean_i ‖x_i − y_i‖^α``;
    * ``uniform = ½[log mean_{i<j} exp(−t‖x_i − x_j‖²) + the same of y]``;
    * ``cross_uniform = log mean_{i≠j} exp(−t‖x_i − y_j‖²)`` (ordered pairs), with ``cross``;
    * ``total`` = their sum. Returns ``total``, or a dict of the terms with ``return_terms``."""
    acc = torch.promote_types(x.dtype, torch.float32)
    x, y = F.normalize(x.to(acc), dim=1), F.normalize(y.to(acc), dim=1)
    n = x.shape[0]
    align = (x - y).norm(dim=1).pow(alpha).mean()

    def unif(z):
        d2 = torch.cdist(z, z).pow(2)
        iu = torch.triu_indices(n, n, offset=1, device=z.device)
        return torch.logsumexp(-t * d2[iu[0], iu[1]], dim=0) - math.log(n * (n - 1) / 2)

    terms = {"align": align, "uniform": (unif(x) + unif(y)) / 2}
    if cross:
        d2 = torch.cdist(x, y).pow(2)
        off = ~torch.eye(n, dtype=torch.bool, device=x.device)
        terms["cross_uniform"] = torch.logsumexp(-t * d2[off], dim=0) - math.log(n * (n - 1))
    terms["total"] = sum(v for k, v in terms.items())
    return terms if return_terms else terms["total"]


def slerp_reference(a: torch.Tensor, b: torch.Tensor, lam) -> torch.Tensor:
    """Spherical interpolation of unit rows (docs/losses.md §2.3), the formula as written:
    ``[sin(λθ)·a + sin((1−λ)θ)·b] / sin θ`` with ``θ = arccos(a·b)`` (λ weighs ``a``); defined for
    0 < θ < π only (no clamp, no fallback: the oracle away from the ends)."""
    theta = torch.acos((a * b).sum(-1, keepdim=True))
    return (torch.sin(lam * theta) * a + torch.sin((1 - lam) * theta) * b) / torch.sin(theta)


def m2mix_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, lam, *,
                         temperature: float = 0.07, slerp=None) -> torch.Tensor:
    """m²-mix (docs/losses.md §2.3), materialised: ``m_j = slerp(x_j, y_j; λ)``, ``A_ij = x_i·m_j`` and
    ``C_ij = y_i·m_j`` off the diagonal, both diagonals ``x_i·y_i``; ``CE(A/τ, i) + CE(C/τ, i)`` (a sum),
    the gradients through the interpolation. ``slerp`` defaults to ``slerp_reference``."""
    x, y = image_features, text_features
    m = (slerp or slerp_reference)(x, y, lam)
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    diag = (x * y).sum(-1)
    a = torch.where(eye, torch.diag_embed(diag), x @ m.T) / temperature
    c = torch.where(eye, torch.diag_embed(diag), y @ m.T) / temperature
    labels = torch.arange(n, device=x.device)
    return F.cross_entropy(a, labels) + F.cross_entropy(c, labels)


def mochi_top_indices(q: torch.Tensor, negatives: torch.Tensor, top_n: int, *, in_batch: bool = False) -> torch.Tensor:
    """(B, top_n) int64: each query's ``top_n`` hardest negatives by ``q·n``, hardest first, ties by the
    lower index (a stable descending sort of the materialised B×K matrix); with ``in_batch`` the
    query's own row i of ``negatives`` is left out."""
    sim = q @ negatives.T
    if in_batch:
        sim = sim.masked_fill(torch.eye(q.shape[0], dtype=torch.bool, device=q.device), float("-inf"))
    return torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :top_n]


def mochi_loss_reference(q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor], mixes, *,
                         temperature: float = 0.2, top_n: int = 1024, in_batch: bool = False,
                         eps: float = 1e-12) -> torch.Tensor:
    """MoCHi (docs/losses.md §2.2), materialised: per query the top-N negatives (``mochi_top_indices``),
    the synthetic ``h = normalize(α·n_a + (1−α)·n_b)`` (``mixes["pair_ranks"]``, ``mixes["alpha"]``) and
    ``h′ = normalize(β·sg(q) + (1−β)·n_c)`` (``query_ranks``, ``beta``), detached, normalised as
    ``F.normalize`` with ``eps``; logits ``[q·k, q·Nᵀ, q·h, q·h′]/τ`` (N the queue, or with ``in_batch``
    the other keys), CE with target 0, the mean over queries."""
    negatives = k if in_batch else queue
    b = q.shape[0]
    rows = torch.arange(b, device=q.device)
    parts = [(q * k).sum(1, keepdim=True)]
    neg = q @ negatives.T
    if in_batch:
        neg = neg.masked_fill(torch.eye(b, dtype=torch.bool, device=q.device), float("-inf"))
    parts.append(neg)
    if top_n:
        top = mochi_top_indices(q.detach(), negatives, top_n, in_batch=in_batch)
        pr, alpha = mixes["pair_ranks"], mixes["alpha"].to(q.dtype)  # the coefficients in q's precision
        if pr.shape[1]:
            n_a = negatives[top[rows[:, None], pr[..., 0]]]
            n_b = negatives[top[rows[:, None], pr[..., 1]]]
            h = F.normalize(alpha[..., None] * n_a + (1 - alpha[..., None]) * n_b, dim=-1, eps=eps).detach()
            parts.append(torch.einsum("bd,bsd->bs", q, h))
        qr, beta = mixes["query_ranks"], mixes["beta"].to(q.dtype)
        if qr.shape[1]:
            n_c = negatives[top[rows[:, None], qr]]
            h2 = F.normalize(beta[..., None] * q.detach()[:, None, :] + (1 - beta[..., None]) * n_c, dim=-1,
                             eps=eps).detach()
            parts.append(torch.einsum("bd,bsd->bs", q, h2))
    logits = torch.cat(parts, dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.int64, device=q.device))


def pooled_alignment_loss_reference(visual_tokens: torch.Tensor, word_embeddings: torch.Tensor, *, word_mask=None,
                                    pool_size=None, temperature: float = 0.07) -> torch.Tensor:
    """Pooled patch-token alignment (docs/losses.md §3.2), materialised: the visual tokens average-pooled
    to K tokens (``F.adaptive_avg_pool1d`` over the token axis; K = 1 without ``pool_size``),
    ``S_ij = mean_k masked-mean_l cos(v̄_ik, e_jl)`` from the B×K×B×L tensor of cosines, and
    ``½[CE(S/τ, i) + CE(Sᵀ/τ, i)]``."""
    b, _, _ = visual_tokens.shape
    k = 1 if pool_size is None else pool_size
    pooled = F.adaptive_avg_pool1d(visual_tokens.transpose(1, 2), k).transpose(1, 2)  # (B, K, D)
    cos = torch.einsum("ikd,jld->ikjl", F.normalize(pooled, dim=-1), F.normalize(word_embeddings, dim=-1))
    if word_mask is None:
        word_mask = torch.ones(word_embeddings.shape[:2], dtype=torch.bool, device=word_embeddings.device)
    w = word_mask.to(cos.dtype)
    s = ((cos * w[None, None]).sum(-1) / w.sum(-1)[None, None]).mean(1)  # (B, B)
    labels = torch.arange(b, device=s.device)
    return (F.cross_entropy(s / temperature, labels) + F.cross_entropy(s.T / temperature, labels)) / 2


def patch_nce_loss_reference(q: torch.Tensor, k: torch.Tensor, *, temperature: float = 0.07, detach="key",
                             pos_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense patch InfoNCE (docs/losses.md §3.3), materialised per image: ``S_b = q_b·k_bᵀ/τ`` (P×P);
    without ``pos_mask`` CE with the diagonal as the positive, the mean over patches and images; with
    it (B, P, P), ``−log(Σ_pos e^S / Σ_all e^S)`` over the rows with at least one positive, their mean.
    ``detach``: "key", "query" or None (which side gets no gradient)."""
    if detach == "key":
        k = k.detach()
    elif detach == "query":
        q = q.detach()
    s = torch.einsum("bpd,bqd->bpq", q, k) / temperature
    b, p, _ = s.shape
    if pos_mask is None:
        labels = torch.arange(p, device=s.device).repeat(b)
        return F.cross_entropy(s.reshape(b * p, p), labels)
    lse_all = torch.logsumexp(s, dim=-1)
    lse_pos = torch.logsumexp(s.masked_fill(~pos_mask, float("-inf")), dim=-1)
    has = pos_mask.any(-1)
    return (lse_all - lse_pos)[has].mean()


def filip_similarities_reference(patches, tokens, *, token_mask=None, patch_mask=None):
    """FILIP's two similarity matrices (docs/losses.md §3.1) from the materialised B×n₁×B×n₂ tensor
    ``a[i, k, j, r] = p_ik·t_jr``: ``sI[i, j] = mean_{k real} max_{r real} a`` (image → text) and
    ``sT[j, i] = mean_{r real} max_{k real} a`` (text → image); padding masked to −inf before the max."""
    a = torch.einsum("ikd,jrd->ikjr", patches, tokens)
    b1, n1, b2, n2 = a.shape
    tm = torch.ones(b2, n2, dtype=torch.bool, device=a.device) if token_mask is None else token_mask
    pm = torch.ones(b1, n1, dtype=torch.bool, device=a.device) if patch_mask is None else patch_mask
    a = a.masked_fill(~tm[None, None], float("-inf")).masked_fill(~pm[:, :, None, None], float("-inf"))
    img = a.max(dim=3).values  # (i, k, j)
    s_i = torch.where(pm[:, :, None], img, 0.0).sum(1) / pm.sum(1)[:, None]
    txt = a.max(dim=1).values  # (i, j, r)
    s_t = (torch.where(tm[None], txt, 0.0).sum(2) / tm.sum(1)[None, :]).T
    return s_i, s_t


def filip_loss_reference(patches, tokens, logit_scale, *, token_mask=None, patch_mask=None,
                         label_smoothing: float = 0.0):
    """FILIP's loss ``½[CE(s·sI, i) + CE(s·sT, i)]`` on the materialised similarities."""
    s_i, s_t = filip_similarities_reference(patches, tokens, token_mask=token_mask, patch_mask=patch_mask)
    labels = torch.arange(s_i.shape[0], device=s_i.device)
    return (F.cross_entropy(logit_scale * s_i, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logit_scale * s_t, labels, label_smoothing=label_smoothing)) / 2


def maxsim_scores_reference(queries, docs, *, query_mask=None, doc_mask=None):
    """MaxSim (docs/losses.md §3.4) from the materialised B_q×n_q×B_d×n_d tensor:
    ``score[q, d] = Σ_{r real} max_{k real} q_r·d_k``, padding −inf before the max."""
    a = torch.einsum("qrd,jkd->qrjk", queries, docs)
    qm = torch.ones(queries.shape[:2], dtype=torch.bool, device=a.device) if query_mask is None else query_mask
    dm = torch.ones(docs.shape[:2], dtype=torch.bool, device=a.device) if doc_mask is None else doc_mask
    best = a.masked_fill(~dm[None, None], float("-inf")).max(dim=3).values  # (q, r, j)
    return torch.where(qm[:, :, None], best, 0.0).sum(1)


def maxsim_loss_reference(queries, docs, *, query_mask=None, doc_mask=None, scale=1.0, negatives=None,
                          negatives_mask=None):
    """``CE(scale·score(Q, [D; N]), i)`` on the materialised scores, each document set scored apart."""
    scores = maxsim_scores_reference(queries, docs, query_mask=query_mask, doc_mask=doc_mask)
    if negatives is not None:
        scores = torch.cat([scores, maxsim_scores_reference(queries, negatives, query_mask=query_mask,
                                                            doc_mask=negatives_mask)], dim=1)
    labels = torch.arange(queries.shape[0], device=scores.device)
    return torch.nn.functional.cross_entropy(scale * scores, labels)
