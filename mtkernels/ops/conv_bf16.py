"""Direct bfloat16 convolution (``_C.conv_bf16_nhwc``), checked and wrapped.

At small batches oneDNN's per-call set-up costs as much as a small layer; this kernel runs
3x3 (padding 1) and 1x1 convolutions, stride 1 or 2, of bfloat16 NHWC activations with
bfloat16 weights and float32 accumulation (AVX512-BF16's ``vdpbf16ps`` where the CPU has it,
float32 arithmetic elsewhere), with bias, ReLU and the 2x2 max-pool in the epilogue. A 3x3
conv's input is zero-bordered (``[N, H + 2, W + 2, C]``) so that no tap is bounds-checked; in
a layer chain each 3x3 conv writes straight into the interior of the next one's bordered
input.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from .conv import ELEMENTS

BLOCK = _C.bf16_block_channels  # output channels per packed weight block


def even(channels: int) -> int:
    """The kernel's input channel count: odd counts get one zero channel."""
    return channels + channels % 2


def supports(weight_shape: torch.Size, stride: int, padding: int) -> bool:
    """Whether the kernel runs a conv of this weight shape, stride and padding (groups 1,
    dilation 1): 3x3 with padding 1 or 1x1 without, stride 1 or 2, whole blocks of outputs."""
    c_out, _, kh, kw = weight_shape
    return (kh == kw and (kh, padding) in ((3, 1), (1, 0)) and stride in (1, 2) and c_out % BLOCK == 0)


def output_size(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


def pack_conv_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, K, K] float (K = 1 or 3) -> the kernel's bfloat16 pair layout
    [C_out / BLOCK, K * K, even(C_in) / 2, BLOCK, 2] (an odd C_in padded with a zero channel)."""
    c_out, c_in, kh, kw = weight.shape
    if kh != kw or kh not in (1, 3) or c_out % BLOCK:
        raise ValueError(f"weight must be [C_out, C_in, K, K] with K 1 or 3 and C_out a multiple of {BLOCK}, "
                         f"got {tuple(weight.shape)}")
    return pack_pairs(weight)


def pack_pairs(taps: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, KH, KW] float, C_out a multiple of BLOCK -> bfloat16 (rounded to nearest
    even) [C_out / BLOCK, KH * KW, even(C_in) / 2, BLOCK, 2]: per block of output channels and
    tap, input-channel pairs side by side, as the bf16 dot-product instruction reads them."""
    c_out, c_in, kh, kw = taps.shape
    if c_in % 2:
        w = torch.zeros((c_out, even(c_in), kh, kw), dtype=torch.bfloat16, device=taps.device)
        w[:, :c_in] = taps.detach()
    else:
        w = taps.detach().to(torch.bfloat16)
    w = w.reshape(c_out // BLOCK, BLOCK, even(c_in) // 2, 2, kh * kw)
    return w.permute(0, 4, 2, 1, 3).contiguous()


def bordered_input(n: int, h: int, w: int, channels: int, border: int = 1) -> torch.Tensor:
    """A [N, H + 2 border, W + 2 border, even(C)] bfloat16 buffer whose border (and padding
    channel) are zero and stay zero while its interior is written; the interior is left
    uninitialised (a training step's buffers are new each call: zeroing all of them cost as
    much as a small conv)."""
    buffer = torch.empty((n, h + 2 * border, w + 2 * border, even(channels)), dtype=torch.bfloat16)
    if border:
        for side in (buffer[:, :border], buffer[:, -border:], buffer[:, :, :border], buffer[:, :, -border:]):
            side.zero_()
    buffer[..., channels:].zero_()
    return buffer


def fill_bordered(buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Write ``x`` ([N, C, H, W], any float dtype and layout) into ``buffer``'s interior, rounded
    to bfloat16."""
    border = (buffer.shape[1] - x.shape[2]) // 2
    interior = buffer[:, border:buffer.shape[1] - border, border:buffer.shape[2] - border, :x.shape[1]]
    interior.copy_(x.permute(0, 2, 3, 1))
    return buffer


def conv_bf16(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor, relu: bool = False,
              pool: bool = False, out_dtype: torch.dtype = torch.bfloat16, stride: int = 1,
              buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Conv of ``x`` ([N, C_in, H, W], rounded to bfloat16) with a ``pack_conv_bf16_weight``
    weight (3x3: padding 1; 1x1: none), ``stride`` 1 or 2, + float32 ``bias`` (+ ReLU) (+ 2x2
    max-pool), as a channels-last ``out_dtype`` (bfloat16 or float32) tensor. ``buffer``: the
    kernel's input buffer to reuse (``bordered_input``'s shape, border 1 for 3x3, 0 for 1x1)."""
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    kernel_size = 3 if packed_weight.dim() == 5 and packed_weight.shape[1] == 9 else 1
    check_arguments(x, packed_weight, (1, 9), "pack_conv_bf16_weight", bias, pool, out_dtype, stride, buffer,
                    kernel_size // 2)
    return conv_bf16_unchecked(x, packed_weight.contiguous(), bias.contiguous(), relu, pool, out_dtype, stride,
                               buffer)


def check_arguments(x: torch.Tensor, packed_weight: torch.Tensor, taps: tuple[int, ...], packer: str,
                    bias: torch.Tensor, pool: bool, out_dtype: torch.dtype, stride: int,
                    buffer: Optional[torch.Tensor], border: int) -> None:
    """The checks of a bf16 conv's arguments (``conv_bf16``, ``conv_winograd_bf16``): ``taps``,
    the packed weight's allowed tap counts; ``packer``, the function that packs it."""
    if x.device.type != "cpu" or not x.dtype.is_floating_point or x.dim() != 4:
        raise TypeError(f"x must be a 4-D floating CPU tensor, got {x.dim()}-D {x.dtype} on {x.device}")
    n, c_in, h, w = x.shape
    if packed_weight.dtype != torch.bfloat16 or packed_weight.dim() != 5 or packed_weight.shape[1] not in taps \
            or tuple(packed_weight.shape[2:]) != (even(c_in) // 2, BLOCK, 2):
        raise ValueError(f"packed_weight must be {packer}'s layout for {c_in} input channels, "
                         f"got {packed_weight.dtype} {tuple(packed_weight.shape)}")
    c_out = packed_weight.shape[0] * BLOCK
    if bias.dtype != torch.float32 or tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must be float32 [{c_out}], got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    out_h, out_w = output_size(h, stride), output_size(w, stride)
    if pool and (out_h % 2 or out_w % 2):
        raise ValueError(f"pool needs an even output height and width, got {out_h}x{out_w}")
    if buffer is not None and (buffer.shape != (n, h + 2 * border, w + 2 * border, even(c_in))
                               or buffer.dtype != torch.bfloat16):
        raise ValueError(f"buffer must be bfloat16 {(n, h + 2 * border, w + 2 * border, even(c_in))}, "
                         f"got {buffer.dtype} {tuple(buffer.shape)}")


def output_tensor(n: int, c_out: int, h: int, w: int, pool: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """A conv's output of ``h`` x ``w`` (halved by the pool) as an NCHW view of channels-last memory."""
    if pool:
        h, w = h // 2, w // 2
    return torch.empty((n, h, w, c_out), dtype=out_dtype).permute(0, 3, 1, 2)


def conv_bf16_unchecked(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor, relu: bool, pool: bool,
                        out_dtype: torch.dtype, stride: int, buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`conv_bf16` without the argument checks (contiguous weight and bias), for a fused
    layer whose arguments were checked when it was built: at batch 1 the checks cost a third
    of a small layer."""
    n, c_in, h, w = x.shape
    kernel_size = 3 if packed_weight.shape[1] == 9 else 1
    c_out = packed_weight.shape[0] * BLOCK
    if kernel_size == 1 and c_in % 2 == 0:
        src = x.to(torch.bfloat16).permute(0, 2, 3, 1).contiguous()  # a channels-last bf16 x: no copy
    else:
        src = fill_bordered(bordered_input(n, h, w, c_in, kernel_size // 2) if buffer is None else buffer, x)
    out = output_tensor(n, c_out, output_size(h, stride), output_size(w, stride), pool, out_dtype)
    shape = (n, h, w)
    pixels = n * h * w
    if kernel_size == 1 and stride == 1 and not pool and pixels >= 24:
        # Pixels are independent: the batch as one image of two rows fills whole 2x6 tiles
        # whatever the map's width (a 9-pixel map stays 3x3: the kernel's narrow-map tiles).
        shape = (1, 2, pixels // 2) if pixels % 2 == 0 else (1, 1, pixels)
    _C.conv_bf16_nhwc(src.data_ptr(), packed_weight.data_ptr(), bias.data_ptr(), out.data_ptr(), *shape,
                      src.shape[3], c_out, kernel_size, stride, 0, relu, pool, ELEMENTS[out_dtype],
                      torch.get_num_threads())
    return out
