"""Inference fusion: ``fuse_for_inference(model)`` returns an eval-only copy that computes
the same outputs with fewer, fused operations.

What is fused (all exact up to float rounding):

* BatchNorm after a conv / linear is folded into its weights and bias.
* conv + bias + ReLU (+ the 2x2/2 max-pool that follows) run as one module. CPU: each
  layer times its candidates on the first call for an input shape and keeps the fastest:
  oneDNN's fused convolution with a ReLU post-op and weights pre-packed once per shape,
  ``F.conv2d`` + in-place ReLU (both followed by a C++ NHWC pooling pass), a direct C++
  kernel for a one-input-channel 3x3 conv (the first layer), and for other 3x3 / stride 1
  convs Winograd F(2x2, 3x3) (2.25x fewer multiplications; bias, ReLU and the max-pool in
  the output transform, which writes only the pooled output), either as C++ input and
  output transforms around PyTorch's batched GEMM or as one C++ pass whose GEMM output
  stays in cache. CUDA: the Triton implicit-GEMM kernel of
  ``mtkernels.triton.conv`` (float32 / TF32, float16, bfloat16), the pool in its epilogue.
* BatchNorm that cannot be folded (pre-activation, between a residual add and a conv
  with zero padding) runs as one per-channel affine + ReLU.
* Dropout is removed.
* A flatten of a conv's channels-last output into a linear layer reads the activations in
  their memory order (H, W, C); the linear layer's columns are permuted to match.
* Multi-task heads (a model with ``trunk`` and ``branches`` whose branches are
  Linear/BN/ReLU/Dropout stacks of equal depth): the first layers of all branches become
  one GEMM, each later layer one block-diagonal GEMM, so the heads cost 2-3 GEMMs
  instead of 3 per task, and the output is the ``[N, sum(C)]`` logits directly.
* Any module may fuse itself by defining ``fuse_for_inference(self, fuser)`` and
  returning a module built from :class:`Fuser` helpers.

The model given is never modified.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .training import BatchNormReLU2d

__all__ = ["fuse_for_inference", "Fuser", "FusedConv2d", "FusedLinear", "AffineReLU", "FusedHeads",
           "FusedMultiTaskNet", "ChannelsLastFlatten", "flatten_channels_last", "fold_batchnorm"]


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale * x + shift, per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
    return scale.detach().clone(), shift.detach().clone()


def fold_batchnorm(weight: torch.Tensor, bias: Optional[torch.Tensor],
                   bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(layer(x))`` for a conv / linear ``layer`` (eval-mode BN)."""
    scale, shift = _bn_affine(bn)
    folded_w = weight * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    folded_b = shift if bias is None else bias * scale + shift
    return folded_w.detach().clone(), folded_b.detach().clone()


def fastest(candidates: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
            runs: int = 5, min_seconds: float = 1e-3) -> Callable[[torch.Tensor], torch.Tensor]:
    """The candidate with the lowest best-of-``runs`` time per call on ``x``. Each timing
    repeats a candidate until it covers ``min_seconds`` (a single 0.1 ms call is mostly
    timer noise), and the candidates take turns, so a slow spell of the machine hits all.
    Two untimed calls first build oneDNN primitives, packed weights and buffers."""
    repeats = []
    for run in candidates:
        run(x)
        start = time.perf_counter()
        run(x)
        repeats.append(max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-7))))
    best = [math.inf] * len(candidates)
    for _ in range(runs):
        for k, (run, n) in enumerate(zip(candidates, repeats)):
            start = time.perf_counter()
            for _ in range(n):
                run(x)
            best[k] = min(best[k], (time.perf_counter() - start) / n)
    return candidates[best.index(min(best))]


class FusedConv2d(nn.Module):
    """conv (BN folded in) + bias (+ ReLU) (+ 2x2/2 max-pool), channels-last activations."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, relu: bool = False,
                 pool: bool = False):
        super().__init__()
        weight, bias = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = (
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"FusedConv2d supports numeric zero padding, got {conv.padding!r}/{conv.padding_mode!r}")
        self.relu, self.pool = relu, pool
        self._packed: dict[tuple, torch.Tensor] = {}
        self._k_major: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self.chosen: dict[tuple, Callable] = {}  # input shape -> implementation measured fastest
        self.triton_ok = (self.groups == 1 and self.dilation == [1, 1] and len(set(self.stride)) == 1
                          and len(set(self.padding)) == 1)
        plain_3x3 = (tuple(weight.shape[2:]) == (3, 3) and self.stride == [1, 1] and self.padding == [1, 1]
                     and self.dilation == [1, 1] and self.groups == 1)
        self.single_channel_3x3 = plain_3x3 and weight.shape[1] == 1
        self.winograd_ok = plain_3x3 and weight.shape[1] > 1
        self._winograd_cache = None

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={tuple(self.stride)}, relu={self.relu}, pool={self.pool}")

    def _aten(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu_(y) if self.relu else y

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape[1:])
        packed = self._packed.get(key)
        if packed is None:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, self.padding, self.stride, self.dilation, self.groups, list(x.shape))
            self._packed[key] = packed
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if self.relu else "none", [], "")

    def _weight_k_major(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._k_major:
            from .ops.conv import conv_weight_k_major

            self._k_major[dtype] = (conv_weight_k_major(self.weight).to(dtype), self.bias.to(dtype))
        return self._k_major[dtype]

    def _direct_single_channel(self, x: torch.Tensor) -> torch.Tensor:
        from .ops.conv import conv3x3_single_channel

        return conv3x3_single_channel(x, *self._weight_k_major(torch.float32), self.relu)

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        from .triton.conv import conv2d_bias_act

        weight, bias = self._weight_k_major(x.dtype)
        return conv2d_bias_act(x, weight, bias, tuple(self.weight.shape[2:]), self.stride[0], self.padding[0],
                               self.relu, self.pool)

    def _winograd_operands(self):
        from .ops.conv import WinogradBuffers, winograd_weight, winograd_weight_blocked

        if self._winograd_cache is None:  # the shapes were checked when this candidate was offered
            u = winograd_weight(self.weight)
            self._winograd_cache = (u, winograd_weight_blocked(u), WinogradBuffers())
        return self._winograd_cache

    def _winograd(self, x: torch.Tensor) -> torch.Tensor:
        from .ops.conv import winograd_unchecked

        u, _, buffers = self._winograd_operands()
        return winograd_unchecked(x, u, self.bias, self.relu, self.pool, buffers)

    def _winograd_one_pass(self, x: torch.Tensor) -> torch.Tensor:
        from .ops.conv import winograd_one_pass_unchecked

        _, u_blocked, buffers = self._winograd_operands()
        return winograd_one_pass_unchecked(x, u_blocked, self.bias, self.relu, self.pool, buffers)

    def chain_output_shape(self, shape: torch.Size) -> Optional[tuple[int, ...]]:
        """Output shape for float32 CPU input of ``shape`` if a C++ kernel does the whole layer
        (so it can join a ``_C.LayerChain``), else None."""
        n, _, h, w = shape
        c_out = self.weight.shape[0]
        if self.single_channel_3x3 and not self.pool:
            return (n, c_out, h, w)
        if self.winograd_ok and not (self.pool and (h % 2 or w % 2)):
            return (n, c_out, h // 2, w // 2) if self.pool else (n, c_out, h, w)
        return None

    def append_to_chain(self, chain, shape: torch.Size, dst: int) -> None:
        """Append this layer (``chain_output_shape(shape)`` not None) to a ``_C.LayerChain``,
        writing to address ``dst`` (0: the chain's output)."""
        n, c_in, h, w = shape
        if self.single_channel_3x3:
            weight, bias = self._weight_k_major(torch.float32)
            chain.add_single_channel(weight.data_ptr(), bias.data_ptr(), dst, n, h, w, weight.shape[1], self.relu)
        else:
            _, u_blocked, buffers = self._winograd_operands()
            _, images_per_chunk, v = buffers.one_pass_plan(shape, self.bias.shape[0], self.pool, None)
            chain.add_winograd(u_blocked.data_ptr(), self.bias.data_ptr(), v.data_ptr(), dst, n, h, w, c_in,
                               self.bias.shape[0], images_per_chunk, self.relu, self.pool)

    def _pooled(self, impl: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``impl`` followed by the 2x2 max-pool (for implementations without it fused)."""
        if not self.pool:
            return impl

        def run(x: torch.Tensor) -> torch.Tensor:
            y = impl(x)
            if y.device.type == "cpu" and y.dtype == torch.float32:
                from .ops.conv import maxpool2x2

                return maxpool2x2(y)
            return F.max_pool2d(y, 2, 2)
        return run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        if x.is_cuda and self.triton_ok:
            return self._triton(x)  # pool fused in the kernel's epilogue
        impl = self.chosen.get(x.shape)
        if impl is None:
            cpu_f32 = x.device.type == "cpu" and x.dtype == torch.float32
            candidates = [self._aten]
            if cpu_f32 and _onednn_available():
                candidates.append(self._onednn)
            if cpu_f32 and self.single_channel_3x3:
                candidates.append(self._direct_single_channel)
            candidates = [self._pooled(c) for c in candidates]
            even = x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            if cpu_f32 and self.winograd_ok and (even or not self.pool):
                candidates += [self._winograd, self._winograd_one_pass]  # both pool in their output transform
            impl = fastest(candidates, x) if len(candidates) > 1 else candidates[0]
            self.chosen[x.shape] = impl
        return impl(x)


class FusedLinear(nn.Module):
    """linear (BN folded in) + bias (+ ReLU). A block-diagonal layer of equal blocks may also
    carry them as ``blocks`` ([T, out, in]): the CPU then runs one batched GEMM over the
    blocks instead of reading the zeros of the block-diagonal weight."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, relu: bool, blocks: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.relu = relu
        self.blocks = None
        if blocks is not None:
            if blocks.dim() != 3 or blocks.shape[0] * blocks.shape[1] != weight.shape[0] \
                    or blocks.shape[0] * blocks.shape[2] != weight.shape[1]:
                raise ValueError(f"blocks must be [T, out, in] tiling weight {tuple(weight.shape)}, "
                                 f"got {tuple(blocks.shape)}")
            self.blocks = nn.Parameter(blocks.detach().clone().contiguous(), requires_grad=False)

    def chain_output_shape(self, shape: torch.Size) -> Optional[tuple[int, ...]]:
        """Output shape for float32 CPU input of ``shape`` (a ``_C.LayerChain`` can run it)."""
        return (shape[0], self.weight.shape[0]) if len(shape) == 2 and shape[1] == self.weight.shape[1] else None

    def append_to_chain(self, chain, shape: torch.Size, dst: int) -> None:
        rows = self.weight.unsqueeze(0) if self.blocks is None else self.blocks  # [groups, out, in]
        chain.add_linear(rows.data_ptr(), self.bias.data_ptr(), dst, shape[0], rows.shape[0], rows.shape[2],
                         rows.shape[1], self.relu)

    @classmethod
    def from_layers(cls, linear: nn.Linear, bn: Optional[nn.BatchNorm1d] = None, relu: bool = False):
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        if bn is not None:
            weight, bias = fold_batchnorm(weight, bias, bn)
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return cls(weight, bias, relu)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, relu={self.relu}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from .triton.conv import linear_bias_act

            return linear_bias_act(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.relu)
        if self.blocks is not None:
            n, (count, _, width_in) = x.shape[0], self.blocks.shape
            y = torch.baddbmm(self.bias.view(count, 1, -1), x.reshape(n, count, width_in).transpose(0, 1),
                              self.blocks.transpose(1, 2))
            return (F.relu_(y) if self.relu else y).transpose(0, 1).reshape(n, -1)
        y = torch.addmm(self.bias, x, self.weight.t())
        return F.relu_(y) if self.relu else y


class AffineReLU(nn.Module):
    """Eval-mode BatchNorm2d followed by ReLU, as one per-channel multiply-add + ReLU."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale, shift = _bn_affine(bn)
        self.scale = nn.Parameter(scale.reshape(1, -1, 1, 1), requires_grad=False)
        self.shift = nn.Parameter(shift.reshape(1, -1, 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu_(torch.addcmul(self.shift, x, self.scale))


class FusedHeads(nn.Module):
    """All task branches of a multi-task net as len(layers) GEMMs: the first layers side by
    side, every later layer block-diagonal (on the CPU a batched GEMM where the branches'
    layers have equal shapes). Output: ``[N, sum(C)]``."""

    def __init__(self, layers: Sequence[FusedLinear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_branches(cls, branches: Sequence[Sequence[FusedLinear]]) -> "FusedHeads":
        depth = len(branches[0])
        layers = []
        for level in range(depth):
            parts = [b[level] for b in branches]
            weights = [p.weight for p in parts]
            weight = torch.cat(weights) if level == 0 else torch.block_diag(*weights)
            equal = level > 0 and len({w.shape for w in weights}) == 1
            blocks = torch.stack(weights) if equal else None
            layers.append(FusedLinear(weight, torch.cat([p.bias for p in parts]), parts[0].relu, blocks))
        return cls(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class FusedBranches(nn.Module):
    """Branches that are not plain MLPs (e.g. per-task residual stages): run each, concatenate."""

    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


class ChainStep:
    """Consecutive fused layers (convs with whole-layer C++ kernels, channels-last flattens,
    linear layers) run by one C++ call (``_C.LayerChain``) for one float32 CPU input shape,
    with the intermediate activations in buffers kept here. At batch 1 this beats calling
    the layers' fastest kernels one by one from Python: every layer's weights push the
    Python and dispatcher code out of the caches, so each call between layers costs
    10-15 us there."""

    def __init__(self, layers: Sequence[nn.Module], shape: torch.Size):
        from . import _C

        self.chain, self._buffers = _C.LayerChain(), []
        shapes = [torch.Size(shape)]
        for index, layer in enumerate(layers):
            out_shape = layer.chain_output_shape(shapes[-1])
            if out_shape is None:
                raise ValueError(f"layer {index} ({type(layer).__name__}) has no C++ kernel for input "
                                 f"{tuple(shapes[-1])}")
            shapes.append(torch.Size(out_shape))
        writers = [i for i, layer in enumerate(layers) if not isinstance(layer, ChannelsLastFlatten)]
        for index in writers:
            dst = 0  # the last writer's output is run()'s destination
            if index != writers[-1]:
                self._buffers.append(self._empty(shapes[index + 1]))
                dst = self._buffers[-1].data_ptr()
            layers[index].append_to_chain(self.chain, shapes[index], dst)
        self.out_shape = shapes[-1]

    @staticmethod
    def _empty(shape: torch.Size) -> torch.Tensor:
        """An activation buffer: channels-last for feature maps."""
        return torch.empty(shape, memory_format=torch.channels_last) if len(shape) == 4 else torch.empty(shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.contiguous()
        out = self._empty(self.out_shape)
        self.chain.run(x.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out


class ChannelsLastFlatten(nn.Module):
    """Flattens [N, C, H, W] in (H, W, C) order: free for channels-last activations, where
    ``nn.Flatten``'s (C, H, W) order copies. The next layer's columns are permuted to match
    (see :func:`flatten_channels_last`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    @staticmethod
    def chain_output_shape(shape: torch.Size) -> Optional[tuple[int, ...]]:
        """In a chain the input is channels-last already: nothing to run."""
        return (shape[0], math.prod(shape[1:])) if len(shape) == 4 else None


def flatten_channels_last(layers: nn.Sequential, after: Optional[FusedLinear] = None) -> None:
    """In place, in fused ``layers``: a ``Flatten`` of a conv's output that feeds a linear
    layer becomes a :class:`ChannelsLastFlatten` and the linear layer's weight columns go
    from (C, H, W) to (H, W, C) order. ``after`` is the layer that follows ``layers``, if
    it is not in them (the first fused head layer after a trunk)."""
    following = list(layers)[1:] + [after]
    channels = None  # of the feature map flowing into the current layer, while it is known
    for index, (layer, successor) in enumerate(zip(list(layers), following)):
        if isinstance(layer, FusedConv2d):
            channels = layer.weight.shape[0]
        elif isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1 \
                and channels is not None and isinstance(successor, FusedLinear) and successor.blocks is None \
                and successor.weight.shape[1] % channels == 0:
            weight = successor.weight.detach()
            successor.weight.data = (weight.reshape(weight.shape[0], channels, -1).transpose(1, 2)
                                     .reshape(weight.shape).contiguous())
            layers[index] = ChannelsLastFlatten()
            channels = None
        elif not isinstance(layer, (AffineReLU, nn.Identity)):
            channels = None


class FusedMultiTaskNet(nn.Module):
    """Fused trunk + fused heads, with the input checks of the original network."""

    def __init__(self, trunk: nn.Module, heads: nn.Module, in_channels: Optional[int], input_size: Optional[int],
                 num_classes: Sequence[int], task_names: Sequence[str]):
        super().__init__()
        self.trunk, self.heads = trunk, heads
        self.in_channels, self.input_size = in_channels, input_size
        self.num_classes, self.task_names = tuple(num_classes), tuple(task_names)
        self._plans: dict[torch.Size, list[Callable[[torch.Tensor], torch.Tensor]]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input must be a 4-D [N, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"input must be a floating tensor, got {x.dtype}")
        allowed = (torch.float32, torch.float16, torch.bfloat16) if x.is_cuda else (self.heads_dtype,)
        if x.dtype not in allowed:
            raise TypeError(f"input dtype {x.dtype} is not supported on {x.device.type}; use one of {allowed}")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the model takes {self.in_channels}")
        if self.input_size is not None and tuple(x.shape[2:]) != (self.input_size, self.input_size):
            raise ValueError(f"input is {x.shape[2]}x{x.shape[3]}, the model takes "
                             f"{self.input_size}x{self.input_size}")
        plan = self._plans.get(x.shape) if x.device.type == "cpu" else None
        return self._first_run(x) if plan is None else self._replay(plan, x)

    def _first_run(self, x: torch.Tensor) -> torch.Tensor:
        """Run layer by layer; on the CPU, remember what each layer ran for this input shape
        so later calls replay it without module dispatch (at batch 1 that dispatch costs
        about as much as a small layer). Where consecutive layers all have whole-layer C++
        kernels, the plan that runs them as one :class:`ChainStep` is timed against the one
        that calls each layer's fastest kernel, and the faster is kept."""
        layers = (list(self.trunk) if isinstance(self.trunk, nn.Sequential) else None,
                  list(self.heads.layers) if isinstance(self.heads, FusedHeads) else None)
        if x.device.type != "cpu" or None in layers:
            return self.heads(self.trunk(x))
        first_input, steps, chainable = x, [], []
        for layer in layers[0] + layers[1]:
            y = layer(x)
            if isinstance(layer, FusedConv2d):
                steps.append(layer.chosen[x.shape])
            elif isinstance(layer, nn.Flatten):
                steps.append(functools.partial(torch.flatten, start_dim=layer.start_dim, end_dim=layer.end_dim))
            else:
                steps.append(layer.forward)
            joins = (isinstance(layer, (FusedConv2d, FusedLinear, ChannelsLastFlatten)) and x.dtype == torch.float32
                     and layer.chain_output_shape(x.shape) is not None)
            chainable.append((layer, x.shape) if joins else None)
            x = y
        self._plans[first_input.shape] = steps
        chained = self._chained(steps, chainable)
        if chained is None:
            return x
        plans = [functools.partial(self._replay, plan) for plan in (steps, chained)]
        self._plans[first_input.shape] = (steps, chained)[plans.index(fastest(plans, first_input))]
        return self(first_input)  # every call of a shape gives the same result, the first too

    @staticmethod
    def _chained(steps: list, chainable: list) -> Optional[list]:
        """``steps`` with every run of chainable layers that has two or more kernels as one
        :class:`ChainStep`; None where there is no such run."""
        out, index, found = [], 0, False
        while index < len(steps):
            end = index
            while end < len(steps) and chainable[end] is not None:
                end += 1
            run = [layer for layer, _ in chainable[index:end]]
            if sum(not isinstance(layer, ChannelsLastFlatten) for layer in run) >= 2:
                out.append(ChainStep(run, chainable[index][1]))
                index, found = end, True
            else:
                out.append(steps[index])
                index += 1
        return out if found else None

    @staticmethod
    def _replay(steps: list, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for step in steps:
            x = step(x)
        return x

    @property
    def heads_dtype(self) -> torch.dtype:
        return next(self.heads.parameters()).dtype


class Fuser:
    """Pattern rewriting used by ``fuse_for_inference``; also handed to modules'
    ``fuse_for_inference(fuser)`` hooks."""

    conv = staticmethod(FusedConv2d)
    affine_relu = staticmethod(AffineReLU)

    def module(self, m: nn.Module) -> nn.Module:
        hook = getattr(m, "fuse_for_inference", None)
        if callable(hook):
            return hook(self)
        if isinstance(m, nn.Sequential):
            return self.sequential(list(m))
        if isinstance(m, nn.Dropout):
            return nn.Identity()
        for name, child in list(m.named_children()):
            setattr(m, name, self.module(child))
        return m

    def sequential(self, layers: list[nn.Module]) -> nn.Sequential:
        out: list[nn.Module] = []
        i = 0

        def take(kind) -> Optional[nn.Module]:
            nonlocal i
            if i < len(layers) and isinstance(layers[i], kind):
                i += 1
                return layers[i - 1]
            return None

        while i < len(layers):
            layer = layers[i]
            i += 1
            if isinstance(layer, nn.Conv2d):
                bn = take(nn.BatchNorm2d)
                if isinstance(bn, BatchNormReLU2d):  # fuse_for_training's BN + ReLU; its ReLU slot is an Identity
                    take(nn.Identity)
                    relu = True
                else:
                    relu = take(nn.ReLU) is not None
                pool = self._take_pool2x2(layers, i)
                i += pool
                out.append(FusedConv2d(layer, bn, relu, bool(pool)))
            elif isinstance(layer, nn.Linear):
                bn = take(nn.BatchNorm1d)
                relu = take(nn.ReLU) is not None
                out.append(FusedLinear.from_layers(layer, bn, relu))
            elif isinstance(layer, BatchNormReLU2d):
                take(nn.Identity)
                out.append(AffineReLU(layer))
            elif isinstance(layer, nn.BatchNorm2d) and i < len(layers) and isinstance(layers[i], nn.ReLU):
                i += 1
                out.append(AffineReLU(layer))
            elif isinstance(layer, nn.Dropout):
                continue
            else:
                out.append(self.module(layer))
        return nn.Sequential(*out)

    @staticmethod
    def _take_pool2x2(layers, i) -> int:
        # Skipping dropout (gone in eval) between the ReLU and the pool.
        j = i
        while j < len(layers) and isinstance(layers[j], nn.Dropout):
            j += 1
        if j < len(layers) and isinstance(layers[j], nn.MaxPool2d):
            p = layers[j]
            if p.kernel_size in (2, (2, 2)) and p.stride in (2, (2, 2)) and p.padding in (0, (0, 0)) \
                    and p.dilation in (1, (1, 1)) and not p.ceil_mode:
                return j - i + 1
        return 0

    def heads(self, branches: Sequence[nn.Module]) -> nn.Module:
        # A lone Linear is a one-layer branch.
        fused = [self.sequential([b]) if isinstance(b, nn.Linear) else self.module(b) for b in branches]
        mlps = [list(b) if isinstance(b, nn.Sequential) else None for b in fused]
        if all(m is not None and all(isinstance(layer, FusedLinear) for layer in m) for m in mlps):
            depths = {len(m) for m in mlps}
            relus = {tuple(layer.relu for layer in m) for m in mlps}
            if len(depths) == 1 and len(relus) == 1:
                return FusedHeads.from_branches(mlps)
        return FusedBranches(fused)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BN folded, conv+bias+ReLU(+pool) fused, dropout
    removed and multi-task heads merged; same outputs, ``model`` untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    fuser = Fuser()
    with torch.no_grad():
        if hasattr(work, "trunk") and hasattr(work, "branches"):
            trunk, heads = fuser.module(work.trunk), fuser.heads(list(work.branches))
            if isinstance(trunk, nn.Sequential):
                flatten_channels_last(trunk, heads.layers[0] if isinstance(heads, FusedHeads) else None)
            fused = FusedMultiTaskNet(trunk, heads,
                                      getattr(work, "in_channels", None), getattr(work, "input_size", None),
                                      getattr(work, "num_classes", ()), getattr(work, "task_names", ()))
        else:
            fused = fuser.module(work)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.eval()
