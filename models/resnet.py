"""Multi-task ResNet ver1 / ver2 (Sang & Cuong 2018, section 3.3) on ResNet-v2-50.

Pre-activation bottleneck (He et al., "Identity mappings"): BN-ReLU-conv1x1(m),
BN-ReLU-conv3x3(m, stride s), BN-ReLU-conv1x1(4m); the shortcut is the identity, or a
1x1 conv (stride s) on the pre-activated input when shape changes. Stages of 3, 4, 6, 3
blocks with base depth 64, 128, 256, 512; stages 2-4 sub-sample in their first block.

Stem adapted to 48x48 gray input (the ImageNet stem, 7x7/2 conv + 3x3/2 max-pool, would
leave 12x12 before the first stage and 2x2 at the end): one 3x3 conv, 64 filters,
stride 1, then 2x2 max-pool -> 64x24x24, so the stages run at 24, 12, 6 and 3 pixels.

ver1: all four stages shared, then final BN-ReLU, global average pooling and paper 1's
      FC branches (FC256 + BN + ReLU + dropout, twice, FC C).
ver2: three stages shared; each task has its own fourth stage, final BN-ReLU, global
      average pooling and FC C.
He initialisation throughout.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from mtkernels.projection import conv_and_projection
from mtkernels.training import add_bn_relu, as_bn_relu, bn_relu

from .common import MultiTaskNet, fc_branch, init_he
from .tasks import PAPER1_TASKS

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (base depth, blocks, first stride)
EXPANSION = 4


class PreActBottleneck(nn.Module):
    def __init__(self, in_channels: int, depth: int, stride: int):
        super().__init__()
        out_channels = depth * EXPANSION
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, depth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(depth)
        self.conv2 = nn.Conv2d(depth, depth, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(depth)
        self.conv3 = nn.Conv2d(depth, out_channels, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, skip = self.residual_terms(x, bn_relu(self.bn1, x))
        return out + skip

    def residual_terms(self, x: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two terms of this block's output for input ``x`` whose pre-activation
        ``relu(bn1(x))`` is ``pre``: the bottleneck's and the shortcut's."""
        if self.shortcut is None:
            out, skip = self.conv1(pre), x
        else:
            out, skip = conv_and_projection(self.conv1, self.shortcut, pre)
        out = self.conv2(bn_relu(self.bn2, out))
        out = self.conv3(bn_relu(self.bn3, out))
        return out, skip

    def fuse_for_training(self) -> None:
        """Each BatchNorm here is followed by a ReLU: one op each in training."""
        for bn in (self.bn1, self.bn2, self.bn3):
            as_bn_relu(bn)

    def fuse_for_inference(self, fuser) -> nn.Module:
        """bn2 / bn3 follow conv1 / conv2 and fold into them exactly; bn1 precedes a ReLU
        and the convs, so it becomes one affine + ReLU (see mtkernels.fuse)."""
        return FusedPreActBottleneck(
            fuser.affine_relu(self.bn1), fuser.conv(self.conv1, self.bn2, relu=True),
            fuser.conv(self.conv2, self.bn3, relu=True), fuser.conv(self.conv3),
            None if self.shortcut is None else fuser.conv(self.shortcut))


class FusedPreActBottleneck(nn.Module):
    def __init__(self, pre: nn.Module, conv1: nn.Module, conv2: nn.Module, conv3: nn.Module,
                 shortcut: nn.Module | None):
        super().__init__()
        self.pre, self.conv1, self.conv2, self.conv3, self.shortcut = pre, conv1, conv2, conv3, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        skip = x if self.shortcut is None else self.shortcut(pre)
        return self.conv3.forward_add(self.conv2(self.conv1(pre)), skip)


class Stage(nn.Sequential):
    """Bottleneck blocks in sequence. Each block's sum and the next block's pre-activation
    are one step (:func:`add_bn_relu`: one op in fused training), so the sum is not read
    back for the statistics and its gradients are not added up apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = list(self)
        pre = bn_relu(blocks[0].bn1, x)
        for block, following in zip(blocks, blocks[1:]):
            x, pre = add_bn_relu(following.bn1, *block.residual_terms(x, pre))
        out, skip = blocks[-1].residual_terms(x, pre)
        return out + skip


def stage(in_channels: int, depth: int, blocks: int, stride: int) -> Stage:
    layers = [PreActBottleneck(in_channels, depth, stride)]
    layers += [PreActBottleneck(depth * EXPANSION, depth, 1) for _ in range(blocks - 1)]
    return Stage(*layers)


def head_pool(channels: int) -> list[nn.Module]:
    """Final pre-activation BN-ReLU of ResNet-v2, then global average pooling."""
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]


def stem(in_channels: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.MaxPool2d(2, 2)]


class MultiTaskResNet(MultiTaskNet):
    def __init__(self, version: int = 1, tasks: Mapping[str, Sequence[str]] = PAPER1_TASKS,
                 input_size: int = 48, hidden: int = 256, dropout: float = 0.5):
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        shared_stages = STAGES if version == 1 else STAGES[:-1]
        layers: list[nn.Module] = stem()
        channels = 64
        for depth, blocks, stride in shared_stages:
            layers.append(stage(channels, depth, blocks, stride))
            channels = depth * EXPANSION
        if version == 1:
            layers += head_pool(channels)
            branches = [fc_branch(channels, (hidden, hidden), len(c), dropout) for c in tasks.values()]
        else:
            depth, blocks, stride = STAGES[-1]
            out = depth * EXPANSION
            branches = [nn.Sequential(stage(channels, depth, blocks, stride), *head_pool(out), nn.Linear(out, len(c)))
                        for c in tasks.values()]
        super().__init__(tasks, nn.Sequential(*layers), branches, input_size)
        self.version = version
        init_he(self)
