"""Pieces shared by the papers' networks: the multi-task output contract and init."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn


class MultiTaskNet(nn.Module):
    """Every network here: a shared trunk, one branch per task, and one ``[N, sum(C)]``
    logits tensor out (tasks side by side, in ``task_names`` order)."""

    def __init__(self, tasks: Mapping[str, Sequence[str]], trunk: nn.Module, branches: Sequence[nn.Module],
                 input_size: int, in_channels: int = 1):
        super().__init__()
        if len(branches) != len(tasks):
            raise ValueError(f"got {len(branches)} branches for {len(tasks)} tasks")
        self.task_names = tuple(tasks)
        self.class_names = tuple(tuple(c) for c in tasks.values())
        self.num_classes = tuple(len(c) for c in self.class_names)
        self.input_size = input_size
        self.in_channels = in_channels
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.trunk(x)
        return torch.cat([branch(shared) for branch in self.branches], dim=1)

    def fuse_for_inference(self, fuser) -> nn.Module:
        """Called by ``mtkernels.fuse_for_inference``: the trunk and branches fused, with this
        network's input checks and task layout."""
        return fuser.multitask(self.trunk, self.branches, self.num_classes, self.task_names,
                               in_channels=self.in_channels, input_size=self.input_size)

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-task views of a ``[N, sum(C)]`` logits tensor."""
        return logits.split(self.num_classes, dim=1)


def fc_bn_relu(in_features: int, out_features: int, dropout: float) -> list[nn.Module]:
    """FC + BN + ReLU (+ dropout); no FC bias, since BN's shift replaces it."""
    layers = [nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU(inplace=True)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return layers


def fc_branch(in_features: int, hidden: Sequence[int], classes: int, dropout: float) -> nn.Sequential:
    """Paper 1's branch: (FC hidden + BN + ReLU + dropout) for each hidden size, then FC classes."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += fc_bn_relu(in_features, width, dropout)
        in_features = width
    layers.append(nn.Linear(in_features, classes))
    return nn.Sequential(*layers)


def conv3x3_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def init_gaussian(model: nn.Module, std: float) -> None:
    """Conv / linear weights ~ N(0, std^2), biases 0, BN the identity (paper 1, BKNet)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_he(model: nn.Module) -> None:
    """He (variance-scaling) init for conv / linear weights, biases 0, BN the identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
