"""Direct 3x3 bfloat16 convolution (``_C.conv3x3_bf16_nhwc``), checked and wrapped.

The reduced-precision layer chain runs it at small batches, where oneDNN's per-call set-up
costs as much as a small layer: bfloat16 activations and weights, float32 accumulation
(AVX512-BF16's ``vdpbf16ps`` where the CPU has it, float32 arithmetic elsewhere), bias, ReLU
and the 2x2 max-pool in the epilogue. Its input is zero-bordered (``[N, H + 2, W + 2, C]``)
so that no tap is bounds-checked; a layer writes straight into the interior of the next
layer's bordered input.
"""

from __future__ import annotations

import torch

from .. import _C
from .conv import ELEMENTS

BLOCK = _C.bf16_block_channels  # output channels per packed weight block


def even(channels: int) -> int:
    """The kernel's input channel count: odd counts get one zero channel."""
    return channels + channels % 2


def pack_conv3x3_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] float -> the kernel's bfloat16 pair layout
    [C_out / BLOCK, 9, even(C_in) / 2, BLOCK, 2] (an odd C_in padded with a zero channel)."""
    c_out, c_in, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or c_out % BLOCK:
        raise ValueError(f"weight must be [C_out, C_in, 3, 3] with C_out a multiple of {BLOCK}, "
                         f"got {tuple(weight.shape)}")
    w = torch.zeros((c_out, even(c_in), 3, 3), dtype=torch.bfloat16, device=weight.device)
    w[:, :c_in] = weight.detach()
    w = w.reshape(c_out // BLOCK, BLOCK, even(c_in) // 2, 2, 9)
    return w.permute(0, 4, 2, 1, 3).contiguous()


def bordered_input(n: int, h: int, w: int, channels: int) -> torch.Tensor:
    """A zero [N, H + 2, W + 2, even(C)] bfloat16 buffer: a conv3x3_bf16 input whose border
    (and padding channel) stay zero while its interior is written."""
    return torch.zeros((n, h + 2, w + 2, even(channels)), dtype=torch.bfloat16)


def fill_bordered(buffer: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Write ``x`` ([N, C, H, W], any float dtype and layout) into ``buffer``'s interior, rounded
    to bfloat16."""
    buffer[:, 1:-1, 1:-1, :x.shape[1]].copy_(x.permute(0, 2, 3, 1))
    return buffer


def conv3x3_bf16(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor, relu: bool = False,
                 pool: bool = False, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """3x3 / stride 1 / padding 1 conv of ``x`` ([N, C_in, H, W], rounded to bfloat16) with a
    ``pack_conv3x3_bf16_weight`` weight, + float32 ``bias`` (+ ReLU) (+ 2x2 max-pool), as a
    channels-last ``out_dtype`` (bfloat16 or float32) tensor."""
    if x.device.type != "cpu" or not x.dtype.is_floating_point or x.dim() != 4:
        raise TypeError(f"x must be a 4-D floating CPU tensor, got {x.dim()}-D {x.dtype} on {x.device}")
    n, c_in, h, w = x.shape
    if packed_weight.dtype != torch.bfloat16 or packed_weight.dim() != 5 or \
            tuple(packed_weight.shape[1:]) != (9, even(c_in) // 2, BLOCK, 2):
        raise ValueError(f"packed_weight must be pack_conv3x3_bf16_weight's layout for {c_in} input channels, "
                         f"got {packed_weight.dtype} {tuple(packed_weight.shape)}")
    c_out = packed_weight.shape[0] * BLOCK
    if bias.dtype != torch.float32 or tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias must be float32 [{c_out}], got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16, got {out_dtype}")
    if pool and (h % 2 or w % 2):
        raise ValueError(f"pool needs an even height and width, got {h}x{w}")
    src = fill_bordered(bordered_input(n, h, w, c_in), x)
    out_h, out_w = (h // 2, w // 2) if pool else (h, w)
    out = torch.empty((n, c_out, out_h, out_w), dtype=out_dtype, memory_format=torch.channels_last)
    packed_weight, bias = packed_weight.contiguous(), bias.contiguous()
    _C.conv3x3_bf16_nhwc(src.data_ptr(), packed_weight.data_ptr(), bias.data_ptr(), out.data_ptr(), n, h, w,
                         src.shape[3], c_out, 0, relu, pool, ELEMENTS[out_dtype], torch.get_num_threads())
    return out
