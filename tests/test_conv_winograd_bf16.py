"""The bfloat16 Winograd F(2x2, 3x3) conv (mtkernels.ops.conv_winograd_bf16) per ISA variant,
against two float64 references:

* the conv of the bfloat16-rounded input and the float32 weight, within a worst-case bound
  derived from the transforms' bfloat16 roundings (it holds whatever the kernel does inside,
  and is loose: each rounding counted at its largest);
* the same Winograd algorithm computed here, its transformed input and weight rounded to
  bfloat16 where the kernel rounds them, within the float32 accumulation's bound (tight: it
  catches sums kept in bfloat16)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_conv_bf16 import assert_the_border_is_left_alone, non_finite_inputs

from mtkernels import _C
from mtkernels.ops.conv_bf16 import BLOCK, bordered_input, pack_conv_bf16_weight
from mtkernels.ops.conv_training import conv_winograd_bf16_weight_grad
from mtkernels.ops.conv_winograd_bf16 import conv_winograd_bf16, pack_bf16_taps, pack_conv_winograd_bf16_weight

EPS_FP32 = 2.0 ** -24
U_BF16 = 2.0 ** -8

# The F(2x2, 3x3) matrices (Lavin & Gray 2016), written out here, independent of the module's.
INPUT_T = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
WEIGHT = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=torch.float64)
OUTPUT_T = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=torch.float64)

# (batch, C_in, C_out, H, W, pool): one tile (a block of 8 mostly empty), 30 tiles (a partial
# last block), BKNet's layers, an odd number of output blocks (48 channels: single blocks),
# batch 1 on a 6x6 map (9 tiles: the threads share the output channels), a non-square map.
SHAPES = [
    (1, 16, 16, 2, 2, False),
    (5, 16, 32, 4, 6, False),
    (2, 32, 32, 48, 48, True),
    (3, 64, 48, 10, 14, True),
    (1, 128, 64, 12, 12, False),
    (1, 256, 256, 6, 6, True),
    (2, 32, 64, 8, 4, True),
]


def gamma(k: int) -> float:
    return k * EPS_FP32 / (1 - k * EPS_FP32)


def tiles_to_map(tiles: torch.Tensor) -> torch.Tensor:
    """[N, C, H/2, W/2, 2, 2] output tiles -> [N, C, H, W]."""
    n, c, th, tw = tiles.shape[:4]
    return tiles.permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * th, 2 * tw)


def patches(x: torch.Tensor) -> torch.Tensor:
    """The 4x4 input patches of the 2x2 output tiles (padding 1): [N, C, H/2, W/2, 4, 4]."""
    return F.pad(x, (1, 1, 1, 1)).unfold(2, 4, 2).unfold(3, 4, 2)


def epilogue(y: torch.Tensor, bound: torch.Tensor, relu: bool, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU and max-pool are 1-Lipschitz: the window's largest bound covers its maximum."""
    if relu:
        y = y.relu()
    if pool:
        y, bound = F.max_pool2d(y, 2), F.max_pool2d(bound, 2)
    return y, bound


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool,
              pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 conv of the bfloat16-rounded x with the float32 weight, through ReLU and pool;
    and the error bound of a Winograd conv of them in the kernel's arithmetic:

    * V = B^T d B in float32 (two additions: gamma_2 of |B^T||d||B| = Va), rounded to bfloat16
      (u): |V' - V| <= alpha Va, alpha = gamma_2 + u (1 + gamma_2);
    * U = G g G^T in float64, rounded to bfloat16: |U' - U| <= beta Ua, Ua = |G||g||G^T|;
    * M = the sum over C_in of V' U' (exact products) in float32: gamma_{C_in} of the sum of
      |V'||U'|, so |M' - M| <= delta S with S the sum of Va Ua and
      delta = (1 + gamma_{C_in})(1 + alpha)(1 + beta) - 1;
    * Y = A^T M A + b in float32 (two additions per stage, one for the bias): gamma_5 of
      |A^T||M'||A| + |b|, with |M'| <= (1 + delta) S.

    So |Y' - Y| <= (delta + gamma_5 (1 + delta)) |A^T| S |A| + gamma_5 |b|."""
    x64, w64 = x.bfloat16().double(), weight.double()
    exact = F.conv2d(x64, w64, bias.double(), padding=1)
    bound = winograd_error_bound(x64.abs(), w64.abs(), U_BF16 + 1e-12)
    bound = bound + gamma(5) * bias.double().abs().view(1, -1, 1, 1)
    return epilogue(exact, bound, relu, pool)


def winograd_error_bound(x_abs: torch.Tensor, w_abs: torch.Tensor, beta: float) -> torch.Tensor:
    """(delta + gamma_5 (1 + delta)) |A^T| S |A| of :func:`reference` for input magnitudes
    ``x_abs`` (bfloat16 values) and weight magnitudes ``w_abs``, the transformed weight's
    relative error being at most ``beta``; bias not included. float64 [N, C_out, H, W]."""
    v_abs = torch.einsum("ij,nctwjk,lk->nctwil", INPUT_T.abs(), patches(x_abs), INPUT_T.abs())
    u_abs = torch.einsum("ij,ocjk,lk->ocil", WEIGHT.abs(), w_abs, WEIGHT.abs())
    s = torch.einsum("nctwij,ocij->notwij", v_abs, u_abs)
    magnitude = tiles_to_map(torch.einsum("pi,notwij,qj->notwpq", OUTPUT_T.abs(), s, OUTPUT_T.abs()))
    alpha = gamma(2) + U_BF16 * (1 + gamma(2))
    delta = (1 + gamma(x_abs.shape[1])) * (1 + alpha) * (1 + beta) - 1
    return (delta + gamma(5) * (1 + delta)) * magnitude


def transformed_input(x: torch.Tensor) -> torch.Tensor:
    """V = B^T d B of every patch in float32, in the kernel's order (the rows' differences and
    sums first, then the columns'), rounded to bfloat16: [N, C, H/2, W/2, 4, 4] float64."""
    d = patches(x.bfloat16().float())

    def stage(t: torch.Tensor, axis: int) -> torch.Tensor:
        r = [t.select(axis, k) for k in range(4)]
        return torch.stack([r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]], dim=axis)

    return stage(stage(d, -2), -1).bfloat16().double()


def winograd_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool,
                       pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The Winograd conv in float64 from the kernel's bfloat16 V and U (U = G g G^T in float64,
    rounded), and the bound of what remains in the kernel: the float32 sums over C_in of exact
    products (gamma_{C_in} of the sum of |V||U|, S) and the output transform + bias (gamma_5 of
    |A^T| (S (1 + gamma_{C_in})) |A| + |b|)."""
    c_in = x.shape[1]
    v = transformed_input(x)
    u = torch.einsum("ij,ocjk,lk->ocil", WEIGHT, weight.double(), WEIGHT).bfloat16().double()
    m = torch.einsum("nctwij,ocij->notwij", v, u)
    y = tiles_to_map(torch.einsum("pi,notwij,qj->notwpq", OUTPUT_T, m, OUTPUT_T)) + bias.double().view(1, -1, 1, 1)
    s = torch.einsum("nctwij,ocij->notwij", v.abs(), u.abs())
    magnitude = tiles_to_map(torch.einsum("pi,notwij,qj->notwpq", OUTPUT_T.abs(), s, OUTPUT_T.abs()))
    k = gamma(c_in)
    bound = (k + gamma(5) * (1 + k)) * magnitude + gamma(5) * bias.double().abs().view(1, -1, 1, 1)
    return epilogue(y, bound, relu, pool)


@pytest.mark.parametrize("batch,c_in,c_out,height,width,pool", SHAPES)
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64_within_the_derived_bound(isa, batch, c_in, c_out, height, width, pool, relu):
    torch.manual_seed(c_in * 1000 + c_out + height)
    x = torch.randn(batch, c_in, height, width)
    weight = torch.randn(c_out, c_in, 3, 3) / math.sqrt(9 * c_in)
    bias = torch.randn(c_out)
    exact, bound = reference(x, weight, bias, relu, pool)
    packed = pack_conv_winograd_bf16_weight(weight)

    out32 = conv_winograd_bf16(x, packed, bias, relu, pool, out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and out32.shape == exact.shape
    excess = (out32.double() - exact).abs() - bound
    assert float(excess.max()) <= 0, f"float32 output exceeds the bound by {float(excess.max()):.3g}"

    # A bfloat16 output adds one rounding to nearest: u of the computed value.
    out16 = conv_winograd_bf16(x, packed, bias, relu, pool)
    assert out16.dtype == torch.bfloat16 and out16.is_contiguous(memory_format=torch.channels_last)
    excess = (out16.double() - exact).abs() - (U_BF16 * (exact.abs() + bound) + bound)
    assert float(excess.max()) <= 0, f"bfloat16 output exceeds the bound by {float(excess.max()):.3g}"
    assert torch.equal(out16, out32.bfloat16()), "the bfloat16 output is not the float32 one rounded to nearest"

    same_roundings, tight = winograd_reference(x, weight, bias, relu, pool)
    excess = (out32.double() - same_roundings).abs() - tight
    assert float(excess.max()) <= 0, f"float32 output exceeds the accumulation bound by {float(excess.max()):.3g}"


@pytest.mark.parametrize("batch,c_in,c_out,height,width,pool", SHAPES)
def test_reading_the_input_in_place_equals_the_bordered_copy(isa, batch, c_in, c_out, height, width, pool):
    """A bfloat16 channels-last input read where it is (its edge tiles check their rows and
    columns; a 2x2 map is all edge) gives exactly what its zero-bordered copy gives."""
    g = torch.Generator().manual_seed(batch + c_in + height)
    x = torch.randn(batch, c_in, height, width, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    packed = pack_conv_winograd_bf16_weight(torch.randn(c_out, c_in, 3, 3, generator=g) / (3 * math.sqrt(c_in)))
    bias = torch.randn(c_out, generator=g)
    in_place = conv_winograd_bf16(x, packed, bias, True, pool)
    copied = conv_winograd_bf16(x, packed, bias, True, pool, buffer=bordered_input(batch, height, width, c_in))
    assert torch.equal(in_place, copied)


def test_the_bound_catches_a_bfloat16_accumulation():
    """The accumulation bound fails a Winograd conv whose sums over the input channels are
    rounded to bfloat16 at every step (the typical reduced-precision kernel bug), while the
    kernel passes it."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(1, 64, 6, 6), torch.randn(64, 64, 3, 3) / 24, torch.randn(64)
    same_roundings, bound = winograd_reference(x, weight, bias, relu=False, pool=False)
    v = transformed_input(x).float()
    u = torch.einsum("ij,ocjk,lk->ocil", WEIGHT, weight.double(), WEIGHT).bfloat16().float()
    m = torch.zeros(1, 64, 3, 3, 4, 4)
    for c in range(64):
        m = (m + v[:, c].unsqueeze(1) * u[:, c].view(1, 64, 1, 1, 4, 4)).bfloat16().float()
    bf16_accumulated = (tiles_to_map(torch.einsum("pi,notwij,qj->notwpq", OUTPUT_T.float(), m, OUTPUT_T.float()))
                        + bias.view(1, -1, 1, 1))
    assert float(((bf16_accumulated.double() - same_roundings).abs() - bound).max()) > 0
    out = conv_winograd_bf16(x, pack_conv_winograd_bf16_weight(weight), bias, out_dtype=torch.float32)
    assert float(((out.double() - same_roundings).abs() - bound).max()) <= 0


def test_non_finite_input_reaches_exactly_its_windows(isa):
    """Before ReLU and pool, the outputs whose 3x3 windows hold a NaN or inf input are
    non-finite, as in eager PyTorch, and no other output is (an inf may come out as NaN: the
    transforms subtract it from itself). After ReLU and pool, outputs whose windows hold no
    non-finite input stay finite."""
    x, weight, bias = non_finite_inputs(16)
    exact, _ = reference(x, weight, bias, relu=False, pool=False)
    packed = pack_conv_winograd_bf16_weight(weight)
    out = conv_winograd_bf16(x, packed, bias, out_dtype=torch.float32)
    assert not torch.isfinite(exact).all()
    assert torch.equal(torch.isfinite(out), torch.isfinite(exact))
    pooled = conv_winograd_bf16(x, packed, bias, relu=True, pool=True, out_dtype=torch.float32)
    clean = F.max_pool2d((~torch.isfinite(exact)).any(dim=1, keepdim=True).float(), 2) == 0
    assert torch.isfinite(pooled[clean.expand_as(pooled)]).all()


def test_packing_is_the_transformed_pair_layout():
    """weight[b][4 i + j][ci / 2][c][ci % 2] = (G g G^T)[b * BLOCK + c][ci][i][j] in bfloat16,
    checked element by element against the transform written out here."""
    torch.manual_seed(3)
    weight = torch.randn(2 * BLOCK, 32, 3, 3)
    packed = pack_conv_winograd_bf16_weight(weight)
    assert packed.shape == (2, 16, 16, BLOCK, 2) and packed.dtype == torch.bfloat16
    for b, i, j, ci, c in [(0, 0, 0, 0, 0), (1, 2, 3, 7, 5), (1, 3, 1, 31, 15), (0, 1, 2, 16, 9)]:
        u = WEIGHT @ weight[b * BLOCK + c, ci].double() @ WEIGHT.T
        assert packed[b, 4 * i + j, ci // 2, c, ci % 2] == u[i, j].to(torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flipped_transposed_packing_is_that_of_the_flipped_transposed_filters(dtype):
    """The input gradient's filters (each flipped, C_in and C_out swapped), packed from the
    weight's own U (a float32 weight's taps rounded to bfloat16 first), equal the packing of
    those filters: element by element against the transform written out here."""
    torch.manual_seed(4)
    weight = torch.randn(2 * BLOCK, 3 * BLOCK, 3, 3).to(dtype)
    packed = pack_bf16_taps(weight, flipped_transposed=True)
    assert packed.shape == (3, 16, BLOCK, BLOCK, 2)
    filters = weight.bfloat16().transpose(0, 1).flip(2, 3)
    for b, i, j, ci, c in [(0, 0, 0, 0, 0), (2, 2, 3, 7, 5), (1, 3, 0, 31, 15), (2, 1, 2, 16, 9)]:
        u = WEIGHT @ filters[b * BLOCK + c, ci].double() @ WEIGHT.T
        assert packed[b, 4 * i + j, ci // 2, c, ci % 2] == u[i, j].to(torch.bfloat16)


@pytest.mark.parametrize("flipped_transposed", [False, True])
def test_bfloat16_weight_packing_within_its_bound(isa, flipped_transposed):
    """A bfloat16 weight (here a channels-last one) is packed in C++ (training packs every step): every element of U is
    within gamma_4 (float32, two stages of sums of at most three terms) of |G||g||G^T| of the
    float64 transform, then rounded once to bfloat16; a NaN tap gives NaN exactly in the U
    elements it reaches (row 0 and 2 of g reach rows 0-2 and 1-3 of U)."""
    torch.manual_seed(5)
    weight = (torch.randn(3 * BLOCK, 2 * BLOCK, 3, 3) * torch.logspace(-3, 3, 9).view(1, 1, 3, 3)).bfloat16()
    weight[0, 0, 0, 0] = float("nan")
    # a channels-last model's weight: packed from a contiguous copy
    packed = pack_bf16_taps(weight.contiguous(memory_format=torch.channels_last), flipped_transposed).double()
    filters = weight.double().transpose(0, 1).flip(2, 3) if flipped_transposed else weight.double()
    outs, ins = filters.shape[:2]

    def as_packed(u: torch.Tensor) -> torch.Tensor:  # [outs, ins, 4, 4] -> the pair layout
        return u.reshape(outs // BLOCK, BLOCK, ins // 2, 2, 16).permute(0, 4, 2, 1, 3)

    nan = filters.isnan()
    clean = filters.masked_fill(nan, 0.0)
    u64 = as_packed(WEIGHT @ clean @ WEIGHT.T)
    bound = gamma(4) * as_packed(WEIGHT.abs() @ clean.abs() @ WEIGHT.abs().T)
    bound = bound + U_BF16 * (u64.abs() + bound)
    reached = as_packed(WEIGHT.abs() @ nan.double() @ WEIGHT.abs().T) > 0  # NaN times a zero of G is no term
    assert packed.shape == u64.shape
    assert torch.equal(packed.isnan(), reached) and int(reached.sum()) == 9
    assert bool(((packed - u64).abs()[~reached] <= bound[~reached]).all())


def test_the_border_is_left_alone():
    weight = pack_conv_winograd_bf16_weight(torch.randn(32, 16, 3, 3))
    assert_the_border_is_left_alone(lambda src, bias, dst: _C.conv_winograd_bf16_nhwc(
        src.data_ptr(), weight.data_ptr(), bias.data_ptr(), dst.data_ptr(), 1, 6, 6, 16, 32, 1, True, True, 1, 1))


def test_bad_arguments_are_refused():
    x, bias = torch.randn(1, 16, 6, 6), torch.zeros(16)
    weight = pack_conv_winograd_bf16_weight(torch.randn(16, 16, 3, 3))
    with pytest.raises(ValueError, match="C_in and C_out multiples"):
        pack_conv_winograd_bf16_weight(torch.randn(16, 8, 3, 3))
    with pytest.raises(ValueError, match=r"\[C_out, C_in, 3, 3\]"):
        pack_conv_winograd_bf16_weight(torch.randn(16, 16, 1, 1))
    with pytest.raises(ValueError, match="packed_weight must be pack_conv_winograd_bf16_weight's layout"):
        conv_winograd_bf16(x, pack_conv_bf16_weight(torch.randn(16, 16, 3, 3)), bias)
    with pytest.raises(ValueError, match="height and width must be even, got 5x6"):
        conv_winograd_bf16(torch.randn(1, 16, 5, 6), weight, bias)
    with pytest.raises(ValueError, match=r"bias must be float32 \[16\]"):
        conv_winograd_bf16(x, weight, torch.zeros(8))
    with pytest.raises(ValueError, match="out_dtype must be"):
        conv_winograd_bf16(x, weight, bias, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="x must be a 4-D floating CPU tensor"):
        conv_winograd_bf16(x[0], weight, bias)
    with pytest.raises(ValueError, match="height and width must be even"):
        _C.conv_winograd_bf16_nhwc(0, 0, 0, 0, 1, 6, 5, 16, 16, 0, False, False, 1, 1)
    with pytest.raises(ValueError, match="in_channels must be a multiple"):
        _C.conv_winograd_bf16_nhwc(0, 0, 0, 0, 1, 6, 6, 8, 16, 0, False, False, 1, 1)


# The weight gradient (mtkernels::conv_winograd_bf16_weight_grad). (batch, C_in, C_out, H, W):
# one tile; 9 tiles (an odd count: the last pair's partner is zero); 192 tiles (two blocks of
# 128, the threads' sums added); 48 output channels (single blocks); a non-square map.
WEIGHT_GRAD_SHAPES = [(1, 16, 16, 2, 2), (1, 16, 32, 6, 6), (3, 32, 32, 16, 16), (2, 64, 48, 4, 10),
                      (2, 16, 64, 8, 4)]


def grad_tiles(grad_y: torch.Tensor) -> torch.Tensor:
    """The 2x2 blocks of d y, one per tile: [N, C, H/2, W/2, 2, 2]."""
    return grad_y.unfold(2, 2, 2).unfold(3, 2, 2)


def transformed_grad(grad_y: torch.Tensor) -> torch.Tensor:
    """d M = A d y A^T of every tile in float32, in the kernel's order (the columns' sums and
    differences first, then the rows'), rounded to bfloat16: [N, C, H/2, W/2, 4, 4] float64."""
    g = grad_tiles(grad_y.bfloat16().float())

    def stage(t: torch.Tensor, axis: int) -> torch.Tensor:
        r0, r1 = t.select(axis, 0), t.select(axis, 1)
        return torch.stack([r0, r0 + r1, r0 - r1, -r1], dim=axis)

    return stage(stage(g, -1), -2).bfloat16().double()


def filter_gradient(du: torch.Tensor) -> torch.Tensor:
    """G^T d U G: [C_in, C_out, 4, 4] -> [C_out, C_in, 3, 3]."""
    return torch.einsum("ik,coij,jl->ockl", WEIGHT, du, WEIGHT)


def weight_grad_sums_bound(tiles: int) -> float:
    """The weight gradient's float32 sums: over the tiles (each thread's, then the threads'
    sums: gamma_{T + 1}), then G^T d U G in two stages, each output of a stage at most two
    additions (gamma_2 twice: gamma_4)."""
    return (1 + gamma(tiles + 1)) * (1 + gamma(4)) - 1


def winograd_weight_grad_bound(x_abs: torch.Tensor, dy_abs: torch.Tensor) -> torch.Tensor:
    """The worst-case error of the bf16 Winograd weight gradient for bfloat16 input and output
    gradient magnitudes (float64 [N, C, H, W]): V = B^T d B as the forward's (alpha of
    |B^T||d||B|), d M = A d y A^T in float32 (two additions, gamma_2 of |A||dy||A^T|) rounded
    to bfloat16 (alpha again), exact products, then the float32 sums; so
    ((1 + alpha)^2 (1 + sums) - 1) G^T (sum |V||dM|) G in magnitudes. [C_out, C_in, 3, 3]."""
    v_abs = torch.einsum("ij,nctwjk,lk->nctwil", INPUT_T.abs(), patches(x_abs), INPUT_T.abs())
    m_abs = torch.einsum("ai,notwab,bj->notwij", OUTPUT_T.abs(), grad_tiles(dy_abs), OUTPUT_T.abs())
    magnitude = torch.einsum("ik,coij,jl->ockl", WEIGHT.abs(), torch.einsum("nctwij,notwij->coij", v_abs, m_abs),
                             WEIGHT.abs())
    alpha = gamma(2) + U_BF16 * (1 + gamma(2))
    sums = weight_grad_sums_bound(x_abs.shape[0] * (x_abs.shape[2] // 2) * (x_abs.shape[3] // 2))
    return ((1 + alpha) ** 2 * (1 + sums) - 1) * magnitude


@pytest.mark.parametrize("batch,c_in,c_out,height,width", WEIGHT_GRAD_SHAPES)
def test_weight_grad_within_the_derived_bounds(isa, batch, c_in, c_out, height, width):
    """d weight against two float64 references:

    * the exact gradient of the conv of the bfloat16 x and d y, within the worst case of the
      kernel's roundings: V as the forward's (alpha of |B^T||d||B|), d M = A d y A^T in float32
      (two additions, gamma_2 of |A||dy||A^T|) rounded to bfloat16 (alpha again), the products
      exact, their sum over the T tiles in float32 and G^T d U G
      (winograd_weight_grad_bound);
    * the same algorithm with V and d M rounded where the kernel rounds them, within the float32
      sums' bound alone (a sum kept in bfloat16 fails it)."""
    g = torch.Generator().manual_seed(batch * 1000 + c_in + c_out)
    x = torch.randn(batch, c_in, height, width, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(batch, c_out, height, width, generator=g).bfloat16()
    got = conv_winograd_bf16_weight_grad(x, grad_y)
    assert got.dtype == torch.float32 and got.shape == (c_out, c_in, 3, 3)

    x64, dy64 = x.double(), grad_y.double()
    w64 = torch.zeros(c_out, c_in, 3, 3, dtype=torch.float64, requires_grad=True)
    (exact,) = torch.autograd.grad(F.conv2d(x64, w64, padding=1), w64, dy64)
    assert ((got.double() - exact).abs() <= winograd_weight_grad_bound(x64.abs(), dy64.abs())).all()

    sums = weight_grad_sums_bound(batch * (height // 2) * (width // 2))
    v, m = transformed_input(x), transformed_grad(grad_y)
    same_roundings = filter_gradient(torch.einsum("nctwij,notwij->coij", v, m))
    rounded_magnitude = torch.einsum("ik,coij,jl->ockl", WEIGHT.abs(),
                                     torch.einsum("nctwij,notwij->coij", v.abs(), m.abs()), WEIGHT.abs())
    assert ((got.double() - same_roundings).abs() <= sums * rounded_magnitude + 1e-300).all()


@pytest.mark.parametrize("tensor,where,value", [("x", (0, 3, 0, 0), math.nan), ("x", (1, 5, 2, 3), math.inf),
                                                 ("grad_y", (1, 7, 5, 0), -math.inf)])
def test_weight_grad_non_finite_as_eager(tensor, where, value):
    """A NaN or inf in x or d y makes non-finite (and NaN) exactly the weight gradient's
    entries that eager bfloat16 PyTorch (torch.autocast's conv) makes so: a corner pixel meets
    4 of each filter's 9 taps, where Winograd's transforms spread it to all 9."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 6, 8, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(2, 32, 6, 8, generator=g).bfloat16()
    (x if tensor == "x" else grad_y)[where] = value
    got = conv_winograd_bf16_weight_grad(x, grad_y)
    weight = torch.zeros(32, 16, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    (eager,) = torch.autograd.grad(F.conv2d(x, weight, padding=1), weight, grad_y)
    assert not bool(torch.isfinite(eager).all())
    assert torch.equal(torch.isfinite(got), torch.isfinite(eager))
    assert torch.equal(torch.isnan(got), torch.isnan(eager))


def test_weight_grad_opcheck_and_bad_arguments_are_named():
    x = torch.randn(2, 16, 4, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(2, 32, 4, 6).bfloat16()
    torch.library.opcheck(torch.ops.mtkernels.conv_winograd_bf16_weight_grad, (x, grad_y))
    with pytest.raises(TypeError, match="x must be a bfloat16"):
        conv_winograd_bf16_weight_grad(x.float(), grad_y)
    with pytest.raises(ValueError, match="even H and W"):
        conv_winograd_bf16_weight_grad(x[:, :, :3], grad_y[:, :, :3])
    with pytest.raises(ValueError, match="multiples of 16"):
        conv_winograd_bf16_weight_grad(x[:, :8], grad_y)
    with pytest.raises(ValueError, match="grad_y must be a bfloat16"):
        conv_winograd_bf16_weight_grad(x, grad_y[:1])
    with pytest.raises(ValueError, match="grad_y must be a 4-D"):
        conv_winograd_bf16_weight_grad(x, grad_y[0])
