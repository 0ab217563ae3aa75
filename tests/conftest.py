import os

# The Triton interpreter must be chosen before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _has_cuda() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run without TRITON_INTERPRET=1 on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
