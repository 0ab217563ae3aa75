"""Backends of the fastcon engine.

Every backend (``torch``, ``cpp``, ``triton``, ``triton_fused``) exposes the same engine operations,
listed as code in ``contract.py`` (where each backend keeps them: ``contract.BACKEND_MODULES``).
The CLIP and SigLIP operations work over ``S = s·A·Bᵀ + b`` (A: Na×D, B: Nb×D, same dtype and
device, contiguous). ``scale`` and ``bias`` are 0-d tensors on that device in the accumulation dtype
(float64 for float64 inputs, else float32); products, exponentials and reductions are done in that
dtype and every output is in it. No Na×Nb tensor is allocated, only row chunks of at most ``chunk_rows`` rows (or tiles)::

    lse_stats(a, b, scale, bias, pos_offset, chunk_rows) -> (row_lse[Na], col_lse[Nb], pos_logit[Na])
        row_lse_i = logsumexp_j S_ij, col_lse_j = logsumexp_i S_ij, pos_logit_i = S_{i, i+pos_offset}
        (0 where i + pos_offset >= Nb), taken from the same S tiles as the LSEs. The LSEs are partial
        statistics of one block: those of two column (or row) blocks merge with ``torch.logaddexp``.

    softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows)
            -> (grad_a[Na, D], grad_b[Nb, D], grad_scale[], grad_bias[])
        G_ij = w_row·exp(S_ij − row_lse_i) + w_col·exp(S_ij − col_lse_j) − w_pos·[j == i + pos_offset]
        (an LSE of +inf gives 0); grad_a = s·G·B, grad_b = s·Gᵀ·A, grad_scale = Σ G ⊙ (A·Bᵀ),
        grad_bias = Σ G. The weights are Python floats. The target is subtracted inside G, before the
        products, so that P − 1 ≈ small never goes through a GEMM as a large term that cancels later.

    softmax_fused(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes)
            -> (row_lse, col_lse, pos_logit, grad_a, grad_b, grad_scale, grad_bias)
        ``lse_stats`` then ``softmax_grad`` in one call; col_lse is set to +inf outside the columns
        that own a positive, [pos_offset, pos_offset + Na), before the gradient pass (and returned so).
        Logits chunks of the first pass may be kept for the second while their total stays within
        ``cache_bytes``.

    sigmoid_fused(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad)
            -> (loss_sum[], grad_a, grad_b, grad_scale, grad_bias)
        z_ij = +1 where j == i + pos_offset, else −1 (pos_offset >= Nb: no positives);
        loss_sum = Σ_ij softplus(−z_ij·S_ij); with ``need_grad`` the gradients of ``w·loss_sum``,
        i.e. G_ij = w·(σ(S_ij) − [z_ij = +1]) (else the four gradients are None).

LSE precision: ``row_lse`` and ``col_lse`` (inputs and outputs) are **float64** tensors for every input
dtype. An LSE of logits of size 100 stored in fp32 carries an absolute error of ulp(100) ≈ 7.6e-6, which
is the whole per-row loss and the whole P − 1 of a confident row; in float64 the LSE keeps the
precision of its parts (the row maximum, an exact logit, plus the log of an fp32 sum). Epilogues form
``S − lse`` without losing it, e.g. by splitting ``lse = hi + lo`` (``hi = float32(lse)``,
``lo = float32(lse − hi)``) and computing ``(S − hi) − lo`` in fp32, or by subtracting in float64.
``pos_logit`` and the other outputs stay in the accumulation dtype.

The CLIP targets and label smoothing are O(N·D) terms added by ``fastcon.ops`` with plain autograd,
identically for every backend.

The general target (``fastcon/targets/``: positives by id, dropped pairs, ownership rules,
column ranges, row groups, the hardness penalty, a dense mask, label smoothing over the kept columns)
is two more operations of every backend (the Triton ones in ``triton/target.py`` and
``triton/fused_target.py``), with the teacher's pass of a soft target a third (``teacher_stats``)::

    target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None)
            -> (targets.TargetStats, cached chunks of dot products)
    teacher_stats(the same arguments)   the teacher's pass over its own features
    target_grad(a, b, scale, bias, target, weights, chunk_rows, cached)
            -> (grad_a, grad_b, grad_scale, grad_bias)

Between them ``targets.loss_and_weights`` forms the loss and the pass-2 weights (``TargetWeights``)
for every backend alike (and, across ranks, ``fastcon.distributed`` merges the column statistics
first); ``targets.two_pass_target`` chains the three as each backend's::

    target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes)
            -> (loss float64, grad_a, grad_b, grad_scale, grad_bias)

Matryoshka prefixes in one pass over D (``targets.Prefix``: dims d_0 > d_1 > … > d_{K−1}, row and
column scales r (Na, K) and c (Nb, K)): prefix k's logits are ``S_k = s·r_k ⊙ P_k ⊙ c_kᵀ + b`` with
``P_k = A[:, :d_k]·B[:, :d_k]ᵀ``, every P_k read from one accumulator over the D slices::

    target_prefix_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, prefix)
            -> [targets.TargetStats of each prefix]
    target_prefix_grad(a, b, scale, bias, target, weights, chunk_rows, prefix)
            -> (grad_a, grad_b, grad_scale, grad_bias, grad_row_scale[Na, K], grad_col_scale[Nb, K])
        ``weights``: one TargetWeights per prefix (its loss weight folded in); G_k as ``target_grad``'s
        on S_k, H_k = r_k ⊙ G_k ⊙ c_kᵀ; grad_a[:, d_{j+1}:d_j] = s·(Σ_{k≤j} H_k)·B[:, d_{j+1}:d_j] (0 past
        d_0), grad_b likewise; grad_scale = Σ_k Σ G_k ⊙ (S_k − b)/s (the penalty aside), grad_bias =
        Σ_k Σ G_k; grad_row_scale[i, k] = s·Σ_j G_k·P_k·c_k[j], grad_col_scale[j, k] = s·Σ_i G_k·P_k·r_k[i].

``targets.two_pass_prefix_target`` chains them with ``loss_and_weights`` per prefix (no soft targets).
SigLIP's one pass at every prefix::

    sigmoid_prefix_fused(a, b, scale, bias, pos_offset, w, weights, chunk_rows, need_grad, prefix)
            -> (Σ_k weights[k]·loss_sum_k, grad_a, grad_b, grad_scale, grad_bias, grad_row_scale,
                grad_col_scale)
        loss_sum_k is ``sigmoid_fused``'s on S_k; the gradients are those of w·Σ_k weights[k]·loss_sum_k
        (None without ``need_grad``), formed as ``target_prefix_grad``'s from G_k = w·weights[k]·(σ(S_k) − [pos]).
"""
