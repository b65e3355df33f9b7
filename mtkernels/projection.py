"""A residual block's first 1x1 convolution and its strided 1x1 projection shortcut, which
read the same input, with one input gradient.

Run as two layers, the shortcut's input gradient is a full-size tensor, zero but at the
strided pixels (``gemm_conv2d_col2im`` writes all of it), and autograd then adds it to the
convolution's input gradient in another full pass: for ResNet ver1's 256 x 24 x 24
activations at batch 128 (bfloat16, 37.7 MB) 9 ms and 6.6 ms a step, measured in the
training step on this project's 2-core CPU. Here the shortcut's gradient is added into the
convolution's, at its strided pixels only. It applies where each layer's timing chose what
runs here (``TrainingConv2d.algorithm``): oneDNN's convolution or the GEMM for the first,
the GEMM for the shortcut; each product runs and rounds as in the two layers (the sum too),
so the results are theirs (a zero's sign aside: the two layers add +0 where the shortcut's
gradient is zero).
"""

from __future__ import annotations

import torch
from torch import nn

from .ops.conv_training import conv_output_size, gemm_conv2d_im2col
from .training import TrainingConv2d


def _pointwise(conv: nn.Conv2d, stride: int) -> bool:
    return (isinstance(conv, TrainingConv2d) and conv.kernel_size == (1, 1) and conv.stride == (stride, stride)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Channels-last [N, C, H, W] -> its [N * H * W, C] view."""
    n, c, h, w = t.shape
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n * h * w, c)


def _from_rows(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    return rows.view(n, h, w, -1).permute(0, 3, 1, 2)


class _ConvAndProjection(torch.autograd.Function):
    """(conv(x), shortcut(x)) for 1x1 weights, the first of stride 1 by ``algorithm``
    ("torch" or "gemm"), the second of ``stride`` as a GEMM; weights in x's dtype are
    rounded copies of the float32 parameters, whose gradients come back in float32."""

    @staticmethod
    def forward(ctx, x, weight, shortcut_weight, algorithm: str, stride: int):
        w, ws = weight.to(x.dtype), shortcut_weight.to(x.dtype)
        n, _, h, wd = x.shape
        if algorithm == "gemm":
            y = _from_rows(_rows(x) @ w.flatten(1).t(), n, h, wd)
        else:
            y = torch.nn.functional.conv2d(x, w)
        strided = gemm_conv2d_im2col(x, 1, 1, stride, 0)
        skip = _from_rows(strided @ ws.flatten(1).t(), n, conv_output_size(h, 1, stride, 0),
                          conv_output_size(wd, 1, stride, 0))
        ctx.save_for_backward(x, w, ws, strided)  # the strided pixels (a quarter of x at stride 2), not gathered again
        ctx.algorithm, ctx.stride = algorithm, stride
        return y, skip

    @staticmethod
    def backward(ctx, grad_y, grad_skip):
        x, w, ws, strided = ctx.saved_tensors
        n, c, h, wd = x.shape
        grad_y, grad_skip = (g.to(x.dtype).contiguous(memory_format=torch.channels_last) for g in (grad_y, grad_skip))
        if ctx.algorithm == "gemm":
            rows = _rows(grad_y)
            grad_x = _from_rows(rows @ w.flatten(1), n, h, wd)
            grad_w = (rows.t() @ _rows(x)).view(w.shape)
        else:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(grad_y, x, w, None, [1, 1], [0, 0], [1, 1], False,
                                                                    [0, 0], 1, [True, True, False])
            grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        skip_rows = _rows(grad_skip)
        grad_ws = (skip_rows.t() @ strided).view(ws.shape)
        s = ctx.stride
        grad_x.permute(0, 2, 3, 1)[:, ::s, ::s, :].add_((skip_rows @ ws.flatten(1)).view(n, -1, grad_skip.shape[3], c))
        return grad_x, grad_w.float(), grad_ws.float(), None, None


def conv_and_projection(conv: nn.Conv2d, shortcut: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv(x), shortcut(x))`` for a block's 1x1 stride-1 ``conv`` and its 1x1 strided
    projection ``shortcut``: one autograd node, whose input gradient adds the shortcut's in
    place (see the module docstring), where both are fused-training layers
    (:class:`TrainingConv2d`) of the same precision without bias on a channels-last CPU
    ``x`` that needs gradients; the two layers as they are anywhere else."""
    stride = shortcut.stride[0] if isinstance(shortcut, nn.Conv2d) else 0
    if not (stride > 1 and _pointwise(conv, 1) and _pointwise(shortcut, stride)
            and conv.compute_dtype == shortcut.compute_dtype and torch.is_grad_enabled() and x.requires_grad
            and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling()):
        return conv(x), shortcut(x)
    (x,) = conv.cast(x)
    algorithm = conv.algorithm(x)
    if algorithm not in ("torch", "gemm") or shortcut.algorithm(x) != "gemm":
        return conv(x), shortcut(x)
    return _ConvAndProjection.apply(x, conv.weight, shortcut.weight, algorithm, stride)
