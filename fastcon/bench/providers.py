"""The providers a benchmark case can run: fastcon's backends, the reference, and the peers.

A provider is a name; ``availability`` says cheaply (no heavy imports) whether it can run a loss on a
device, so that a sweep reports an unusable provider as a ``skipped`` row without spawning a process;
``make_loss_fn`` builds ``fn(a, b, logit_scale, logit_bias) -> loss`` in the worker process.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Callable, Optional, Tuple

from .peers import gist_guide, matryoshka_dims, pml_predicted_bytes, st_predicted_bytes

# clip_labels: CLIP over class ids (4 consecutive pairs per class); clip_debias: the debiased CLIP loss
# (τ⁺ = DEBIAS, docs/losses.md §2.5); ntxent: NT-Xent of the two views
# a, b (τ = 0.5, lightly's default); mnrl: sentence-transformers' MNRL with queries a and positives b
# (scale 20, cos_sim); distill: open_clip's DistillClipLoss, the sum of its two outputs, against a
# teacher made from the inputs (see distill_teacher); align_uniform: alignment, uniformity and the
# cross-modal uniformity of a, b; m2mix: m²-mix at λ = M2MIX_LAM, τ = 0.07; mochi: MoCHi with queries a,
# keys b and a queue of 4N rows made from b (see mochi_inputs). The last eight run on the engine's
# general target. filip and maxsim are token-level (fastcon/ops/late.py): each batch item is a set of
# TOKEN_SHAPES tokens (see make_token_inputs); filip: FILIP with patches a, tokens b (ragged captions),
# maxsim: ColBERT's in-batch MaxSim loss with queries a, documents b (ragged documents), scale 1.
# dcl: lightly's DCLWLoss of the two views (τ = 0.1, σ = 0.5); pml_ntxent and supcon:
# pytorch-metric-learning's NTXentLoss and SupConLoss on the 2N embeddings [a; b], NT-Xent's labels
# the pairs (SimCLR through PML), SupCon's the clip_labels classes (8 embeddings per class).
LOSSES = ("clip", "siglip", "clip_labels", "clip_debias", "ntxent", "mnrl", "matryoshka_mnrl", "gist", "distill",
          "align_uniform", "m2mix", "mochi", "filip", "maxsim", "dcl", "pml_ntxent", "supcon")
TOKEN_LOSSES = ("filip", "maxsim")
# (tokens per item of a, of b): ViT-B/16 patches and CLIP's caption length; ColBERT's query and document
TOKEN_SHAPES = {"filip": (196, 77), "maxsim": (32, 180)}
TARGET_LOSSES = ("clip_labels", "clip_debias", "ntxent", "mnrl", "matryoshka_mnrl", "gist", "distill", "align_uniform",
                 "m2mix", "mochi", "dcl", "pml_ntxent", "supcon")
FASTCON_BACKENDS = ("cpp", "torch", "triton", "triton_fused")
PROVIDERS = ("fastcon",) + tuple(f"fastcon-{b}" for b in FASTCON_BACKENDS) + (
    "fastcon_compile", "reference", "open_clip", "inf_cl", "siglip_kernel", "torch_compile", "lightly",
    "sentence_transformers", "sentence_transformers_cached", "pylate", "flash_maxsim", "late_interaction_kernels",
    "pytorch_metric_learning")
# MaxSim peers, each through PyLate's colbert_scores backend of that name
_PYLATE_BACKEND = {"pylate": "torch", "flash_maxsim": "flash", "late_interaction_kernels": "lik"}
# the peer each loss is compared with, beside the reference
PEER_OF = {"clip": ("open_clip", "inf_cl"), "siglip": ("open_clip", "siglip_kernel"), "clip_labels": (), "clip_debias": (),
           "ntxent": ("lightly",),
           "mnrl": ("sentence_transformers",),
           "matryoshka_mnrl": ("sentence_transformers", "sentence_transformers_cached"),
           "gist": ("sentence_transformers", "sentence_transformers_cached"), "distill": ("open_clip",), "align_uniform": (),
           "m2mix": (), "mochi": (), "filip": (), "maxsim": ("pylate", "flash_maxsim", "late_interaction_kernels"),
           "dcl": ("lightly",), "pml_ntxent": ("pytorch_metric_learning",), "supcon": ("pytorch_metric_learning",)}


def default_providers(loss: str) -> Tuple[str, ...]:
    """What ``fastcon-bench`` runs for ``loss`` without ``--providers``: fastcon (its ``auto``
    backend), the materialised reference and the loss's own peers (``PEER_OF``)."""
    return ("fastcon", "reference") + PEER_OF[loss]


# the single-device CUDA peers (each importable as its provider's name): why each is unusable on several
# ranks, when it is not installed, on a CPU (availability's checks, in this order)
_GPU_PEERS = {
    "inf_cl": ("inf_cl's ring loss has no open_clip mode to compare with",
               "inf_cl is not installed (pip install inf-cl)",
               "inf_cl's Triton kernels need a CUDA GPU"),
    "siglip_kernel": ("siglip_kernel's distributed loss has no open_clip mode to compare with",
                      "siglip-kernel is not installed (pip install --no-deps siglip-kernel)",
                      "siglip-kernel queries the GPU at import: a CUDA GPU only"),
}
NTXENT_TEMPERATURE = 0.5
MNRL_SCALE = 20.0
DEBIAS = 0.1  # clip_debias's class prior τ⁺ (docs/losses.md §2.5)

DCL_TEMPERATURE, DCL_SIGMA = 0.1, 0.5  # lightly's defaults
PML_NTXENT_TEMPERATURE, SUPCON_TEMPERATURE = 0.07, 0.1  # pytorch-metric-learning's defaults
DISTILL_TEACHER_SCALE = 30.0
M2MIX_LAM = 0.3



class ProviderUnavailable(RuntimeError):
    """The provider cannot run this case here (not installed, wrong device, loss not offered)."""


def fastcon_backend(provider: str) -> Optional[str]:
    """The ``backend=`` of a fastcon provider ("fastcon" -> "auto", "fastcon-cpp" -> "cpp"); None
    for the other providers."""
    if provider == "fastcon":
        return "auto"
    return provider.split("-", 1)[1] if provider.startswith("fastcon-") else None


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def availability(provider: str, loss: str, device: str, world_size: int = 1) -> Tuple[bool, Optional[str]]:
    """(usable, reason if not) for ``provider`` running ``loss`` on ``device`` ("cpu" or "cuda")."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")
    if world_size > 1 and loss in TARGET_LOSSES:
        return False, f"the distributed benchmark runs clip and siglip; {loss} is single-device here"
    if world_size > 1 and loss in TOKEN_LOSSES:
        return False, f"the distributed benchmark runs clip and siglip; {loss} is single-device here"
    peers = ("open_clip", "inf_cl", "siglip_kernel", "lightly", "sentence_transformers", "sentence_transformers_cached",
             "pytorch_metric_learning")
    if provider in peers + tuple(_PYLATE_BACKEND) and provider not in PEER_OF[loss]:
        return False, f"{provider} has no {loss} loss to compare with"
    if provider in _PYLATE_BACKEND:
        if not _find("pylate"):
            return False, "pylate is not installed (pip install --no-deps pylate)"
        module = {"flash_maxsim": "flash_maxsim", "late_interaction_kernels": "late_interaction_kernels"}.get(provider)
        if module is not None:
            if device != "cuda":
                return False, f"{provider}'s Triton kernels need a CUDA GPU"
            if not _find(module):
                return False, f"{provider} is not installed (pip install {provider.replace('_', '-')})"
    if provider == "torch_compile" and loss in TOKEN_LOSSES:
        return False, "the token-level cases compare with the reference and the peers only"
    backend = fastcon_backend(provider)
    if backend is not None:
        if backend == "cpp" and device != "cpu":
            return False, "the C++ backend runs on CPU tensors"
        if backend.startswith("triton"):
            if not _find("triton"):
                return False, "triton is not installed"
            if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                return False, "Triton on CPU tensors needs TRITON_INTERPRET=1"
    if provider == "open_clip" and not _find("open_clip"):
        return False, "open_clip is not installed (pip install --no-deps open-clip-torch)"
    if provider == "lightly" and not _find("lightly"):
        return False, "lightly is not installed (its loss module imports torchvision)"
    if provider.startswith("sentence_transformers") and not _find("sentence_transformers"):
        return False, "sentence-transformers is not installed"
    if provider == "pytorch_metric_learning" and not _find("pytorch_metric_learning"):
        return False, "pytorch-metric-learning is not installed (pip install --no-deps pytorch-metric-learning)"
    if provider in _GPU_PEERS:
        several_ranks, missing, cpu = _GPU_PEERS[provider]
        if world_size > 1:
            return False, several_ranks
        if not _find(provider):
            return False, missing
        if device != "cuda":
            return False, cpu
    if provider in ("torch_compile", "fastcon_compile"):
        if world_size > 1:
            return False, f"{provider} is a single-device provider"
        if device == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            return False, "torch.compile on CPU needs a C++ compiler"
    return True, None


def _load_open_clip_loss():
    """open_clip's ``loss`` module, loaded from the installed package without importing the package
    (whose ``__init__`` needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderUnavailable("open_clip is not installed (pip install --no-deps open-clip-torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        raise ProviderUnavailable(f"open_clip has no loss.py at {path}")
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def _inf_cl_head_dim(d: int) -> int:
    """inf_cl splits D into power-of-two heads of at most 256 that must divide D."""
    head = 256
    while head > 1 and d % head:
        head //= 2
    if head < 16:
        raise ProviderUnavailable(f"inf_cl needs D divisible by 16, got D={d}")
    return head


def class_ids(n: int, device):
    """The clip_labels case's classes: 4 consecutive pairs per class."""
    import torch

    return torch.arange(n, device=device) // 4


def pml_inputs(loss: str, a, b):
    """The pml cases' embeddings [a; b] and labels: the pairs (pml_ntxent), or class_ids of each view
    (supcon)."""
    import torch

    n = a.shape[0]
    ids = torch.arange(n, device=a.device) if loss == "pml_ntxent" else class_ids(n, a.device)
    return torch.cat([a, b]), torch.cat([ids, ids])


def distill_teacher(a, b):
    """The distill case's teacher: the inputs' features reversed along D and normalised, without
    gradient (another embedding of the same batch, correlated with the student's pairs)."""
    import torch

    return (torch.nn.functional.normalize(a.detach().flip(1), dim=1),
            torch.nn.functional.normalize(b.detach().flip(1), dim=1))


def mochi_inputs(a, b):
    """The mochi case's queue (4N rows: b with its features rotated by 1..4, normalised, no gradient),
    its (N, s, s′) (the paper's (1024, 1024, 128), capped by N) and one fixed set of draws."""
    import torch

    import fastcon.functional as FC

    queue = torch.nn.functional.normalize(torch.cat([b.detach().roll(r, dims=1) for r in (1, 2, 3, 4)]), dim=1)
    top_n = min(1024, b.shape[0])
    sizes = dict(top_n=top_n, n_mix=top_n, n_query_mix=max(1, top_n // 8))
    mixes = FC.draw_mixes(a.shape[0], sizes["top_n"], sizes["n_mix"], sizes["n_query_mix"],
                           torch.Generator().manual_seed(0), a.device)
    return queue, sizes, mixes


def _distill_fn(module):
    """``fn(a, b, s, bias)``: the sum of a DistillClipLoss module's two outputs against distill_teacher."""
    def fn(a, b, s, bias):
        contrastive, distill = module(a, b, s, *distill_teacher(a, b), DISTILL_TEACHER_SCALE)
        return contrastive + distill
    return fn


def _module_fn(module):
    """``fn(a, b, s, bias)`` of a loss module of the two views."""
    return lambda a, b, s, bias: module(a, b)


def _target_loss_fn(loss: str, provider: str) -> Callable:
    """``fn(a, b, logit_scale, logit_bias)`` of a general-target loss (the scale and bias are clip_labels'
    only: NT-Xent has its temperature, MNRL its scale)."""
    import fastcon
    from fastcon import reference as R

    FC = fastcon.functional
    backend = fastcon_backend(provider)
    if provider == "fastcon_compile":
        import torch

        inner = _target_loss_fn(loss, "fastcon")
        return torch.compile(inner, fullgraph=True)
    if backend is not None:
        if loss == "clip_labels":
            return lambda a, b, s, bias: FC.clip_loss(a, b, s, bias, labels=class_ids(a.shape[0], a.device),
                                                      backend=backend)
        if loss == "clip_debias":
            return lambda a, b, s, bias: FC.clip_loss(a, b, s, debias=DEBIAS, backend=backend)
        if loss == "matryoshka_mnrl":
            return lambda a, b, s, bias: FC.multiple_negatives_ranking_loss(
                a, [b], scale=MNRL_SCALE, matryoshka_dims=matryoshka_dims(a.shape[1]), backend=backend)
        if loss == "gist":
            return lambda a, b, s, bias: FC.gist_loss(a, b, *gist_guide(a, b), backend=backend)
        if loss == "ntxent":
            return lambda a, b, s, bias: FC.ntxent_loss(a, b, temperature=NTXENT_TEMPERATURE, backend=backend)
        if loss == "dcl":
            return _module_fn(fastcon.DCLWLoss(DCL_TEMPERATURE, DCL_SIGMA, backend=backend))
        if loss in ("pml_ntxent", "supcon"):
            from fastcon.integrations import pytorch_metric_learning as pml

            module = (pml.NTXentLoss(PML_NTXENT_TEMPERATURE, backend=backend) if loss == "pml_ntxent"
                      else pml.SupConLoss(SUPCON_TEMPERATURE, backend=backend))
            return lambda a, b, s, bias: module(*pml_inputs(loss, a, b))
        if loss == "distill":
            return _distill_fn(fastcon.DistillClipLoss(backend=backend))
        if loss == "align_uniform":
            return lambda a, b, s, bias: FC.align_uniform_loss(a, b, cross=True, backend=backend)
        if loss == "m2mix":
            return lambda a, b, s, bias: FC.m2mix_loss(a, b, lam=M2MIX_LAM, backend=backend)
        if loss == "mochi":
            def mochi(a, b, s, bias):
                queue, sizes, mixes = mochi_inputs(a, b)
                return FC.mochi_loss(a, b, queue, **sizes, mixes=mixes, backend=backend)
            return mochi
        return lambda a, b, s, bias: FC.multiple_negatives_ranking_loss(a, [b], scale=MNRL_SCALE, backend=backend)
    if provider in ("reference", "torch_compile"):
        if loss == "clip_labels":
            def ref(a, b, s, bias):
                return R.multi_positive_clip_loss_reference(a, b, s, bias, labels=class_ids(a.shape[0], a.device),
                                                            upcast=False)
        elif loss == "clip_debias":
            def ref(a, b, s, bias):
                return R.clip_loss_reference(a, b, s, debias=DEBIAS, upcast=False)
        elif loss == "matryoshka_mnrl":
            def ref(a, b, s, bias):
                return sum(R.mnrl_loss_reference(a[:, :d], [b[:, :d]], MNRL_SCALE) for d in matryoshka_dims(a.shape[1]))
        elif loss == "gist":
            def ref(a, b, s, bias):
                return R.gist_loss_reference(a, b, *gist_guide(a, b))
        elif loss == "ntxent":
            def ref(a, b, s, bias):
                return R.ntxent_loss_reference(a, b, temperature=NTXENT_TEMPERATURE)
        elif loss == "dcl":
            def ref(a, b, s, bias):
                import torch

                w = FC.negative_mises_fisher_weights(*(torch.nn.functional.normalize(t, dim=1) for t in (a, b)),
                                                     sigma=DCL_SIGMA)
                return R.dcl_loss_reference(a, b, DCL_TEMPERATURE, w, w)
        elif loss in ("pml_ntxent", "supcon"):
            def ref(a, b, s, bias):
                e, labels = pml_inputs(loss, a, b)
                pos, neg = R.label_pairs_reference(labels, labels, True)
                if loss == "pml_ntxent":
                    return R.pair_ntxent_loss_reference(e, pos, neg, PML_NTXENT_TEMPERATURE)
                return R.supcon_loss_reference(e, pos, neg, SUPCON_TEMPERATURE)
        elif loss == "distill":
            def ref(a, b, s, bias):
                return sum(R.distill_clip_loss_reference(a, b, s, *distill_teacher(a, b), DISTILL_TEACHER_SCALE))
        elif loss == "align_uniform":
            def ref(a, b, s, bias):
                return R.align_uniform_loss_reference(a, b, cross=True)
        elif loss == "m2mix":
            def ref(a, b, s, bias):
                return R.m2mix_loss_reference(a, b, M2MIX_LAM)
        elif loss == "mochi":
            def ref(a, b, s, bias):
                queue, sizes, mixes = mochi_inputs(a, b)
                return R.mochi_loss_reference(a, b.detach(), queue, mixes, top_n=sizes["top_n"])
        else:
            def ref(a, b, s, bias):
                return R.mnrl_loss_reference(a, [b], MNRL_SCALE)
        if provider == "torch_compile":
            import torch

            return torch.compile(ref)
        return ref
    if provider == "open_clip" and loss == "distill":
        return _distill_fn(_load_open_clip_loss().DistillClipLoss())
    if provider == "lightly":
        from lightly.loss import DCLWLoss, NTXentLoss

        if loss == "dcl":
            return _module_fn(DCLWLoss(temperature=DCL_TEMPERATURE, sigma=DCL_SIGMA))
        return _module_fn(NTXentLoss(temperature=NTXENT_TEMPERATURE))
    if provider == "pytorch_metric_learning":
        from pytorch_metric_learning import losses as pml_losses

        module = (pml_losses.NTXentLoss(PML_NTXENT_TEMPERATURE) if loss == "pml_ntxent"
                  else pml_losses.SupConLoss(SUPCON_TEMPERATURE))
        return lambda a, b, s, bias: module(*pml_inputs(loss, a, b))
    if provider.startswith("sentence_transformers") and loss in ("matryoshka_mnrl", "gist"):
        from .peers import st_embedding_loss

        try:
            return st_embedding_loss(loss, provider.endswith("_cached"), MNRL_SCALE)
        except ImportError as err:
            raise ProviderUnavailable(f"this sentence-transformers has no {loss} loss to compare with: {err}") from err
    if provider == "sentence_transformers":
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        module = MultipleNegativesRankingLoss(None, scale=MNRL_SCALE)
        return lambda a, b, s, bias: module.compute_loss_from_embeddings([a, b], None)
    raise ProviderUnavailable(f"{provider} has no {loss} loss")


def reference_fn(loss: str) -> Callable:
    """The float64 reference of a loss, ``fn(a, b, logit_scale, logit_bias)``, for the error check."""
    from fastcon import reference as R

    if loss in TARGET_LOSSES:
        return _target_loss_fn(loss, "reference")
    if loss in TOKEN_LOSSES:
        return _token_loss_fn(loss, "reference")
    ref = R.clip_loss_reference if loss == "clip" else R.siglip_loss_reference
    return lambda a, b, s, bias: ref(a, b, s, bias, upcast=False)


def token_mask(b: int, n: int, device):
    """The ragged side's mask of a token-level case: item i keeps n − (7·i mod ⌈n/2⌉) tokens."""
    import torch

    keep = n - (torch.arange(b, device=device) * 7) % ((n + 1) // 2)
    return torch.arange(n, device=device)[None, :] < keep[:, None]


def load_pylate_scores():
    """PyLate's ``colbert_scores``, its scoring module loaded without the package's ``__init__`` (which
    imports the datasets library)."""
    import sys
    import types

    spec = importlib.util.find_spec("pylate")
    if spec is None or not spec.submodule_search_locations:
        raise ProviderUnavailable("pylate is not installed (pip install --no-deps pylate)")
    root = list(spec.submodule_search_locations)[0]
    added = []
    try:
        for name in ("pylate", "pylate.utils", "pylate.scores"):
            if name not in sys.modules:
                stub = types.ModuleType(name)
                stub.__path__ = [os.path.join(root, *name.split(".")[1:])]
                sys.modules[name] = stub
                added.append(name)
        from pylate.scores.colbert import colbert_scores
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return colbert_scores


def _token_loss_fn(loss: str, provider: str) -> Callable:
    """``fn(a, b, logit_scale, logit_bias)`` of a token-level loss on (B, n, D) token sets."""
    import torch

    import fastcon
    from fastcon import reference as R

    FC = fastcon.functional
    backend = fastcon_backend(provider)
    if provider == "fastcon_compile":
        return torch.compile(_token_loss_fn(loss, "fastcon"), fullgraph=True)
    if loss == "filip":
        if backend is not None:
            return lambda a, b, s, bias: FC.filip_loss(a, b, s, token_mask=token_mask(*b.shape[:2], b.device),
                                                       backend=backend)
        if provider == "reference":
            return lambda a, b, s, bias: R.filip_loss_reference(a, b, s, token_mask=token_mask(*b.shape[:2], b.device))
        raise ProviderUnavailable(f"{provider} has no filip loss")
    if backend is not None:
        return lambda a, b, s, bias: FC.maxsim_loss(a, b, doc_mask=token_mask(*b.shape[:2], b.device), scale=s,
                                                    backend=backend)
    if provider == "reference":
        return lambda a, b, s, bias: R.maxsim_loss_reference(a, b, doc_mask=token_mask(*b.shape[:2], b.device),
                                                             scale=s)
    if provider in _PYLATE_BACKEND:
        colbert_scores = load_pylate_scores()
        which = _PYLATE_BACKEND[provider]

        def pylate_loss(a, b, s, bias):  # PyLate's Contrastive loss: CE over the in-batch scores
            scores = colbert_scores(a, b, documents_mask=token_mask(*b.shape[:2], b.device).to(a.dtype),
                                    backend=which)
            return torch.nn.functional.cross_entropy(s * scores, torch.arange(a.shape[0], device=a.device))
        return pylate_loss
    raise ProviderUnavailable(f"{provider} has no maxsim loss")


def make_loss_fn(loss: str, provider: str, d: int) -> Callable:
    """``fn(a, b, logit_scale, logit_bias)`` for one device; ``d`` is the feature dimension."""
    import fastcon
    from fastcon import reference as R

    if loss in TARGET_LOSSES:
        return _target_loss_fn(loss, provider)
    if loss in TOKEN_LOSSES:
        return _token_loss_fn(loss, provider)
    backend = fastcon_backend(provider)
    if backend is not None:
        fc = fastcon.functional.clip_loss if loss == "clip" else fastcon.functional.siglip_loss
        return lambda a, b, s, bias: fc(a, b, s, bias, backend=backend)
    if provider == "fastcon_compile":
        # fastcon's loss (backend="auto") compiled as one graph (fullgraph=True: a graph break is an
        # error, not a silent fallback); benchmarks/compile_step.py times a whole normalise + loss step.
        import torch

        fc = fastcon.functional.clip_loss if loss == "clip" else fastcon.functional.siglip_loss
        return torch.compile(lambda a, b, s, bias: fc(a, b, s, bias), fullgraph=True)
    ref = R.clip_loss_reference if loss == "clip" else R.siglip_loss_reference
    if provider == "reference":
        return lambda a, b, s, bias: ref(a, b, s, bias, upcast=False)
    if provider == "torch_compile":
        import torch

        compiled = torch.compile(lambda a, b, s, bias: ref(a, b, s, bias, upcast=False))
        return compiled
    if provider == "open_clip":
        module = _load_open_clip_loss()
        if loss == "clip":
            clip = module.ClipLoss()
            return lambda a, b, s, bias: clip(a, b, s, bias) if bias is not None else clip(a, b, s)
        siglip = module.SigLipLoss()
        return lambda a, b, s, bias: siglip(a, b, s, bias)
    if provider == "inf_cl":
        if loss != "clip":
            raise ProviderUnavailable("inf_cl has no sigmoid loss")
        from inf_cl import cal_inf_loss

        head = _inf_cl_head_dim(d)

        def inf_cl_clip(a, b, s, bias):
            if bias is not None:
                raise ProviderUnavailable("inf_cl has no logit bias")
            # One direction per call; the symmetric loss is the mean of both (as Inf-CLIP's own loss).
            return (cal_inf_loss(a, b, scale=s, head_dim=head) + cal_inf_loss(b, a, scale=s, head_dim=head)) / 2
        return inf_cl_clip
    if provider == "siglip_kernel":
        if loss != "siglip":
            raise ProviderUnavailable("siglip_kernel has no softmax loss")
        import torch
        from siglip_kernel import fused_siglip_loss

        # its scale is exp(log_temperature); its loss −Σ log σ(z·S) / N is open_clip's SigLipLoss
        return lambda a, b, s, bias: fused_siglip_loss(a, b, torch.log(s), bias)
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


# Providers that materialise the N×N logits, with the full-precision N×N buffers one forward+backward
# of theirs holds at its peak (logits, their softmax or sigmoid, the gradient), for the size check.
MATERIALISING = {"reference": 3, "open_clip": 3, "torch_compile": 2}


def predicted_bytes(provider: str, loss: str, n: int, d: int) -> Optional[int]:
    """A lower bound of a case's peak memory where it is O(N²) (None where it is not): the
    materialising providers hold ``MATERIALISING[provider]`` fp32 N×N buffers."""
    if provider.startswith("sentence_transformers") and loss in ("matryoshka_mnrl", "gist"):
        return st_predicted_bytes(loss, provider.endswith("_cached"), n, d)
    if provider == "pytorch_metric_learning":
        return pml_predicted_bytes(loss, n)
    if loss in TOKEN_LOSSES or provider not in MATERIALISING:
        return None
    return MATERIALISING[provider] * 4 * n * n


def make_dist_loss_fn(loss: str, provider: str, rank: int, world: int, local_loss: bool) -> Callable:
    """Per-rank loss for ``--world-size`` cases: fastcon's distributed modules; ``reference``:
    open_clip's formulas on features all-gathered with gradient (materialised local×global logits,
    global×global without ``local_loss``); ``open_clip``: its own modules (gather_with_grad on)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import fastcon
    from fastcon import reference as R
    from fastcon.distributed import all_gather_with_grad

    backend = fastcon_backend(provider)
    if backend is not None:
        if loss == "clip":
            return fastcon.ClipLoss(local_loss, True, rank=rank, world_size=world, backend=backend)
        return fastcon.SigLipLoss(rank=rank, world_size=world, backend=backend)
    if provider == "open_clip":
        module = _load_open_clip_loss()
        if loss == "clip":
            return module.ClipLoss(local_loss, True, rank=rank, world_size=world)
        return module.SigLipLoss(rank=rank, world_size=world)
    if provider != "reference":
        raise ProviderUnavailable(f"{provider} has no distributed form here")
    group = dist.group.WORLD

    def row_ce(x, all_y, s, bias, offset):
        logits = s * (x @ all_y.T) + (0 if bias is None else bias)
        return F.cross_entropy(logits, torch.arange(x.shape[0], device=x.device) + offset)

    def reference_loss(a, b, s, bias=None):
        n = a.shape[0]
        all_a, all_b = all_gather_with_grad(a, group), all_gather_with_grad(b, group)
        if loss == "siglip":
            return R.siglip_loss_reference(a, all_b, s, bias, pos_offset=rank * n, upcast=False)
        if local_loss:
            return (row_ce(a, all_b, s, bias, rank * n) + row_ce(b, all_a, s, bias, rank * n)) / 2
        return R.clip_loss_reference(all_a, all_b, s, bias, upcast=False)
    return reference_loss
