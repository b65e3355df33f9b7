"""Winograd F(2x2, 3x3) bfloat16 convolution (``_C.conv_winograd_bf16_nhwc``), checked and
wrapped.

A 3x3 conv (padding 1, stride 1) as 16 products per 2x2 output tile and input channel, where
the direct conv (``conv_bf16``) takes 36: each 4x4 input patch ``d`` becomes ``B^T d B`` and
the weight ``g`` becomes ``G g G^T`` (computed here in float64), both rounded to bfloat16 for
the dot-product instruction; the products are summed in float32 and the tile is
``A^T M A``. The transforms add to bfloat16's rounding error (the products are of transformed
values, up to 4x the magnitude of the inputs): tests/test_conv_winograd_bf16.py derives the
bound. The input is ``conv_bf16``'s zero-bordered buffer, so a layer chain can mix the two,
or a bfloat16 channels-last tensor read where it is.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from .conv import ELEMENTS
from .conv_bf16 import BLOCK, bordered_input, check_arguments, fill_bordered, output_tensor, pack_pairs

# F(2x2, 3x3): input, weight and output transforms.
B_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
A_T = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)


def supports(weight_shape: torch.Size, stride: int, padding: int, height: int, width: int) -> bool:
    """Whether the kernel runs a conv of this weight shape, stride, padding (groups 1, dilation
    1) and input size: 3x3, padding 1, stride 1, whole blocks of input and output channels,
    an even height and width (whole 2x2 tiles)."""
    c_out, c_in, kh, kw = weight_shape
    return ((kh, kw, stride, padding) == (3, 3, 1, 1) and c_out % BLOCK == 0 and c_in % BLOCK == 0
            and height % 2 == 0 and width % 2 == 0)


def pack_conv_winograd_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] float -> U = G g G^T rounded to bfloat16, in the pair layout
    [C_out / BLOCK, 16, C_in / 2, BLOCK, 2] (C_in, C_out multiples of BLOCK). U is computed in
    float64; a bfloat16 CPU weight's by :func:`pack_bf16_taps`."""
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        return pack_bf16_taps(weight)
    _check_weight(weight)
    # vec(G g G^T) = (G kron G) vec(g): one GEMM for all filters (batched per-filter 4x3
    # products took twice as long).
    u = weight.detach().reshape(-1, 9).double() @ torch.kron(G, G).to(weight.device).T
    return pack_pairs(u.reshape(*weight.shape[:2], 4, 4))


def pack_bf16_taps(weight: torch.Tensor, flipped_transposed: bool = False) -> torch.Tensor:
    """:func:`pack_conv_winograd_bf16_weight` of ``weight`` rounded to bfloat16 (a float32 or
    bfloat16 CPU tensor of any strides: training's weight, which changes every step), by
    ``_C.conv_winograd_bf16_weight_pack``: U in float32 (each product of a bfloat16 tap with
    G's entries is exact, each sum of at most three terms, in two stages, rounds: at most
    gamma_4 of |G||g||G^T|), rounded to bfloat16, written straight into the pair layout.
    ``flipped_transposed``: the filters the input gradient is convolved with (each flipped,
    C_in and C_out swapped: [C_in / BLOCK, 16, C_out / 2, BLOCK, 2]), from the same U (G flip(g)
    G^T is U with rows and columns 0 and 3 swapped)."""
    _check_weight(weight)
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"weight must be a float32 or bfloat16 CPU tensor, got {weight.dtype} on {weight.device}")
    c_out, c_in = weight.shape[:2]
    outs, ins = (c_in, c_out) if flipped_transposed else (c_out, c_in)
    packed = torch.empty((outs // BLOCK, 16, ins // 2, BLOCK, 2), dtype=torch.bfloat16)
    _C.conv_winograd_bf16_weight_pack(weight.data_ptr(), list(weight.stride()), ELEMENTS[weight.dtype],
                                      packed.data_ptr(), c_out, c_in, flipped_transposed, torch.get_num_threads())
    return packed


def _check_weight(weight: torch.Tensor) -> None:
    c_out, c_in, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or c_out % BLOCK or c_in % BLOCK:
        raise ValueError(f"weight must be [C_out, C_in, 3, 3] with C_in and C_out multiples of {BLOCK}, "
                         f"got {tuple(weight.shape)}")


def conv_winograd_bf16(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor, relu: bool = False,
                       pool: bool = False, out_dtype: torch.dtype = torch.bfloat16,
                       buffer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """3x3 conv (padding 1, stride 1) of ``x`` ([N, C_in, H, W], H and W even, rounded to
    bfloat16) with a ``pack_conv_winograd_bf16_weight`` weight, + float32 ``bias`` (+ ReLU)
    (+ 2x2 max-pool), as a channels-last ``out_dtype`` (bfloat16 or float32) tensor.
    ``buffer``: a zero-bordered input buffer (``bordered_input``'s shape) to copy ``x`` into and
    reuse; without one, a bfloat16 channels-last ``x`` is read where it is (the tiles at its
    edges check their rows and columns) and any other ``x`` is copied into a new buffer."""
    check_arguments(x, packed_weight, (16,), "pack_conv_winograd_bf16_weight", bias, pool, out_dtype, 1, buffer, 1)
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"x's height and width must be even, got {x.shape[2]}x{x.shape[3]}")
    return conv_winograd_bf16_unchecked(x, packed_weight.contiguous(), bias.contiguous(), relu, pool, out_dtype,
                                        buffer)


def conv_winograd_bf16_unchecked(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor, relu: bool,
                                 pool: bool, out_dtype: torch.dtype, buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`conv_winograd_bf16` without the argument checks (contiguous weight and bias), for
    a fused layer whose arguments were checked when it was built."""
    n, c_in, h, w = x.shape
    in_place = buffer is None and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    src = x if in_place else fill_bordered(bordered_input(n, h, w, c_in) if buffer is None else buffer, x)
    c_out = packed_weight.shape[0] * BLOCK
    out = output_tensor(n, c_out, h, w, pool, out_dtype)
    _C.conv_winograd_bf16_nhwc(src.data_ptr(), packed_weight.data_ptr(), bias.data_ptr(), out.data_ptr(), n, h, w,
                               c_in, c_out, 0, relu, pool, ELEMENTS[out_dtype], torch.get_num_threads(),
                               src_bordered=not in_place)
    return out
