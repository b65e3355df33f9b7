"""Training-mode BatchNorm + ReLU as one torch op (CPU, channels-last, float32 or bfloat16
activations with float32 parameters and statistics).

Forward: one pass for the batch statistics, one pass that normalises, applies the affine
and the ReLU, and writes the output once. Backward: the ReLU mask is recomputed from the
input with the forward's own expression, so neither the output nor the masked gradient
is read or written; one pass reduces the masked gradient (and its product with the
centred input) per channel, one pass writes the input gradient: 8 passes over the
activation in all, against 10 here for PyTorch's BatchNorm then ReLU (whose float32
statistics are also less accurate: tests/test_batchnorm_relu.py). bfloat16 activations
(and their gradients) are read and written as bfloat16 and halve that traffic; the
arithmetic stays float32, the sums double (bfloat16 values in float32 over blocks of at
most 64 rows first), and each stored value is rounded once.

With ``pool=True`` the ReLU's output is also 2x2 / stride 2 max-pooled (``nn.MaxPool2d(2,
2)``) in the same pass, and only the pooled output is written: the full-size activation,
the pool's int64 indices and PyTorch's zero-filled full-size pool gradient never exist,
since the backward recomputes each window's maximum from the input.

``torch.ops.mtkernels.batchnorm_relu`` is a ``torch.library`` custom op (schema, fake
implementation, autograd through ``torch.ops.mtkernels.batchnorm_relu_backward``); the
running statistics are left to the caller (:class:`mtkernels.BatchNormReLU2d`), so the op
mutates nothing.
"""

from __future__ import annotations

import torch

from .. import _C
from .conv import ELEMENTS

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x`` in [rows, channels] memory order (channels-last for 4-D), rows, channels."""
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        return x, x.shape[0] * x.shape[2] * x.shape[3], x.shape[1]
    x = x.contiguous()
    return x, x.shape[0], x.shape[1]


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pool: bool) -> None:
    if x.device.type != "cpu" or x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x must be a float32 or bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() not in (2, 4):
        raise ValueError(f"x must be [N, C] or [N, C, H, W], got {tuple(x.shape)}")
    if pool and (x.dim() != 4 or min(x.shape[2:]) < 2):
        raise ValueError(f"pool=True needs x of shape [N, C, H >= 2, W >= 2], got {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (channels,) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 CPU tensor of shape ({channels},), got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    rows = x.numel() // max(1, channels)
    if rows < 2:
        raise ValueError(f"batch statistics need more than one value per channel, got x of shape {tuple(x.shape)}")


def _pool_geometry(x: torch.Tensor, pool: bool) -> list[int]:
    """The kernels' pool argument: [images, height, width] of x, or [] for no pool."""
    return [x.shape[0], x.shape[2], x.shape[3]] if pool else []


def _output_like(x: torch.Tensor, pool: bool) -> torch.Tensor:
    """An empty y for x: x's shape (channels-last for 4-D), or pooled 2x2 / stride 2."""
    if pool:
        n, c, h, w = x.shape
        return torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return torch.empty_like(x, memory_format=torch.channels_last) if x.dim() == 4 else torch.empty_like(x)


def _statistics_and_apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, pool: bool,
                          residual: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The forward of both ops: (x + residual where given, y, mean, variance)."""
    x, rows, channels = _rows(x)
    total = None
    if residual is not None:
        residual, _, _ = _rows(residual)
        total = _output_like(x, False)
    y, mean, var = _output_like(x, pool), weight.new_empty(channels), weight.new_empty(channels)
    weight, bias = weight.contiguous(), bias.contiguous()
    _C.bn_relu_step_forward(x.data_ptr(), 0 if residual is None else residual.data_ptr(),
                            0 if total is None else total.data_ptr(), weight.data_ptr(), bias.data_ptr(), eps,
                            y.data_ptr(), mean.data_ptr(), var.data_ptr(), rows, channels, _pool_geometry(x, pool),
                            ELEMENTS[x.dtype], torch.get_num_threads())
    return (y, mean, var) if total is None else (total, y, mean, var)


@torch.library.custom_op("mtkernels::batchnorm_relu", mutates_args=())
def batchnorm_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   pool: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """relu(batch_norm(x, weight, bias, eps)) with batch statistics, then with ``pool``
    ``max_pool2d(., 2, 2)``. Returns (y, mean, biased variance); y is channels-last for 4-D
    x."""
    _check(x, weight, bias, pool)
    return _statistics_and_apply(x, weight, bias, eps, pool)


@batchnorm_relu.register_fake
def _(x, weight, bias, eps, pool=False):
    return _output_like(x, pool), weight.new_empty(x.shape[1]), weight.new_empty(x.shape[1])  # float32 statistics


@torch.library.custom_op("mtkernels::add_batchnorm_relu", mutates_args=())
def add_batchnorm_relu(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A residual network's sum and the pre-activation after it: total = x + residual
    (rounded once to x's dtype, as PyTorch's add), then :func:`batchnorm_relu` of total.
    Returns (total, y, mean, biased variance). The sum is written in the statistics pass
    (not read back for them), and the backward adds the gradient that reaches total from
    later layers into the input gradient's pass (no separate accumulation)."""
    _check(x, weight, bias, False)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), got "
                         f"{residual.dtype} {tuple(residual.shape)} on {residual.device}")
    return _statistics_and_apply(x, weight, bias, eps, False, residual)


@add_batchnorm_relu.register_fake
def _(x, residual, weight, bias, eps):
    statistics = weight.new_empty(x.shape[1])
    return _output_like(x, False), _output_like(x, False), statistics, statistics.clone()


@torch.library.custom_op("mtkernels::batchnorm_relu_backward", mutates_args=())
def batchnorm_relu_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            mean: torch.Tensor, var: torch.Tensor, eps: float, pool: bool = False,
                            grad_add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x, d weight, d bias) of :func:`batchnorm_relu` given d y and its saved statistics;
    ``grad_add`` (unpooled only), a gradient that reaches x another way, is added into d x
    before its one rounding."""
    if grad_add is not None and (pool or grad_add.shape != x.shape or grad_add.device != x.device):
        raise ValueError(f"grad_add must have x's shape {tuple(x.shape)} and device ({x.device}) and pool be False, "
                         f"got {tuple(grad_add.shape)} on {grad_add.device} with pool={pool}")
    x, rows, channels = _rows(x)
    grad_y, _, _ = _rows(grad_y.to(x.dtype))
    if grad_add is not None:
        grad_add, _, _ = _rows(grad_add.to(x.dtype))
    grad_x, grad_weight, grad_bias = torch.empty_like(x), weight.new_empty(channels), weight.new_empty(channels)
    weight, bias, mean, var = (t.contiguous() for t in (weight, bias, mean, var))
    _C.bn_relu_step_backward(grad_y.data_ptr(), x.data_ptr(), 0 if grad_add is None else grad_add.data_ptr(),
                             weight.data_ptr(), bias.data_ptr(), mean.data_ptr(), var.data_ptr(), eps,
                             grad_x.data_ptr(), grad_weight.data_ptr(), grad_bias.data_ptr(), rows, channels,
                             _pool_geometry(x, pool), ELEMENTS[x.dtype], torch.get_num_threads())
    return grad_x, grad_weight, grad_bias


@batchnorm_relu_backward.register_fake
def _(grad_y, x, weight, bias, mean, var, eps, pool=False, grad_add=None):
    return _output_like(x, False), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, pool = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.mark_non_differentiable(mean, var)  # statistics for the running averages, not a model output
    ctx.eps, ctx.pool = eps, pool


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, bias, mean, var = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.mtkernels.batchnorm_relu_backward(
        grad_y, x, weight, bias, mean, var, ctx.eps, ctx.pool)
    return grad_x, grad_weight, grad_bias, None, None


batchnorm_relu.register_autograd(_backward, setup_context=_setup_context)


def _setup_add_context(ctx, inputs, output):
    _, _, weight, bias, eps = inputs
    total, _, mean, var = output
    ctx.save_for_backward(total, weight, bias, mean, var)
    ctx.mark_non_differentiable(mean, var)
    ctx.eps = eps


def _add_backward(ctx, grad_total, grad_y, _grad_mean, _grad_var):
    total, weight, bias, mean, var = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.mtkernels.batchnorm_relu_backward(
        grad_y, total, weight, bias, mean, var, ctx.eps, False, grad_total)
    return grad_x, grad_x, grad_weight, grad_bias, None


add_batchnorm_relu.register_autograd(_add_backward, setup_context=_setup_add_context)
