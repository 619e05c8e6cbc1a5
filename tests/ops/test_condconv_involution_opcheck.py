"""The CondConv and involution custom ops under ``torch.library.opcheck``: schema, fake
(meta) implementations against the real outputs (shapes, strides, dtypes), autograd
registration and AOT dispatch, forward and backward ops, for each memory layout."""

from __future__ import annotations

import pytest
import torch

from dynconv.ops.condconv import BACKENDS as COND_BACKENDS

HAS_TRITON = "triton" in COND_BACKENDS
# the interpreter runs every kernel in Python: the AOT-dispatch checks would take minutes
TRITON_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _cond_args(dtype, channels_last: bool, depthwise_k5: bool, bias: bool, impl: str):
    gen = torch.Generator().manual_seed(0)
    c, k, groups = (6, 5, 6) if depthwise_k5 else (4, 3, 2)
    x = _layout(torch.randn(3, c, 7, 6, generator=gen, dtype=dtype), channels_last).requires_grad_()
    weight = torch.randn(2, c, c // groups, k, k, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(2, c, generator=gen, dtype=dtype).requires_grad_() if bias else None
    routing = torch.rand(3, 2, generator=gen, dtype=dtype).requires_grad_()
    return (x, weight, b, routing, [1, 1], [k // 2, k // 2], [1, 1], groups, impl)


@pytest.mark.parametrize("impl", ["cpu", "experts"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depthwise_k5", [False, True], ids=["grouped-k3", "depthwise-k5"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cond_conv2d_pytorch_paths_forward(channels_last, depthwise_k5, bias, impl):
    args = _cond_args(torch.float64, channels_last, depthwise_k5, bias, impl)
    torch.library.opcheck(torch.ops.dynconv.cond_conv2d_fused.default, args)


@pytest.mark.parametrize("impl", ["cpu", "experts"])
@pytest.mark.parametrize(
    "needs", [(True, True), (True, False), (False, True), (False, False)], ids=["all", "input-only", "params-only", "none"]
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cond_conv2d_pytorch_paths_backward(channels_last, needs, impl):
    x, weight, b, routing, *geometry = _cond_args(torch.float64, channels_last, False, False, impl)
    grad = _layout(torch.randn(3, 4, 7, 6, dtype=torch.float64), channels_last)
    args = (grad, x.detach(), weight.detach(), b, routing.detach(), *geometry, *needs)
    torch.library.opcheck(torch.ops.dynconv.cond_conv2d_fused_backward.default, args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cond_conv2d_triton(channels_last):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in _cond_args(torch.float32, channels_last, False, True, "triton")]
    torch.library.opcheck(torch.ops.dynconv.cond_conv2d_fused.default, args, test_utils=TRITON_UTILS)


def _inv_args(dtype, channels_last: bool, impl: str):
    gen = torch.Generator().manual_seed(1)
    x = _layout(torch.randn(2, 4, 6, 5, generator=gen, dtype=dtype), channels_last).requires_grad_()
    kernel = torch.randn(2, 2, 9, 3, 3, generator=gen, dtype=dtype).requires_grad_()  # stride 2 output
    return (x, kernel, [3, 3], [2, 2], [1, 1], [1, 1], 2, impl)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_involution2d_cpu(channels_last):
    torch.library.opcheck(torch.ops.dynconv.involution2d_fused.default, _inv_args(torch.float64, channels_last, "cpu"))


@pytest.mark.parametrize(
    "needs", [(True, True), (True, False), (False, True), (False, False)], ids=["all", "input-only", "kernel-only", "none"]
)
def test_involution2d_cpu_backward(needs):
    x, kernel, *geometry = _inv_args(torch.float64, True, "cpu")
    grad = _layout(torch.randn(2, 4, 3, 3, dtype=torch.float64), True)
    args = (grad, x.detach(), kernel.detach(), *geometry, *needs)
    torch.library.opcheck(torch.ops.dynconv.involution2d_fused_backward.default, args)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_involution2d_triton():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in _inv_args(torch.float32, True, "triton")]
    torch.library.opcheck(torch.ops.dynconv.involution2d_fused.default, args, test_utils=TRITON_UTILS)
