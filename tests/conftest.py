"""Shared test setup.

Without CUDA, Triton kernels run through Triton's CPU interpreter; it must be selected
before any kernel is decorated (modules import triton lazily, so setting it here is early
enough).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def sr_root(tmp_path_factory):
    """A tiny SR image folder (``train/``: 6, ``test/``: 2 images of 16x16), one per test module."""
    from helpers import make_sr_data

    return make_sr_data(tmp_path_factory.mktemp("sr"), size=16)


@pytest.fixture
def f64():
    """Run a test with float64 as the default dtype (gradcheck needs it), then restore."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
