"""The engine as C++ CPU operators (``torch.ops.fastcon.*``, built from ``csrc/cpu`` into
``fastcon._C`` at install, or against the running torch at first use: ``_extension.py``).

Same four functions and signatures as ``torch_chunked``; inputs are float32 or float64, contiguous,
on the CPU (the ops layer upcasts bf16/fp16 to float32 before calling). ``row_lse`` and ``col_lse``
are float64 for both input dtypes, as outputs and as inputs of ``softmax_grad`` (see "LSE precision"
in ``fastcon.kernels``). ``AVAILABLE`` says whether the extension could be loaded, ``REASON`` why
not and ``ORIGIN`` from where; importing this module never raises.
"""
from __future__ import annotations

import torch

from ._extension import load as _load_extension

# ORIGIN: "installed" (the library the install compiled) or "compiled here" (against this torch)
AVAILABLE, REASON, ORIGIN = _load_extension()

if AVAILABLE and not hasattr(torch.ops.fastcon, "lse_stats"):  # pragma: no cover - defensive
    AVAILABLE = False
    REASON = "fastcon._C loaded but did not register the torch.ops.fastcon operators"


def simd_level():
    """The instruction set of the epilogue kernels this CPU runs ("avx512 (x86-64-v4)", "avx2
    (x86-64-v3)" or a baseline; their clones are picked at load time), or None without the extension."""
    if not AVAILABLE or not hasattr(torch.ops.fastcon, "simd_level"):
        return None
    return torch.ops.fastcon.simd_level()


def _scalar(x, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


def lse_stats(a, b, scale, bias, pos_offset, chunk_rows):
    return torch.ops.fastcon.lse_stats(a, b, _scalar(scale, a), _scalar(bias, a), int(pos_offset), int(chunk_rows))


def softmax_grad(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows):
    return torch.ops.fastcon.softmax_grad(
        a, b, _scalar(scale, a), _scalar(bias, a), row_lse, col_lse, int(pos_offset), float(w_row), float(w_col),
        float(w_pos), int(chunk_rows)
    )


def softmax_fused(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes):
    return torch.ops.fastcon.softmax_fused(
        a, b, _scalar(scale, a), _scalar(bias, a), int(pos_offset), float(w_row), float(w_col), float(w_pos),
        int(chunk_rows), int(cache_bytes)
    )


def sigmoid_fused(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad):
    loss, grad_a, grad_b, grad_scale, grad_bias = torch.ops.fastcon.sigmoid_fused(
        a, b, _scalar(scale, a), _scalar(bias, a), int(pos_offset), float(w), int(chunk_rows), bool(need_grad)
    )
    if not need_grad:
        return loss, None, None, None, None
    return loss, grad_a, grad_b, grad_scale, grad_bias


def sigmoid_prefix_fused(a, b, scale, bias, pos_offset, w, weights, chunk_rows, need_grad, prefix):
    loss, *grads = torch.ops.fastcon.sigmoid_prefix_fused(
        a, b, _scalar(scale, a), _scalar(bias, a), int(pos_offset), float(w), [float(v) for v in weights],
        int(chunk_rows), bool(need_grad), *_prefix_tensors(prefix, a))
    if not need_grad:
        return (loss,) + (None,) * 6
    return (loss, *grads)


def _prefix_tensors(prefix, a):
    """The prefixes (a ``targets.Prefix``) as the prefix operators take them: dims, row and column
    scales in a's dtype."""
    return [int(d) for d in prefix.dims], prefix.row_scale.to(a.dtype), prefix.col_scale.to(a.dtype)


DIRECT_SOFTMAX, DIRECT_SIGMOID = 0, 1  # the kinds of fastcon::direct_loss


def direct_loss(a, b, scale, bias, kind, pos_offset, symmetric, label_smoothing, chunk_rows, cache_bytes):
    """The whole loss of a small problem, CLIP's (``kind=DIRECT_SOFTMAX``, with ``symmetric`` and
    ``label_smoothing``) or SigLIP's (``DIRECT_SIGMOID``), as one operator with its own autograd node,
    in the features' dtype: the numbers of ``softmax_fused``/``sigmoid_fused`` (same chunks, same
    cache) assembled as ``fastcon.ops.softmax`` assembles them. ``scale`` and ``bias`` are one-element
    tensors of any float dtype (``bias`` may be None); their gradients come back in their own shapes
    and dtypes."""
    return torch.ops.fastcon.direct_loss(a, b, scale, bias, int(kind), int(pos_offset), bool(symmetric),
                                         float(label_smoothing), int(chunk_rows), int(cache_bytes))


# ---------------------------------------------------------------------------------------------------
# The general target (fastcon/targets/): pass 1 and pass 2 as C++ operators

def _target_args(target, a, b):
    """The target in the wire format (``wire.pack``, which gives back the arrays an operator carried)
    as the operators take it: rows, cols, numbers, mask, teacher_a, teacher_b, teacher_scale."""
    from ..targets.wire import pack

    w = pack(target, a.shape[0], b.shape[0])
    return w.rows, w.cols, w.numbers, w.mask, w.teacher_a, w.teacher_b, w.teacher_scale


# The outputs of fastcon::target_stats, in order: pass 1's statistics, with soft targets their four
# terms, then the cached chunks of dot products.
_STATS_OUTPUTS = ("row_lse", "row_pos", "row_keep", "row_sum_pos", "row_sum_keep", "col_lse", "col_pos", "col_keep",
                  "col_sum_pos", "col_sum_keep")
_SOFT_OUTPUTS = ("cross_row", "cross_col", "ent_row", "ent_col")


def _named_outputs(out, names):
    """(the outputs named by ``names``, as a dict; the outputs after them)."""
    return dict(zip(names, out)), list(out[len(names):])


def _pass_vectors(target, teacher_norms=(None, None), counts=(None, None), masses=(None, None)):
    """What a pass adds to the target (``PassVector`` in csrc/cpu/target.cpp): the teacher's row and
    column normalisers, the positives' counts (pass 1's entropy terms) and each row's and column's
    target mass (pass 2); an empty list where the pass needs none."""
    if not target.soft:  # hard targets: at most a target mass per row (column)
        return [] if masses == (None, None) else [None] * 4 + list(masses)
    return [*teacher_norms, *counts, *masses]


def target_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, cache_bytes, teacher=None):
    from ..targets import TargetStats, with_teacher

    vectors = [] if teacher is None else _pass_vectors(target, (teacher.row_norm, teacher.col_norm),
                                                       (teacher.row_pos, teacher.col_pos))
    out = torch.ops.fastcon.target_stats(a, b, _scalar(scale, a), _scalar(bias, a), *_target_args(target, a, b),
                                         vectors, bool(symmetric), bool(smoothing), int(chunk_rows),
                                         int(cache_bytes))
    stats, rest = _named_outputs(out, _STATS_OUTPUTS)
    st = TargetStats(**stats)
    if not target.soft:
        return st, rest
    terms, cached = _named_outputs(rest, _SOFT_OUTPUTS)
    if not target.entropy:
        terms.update(ent_row=None, ent_col=None)
    return with_teacher(st, teacher, **terms), cached


teacher_stats = target_stats  # the teacher's pass (targets.teacher_stats) is this backend's pass 1


def target_grad(a, b, scale, bias, target, weights, chunk_rows, cached=()):
    w = weights
    vectors = _pass_vectors(target, (w.t_row_norm, w.t_col_norm), masses=(w.row_mass, w.col_mass))
    return torch.ops.fastcon.target_grad(
        a, b, _scalar(scale, a), _scalar(bias, a), *_target_args(target, a, b), vectors, w.row_lse,
        w.q_row_pos, w.q_row_keep, float(w.w_row), w.col_lse, w.q_col_pos, w.q_col_keep, w.w_col, int(chunk_rows),
        list(cached))


def _prefix_args(target, a, b, prefix):
    """The target without its teacher's scale (a guide has none) and the prefixes, as the prefix
    operators take them."""
    rows, cols, numbers, mask, guide_a, guide_b, _ = _target_args(target, a, b)
    return (rows, cols, numbers, mask, guide_a, guide_b), _prefix_tensors(prefix, a)


def target_prefix_stats(a, b, scale, bias, target, symmetric, smoothing, chunk_rows, prefix):
    from ..targets import TargetStats

    wire, pre = _prefix_args(target, a, b, prefix)
    out = torch.ops.fastcon.target_prefix_stats(a, b, _scalar(scale, a), _scalar(bias, a), *wire, bool(symmetric),
                                                bool(smoothing), int(chunk_rows), *pre)
    n = len(_STATS_OUTPUTS)
    return [TargetStats(**_named_outputs(out[k * n:(k + 1) * n], _STATS_OUTPUTS)[0]) for k in range(len(prefix.dims))]


def target_prefix_grad(a, b, scale, bias, target, weights, chunk_rows, prefix):
    wire, pre = _prefix_args(target, a, b, prefix)
    field = lambda name: [getattr(w, name) for w in weights]  # noqa: E731
    return tuple(torch.ops.fastcon.target_prefix_grad(
        a, b, _scalar(scale, a), _scalar(bias, a), *wire, field("row_lse"), field("q_row_pos"), field("q_row_keep"),
        [float(w.w_row) for w in weights], field("col_lse"), field("q_col_pos"), field("q_col_keep"), field("w_col"),
        int(chunk_rows), *pre))


def target_softmax_fused(a, b, scale, bias, target, eps, symmetric, chunk_rows, need_grad, cache_bytes=0):
    from ..targets import two_pass_target

    return two_pass_target(target_stats, target_grad, a, b, scale, bias, target, eps, symmetric, chunk_rows,
                           need_grad, cache_bytes)


def _register_fakes() -> None:
    """Output shapes and dtypes for FakeTensor / torch.compile / opcheck (outputs are in a's dtype,
    except the LSEs: float64)."""

    def _vec(a, n):
        return a.new_empty((n,))

    def _lse(a, n):
        return a.new_empty((n,), dtype=torch.float64)

    def _scal(a):
        return a.new_empty(())

    @torch.library.register_fake("fastcon::lse_stats")
    def _(a, b, scale, bias, pos_offset, chunk_rows):
        return _lse(a, a.shape[0]), _lse(a, b.shape[0]), _vec(a, a.shape[0])

    @torch.library.register_fake("fastcon::softmax_grad")
    def _(a, b, scale, bias, row_lse, col_lse, pos_offset, w_row, w_col, w_pos, chunk_rows):
        return a.new_empty(a.shape), a.new_empty(b.shape), _scal(a), _scal(a)

    @torch.library.register_fake("fastcon::softmax_fused")
    def _(a, b, scale, bias, pos_offset, w_row, w_col, w_pos, chunk_rows, cache_bytes):
        return (
            _lse(a, a.shape[0]),
            _lse(a, b.shape[0]),
            _vec(a, a.shape[0]),
            a.new_empty(a.shape),
            a.new_empty(b.shape),
            _scal(a),
            _scal(a),
        )

    @torch.library.register_fake("fastcon::sigmoid_fused")
    def _(a, b, scale, bias, pos_offset, w, chunk_rows, need_grad):
        if need_grad:
            return _scal(a), a.new_empty(a.shape), a.new_empty(b.shape), _scal(a), _scal(a)
        return _scal(a), _vec(a, 0), _vec(a, 0), _vec(a, 0), _vec(a, 0)


if AVAILABLE:
    try:
        _register_fakes()
    except RuntimeError as exc:  # pragma: no cover - e.g. registered twice on a module reload
        if "already" not in str(exc):
            raise


# ---------------------------------------------------------------------------------------------------
# Late interaction (the token-level family, fastcon/kernels/late.py): csrc/cpu/late.cpp

def late_stats(x, y, x_mask, y_mask, want_x, want_y, block):
    sx, sy = torch.ops.fastcon.late_stats(x, y, x_mask, y_mask, bool(want_x), bool(want_y), int(block))
    return sx, sy


def late_grad(x, y, x_mask, y_mask, grad_x, grad_y, block):
    dx, dy = torch.ops.fastcon.late_grad(x, y, x_mask, y_mask, grad_x, grad_y, int(block))
    return dx, dy
