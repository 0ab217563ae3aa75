"""GPU-only checks (skipped without CUDA): low-precision error budgets and CUDA kernels vs reference.

The error budget follows the convention of memory-efficient loss kernels: in bf16/fp16 a fused path
must be no worse than the reference computed in the same low precision, both measured against an
fp32 ground truth on the same inputs, plus a small tolerance.
"""
import pytest
import torch

import fastcon
import fastcon.functional as FC
from fastcon import reference as R
from helpers import make_features

pytestmark = pytest.mark.cuda

LOSSES = {
    "clip": (FC.clip_loss, R.clip_loss_reference, None),
    "siglip": (FC.siglip_loss, R.siglip_loss_reference, -10.0),
}


def _loss_and_grads(fn, a, b, s, bias, **kw):
    leaves = [a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(),
              s.detach().clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_())
    out = fn(*leaves[:3], leaves[3] if bias is not None else None, **kw)
    return [out.detach().float()] + [g.float() for g in torch.autograd.grad(out, leaves)]


def _errors(outs, truth):
    return [((o - t).abs().max() / t.abs().max().clamp_min(1e-12)).item() for o, t in zip(outs, truth)]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["triton", "triton_fused", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(1000, 64), (4099, 256), (2048, 768)])
def test_low_precision_error_budget(loss, backend, dtype, n, d):
    if backend == "triton_fused" and d > 256:
        pytest.skip("the fully fused path covers D <= 256")
    fn, ref, bias_value = LOSSES[loss]
    a32, b32 = make_features(n, n, d)
    a32, b32 = a32.cuda(), b32.cuda()
    s = torch.tensor(100.0 if loss == "clip" else 10.0, device="cuda")
    bias = None if bias_value is None else torch.tensor(bias_value, device="cuda")
    truth = _loss_and_grads(ref, a32.to(dtype).float(), b32.to(dtype).float(), s, bias)
    ours = _errors(_loss_and_grads(fn, a32.to(dtype), b32.to(dtype), s, bias, backend=backend), truth)
    low = _errors(_loss_and_grads(lambda *x: ref(*x, upcast=False), a32.to(dtype), b32.to(dtype), s, bias), truth)
    tol = 2e-3 if dtype == torch.bfloat16 else 5e-4
    names = ["loss", "grad image", "grad text", "grad scale", "grad bias"]
    for name, e_ours, e_low in zip(names, ours, low):
        assert e_ours <= e_low + tol, f"{name}: fastcon error {e_ours:.3g} > low-precision reference {e_low:.3g} + {tol}"


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["auto", "triton", "triton_fused", "torch"])
@pytest.mark.parametrize("n,d", [(1, 3), (257, 64), (1000, 640)])
def test_cuda_fp32_matches_reference(loss, backend, n, d):
    if backend == "triton_fused" and d > 256:
        pytest.skip("the fully fused path covers D <= 256")
    fn, ref, bias_value = LOSSES[loss]
    a, b = make_features(n, n, d)
    a, b = a.cuda(), b.cuda()
    s = torch.tensor(14.3, device="cuda")
    bias = None if bias_value is None else torch.tensor(bias_value, device="cuda")
    truth = _loss_and_grads(ref, a.double(), b.double(), s.double(), None if bias is None else bias.double())
    ours = _loss_and_grads(fn, a, b, s, bias, backend=backend)
    # TF32 is off for torch.mm by default; 1e-4 leaves room for a different summation order at N=1000.
    for e in _errors(ours, [t.float() for t in truth]):
        assert e <= 1e-4


def _extra_memory_of_a_clip_step(n: int, d: int) -> int:
    """Bytes one bf16 CLIP forward+backward at N = n, D = d allocates beyond its inputs, at its peak."""
    a, b = make_features(n, n, d)
    a, b = a.cuda().bfloat16().requires_grad_(), b.cuda().bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    FC.clip_loss(a, b, torch.tensor(14.3, device="cuda")).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_cuda_memory_is_linear_in_n(monkeypatch):
    """At a chunk budget of 256 MiB the working memory of N = 16,384 stays below half of one fp32 N x N
    logits matrix (the default budget scales with the GPU: FASTCON_CHUNK_BYTES pins it here)."""
    monkeypatch.setenv("FASTCON_CHUNK_BYTES", str(256 << 20))
    extra = _extra_memory_of_a_clip_step(16384, 256)
    assert extra < 16384 * 16384 * 4 // 2, f"{extra / 2**20:.0f} MiB: half of one 16k x 16k fp32 logits matrix is 512 MiB"


def test_cuda_working_memory_follows_the_device_budget():
    """With the default budget (1/256 of the GPU's memory) the extra memory of one CLIP step at
    N = 32,768 is the budget (a block of G, pass 1's partials) plus O(N·D): never an N x N matrix."""
    from fastcon.kernels._common import chunk_bytes

    n, d = 32768, 512
    extra = _extra_memory_of_a_clip_step(n, d)
    budget = chunk_bytes(torch.device("cuda"))
    per_row = 6 * d * 4  # fp32 gradients and their bf16 copies of both sides, the LSEs and partials
    assert extra <= budget + n * per_row + (64 << 20), f"{extra / 2**20:.0f} MiB at a budget of {budget / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------
# In a training loop: autocast, torch.compile, CUDA graphs, fp16 gradients

def _open_clip_style(loss, a, b, s, bias):
    """open_clip's losses restated (its code under autocast: logits in the autocast dtype)."""
    import torch.nn.functional as F

    labels = torch.arange(a.shape[0], device=a.device)
    if loss == "clip":
        return (F.cross_entropy(s * a @ b.T, labels) + F.cross_entropy(s * b @ a.T, labels)) / 2
    logits = s * a @ b.T + bias
    z = 2 * torch.eye(a.shape[0], device=a.device) - 1
    return -F.logsigmoid(z * logits).sum() / a.shape[0]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("backend", ["auto", "triton", "triton_fused", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_within_open_clip_budget(loss, backend, dtype):
    fn, ref, bias_value = LOSSES[loss]
    a32, b32 = make_features(2048, 2048, 256)
    a32, b32 = a32.cuda(), b32.cuda()
    s = torch.tensor(30.0, device="cuda")
    bias = None if bias_value is None else torch.tensor(bias_value, device="cuda")
    truth = _loss_and_grads(ref, a32.double(), b32.double(), s.double(), None if bias is None else bias.double())
    with torch.autocast("cuda", dtype=dtype):
        ours = _loss_and_grads(fn, a32, b32, s, bias, backend=backend)
        peer = _loss_and_grads(lambda *x: _open_clip_style(loss, *x), a32, b32, s, bias)
    leaves = [a32, b32, s] + ([] if bias is None else [bias])
    tol = 2e-3 if dtype == torch.bfloat16 else 5e-4
    e_ours = _errors(ours, [t.float() for t in truth])
    e_peer = _errors(peer, [t.float() for t in truth])
    names = ["loss", "grad image", "grad text", "grad scale", "grad bias"]
    for name, eo, ep in zip(names, e_ours, e_peer):
        if name == "grad bias" and loss == "clip":
            continue
        assert eo <= ep + tol, f"{name}: fastcon {eo:.3g} > open_clip under autocast {ep:.3g} + {tol}"
    with torch.autocast("cuda", dtype=dtype):
        out = fn(a32, b32, s, bias, backend=backend)
    assert out.dtype == torch.float32
    x = a32.clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype):
        fn(x, b32, s, bias, backend=backend).backward()
    assert x.grad.dtype == torch.float32 and len(leaves) >= 3


@pytest.mark.parametrize("module", ["clip", "siglip"])
def test_cuda_compiled_step_matches_eager(module):
    import torch.nn.functional as F

    import fastcon

    torch._dynamo.reset()
    loss_fn = fastcon.ClipLoss() if module == "clip" else fastcon.SigLipLoss()
    x, y = make_features(1024, 1024, 256)
    x, y = (2 * x).cuda().requires_grad_(), y.cuda().requires_grad_()
    log_scale = torch.tensor(2.659, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)

    def step(x, y, log_scale, bias):
        return loss_fn(F.normalize(x, dim=-1), F.normalize(y, dim=-1), log_scale.exp(), bias)

    leaves = [x, y, log_scale, bias]
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(step, fullgraph=True)
    with torch.autocast("cuda", enabled=False):
        out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    assert abs(out.item() - eager.item()) <= 1e-5 * abs(eager.item())
    for g, e in zip(grads[:3], eager_grads[:3]):
        assert ((g - e).abs().max() / e.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("backend", ["triton", "triton_fused"])
def test_cuda_opcheck_triton_ops(kind, backend):
    a, b = make_features(65, 80, 64)
    a, b = a.cuda().requires_grad_(), b.cuda().requires_grad_()
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    bias = torch.tensor(-2.0, device="cuda", requires_grad=True)
    if kind == "softmax":
        op = torch.ops.fastcon.softmax_loss_triton.default
        args = (a, b, scale, bias, backend, 3, 0.1, True, 16, True, None)
    else:
        op = torch.ops.fastcon.sigmoid_loss_triton.default
        args = (a, b, scale, bias, backend, 3, 16, True, None)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_cuda_graph_capture_of_a_training_step(loss):
    fn, _, bias_value = LOSSES[loss]
    a, b = make_features(1000, 1000, 128)
    static_a = a.cuda().bfloat16().requires_grad_()
    static_b = b.cuda().bfloat16().requires_grad_()
    s = torch.tensor(14.3, device="cuda")
    bias = None if bias_value is None else torch.tensor(bias_value, device="cuda")

    def step():
        static_a.grad = static_b.grad = None
        out = fn(static_a, static_b, s, bias)
        out.backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_a.grad = static_b.grad = None
    with torch.cuda.graph(graph):
        static_out = fn(static_a, static_b, s, bias)
        static_out.backward()
    a2, b2 = make_features(1000, 1000, 128, seed=5)
    with torch.no_grad():
        static_a.copy_(a2.cuda().bfloat16())
        static_b.copy_(b2.cuda().bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    x = a2.cuda().bfloat16().requires_grad_()
    y = b2.cuda().bfloat16().requires_grad_()
    eager = fn(x, y, s, bias)
    eager.backward()
    assert abs(static_out.float().item() - eager.float().item()) <= 1e-3 * abs(eager.float().item())
    assert ((static_a.grad.float() - x.grad.float()).abs().max() / x.grad.float().abs().max()).item() <= 1e-2


@pytest.mark.parametrize("backend", ["triton", "triton_fused"])
def test_cuda_fp16_gradient_error_budget_at_65536(backend):
    """G ≈ 1/N = 1.5e-5 here, below fp16's smallest normal: the lifted G keeps the gradient no worse
    than the reference computed in fp16 (an fp32 chunked computation on the same fp16 values is the truth)."""
    import fastcon.functional as FC

    n, d = 65536, 64
    a, b = make_features(n, n, d)
    a16, b16 = a.cuda().half(), b.cuda().half()
    s = torch.tensor(14.3, device="cuda")
    truth = _loss_and_grads(FC.clip_loss, a16.float(), b16.float(), s, None, backend="torch")
    ours = _errors(_loss_and_grads(FC.clip_loss, a16, b16, s, None, backend=backend), truth)
    low = _errors(_loss_and_grads(lambda *x: R.clip_loss_reference(*x, upcast=False), a16, b16, s, None), truth)
    for name, e_ours, e_low in zip(["loss", "grad image", "grad text", "grad scale"], ours, low):
        assert e_ours <= e_low + 5e-4, f"{name}: fastcon {e_ours:.3g} > fp16 reference {e_low:.3g} + 5e-4"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mm_accumulate(dtype):
    from fastcon.kernels.triton.gemm import mm_accumulate

    x = torch.randn(3000, 1030, device="cuda").to(dtype)
    y = torch.randn(3000, 768, device="cuda").to(dtype)
    c0 = torch.randn(1030, 768, device="cuda")
    c = c0.clone()
    mm_accumulate(x.T, y, c, 0.5, torch.tensor(2.0, device="cuda"))
    expected = x.double().T @ y.double() + c0.double()
    assert ((c.double() - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_cuda_half_gemm_on_old_torch_is_a_clear_error(monkeypatch):
    import fastcon.functional as FC
    from fastcon.kernels import _common

    monkeypatch.setattr(_common, "_torch_version", lambda: (2, 7))
    a, b = make_features(64, 64, 32)
    with pytest.raises(RuntimeError, match="torch >= 2.8"):
        FC.clip_loss(a.cuda().bfloat16(), b.cuda().bfloat16(), 10.0, backend="triton")


# ---------------------------------------------------------------------------------------------------
# The general target on the GPU (the chunked Triton path's target epilogues, compiled)

TARGET_CASES = {
    "labels": (lambda x, y, s, **kw: FC.clip_loss(x, y, s, labels=torch.arange(x.shape[0], device=x.device) % 7, **kw),
               lambda x, y, s: R.multi_positive_clip_loss_reference(
                   x, y, s, labels=torch.arange(x.shape[0], device=x.device) % 7)),
    "negatives-margin": (lambda x, y, s, **kw: FC.negatives_clip_loss(x, y, _roll_negatives(y), s,
                                                                      false_negative_margin=0.05, **kw),
                         lambda x, y, s: R.negatives_clip_loss_reference(x, y, _roll_negatives(y), s,
                                                                         false_negative_margin=0.05)),
    "ntxent": (lambda x, y, s, **kw: FC.ntxent_loss(x, y, temperature=0.1, **kw),
               lambda x, y, s: R.ntxent_loss_reference(x, y, temperature=0.1)),
    "mnrl-all": (lambda x, y, s, **kw: FC.multiple_negatives_ranking_loss(
        x, [y, _roll_negatives(y)[:, 0]], directions=R.MNRL_DIRECTIONS, hardness_mode="in_batch_negatives",
        hardness_strength=9.0, **kw),
                 lambda x, y, s: R.mnrl_loss_reference(x, [y, _roll_negatives(y)[:, 0]],
                                                       directions=R.MNRL_DIRECTIONS,
                                                       hardness_mode="in_batch_negatives", hardness_strength=9.0)),
}


def _roll_negatives(y, k=3):
    """Hard negatives mined from the batch: image i's are the texts of i+1 .. i+k."""
    return torch.stack([y.roll(-(j + 1), dims=0) for j in range(k)], dim=1)


@pytest.mark.parametrize("case", list(TARGET_CASES))
@pytest.mark.parametrize("backend", ["auto", "triton", "triton_fused", "torch"])
def test_cuda_general_target_fp32_matches_reference(case, backend):
    fn, ref = TARGET_CASES[case]
    a, b = make_features(700, 700, 64)
    a, b = a.cuda(), b.cuda()
    s = torch.tensor(30.0, device="cuda")
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    out = fn(*leaves, s, backend=backend)
    grads = torch.autograd.grad(out, leaves)
    truth = [t.double().requires_grad_() for t in (a, b)]
    expected = ref(*truth, s.double())
    expected_grads = torch.autograd.grad(expected, truth)
    for got, want in zip([out] + list(grads), [expected] + list(expected_grads)):
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err <= 1e-4, (case, err)


@pytest.mark.parametrize("case", ["labels", "negatives-margin", "ntxent"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "triton_fused"])
def test_cuda_general_target_low_precision_budget(case, dtype, backend):
    """bf16/fp16 features: no worse than the reference computed in fp32 from the rounded features, by
    more than the dtype's tolerance (the engine's statistics stay fp32/float64)."""
    fn, ref = TARGET_CASES[case]
    a, b = make_features(2048, 2048, 256)
    a, b = a.cuda().to(dtype), b.cuda().to(dtype)
    s = torch.tensor(30.0, device="cuda")
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    out = fn(*leaves, s, backend=backend)
    grads = torch.autograd.grad(out, leaves)
    truth = [t.double().requires_grad_() for t in (a, b)]
    expected = ref(*truth, s.double())
    expected_grads = torch.autograd.grad(expected, truth)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for got, want in zip([out] + list(grads), [expected] + list(expected_grads)):
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err <= tol, (case, dtype, err)


# ---------------------------------------------------------------------------------------------------
# Soft targets (distillation) on the Triton paths: the teacher's tile (from its cuBLAS chunk) beside
# the student's (from its chunk, or formed in the kernels)

DISTILL_CASES = {"clip": dict(kind="clip"), "hycd": dict(kind="hycd", alpha=0.2, temperature=0.4),
                 "cwcl": dict(kind="cwcl")}


def _distill_errors(case, dtype, n=1024, d=256, backend="triton"):
    """Relative errors (loss, grad image, grad text[, grad scale]) of FC.distill_loss on the Triton path
    with ``dtype`` features against the float64 reference of the same (rounded) features."""
    kw = DISTILL_CASES[case]
    x, y = make_features(n, n, d)
    tx, ty = make_features(n, n, d, seed=4)
    x, y, tx, ty = (t.cuda().to(dtype) for t in (x, y, tx, ty))
    s = torch.tensor(30.0, device="cuda")
    uses_scale = case != "hycd"  # hycd works on the similarities without the logit scales
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    truth = [x.double().requires_grad_(), y.double().requires_grad_()]
    if uses_scale:
        leaves.append(s.clone().requires_grad_())
        truth.append(s.double().requires_grad_())
    out = FC.distill_loss(leaves[0], leaves[1], leaves[2] if uses_scale else 99.0, tx, ty, 50.0, backend=backend,
                          **kw)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, leaves)
    expected = R.distill_loss_reference(truth[0], truth[1], truth[2] if uses_scale else 99.0, tx.double(),
                                        ty.double(), 50.0, **kw)
    expected_grads = torch.autograd.grad(expected, truth)
    return [((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
            for got, want in zip([out] + list(grads), [expected] + list(expected_grads))]


@pytest.mark.parametrize("case", list(DISTILL_CASES))
@pytest.mark.parametrize("backend", ["triton", "triton-matmul", "triton_fused"])
def test_cuda_distill_triton_fp32_matches_reference(case, backend, monkeypatch):
    """fp32 features; "triton-matmul": the chunked path with the student's tiles formed in its
    epilogue kernels (TF32x3)."""
    if backend == "triton-matmul":
        monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
        backend = "triton"
    errs = _distill_errors(case, torch.float32, backend=backend)
    assert max(errs) <= 1e-4, (case, errs)


@pytest.mark.parametrize("case", list(DISTILL_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "triton-matmul", "triton_fused"])
def test_cuda_distill_triton_low_precision_budget(case, dtype, backend, monkeypatch):
    """bf16/fp16 features: within the dtype's tolerance of the float64 reference of the rounded features
    (the statistics stay fp32/float64; G is rounded to the dtype for the gradient GEMMs, fp16 lifted by
    grad_tile_scale). "triton-matmul": the student's tiles formed in the epilogue kernels."""
    if backend == "triton-matmul":
        monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
        backend = "triton"
    errs = _distill_errors(case, dtype, backend=backend)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert max(errs) <= tol, (case, dtype, errs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_distill_clip_pair_from_one_pass(dtype, tol):
    """DistillClipLoss on one process (both losses from one engine pass, pass 2 in the backward) on the
    Triton path: each loss and the gradients of a weighted sum against the float64 references."""
    n, d = 1024, 256
    x, y = make_features(n, n, d)
    tx, ty = make_features(n, n, d, seed=4)
    x, y, tx, ty = (t.cuda().to(dtype) for t in (x, y, tx, ty))
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(30.0, device="cuda",
                                                                               requires_grad=True)]
    truth = [x.double().requires_grad_(), y.double().requires_grad_(), torch.tensor(30.0, device="cuda",
                                                                                  dtype=torch.float64,
                                                                                  requires_grad=True)]
    c, dl = fastcon.DistillClipLoss()(*leaves, tx, ty, 50.0)
    c_ref, d_ref = R.distill_clip_loss_reference(*truth, tx.double(), ty.double(), 50.0)
    grads = torch.autograd.grad(c + 0.5 * dl, leaves)
    expected = torch.autograd.grad(c_ref + 0.5 * d_ref, truth)
    errs = [((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
            for got, want in zip([c, dl] + list(grads), [c_ref, d_ref] + list(expected))]
    assert max(errs) <= tol, errs


# ---------------------------------------------------------------------------------------------------
# Mixing losses (MoCHi, m²-mix) on the Triton path: the engine's row LSE beside O(N) autograd

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_mochi_matches_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    q, k, queue = (t.cuda().to(dtype) for t in (unit(512, 128), unit(512, 128), unit(8192, 128)))
    leaf = q.clone().requires_grad_()
    loss, mixes = FC.mochi_loss(leaf, k, queue, top_n=256, n_mix=256, n_query_mix=32, backend="triton",
                                generator=torch.Generator(device="cuda").manual_seed(1), return_mixes=True)
    truth = q.double().requires_grad_()
    want = R.mochi_loss_reference(truth, k.double(), queue.double(), mixes, top_n=256)
    (grad,), (expected,) = torch.autograd.grad(loss, [leaf]), torch.autograd.grad(want, [truth])
    errs = [abs(loss.double().item() - want.item()) / abs(want.item()),
            ((grad.double() - expected).abs().max() / expected.abs().max()).item()]
    assert max(errs) <= tol, errs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_m2mix_matches_reference(dtype, tol):
    x, y = make_features(1024, 1024, 256)
    x, y = x.cuda().to(dtype), y.cuda().to(dtype)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    truth = [x.double().requires_grad_(), y.double().requires_grad_()]
    loss = FC.m2mix_loss(*leaves, lam=0.3, backend="triton")
    want = R.m2mix_loss_reference(*truth, 0.3)
    grads, expected = torch.autograd.grad(loss, leaves), torch.autograd.grad(want, truth)
    errs = [abs(loss.double().item() - want.item()) / abs(want.item())] + [
        ((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, expected)]
    assert max(errs) <= tol, errs
