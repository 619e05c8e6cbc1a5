"""The switched-conv custom ops under ``torch.library.opcheck``, ``torch.compile`` and ``torch.export``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from dynconv.ops import switched_conv2d

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _op_args(dtype=torch.float32, breadth=4, device="cpu"):
    x = torch.randn(2, 3, 6, 5, dtype=dtype, device=device, requires_grad=True)
    weight = torch.randn(breadth, 4, 3, 3, 3, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(4, dtype=dtype, device=device, requires_grad=True)
    index = torch.randint(0, breadth, (2, 3, 3), device=device)
    gate = torch.rand(2, 3, 3, dtype=dtype, device=device, requires_grad=True)
    return (x, weight, bias, index, gate, [2, 2], [1, 1], [1, 1], False)


def test_opcheck_gather():
    """Schema, fake (meta) implementation, autograd registration, dynamic-shape AOT dispatch."""
    torch.library.opcheck(torch.ops.dynconv.switched_conv2d_gather.default, _op_args(torch.float64))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_opcheck_triton():
    torch.library.opcheck(
        torch.ops.dynconv.switched_conv2d_triton.default,
        _op_args(torch.float32, device=DEVICE),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


class _TinySwitchedNet(nn.Module):
    """Router conv -> argmax expert + its probability as gate -> switched conv, twice."""

    def __init__(self, channels: int = 4, breadth: int = 4, backend: str = "gather") -> None:
        super().__init__()
        self.backend = backend
        self.routers = nn.ModuleList([nn.Conv2d(channels, breadth, 1), nn.Conv2d(channels, breadth, 1, stride=2)])
        self.weights = nn.ParameterList([nn.Parameter(0.2 * torch.randn(breadth, channels, channels, 3, 3)) for _ in range(2)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(channels)) for _ in range(2)])
        self.strides = (1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for router, weight, bias, stride in zip(self.routers, self.weights, self.biases, self.strides):
            gate, index = router(x).softmax(1).max(1)
            x = torch.relu(switched_conv2d(x, weight, bias, (index, gate), stride, 1, 1, self.backend))
        return x


def _compare_compiled(model: nn.Module, compiled: nn.Module, x: torch.Tensor) -> None:
    y_eager = model(x)
    y_eager.square().sum().backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads_eager, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_switched_conv2d_modules():
    """A network of ``SwitchedConv2d`` (gather backend) compiles without graph breaks, in
    training mode with SwitchNorm recording usage inside the graph."""
    from dynconv import SwitchedConv2d

    torch._dynamo.reset()
    model = nn.Sequential(
        SwitchedConv2d(4, 6, 3, padding=1, breadth=4, backend="gather"),
        nn.ReLU(),
        SwitchedConv2d(6, 4, 3, stride=2, padding=1, breadth=8, switch_norm=False, backend="gather"),
    ).train()
    x = torch.randn(2, 4, 8, 8)
    _compare_compiled(model, torch.compile(model, fullgraph=True, backend="aot_eager"), x)
    assert int(model[0].norm.write_index) == 2  # the eager and the compiled step both recorded


def test_compile_fullgraph_tiny_net_aot_eager():
    torch._dynamo.reset()
    model = _TinySwitchedNet()
    _compare_compiled(model, torch.compile(model, fullgraph=True, backend="aot_eager"), torch.randn(2, 4, 8, 8))


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    torch._dynamo.reset()
    model = _TinySwitchedNet()
    _compare_compiled(model, torch.compile(model, fullgraph=True), torch.randn(2, 4, 8, 8))


def test_export_dynamic_batch():
    from torch.export import Dim, export

    model = _TinySwitchedNet().eval()
    with torch.no_grad():
        program = export(model, (torch.randn(2, 4, 8, 8),), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("dynconv.switched_conv2d_gather" in t for t in targets), targets
    runner = program.module()
    for batch in (1, 3, 5):
        x = torch.randn(batch, 4, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), model(x))
