"""Shared test set-up.

Without CUDA the Triton kernels run in Triton's interpreter: `TRITON_INTERPRET` must be set before
any kernel module is imported, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "golden")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
