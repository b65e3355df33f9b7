"""Training-time fusion: BatchNorm2d followed by ReLU (and by a 2x2 max-pool) becomes one
module that runs the fused ``mtkernels::batchnorm_relu`` op in training on channels-last
CPU activations (and PyTorch's own BatchNorm + ReLU (+ pool) everywhere else), and each Conv2d runs the convolution
algorithm that is fastest for its shape on such activations. Parameters, buffers and
``state_dict`` keys stay exactly those of the original modules (only their class changes),
so checkpoints, optimisers and ``fuse_for_inference`` work unchanged.

``precision="bf16"`` is mixed precision: parameters stay float32 (the optimiser updates
them, checkpoints hold them), while every conv and linear layer computes in bfloat16 on
the CPU's matrix units (float32 accumulation, inside oneDNN) from a bfloat16 copy of its
weight taken in the forward, and the activations between layers, and their gradients, are
bfloat16. Fused BatchNorm + ReLU reads and writes bfloat16 with float32 arithmetic and
double statistics. The network's output is float32 logits; the weight gradients come back
to the float32 parameters in float32: the bf16 Winograd convolutions' as their kernel sums
them (float32), the others each rounded once to bfloat16 precision by the convolution /
matmul that produced them."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .ops import batchnorm_relu as _op  # noqa: F401  (registers torch.ops.mtkernels.batchnorm_relu)
from .ops import conv_winograd_bf16 as _winograd_bf16
from .ops.batchnorm_relu import ACTIVATION_DTYPES
from .ops.conv_training import conv_output_size, conv_winograd_bf16, gemm_conv2d, winograd_conv3x3

TRAINING_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


class BatchNormReLU2d(nn.BatchNorm2d):
    """``relu(BatchNorm2d(x))``, fused in training on channels-last float32 CPU input."""

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.training and self.affine and x.device.type == "cpu" and x.dtype in ACTIVATION_DTYPES
                and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and x.numel() // x.shape[1] > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return F.relu(super().forward(x))
        return self._fused(x, pool=False)

    def _fused(self, x: torch.Tensor, pool: bool) -> torch.Tensor:
        y, mean, var = torch.ops.mtkernels.batchnorm_relu(x, self.weight, self.bias, self.eps, pool)
        if self.track_running_stats:
            self._update_running_stats(mean, var, x.numel() // x.shape[1])
        return y

    def _fused_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total, y, mean, var = torch.ops.mtkernels.add_batchnorm_relu(x, residual, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            self._update_running_stats(mean, var, x.numel() // x.shape[1])
        return total, y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        # as nn.BatchNorm2d: the running variance is the unbiased one; momentum None means
        # a cumulative average over the batches seen
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(var * (count / (count - 1)), momentum)


class BatchNormReLUPool2d(BatchNormReLU2d):
    """``max_pool2d(relu(BatchNorm2d(x)), 2, 2)``, fused in training on channels-last CPU
    input (float32 or bfloat16) with spatial size at least 2x2."""

    def _fusable(self, x: torch.Tensor) -> bool:
        return super()._fusable(x) and min(x.shape[2:]) >= 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return F.max_pool2d(F.relu(nn.BatchNorm2d.forward(self, x)), 2, 2)
        return self._fused(x, pool=True)


def is_pool2x2(module: nn.Module) -> bool:
    """Whether ``module`` is ``nn.MaxPool2d(2, 2)`` (no padding, dilation or ceil mode)."""
    return (type(module) is nn.MaxPool2d and module.kernel_size in (2, (2, 2)) and module.stride in (2, (2, 2))
            and module.padding in (0, (0, 0)) and module.dilation in (1, (1, 1)) and not module.ceil_mode
            and not module.return_indices)


def as_bn_relu(bn: nn.BatchNorm2d, pool: bool = False) -> BatchNormReLU2d:
    """Turn ``bn`` (always followed by a ReLU where it is used, and with ``pool`` by a 2x2 /
    stride 2 max-pool) into a BatchNormReLU2d (BatchNormReLUPool2d) in place: same object,
    parameters and buffers; it now applies the ReLU (and the pool) itself."""
    if type(bn) is not nn.BatchNorm2d:
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    bn.__class__ = BatchNormReLUPool2d if pool else BatchNormReLU2d
    return bn


def bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``relu(bn(x))`` for a model's forward: one op once ``bn`` is a BatchNormReLU2d."""
    return bn(x) if isinstance(bn, BatchNormReLU2d) else torch.relu(bn(x))


def add_bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, relu(bn(x + residual)))`` for a residual network's forward: one op
    (``mtkernels::add_batchnorm_relu``) where ``bn`` is an unpooled BatchNormReLU2d that
    fuses ``x`` and ``residual`` is laid out as ``x``."""
    if (type(bn) is BatchNormReLU2d and bn._fusable(x) and residual.shape == x.shape and residual.dtype == x.dtype
            and residual.is_contiguous(memory_format=torch.channels_last)):
        return bn._fused_add(x, residual)
    total = x + residual
    return total, bn_relu(bn, total)


# Which layers time an algorithm against oneDNN's own convolution (forward + backward, once
# per machine: mtkernels.fuse.tuning), and what runs untimed (MTKERNELS_TUNE=off, and under
# torch.compile): one GEMM where an image has at most 16 output pixels (oneDNN blocks its
# work per image, far from the GEMM rate on the ResNets' 3x3 maps), Winograd for 3x3 /
# stride 1 float32 from 64 channels in and out (below that its transforms move more memory
# than the multiplications save), as measured on this project's first 2-core AVX-512 CPU
# (bench/results/conv_training-cpu.md). Another CPU of the same family measured oneDNN
# fastest on every BKNet layer, hence the timing.
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_TIMED_MIN_CHANNELS = 32
GEMM_MAX_OUTPUT_PIXELS = 16
# A first layer's few columns (C_in KH KW; one or three channels), in bfloat16: oneDNN's
# bfloat16 weight gradient of BKNet's one-channel first conv ran at 11 GFLOP/s here (19 ms a
# step against the GEMM's 7 ms). Every bfloat16 1x1 layer is offered the GEMM too: on the
# ResNets' at batch 128 its training step measured 1.12-1.39x oneDNN's with stride 2 and on
# 6x6 and 3x3 maps, 0.87-0.98x with stride 1 on 24x24 and 12x12 maps (so the timing decides).
GEMM_MAX_COLUMNS = 27


class ComputeDtype:
    """Mixin of the training layers: ``compute_dtype`` (float32 unless
    ``fuse_for_training(precision="bf16")`` set it) is the dtype a CPU forward computes in;
    :meth:`cast` gives the input and a copy of each parameter in it, differentiably, so the
    gradients reach the float32 parameters in float32."""

    compute_dtype = torch.float32

    def cast(self, x: torch.Tensor, *params: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        dtype = self.compute_dtype
        if dtype == torch.float32 or x.device.type != "cpu":
            return (x, *params)
        return (x.to(dtype), *(None if p is None else p.to(dtype) for p in params))


class TrainingConv2d(ComputeDtype, nn.Conv2d):
    """``nn.Conv2d`` that, on channels-last CPU input, runs ``mtkernels::winograd_conv3x3``
    (float32), ``mtkernels::conv_winograd_bf16`` (bfloat16) or ``mtkernels::gemm_conv2d``
    where the layer's shape makes them faster than PyTorch's own (oneDNN) convolution
    (:meth:`algorithm`), in its ``compute_dtype``."""

    def candidates(self, x: torch.Tensor) -> list[str]:
        """The algorithms that can run this layer on input ``x`` (already in
        ``compute_dtype``) and may beat oneDNN's ("torch", always first)."""
        square = self.stride[0] == self.stride[1] and not isinstance(self.padding, str) \
            and self.padding[0] == self.padding[1]
        if not (square and self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros"
                and x.device.type == "cpu" and x.dtype in ACTIVATION_DTYPES and x.dim() == 4
                and x.is_contiguous(memory_format=torch.channels_last)):
            return ["torch"]
        (padding, _), (stride, _), (kh, kw) = self.padding, self.stride, self.kernel_size
        out_h = conv_output_size(x.shape[2], kh, stride, padding)
        out_w = conv_output_size(x.shape[3], kw, stride, padding)
        names = ["torch"]
        few_columns = x.dtype == torch.bfloat16 and self.in_channels * kh * kw <= GEMM_MAX_COLUMNS
        pointwise_bf16 = x.dtype == torch.bfloat16 and (kh, kw) == (1, 1)
        if out_h > 0 and out_w > 0 and (out_h * out_w <= GEMM_MAX_OUTPUT_PIXELS or few_columns or pointwise_bf16):
            names.append("gemm")
        channels = min(self.in_channels, self.out_channels)
        plain_3x3 = self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
        if plain_3x3 and x.dtype == torch.float32 and channels >= WINOGRAD_TIMED_MIN_CHANNELS:
            names.append("winograd")
        if plain_3x3 and x.dtype == torch.bfloat16 and _winograd_bf16.supports(self.weight.shape, 1, 1, x.shape[2],
                                                                                x.shape[3]):
            names.append("winograd_bf16")
        return names

    def heuristic(self, names: list[str]) -> str:
        """The untimed choice among ``names`` (see ``WINOGRAD_MIN_CHANNELS``)."""
        if "gemm" in names:
            return "gemm"
        if "winograd" in names and min(self.in_channels, self.out_channels) >= WINOGRAD_MIN_CHANNELS:
            return "winograd"
        return "torch"

    def algorithm(self, x: torch.Tensor) -> str:
        """"winograd", "gemm" or "torch" for input ``x`` (already in ``compute_dtype``): the
        fastest for a training step of this layer on this machine, timed on the first such
        input and remembered (:mod:`mtkernels.fuse.tuning`)."""
        names = self.candidates(x)
        if len(names) == 1:
            return names[0]
        from .fuse import tuning
        from .fuse.layers import layer_signature

        bucket = tuning.batch_bucket(x.shape[0])
        kind = (bucket, x.dtype, tuple(x.shape[1:]), x.requires_grad)
        if torch.compiler.is_compiling():  # no timing in a trace: what eager timed, else the fixed rule
            return self.__dict__.get("_chosen_algorithms", {}).get(kind, self.heuristic(names))
        chosen = self.__dict__.setdefault("_chosen_algorithms", {})
        if kind not in chosen:
            key = (f"training_conv:{layer_signature(self)}:in{'x'.join(map(str, x.shape[1:]))}:{x.dtype}"
                   f":input_grad{int(x.requires_grad)}:cpu:b{bucket}")
            chosen[kind] = tuning.choose(key, names, lambda name: self._training_step(name, x.requires_grad), x,
                                         self.heuristic(names))
        return chosen[kind]

    def _training_step(self, algorithm: str, input_grad: bool):
        """What tuning times: forward and backward of this layer by ``algorithm``, on
        detached copies (the model's gradients are left alone)."""
        weight, bias = (None if p is None else p.detach().requires_grad_() for p in (self.weight, self.bias))

        def step(x: torch.Tensor) -> None:
            with torch.enable_grad():
                x = x.detach().requires_grad_(input_grad)
                y = self._run(algorithm, x, weight, bias)
                torch.autograd.grad(y, [t for t in (x, weight, bias) if t is not None and t.requires_grad],
                                    torch.ones_like(y))
        return step

    def _run(self, algorithm: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The conv of ``x`` (in ``compute_dtype``) by ``algorithm``, from the float32 ``weight``
        and ``bias``: the bf16 Winograd op rounds them to bfloat16 itself and gives their
        gradients in float32; the others compute from bfloat16 copies (:meth:`cast`)."""
        if algorithm == "winograd_bf16":
            return conv_winograd_bf16(x, weight, bias)
        _, weight, bias = self.cast(x, weight, bias)
        if algorithm == "winograd":
            return winograd_conv3x3(x, weight, bias)
        if algorithm == "gemm":
            return gemm_conv2d(x, weight, bias, self.stride[0], self.padding[0])
        return self._conv_forward(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (x,) = self.cast(x)
        return self._run(self.algorithm(x), x, self.weight, self.bias)


def as_training_conv(conv: nn.Conv2d) -> TrainingConv2d:
    """Turn ``conv`` into a :class:`TrainingConv2d` in place (same object and parameters)."""
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    conv.__class__ = TrainingConv2d
    return conv


class TrainingLinear(ComputeDtype, nn.Linear):
    """``nn.Linear`` computing in its ``compute_dtype`` (the mixed-precision training path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self.cast(x, self.weight, self.bias))


def _float32_logits(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16)."""
    from .fuse.precision import matrix_units

    return matrix_units()["bf16"] != "float32 emulation"


_warned_no_bf16 = False


def training_dtype(precision: str) -> torch.dtype:
    """The compute dtype for ``precision``: float32 for "fp32", and for "bf16" bfloat16
    where the CPU has a bfloat16 unit, else float32 (with one warning per process:
    emulated bfloat16 is slower than float32)."""
    global _warned_no_bf16
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(TRAINING_PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and not native_bf16():
        if not _warned_no_bf16:
            warnings.warn("precision='bf16': this CPU has no bfloat16 unit (neither AMX-BF16 nor AVX512-BF16); "
                          "training runs in float32", RuntimeWarning, stacklevel=3)
            _warned_no_bf16 = True
        return torch.float32
    return TRAINING_PRECISIONS[precision]


def fuse_for_training(model: nn.Module, convs: bool = True, precision: str = "fp32") -> nn.Module:
    """Make every ``BatchNorm2d`` directly followed by a ``ReLU`` in an ``nn.Sequential`` a
    :class:`BatchNormReLU2d` (the same object, its class changed) and the ReLU an
    ``Identity``; one also followed by ``nn.MaxPool2d(2, 2)`` a
    :class:`BatchNormReLUPool2d`, the pool an ``Identity`` too; a module whose forward
    applies ReLU after its own BatchNorms through :func:`bn_relu` lists them by defining
    ``fuse_for_training(self)``, which calls :func:`as_bn_relu` on each. With ``convs``,
    every ``nn.Conv2d`` also becomes a :class:`TrainingConv2d`. ``precision="bf16"`` (see
    the module docstring) makes every conv and linear layer compute in bfloat16 and the
    model return float32 logits; it needs ``convs``. Changes ``model`` in place and
    returns it; ``state_dict`` is unchanged."""
    dtype = training_dtype(precision)
    if dtype != torch.float32 and not convs:
        raise ValueError("precision='bf16' needs convs=True: the convolutions are what compute in bfloat16")
    for p in model.parameters() if precision == "bf16" else ():
        if p.dtype != torch.float32:
            raise ValueError(f"precision='bf16' needs a float32 model, got a {p.dtype} parameter")
    for module in model.modules():
        if hasattr(module, "fuse_for_training") and module is not model:
            module.fuse_for_training()
        if convs and type(module) is nn.Conv2d:
            as_training_conv(module)
        if dtype != torch.float32 and type(module) is nn.Linear:
            module.__class__ = TrainingLinear
        if isinstance(module, ComputeDtype):
            module.compute_dtype = dtype
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second, third in zip(names, names[1:], names[2:] + [None]):
            bn, relu = module._modules[first], module._modules[second]
            if type(bn) is nn.BatchNorm2d and isinstance(relu, nn.ReLU):
                pool = third is not None and is_pool2x2(module._modules[third])
                as_bn_relu(bn, pool)
                module._modules[second] = nn.Identity()
                if pool:
                    module._modules[third] = nn.Identity()
    if dtype != torch.float32 and _float32_logits not in model._forward_hooks.values():
        model.register_forward_hook(_float32_logits)
    return model
