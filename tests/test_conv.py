"""CPU NHWC kernels of the inference path (csrc/conv_kernel.cpp via mtkernels.ops.conv)
against PyTorch's own ops, for every ISA variant this CPU runs."""

import pytest
import torch
import torch.nn.functional as F

from mtkernels.ops.conv import (
    affine_relu,
    conv3x3_single_channel,
    grouped_linear,
    maxpool2x2,
    winograd_conv3x3_bias_act,
    winograd_conv3x3_one_pass,
    winograd_weight,
    winograd_weight_blocked,
)


@pytest.mark.parametrize("shape", [(1, 32, 48, 48), (3, 5, 7, 9), (2, 256, 6, 6), (1, 1, 2, 2), (130, 8, 4, 4)])
def test_maxpool_matches_torch(isa, shape):
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    got = maxpool2x2(x)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, F.max_pool2d(x, 2, 2))


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape,c_out", [((1, 1, 48, 48), 32), ((3, 1, 5, 7), 13), ((130, 1, 8, 8), 16)])
def test_single_channel_conv_matches_torch(isa, shape, c_out, relu):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(shape, generator=g), torch.randn(c_out, 1, 3, 3, generator=g)
    bias = torch.randn(c_out, generator=g)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    want = F.relu(want) if relu else want
    k_major = weight.permute(2, 3, 1, 0).reshape(9, c_out)
    got = conv3x3_single_channel(x, k_major, bias, relu)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 256, 6, 6), (3, 5, 7, 9), (1, 19, 1, 1)])
def test_affine_relu_rounds_once(isa, dtype, shape):
    """relu(x scale + shift) from float32 coefficients: one float32 multiply-add (2 eps of the
    |terms|), then one rounding to x's dtype (u of the result); NaN and inf as PyTorch's."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, :3, 0, 0] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    scale, shift = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
    got = affine_relu(x, scale, shift)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    x64, s64, t64 = x.double(), scale.double().view(1, -1, 1, 1), shift.double().view(1, -1, 1, 1)
    want = F.relu(x64 * s64 + t64)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    bound = u * want.abs() + (1 + u) * 2 * 2.0 ** -24 * ((x64 * s64).abs() + t64.abs())
    assert bool(((got.double() - want).abs() <= bound)[finite].all())


def test_bad_inputs_are_reported():
    with pytest.raises(TypeError, match="float32, bfloat16 or uint8 CPU tensor, got 4-D torch.float64"):
        maxpool2x2(torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shift must be float32 with 3 values, got torch.float32 \(2,\)"):
        affine_relu(torch.zeros(1, 3, 2, 2), torch.ones(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        conv3x3_single_channel(torch.zeros(1, 2, 4, 4), torch.zeros(9, 3), torch.zeros(3), True)
    with pytest.raises(ValueError, match=r"weight_k_major must be \[9, C_out\]"):
        conv3x3_single_channel(torch.zeros(1, 1, 4, 4), torch.zeros(8, 3), torch.zeros(3), True)
    u = winograd_weight(torch.zeros(3, 2, 3, 3))
    with pytest.raises(ValueError, match="needs an even height and width, got 5x4"):
        winograd_conv3x3_bias_act(torch.zeros(1, 2, 5, 4), u, torch.zeros(3), True, True)
    with pytest.raises(ValueError, match=r"u must be \[16, C_in, C_out\]"):
        winograd_conv3x3_bias_act(torch.zeros(1, 2, 4, 4), u[:9], torch.zeros(3), True, False)
    with pytest.raises(ValueError, match=r"weight must be \[C_out, C_in, 3, 3\]"):
        winograd_weight(torch.zeros(3, 2, 5, 5))
    blocked = winograd_weight_blocked(u)
    with pytest.raises(ValueError, match=r"u_blocked must be \[blocks, 16, C_in, 32\]"):
        winograd_conv3x3_one_pass(torch.zeros(1, 2, 4, 4), u, torch.zeros(3), True, False)
    with pytest.raises(ValueError, match=r"bias must be \[C_out\] with C_out output channels in 1 blocks of 32"):
        winograd_conv3x3_one_pass(torch.zeros(1, 2, 4, 4), blocked, torch.zeros(33), True, False)
    with pytest.raises(ValueError, match=r"\[N, 2, H, W\]"):
        winograd_conv3x3_one_pass(torch.zeros(1, 3, 4, 4), blocked, torch.zeros(3), True, False)
    with pytest.raises(ValueError, match="images_per_chunk must be >= 1, got 0"):
        winograd_conv3x3_one_pass(torch.zeros(1, 2, 4, 4), blocked, torch.zeros(3), True, False, images_per_chunk=0)
    with pytest.raises(ValueError, match=r"G \* in = 6"):
        grouped_linear(torch.zeros(2, 6), torch.zeros(2, 4, 2), torch.zeros(8), True)
    with pytest.raises(TypeError, match="2-D float32 CPU tensor"):
        grouped_linear(torch.zeros(2, 6, dtype=torch.float64), torch.zeros(1, 4, 6), torch.zeros(4), True)


# Winograd F(2x2, 3x3) rounds differently from a direct convolution: its error is bounded
# relative to the convolution of the absolute values, sum |w| |x|, not to the result (which
# may cancel to near zero). The constant covers the transforms' few extra float32 roundings.
WINOGRAD_RELATIVE_BOUND = 1e-6


@pytest.mark.parametrize("one_pass", [False, True], ids=["torch-gemm", "one-pass"])
@pytest.mark.parametrize("relu,pool", [(True, True), (True, False), (False, False), (False, True)])
@pytest.mark.parametrize("shape,c_out,chunk", [((1, 32, 48, 48), 32, None), ((3, 5, 7, 9), 6, 2),
                                               ((2, 256, 6, 6), 256, None), ((5, 16, 2, 2), 8, 1),
                                               ((4, 3, 8, 6), 4, 3), ((3, 8, 10, 12), 70, 2),
                                               ((67, 4, 4, 4), 33, None)])
def test_winograd_conv_within_its_error_bound(isa, shape, c_out, chunk, relu, pool, one_pass):
    if pool and (shape[2] % 2 or shape[3] % 2):
        pytest.skip("the fused pool needs even sizes (checked in test_bad_inputs_are_reported)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(c_out, shape[1], 3, 3, generator=g), torch.randn(c_out, generator=g)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    scale = F.conv2d(x.double().abs(), weight.double().abs(), bias.double().abs(), padding=1)
    want = F.relu(want) if relu else want
    if pool:
        want, scale = F.max_pool2d(want, 2, 2), F.max_pool2d(scale, 2, 2)
    u = winograd_weight(weight)
    if one_pass:  # 70 and 33 channels: blocks of 32 with a partial last block; 67 images: many tile groups
        got = winograd_conv3x3_one_pass(x, winograd_weight_blocked(u), bias, relu, pool, images_per_chunk=chunk)
    else:
        got = winograd_conv3x3_bias_act(x, u, bias, relu, pool, images_per_chunk=chunk)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.shape == want.shape
    assert ((got.double() - want).abs() <= WINOGRAD_RELATIVE_BOUND * scale).all()


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("batch,groups,width_in,width_out", [(1, 1, 2304, 768), (7, 3, 256, 256), (3, 2, 5, 1),
                                                             (0, 1, 4, 4), (130, 1, 33, 17)])
def test_grouped_linear_matches_torch(isa, batch, groups, width_in, width_out, relu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, groups * width_in, generator=g)
    weight, bias = torch.randn(groups, width_out, width_in, generator=g), torch.randn(groups * width_out, generator=g)
    want = torch.cat([x[:, k * width_in:(k + 1) * width_in].double() @ weight[k].double().t() for k in range(groups)],
                     dim=1) + bias.double()
    want = F.relu(want) if relu else want
    got = grouped_linear(x, weight, bias, relu)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


# Non-finite values: each kernel's output is non-finite exactly where PyTorch's own ops
# (float64, eager) give a non-finite value, NaN where they give NaN. A SIMD max(x, 0) or a
# max-pool built on maxps returns the other operand for NaN and would hide a corrupt input.
def assert_same_non_finite(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert finite.any()
    torch.testing.assert_close(got.double()[finite], want.double()[finite], rtol=1e-4, atol=1e-3)


NON_FINITE = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("corner", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_maxpool_propagates_non_finite_from_every_corner(isa, corner, value):
    x = torch.randn(2, 19, 6, 8).to(memory_format=torch.channels_last)
    x[1, 3, 2 + corner[0], 4 + corner[1]] = value
    x[0, 18, corner[0], corner[1]] = value
    assert_same_non_finite(maxpool2x2(x), F.max_pool2d(x.double(), 2, 2))


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("relu", [True, False])
def test_single_channel_conv_propagates_non_finite(isa, relu, value):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 1, 9, 7, generator=g), torch.randn(16, 1, 3, 3, generator=g), torch.randn(16)
    x[1, 0, 4, 3] = value
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    want = F.relu(want) if relu else want
    from mtkernels.ops.conv import conv_weight_k_major

    assert_same_non_finite(conv3x3_single_channel(x, conv_weight_k_major(weight), bias, relu), want)


def winograd_nan_reach(x: torch.Tensor, c_out: int, pool: bool) -> torch.Tensor:
    """Outputs a Winograd F(2x2, 3x3) conv of ``x`` may make NaN: every output of a 2x2 block
    whose 4x4 input tile holds a NaN (the transforms mix the whole tile), a superset of the
    3x3 neighbourhoods eager reaches."""
    n, _, h, w = x.shape
    nan = F.pad(torch.isnan(x).any(1, keepdim=True).double(), (1, 1 + w % 2, 1, 1 + h % 2))
    tiles = F.max_pool2d(nan, 4, stride=2) > 0  # [N, 1, ceil(H / 2), ceil(W / 2)]
    if not pool:
        tiles = tiles.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :h, :w]
    return tiles.expand(-1, c_out, -1, -1)


def assert_winograd_nan(got: torch.Tensor, want: torch.Tensor, reach: torch.Tensor) -> None:
    """NaN wherever eager has NaN, elsewhere only within the tiles that hold one, and finite
    everywhere else."""
    assert torch.isnan(got[torch.isnan(want)]).all()
    assert not torch.isnan(got[~reach]).any() and torch.isfinite(got[~reach]).all()


@pytest.mark.parametrize("one_pass", [False, True], ids=["torch-gemm", "one-pass"])
@pytest.mark.parametrize("relu,pool", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("where", [(3, 6), (0, 0), (4, 1)])
def test_winograd_conv_propagates_nan(isa, relu, pool, one_pass, where):
    """A NaN pixel makes NaN of every output it reaches in eager, whatever the sign of the
    weights, and none outside the tiles that hold it. (An inf reaches the same outputs as inf
    or NaN, depending on the transform's sums, so only non-finiteness is the contract there:
    see the network tests.)"""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 8, 10, generator=g).to(memory_format=torch.channels_last)
    x[1, 2, where[0], where[1]] = float("nan")
    weight, bias = torch.randn(40, 8, 3, 3, generator=g), torch.randn(40, generator=g)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    want = F.relu(want) if relu else want
    want = F.max_pool2d(want, 2, 2) if pool else want
    u = winograd_weight(weight)
    got = (winograd_conv3x3_one_pass(x, winograd_weight_blocked(u), bias, relu, pool) if one_pass
           else winograd_conv3x3_bias_act(x, u, bias, relu, pool))
    assert torch.isnan(want).any()
    assert_winograd_nan(got, want, winograd_nan_reach(x, 40, pool))


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("relu", [True, False])
def test_grouped_linear_propagates_non_finite(isa, relu, value):
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(3, 2 * 6, generator=g), torch.randn(2, 5, 6, generator=g), torch.randn(10)
    x[1, 7] = value
    want = torch.cat([x[:, k * 6:(k + 1) * 6].double() @ weight[k].double().t() for k in range(2)], 1) + bias.double()
    assert_same_non_finite(grouped_linear(x, weight, bias, relu), F.relu(want) if relu else want)
