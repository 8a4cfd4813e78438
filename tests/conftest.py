"""Test configuration: Triton kernels run under the interpreter when there is no CUDA device."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (rrhf_fast.kernels imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()


def _torch_threads(n: int | None):
    """Run with `n` torch threads (None: leave them), then restore the count."""
    threads = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def module_torch_threads(request):
    """A module that sets TORCH_THREADS runs all its tests and fixtures with that many threads.

    Tiny models on a shared 2-core machine: more threads only spin (a tiny matmul: 8 ms against
    0.04 ms), and results depend on the thread count, so figures measured with one thread hold."""
    yield from _torch_threads(getattr(request.module, "TORCH_THREADS", None))


@pytest.fixture
def one_thread():
    """One torch thread for this test only."""
    yield from _torch_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)
