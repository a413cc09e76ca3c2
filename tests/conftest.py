"""Test-wide setup.

Without a GPU the Triton kernels run under the interpreter; TRITON_INTERPRET must be set before triton
decorates any kernel, so it is set here, before any test module imports lowrank_kernels.kernels.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
