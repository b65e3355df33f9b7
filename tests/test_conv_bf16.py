"""The direct bfloat16 conv (mtkernels.ops.conv_bf16: 3x3 or 1x1, stride 1 or 2) per ISA
variant, against the float64 conv of the same bfloat16-rounded operands, within an error bound
derived from the float32 accumulation and the output's bfloat16 rounding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtkernels import _C
from mtkernels.ops.conv_bf16 import BLOCK, bordered_input, conv_bf16, pack_conv_bf16_weight

EPS_FP32 = 2.0 ** -24
U_BF16 = 2.0 ** -8

# (batch, C_in, C_out, H, W, pool, K, stride): odd channel counts (the first layer's one
# channel, padded to a pair), one block of output channels and several pairs of blocks, widths
# that leave tails after the 6-column tiles, an odd height (a one-row band), BKNet's own
# layers, ResNet's 1x1 and strided convs (odd sizes: the last row / column of a stride-2 3x3
# conv reads the bottom / right border), maps narrower than a tile (four channel blocks).
SHAPES = [
    (1, 1, 32, 48, 48, False, 3, 1),
    (2, 3, 16, 7, 9, False, 3, 1),
    (1, 32, 32, 48, 48, True, 3, 1),
    (3, 64, 48, 10, 14, True, 3, 1),
    (2, 64, 128, 12, 12, False, 3, 1),
    (1, 256, 256, 6, 6, True, 3, 1),
    (1, 5, 64, 1, 1, False, 3, 1),
    (2, 64, 64, 24, 24, False, 1, 1),
    (1, 256, 128, 7, 9, False, 1, 2),
    (2, 32, 32, 12, 12, False, 3, 2),
    (1, 16, 32, 7, 11, False, 3, 2),
    (1, 8, 16, 8, 8, True, 3, 2),
    (1, 64, 128, 3, 3, False, 3, 1),
    (2, 32, 64, 4, 4, True, 3, 1),
    (3, 128, 64, 3, 3, False, 1, 1),
]


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool, pool: bool,
              stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 conv of the bfloat16-rounded x and weight, and the conv of |x|, |w| plus |b|
    (what the accumulation's error is relative to), each through the same ReLU and pool."""
    x64, w64 = x.bfloat16().double(), weight.bfloat16().double()
    padding = weight.shape[2] // 2
    exact = F.conv2d(x64, w64, bias.double(), stride=stride, padding=padding)
    magnitude = F.conv2d(x64.abs(), w64.abs(), bias.double().abs(), stride=stride, padding=padding)
    if relu:
        exact = exact.relu()
    if pool:
        exact, magnitude = F.max_pool2d(exact, 2), F.max_pool2d(magnitude, 2)
    return exact, magnitude


def accumulation_bound(magnitude: torch.Tensor, c_in: int, taps: int = 9) -> torch.Tensor:
    """Products of two bfloat16 values are exact in float32; the bias and the taps * C_in
    products are summed by float32 additions, whatever their order, with an error of at most
    gamma_K = K eps / (1 - K eps) of the sum of magnitudes (Higham, Accuracy and Stability,
    3.1). ReLU and max-pool are 1-Lipschitz, so the window's largest bound covers its maximum."""
    k = taps * (c_in + c_in % 2) + 1
    return k * EPS_FP32 / (1 - k * EPS_FP32) * magnitude


@pytest.mark.parametrize("batch,c_in,c_out,height,width,pool,kernel,stride", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64_within_the_derived_bound(isa, batch, c_in, c_out, height, width, pool, kernel, stride, relu):
    torch.manual_seed(c_in * 1000 + c_out + height)
    x = torch.randn(batch, c_in, height, width)
    weight = torch.randn(c_out, c_in, kernel, kernel) / math.sqrt(kernel * kernel * c_in)
    bias = torch.randn(c_out)
    exact, magnitude = reference(x, weight, bias, relu, pool, stride)
    bound = accumulation_bound(magnitude, c_in, kernel * kernel)
    packed = pack_conv_bf16_weight(weight)

    out32 = conv_bf16(x, packed, bias, relu, pool, out_dtype=torch.float32, stride=stride)
    assert out32.dtype == torch.float32 and out32.shape == exact.shape
    excess = (out32.double() - exact).abs() - bound
    assert float(excess.max()) <= 0, f"float32 output exceeds the bound by {float(excess.max()):.3g}"

    # A bfloat16 output adds one rounding to nearest: u of the computed value.
    out16 = conv_bf16(x, packed, bias, relu, pool, stride=stride)
    assert out16.dtype == torch.bfloat16 and out16.is_contiguous(memory_format=torch.channels_last)
    excess = (out16.double() - exact).abs() - (U_BF16 * (exact.abs() + bound) + bound)
    assert float(excess.max()) <= 0, f"bfloat16 output exceeds the bound by {float(excess.max()):.3g}"
    assert torch.equal(out16, out32.bfloat16()), "the bfloat16 output is not the float32 one rounded to nearest"


def test_the_bound_catches_a_bfloat16_accumulation():
    """The bfloat16-output bound fails a conv that accumulates in bfloat16 (each partial sum
    rounded: the typical reduced-precision kernel bug), while the kernel passes it."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 64, 6, 6), torch.randn(64, 64, 3, 3) / 24, torch.randn(64)
    exact, magnitude = reference(x, weight, bias, relu=False, pool=False)
    bound = accumulation_bound(magnitude, 64)
    bound = U_BF16 * (exact.abs() + bound) + bound
    columns = F.unfold(x.bfloat16().float(), 3, padding=1)[0]  # [C_in * 9, pixels]
    rows = weight.bfloat16().float().reshape(64, -1)  # [C_out, C_in * 9]
    partial = bias.bfloat16().float().unsqueeze(1).expand(64, columns.shape[1])
    for k in range(columns.shape[0]):
        partial = (partial + rows[:, k:k + 1] * columns[k]).bfloat16().float()
    bf16_accumulated = partial.reshape(exact.shape).double()
    assert float(((bf16_accumulated - exact).abs() - bound).max()) > 0
    out = conv_bf16(x, pack_conv_bf16_weight(weight), bias)
    assert float(((out.double() - exact).abs() - bound).max()) <= 0


def non_finite_inputs(channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [2, channels, 8, 8] with a NaN, an inf and a -inf pixel, a 3x3 weight to 32
    channels, a bias)."""
    torch.manual_seed(1)
    x, weight, bias = torch.randn(2, channels, 8, 8), torch.randn(32, channels, 3, 3), torch.randn(32)
    x[0, 1, 2, 3] = math.nan
    x[1, 2, 6, 6] = math.inf
    x[1, 0, 0, 0] = -math.inf
    return x, weight, bias


@pytest.mark.parametrize("pool", [True, False])
def test_nan_and_inf_propagate_as_in_pytorch(isa, pool):
    """A NaN or inf input reaches exactly the outputs whose window holds it, through the ReLU
    and the pool, as in eager PyTorch (the kernel's max and ReLU keep NaN)."""
    x, weight, bias = non_finite_inputs(4)
    exact, _ = reference(x, weight, bias, relu=True, pool=pool)
    out = conv_bf16(x, pack_conv_bf16_weight(weight), bias, relu=True, pool=pool, out_dtype=torch.float32)
    assert torch.isnan(exact).any() and torch.isinf(exact).any()
    assert torch.equal(torch.isnan(out), torch.isnan(exact))
    assert torch.equal(torch.isposinf(out), torch.isposinf(exact))


def test_packing_is_the_pair_layout():
    """weight[b][ky * 3 + kx][ci / 2][j][ci % 2] = w[b * BLOCK + j][ci][ky][kx] (an odd C_in
    padded with zeros), checked element by element."""
    weight = torch.arange(2 * BLOCK * 3 * 9, dtype=torch.float32).reshape(2 * BLOCK, 3, 3, 3)
    packed = pack_conv_bf16_weight(weight)
    assert packed.shape == (2, 9, 2, BLOCK, 2) and packed.dtype == torch.bfloat16
    for b, tap, ci, j in [(0, 0, 0, 0), (1, 4, 2, 5), (1, 8, 1, 15), (0, 3, 2, 7)]:
        assert packed[b, tap, ci // 2, j, ci % 2] == weight[b * BLOCK + j, ci, tap // 3, tap % 3].bfloat16()
    assert torch.all(packed[:, :, 1, :, 1] == 0)  # the padding channel


def assert_the_border_is_left_alone(conv) -> None:
    """``conv(src, bias, dst)`` (a bf16 conv of a bordered 6x6x16 src to 32 channels, ReLU and
    pool, dst_pad = 1) writes the interior of the bordered dst: its border stays as it was."""
    torch.manual_seed(2)
    src = bordered_input(1, 6, 6, 16)
    src[:, 1:-1, 1:-1].normal_()
    bias = torch.randn(32)
    dst = torch.full((1, 5, 5, 32), 7.0, dtype=torch.bfloat16)  # 3x3 pooled output, border 1
    conv(src, bias, dst)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert torch.all(dst[0][border] == 7.0) and not torch.all(dst[0, 1:-1, 1:-1] == 7.0)


def test_the_border_is_left_alone():
    weight = pack_conv_bf16_weight(torch.randn(32, 16, 3, 3))
    assert_the_border_is_left_alone(lambda src, bias, dst: _C.conv_bf16_nhwc(
        src.data_ptr(), weight.data_ptr(), bias.data_ptr(), dst.data_ptr(), 1, 6, 6, 16, 32, 3, 1, 1, True, True, 1, 1))


def test_bad_arguments_are_refused():
    x, weight, bias = torch.randn(1, 4, 6, 6), pack_conv_bf16_weight(torch.randn(16, 4, 3, 3)), torch.zeros(16)
    with pytest.raises(ValueError, match="C_out a multiple"):
        pack_conv_bf16_weight(torch.randn(20, 4, 3, 3))
    with pytest.raises(ValueError, match="K 1 or 3"):
        pack_conv_bf16_weight(torch.randn(16, 4, 5, 5))
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        conv_bf16(x, weight, bias, stride=3)
    with pytest.raises(ValueError, match="packed_weight must be"):
        conv_bf16(torch.randn(1, 6, 6, 6), weight, bias)
    with pytest.raises(ValueError, match=r"bias must be float32 \[16\]"):
        conv_bf16(x, weight, torch.zeros(8))
    with pytest.raises(ValueError, match="pool needs an even output height and width, got 5x6"):
        conv_bf16(torch.randn(1, 4, 5, 6), weight, bias, pool=True)
    with pytest.raises(ValueError, match="out_dtype must be"):
        conv_bf16(x, weight, bias, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="x must be a 4-D floating CPU tensor"):
        conv_bf16(x[0], weight, bias)
    with pytest.raises(ValueError, match="in_channels must be even"):
        _C.conv_bf16_nhwc(0, 0, 0, 0, 1, 6, 6, 3, 16, 3, 1, 0, False, False, 1, 1)
    with pytest.raises(ValueError, match="out_channels must be a multiple"):
        _C.conv_bf16_nhwc(0, 0, 0, 0, 1, 6, 6, 4, 20, 3, 1, 0, False, False, 1, 1)
    with pytest.raises(ValueError, match="kernel_size must be 1 or 3"):
        _C.conv_bf16_nhwc(0, 0, 0, 0, 1, 6, 6, 4, 16, 5, 1, 0, False, False, 1, 1)
