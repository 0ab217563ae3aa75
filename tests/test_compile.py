"""The engine operators under torch.compile and torch.library.opcheck.

A training step that normalises the features and calls ``ClipLoss`` or ``SigLipLoss`` compiles with
``fullgraph=True`` (no graph break) on the CPU backends and gives eager's loss and gradients; every
engine operator passes ``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT
dispatch). Few, small shapes: compilation is slow on two cores.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fastcon
import fastcon.functional as FC
from fastcon.ops import engine, registry, softmax
from helpers import assert_close_rel, assert_compiles_like_eager, make_features

CPU_BACKENDS = ["cpp", "torch"]


def _step(loss_fn, x, y, log_scale, bias):
    a, b = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return loss_fn(a, b, log_scale.exp(), bias)


def _leaves(n, d, seed, bias_value):
    x, y = make_features(n, n, d, seed=seed)
    x = (3.0 * x).requires_grad_()  # not unit rows: the normalisation is part of the graph
    y = (0.5 * y).requires_grad_()
    log_scale = torch.tensor(2.659, requires_grad=True)
    bias = torch.tensor(bias_value, requires_grad=True)
    return [x, y, log_scale, bias]


def _run(fn, leaves):
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("module", ["clip", "siglip"])
def test_compiled_step_matches_eager(module, backend):
    torch._dynamo.reset()
    if module == "clip":
        loss_fn = fastcon.ClipLoss(backend=backend, label_smoothing=0.1)
        bias_value = -1.0
    else:
        loss_fn = fastcon.SigLipLoss(backend=backend)
        bias_value = -10.0
    leaves = _leaves(67, 48, 0, bias_value)
    eager_loss, eager_grads = _run(lambda *t: _step(loss_fn, *t), leaves)
    compiled = torch.compile(lambda *t: _step(loss_fn, *t), fullgraph=True)
    for seed in (0, 1):  # a second call reuses the graph (no recompilation on equal shapes)
        leaves = _leaves(67, 48, seed, bias_value)
        ref_loss, ref_grads = _run(lambda *t: _step(loss_fn, *t), leaves)
        loss, grads = _run(compiled, leaves)
        assert_close_rel(loss, ref_loss, rtol=1e-6, name="loss")
        for name, g, r in zip(["x", "y", "log_scale", "bias"], grads, ref_grads):
            assert g.dtype == r.dtype
            assert_close_rel(g, r, rtol=1e-5, atol=1e-7, name=f"grad {name}")
    if seed == 1:
        assert eager_loss.shape == ()


def test_compiled_step_under_autocast_matches_eager():
    torch._dynamo.reset()
    loss_fn = fastcon.ClipLoss(backend="cpp")
    leaves = _leaves(40, 32, 2, 0.0)
    step = lambda *t: _step(loss_fn, *t)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _run(step, leaves)
        loss, grads = _run(torch.compile(step, fullgraph=True), leaves)
    assert loss.dtype == torch.float32
    assert_close_rel(loss, ref_loss, rtol=1e-6, name="loss")
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close_rel(g, r, rtol=1e-5, atol=1e-7)


def _op_args(backend, need_grad, mm_dtype=None, n=(9, 13), d=8, softmax=True):
    a, b = make_features(n[0], n[1], d)
    a, b = a.requires_grad_(need_grad), b.requires_grad_(need_grad)
    scale = torch.tensor(14.3, requires_grad=need_grad)
    bias = torch.tensor(-2.0, requires_grad=need_grad)
    if softmax:
        return (a, b, scale, bias, backend, 2, 0.1, True, 4, need_grad, mm_dtype)
    return (a, b, scale, bias, backend, 2, 4, need_grad, mm_dtype)


softmax.triton_ops()
_OPS = {
    "softmax": (torch.ops.fastcon.softmax_loss.default, torch.ops.fastcon.softmax_loss_triton.default),
    "sigmoid": (torch.ops.fastcon.sigmoid_loss.default, torch.ops.fastcon.sigmoid_loss_triton.default),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck_cpu_ops(kind, backend, need_grad):
    op = _OPS[kind][0]
    torch.library.opcheck(op, _op_args(backend, need_grad, softmax=kind == "softmax"))


def test_opcheck_with_autocast_dtype():
    torch.library.opcheck(_OPS["softmax"][0], _op_args("cpp", True, torch.bfloat16))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "triton_fused"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_opcheck_triton_ops_under_the_interpreter(kind, backend):
    """Schema and autograd registration of the Triton operators. The fake-tensor and AOT checks
    trace the kernel launches (wrap_triton), which needs compiled kernels: they run in the CUDA suite."""
    op = _OPS[kind][1]
    torch.library.opcheck(op, _op_args(backend, True, softmax=kind == "softmax"),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_ops_take_no_python_objects():
    """Every argument of the engine operators is a tensor, a number, a bool, a string or a dtype:
    nothing that torch.compile would have to guard on by identity."""
    for op in (torch.ops.fastcon.softmax_loss, torch.ops.fastcon.sigmoid_loss,
               torch.ops.fastcon.softmax_loss_triton, torch.ops.fastcon.sigmoid_loss_triton):
        schema = str(op.default._schema)
        args = schema[schema.index("(") + 1:schema.index(") ->")].split(", ")
        for arg in args:
            assert arg.split(" ")[0] in ("Tensor", "str", "SymInt", "float", "bool", "ScalarType?"), (schema, arg)


def test_op_gradients_are_empty_without_need_grad():
    out = torch.ops.fastcon.softmax_loss(*_op_args("torch", False))
    assert out[0].dtype == torch.float64 and out[0].shape == ()
    assert all(t.numel() == 0 for t in out[1:])


def test_engine_backend_is_resolved_by_name():
    assert engine.resolve_name("auto", torch.device("cpu"), torch.float32) in ("cpp", "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        engine.resolve_name("fast", torch.device("cpu"), torch.float32)


def test_op_called_without_gradients_refuses_a_backward():
    args = list(_op_args("torch", True))
    args[9] = False  # need_grad
    loss = torch.ops.fastcon.softmax_loss(*args)[0]
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.backward()


def test_backend_resolution_is_a_constant_to_dynamo():
    """fastcon marks its backend resolution as Dynamo does, without importing Dynamo at import time."""
    import torch._dynamo

    probe = torch._dynamo.assume_constant_result(lambda: 0)
    assert getattr(probe, engine._DYNAMO_CONSTANT_MARK, False) is True
    assert getattr(engine.traced_backend_name, engine._DYNAMO_CONSTANT_MARK, False) is True


def test_triton_ops_record_their_kernels_for_the_compile_cache():
    """torch.compile's cache key lists a triton_op's kernels; fastcon's are launched through a helper
    that torch's source scan does not see, so they are recorded explicitly."""
    pytest.importorskip("triton")
    if not registry.HAS_TRITON_OP:
        pytest.skip("torch has no triton_op")
    import subprocess
    import sys

    # compiled kernels (JITFunction): a process without the interpreter
    code = ("from torch._library.triton import get_triton_kernels_for_op as get\n"
            "from fastcon.ops import softmax\n"
            "from fastcon.kernels.triton import chunked, fused, gemm\n"
            "softmax.triton_ops()\n"
            "kernels = get('fastcon::softmax_loss_triton')\n"
            "print(all(k in kernels for k in (chunked._chunk_grad_kernel, fused._fused_grad_kernel,\n"
            "                                 gemm._mm_accumulate_kernel)), len(kernels))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    found, count = out.stdout.split()
    assert found == "True" and int(count) >= 10


def test_importing_fastcon_loads_neither_dynamo_nor_inductor():
    import subprocess
    import sys

    code = "import sys, fastcon; print('torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matryoshka_in_one_pass_compiles_like_eager(backend):
    """MNRL over Matryoshka prefixes (one engine pass over D, fastcon::target_prefix_loss) in one graph,
    with the prefix norms' autograd around the operator."""
    q, d = make_features(24, 24, 16)
    assert_compiles_like_eager(
        lambda x, y: FC.multiple_negatives_ranking_loss(x, [y], matryoshka_dims=(16, 9, 4), backend=backend),
        [q.requires_grad_(), d.requires_grad_()])


@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck_the_prefix_op(need_grad):
    from fastcon.targets import Target
    from fastcon.targets.wire import wire_args

    a, b = make_features(9, 13, 8)
    a, b = a.requires_grad_(need_grad), b.requires_grad_(need_grad)
    scale = torch.tensor(14.3, requires_grad=need_grad)
    bias = torch.tensor(-2.0, requires_grad=need_grad)
    rs = (torch.rand(9, 2) + 0.5).requires_grad_(need_grad)
    cs = (torch.rand(13, 2) + 0.5).requires_grad_(need_grad)
    target = Target(torch.arange(9) + 2, torch.arange(13))
    torch.library.opcheck(torch.ops.fastcon.target_prefix_loss.default,
                          (a, b, scale, bias, rs, cs, *wire_args(target, 9, 13), [8, 3], [1.0, 0.5], "cpp", 0.1,
                           True, 4, need_grad, None))
