"""Setup for the op tests (``TRITON_INTERPRET`` is set in ``tests/conftest.py``)."""

import pytest

from dynconv.ops import custom_op


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """NaN-fill every backend's outputs before it writes them, so that an element a backend
    fails to write fails the comparison with the reference."""
    monkeypatch.setattr(custom_op, "POISON_OUTPUTS", True)
