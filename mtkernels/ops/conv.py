"""CPU NHWC kernels of the fused inference path (``mtkernels._C``), checked and wrapped.

Both take and return channels-last float32 tensors; they exist where PyTorch's own
kernels are slow for the papers' shapes: a 2x2 max-pool at batch 1 and the first conv
layer, whose single input channel leaves oneDNN's GEMM-based path mostly idle.
"""

from __future__ import annotations

import torch

from .. import _C


def conv_weight_k_major(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, KH, KW] -> [KH * KW * C_in, C_out]: the GEMM operand of the NHWC kernels
    (the Triton implicit-GEMM conv and the single-channel C++ conv)."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


def _check(name: str, x: torch.Tensor, channels: int | None = None) -> None:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"{name} must be [N, {channels if channels is not None else 'C'}, H, W], "
                         f"got {tuple(x.shape)}")


def maxpool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2)`` for a channels-last float32 CPU tensor."""
    _check("x", x)
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    out = torch.empty((n, c, h // 2, w // 2), memory_format=torch.channels_last)
    _C.maxpool2x2_nhwc(x.data_ptr(), out.data_ptr(), n, h, w, c, torch.get_num_threads())
    return out


def conv3x3_single_channel(x: torch.Tensor, weight_k_major: torch.Tensor, bias: torch.Tensor,
                           relu: bool) -> torch.Tensor:
    """3x3 / stride 1 / padding 1 convolution of [N, 1, H, W] + bias (+ ReLU), channels-last
    output. ``weight_k_major`` is [9, C_out] (see :func:`conv_weight_k_major`)."""
    _check("x", x, channels=1)
    if weight_k_major.shape[0] != 9 or weight_k_major.dim() != 2 or bias.shape != (weight_k_major.shape[1],):
        raise ValueError(f"weight_k_major must be [9, C_out] and bias [C_out], got "
                         f"{tuple(weight_k_major.shape)} and {tuple(bias.shape)}")
    x = x.contiguous()  # one channel: NCHW and NHWC are the same memory
    weight_k_major, bias = weight_k_major.contiguous(), bias.contiguous()
    n, _, h, w = x.shape
    c_out = weight_k_major.shape[1]
    out = torch.empty((n, c_out, h, w), memory_format=torch.channels_last)
    _C.conv3x3_single_channel_nhwc(x.data_ptr(), weight_k_major.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                   n, h, w, c_out, relu, torch.get_num_threads())
    return out
