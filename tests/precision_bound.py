"""An error bound for a fused network run in bf16 or int8, derived from the unit roundoff and
computed in float64.

Every layer's own rounding error has a rigorous bound ``b`` (below). Propagating such bounds
through the network worst-case, through ``|W|`` at every layer, gives 1e14 at BKNet's logits
for logits of order 1: the sum of |w||x| over a 3x3x256 window is 20-50x the signed sum, and
13 layers multiply that. So the errors are propagated as rounding errors behave, the
probabilistic model of Higham & Mary (2019): independent, zero-mean, so variances add and a
linear map ``W`` carries a variance ``v`` to ``W^2 v``. Each local bound ``b`` enters as a
standard deviation (a uniform error of half-width ``b`` has ``b / sqrt(3)``, so this
overstates it), and the test allows ``LAMBDA`` standard deviations at the logits.

The exact value ``a`` and the variance ``v`` travel through the float64 fusion of the
float64 model stacked on the batch dimension, ``[a; v]``. Local bounds (``u = 2^-8``,
bfloat16's unit roundoff; ``K`` a dot product's length; ``eps = 2^-24``):

* conv / linear, bf16: each product of rounded operands is off by at most
  ``(2u + u^2) |x||w|`` (plus ``2 eps`` for the weights' float32 BatchNorm folding), each one
  independently, so a dot product gets the sum of their squares; the float32 accumulation is
  off by ``K eps`` of the sum of magnitudes (counted worst-case); the bias by ``u |b|``, the
  output by ``u |y|``.
* conv, bf16, where mtkernels' Winograd F(2x2, 3x3) may run it (3x3, stride 1, whole blocks of
  channels, even maps; tests/test_conv_winograd_bf16.py): the products are of the transformed
  input V = B^T d B and weight U = G g G^T, each rounded to bfloat16, so each is off by
  ``(2u + u^2 + 4 eps) |V||U|`` and output (p, q) of a tile sums them with weights
  ``A[p, i] A[q, j]`` (0 or +-1). |U| is known; |V| is at most the exact input's transform's
  plus the transform of its standard deviation through ``|B^T|``, ``|B|`` (the transform of
  magnitudes, 4x the input, would give a vacuous bound: a smooth map's differences are
  small). The variance taken is the larger of this and the direct conv's: the
  bound holds whichever kernel the plan timed fastest.
* conv, int8: the input is quantized with step ``s`` (``s / 2``, plus whatever exceeds the
  calibrated range and is clipped), each weight with its channel's step ``s_w`` (``s_w / 2``
  times |x|, independent per weight); the int32 accumulation is exact; the output is rounded
  to its uint8 step or to bfloat16.
* BatchNorm + ReLU as an affine map, average pooling, residual adds: the same rounding terms.
* ReLU is 1-Lipschitz: it passes the variance on, except where the exact pre-activation is
  below ``-LAMBDA`` standard deviations (the computed one is negative too: both give 0).
  Once the standard deviation nears ``1 / LAMBDA`` of the activations, that exception stops
  applying and the bound doubles per layer (ReLU passes all the variance, half the signal):
  on the ResNets it is valid but no longer informative after about 40 layers.
  Max-pool passes one element of its window on: the window's largest variance.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from test_conv_winograd_bf16 import INPUT_T, OUTPUT_T, WEIGHT, patches, tiles_to_map
from torch import nn

from models.resnet import FusedPreActBottleneck
from mtkernels.fuse import AffineReLU, FusedConv2d, FusedLinear
from mtkernels.fuse.plans import FusedMultiTaskNet
from mtkernels.ops import conv_winograd_bf16

U_BF16 = 2.0 ** -8
EPS_FP32 = 2.0 ** -24


# Standard deviations allowed at the logits (a Gaussian exceeds 6 sigma with probability 2e-9).
LAMBDA = 6.0


def _split(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = stacked.shape[0] // 2
    return stacked[:half], stacked[half:]


def _plus_bf16_rounding(value: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    return variance + (U_BF16 * (value.abs() + variance.sqrt())) ** 2


def _product_variance(linear_map, a: torch.Tensor, v: torch.Tensor, w: torch.Tensor, length: int) -> torch.Tensor:
    """Variance of ``linear_map(a, w)`` computed from bf16-rounded operands with float32
    sums: the input's variance carried through, plus the products' independent local errors
    and the (worst-case, tiny) float32 accumulation."""
    magnitude = a.abs() + v.sqrt()
    products = (2 * U_BF16 + U_BF16 ** 2 + 2 * EPS_FP32) ** 2 * linear_map(magnitude * magnitude, w * w)
    accumulation = (length * EPS_FP32 * 1.01 * linear_map(magnitude, w.abs())) ** 2
    return linear_map(v, w * w) + products + accumulation


def _winograd_product_variance(a: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The products' and sums' variance of a bf16 Winograd F(2x2, 3x3) conv of an input ``a``
    of variance ``v`` with weight ``w``: the products' local errors independent, the float32
    sums over C_in and the output transform worst-case."""
    u_abs = torch.einsum("ij,ocjk,lk->ocil", WEIGHT, w, WEIGHT).abs()
    local = (2 * U_BF16 + U_BF16 ** 2 + 4 * EPS_FP32) ** 2
    parts = []
    for exact, variance in zip(a.split(8), v.split(8)):  # the patches of 8 images at a time
        v_abs = (torch.einsum("ij,nctwjk,lk->nctwil", INPUT_T, patches(exact), INPUT_T).abs()
                 + torch.einsum("ij,nctwjk,lk->nctwil", INPUT_T.abs(), patches(variance.sqrt()), INPUT_T.abs()))
        squares = torch.einsum("nctwij,ocij->notwij", v_abs * v_abs, u_abs * u_abs)
        sums = torch.einsum("nctwij,ocij->notwij", v_abs, u_abs)
        products = tiles_to_map(torch.einsum("pi,notwij,qj->notwpq", OUTPUT_T ** 2, squares, OUTPUT_T ** 2))
        accumulation = tiles_to_map(torch.einsum("pi,notwij,qj->notwpq", OUTPUT_T.abs(), sums, OUTPUT_T.abs()))
        parts.append(local * products + ((w.shape[1] + 5) * EPS_FP32 * 1.01 * accumulation) ** 2)
    return torch.cat(parts)


def _relu(a: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU of the exact value and its variance: where the exact pre-activation is below
    -LAMBDA standard deviations, the computed one is negative too and both outputs are 0."""
    return F.relu(a), torch.where(a > -LAMBDA * v.sqrt(), v, torch.zeros_like(v))


def _clip_excess(a: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """What clamping to [low, high] removes from the exact value (clamping is 1-Lipschitz, so
    the error it is applied to does not grow)."""
    return F.relu(a - high) + F.relu(low - a)


def _conv_bound(layer: FusedConv2d, int8_layer: FusedConv2d | None):
    weight, bias = layer.weight, layer.bias
    length = weight.shape[1] * weight.shape[2] * weight.shape[3]

    def conv(t, w, b=None):
        return F.conv2d(t, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(stacked):
        a, v = _split(stacked)
        y = conv(a, weight, bias)
        spec = None if int8_layer is None else int8_layer.int8
        if spec is None:
            v_y = _product_variance(conv, a, v, weight, length)
            if layer.winograd_ok and conv_winograd_bf16.supports(weight.shape, layer.stride[0], layer.padding[0],
                                                                  a.shape[2], a.shape[3]):
                exact_part = conv(v, weight * weight)
                v_y = exact_part + torch.maximum(v_y - exact_part,
                                                 _winograd_product_variance(a, v, weight))
            v_y = v_y + (U_BF16 * bias.abs().view(1, -1, 1, 1)) ** 2
            v_y = _plus_bf16_rounding(y, v_y)
        else:
            s, zp = spec.input.scale, spec.input.zero_point
            v_in = v + (s / 2 + _clip_excess(a, s * (0 - zp), s * (255 - zp))) ** 2
            w_step = (weight.abs().amax(dim=(1, 2, 3)) / 127).view(-1, 1, 1, 1)
            w_error = w_step / 2 + 2 * EPS_FP32 * weight.abs()  # + the float32 folding
            x_magnitude = a.abs() + v_in.sqrt()
            v_y = conv(v_in, weight * weight) + conv(x_magnitude * x_magnitude, w_error * w_error)
            v_y = v_y + (EPS_FP32 * 4 * conv(x_magnitude, weight.abs() + w_error)) ** 2  # scaling in float32
            if spec.output is None:
                v_y = _plus_bf16_rounding(y, v_y)
            else:
                out = spec.output
                v_y = v_y + (out.scale / 2 + _clip_excess(F.relu(y), 0.0, out.scale * 255)) ** 2
        if layer.relu:
            y, v_y = _relu(y, v_y)
        if layer.pool:
            y, v_y = F.max_pool2d(y, 2, 2), F.max_pool2d(v_y, 2, 2)
        return torch.cat([y, v_y])
    return forward


def _linear_bound(layer: FusedLinear):
    weight, bias = layer.weight, layer.bias

    def forward(stacked):
        a, v = _split(stacked)
        y = F.linear(a, weight, bias)
        v_y = _product_variance(F.linear, a, v, weight, weight.shape[1]) + (U_BF16 * bias.abs()) ** 2
        v_y = _plus_bf16_rounding(y, v_y)
        return torch.cat(_relu(y, v_y) if layer.relu else (y, v_y))
    return forward


def _affine_relu_bound(layer: AffineReLU):
    scale, shift = layer.scale, layer.shift

    def forward(stacked):
        a, v = _split(stacked)
        y = a * scale + shift
        local = ((2 * U_BF16 + U_BF16 ** 2 + 4 * EPS_FP32) * (a.abs() + v.sqrt()) * scale.abs()
                 + (U_BF16 + 4 * EPS_FP32) * shift.abs())
        return torch.cat(_relu(y, _plus_bf16_rounding(y, v * scale * scale + local * local)))
    return forward


def _round_output(module, args, out):
    """After an op that rounds its bf16 output once (residual add, average pooling)."""
    a, v = _split(out)
    return torch.cat([a, _plus_bf16_rounding(a, v)])


def reduced_precision_bound(fused_fp64: FusedMultiTaskNet, x: torch.Tensor,
                            fused_int8: FusedMultiTaskNet | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact float64 logits of ``fused_fp64``, the float64 model's fusion, on ``x``;
    elementwise bound, ``LAMBDA`` standard deviations, on the error of the bf16 fusion of the
    float32 model, or of ``fused_int8``'s run where given)."""
    net = copy.deepcopy(fused_fp64)
    int8_convs = ([m for m in fused_int8.modules() if isinstance(m, FusedConv2d)] if fused_int8 is not None
                  else None)
    convs = [m for m in net.modules() if isinstance(m, FusedConv2d)]
    if int8_convs is not None and len(int8_convs) != len(convs):
        raise ValueError("the int8 network's convs do not match the float32 network's")
    for index, conv in enumerate(convs):
        conv.forward = _conv_bound(conv, int8_convs[index] if int8_convs is not None else None)
    for module in net.modules():
        if isinstance(module, FusedLinear):
            module.forward = _linear_bound(module)
        elif isinstance(module, AffineReLU):
            module.forward = _affine_relu_bound(module)
        elif isinstance(module, (FusedPreActBottleneck, nn.AdaptiveAvgPool2d)):
            module.register_forward_hook(_round_output)
    a = x.double()
    with torch.no_grad():
        exact, variance = _split(net.heads(net.trunk(torch.cat([a, torch.zeros_like(a)]))))
    return exact, LAMBDA * variance.sqrt()
