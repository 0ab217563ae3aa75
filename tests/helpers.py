"""Shared test data and comparison helpers."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_features(na, nb, d, *, seed=0, dtype=torch.float32, paired=True, duplicates=True, pos_offset=0):
    """Unit rows; text rows paired with image rows (positives clearly above chance) and a few exact
    duplicate rows (ties), as contrastive batches look in practice."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(na, d, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(torch.randn(nb, d, generator=g, dtype=torch.float64), dim=-1)
    if paired:
        k = min(na, nb - pos_offset)
        b[pos_offset:pos_offset + k] = F.normalize(a[:k] + 0.8 * b[pos_offset:pos_offset + k], dim=-1)
    if duplicates and na > 4 and nb > 4:
        a[-1] = a[0]
        b[-2] = b[1]
    return a.to(dtype), b.to(dtype)


def leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


def assert_close_rel(actual, expected, *, rtol, atol=0.0, name="value"):
    """max|actual − expected| <= rtol·max|expected| + atol, printing the first mismatches."""
    actual = actual.detach().double().reshape(-1)
    expected = expected.detach().double().reshape(-1)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bound = rtol * expected.abs().max().item() + atol
    if not torch.isfinite(actual).all() or err.max().item() > bound:
        bad = torch.nonzero(~(err <= bound)).reshape(-1)[:5].tolist()
        details = ", ".join(f"[{i}] {actual[i].item():.9g} vs {expected[i].item():.9g}" for i in bad)
        raise AssertionError(
            f"{name}: max error {err.max().item():.3g} > bound {bound:.3g} (rtol={rtol}, atol={atol}); "
            f"first mismatches: {details}")


def assert_matches_f64(fn, ref, tensors, *, rtol=2e-5, atol=1e-6):
    """``fn`` on fp32 copies of ``tensors`` against ``ref`` on float64 copies: a 0-d fp32 loss and
    the gradient of every input, each within ``rtol`` of the largest expected value plus ``atol``."""
    import warnings

    ours = [t.detach().float().requires_grad_() for t in tensors]
    truth = [t.detach().double().requires_grad_() for t in tensors]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the auto backend's one-time fallback notice
        out = fn(*ours)
    expected = ref(*truth)
    assert out.dtype == torch.float32 and out.shape == ()
    assert_close_rel(out, expected, rtol=rtol, atol=atol, name="loss")
    for i, (g, e) in enumerate(zip(torch.autograd.grad(out, ours), torch.autograd.grad(expected, truth))):
        assert_close_rel(g, e, rtol=rtol, atol=atol, name=f"grad of input {i}")


def assert_compiles_like_eager(step, leaves):
    """``torch.compile(step, fullgraph=True)`` gives eager's value and the gradients of every leaf."""
    torch._dynamo.reset()
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    out = torch.compile(step, fullgraph=True)(*leaves)
    assert_close_rel(out, eager, rtol=1e-6, name="compiled value")
    for g, e in zip(torch.autograd.grad(out, leaves), eager_grads):
        assert_close_rel(g, e, rtol=1e-5, atol=1e-8, name="compiled gradient")


def winner_token_case(b, n1, n2, d, *, seed):
    """Late-interaction inputs where item 0's only real token of the second set (index 0; the others
    masked out) is the argmax of every token of the first set of every item (those lean toward it), so
    that its gradient sums b·n1 gathered rows: (x (b, n1, d), y (b, n2, d), y_mask (b, n2)), fp32."""
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    x = F.normalize(torch.randn(b, n1, d, generator=g, dtype=torch.float64) / d ** 0.5 + 3 * v, dim=-1).float()
    y = F.normalize(torch.randn(b, n2, d, generator=g, dtype=torch.float64), dim=-1)
    y[0, 0] = v
    y_mask = torch.ones(b, n2, dtype=torch.bool)
    y_mask[0, 1:] = False
    return x, y.float(), y_mask


def assert_grads_within_fp32_formula(loss, reference, inputs, names):
    """The fp32 gradients of ``loss`` with respect to every input stay within twice the error of the
    materialised fp32 formula (``reference`` in fp32), both measured against ``reference`` in float64."""
    def grads(fn, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in inputs]
        return torch.autograd.grad(fn(*leaves), leaves)

    truth, formula, ours = grads(reference, torch.float64), grads(reference, torch.float32), grads(loss, torch.float32)
    for name, o, f, e in zip(names, ours, formula, truth):
        err, err_formula = (o.double() - e).abs().max().item(), (f.double() - e).abs().max().item()
        assert err <= 2 * err_formula + 1e-9, f"grad {name}: error {err:.3g}, the fp32 formula's {err_formula:.3g}"


def close_gloo() -> None:
    """Ends a gloo worker's group: a barrier first, so that no rank tears its connections down while
    another still uses them (a rank's exit during a peer's last collective can abort the process)."""
    import torch.distributed as dist

    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(worker, world: int, *args, timeout: float = 300):
    """Runs ``worker(rank, world, port, queue, *args)`` in ``world`` spawned processes (a gloo group on
    127.0.0.1:port, initialised by the worker) and returns {rank: what the worker put on the queue as
    (rank, value)}, after checking that every process exited cleanly."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, out) + tuple(args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results
