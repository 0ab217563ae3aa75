"""fastcon.NTXentLoss against the installed lightly's NTXentLoss: the in-batch loss, the memory bank
(its initial state from one seed, its FIFO updates across steps and wrap-arounds, evaluation leaving it
unchanged) and gather_distributed on gloo ranks, losses and gradients of both views; fastcon.DCLLoss and
DCLWLoss against lightly's (plain, with a weight function that carries a gradient, the von Mises-Fisher
weights, gather_distributed on gloo ranks).

lightly's loss module imports torchvision, which does not import beside the torch 2.13.0 CPU build of
the main test environment: ``make test`` runs this file in a second environment (``.venv-peers``,
torch 2.14.1 with torchvision 0.29.1) with FASTCON_REQUIRE_PEERS=1, which makes a missing lightly an
error instead of a skip.
"""
import os

import pytest
import torch

import fastcon
from helpers import assert_close_rel, run_gloo

if os.environ.get("FASTCON_REQUIRE_PEERS") == "1":
    from lightly.loss import DCLLoss as LightlyDCL
    from lightly.loss import DCLWLoss as LightlyDCLW
    from lightly.loss import NTXentLoss as LightlyNTXent
else:
    _lightly = pytest.importorskip("lightly.loss")
    LightlyNTXent, LightlyDCL, LightlyDCLW = _lightly.NTXentLoss, _lightly.DCLLoss, _lightly.DCLWLoss

BACKENDS = ["torch", "auto"]


def _views(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    return x, x + 0.8 * torch.randn(n, d, generator=g, dtype=dtype)


def _loss_and_grads(loss, x, y, requires_grad=True):
    a, b = x.clone().requires_grad_(requires_grad), y.clone().requires_grad_(requires_grad)
    value = loss(a, b)
    if not requires_grad:
        return value, None
    return value, torch.autograd.grad(value, [a, b])


def _compare(ours, theirs, rtol, atol=0.0):
    assert_close_rel(ours[0], theirs[0], rtol=rtol, atol=atol, name="loss")
    if theirs[1] is not None:
        for name, g, e in zip(("out0", "out1"), ours[1], theirs[1]):
            assert_close_rel(g, e, rtol=rtol, atol=atol, name=f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d,temperature", [(1, 4, 0.5), (7, 16, 0.5), (64, 32, 0.1), (33, 8, 2.0)])
def test_in_batch_loss_equals_lightly(backend, n, d, temperature):
    x, y = _views(n, d, seed=n)
    theirs = _loss_and_grads(LightlyNTXent(temperature=temperature), x, y)
    ours = _loss_and_grads(fastcon.NTXentLoss(temperature=temperature, backend=backend, chunk_size=5), x, y)
    _compare(ours, theirs, rtol=1e-12, atol=1e-14)


def test_fp32_equals_lightly():
    x, y = _views(256, 64, seed=3, dtype=torch.float32)
    _compare(_loss_and_grads(fastcon.NTXentLoss(), x, y), _loss_and_grads(LightlyNTXent(), x, y), rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_bank_across_steps_equals_lightly(backend):
    size, d = (20, 6)
    torch.manual_seed(5)
    theirs_loss = LightlyNTXent(temperature=0.2, memory_bank_size=(size, d))
    torch.manual_seed(5)
    ours_loss = fastcon.NTXentLoss(temperature=0.2, memory_bank_size=(size, d), backend=backend)
    # one seed, one initial bank (random unit rows)
    assert torch.equal(ours_loss.memory_bank.bank, theirs_loss.memory_bank.bank)
    # batches of 6 into 20 slots: steps 3 and 6 reach the end (the batch's tail is dropped, the pointer
    # returns to 0); the evaluation step (no grad) reads the bank and leaves it
    for step, (n, train) in enumerate([(6, True)] * 3 + [(6, False)] + [(6, True)] * 3 + [(20, True), (3, True)]):
        x, y = _views(n, d, seed=100 + step, dtype=torch.float32)
        ours = _loss_and_grads(ours_loss, x, y, requires_grad=train)
        theirs = _loss_and_grads(theirs_loss, x, y, requires_grad=train)
        _compare(ours, theirs, rtol=2e-6, atol=1e-7)
        assert torch.equal(ours_loss.memory_bank.bank_ptr, theirs_loss.memory_bank.bank_ptr), step
        assert torch.equal(ours_loss.memory_bank.bank, theirs_loss.memory_bank.bank), step


def test_constructor_checks_as_lightly():
    for kwargs in (dict(temperature=0.0), dict(memory_bank_size=8), dict(memory_bank_size=(-1, 4))):
        with pytest.raises(ValueError):
            LightlyNTXent(**kwargs)
        with pytest.raises(ValueError):
            fastcon.NTXentLoss(**kwargs)
    assert fastcon.NTXentLoss(memory_bank_size=(0, 4)).memory_bank is None
    assert LightlyNTXent(memory_bank_size=(0, 4)).memory_bank.size == (0, 4)


# ---------------------------------------------------------------------------------------------------
# gather_distributed on gloo: every rank, ours against lightly in the same process

def _squared_gap(a, b):  # a weight function with a gradient of its own
    return ((a - b) ** 2).sum(dim=1)


_DCL_CASES = [  # (theirs, ours)
    (lambda **k: LightlyDCL(temperature=0.2, **k), lambda **k: fastcon.DCLLoss(temperature=0.2, **k)),
    (lambda **k: LightlyDCL(weight_fn=_squared_gap, **k), lambda **k: fastcon.DCLLoss(weight_fn=_squared_gap, **k)),
    (lambda **k: LightlyDCLW(temperature=0.5, sigma=0.3, **k),
     lambda **k: fastcon.DCLWLoss(temperature=0.5, sigma=0.3, **k)),
]


def _gather_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        errs = []
        pairs = [(LightlyNTXent(temperature=0.3, gather_distributed=True),
                  fastcon.NTXentLoss(temperature=0.3, gather_distributed=True))]
        pairs += [(theirs(gather_distributed=True), ours(gather_distributed=True)) for theirs, ours in _DCL_CASES]
        for n in (1, 5):
            x, y = _views(n, 8, seed=10 * n + rank)
            for their_loss, our_loss in pairs:
                theirs = _loss_and_grads(their_loss, x, y)
                ours = _loss_and_grads(our_loss, x, y)
                errs.append(abs(ours[0].item() - theirs[0].item()) / abs(theirs[0].item()))
                errs += [((g - e).abs().max() / e.abs().max()).item() for g, e in zip(ours[1], theirs[1])]
        out.put((rank, errs))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_gather_distributed_on_gloo(world):
    for rank, errs in run_gloo(_gather_worker, world).items():
        assert max(errs) < 1e-12, (rank, errs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_DCL_CASES)))
@pytest.mark.parametrize("n,d", [(2, 4), (9, 16), (40, 8)])
def test_dcl_equals_lightly(backend, case, n, d):
    theirs, ours = _DCL_CASES[case]
    x, y = _views(n, d, seed=n + 100 * case)
    _compare(_loss_and_grads(ours(backend=backend, chunk_size=7), x, y), _loss_and_grads(theirs(), x, y),
             rtol=1e-12, atol=1e-14)


def test_dcl_fp32_equals_lightly():
    x, y = _views(128, 32, seed=4, dtype=torch.float32)
    _compare(_loss_and_grads(fastcon.DCLWLoss(), x, y), _loss_and_grads(LightlyDCLW(), x, y), rtol=3e-5)
