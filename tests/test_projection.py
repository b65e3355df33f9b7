"""mtkernels.projection.conv_and_projection: a block's 1x1 convolution and its strided 1x1
projection shortcut with one input gradient, against the two layers run apart (the
reference: the same products by autograd, the shortcut's gradient a full-size tensor added
to the convolution's) and against float64."""

import copy

import pytest
import torch
import torch.nn.functional as F

import mtkernels
from mtkernels.projection import conv_and_projection


def layers(in_channels, depth, stride, precision, conv_algorithm):
    """A fused-training pair (1x1 conv, strided 1x1 shortcut) with the algorithms fixed."""
    torch.manual_seed(0)
    pair = torch.nn.ModuleList([torch.nn.Conv2d(in_channels, depth, 1, bias=False),
                                torch.nn.Conv2d(in_channels, 4 * depth, 1, stride=stride, bias=False)])
    mtkernels.fuse_for_training(pair, precision=precision)
    conv, shortcut = pair
    conv.algorithm = lambda x: conv_algorithm
    shortcut.algorithm = lambda x: "gemm"
    return conv, shortcut


def step(conv, shortcut, x, grads, fused):
    x = x.clone().requires_grad_()
    outputs = conv_and_projection(conv, shortcut, x) if fused else (conv(x), shortcut(x))
    got = torch.autograd.grad(outputs, (x, conv.weight, shortcut.weight), grads)
    return outputs, got


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("conv_algorithm", ["torch", "gemm"])
@pytest.mark.parametrize("shape,stride", [((4, 24, 7, 7), 2), ((3, 16, 6, 5), 3)])
def test_equals_the_two_layers(isa, precision, conv_algorithm, shape, stride):
    """Outputs and all three gradients equal the two layers' (odd sizes: strided pixels up
    to the last row and column, or not; a stride of 3)."""
    conv, shortcut = layers(shape[1], 8, stride, precision, conv_algorithm)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(mtkernels.training.training_dtype(precision))
    x = x.contiguous(memory_format=torch.channels_last)
    out_h, out_w = (shape[2] - 1) // stride + 1, (shape[3] - 1) // stride + 1
    grads = (torch.randn(shape[0], 8, *shape[2:], generator=g).to(x.dtype),
             torch.randn(shape[0], 32, out_h, out_w, generator=g).to(x.dtype))
    (y, skip), got = step(conv, shortcut, x, grads, fused=True)
    (want_y, want_skip), want = step(conv, shortcut, x, grads, fused=False)
    assert torch.equal(y, want_y) and torch.equal(skip, want_skip)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_shortcut_weight"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got[1].dtype == torch.float32  # the parameter's dtype, in bf16 too


def test_float32_matches_float64():
    conv, shortcut = layers(12, 4, 2, "fp32", "torch")
    x = torch.randn(2, 12, 6, 6).contiguous(memory_format=torch.channels_last)
    grads = (torch.randn(2, 4, 6, 6), torch.randn(2, 16, 3, 3))
    _, got = step(conv, shortcut, x, grads, fused=True)
    x64 = x.double().requires_grad_()
    w64, ws64 = (w.detach().double().requires_grad_() for w in (conv.weight, shortcut.weight))
    want = torch.autograd.grad((F.conv2d(x64, w64), F.conv2d(x64, ws64, stride=2)), (x64, w64, ws64),
                               tuple(g.double() for g in grads))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_runs_the_two_layers_where_it_does_not_apply():
    """Stride 1, a bias, a non-channels-last input, no gradient, another algorithm: the
    layers as they are (their own autograd nodes)."""
    conv, shortcut = layers(8, 4, 2, "fp32", "torch")
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert type(conv_and_projection(conv, shortcut, x)[0].grad_fn).__name__ == "_ConvAndProjectionBackward"
    cases = {"contiguous input": (conv, shortcut, x.contiguous()),
             "no gradient": (conv, shortcut, x.detach())}
    stride_one = copy.deepcopy(shortcut)
    stride_one.stride = (1, 1)
    cases["stride 1"] = (conv, stride_one, x)
    oneDNN_shortcut = copy.deepcopy(shortcut)
    oneDNN_shortcut.algorithm = lambda x: "torch"
    cases["shortcut not a GEMM"] = (conv, oneDNN_shortcut, x)
    for name, (a, b, inputs) in cases.items():
        y, skip = conv_and_projection(a, b, inputs)
        assert y.grad_fn is None or type(y.grad_fn).__name__ != "_ConvAndProjectionBackward", name
        torch.testing.assert_close(skip, F.conv2d(inputs, b.weight, stride=b.stride), rtol=1e-5, atol=1e-5)
