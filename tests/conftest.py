"""Shared test setup.

Without CUDA, Triton kernels run through Triton's CPU interpreter; it must be selected
before any kernel is decorated (modules import triton lazily, so setting it here is early
enough).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
