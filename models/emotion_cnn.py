"""The 4-task CNN of Saroop et al. 2021: emotion (7), gender (3), race (3), age (5).

The paper's architecture figure is missing from its text; it says the network builds on
a public Kaggle FER notebook, with dropout rates changed to 0.6, 0.5, 0.4, 0.4 in
increasing depth, and that every task shares all layers up to the second last, each task
having only its own output layer. Assumed layer list matching that description
(input 1x50x50 gray):

    [3x3 conv 64 + BN + ReLU] x2, 2x2 max-pool, dropout 0.6    -> 64x25x25
    [3x3 conv 128 + BN + ReLU] x2, 2x2 max-pool, dropout 0.5   -> 128x12x12
    [3x3 conv 256 + BN + ReLU] x2, 2x2 max-pool, dropout 0.4   -> 256x6x6
    flatten, FC 256 + BN + ReLU, dropout 0.4                   -> 256
    four output layers FC C_t (softmax in the loss)
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import nn

from .common import MultiTaskNet, conv3x3_bn_relu, fc_bn_relu, init_he
from .tasks import PAPER2_TASKS

CONV_BLOCKS = ((64, 0.6), (128, 0.5), (256, 0.4))  # (channels, dropout) per block
DENSE = (256, 0.4)


class FourTaskCNN(MultiTaskNet):
    def __init__(self, tasks: Mapping[str, Sequence[str]] = PAPER2_TASKS, input_size: int = 50):
        layers: list[nn.Module] = []
        in_channels, side = 1, input_size
        for channels, dropout in CONV_BLOCKS:
            layers += conv3x3_bn_relu(in_channels, channels) + conv3x3_bn_relu(channels, channels)
            layers += [nn.MaxPool2d(2, 2), nn.Dropout(dropout)]
            in_channels, side = channels, side // 2
        width, dropout = DENSE
        layers += [nn.Flatten(), *fc_bn_relu(in_channels * side * side, width, dropout)]
        super().__init__(tasks, nn.Sequential(*layers), [nn.Linear(width, len(c)) for c in tasks.values()],
                         input_size)
        init_he(self)
