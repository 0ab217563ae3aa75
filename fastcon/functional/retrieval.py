"""Retrieval evaluation (docs/losses.md §4): the streaming top-k similarity and recall@k."""
from __future__ import annotations

from typing import Optional

import torch

from .._validation import check_features
from ._checks import check_chunk_size


def topk_similarity(x: torch.Tensor, y: torch.Tensor, k: int, *, chunk_size: Optional[int] = None):
    """(values, indices), each (N, k): the ``k`` largest entries of each row of ``x·yᵀ`` (x (N, D),
    y (M, D)) and their columns, largest first, without the N×M matrix (docs/losses.md §4): rows in
    blocks, columns streamed in chunks, each block's running top-k merged with a chunk's candidates
    by a stable sort, so that exact ties in the computed values go to the lower index. Equal to
    ``torch.topk`` of the materialised matrix on data without near-ties. Memory O(N·k + block·chunk);
    no gradient. Values in at least fp32."""
    from ..kernels.mixing import top_negatives

    check_features("x", x, "y", y)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= y.shape[0]:
        raise ValueError(f"k must be an int in [1, {y.shape[0]}] (y's rows), got {k!r}")
    chunk_size = check_chunk_size(chunk_size)
    n = x.shape[0]
    cols = max(k + 1, chunk_size or 8192)  # columns per chunk
    block = max(1, (32 << 20) // (4 * cols))  # rows per block: a 32 MiB chunk of similarities
    values, indices = [], []
    with torch.no_grad():
        for r0 in range(0, n, block):
            idx, vals = top_negatives(x[r0:r0 + block], y, k, chunk_cols=cols)
            values.append(vals)
            indices.append(idx)
    if not values:
        return x.new_empty((0, k), dtype=torch.promote_types(x.dtype, torch.float32)), \
            torch.empty((0, k), dtype=torch.int64, device=x.device)
    return torch.cat(values), torch.cat(indices)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks=(1, 5, 10), *,
                     chunk_size: Optional[int] = None) -> dict:
    """Recall@k of paired sets in both directions (image i's match is text i): ``{"image_to_text":
    {k: fraction of images whose text is among the k most similar texts, ...}, "text_to_image": {...}}``,
    from ``topk_similarity`` (no N×N matrix; a tie at the k-th place goes to the lower index, which can
    count a match that a tie-breaking by chance would not). Similarities are the dot products of the
    features as given (normalise them first for cosine)."""
    check_features("image_features", image_features, "text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(f"retrieval_recall needs paired sets of one shape, got {tuple(image_features.shape)} and "
                         f"{tuple(text_features.shape)}")
    ks = tuple(ks)
    n = image_features.shape[0]
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n for k in ks):
        raise ValueError(f"ks must be ints in [1, {n}] (the number of pairs), got {ks}")
    top = max(ks)
    target = torch.arange(n, device=image_features.device)[:, None]
    out = {}
    for name, (a, b) in (("image_to_text", (image_features, text_features)),
                         ("text_to_image", (text_features, image_features))):
        _, idx = topk_similarity(a, b, top, chunk_size=chunk_size)
        hit = idx == target
        out[name] = {k: float(hit[:, :k].any(1).double().mean()) for k in ks}
    return out
