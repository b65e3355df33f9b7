"""Plans of a fused multi-task network: per input shape, the steps that compute it.

A plan is the list of the layers' chosen implementations, called one after another without
module dispatch (at batch 1 that dispatch costs about as much as a small layer), with
every run of layers that have whole-layer C++ kernels optionally joined into one
:class:`ChainStep`. Which layer implementation and whether to chain are decisions of
:mod:`mtkernels.fuse.tuning`, made once per batch bucket and kept on disk; a plan itself is
cheap to build and is kept for at most ``max_plans`` input shapes (least recently used
dropped). Plans hold the tensors they read; they are rebuilt when any parameter of the
network is moved, converted, loaded or updated in place.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..device_path import takes_cuda_path
from ..lru import LruCache
from . import tuning
from .layers import (
    ChannelsLastFlatten,
    DerivedState,
    FusedConv2d,
    FusedHeads,
    FusedLinear,
    layer_signature,
    parameter_epoch,
)

__all__ = ["ChainStep", "FusedMultiTaskNet"]

# Batch buckets where a C++ layer chain is offered: what it saves is the Python and dispatch
# between layers (10-15 us each), under 1% of a pass from 16 images up, where timing the two
# plans costs seconds and their measured order flips from run to run.
CHAIN_BUCKETS = ("1", "2-3", "4-15")


def chain_output_shape(layer: nn.Module, shape: torch.Size, bf16: bool) -> Optional[tuple[int, ...]]:
    """``layer``'s output shape in a ``_C.LayerChain`` for input of ``shape`` (in bfloat16 with
    ``bf16``), or None where no C++ kernel runs it (modules without one: ResNet's blocks)."""
    kernel_shape = getattr(layer, "chain_output_shape", None)
    return None if kernel_shape is None else kernel_shape(shape, bf16)


class ChainStep:
    """Consecutive fused layers (convs with whole-layer C++ kernels, channels-last flattens,
    linear layers) run by one C++ call (``_C.LayerChain``) for one float32 CPU input shape,
    with the intermediate activations in buffers kept here. At batch 1 this beats calling
    the layers' fastest kernels one by one from Python: every layer's weights push the
    Python and dispatcher code out of the caches, so each call between layers costs
    10-15 us there. The C++ chain holds a reference to every tensor it addresses.

    With ``bf16`` the convs run the direct bfloat16 kernel (``mtkernels.ops.conv_bf16``):
    the input is rounded into a zero-bordered bfloat16 buffer, each conv writes the interior
    of the next one's, and the last conv writes float32 for the (float32) layers after it.
    With ``winograd`` too, the convs that the bf16 Winograd kernel takes run it instead
    (``mtkernels.ops.conv_winograd_bf16``: fewer products, for large batches)."""

    def __init__(self, layers: Sequence[nn.Module], shape: torch.Size, bf16: bool = False, winograd: bool = False):
        from .. import _C
        from ..ops.conv_bf16 import bordered_input

        self.chain, self._buffers, self._input = _C.LayerChain(), [], None
        shapes = [torch.Size(shape)]
        for index, layer in enumerate(layers):
            out_shape = chain_output_shape(layer, shapes[-1], bf16)
            if out_shape is None:
                raise ValueError(f"layer {index} ({type(layer).__name__}) has no {'bfloat16 ' if bf16 else ''}C++ "
                                 f"kernel for input {tuple(shapes[-1])}")
            shapes.append(torch.Size(out_shape))
        writers = [i for i, layer in enumerate(layers) if not isinstance(layer, ChannelsLastFlatten)]
        bf16_conv = [bf16 and isinstance(layers[i], FusedConv2d) for i in writers]
        if bf16_conv[0]:
            self._input = bordered_input(shape[0], shape[2], shape[3], shape[1])
            self._buffers.append(self._input)
        for position, index in enumerate(writers):
            dst = None  # the last writer's output is run()'s destination
            if index != writers[-1]:
                out = shapes[index + 1]
                if bf16_conv[position] and bf16_conv[position + 1]:
                    dst = bordered_input(out[0], out[2], out[3], out[1])
                else:
                    dst = self._empty(out)
                self._buffers.append(dst)
            if winograd and bf16_conv[position]:
                layers[index].append_to_chain(self.chain, shapes[index], dst, bf16, winograd=True)
            else:
                layers[index].append_to_chain(self.chain, shapes[index], dst, bf16)
        self.in_shape, self.out_shape = shapes[0], shapes[-1]

    @staticmethod
    def _empty(shape: torch.Size) -> torch.Tensor:
        """An activation buffer: channels-last for feature maps."""
        return torch.empty(shape, memory_format=torch.channels_last) if len(shape) == 4 else torch.empty(shape)

    def tensors(self) -> list[torch.Tensor]:
        """The activation buffers this step owns."""
        return self._buffers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.in_shape or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"this chain runs float32 CPU input of shape {tuple(self.in_shape)}, "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")
        if self._input is not None:
            from ..ops.conv_bf16 import fill_bordered

            x = fill_bordered(self._input, x)
        else:
            x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.contiguous()
        out = self._empty(self.out_shape)
        self.chain.run(x.data_ptr(), out.data_ptr(), torch.get_num_threads())
        return out


def _replay(steps: Sequence[Callable], x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    for step in steps:
        x = step(x)
    return x


class FusedMultiTaskNet(DerivedState):
    """Fused trunk + fused heads, with the input checks of the original network. Output:
    ``[N, sum(num_classes)]`` logits; an empty batch gives an empty ``[0, sum(C)]``."""

    def __init__(self, trunk: nn.Module, heads: nn.Module, in_channels: Optional[int], input_size: Optional[int],
                 num_classes: Sequence[int], task_names: Sequence[str], max_plans: int = 8,
                 max_plan_bytes: int = 256 << 20):
        super().__init__()
        self.trunk, self.heads = trunk, heads
        self.in_channels, self.input_size = in_channels, input_size
        self.num_classes, self.task_names = tuple(num_classes), tuple(task_names)
        self._plans = LruCache(max_plans, max_plan_bytes)
        self._plans_token = None
        self.plannable = isinstance(trunk, nn.Sequential) and isinstance(heads, FusedHeads)
        self._layers = list(trunk) + list(heads.layers) if self.plannable else []
        self._parameter_list = tuple(self.parameters())
        self._signature = hashlib.sha1("|".join(map(layer_signature, self._layers)).encode()).hexdigest()[:16]
        self.precision = "fp32"  # set by fuse_for_inference (see mtkernels.fuse.precision)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input must be a 4-D [N, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"input must be a floating tensor, got {x.dtype}")
        model_dtype, model_device = self._parameter_list[-1].dtype, self._parameter_list[-1].device
        if x.device != model_device:
            raise ValueError(f"input is on {x.device}, the model on {model_device}")
        if takes_cuda_path(x):
            allowed = (torch.float32, torch.float16, torch.bfloat16) if self.precision == "fp32" else (torch.float32,)
        else:
            allowed = (model_dtype,)
        if x.dtype not in allowed:
            raise TypeError(f"input dtype {x.dtype} is not supported on {x.device.type} by this model "
                            f"(parameters in {model_dtype}); use one of {allowed}")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the model takes {self.in_channels}")
        if self.input_size is not None and tuple(x.shape[2:]) != (self.input_size, self.input_size):
            raise ValueError(f"input is {x.shape[2]}x{x.shape[3]}, the model takes "
                             f"{self.input_size}x{self.input_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.shape[0] == 0:
            return torch.empty((0, sum(self.num_classes)), dtype=x.dtype, device=x.device)
        if self.precision == "fp32":
            return self._forward(x)
        if self.precision == "int8" and (x.device.type != "cpu" or takes_cuda_path(x)):
            raise ValueError(f"a precision='int8' model runs on the CPU (oneDNN), got input on {x.device}")
        # Integer arithmetic and oneDNN's ReLU post-op carry no NaN: an image with a non-finite
        # pixel gets NaN logits here, as it does in eager float32.
        logits = self._forward(x).float()
        if bool(torch.isfinite(x.sum())):  # one reduction: a NaN or inf anywhere makes the sum non-finite
            return logits
        corrupt = ~torch.isfinite(x).flatten(1).all(dim=1)
        return logits.masked_fill_(corrupt.unsqueeze(1), math.nan)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or takes_cuda_path(x) or not self.plannable:
            return self.heads(self.trunk(x))
        token = self._parameters_token()
        if token != self._plans_token:
            self._plans.clear()
            self._plans_token = token
        key = (tuple(x.shape), x.dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(x)
            self._plans[key] = plan
        return _replay(plan, x)

    def _parameters_token(self) -> tuple:
        """Changes whenever a parameter is moved, converted, loaded or updated in place."""
        return (parameter_epoch(), *(p._version for p in self._parameter_list))

    def _plan(self, x: torch.Tensor) -> list[Callable]:
        """The steps for input like ``x``: each layer's implementation for its batch bucket
        (timed on at most ``tuning.TUNING_BATCH`` images where no decision is stored), with
        runs of layers that have whole-layer C++ kernels chained where that was measured
        faster."""
        n, bucket = x.shape[0], tuning.batch_bucket(x.shape[0])
        probe = x[:tuning.TUNING_BATCH].contiguous(memory_format=torch.channels_last)
        steps, chainable, h = [], [], probe
        for layer in self._layers:
            if isinstance(layer, FusedConv2d):
                step = layer.implementation(h, bucket)
            elif isinstance(layer, nn.Flatten):
                step = functools.partial(torch.flatten, start_dim=layer.start_dim, end_dim=layer.end_dim)
            else:
                step = layer.forward
            joins = (isinstance(layer, (FusedConv2d, FusedLinear, ChannelsLastFlatten)) and self.precision == "fp32"
                     and x.dtype == torch.float32 and layer.chain_output_shape(h.shape) is not None)
            chainable.append((layer, h.shape[1:]) if joins else None)
            steps.append(step)
            h = step(h)
        if self.precision != "fp32":
            return self._reduced_plan(steps, probe, n, bucket)
        if bucket not in CHAIN_BUCKETS or self._chained(steps, chainable, n) is None:
            return steps
        key = self._plan_key(x.shape, x.dtype, bucket)
        chain_probe = functools.lru_cache(maxsize=1)(lambda: self._chained(steps, chainable, probe.shape[0]))
        plans = {"layers": lambda: functools.partial(_replay, steps),
                 "chain": lambda: functools.partial(_replay, chain_probe())}
        choice = tuning.choose(key, list(plans), lambda name: plans[name](), probe,
                               heuristic="chain" if bucket == "1" else "layers")
        return self._chained(steps, chainable, n) if choice == "chain" else steps

    def _plan_key(self, shape: torch.Size, kind: object, bucket: str) -> str:
        """The tuning key of this network's plan choice for input ``shape`` in ``bucket``;
        ``kind`` is the input dtype (float32 plans) or the precision (reduced ones)."""
        return f"net:{self._signature}:in{'x'.join(map(str, shape[1:]))}:{kind}:cpu:b{bucket}"

    def _reduced_plan(self, steps: list, probe: torch.Tensor, batch: int, bucket: str) -> list:
        """For a reduced-precision net: ``steps``, or where it was timed faster:

        * ``bf16_chain``: the leading layers that mtkernels' direct bfloat16 conv can run, as one
          C++ chain, then the rest of ``steps``. At batches 1-15 that is the whole network where
          every layer has a kernel (the heads in float32: the chain's linear kernel streams each
          weight row once per batch); at larger ones (bf16 nets only: int8 convs are faster
          there) the convs, the heads staying oneDNN GEMMs.
        * ``bf16_winograd_chain``: the same chain, its convs that mtkernels' bf16 Winograd conv
          takes running that (BKNet's convs after the first: 1.25x the direct chain at batch 1,
          1.4x from 8 on, here).
        * ``float32_chain`` (batches 1-15): the whole network as a float32 C++ chain, the more
          exact, where every layer has a kernel.

        At batch 1 a chain saves the per-call set-up of oneDNN and of Python between layers."""
        small = bucket in CHAIN_BUCKETS
        builders = {}
        shapes = self._chain_shapes(probe.shape, bf16=True, whole=small)
        length = len(shapes)
        if length >= 2 and (small or self.precision == "bf16"):
            builders["bf16_chain"] = functools.partial(self._bf16_chain_plan, steps, length, False)
            if any(isinstance(layer, FusedConv2d) and layer._winograd_bf16_ok(shape)
                   for layer, shape in zip(self._layers, shapes)):
                builders["bf16_winograd_chain"] = functools.partial(self._bf16_chain_plan, steps, length, True)
        if small and len(self._chain_shapes(probe.shape, bf16=False, whole=True)) == len(self._layers):
            builders["float32_chain"] = lambda shape: [ChainStep(self._layers, shape)]
        if not builders:
            return steps
        # Untimed, the bf16 chain runs where it takes every conv (BKNet: measured faster at every
        # batch size); a part of the convs (the 4-task CNN's first three) measured slower.
        every_conv = not any(isinstance(layer, FusedConv2d) for layer in self._layers[length:])
        names = ["reduced", *builders]
        # A chain is built for the probe only when it is timed, not where a decision is stored.
        choice = tuning.choose(self._plan_key(probe.shape, self.precision, bucket), names,
                               lambda name: functools.partial(_replay, steps if name == "reduced"
                                                              else builders[name](probe.shape)),
                               probe, heuristic="bf16_chain" if "bf16_chain" in builders and every_conv else "reduced")
        return steps if choice == "reduced" else builders[choice](torch.Size((batch, *probe.shape[1:])))

    def _bf16_chain_plan(self, steps: list, length: int, winograd: bool, shape: torch.Size) -> list:
        return [ChainStep(self._layers[:length], shape, bf16=True, winograd=winograd), *steps[length:]]

    def _chain_shapes(self, shape: torch.Size, bf16: bool, whole: bool) -> list[torch.Size]:
        """The input shapes of the leading layers a ``ChainStep`` (in bfloat16 with ``bf16``) can
        run for input of ``shape``: up to the first without a kernel, or (``whole`` False) the
        first linear layer."""
        shapes = []
        for layer in self._layers:
            out = None if isinstance(layer, FusedLinear) and not whole else chain_output_shape(layer, shape, bf16)
            if out is None:
                break
            shapes.append(shape)
            shape = torch.Size(out)
        return shapes

    @staticmethod
    def _chained(steps: list, chainable: list, batch: int) -> Optional[list]:
        """``steps`` with every run of chainable layers that has two or more kernels as one
        :class:`ChainStep` for ``batch`` images; None where there is no such run."""
        out, index, found = [], 0, False
        while index < len(steps):
            end = index
            while end < len(steps) and chainable[end] is not None:
                end += 1
            run = [layer for layer, _ in chainable[index:end]]
            if sum(not isinstance(layer, ChannelsLastFlatten) for layer in run) >= 2:
                out.append(ChainStep(run, torch.Size((batch, *chainable[index][1]))))
                index, found = end, True
            else:
                out.append(steps[index])
                index += 1
        return out if found else None

    def plan_memory(self) -> dict:
        """How many input shapes have a plan, and the bytes held by plans and layer caches
        (activation buffers, packed and transformed weights), parameters not included."""
        seen: set[int] = set()
        plan_bytes = self._plans.nbytes(seen)
        layer_bytes = sum(m.derived_bytes(seen) for m in self.modules() if isinstance(m, DerivedState))
        return {"plans": len(self._plans), "max_plans": self._plans.capacity, "max_plan_bytes": self._plans.max_bytes,
                "bytes": plan_bytes + layer_bytes}

    @property
    def heads_dtype(self) -> torch.dtype:
        return self._parameter_list[-1].dtype
