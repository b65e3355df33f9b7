"""Rewriting a module graph into fused layers: ``fuse_for_inference(model)``.

What is fused (all exact up to float rounding):

* BatchNorm after a conv / linear is folded into its weights and bias.
* conv + bias + ReLU (+ the 2x2/2 max-pool that follows) run as one
  :class:`~mtkernels.fuse.layers.FusedConv2d`, which picks its kernel per input kind.
* BatchNorm that cannot be folded (pre-activation, between a residual add and a conv
  with zero padding) runs as one per-channel affine + ReLU.
* Dropout is removed.
* A flatten of a conv's channels-last output into a linear layer reads the activations in
  their memory order (H, W, C); the linear layer's columns are permuted to match.
* Multi-task heads (:meth:`Fuser.multitask`): the first layers of all branches become one
  GEMM, each later layer one block-diagonal GEMM, and the output is the ``[N, sum(C)]``
  logits directly.
* Any module fuses itself by defining ``fuse_for_inference(self, fuser)`` and returning a
  module built from :class:`Fuser` helpers; a multi-task network returns
  ``fuser.multitask(...)``.

The model given is never modified.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from ..training import BatchNormReLU2d, BatchNormReLUPool2d, is_pool2x2
from .layers import AffineReLU, ChannelsLastFlatten, FusedBranches, FusedConv2d, FusedHeads, FusedLinear
from .plans import FusedMultiTaskNet
from .precision import calibrate_int8, check_arguments, set_compute_dtype

__all__ = ["Fuser", "flatten_channels_last", "fuse_for_inference"]


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


class Fuser:
    """Pattern rewriting used by ``fuse_for_inference``; also handed to modules'
    ``fuse_for_inference(fuser)`` hooks."""

    conv = staticmethod(FusedConv2d)
    affine_relu = staticmethod(AffineReLU)

    def multitask(self, trunk: nn.Module, branches: Sequence[nn.Module], num_classes: Sequence[int],
                  task_names: Sequence[str] = (), in_channels: Optional[int] = None,
                  input_size: Optional[int] = None) -> FusedMultiTaskNet:
        """A shared ``trunk`` feeding one branch per task, outputs concatenated: the trunk
        fused, the branches merged into one set of GEMMs where they are equal-depth MLPs, the
        trunk's final flatten reading its channels-last output in memory order."""
        fused_trunk, heads = self.module(trunk), self.heads(list(branches))
        if isinstance(fused_trunk, nn.Sequential):
            flatten_channels_last(fused_trunk, heads.layers[0] if isinstance(heads, FusedHeads) else None)
        return FusedMultiTaskNet(fused_trunk, heads, in_channels, input_size, num_classes, task_names)

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
                if isinstance(bn, BatchNormReLUPool2d):  # and its pool slot too
                    pool = take(nn.Identity) is not None
                else:
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
                if isinstance(layer, BatchNormReLUPool2d):
                    take(nn.Identity)
                    out.append(nn.MaxPool2d(2, 2))
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
        return j - i + 1 if j < len(layers) and is_pool2x2(layers[j]) else 0

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


def fuse_for_inference(model: nn.Module, precision: str = "fp32",
                       calibration: Optional[torch.Tensor] = None, winograd: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with BN folded, conv+bias+ReLU(+pool) fused, dropout
    removed and multi-task heads merged; ``model`` untouched. ``precision="fp32"``: same
    outputs. ``"bf16"``: computed in bfloat16, float32 logits. ``"int8"``: convolutions in
    uint8 x int8 with activation scales from ``calibration`` (a float32 ``[N >= 32, C, H, W]``
    tensor of sample inputs); see :mod:`mtkernels.fuse.precision`. ``winograd=False``: no conv
    runs a Winograd algorithm (float32's or bf16's; they take fewer products and round
    transformed values: the bf16 Winograd conv's logit error measured 1.3x the direct conv's
    on BKNet), where the timing would otherwise pick them for speed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(winograd, bool):
        raise TypeError(f"winograd must be True or False, got {winograd!r}")
    check_arguments(precision, calibration)
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        fused = Fuser().module(work)
    for p in fused.parameters():
        p.requires_grad_(False)
    for conv in fused.modules():
        if isinstance(conv, FusedConv2d):
            conv.allow_winograd = winograd
    fused.eval()
    if precision == "fp32":
        return fused
    parameters = list(fused.parameters())
    if any(p.dtype != torch.float32 for p in parameters):
        raise ValueError(f"precision={precision!r} needs a float32 model, got parameters in "
                         f"{sorted({str(p.dtype) for p in parameters})}")
    if precision == "int8":
        if any(p.device.type != "cpu" for p in parameters):
            raise ValueError("precision='int8' runs on the CPU (oneDNN's int8 convolutions); move the model to the CPU")
        calibrate_int8(fused, calibration)
    set_compute_dtype(fused, torch.bfloat16)
    for module in fused.modules():
        if isinstance(module, FusedMultiTaskNet):
            module.precision = precision
    return fused
