"""Shared test set-up.

Without CUDA the Triton kernels run in Triton's interpreter: `TRITON_INTERPRET` must be set before
any kernel module is imported, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _interpreter_problem():
    """Why Triton's CPU interpreter cannot run here, or None.

    Triton < 3.9's interpreter breaks loops with a runtime bound when numpy >= 2.4 (the kernels'
    loops over kept blocks are such loops); Triton 3.9 handles them.
    """
    try:
        import numpy
        import triton
    except ImportError as e:
        return f"Triton interpreter unavailable ({e})"
    ver = lambda s: tuple(int(x) for x in s.split("+")[0].split(".")[:2])  # noqa: E731
    if ver(triton.__version__) < (3, 9) and ver(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run runtime-bound loops with numpy "
                f"{numpy.__version__}; install triton>=3.9 or numpy<2.4")
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():   # CUDA machine: the kernels compile for the GPU, not the interpreter
        if os.environ.get("TRITON_INTERPRET") != "1":
            skip = pytest.mark.skip(reason="interpreter tests run where TRITON_INTERPRET=1 (CPU machines)")
            for item in items:
                if "interpreter" in item.keywords:
                    item.add_marker(skip)
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    problem = _interpreter_problem()
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif problem and "interpreter" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
