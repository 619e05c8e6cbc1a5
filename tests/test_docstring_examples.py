"""The ``Example::`` sections of the public layers' and ops' docstrings run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

MODULES = [
    "dynconv.nn.switched_conv",
    "dynconv.nn.switch_norm",
    "dynconv.nn.cond_conv",
    "dynconv.nn.involution",
    "dynconv.nn.create",
    "dynconv.ops.switched.functional",
    "dynconv.ops.condconv.functional",
    "dynconv.ops.involution.functional",
]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
