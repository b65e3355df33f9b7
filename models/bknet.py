"""Multi-task BKNet (Sang & Cuong 2018, section 3.2).

Shared: four conv blocks of 3x3 conv (stride 1, padding 1) + BN + ReLU -- 2x32, 2x64,
2x128, 3x256 -- each followed by 2x2 max-pool stride 2: 1x48x48 -> 256x3x3.
Branch per task: FC256 + BN + ReLU + dropout 0.5, twice, then FC C (C = 2, 7, 2).
Weights ~ N(0, 0.01^2). Conv / hidden FC layers have no bias: the BN after them has one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import nn

from .common import MultiTaskNet, conv3x3_bn_relu, fc_branch, init_gaussian
from .tasks import PAPER1_TASKS

BKNET_BLOCKS = ((32, 2), (64, 2), (128, 2), (256, 3))  # (channels, conv layers) per block


def bknet_trunk(in_channels: int = 1, blocks: Sequence[tuple[int, int]] = BKNET_BLOCKS) -> nn.Sequential:
    layers: list[nn.Module] = []
    for channels, depth in blocks:
        for _ in range(depth):
            layers += conv3x3_bn_relu(in_channels, channels)
            in_channels = channels
        layers.append(nn.MaxPool2d(2, 2))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


class MultiTaskBKNet(MultiTaskNet):
    def __init__(self, tasks: Mapping[str, Sequence[str]] = PAPER1_TASKS, input_size: int = 48,
                 hidden: int = 256, dropout: float = 0.5, init_std: float = 0.01):
        side = input_size // 2 ** len(BKNET_BLOCKS)
        features = BKNET_BLOCKS[-1][0] * side * side
        super().__init__(tasks, bknet_trunk(),
                         [fc_branch(features, (hidden, hidden), len(c), dropout) for c in tasks.values()],
                         input_size)
        init_gaussian(self, init_std)
