"""The losses across ranks of ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each rank holds its local features X_r, Y_r (n rows each, N = W·n in all).

* ``all_gather_with_grad``: all_gather whose backward sums every rank's gradient of a slice and hands
  it to the slice's owner (``reduce_scatter`` on NCCL; ``all_reduce`` and a slice on gloo, which has no
  reduce_scatter).
* The ring: the text-side shards travel around the ranks (``batch_isend_irecv``, rank r sends to r+1
  and receives from r−1), the next shard arriving while the current one is computed. What belongs to
  a shard (its partial column statistics, its gradient accumulator) travels with it and is home after
  one lap, so per-rank memory is O(n·D) however many ranks there are, and each rank computes only its
  own rows of the global logits matrix: 1/W of the work.

The gradients are computed inside the forward (as on one device). Where a rank's gradient is a sum of
contributions that other ranks weight with their own upstream gradient (SigLIP's text shards), the
backward all-gathers the upstream gradients and, if they differ between ranks, recomputes that lap
with each rank's own weight, so the result always equals the autograd of the materialised loss.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .ops.engine import (backend_context, backend_module, engine_operands, forbid_double_backward, loss_dtype,
                         needs_grad, prepare_inputs, save_final_grads, scaled_grads)
from .ops.target import target_passes

__all__ = ["all_gather_with_grad", "all_gather_no_grad", "group_rank_and_size", "check_equal_batch",
           "clip_loss_ring", "clip_loss_local", "siglip_loss_ring", "target_loss_global", "mean_over_ranks",
           "shared_parameter"]


# --------------------------------------------------------------------------------------- groups
def group_rank_and_size(process_group) -> Tuple[int, int]:
    """(rank, world size) of this process in ``process_group`` (the default group for ``WORLD``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _backend_name(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except (RuntimeError, ValueError):
        return ""


def check_equal_batch(n: int, device: torch.device, group) -> None:
    """ValueError naming every rank's batch size unless all ranks hold ``n`` rows."""
    world = dist.get_world_size(group)
    sizes = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(out, sizes, group=group)
    found = [int(t.item()) for t in out]
    if len(set(found)) != 1:
        raise ValueError(
            "the distributed losses need the same local batch size on every rank; got "
            + ", ".join(f"rank {q}: {m}" for q, m in enumerate(found)))


# --------------------------------------------------------------------------------------- gathers
# torch >= 2.13 names the tensor collectives *_single and deprecates the older names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_no_grad(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along dim 0 (rank order), without autograd."""
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_tensor(out, x.detach().contiguous(), group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.n = x.shape[0]
        return all_gather_no_grad(x, group)

    @staticmethod
    def backward(ctx, grad):
        group, n = ctx.group, ctx.n
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if "nccl" in _backend_name(group):
            out = torch.empty((n,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            _reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=group)
            return out, None
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total[rank * n:(rank + 1) * n], None


def all_gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """all_gather along dim 0 whose backward gives each rank the sum over ranks of the gradients of
    its slice (open_clip's ``gather_with_grad``)."""
    return _GatherWithGrad.apply(x, group)


# --------------------------------------------------------------------------------------- ring
class _Ring:
    """Point-to-point steps around the ring: send to rank+1, receive from rank−1."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world))
        self.right = ranks[(self.rank + 1) % self.world]
        self.left = ranks[(self.rank - 1) % self.world]

    def start(self, send: List[torch.Tensor], recv: List[torch.Tensor]):
        ops = [dist.P2POp(dist.isend, t, self.right, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.left, self.group) for t in recv]
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(works) -> None:
        for w in works:
            w.wait()

    def shard(self, step: int) -> int:
        """Which rank's shard this rank holds at ``step`` of a lap."""
        return (self.rank - step) % self.world


def _siglip_lap(ring, impl, a, b, scale, bias, w, chunk_rows, need_grad, prefix=None):
    """One lap of the sigmoid loss: Σ over shards q of Σ softplus(−z·S) for X_r × Y_q (positives only
    in the own shard), and with ``need_grad`` the gradients of ``w·that``: grad_a, grad_scale and
    grad_bias local, grad_b the sum of every rank's contribution to the own shard. ``prefix``
    (``targets.Prefix`` with the own shard's column scales, and the prefixes' weights): the loss
    summed over Matryoshka prefixes in one pass over D, the column scales travelling with their shard
    and their gradient with the shard's; then also the gradients of the row and column scales.
    Returns (loss, grad_a, grad_b, grad_scale, grad_bias, grad_row_scale, grad_col_scale)."""
    n = b.shape[0]

    def lap_step(shard, pos_offset):  # -> loss, the own rows' gradients, the shard's gradients, scalars
        if prefix is None:
            part, ga, gb, gs, gbias = impl.sigmoid_fused(a, shard[0], scale, bias, pos_offset, w, chunk_rows,
                                                         need_grad)
            return part, [ga], [gb], gs, gbias
        pre, weights = prefix
        part, ga, gb, gs, gbias, grs, gcs = impl.sigmoid_prefix_fused(
            a, shard[0], scale, bias, pos_offset, w, weights, chunk_rows, need_grad,
            pre._replace(col_scale=shard[1]))
        return part, [ga, grs], [gb, gcs], gs, gbias

    shard = [b] if prefix is None else [b, prefix[0].col_scale]
    loss = torch.zeros((), dtype=scale.dtype, device=a.device)
    local = None
    grad_scale = torch.zeros((), dtype=scale.dtype, device=a.device)
    grad_bias = torch.zeros((), dtype=scale.dtype, device=a.device)
    cur, acc_prev = shard, None
    for step in range(ring.world):
        last = step == ring.world - 1
        nxt = None if last else [torch.empty_like(t) for t in cur]
        acc_in = None
        if need_grad and step > 0:
            acc_in = [torch.empty(t.shape, dtype=scale.dtype, device=a.device) for t in shard]
        works = ring.start(([] if last else cur) + (acc_prev if acc_in is not None else []),
                           ([] if last else nxt) + (acc_in if acc_in is not None else []))
        pos_offset = 0 if ring.shard(step) == ring.rank else n
        part, own, theirs, gs, gbias = lap_step(cur, pos_offset)
        loss += part
        if need_grad:
            own = [g.to(scale.dtype) for g in own]
            local = own if local is None else [x.add_(g) for x, g in zip(local, own)]
            grad_scale += gs
            grad_bias += gbias
        ring.wait(works)
        if need_grad:
            acc_prev = theirs if acc_in is None else [x.add_(g) for x, g in zip(acc_in, theirs)]
        cur = nxt
    if not need_grad:
        return loss, None, None, grad_scale, grad_bias, None, None
    home = acc_prev
    if ring.world > 1:
        home = [torch.empty_like(t) for t in acc_prev]
        ring.wait(ring.start(acc_prev, home))
    local, home = local + [None], home + [None]
    return loss, local[0], home[0], grad_scale, grad_bias, local[1], home[1]


def _upstream_weights(grad_output: torch.Tensor, group) -> torch.Tensor:
    """Every rank's upstream gradient of its loss, in rank order."""
    world = dist.get_world_size(group)
    out = torch.empty(world, dtype=grad_output.dtype, device=grad_output.device)
    _all_gather_tensor(out, grad_output.detach().reshape(1).contiguous(), group=group)
    return out


class _SigLipRing(torch.autograd.Function):
    """Rank r's SigLIP loss, (1/n)·Σ over its rows × every shard; gradients computed in the forward.
    With ``prefixes`` (Matryoshka's dims and weights) the loss summed over the prefixes, whose norms
    come in as the row and column scales (``ops.prefix_scales``, with autograd outside)."""

    @staticmethod
    def forward(ctx, a, b, scale, bias, row_scale, col_scale, backend, mm_dtype, group, chunk_rows, need_grad,
                prefixes):
        ring = _Ring(group)
        impl = backend_module(backend)
        x, y = engine_operands(a, b, backend, mm_dtype)
        n = x.shape[0]
        prefix = None
        if prefixes is not None:
            from .targets import Prefix

            prefix = (Prefix(tuple(prefixes[0]), row_scale.detach().to(scale.dtype).contiguous(),
                             col_scale.detach().to(scale.dtype).contiguous()), prefixes[1])
        loss, *grads = _siglip_lap(ring, impl, x, y, scale, bias, 1.0 / n, chunk_rows, need_grad, prefix)
        if need_grad:
            save_final_grads(ctx, (a, b, scale, bias, row_scale, col_scale), grads, 1.0)
            ctx.inputs = (x, y, scale.detach(), bias.detach())
            ctx.impl, ctx.group, ctx.chunk_rows, ctx.prefix = impl, group, chunk_rows, prefix
        return loss / n

    @staticmethod
    def backward(ctx, grad_output):
        forbid_double_backward()
        with backend_context(grad_output.device.type):
            return _SigLipRing._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        grad_a, grad_b, grad_scale, grad_bias, grad_rs, grad_cs = scaled_grads(ctx.saved_tensors, grad_output,
                                                                               ctx.grad_dtypes)
        weights = _upstream_weights(grad_output, ctx.group)
        if (ctx.needs_input_grad[1] or ctx.needs_input_grad[5]) and not bool((weights == weights[0]).all()):
            # Every rank weights its contribution to each text shard by its own upstream gradient.
            x, y, scale, bias = ctx.inputs
            w = float(grad_output) / x.shape[0]
            _, _, grad_b, _, _, _, grad_cs = _siglip_lap(_Ring(ctx.group), ctx.impl, x, y, scale, bias, w,
                                                         ctx.chunk_rows, True, ctx.prefix)
            grad_b = grad_b.to(ctx.grad_dtypes[1]) if ctx.needs_input_grad[1] else None
            grad_cs = grad_cs.to(ctx.grad_dtypes[5]) if ctx.needs_input_grad[5] else None
        return grad_a, grad_b, grad_scale, grad_bias, grad_rs, grad_cs, None, None, None, None, None, None


def siglip_loss_ring(image_features, text_features, scale, bias, *, group, backend, chunk_size, prefixes=None):
    """Rank r's open_clip SigLIP loss: (1/n)·[Σ over X_r × Y_r with positives on the diagonal +
    Σ_{q≠r} X_r × Y_q as negatives], the text shards travelling around the ring. ``prefixes``
    (Matryoshka's (dims, weights), docs/losses.md §2.7): ``Σ_k w_k`` of that loss on the L2-normalised
    prefixes, every prefix in one pass over D at each step of the ring."""
    out_dtype = loss_dtype(image_features)
    name, mm_dtype, a, b, scale, bias, chunk_rows = prepare_inputs(image_features, text_features, scale, bias,
                                                                   backend, chunk_size)
    row_scale = col_scale = None
    if prefixes is not None:
        from .ops.prefix import prefix_chunk_rows, prefix_scales

        row_scale, col_scale = prefix_scales(a, prefixes[0], True), prefix_scales(b, prefixes[0], True)
        chunk_rows = prefix_chunk_rows(chunk_rows, len(prefixes[0]), chunk_size)
    with backend_context(a.device.type):
        loss = _SigLipRing.apply(a, b, scale, bias, row_scale, col_scale, name, mm_dtype, group, chunk_rows,
                                 needs_grad(a, b, scale, bias), prefixes)
    return loss.to(out_dtype)


# --------------------------------------------------------------------------------------- CLIP
def _clip_stats_lap(ring, impl, a, b, scale, bias, chunk_rows):
    """Row LSE of the own rows over all N columns, column LSE of the own columns over all N rows
    (their partials travel with the shard), and the own positive logits."""
    n = b.shape[0]
    row_lse = torch.full((a.shape[0],), float("-inf"), dtype=torch.float64, device=a.device)
    pos_logit = None
    cur, acc_prev = b, None
    for step in range(ring.world):
        last = step == ring.world - 1
        nxt = None if last else torch.empty_like(b)
        acc_in = torch.empty(n, dtype=torch.float64, device=a.device) if step > 0 else None
        works = ring.start(([] if last else [cur]) + ([acc_prev] if step > 0 else []),
                           ([] if last else [nxt]) + ([acc_in] if step > 0 else []))
        own = ring.shard(step) == ring.rank
        r_lse, c_lse, p_logit = impl.lse_stats(a, cur, scale, bias, 0 if own else n, chunk_rows)
        row_lse = torch.logaddexp(row_lse, r_lse)
        if own:
            pos_logit = p_logit
        ring.wait(works)
        acc_prev = c_lse if acc_in is None else torch.logaddexp(acc_in, c_lse)
        cur = nxt
    col_lse = acc_prev
    if ring.world > 1:
        col_lse = torch.empty_like(acc_prev)
        ring.wait(ring.start([acc_prev], [col_lse]))
    return row_lse, col_lse, pos_logit


def _clip_grad_lap(ring, impl, a, b, scale, bias, row_lse, col_lse, w, w_pos, chunk_rows):
    """Gradients of the global loss from the own rows: G on X_r × Y_q for every shard q, with the
    complete column LSE of each shard travelling with it, and the shard's gradient accumulator."""
    n = b.shape[0]
    grad_a = torch.zeros(a.shape, dtype=scale.dtype, device=a.device)
    grad_scale = torch.zeros((), dtype=scale.dtype, device=a.device)
    grad_bias = torch.zeros((), dtype=scale.dtype, device=a.device)
    cur, cur_lse, acc_prev = b, col_lse, None
    for step in range(ring.world):
        last = step == ring.world - 1
        nxt = None if last else torch.empty_like(b)
        nxt_lse = None if last else torch.empty_like(col_lse)
        acc_in = torch.empty(b.shape, dtype=scale.dtype, device=a.device) if step > 0 else None
        works = ring.start(([] if last else [cur, cur_lse]) + ([acc_prev] if step > 0 else []),
                           ([] if last else [nxt, nxt_lse]) + ([acc_in] if step > 0 else []))
        own = ring.shard(step) == ring.rank
        ga, gb, gs, gbias = impl.softmax_grad(a, cur, scale, bias, row_lse, cur_lse, 0 if own else n,
                                              w, w, w_pos, chunk_rows)
        grad_a += ga
        grad_scale += gs
        grad_bias += gbias
        ring.wait(works)
        acc_prev = gb if acc_in is None else acc_in.add_(gb)
        cur, cur_lse = nxt, nxt_lse
    grad_b = acc_prev
    if ring.world > 1:
        grad_b = torch.empty_like(acc_prev)
        ring.wait(ring.start([acc_prev], [grad_b]))
    return grad_a, grad_b, grad_scale, grad_bias


def _feature_upstream(grad_output: torch.Tensor, sum_upstream: bool, group) -> torch.Tensor:
    """The upstream gradient the features of a global loss are scaled by: this rank's, or with
    ``gather_with_grad`` (``sum_upstream``) the sum of every rank's, as all_gather's backward gives
    each rank's features every rank's gradient of the same loss."""
    if not sum_upstream:
        return grad_output
    total = grad_output.detach().clone()
    dist.all_reduce(total, group=group)
    return total


class _ClipGlobalRing(torch.autograd.Function):
    """open_clip's global ClipLoss (local_loss=False) on every rank, from 1/W of the logits matrix."""

    @staticmethod
    def forward(ctx, a_in, b_in, scale, bias, backend, mm_dtype, group, eps, chunk_rows, sum_upstream, need_grad):
        ring = _Ring(group)
        impl = backend_module(backend)
        a, b = engine_operands(a_in, b_in, backend, mm_dtype)  # the features as the GEMMs take them
        n, world = a.shape[0], ring.world
        big_n = n * world
        acc = scale.dtype
        row_lse, col_lse, pos_logit = _clip_stats_lap(ring, impl, a, b, scale, bias, chunk_rows)
        # float64 per-row differences (the LSEs are float64), reduced across ranks in float64.
        local = (row_lse + col_lse - 2.0 * (1.0 - eps) * pos_logit.double()).sum()
        dist.all_reduce(local, group=group)
        w = 1.0 / (2 * big_n)
        loss = w * local
        if eps > 0:
            # Label smoothing: the targets ε/N of both directions add −(ε/N)·Σ_ij S_ij to 2N·L.
            sums = torch.stack([a.sum(0, dtype=acc), b.sum(0, dtype=acc)])
            dist.all_reduce(sums, group=group)
            total_a, total_b = sums[0], sums[1]
            loss = loss - w * 2.0 * (eps / big_n) * (scale * (total_a @ total_b) + big_n * big_n * bias).double()
        ctx.sum_upstream, ctx.group = sum_upstream, group
        if need_grad:
            grad_a, grad_b, grad_scale, grad_bias = _clip_grad_lap(
                ring, impl, a, b, scale, bias, row_lse, col_lse, w, 2.0 * w * (1.0 - eps), chunk_rows)
            grads = torch.stack([grad_scale, grad_bias])
            dist.all_reduce(grads, group=group)
            grad_scale, grad_bias = grads[0], grads[1]
            if eps > 0:
                c = 2.0 * w * eps / big_n  # subtracted from every entry of G
                grad_a -= c * scale * total_b
                grad_b -= c * scale * total_a
                grad_scale = grad_scale - c * (total_a @ total_b)
                grad_bias = grad_bias - c * big_n * big_n
            save_final_grads(ctx, (a_in, b_in, scale, bias), (grad_a, grad_b, grad_scale, grad_bias), 1.0)
        return loss.to(acc)

    @staticmethod
    def backward(ctx, grad_output):
        forbid_double_backward()
        g_features = _feature_upstream(grad_output, ctx.sum_upstream, ctx.group)
        grad_a, grad_b, _, _ = scaled_grads(ctx.saved_tensors, g_features, ctx.grad_dtypes)
        _, _, grad_scale, grad_bias = scaled_grads(ctx.saved_tensors, grad_output, ctx.grad_dtypes)
        return grad_a, grad_b, grad_scale, grad_bias, None, None, None, None, None, None, None


def clip_loss_ring(image_features, text_features, scale, bias, *, group, gather_with_grad, label_smoothing,
                   backend, chunk_size):
    """open_clip's ClipLoss with ``local_loss=False`` on W ranks: every rank returns the global loss
    L = ½[CE(S, i) + CE(Sᵀ, i)] over the N×N matrix; its features receive ∂L/∂X_r, ∂L/∂Y_r (times the
    sum of the ranks' upstream gradients with ``gather_with_grad``, as all_gather's backward gives)."""
    out_dtype = loss_dtype(image_features)
    name, mm_dtype, a, b, scale, bias, chunk_rows = prepare_inputs(image_features, text_features, scale, bias,
                                                                   backend, chunk_size)
    with backend_context(a.device.type):
        loss = _ClipGlobalRing.apply(a, b, scale, bias, name, mm_dtype, group, label_smoothing, chunk_rows,
                                     gather_with_grad, needs_grad(a, b, scale, bias))
    return loss.to(out_dtype)


def clip_loss_local(image_features, text_features, scale, bias, *, group, gather_with_grad, label_smoothing,
                    backend, chunk_size):
    """open_clip's ClipLoss with ``local_loss=True``: ½[CE(s·X_r·Y_allᵀ, r·n + i) + CE(s·Y_r·X_allᵀ, r·n + i)],
    the gathered features with or without gradient."""
    from .ops.softmax import clip_engine_loss

    rank, _ = group_rank_and_size(group)
    n = image_features.shape[0]
    gather = all_gather_with_grad if gather_with_grad else all_gather_no_grad
    all_image, all_text = gather(image_features, group), gather(text_features, group)
    kw = dict(label_smoothing=label_smoothing, pos_offset=rank * n, backend=backend, chunk_size=chunk_size,
              symmetric=False)
    return (clip_engine_loss(image_features, all_text, scale, bias, **kw)
            + clip_engine_loss(text_features, all_image, scale, bias, **kw)) / 2


# --------------------------------------------------------------------------------------- general target
def _all_reduce_col_stats(st, group):
    """The column statistics of every rank's rows: the LSEs merged in rank order (float64), the
    counts and sums added (with soft targets also the cross terms and the entropy)."""
    world = dist.get_world_size(group)
    lse = all_gather_no_grad(st.col_lse, group).view(world, -1)
    extra = [v for v in (st.cross_col, st.ent_col) if v is not None]
    sums = torch.stack([st.col_pos.double(), st.col_sum_pos, st.col_keep.double(), st.col_sum_keep] + extra)
    dist.all_reduce(sums, group=group)
    soft = {}
    if st.cross_col is not None:
        soft["cross_col"] = sums[4]
    if st.ent_col is not None:
        soft["ent_col"] = sums[5]
    return st._replace(col_lse=torch.logsumexp(lse, dim=0), col_pos=sums[0].to(st.col_pos.dtype),
                       col_sum_pos=sums[1], col_keep=sums[2].to(st.col_keep.dtype), col_sum_keep=sums[3], **soft)


class _TargetGlobal(torch.autograd.Function):
    """A general-target loss whose rows are split over the ranks: every rank returns the loss of all
    ranks' rows, computed from its own rows against the gathered columns (1/W of the work), with the
    column statistics merged across ranks between the passes; each input receives the gradient of
    that loss for its own rows and columns. With ``prefixes`` (Matryoshka's dims and weights) the
    loss summed over the prefixes in one pass over D; the tensors after the column parts are then the
    rows' prefix scales and each part's (``ops.prefix_scales``, with autograd outside), the column
    scales gathered like the parts."""

    @staticmethod
    def forward(ctx, a_in, scale, bias, target, backend, mm_dtype, group, eps, symmetric, chunk_rows, cache,
                sum_upstream, need_grad, prefixes, *tensors):
        from .targets import (Prefix, RowShard, loss_and_weights, needs_counts, rows_of, teacher_norms, teacher_stats,
                              two_pass_prefix_target, with_d_scale)

        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = a_in.shape[0]
        n_parts = len(tensors) if prefixes is None else (len(tensors) - 1) // 2
        parts_in = tensors[:n_parts]
        a, _ = engine_operands(a_in, a_in[:0], backend, mm_dtype)
        parts = [engine_operands(p, p[:0], backend, mm_dtype)[0] for p in parts_in]
        gathered = [all_gather_no_grad(p, group) for p in parts]
        cols = torch.cat(gathered)
        local = rows_of(target, rank * n, (rank + 1) * n)
        shard = RowShard(rank * n, world * n,
                         lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group),
                         lambda t: dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group))
        merge = (lambda st: _all_reduce_col_stats(st, group)) if symmetric else None
        grad_rs = grad_cs = None
        if prefixes is not None:
            impl = backend_module(backend)
            acc = scale.dtype
            col_scale = torch.cat([all_gather_no_grad(c.detach().to(acc).contiguous(), group)
                                   for c in tensors[n_parts + 1:]])
            prefix = Prefix(tuple(prefixes[0]), tensors[n_parts].detach().to(acc).contiguous(), col_scale)
            loss, grad_a, grad_cols, grad_scale, grad_bias, grad_rs, grad_cs = two_pass_prefix_target(
                impl.target_prefix_stats, impl.target_prefix_grad, a, cols, scale, bias, local, eps, symmetric,
                chunk_rows, need_grad, prefix, prefixes[1], shard, merge)
        else:
            stats_fn, grad_fn, teacher_fn = target_passes(backend)
            teacher = None
            if local.soft:  # the teacher's pass over this rank's rows, its columns merged like the student's
                t_st = teacher_stats(teacher_fn, local, symmetric, chunk_rows)
                teacher = teacher_norms(local, _all_reduce_col_stats(t_st, group) if symmetric else t_st, symmetric)
            st, cached = stats_fn(a, cols, scale, bias, local, symmetric, needs_counts(local, eps), chunk_rows,
                                  cache if need_grad else 0, teacher)
            loss, weights = loss_and_weights(local, merge(st) if symmetric else st, eps, symmetric, scale.dtype,
                                             shard, scale=scale)
            if need_grad:
                grad_a, grad_cols, grad_scale, grad_bias = grad_fn(a, cols, scale, bias, local, weights, chunk_rows,
                                                                   cached)
                grad_scale = with_d_scale(grad_scale, weights)
        if need_grad:
            _save_global_grads(ctx, group, rank, a_in, scale, bias, tensors, n_parts, gathered, grad_a, grad_cols,
                               grad_scale, grad_bias, grad_rs, grad_cs)
        ctx.sum_upstream, ctx.group = sum_upstream, group
        return loss.to(scale.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        forbid_double_backward()
        g_features = _feature_upstream(grad_output, ctx.sum_upstream, ctx.group)
        saved = ctx.saved_tensors
        feats = scaled_grads(saved[:1] + saved[3:], g_features, ctx.grad_dtypes[:1] + ctx.grad_dtypes[3:])
        scalars = scaled_grads(saved[1:3], grad_output, ctx.grad_dtypes[1:3])
        return (feats[0],) + scalars + (None,) * 11 + tuple(feats[1:])


def _save_global_grads(ctx, group, rank, a_in, scale, bias, tensors, n_parts, gathered, grad_a, grad_cols,
                       grad_scale, grad_bias, grad_rs, grad_cs):
    """Saves ``_TargetGlobal``'s gradients: the columns' (and their scales') summed over the ranks, this
    rank's block of each part kept; the scalars' summed over the ranks."""
    col_grads = [grad_cols] if grad_cs is None else [grad_cols, grad_cs]
    for g in col_grads:
        dist.all_reduce(g, group=group)
    per_part = []
    for g in col_grads:  # this rank's block of each part of the columns
        base, blocks = 0, []
        for t in gathered:
            m = t.shape[0] // dist.get_world_size(group)
            blocks.append(g[base + rank * m:base + (rank + 1) * m])
            base += t.shape[0]
        per_part.append(blocks)
    scalars = torch.stack([grad_scale, grad_bias])
    dist.all_reduce(scalars, group=group)
    inputs = (a_in, scale, bias) + tuple(tensors)
    grads = [grad_a, scalars[0], scalars[1]] + per_part[0]
    if grad_cs is not None:
        grads += [grad_rs] + per_part[1]
    need = ctx.needs_input_grad[:3] + ctx.needs_input_grad[14:]
    ctx.grad_dtypes = tuple(x.dtype for x in inputs)
    ctx.save_for_backward(*[g.to(torch.promote_types(x.dtype, torch.float32)) if need[k] else None
                            for k, (x, g) in enumerate(zip(inputs, grads))])


def target_loss_global(rows, col_parts, scale, bias, target, *, group, label_smoothing: float, symmetric: bool,
                       backend: str, chunk_size, gather_with_grad: bool = False, prefixes=None):
    """The general-target loss of W ranks' rows as one batch: ``rows`` (n, D) this rank's rows,
    ``col_parts`` this rank's blocks of the columns, the global columns being each part gathered in
    rank order, then concatenated; ``target`` describes the global loss (every rank's rows, the
    global columns). Every rank returns the global loss; each input receives its slice of the
    gradient of that loss (the features times the sum of the ranks' upstream gradients with
    ``gather_with_grad``, as open_clip's all_gather with autograd gives). ``prefixes`` (Matryoshka's
    (dims, weights), docs/losses.md §2.7): ``Σ_k w_k`` of that loss on the L2-normalised prefixes, in
    one pass over D."""
    from .ops.engine import cache_bytes, chunk_rows_for, traced_backend_name

    out_dtype = loss_dtype(rows)
    ref = col_parts[0]
    name, mm_dtype, a, _, scale, bias, _ = prepare_inputs(rows, ref, scale, bias, backend, chunk_size)
    name = traced_backend_name(backend, a.device.type, mm_dtype or a.dtype)
    world = dist.get_world_size(group)
    n_cols = world * sum(p.shape[0] for p in col_parts)
    chunk_rows = chunk_rows_for(a.shape[0], n_cols, a.device, chunk_size)
    tensors = tuple(col_parts)
    if prefixes is not None:
        from .ops.prefix import prefix_chunk_rows, prefix_scales

        dims = prefixes[0]
        tensors += (prefix_scales(a, dims, True),) + tuple(prefix_scales(p, dims, True) for p in col_parts)
        chunk_rows = prefix_chunk_rows(chunk_rows, len(dims), chunk_size)
    with backend_context(a.device.type):
        loss = _TargetGlobal.apply(a, scale, bias, target, name, mm_dtype, group, float(label_smoothing),
                                   bool(symmetric), chunk_rows, cache_bytes(a.device), bool(gather_with_grad),
                                   needs_grad(a, scale, bias, *col_parts), prefixes, *tensors)
    return loss.to(out_dtype)


class _MeanOverRanks(torch.autograd.Function):
    """The mean over the ranks of a per-rank loss (every rank returns it); the backward hands each
    rank's loss 1/W of the upstream gradient: its share of the mean, with no communication."""

    @staticmethod
    def forward(ctx, loss, group):
        ctx.world = dist.get_world_size(group)
        total = loss.detach().clone().reshape(1)
        dist.all_reduce(total, group=group)
        return total[0] / ctx.world

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


class _SumGradOverRanks(torch.autograd.Function):
    """The identity, whose backward sums the gradient over the ranks: for a parameter every rank holds
    a copy of (a logit scale) used in a loss of this rank's rows only, so that each copy receives the
    gradient of the loss of all ranks' rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        total = grad.detach().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def shared_parameter(x: Optional[torch.Tensor], group) -> Optional[torch.Tensor]:
    """``x`` (a replicated scalar) for a per-rank term of a loss over all ranks (see _SumGradOverRanks)."""
    if x is None or not x.requires_grad:
        return x
    return _SumGradOverRanks.apply(x, group)


def mean_over_ranks(loss: torch.Tensor, group) -> torch.Tensor:
    """The loss of a batch split over ranks whose rows are independent (the mean of per-row terms):
    the mean of the ranks' equal-sized local losses."""
    return _MeanOverRanks.apply(loss, group)
