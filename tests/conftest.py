"""Test configuration: Triton kernels run under the interpreter when there is no CUDA device."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (rrhf_fast.kernels imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)
