"""The pair losses of docs/losses.md §1.7-1.8 on the engine:

* ``FC.dcl_loss`` (lightly's DCL/DCLW; tests/test_lightly.py checks it against lightly itself, on gloo
  ranks too) against the float64 reference on every backend, with weights that carry a gradient, and
  its errors;
* ``FC.pair_ntxent_loss`` and ``FC.supcon_loss`` (pytorch-metric-learning's NT-Xent and SupCon) against
  the float64 reference on every backend and against the installed pytorch-metric-learning through the
  drop-in classes: labels (with repeated, single and all-equal classes), ``ref_emb`` with and without
  ``ref_labels``, mined pairs (pair and triplet tuples), PML's zero-loss rules, fp32, the errors;
* the C++ backend's peak memory at N = 4096 (no N×N allocation).
"""
import functools
import os
import subprocess
import sys

import pytest
import torch

import fastcon
import fastcon.functional as FC
from fastcon.integrations import pytorch_metric_learning as ours
from helpers import assert_close_rel

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.interpreter)]


def _grads(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    return [loss] + list(torch.autograd.grad(loss, leaves))


def _compare(got, want, rtol, atol=0.0):
    for k, (g, w) in enumerate(zip(got, want)):
        assert_close_rel(g, w, rtol=rtol, atol=atol, name=f"output {k}")


def _tolerance(backend):
    return (torch.float32, 2e-5, 1e-7) if backend == "triton" else (torch.float64, 1e-11, 1e-14)


# ------------------------------------------------------------------------------------------ DCL
def _gap(a, b):
    return ((a - b) ** 2).sum(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_fn", [None, _gap, functools.partial(FC.negative_mises_fisher_weights, sigma=0.4)],
                         ids=["plain", "weights-with-grad", "vmf"])
@pytest.mark.parametrize("n,d", [(2, 3), (13, 8)])
def test_dcl_against_the_reference(backend, weight_fn, n, d):
    dtype, rtol, atol = _tolerance(backend)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = x + 0.7 * torch.randn(n, d, generator=g, dtype=dtype)
    got = _grads(lambda a, b: FC.dcl_loss(a, b, temperature=0.3, weight_fn=weight_fn, backend=backend, chunk_size=5),
                 x, y)
    want = _grads(lambda a, b: FC.dcl_loss(a, b, temperature=0.3, weight_fn=weight_fn, backend="reference"),
                  x.double(), y.double())
    _compare(got, want, rtol, atol)


def test_dcl_modules_and_errors():
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    assert_close_rel(fastcon.DCLWLoss(sigma=0.3)(x, y),
                     FC.dcl_loss(x, y, weight_fn=functools.partial(FC.negative_mises_fisher_weights, sigma=0.3)),
                     rtol=1e-6)
    with pytest.raises(ValueError, match="at least two pairs"):
        FC.dcl_loss(x[:1], y[:1])
    with pytest.raises(ValueError, match="one shape"):
        FC.dcl_loss(x, y[:5])
    with pytest.raises(ValueError, match="one weight per pair"):
        FC.dcl_loss(x, y, weight_fn=lambda a, b: a.sum())
    with pytest.raises(TypeError, match="callable"):
        fastcon.DCLLoss(weight_fn=3)
    with pytest.raises(ValueError, match="positive"):
        fastcon.DCLLoss(temperature=0.0)
    with pytest.raises(ValueError, match="sigma"):
        fastcon.DCLWLoss(sigma=-1.0)


# ------------------------------------------------------------------------ PML NT-Xent and SupCon
LOSSES = {"ntxent": (FC.pair_ntxent_loss, 0.07), "supcon": (FC.supcon_loss, 0.1)}


def _batch(n, classes, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("n,classes", [(24, 4), (11, 9), (7, 1)])
def test_label_pairs_against_the_reference(backend, loss, n, classes):
    fn, tau = LOSSES[loss]
    dtype, rtol, atol = _tolerance(backend)
    x, labels = _batch(n, classes, seed=n)
    labels[0] = 99  # a class of one: an anchor without positives
    got = _grads(lambda e: fn(e, labels, temperature=tau, backend=backend, chunk_size=4), x.to(dtype))
    want = _grads(lambda e: fn(e, labels, temperature=tau, backend="reference"), x)
    _compare(got, want, rtol, atol)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("loss", LOSSES)
def test_ref_emb_and_listed_pairs_against_the_reference(backend, loss):
    fn, tau = LOSSES[loss]
    x, labels = _batch(15, 3, seed=1)
    ref, ref_labels = _batch(9, 3, seed=2)
    got = _grads(lambda e, r: fn(e, labels, ref_emb=r, ref_labels=ref_labels, temperature=tau, backend=backend), x, ref)
    want = _grads(lambda e, r: fn(e, labels, ref_emb=r, ref_labels=ref_labels, temperature=tau, backend="reference"),
                  x, ref)
    _compare(got, want, 1e-11, 1e-14)
    a = torch.tensor([0, 0, 3, 5, 5, 7])
    pairs = (a, torch.tensor([1, 2, 4, 6, 1, 8]), torch.tensor([0, 3, 3, 5, 7, 9]), torch.tensor([5, 0, 2, 9, 3, 14]))
    got = _grads(lambda e: fn(e, indices_tuple=pairs, temperature=tau, backend=backend), x)
    want = _grads(lambda e: fn(e, indices_tuple=pairs, temperature=tau, backend="reference"), x)
    _compare(got, want, 1e-11, 1e-14)


PML_CLASSES = {"ntxent": (ours.NTXentLoss, "NTXentLoss"), "supcon": (ours.SupConLoss, "SupConLoss")}


def _pml():
    return pytest.importorskip("pytorch_metric_learning")


@pytest.mark.parametrize("loss", PML_CLASSES)
@pytest.mark.parametrize("case", ["labels", "singletons", "one-class", "ref_emb", "ref_emb-no-ref_labels",
                                  "ref_labels-no-ref_emb", "pairs", "triplets", "one-pair-each", "repeated-pair",
                                  "fp32"])
def test_equals_pytorch_metric_learning(loss, case):
    _pml()
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.miners import MultiSimilarityMiner, TripletMarginMiner

    our_cls, name = PML_CLASSES[loss]
    dtype = torch.float32 if case == "fp32" else torch.float64
    x, labels = _batch(32, 5, d=16, seed=3, dtype=dtype)
    ref, ref_labels = _batch(32, 5, d=16, seed=4, dtype=dtype)
    kwargs = {"labels": labels}
    if case == "singletons":
        kwargs["labels"] = torch.arange(32)
        kwargs["labels"][5] = 0  # one positive pair among singletons
    elif case == "one-class":
        kwargs["labels"] = torch.zeros(32, dtype=torch.int64)  # no negative pair: PML's zero loss
    elif case == "ref_emb":
        kwargs.update(ref_emb=ref, ref_labels=ref_labels)
    elif case == "ref_emb-no-ref_labels":
        kwargs.update(ref_emb=ref)  # PML then pairs with labels and leaves the diagonal out
    elif case == "pairs":
        kwargs["indices_tuple"] = MultiSimilarityMiner(0.1)(x, labels)
    elif case == "triplets":
        kwargs["indices_tuple"] = TripletMarginMiner(margin=0.3)(x, labels)
    elif case == "ref_labels-no-ref_emb":
        kwargs["ref_labels"] = ref_labels  # PML pairs the embeddings by labels and ignores these
    elif case == "one-pair-each":
        kwargs = {"indices_tuple": (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))}
    elif case == "repeated-pair":  # PML's one-pair rule counts the pairs as listed, repeats included
        kwargs = {"indices_tuple": (torch.tensor([0, 0]), torch.tensor([1, 1]), torch.tensor([0]), torch.tensor([2]))}
    theirs = getattr(pml_losses, name)()
    mine = our_cls()

    def run(fn, with_ref):
        tensors = [x, ref] if with_ref else [x]

        def call(e, r=None):
            kw = dict(kwargs, ref_emb=r) if with_ref else kwargs
            return fn(e, **kw)
        return _grads(call, *tensors)

    with_ref = "ref_emb" in kwargs
    got, want = run(mine, with_ref), run(theirs, with_ref)
    if case == "one-class" or case == "one-pair-each":
        assert float(want[0].detach()) == 0.0
    if case == "repeated-pair":
        assert float(want[0].detach()) > 0.0
    _compare(got, want, 2e-5 if dtype == torch.float32 else 1e-10, 1e-12)


def test_pml_errors():
    x, labels = _batch(8, 2)
    with pytest.raises(ValueError, match="cannot both be None"):
        ours.NTXentLoss()(x)
    with pytest.raises(ValueError, match="one label per row"):
        ours.SupConLoss()(x, labels[:5])
    with pytest.raises(TypeError, match="integer class labels"):
        ours.SupConLoss()(x, labels.double())
    with pytest.raises(ValueError, match="outside"):
        ours.NTXentLoss()(x, indices_tuple=(torch.tensor([0]), torch.tensor([8]), torch.tensor([0]), torch.tensor([1])))
    with pytest.raises(ValueError, match="both a positive and a negative"):
        ours.SupConLoss()(x, indices_tuple=(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0]),
                                            torch.tensor([1])))
    with pytest.raises(ValueError, match="ref_labels"):
        ours.SupConLoss()(x, labels, ref_emb=x[:3])
    with pytest.raises(ValueError, match="embedding_regularizer"):
        ours.NTXentLoss(embedding_regularizer=object())
    with pytest.raises(ValueError, match="reducer"):
        ours.NTXentLoss(reducer=object())
    with pytest.raises(ValueError, match="temperature"):
        ours.SupConLoss(temperature=-1.0)


_PEAK = r"""
import torch
torch.set_num_threads(2)
import fastcon, fastcon.functional as FC
from fastcon.bench.measure import rss_bytes

n, d = 4096, 128
g = torch.Generator().manual_seed(0)
x = torch.randn(64, d, generator=g, requires_grad=True)  # load the extension first
for f in (FC.pair_ntxent_loss, FC.supcon_loss):
    f(x, torch.arange(64) % 8, backend="cpp").backward()
FC.dcl_loss(x, x.detach() + 1, backend="cpp").backward()
e = torch.randn(n, d, generator=g).requires_grad_()
v = torch.randn(n, d, generator=g).requires_grad_()
labels = torch.randint(0, 1024, (n,), generator=g)
peaks = []
for run in (lambda: FC.pair_ntxent_loss(e, labels, backend="cpp"), lambda: FC.supcon_loss(e, labels, backend="cpp"),
            lambda: FC.dcl_loss(e, v, backend="cpp")):
    resident = rss_bytes("VmRSS")
    run().backward()
    peaks.append(rss_bytes("VmHWM") - resident)
print(" ".join(map(str, peaks)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS/VmHWM from /proc/self/status")
def test_cpp_peak_memory_holds_chunks_not_the_matrix():
    """PML's NT-Xent and SupCon over 1,024 classes and DCL at N = 4096, D = 128 on the C++ backend with
    8 MiB chunks and no cache of pass-1 logits (FASTCON_CACHE_BYTES=0; by default the CPU keeps up
    to 96 MiB of them to save a GEMM): each allocates nothing of N×N (64 MiB at fp32; DCL's rows see
    2N columns). Bound:
    the chunk, the normalised features, their gradients and the stacked rows and columns (at most
    8·N·D·4 for DCL), 16 MiB for BLAS, OpenMP and the allocator."""
    chunk, n, d = 8 << 20, 4096, 128
    env = dict(os.environ, FASTCON_CHUNK_BYTES=str(chunk), FASTCON_CACHE_BYTES="0",  # (no pass-1 logits kept)
               MALLOC_MMAP_THRESHOLD_=str(128 << 10))
    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True, env=env)
    bound = chunk + 8 * n * d * 4 + (16 << 20)
    for name, peak in zip(("pair_ntxent_loss", "supcon_loss", "dcl_loss"), map(int, out.stdout.split())):
        assert peak <= bound, f"{name}: peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
