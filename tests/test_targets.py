"""The general target on the engine: multi-positive CLIP over ids, CLIP with hard negatives (global and
own forms, slot masks, GIST margin), NT-Xent; every engine path against the float64 reference, loss
and the gradient of every input that requires grad."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastcon
import fastcon.functional as FC
from fastcon import reference as R
from fastcon.targets import Target
from fastcon.targets.wire import wire_args
from fastcon.ops import target_engine_loss
from helpers import assert_close_rel, make_features

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter),
            pytest.param("triton_fused", marks=pytest.mark.interpreter), "auto"]


def _negatives(b, k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1).float()


def _check(fn, ref, tensors, *, rtol=2e-5, **kw):
    """fn and ref on leaves of ``tensors`` (fp32 for fn, float64 for ref): loss and every gradient."""
    ours = [t.detach().clone().requires_grad_() for t in tensors]
    truth = [t.detach().double().requires_grad_() for t in tensors]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the auto backend's one-time fallback notice
        out = fn(*ours, **kw)
    expected = ref(*truth)
    assert out.dtype == tensors[0].dtype and out.shape == ()
    assert_close_rel(out, expected, rtol=rtol, atol=1e-6, name="loss")
    grads = torch.autograd.grad(out, ours)
    expected_grads = torch.autograd.grad(expected, truth)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert g.dtype == ours[i].dtype and g.shape == ours[i].shape
        if g.numel():  # (K = 0 negatives have an empty gradient)
            # an absolute floor for gradients that cancel to ~0 (a CLIP bias, one class for all rows)
            assert_close_rel(g, e, rtol=rtol, atol=1e-6, name=f"grad of input {i}")


LABEL_SETS = {
    "unique": lambda n: torch.arange(n),
    "shared": lambda n: torch.arange(n) % max(1, n // 3),
    "one_class": lambda n: torch.zeros(n, dtype=torch.long),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels", list(LABEL_SETS))
@pytest.mark.parametrize("n,d,eps,chunk", [(1, 3, 0.0, None), (37, 16, 0.1, 5), (130, 64, 0.0, 33)])
def test_multi_positive_clip(backend, labels, n, d, eps, chunk):
    a, b = make_features(n, n, d)
    ids = LABEL_SETS[labels](n)
    s, bias = torch.tensor(30.0), torch.tensor(-1.5)
    _check(lambda x, y, t, c: FC.clip_loss(x, y, t, c, labels=ids, label_smoothing=eps, backend=backend,
                                           chunk_size=chunk),
           lambda x, y, t, c: R.multi_positive_clip_loss_reference(x, y, t, c, labels=ids, label_smoothing=eps),
           [a, b, s, bias])


def test_unique_labels_give_clip():
    a, b = make_features(50, 50, 16)
    s = torch.tensor(100.0)
    plain = FC.clip_loss(a, b, s, backend="torch")
    assert_close_rel(FC.clip_loss(a, b, s, labels=torch.arange(50), backend="torch"), plain, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(b=1, k=1, d=3),
    dict(b=9, k=0, d=8),
    dict(b=17, k=3, d=16, eps=0.1),
    dict(b=17, k=3, d=16, mask=True),
    dict(b=17, k=3, d=16, margin=0.05),
    dict(b=24, k=2, d=16, labels=True, margin=0.1, eps=0.1, chunk=7),
    dict(b=33, k=7, d=64, mask=True, margin=0.0, chunk=10),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_global_negatives(backend, case):
    b, k, d = case["b"], case["k"], case["d"]
    x, y = make_features(b, b, d)
    negs = _negatives(b, k, d, seed=b + k)
    if case.get("margin") is not None and b > 1 and k > 0:
        negs[0, 0] = y[0]  # a false negative the margin must drop
    mask = (torch.arange(b * k).reshape(b, k) % 3 != 1) if case.get("mask") else None
    ids = (torch.arange(b) % 5) if case.get("labels") else None
    kw = dict(negative_mask=mask, false_negative_margin=case.get("margin"), labels=ids,
              label_smoothing=case.get("eps", 0.0))
    s, bias = torch.tensor(20.0), torch.tensor(0.5)
    _check(lambda x_, y_, n_, t, c: FC.negatives_clip_loss(x_, y_, n_, t, c, backend=backend,
                                                           chunk_size=case.get("chunk"), **kw),
           lambda x_, y_, n_, t, c: R.negatives_clip_loss_reference(x_, y_, n_, t, c, **kw),
           [x, y, negs, s, bias])


@pytest.mark.parametrize("case", [dict(), dict(mask=True), dict(margin=0.05), dict(eps=0.1, mask=True)])
def test_own_negatives(case):
    b, k, d = 21, 4, 16
    x, y = make_features(b, b, d)
    negs = _negatives(b, k, d, seed=3)
    negs[2, 1] = y[2]
    mask = (torch.arange(b * k).reshape(b, k) % 4 != 0) if case.get("mask") else None
    kw = dict(form="own", negative_mask=mask, false_negative_margin=case.get("margin"),
              label_smoothing=case.get("eps", 0.0))
    _check(lambda x_, y_, n_, t: FC.negatives_clip_loss(x_, y_, n_, t, **kw),
           lambda x_, y_, n_, t: R.negatives_clip_loss_reference(x_, y_, n_, t, **kw),
           [x, y, negs, torch.tensor(14.3)])


def test_every_negative_dropped_is_zero_and_finite():
    b, k, d = 6, 3, 8
    x, y = make_features(b, b, d)
    negs = _negatives(b, k, d).requires_grad_()
    xg = x.clone().requires_grad_()
    out = FC.negatives_clip_loss(xg, y, negs, 14.3, form="own", negative_mask=torch.zeros(b, k, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(xg.grad).all() and torch.isfinite(negs.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,t,chunk", [(1, 3, 0.5, None), (2, 8, 0.1, None), (45, 32, 0.5, 11), (100, 256, 0.07, 64)])
def test_ntxent(backend, n, d, t, chunk):
    if backend == "triton_fused" and d > 64:
        # the interpreter forms the fused kernels' tiles once per 128-wide slice of D: fewer rows there
        n, chunk = 24, 16
    g = torch.Generator().manual_seed(n)
    out0, out1 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    _check(lambda p, q: FC.ntxent_loss(p, q, temperature=t, backend=backend, chunk_size=chunk),
           lambda p, q: R.ntxent_loss_reference(p, q, temperature=t), [out0, out1])


def test_bf16_inputs_keep_their_dtype_and_budget():
    a, b = make_features(64, 64, 32, dtype=torch.bfloat16)
    ids = torch.arange(64) % 10
    out = FC.clip_loss(a, b, 14.3, labels=ids, backend="torch")
    truth = R.multi_positive_clip_loss_reference(a.double(), b.double(), 14.3, labels=ids)
    low = R.multi_positive_clip_loss_reference(a, b, 14.3, labels=ids, upcast=False)
    assert out.dtype == torch.bfloat16
    assert abs(out.double() - truth) <= abs(low.double() - truth) + 1e-2 * abs(truth)


def test_under_autocast_the_loss_is_fp32():
    a, b = make_features(30, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FC.clip_loss(a, b, 14.3, labels=torch.arange(30) % 4, backend="torch")
    exact = R.multi_positive_clip_loss_reference(a.bfloat16().double(), b.bfloat16().double(), 14.3,
                                                 labels=torch.arange(30) % 4)
    assert out.dtype == torch.float32 and abs(out.item() - exact.item()) <= 1e-5 * exact.item()


@pytest.mark.interpreter
def test_the_fused_tile_kernels_run_the_general_target(monkeypatch):
    """backend="triton_fused" runs the general target on its own kernels (pass 1 on the matmul
    producer, pass 2 on the fused rows and columns kernels, no chunk of logits in memory), and says
    where D is too wide for them."""
    from fastcon.kernels.triton import fused_target, plan, target

    launched = []
    real = fused_target.launch

    def spy(kernel):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return real(kernel)

    monkeypatch.setattr(fused_target, "launch", spy)
    monkeypatch.setattr(target, "launch", spy)
    mm = []
    for mod in (plan, target):
        monkeypatch.setattr(mod, "mm_acc", lambda *a: mm.append(1) or torch.mm(*a))
    a, b = make_features(20, 20, 8)
    ids = torch.arange(20) % 6
    _check(lambda x, y: FC.clip_loss(x, y, 10.0, labels=ids, backend="triton_fused"),
           lambda x, y: R.multi_positive_clip_loss_reference(x, y, 10.0, labels=ids), [a, b])
    assert {"target_stats_kernel", "_fused_target_rows_kernel", "_fused_target_cols_kernel"} <= set(launched)
    assert "_target_grad_kernel" not in launched and not mm
    # D = 200: pass 2's accumulators take D in two slices (configs.FUSED_CONFIGS), the second partial
    a, b = make_features(12, 12, 200)
    ids = torch.arange(12) % 4
    _check(lambda x, y: FC.clip_loss(x, y, 10.0, labels=ids, backend="triton_fused"),
           lambda x, y: R.multi_positive_clip_loss_reference(x, y, 10.0, labels=ids), [a, b])
    assert fastcon.backend_info()["not_implemented"] == []
    wide, _ = make_features(8, 8, 300)
    with pytest.raises(ValueError, match="D <= 256"):
        FC.clip_loss(wide, wide, 10.0, labels=torch.arange(8), backend="triton_fused")


def test_bad_input_names_the_argument():
    x, y = make_features(4, 4, 8)
    negs = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match=r"negatives must be \(B=4, K, D=8\)"):
        FC.negatives_clip_loss(x, y, torch.zeros(4, 2, 7), 10.0)
    with pytest.raises(ValueError, match=r"negatives must be \(B=4"):
        FC.negatives_clip_loss(x, y, torch.zeros(3, 2, 8), 10.0)
    with pytest.raises(ValueError, match="K=0"):
        FC.negatives_clip_loss(x, y, negs[:, :0], 10.0, form="own")
    with pytest.raises(ValueError, match=r"negative_mask must have shape \(4, 2\)"):
        FC.negatives_clip_loss(x, y, negs, 10.0, negative_mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or 0/1 integer"):
        FC.negatives_clip_loss(x, y, negs, 10.0, negative_mask=torch.ones(4, 2))
    with pytest.raises(ValueError, match="false_negative_margin must be finite and >= 0"):
        FC.negatives_clip_loss(x, y, negs, 10.0, false_negative_margin=-0.1)
    with pytest.raises(ValueError, match="form must be"):
        FC.negatives_clip_loss(x, y, negs, 10.0, form="local")
    with pytest.raises(ValueError, match=r"labels must have one id per row: shape \(4,\)"):
        FC.clip_loss(x, y, 10.0, labels=torch.arange(5))
    with pytest.raises(TypeError, match="integer ids"):
        FC.clip_loss(x, y, 10.0, labels=torch.arange(4.0))
    with pytest.raises(ValueError, match=">= 0"):
        FC.clip_loss(x, y, 10.0, labels=torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="paired"):
        FC.clip_loss(x, torch.zeros(6, 8), 10.0, labels=torch.arange(4))
    with pytest.raises(ValueError, match="temperature must be a positive"):
        FC.ntxent_loss(x, y, temperature=-0.5)
    with pytest.raises(ValueError, match="one shape"):
        FC.ntxent_loss(x, torch.zeros(5, 8))


def test_target_op_compiles_and_passes_opcheck():
    torch._dynamo.reset()
    x, y = make_features(20, 20, 8)
    ids = torch.arange(20) % 6
    step = lambda p, q, t: FC.clip_loss(F.normalize(p, dim=-1), F.normalize(q, dim=-1), t.exp(),  # noqa: E731
                                        labels=ids, backend="torch")
    leaves = [(2 * x).requires_grad_(), y.clone().requires_grad_(), torch.tensor(2.0, requires_grad=True)]
    eager = step(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    out = torch.compile(step, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out, leaves)
    assert_close_rel(out, eager, rtol=1e-6)
    for g, e in zip(grads, eager_grads):
        assert_close_rel(g, e, rtol=1e-5, atol=1e-8)
    a, b = make_features(9, 12, 8)
    args = (a.requires_grad_(), b.requires_grad_(), torch.tensor(14.3, requires_grad=True),
            torch.tensor(0.5, requires_grad=True), torch.arange(9) % 3,
            torch.cat([torch.arange(9) % 3, torch.full((3,), -1)]),
            torch.tensor([True] * 10 + [False, True]))
    wired = wire_args(Target(args[4], args[5], col_keep=args[6], margin=0.1), 9, 12)
    args = args[:4] + (*wired, "torch", 0.1, True, 4, -1, True, None)
    torch.library.opcheck(torch.ops.fastcon.target_softmax_loss.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_on_columns_without_a_positive_stay_finite(backend):
    """s = 100 and each image as its own hard negative: logits of 100 on columns that own no positive
    (and on dropped pairs) must contribute 0 to G, not exp(100)·0 = NaN."""
    b, k, d = 10, 2, 16
    x, y = make_features(b, b, d)
    negs = _negatives(b, k, d, seed=9)
    negs[:, 0] = x  # logits of 100, above every positive's
    for kw in (dict(), dict(false_negative_margin=0.01)):
        _check(lambda x_, y_, n_, t: FC.negatives_clip_loss(x_, y_, n_, t, backend=backend, **kw),
               lambda x_, y_, n_, t: R.negatives_clip_loss_reference(x_, y_, n_, t, **kw),
               [x, y, negs, torch.tensor(100.0)], rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g)
    _check(lambda p, q: FC.ntxent_loss(p, q, temperature=0.01, backend=backend),
           lambda p, q: R.ntxent_loss_reference(p, q, temperature=0.01), [z0, z1], rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("form", ["global", "own"])
def test_margin_ties_are_exact_in_float64(form, backend):
    """A negative equal to the positive (and, in the global form, a duplicated in-batch text) at margin
    0: both similarities come from one product, so the tie keeps the column, as in the reference."""
    b, k, d = 12, 3, 16
    x, y = make_features(b, b, d, dtype=torch.float64)
    negs = _negatives(b, k, d, seed=11).double()
    negs[:, 0] = y
    if form == "global":
        y[5] = y[4]
    for margin in (0.0, 0.05):
        kw = dict(form=form, false_negative_margin=margin)
        got = FC.negatives_clip_loss(x, y, negs, 14.3, backend=backend, **kw)
        expected = R.negatives_clip_loss_reference(x, y, negs, 14.3, **kw)
        assert abs(got.item() - expected.item()) <= 1e-12 * abs(expected.item()), (margin, got, expected)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_margin_under_autocast_reads_the_rounded_similarities(backend):
    b, k, d = 64, 2, 32
    x, y = make_features(b, b, d)
    negs = _negatives(b, k, d, seed=12)
    negs[:, 1] = F.normalize(y + 0.02 * negs[:, 0], dim=-1)  # near the threshold
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = FC.negatives_clip_loss(x, y, negs, 14.3, false_negative_margin=0.01, backend=backend)
    expected = R.negatives_clip_loss_reference(x.bfloat16().double(), y.bfloat16().double(),
                                               negs.bfloat16().double(), 14.3, false_negative_margin=0.01)
    assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item())


def test_own_form_checks_its_arguments_too():
    x, y = make_features(4, 4, 8)
    negs = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        FC.negatives_clip_loss(x, y, negs, 10.0, form="own", backend="bogus")
    with pytest.raises(ValueError, match="finite"):
        FC.negatives_clip_loss(x, y, negs, 10.0, false_negative_margin=float("inf"))


# ---------------------------------------------------------------------------------------------------
# Multiple-negatives ranking (sentence-transformers' MNRL): row groups, column ranges, ownership
# rules and the hardness penalty of the target

MNRL_DIRECTION_SETS = [("query_to_doc",), ("query_to_doc", "doc_to_query"), ("query_to_doc", "query_to_query"),
                       ("query_to_doc", "doc_to_doc"), R.MNRL_DIRECTIONS]


def _mnrl_configs():
    for dirs in MNRL_DIRECTION_SETS:
        for mode in ("joint", "per_direction"):
            if mode == "per_direction" and set(dirs) & {"query_to_query", "doc_to_doc"}:
                continue
            for hardness in (None, "in_batch_negatives", "hard_negatives", "all_negatives"):
                yield dirs, mode, hardness


@pytest.mark.parametrize("dirs,mode,hardness", list(_mnrl_configs()))
@pytest.mark.parametrize("similarity,chunk", [("cos", 4), ("dot", None)])
@pytest.mark.parametrize("backend", ["torch", "cpp"])  # (float64: the Triton path is in the fp32 test below)
def test_mnrl_against_reference(dirs, mode, hardness, similarity, chunk, backend):
    b, m, d = 11, 2, 8
    g = torch.Generator().manual_seed(len(dirs))
    q = torch.randn(b, d, generator=g, dtype=torch.float64)
    docs = [q + torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(1 + m)]
    kw = dict(scale=20.0 if similarity == "cos" else 0.7, similarity=similarity, directions=dirs,
              partition_mode=mode, hardness_mode=hardness, hardness_strength=4.0 if hardness else 0.0)
    leaves = [t.clone().requires_grad_() for t in [q] + docs]
    out = FC.multiple_negatives_ranking_loss(leaves[0], leaves[1:], backend=backend, chunk_size=chunk, **kw)
    truth = [t.clone().requires_grad_() for t in [q] + docs]
    expected = R.mnrl_loss_reference(truth[0], truth[1:], **kw)
    assert_close_rel(out, expected, rtol=1e-12, name="loss")
    for i, (gr, e) in enumerate(zip(torch.autograd.grad(out, leaves), torch.autograd.grad(expected, truth))):
        assert_close_rel(gr, e, rtol=1e-11, atol=1e-14, name=f"grad of column {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnrl_fp32_and_stacked_docs(backend):
    q, p = make_features(40, 40, 16)
    negs = _negatives(40, 3, 16, seed=4)
    docs = torch.cat([p[:, None], negs], dim=1)  # (B, 1+m, D)
    kw = dict(directions=R.MNRL_DIRECTIONS, hardness_mode="in_batch_negatives", hardness_strength=9.0)
    _check(lambda q_, d_: FC.multiple_negatives_ranking_loss(q_, d_, backend=backend, chunk_size=7, **kw),
           lambda q_, d_: R.mnrl_loss_reference(q_, list(d_.unbind(1)), **kw), [q, docs], rtol=2e-5)


def test_mnrl_bad_input():
    q, p = make_features(6, 6, 8)
    mnrl = FC.multiple_negatives_ranking_loss
    with pytest.raises(ValueError, match="query_to_doc"):
        mnrl(q, [p], directions=("doc_to_query",))
    with pytest.raises(ValueError, match="directions"):
        mnrl(q, [p], directions=("query_to_doc", "sideways"))
    with pytest.raises(ValueError, match="per_direction"):
        mnrl(q, [p], directions=("query_to_doc", "query_to_query"), partition_mode="per_direction")
    with pytest.raises(ValueError, match="hardness_mode"):
        mnrl(q, [p], hardness_mode="hardest")
    with pytest.raises(ValueError, match="hardness_strength"):
        mnrl(q, [p], hardness_mode="hard_negatives", hardness_strength=-1.0)
    with pytest.raises(ValueError, match="scale"):
        mnrl(q, [p], scale=0.0)
    with pytest.raises(ValueError, match="similarity"):
        mnrl(q, [p], similarity="l2")
    with pytest.raises(ValueError, match=r"docs\[1\]"):
        mnrl(q, [p, p[:5]])
    with pytest.raises(ValueError, match="at least the positives"):
        mnrl(q, [])


# ---------------------------------------------------------------------------------------------------
# NT-Xent with memory-bank negatives; the module's bank

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,chunk", [(1, 5, None), (9, 30, 4), (20, 3, None)])
def test_ntxent_bank_against_reference(backend, n, k, chunk):
    x, y = make_features(n, n, 12)
    bank = F.normalize(torch.randn(k, 12, generator=torch.Generator().manual_seed(k)), dim=1)
    _check(lambda a, b: FC.ntxent_loss(a, b, temperature=0.2, negatives=bank, backend=backend, chunk_size=chunk),
           lambda a, b: R.ntxent_bank_loss_reference(a, b, bank.double(), temperature=0.2), [x, y])


def test_ntxent_module_bank_is_a_fifo_of_normalised_views():
    torch.manual_seed(0)
    loss = fastcon.NTXentLoss(temperature=0.3, memory_bank_size=(10, 4), backend="torch")
    assert loss.memory_bank.bank.shape == (10, 4)
    assert torch.allclose(loss.memory_bank.bank.norm(dim=1), torch.ones(10))
    expected_bank = loss.memory_bank.bank.clone()
    ptr = 0
    for step, (n, train) in enumerate([(4, True), (4, False), (4, True), (4, True), (3, True)]):
        x, y = torch.randn(n, 4, requires_grad=train), torch.randn(n, 4)
        value = loss(x, y)
        expected = R.ntxent_bank_loss_reference(x.detach().double(), y.double(), expected_bank.double(),
                                                temperature=0.3)
        assert_close_rel(value, expected, rtol=2e-6, name=f"loss at step {step}")
        if train:
            z = F.normalize(y, dim=1)
            if ptr + n >= 10:
                expected_bank[ptr:] = z[:10 - ptr]
                ptr = 0
            else:
                expected_bank[ptr:ptr + n] = z
                ptr += n
        assert int(loss.memory_bank.bank_ptr) == ptr
        assert torch.equal(loss.memory_bank.bank, expected_bank)


def test_ntxent_module_and_bank_bad_input():
    with pytest.raises(ValueError, match="dim"):
        fastcon.NTXentLoss(memory_bank_size=16)
    with pytest.raises(ValueError, match="temperature"):
        fastcon.NTXentLoss(temperature=-0.5)
    with pytest.raises(TypeError, match="memory_bank_size"):
        fastcon.NTXentLoss(memory_bank_size="big")
    loss = fastcon.NTXentLoss(memory_bank_size=(8, 4))
    with pytest.raises(ValueError, match="dim 4"):
        loss(torch.randn(3, 5), torch.randn(3, 5))
    x, y = make_features(4, 4, 6)
    with pytest.raises(ValueError, match=r"negatives must be \(K, D=6\)"):
        FC.ntxent_loss(x, y, negatives=torch.randn(3, 5))
    assert fastcon.NTXentLoss()(x, y).shape == ()


# ---------------------------------------------------------------------------------------------------
# clip_loss with a dense pair mask (the one O(N²) input)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("labels", ["unique", "shared"])
def test_clip_pair_mask_against_reference(backend, labels):
    n = 23
    a, b = make_features(n, n, 16)
    ids = LABEL_SETS[labels](n)
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) > 0.3
    mask |= torch.eye(n, dtype=torch.bool)  # every row keeps its own pair
    _check(lambda x, y, t: FC.clip_loss(x, y, t, labels=ids, pair_mask=mask, backend=backend, chunk_size=6),
           lambda x, y, t: R.multi_positive_clip_loss_reference(x, y, t, labels=ids, pair_mask=mask),
           [a, b, torch.tensor(12.0)])


def test_clip_pair_mask_bad_input():
    a, b = make_features(5, 5, 8)
    with pytest.raises(ValueError, match=r"pair_mask must have shape \(5, 5\)"):
        FC.clip_loss(a, b, 10.0, pair_mask=torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or 0/1 integer"):
        FC.clip_loss(a, b, 10.0, pair_mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match="no positive"):
        FC.clip_loss(a, b, 10.0, pair_mask=~torch.eye(5, dtype=torch.bool), backend="torch")


def test_opcheck_general_target():
    a, b = make_features(8, 14, 8)
    args = (a.requires_grad_(), b.requires_grad_(), torch.tensor(9.0, requires_grad=True),
            torch.tensor(0.0, requires_grad=True))
    idx = torch.arange(8)
    # row groups of two rows; the hardness penalty on other items' columns; a margin
    target = Target(idx % 4, torch.arange(14) % 4, exclude_col=(idx + 3) % 14, margin=0.5, row_group=idx // 2,
                    row_owner=idx, col_owner=torch.arange(14) % 7, own_rule=(idx % 3 == 0).long(),
                    col_range=torch.stack([torch.zeros(8, dtype=torch.long), torch.full((8,), 12)], 1), penalty=3.0,
                    penalty_cols=torch.arange(14) < 10, penalty_mode=2,
                    mask=torch.rand(8, 14, generator=torch.Generator().manual_seed(0)) > 0.2, penalty_rows=idx < 6)
    torch.library.opcheck(torch.ops.fastcon.target_softmax_loss.default,
                          args + (*wire_args(target, 8, 14), "torch", 0.0, False, 3, 0, True, None))


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_dropped_columns_count_once_per_row_in_the_column_smoothing(backend):
    """A column mask alone (col_keep, no other rule) is a (1, w) mask in the torch spec's chunks: the
    column direction's kept-pair counts must still count every row (label smoothing reads them)."""
    n, extra, d = 12, 4, 8
    dtype, tol = (torch.float32, 2e-5) if backend.startswith("triton") else (torch.float64, 1e-11)
    x, y = make_features(n, n + extra, d, dtype=dtype)
    ids = torch.arange(n)
    col_ids = torch.cat([ids, torch.full((extra,), -1)])
    col_keep = torch.arange(n + extra) != n + 1
    target = Target(ids, col_ids, col_keep=col_keep)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_()]
    loss = target_engine_loss(*leaves, torch.tensor(9.0, dtype=dtype), None, target, label_smoothing=0.2,
                              symmetric=True, backend=backend, chunk_size=5)
    truth = [x.double().requires_grad_(), y.double().requires_grad_()]
    s = 9.0 * truth[0] @ truth[1].T
    s = s.masked_fill(~col_keep[None, :], float("-inf"))
    # rows: each over its kept columns; columns: each owning column over all rows
    row = -(0.8 * torch.log_softmax(s, 1)[ids, ids]
            + 0.2 * torch.where(col_keep[None, :], torch.log_softmax(s, 1), 0.0).sum(1) / col_keep.sum())
    col_ls = torch.log_softmax(s[:, :n], 0)
    col = -(0.8 * col_ls[ids, ids] + 0.2 * col_ls.mean(0))
    expected = (row.mean() + col.mean()) / 2
    assert_close_rel(loss, expected, rtol=tol, name="loss")
    for g, e in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, truth)):
        assert_close_rel(g, e, rtol=tol, atol=tol * 1e-2, name="grad")


@pytest.mark.parametrize("symmetric", [False, True])
def test_plain_sweep_matches_the_per_pair_path(symmetric):
    """A plain target (positives by id, every pair kept) takes the C++ backend's vectorised pass 2; the
    same target with an all-True column keep takes the per-pair path: the same loss and gradients."""
    a, b = make_features(70, 70, 24, seed=3)
    ids = torch.arange(70) % 23
    s, bias = torch.tensor(25.0, dtype=torch.float64), torch.tensor(-0.5, dtype=torch.float64)
    out = []
    for keep in (None, torch.ones(70, dtype=torch.bool)):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = target_engine_loss(x, y, s, bias, Target(ids, ids, col_keep=keep), label_smoothing=0.1,
                                  symmetric=symmetric, backend="cpp", chunk_size=16)
        out.append((loss, *torch.autograd.grad(loss, (x, y))))
    for p, q in zip(*out):
        assert_close_rel(p, q, rtol=1e-6, atol=1e-7)
