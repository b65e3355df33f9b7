"""Convolutions for CPU training (float32, channels-last), where oneDNN's own kernels are
slow for the papers' shapes at batch 128:

- ``mtkernels::winograd_conv3x3``: 3x3 / stride 1 / padding 1 by Winograd F(2x2, 3x3), the
  input and output transforms in C++ (csrc/conv_kernel.cpp) around 16 GEMMs (PyTorch's
  bmm), 2.25x fewer multiplications than a direct convolution. All three products of a
  training step go this way: the input gradient is the same algorithm on the output
  gradient with each filter flipped and C_in / C_out swapped
  (``mtkernels::winograd_conv3x3_input_grad``); the weight gradient is the adjoint of the
  forward, d U[k] = V[k]^T d M[k] summed over every tile of the batch, with d M the
  adjoint output transform of d y (also C++) and d weight = G^T d U G.
- ``mtkernels::conv_winograd_bf16``: the same algorithm in bfloat16 (mixed-precision
  training) by mtkernels' own kernel (``mtkernels.ops.conv_winograd_bf16``: transformed
  input and weight rounded to bfloat16, float32 sums, AVX512-BF16 where the CPU has it), for
  the forward and, with the flipped, transposed filters, the input gradient
  (``mtkernels::conv_winograd_bf16_input_grad``). The weight gradient is Winograd's too
  (``mtkernels::conv_winograd_bf16_weight_grad``: V and d M rounded to bfloat16, products
  summed over the batch's tiles in float32), 1.1-1.8x oneDNN's bfloat16 one on BKNet's
  layers here.
- ``mtkernels::gemm_conv2d``: any convolution as one GEMM over all output pixels of the
  batch (im2col in channels-last order; a 1x1 / stride 1 layer needs no copy at all).
  oneDNN blocks its work per image, which leaves layers with 3x3 output maps (the ResNets'
  last stage, 9 pixels an image) far from the GEMM rate; one GEMM with N * 9 rows is not.
  Nor is oneDNN's bfloat16 weight gradient of a one-channel first layer (11 GFLOP/s here).

Both are ``torch.library`` custom ops with fake implementations and autograd; which layer
runs which is :class:`mtkernels.TrainingConv2d`'s choice.
"""

from __future__ import annotations

import threading

import torch

from .. import _C
from . import conv_winograd_bf16 as _winograd_bf16
from .conv import (
    ELEMENTS,
    WinogradBuffers,
    _check,
    winograd_conv3x3_bias_act_unchecked,
    winograd_filter_gradient,
    winograd_filter_transform,
)

_scratch = threading.local()


def _winograd_buffers() -> WinogradBuffers:
    """Per thread: the transformed-tile buffers, kept between steps (one set per shape)."""
    if not hasattr(_scratch, "buffers"):
        _scratch.buffers = WinogradBuffers()
    return _scratch.buffers


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def _check_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                weight_dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """x 4-D on the CPU in one of ``dtypes``; weight of one of ``weight_dtypes`` (default: x's
    dtype) and bias of x's dtype, of their shapes."""
    if x.device.type != "cpu" or x.dtype not in dtypes:
        raise TypeError(f"x must be a {_dtype_names(dtypes)} CPU tensor, got {x.dtype} on {x.device}")
    dtype = str(x.dtype).removeprefix("torch.")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W], got {tuple(x.shape)}")
    weight_dtypes = weight_dtypes or (x.dtype,)
    if weight.dtype not in weight_dtypes or weight.device.type != "cpu" or weight.dim() != 4 \
            or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be a {_dtype_names(weight_dtypes)} CPU tensor [C_out, {x.shape[1]}, KH, KW] "
                         f"(x has {x.shape[1]} channels), got {weight.dtype} {tuple(weight.shape)} on "
                         f"{weight.device}")
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a {dtype} tensor of shape ({weight.shape[0]},), got "
                         f"{bias.dtype} {tuple(bias.shape)}")


def _winograd(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Winograd 3x3 convolution of ``x`` with transformed filters ``u`` [16, C_in, C_out]."""
    bias = torch.zeros(u.shape[2]) if bias is None else bias.contiguous()
    return winograd_conv3x3_bias_act_unchecked(x.contiguous(memory_format=torch.channels_last), u, bias, False, False,
                              _winograd_buffers())


@torch.library.custom_op("mtkernels::winograd_conv3x3", mutates_args=())
def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for 3x3 filters by Winograd F(2x2, 3x3);
    channels-last float32 output."""
    _check_conv(x, weight, bias)
    if tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [C_out, C_in, 3, 3], got {tuple(weight.shape)}")
    return _winograd(x, winograd_filter_transform(weight.detach()), bias)


@winograd_conv3x3.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:])).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("mtkernels::winograd_conv3x3_input_grad", mutates_args=())
def winograd_conv3x3_input_grad(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d x of :func:`winograd_conv3x3` given d y: the 3x3 convolution of ``grad_y`` with the
    flipped, transposed filters (``F.conv_transpose2d(grad_y, weight, padding=1)``)."""
    _check("grad_y", grad_y, channels=weight.shape[0])
    return _winograd(grad_y, winograd_filter_transform(weight.detach(), transposed=True), None)


@winograd_conv3x3_input_grad.register_fake
def _(grad_y, weight):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1], *grad_y.shape[2:])).contiguous(
        memory_format=torch.channels_last)


@torch.library.custom_op("mtkernels::winograd_conv3x3_weight_grad", mutates_args=())
def winograd_conv3x3_weight_grad(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """d weight [C_out, C_in, 3, 3] of :func:`winograd_conv3x3` given its input and d y, by
    Winograd: per chunk of images, the input transform of x (V) and the adjoint output
    transform of d y (d M) into scratch buffers, then d U += V^T d M."""
    _check("x", x)
    _check("grad_y", grad_y)
    if grad_y.shape[0] != x.shape[0] or grad_y.shape[2:] != x.shape[2:]:
        raise ValueError(f"grad_y must be [{x.shape[0]}, C_out, {x.shape[2]}, {x.shape[3]}] (x is "
                         f"{tuple(x.shape)}), got {tuple(grad_y.shape)}")
    x = x.contiguous(memory_format=torch.channels_last)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    _, c_in, h, w = x.shape
    c_out = grad_y.shape[1]
    _, chunks, in_bytes, out_bytes = _winograd_buffers().plan(x.shape, c_out, False, None)
    threads = torch.get_num_threads()
    grad_u = torch.zeros(16, c_in, c_out)
    for start, images, v, m in chunks:
        _C.winograd_input_nhwc(x.data_ptr() + start * in_bytes, v.data_ptr(), images, h, w, c_in, threads)
        _C.winograd_output_adjoint_nhwc(grad_y.data_ptr() + start * out_bytes, m.data_ptr(), images, h, w, c_out,
                                        threads)
        grad_u.baddbmm_(v.transpose(1, 2), m)
    return winograd_filter_gradient(grad_u)


@winograd_conv3x3_weight_grad.register_fake
def _(x, grad_y):
    return x.new_empty((grad_y.shape[1], x.shape[1], 3, 3))


def _save_inputs(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.geometry = inputs[3:]  # gemm_conv2d's stride and padding


def _winograd_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = winograd_conv3x3_input_grad(grad_y, weight) if ctx.needs_input_grad[0] else None
    grad_weight = winograd_conv3x3_weight_grad(x, grad_y) if ctx.needs_input_grad[1] else None
    grad_bias = grad_y.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


winograd_conv3x3.register_autograd(_winograd_backward, setup_context=_save_inputs)


def _save_tensor_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _winograd_input_grad_backward(ctx, grad):
    """The input gradient is linear in d y and the adjoint of the convolution: this makes
    :func:`winograd_conv3x3` twice differentiable."""
    grad_y, weight = ctx.saved_tensors
    grad_grad_y = winograd_conv3x3(grad, weight, None) if ctx.needs_input_grad[0] else None
    grad_weight = winograd_conv3x3_weight_grad(grad, grad_y) if ctx.needs_input_grad[1] else None
    return grad_grad_y, grad_weight


winograd_conv3x3_input_grad.register_autograd(_winograd_input_grad_backward, setup_context=_save_tensor_inputs)


def _winograd_weight_grad_backward(ctx, grad):
    """The weight gradient is bilinear in x and d y: <grad, d weight> = <d y, conv(x, grad)>
    = <x, conv_transpose(d y, grad)>."""
    x, grad_y = ctx.saved_tensors
    grad_x = winograd_conv3x3_input_grad(grad_y, grad) if ctx.needs_input_grad[0] else None
    grad_grad_y = winograd_conv3x3(x, grad, None) if ctx.needs_input_grad[1] else None
    return grad_x, grad_grad_y


winograd_conv3x3_weight_grad.register_autograd(_winograd_weight_grad_backward, setup_context=_save_tensor_inputs)


def _check_winograd_bf16(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """``x`` a bfloat16 input of ``weight`` ([C_out, C_in, 3, 3], float32 or bfloat16) that the
    bf16 Winograd kernel takes: whole blocks of channels, an even height and width."""
    _check_conv(x, weight, None, (torch.bfloat16,), (torch.float32, torch.bfloat16))
    if not _winograd_bf16.supports(weight.shape, 1, 1, x.shape[2], x.shape[3]):
        raise ValueError(f"{name} [N, C, H, W] and weight [C_out, C_in, 3, 3] must have C_in and C_out multiples of "
                         f"{_winograd_bf16.BLOCK} and an even H and W, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")


def _run_winograd_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       flipped_transposed: bool = False) -> torch.Tensor:
    """The bf16 Winograd conv (padding 1) of ``x`` with ``weight`` rounded to bfloat16
    (transformed here, each call: it changes every step), or with its flipped, transposed
    filters, bfloat16 channels-last output."""
    c_out = weight.shape[1] if flipped_transposed else weight.shape[0]
    bias = torch.zeros(c_out) if bias is None else bias.float().contiguous()
    packed = _winograd_bf16.pack_bf16_taps(weight.detach(), flipped_transposed)
    return _winograd_bf16.conv_winograd_bf16_unchecked(x.contiguous(memory_format=torch.channels_last), packed, bias,
                                                       False, False, torch.bfloat16, None)


@torch.library.custom_op("mtkernels::conv_winograd_bf16", mutates_args=())
def conv_winograd_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` of bfloat16 x and 3x3 weight (float32 or
    bfloat16; float32 weight and bias are rounded to bfloat16, as by ``.to(torch.bfloat16)``)
    by mtkernels' bf16 Winograd F(2x2, 3x3) kernel (float32 sums); bfloat16 channels-last
    output. The weight and bias gradients come back in the weight's and bias's dtypes: a
    float32 master weight gets the kernel's float32 gradient, never rounded to bfloat16."""
    _check_winograd_bf16("x", x, weight)
    if bias is not None and (bias.dtype not in (torch.float32, torch.bfloat16) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a float32 or bfloat16 tensor of shape ({weight.shape[0]},), got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    if bias is not None:
        bias = bias.to(torch.bfloat16)
    return _run_winograd_bf16(x, weight, bias)


@conv_winograd_bf16.register_fake
def _(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:])).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("mtkernels::conv_winograd_bf16_input_grad", mutates_args=())
def conv_winograd_bf16_input_grad(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d x of :func:`conv_winograd_bf16` given d y: the bf16 Winograd conv of ``grad_y`` with
    the flipped, transposed filters of ``weight`` rounded to bfloat16
    (``F.conv_transpose2d(grad_y, weight, padding=1)``)."""
    _check_winograd_bf16("grad_y", grad_y, weight.transpose(0, 1))
    return _run_winograd_bf16(grad_y, weight, None, flipped_transposed=True)


@conv_winograd_bf16_input_grad.register_fake
def _(grad_y, weight):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1], *grad_y.shape[2:])).contiguous(
        memory_format=torch.channels_last)


@torch.library.custom_op("mtkernels::conv_winograd_bf16_weight_grad", mutates_args=())
def conv_winograd_bf16_weight_grad(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """d weight [C_out, C_in, 3, 3] (float32) of :func:`conv_winograd_bf16` given its bfloat16
    input and d y, by mtkernels' bf16 Winograd weight-gradient kernel: d U = the sum over the
    tiles of V d M (each rounded to bfloat16, float32 sums), d weight = G^T d U G (float32)."""
    if not isinstance(grad_y, torch.Tensor) or grad_y.dim() != 4:
        raise ValueError(f"grad_y must be a 4-D [N, C_out, H, W] tensor, got "
                         f"{tuple(grad_y.shape) if isinstance(grad_y, torch.Tensor) else type(grad_y).__name__}")
    _check_winograd_bf16("x", x, x.new_empty((grad_y.shape[1], x.shape[1] if x.dim() == 4 else 0, 3, 3)))
    if grad_y.dtype != torch.bfloat16 or grad_y.device != x.device or grad_y.shape[0] != x.shape[0] \
            or grad_y.shape[2:] != x.shape[2:]:
        raise ValueError(f"grad_y must be a bfloat16 [{x.shape[0]}, C_out, {x.shape[2]}, {x.shape[3]}] tensor on "
                         f"{x.device} (x is {tuple(x.shape)}), got {grad_y.dtype} {tuple(grad_y.shape)} on "
                         f"{grad_y.device}")
    x = x.contiguous(memory_format=torch.channels_last)
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    n, c_in, h, w = x.shape
    c_out = grad_y.shape[1]
    grad = torch.empty(c_out, c_in, 3, 3)
    if _C.conv_winograd_bf16_weight_grad_nhwc(x.data_ptr(), grad_y.data_ptr(), grad.data_ptr(), n, h, w, c_in,
                                              c_out, torch.get_num_threads()):
        return grad
    # A NaN or inf in x or d y: the transforms spread it over every tap of the filters it meets,
    # where eager's direct sums leave finite the taps that never meet it (a corner pixel meets
    # 4 of 9). oneDNN's bf16 weight gradient, eager's own, gives its pattern.
    _, grad, _ = torch.ops.aten.convolution_backward(
        grad_y, x, x.new_empty((c_out, c_in, 3, 3)), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [False, True, False])
    return grad.float()


@conv_winograd_bf16_weight_grad.register_fake
def _(x, grad_y):
    return x.new_empty((grad_y.shape[1], x.shape[1], 3, 3), dtype=torch.float32)


def _winograd_bf16_backward(ctx, grad_y):
    """The input and weight gradients by the bf16 Winograd kernels; the bias gradient the sum
    of d y, in float32."""
    x, weight = ctx.saved_tensors
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    grad_x = conv_winograd_bf16_input_grad(grad_y, weight) if ctx.needs_input_grad[0] else None
    grad_weight = conv_winograd_bf16_weight_grad(x, grad_y).to(weight.dtype) if ctx.needs_input_grad[1] else None
    grad_bias = (grad_y.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
                 if ctx.has_bias and ctx.needs_input_grad[2] else None)
    return grad_x, grad_weight, grad_bias


conv_winograd_bf16.register_autograd(_winograd_bf16_backward, setup_context=_save_inputs)


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output height (or width) of a convolution over ``size`` input pixels."""
    return (size + 2 * padding - kernel) // stride + 1


def _im2col(x: torch.Tensor, kh: int, kw: int, stride: int, padding: int) -> torch.Tensor:
    """Channels-last ``x`` -> [N * OH * OW, KH * KW * C], columns ordered (ky, kx, c); a 1x1 /
    stride 1 layer's is x itself (a view)."""
    if (kh, kw, padding, stride) == (1, 1, 0, 1):
        n, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(n * h * w, c)
    return gemm_conv2d_im2col(x, kh, kw, stride, padding)


def _col2im(grad_cols: torch.Tensor, x_shape: torch.Size, kh: int, kw: int, stride: int,
            padding: int) -> torch.Tensor:
    """The adjoint of :func:`_im2col`: channels-last [N, C, H, W]."""
    if (kh, kw, padding, stride) == (1, 1, 0, 1):
        n, c, h, w = x_shape
        return grad_cols.view(n, h, w, c).permute(0, 3, 1, 2)
    return gemm_conv2d_col2im(grad_cols, list(x_shape), kh, kw, stride, padding)


def _check_geometry(shape, kh: int, kw: int, stride: int, padding: int) -> tuple[int, int]:
    """(OH, OW) of a kh x kw conv with ``stride`` and ``padding`` over an input of ``shape``
    ([N, C, H, W])."""
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"x's shape must be [N, C, H, W] with no negative size, got {list(shape)}")
    if kh < 1 or kw < 1 or stride < 1 or padding < 0:
        raise ValueError(f"kernel sizes and stride must be >= 1 and padding >= 0, got kernel {kh}x{kw}, "
                         f"stride={stride}, padding={padding}")
    oh, ow = conv_output_size(shape[2], kh, stride, padding), conv_output_size(shape[3], kw, stride, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} kernel with padding {padding} does not fit in x of size {shape[2]}x{shape[3]}")
    return oh, ow


@torch.library.custom_op("mtkernels::gemm_conv2d_im2col", mutates_args=())
def gemm_conv2d_im2col(x: torch.Tensor, kernel_h: int, kernel_w: int, stride: int, padding: int) -> torch.Tensor:
    """[N, C, H, W] float32 or bfloat16 CPU ``x`` -> [N * OH * OW, KH * KW * C]: every output
    pixel's receptive field as a row, columns ordered (ky, kx, c), zero outside x, in one pass
    (``_C.im2col_nhwc``)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"x must be a float32 or bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    oh, ow = _check_geometry(x.shape, kernel_h, kernel_w, stride, padding)
    n, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    cols = x.new_empty(n * oh * ow, kernel_h * kernel_w * c)
    _C.im2col_nhwc(x.data_ptr(), cols.data_ptr(), [n, h, w, c], kernel_h, kernel_w, stride, padding,
                   ELEMENTS[x.dtype], torch.get_num_threads())
    return cols


@gemm_conv2d_im2col.register_fake
def _(x, kernel_h, kernel_w, stride, padding):
    oh, ow = _check_geometry(x.shape, kernel_h, kernel_w, stride, padding)
    return x.new_empty(x.shape[0] * oh * ow, kernel_h * kernel_w * x.shape[1])


@torch.library.custom_op("mtkernels::gemm_conv2d_col2im", mutates_args=())
def gemm_conv2d_col2im(cols: torch.Tensor, x_shape: list[int], kernel_h: int, kernel_w: int, stride: int,
                       padding: int) -> torch.Tensor:
    """The adjoint of :func:`gemm_conv2d_im2col` for an input of ``x_shape`` [N, C, H, W]:
    each pixel the sum of the columns copied from it, in float32 in (ky, kx) order, rounded
    once (``_C.col2im_nhwc``); channels-last."""
    oh, ow = _check_geometry(x_shape, kernel_h, kernel_w, stride, padding)
    n, c, h, w = x_shape
    if cols.device.type != "cpu" or cols.dtype not in (torch.float32, torch.bfloat16) \
            or tuple(cols.shape) != (n * oh * ow, kernel_h * kernel_w * c):
        raise ValueError(f"cols must be a float32 or bfloat16 CPU tensor [{n * oh * ow}, {kernel_h * kernel_w * c}], "
                         f"got {cols.dtype} {tuple(cols.shape)} on {cols.device}")
    cols = cols.contiguous()
    grad = torch.empty((n, c, h, w), dtype=cols.dtype, memory_format=torch.channels_last)
    _C.col2im_nhwc(cols.data_ptr(), grad.data_ptr(), [n, h, w, c], kernel_h, kernel_w, stride, padding,
                   ELEMENTS[cols.dtype], torch.get_num_threads())
    return grad


@gemm_conv2d_col2im.register_fake
def _(cols, x_shape, kernel_h, kernel_w, stride, padding):
    return cols.new_empty(x_shape).contiguous(memory_format=torch.channels_last)


def _save_im2col_geometry(ctx, inputs, output):
    x, *geometry = inputs
    ctx.x_shape, ctx.geometry = list(x.shape), geometry


def _save_col2im_geometry(ctx, inputs, output):
    ctx.geometry = inputs[2:]  # after cols and x_shape


# Each is linear in its tensor and the other's adjoint: this makes gemm_conv2d twice differentiable.
gemm_conv2d_im2col.register_autograd(
    lambda ctx, grad: (gemm_conv2d_col2im(grad, ctx.x_shape, *ctx.geometry), None, None, None, None),
    setup_context=_save_im2col_geometry)
gemm_conv2d_col2im.register_autograd(
    lambda ctx, grad: (gemm_conv2d_im2col(grad, *ctx.geometry), None, None, None, None, None),
    setup_context=_save_col2im_geometry)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, KH, KW] -> [C_out, KH * KW * C_in], columns ordered as :func:`_im2col`'s."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


@torch.library.custom_op("mtkernels::gemm_conv2d", mutates_args=())
def gemm_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` as one GEMM over every output pixel of
    the batch, float32 or bfloat16 (float32 accumulation); channels-last output of x's dtype."""
    _check_conv(x, weight, bias, (torch.float32, torch.bfloat16))
    if stride < 1 or padding < 0:
        raise ValueError(f"stride must be >= 1 and padding >= 0, got stride={stride}, padding={padding}")
    kh, kw = weight.shape[2:]
    oh, ow = _check_geometry(x.shape, kh, kw, stride, padding)
    cols = _im2col(x.contiguous(memory_format=torch.channels_last), kh, kw, stride, padding)
    matrix = _weight_matrix(weight.detach())
    y = cols @ matrix.t() if bias is None else torch.addmm(bias, cols, matrix.t())
    return y.view(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2)


@gemm_conv2d.register_fake
def _(x, weight, bias, stride, padding):
    shape = (x.shape[0], weight.shape[0], conv_output_size(x.shape[2], weight.shape[2], stride, padding),
             conv_output_size(x.shape[3], weight.shape[3], stride, padding))
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def _gemm_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    stride, padding = ctx.geometry
    kh, kw = weight.shape[2:]
    rows = grad_y.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, weight.shape[0])
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _col2im(rows @ _weight_matrix(weight), x.shape, kh, kw, stride, padding)
    if ctx.needs_input_grad[1]:
        cols = _im2col(x.contiguous(memory_format=torch.channels_last), kh, kw, stride, padding)
        grad_weight = (rows.t() @ cols).view(weight.shape[0], kh, kw, -1).permute(0, 3, 1, 2)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = rows.sum(0)
    return grad_x, grad_weight, grad_bias, None, None


gemm_conv2d.register_autograd(_gemm_backward, setup_context=_save_inputs)
