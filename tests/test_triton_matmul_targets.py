"""The general target on the Triton backend's matmul producer (``FASTCON_TRITON_PRODUCER=matmul``:
the epilogue kernels form their tiles with tl.dot, ``fastcon/kernels/triton/target.py``), under a
small chunk budget so that pass 1 runs in several row chunks and pass 2 in row × column blocks; against
the float64 references, the loss and the gradient of every input. With soft targets the teacher's
tiles come from its cuBLAS chunks beside the student's formed ones (their case checks which kernel
took which producer; tests/test_soft_targets_triton.py has the rest). Under the Triton interpreter
(fp32)."""
import pytest
import torch

import fastcon.functional as FC
from fastcon import reference as R
from helpers import make_features
from test_targets import LABEL_SETS, _check, _negatives

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True, params=["3000", "200000"], ids=["blocks", "whole"])
def _matmul_producer(request, monkeypatch):
    monkeypatch.setenv("FASTCON_TRITON_PRODUCER", "matmul")
    monkeypatch.setenv("FASTCON_CHUNK_BYTES", request.param)


def test_the_plan_splits_both_passes_at_the_small_budget():
    from fastcon.kernels.triton import plan as tplan

    plan = tplan.matmul_plan(70, 70, torch.float32, 70, 3000, col_bytes=24)
    assert plan.stats_rows < 70 and plan.grad_rows < 70 and plan.grad_cols < 70


@pytest.mark.parametrize("labels", ["shared", "one_class"])
@pytest.mark.parametrize("n,d,eps,chunk", [(70, 16, 0.1, None), (45, 24, 0.0, 11)])
def test_multi_positive_clip(labels, n, d, eps, chunk):
    x, y = make_features(n, n, d)
    ids = LABEL_SETS[labels](n)
    _check(lambda a, b, t, c: FC.clip_loss(a, b, t, c, labels=ids, label_smoothing=eps, backend="triton",
                                           chunk_size=chunk),
           lambda a, b, t, c: R.multi_positive_clip_loss_reference(a, b, t, c, labels=ids, label_smoothing=eps),
           [x, y, torch.tensor(14.3), torch.tensor(-1.0)])


@pytest.mark.parametrize("case", [dict(mask=True, margin=0.0), dict(margin=0.05, labels=True, eps=0.1),
                                  dict(mask=True)], ids=["margin0-duplicate", "margin-labels-eps", "mask"])
def test_global_negatives(case):
    """With margin 0 a negative equal to the row's positive ties with its bound: the bound must be
    the very logit the kernels compare (``target.pair_dots_kernel``)."""
    b, k, d = 33, 5, 24
    x, y = make_features(b, b, d)
    negs = _negatives(b, k, d, seed=b + k)
    if case.get("margin") is not None:
        negs[0, 0] = y[0]
    mask = (torch.arange(b * k).reshape(b, k) % 3 != 1) if case.get("mask") else None
    ids = (torch.arange(b) % 5) if case.get("labels") else None
    kw = dict(negative_mask=mask, false_negative_margin=case.get("margin"), labels=ids,
              label_smoothing=case.get("eps", 0.0))
    _check(lambda x_, y_, n_, t, c: FC.negatives_clip_loss(x_, y_, n_, t, c, backend="triton", **kw),
           lambda x_, y_, n_, t, c: R.negatives_clip_loss_reference(x_, y_, n_, t, c, **kw),
           [x, y, negs, torch.tensor(20.0), torch.tensor(0.5)])


@pytest.mark.parametrize("n,d,t", [(45, 32, 0.5), (64, 16, 0.07)])
def test_ntxent(n, d, t):
    x, y = make_features(n, n, d)
    _check(lambda p, q: FC.ntxent_loss(p, q, temperature=t, backend="triton"),
           lambda p, q: R.ntxent_loss_reference(p, q, temperature=t), [x, y])


def _record_launches(monkeypatch, *modules):
    """Spy on the kernels the modules launch: [(name, MATMUL)], and per kernel the first row of each
    launch that forms its tiles (the row chunks of its pass: where its row-side arrays start)."""
    launched, starts = [], {}

    def spy_on(real):
        def spy(kernel):
            grid_of = real(kernel)
            name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__

            class _Grid:
                def __getitem__(self, grid):
                    run = grid_of[grid]

                    def call(*a, **k):
                        launched.append((name, k.get("MATMUL")))
                        if k.get("MATMUL") or name.startswith("_fused_target"):
                            rows = dict(zip(kernel.arg_names, a), **k)["row_info_ptr"]
                            starts.setdefault(name, set()).add(rows.storage_offset() // rows.stride(0))
                        return run(*a, **k)
                    return call
            return _Grid()
        return spy

    for mod in modules:
        monkeypatch.setattr(mod, "launch", spy_on(mod.launch))
    return launched, starts


@pytest.mark.parametrize("kind", ["clip", "cwcl"])
def test_soft_targets_form_the_students_tiles(kind, monkeypatch):
    """Distillation: both passes' epilogue kernels form the student's tiles (MATMUL), the teacher's
    come from its cuBLAS chunks, both passes in the same row chunks, and the teacher's own pass runs
    on that producer: no torch.mm takes rows of the student's features (CWCL's teacher is a transform
    of its text features)."""
    from fastcon.kernels.triton import plan, target

    launched, starts = _record_launches(monkeypatch, target)
    mm = []
    for mod in (plan, target):  # the student's chunks (plan.TargetTiles), the teacher's (target)
        monkeypatch.setattr(mod, "mm_acc", lambda p, q: mm.append(tuple(p[0].tolist())) or torch.mm(p, q))
    x, y = make_features(37, 37, 16)
    tx, ty = make_features(37, 37, 16, seed=4)
    _check(lambda a, b, c: FC.distill_loss(a, b, c, tx, ty, 20.0, kind=kind, backend="triton"),
           lambda a, b, c: R.distill_loss_reference(a, b, c, tx.double(), ty.double(), 20.0, kind=kind),
           [x, y, torch.tensor(14.3)], rtol=2e-5)
    assert {("target_stats_kernel", True), ("_target_grad_kernel", True), ("target_stats_kernel", False)} \
        <= set(launched)
    assert ("_target_grad_kernel", False) not in launched
    # both passes chunk the rows alike (the teacher's chunk within the budget in each)
    assert starts["target_stats_kernel"] == starts["_target_grad_kernel"]
    rows = lambda *m: {tuple(r.tolist()) for t in m for r in t}  # noqa: E731
    assert mm and not set(mm) & rows(x, y)


def test_soft_targets_on_the_fused_kernels_chunk_both_passes_alike(monkeypatch):
    """backend="triton_fused" with a teacher: pass 2's rows and columns kernels take pass 1's row chunks
    (the teacher's chunk and pass 1's partials within the budget)."""
    from fastcon.kernels.triton import fused_target, target

    _, starts = _record_launches(monkeypatch, target, fused_target)
    x, y = make_features(37, 37, 16)
    tx, ty = make_features(37, 37, 16, seed=4)
    _check(lambda a, b, c: FC.distill_loss(a, b, c, tx, ty, 20.0, kind="clip", backend="triton_fused"),
           lambda a, b, c: R.distill_loss_reference(a, b, c, tx.double(), ty.double(), 20.0, kind="clip"),
           [x, y, torch.tensor(14.3)], rtol=2e-5)
    assert starts["target_stats_kernel"] == starts["_fused_target_rows_kernel"] == starts["_fused_target_cols_kernel"]
