"""ResNet-18 for CIFAR (32x32): 3x3 stem, no max-pool, [2, 2, 2, 2] basic blocks, 64-512 channels.

``block_conv2`` swaps the second 3x3 conv of every basic block for a dynamic layer (the slot
the comparison report uses): the block's input/output shapes and its BN stay, so only the
operator differs between variants. ``block_conv2_stages`` limits the swap to some stages
(``(1, 2)``: the high-resolution 32x32 and 16x16 stages only, the switched-conv author's setting).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int
from .registry import check_layer_options, conv3x3, register_model

STAGES = (1, 2, 3, 4)


def check_stages(stages: Sequence[int], name: str = "block_conv2_stages") -> tuple[int, ...]:
    """``stages`` as a sorted tuple: a non-empty list of stage numbers among 1-4, none twice."""
    if (isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages
            or any(isinstance(s, bool) or s not in STAGES for s in stages) or len(set(stages)) != len(stages)):
        raise ValueError(f"{name} must be a non-empty list of stage numbers among {list(STAGES)} without repeats, "
                         f"got {stages!r}")
    return tuple(sorted(stages))


class BasicBlock(nn.Module):
    """conv3x3(stride) -> BN -> ReLU -> ``conv2`` (stride 1) -> BN, plus the (projected) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, conv2: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv2
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """Classification logits ``(N, num_classes)`` from ``(N, in_channels, H, W)`` images."""

    def __init__(
        self,
        num_classes: int = 10,
        *,
        block_conv2: str = "conv",
        layer: Mapping[str, Any] | None = None,
        width: int = 64,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        in_channels: int = 3,
        block_conv2_stages: Sequence[int] = STAGES,
    ) -> None:
        super().__init__()
        self.num_classes = positive_int(num_classes, "num_classes")
        width = positive_int(width, "width")
        options = check_layer_options(block_conv2, layer, "resnet18_cifar")
        self.block_conv2 = block_conv2
        self.block_conv2_stages = check_stages(block_conv2_stages)
        if len(num_blocks) != 4:
            raise ValueError(f"num_blocks must list 4 stages, got {num_blocks!r}")
        self.conv1 = nn.Conv2d(positive_int(in_channels, "in_channels"), width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, in_planes = [], width
        for i, count in enumerate(num_blocks):
            planes = width * 2**i
            kind, kind_options = (block_conv2, options) if i + 1 in self.block_conv2_stages else ("conv", {})
            blocks = []
            for j in range(positive_int(count, f"num_blocks[{i}]")):
                stride = 2 if i > 0 and j == 0 else 1
                conv2 = conv3x3(kind, planes, planes, kind_options, bias=False)
                blocks.append(BasicBlock(in_planes, planes, stride, conv2))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_planes, num_classes)

    def checkpoint_blocks(self) -> list[nn.Module]:
        """The basic blocks, the unit the trainer recomputes under gradient checkpointing."""
        return [m for m in self.modules() if isinstance(m, BasicBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register_model("resnet18_cifar", task="classification")
def resnet18_cifar(
    num_classes: int = 10,
    block_conv2: str = "conv",
    layer: Mapping[str, Any] | None = None,
    width: int = 64,
    in_channels: int = 3,
    block_conv2_stages: Sequence[int] = STAGES,
) -> ResNetCIFAR:
    """ResNet-18 (CIFAR variant). ``block_conv2``: ``conv | condconv | involution | switched``;
    ``layer``: that layer's options (e.g. ``breadth``/``selector``/``routing`` for switched,
    ``num_experts``/``routing``/``temperature`` for condconv, ``groups``/``reduction``/
    ``kernel_size`` (default 3, the conv's footprint) for involution). ``width`` scales all
    stages (64 = the standard net; smaller for quick tests). ``block_conv2_stages``: the
    stages (1-4; 1 is 32x32, 4 is 4x4) whose blocks get ``block_conv2``; the others keep a conv."""
    return ResNetCIFAR(num_classes, block_conv2=block_conv2, layer=layer, width=width, in_channels=in_channels,
                       block_conv2_stages=block_conv2_stages)
