"""The network a bf16 fusion approximates at best: every parameter and every layer's input
and output rounded to bfloat16, as ``fuse_for_inference(precision="bf16")`` stores them, and
all arithmetic exact (float64). Its argmax agreement with float32 is what bf16 storage alone
allows, whatever the kernels' accumulation."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from models.resnet import FusedPreActBottleneck
from mtkernels.fuse import AffineReLU, FusedConv2d, FusedLinear
from mtkernels.fuse.plans import FusedMultiTaskNet


def round_to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(t.dtype)


def _conv(layer: FusedConv2d):
    def forward(x):
        y = F.conv2d(round_to_bf16(x), layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                     layer.groups)
        y = F.relu(y) if layer.relu else y
        return round_to_bf16(F.max_pool2d(y, 2, 2) if layer.pool else y)
    return forward


def _rounding_input_and_output(forward):
    return lambda x: round_to_bf16(forward(round_to_bf16(x)))


def bf16_storage_logits(fused_fp64: FusedMultiTaskNet, x: torch.Tensor) -> torch.Tensor:
    """Float64 logits of ``fused_fp64`` (the float64 model's fusion) on ``x`` with bf16
    storage and exact arithmetic."""
    net = copy.deepcopy(fused_fp64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(round_to_bf16(p))
    for module in net.modules():
        if isinstance(module, FusedConv2d):
            module.forward = _conv(module)
        elif isinstance(module, (FusedLinear, AffineReLU)):
            module.forward = _rounding_input_and_output(module.forward)
        elif isinstance(module, (FusedPreActBottleneck, nn.AdaptiveAvgPool2d)):
            module.register_forward_hook(lambda module, args, out: round_to_bf16(out))
    with torch.no_grad():
        return net.heads(net.trunk(x.double()))
