"""Reduced precision for fused inference: bf16 compute, int8 convolutions from calibration.

``fuse_for_inference(model, precision=...)`` first fuses in float32, then:

* ``"bf16"``: every fused conv and linear layer computes in bfloat16 (weights converted once,
  float32 accumulation inside oneDNN; a ReLU may be oneDNN's post-op where that was timed
  faster), activations flow in bfloat16, and the network returns float32 logits.
* ``"int8"``: convolutions with more than one input channel run oneDNN's uint8 x int8
  convolution: symmetric per-output-channel int8 weights, and a per-tensor uint8 activation
  scale for each conv input taken from the calibration images (min / max of what reaches
  it in float32). A ReLU conv whose output goes straight into another int8 conv writes that
  conv's uint8 input directly (requantized in the conv's epilogue); every other output is
  bfloat16, and the rest of the network (the one-channel first conv, BatchNorm + ReLU,
  residual adds, the heads) runs in bfloat16 as above.

Integer arithmetic and oneDNN's ReLU post-op (which maps NaN to 0) carry no NaN, so in both
precisions the network flags each image with a non-finite pixel and returns NaN logits for
it, as eager float32 does (NaN spreads over every logit of its image there).

Which matrix unit runs the reduced-precision convolutions is oneDNN's choice (AMX where the
CPU and OS allow it, else AVX512-BF16 / VNNI, else its float32 emulation);
:func:`matrix_units` says what this CPU offers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16", "int8")
MIN_CALIBRATION_IMAGES = 32
# Calibration images run through the float32 network this many at a time (bounded memory).
CALIBRATION_BATCH = 64


def check_arguments(precision: object, calibration: object) -> None:
    """ValueError naming the argument for an unknown precision, int8 without calibration
    images, or calibration images that are not a float32 ``[N >= 32, C, H, W]`` tensor."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "int8":
        if calibration is not None:
            raise ValueError(f"calibration is only used with precision='int8', got precision={precision!r}")
        return
    if calibration is None:
        raise ValueError("precision='int8' needs calibration: a float32 [N, C, H, W] tensor of at least "
                         f"{MIN_CALIBRATION_IMAGES} sample inputs")
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(f"calibration must be a float32 [N, C, H, W] tensor, got {type(calibration).__name__}")
    if calibration.dtype != torch.float32 or calibration.dim() != 4:
        raise ValueError(f"calibration must be a float32 [N, C, H, W] tensor, got {calibration.dim()}-D "
                         f"{calibration.dtype} of shape {tuple(calibration.shape)}")
    if calibration.shape[0] < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"calibration must hold at least {MIN_CALIBRATION_IMAGES} images, got "
                         f"{calibration.shape[0]}")
    if not bool(torch.isfinite(calibration).all()):
        raise ValueError("calibration must be finite: it holds NaN or inf")


def matrix_units() -> dict[str, str]:
    """The instructions this CPU (and OS) offer for each reduced precision, best first."""
    from .. import _C

    features = _C.cpu_features()
    amx = features.get("amx-permitted", False)
    bf16 = ("amx-bf16" if amx and features.get("amx-bf16") else
            "avx512-bf16" if features.get("avx512bf16") else "float32 emulation")
    int8 = ("amx-int8" if amx and features.get("amx-int8") else
            "avx512-vnni" if features.get("avx512vnni") else "avx2 / float32 emulation")
    return {"bf16": bf16, "int8": int8}


@dataclass(frozen=True)
class Activation8:
    """A uint8 activation: ``x = scale * (q - zero_point)``."""

    scale: float
    zero_point: int

    @classmethod
    def from_range(cls, low: float, high: float) -> "Activation8":
        """The finest scale that covers [low, high] (and 0, so zero is exact)."""
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255.0
        if not scale > 0.0 or not math.isfinite(scale):
            scale = 1.0  # an all-zero input: any scale represents it exactly
        return cls(scale, int(min(255, max(0, round(-low / scale)))))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops.conv import quantize_u8

        return quantize_u8(x, self.scale, self.zero_point)


@dataclass
class Int8Conv:
    """How one fused conv runs in int8: its input's uint8 encoding, and its output's
    (None: bfloat16 output)."""

    input: Activation8
    output: Optional[Activation8] = None


def _range_of(x: torch.Tensor) -> tuple[float, float]:
    """(max, min) of a conv input: the scale covers all of it (99.99th / 99.9th percentiles
    measured no better on BKNet and the ResNets, and clip held-out images)."""
    return float(x.max()), float(x.min())


def _fused_layers(fused: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in fused.modules() if isinstance(m, kind)]


def set_compute_dtype(fused: nn.Module, dtype: torch.dtype) -> None:
    from .layers import FusedConv2d, FusedLinear

    for layer in _fused_layers(fused, (FusedConv2d, FusedLinear)):
        layer.compute_dtype = dtype


def _unfused_forward(fused: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fused(x)`` through its modules (so their hooks run), not a replayed plan."""
    from .plans import FusedMultiTaskNet

    if isinstance(fused, FusedMultiTaskNet):
        return fused.heads(fused.trunk(x))
    return fused(x)


def calibrate_int8(fused: nn.Module, calibration: torch.Tensor) -> int:
    """Give every conv of the float32 ``fused`` network that has more than one input channel
    its int8 encoding, from the range of its inputs over ``calibration``; link each ReLU conv
    whose output is the next int8 conv's input. Returns how many convs run in int8."""
    from .layers import FusedConv2d

    convs = [c for c in _fused_layers(fused, FusedConv2d) if c.weight.shape[1] * c.groups > 1]
    ranges = {id(c): [math.inf, -math.inf] for c in convs}
    produced_by: dict[int, FusedConv2d] = {}
    feeds: dict[int, set[int]] = {}  # producer id -> ids of the modules seen taking its output
    outputs: list[torch.Tensor] = []  # keeps the tensors alive so their ids stay unique

    def before(module, args):
        x = args[0]
        if id(module) in ranges:
            span = ranges[id(module)]
            high, low = _range_of(x)
            span[0], span[1] = min(span[0], low), max(span[1], high)
        producer = produced_by.get(id(x))
        if producer is not None:
            feeds.setdefault(id(producer), set()).add(id(module))

    def after(module, args, out):
        produced_by[id(out)] = module
        outputs.append(out)

    hooks = [m.register_forward_pre_hook(before) for m in fused.modules() if m is not fused]
    hooks += [c.register_forward_hook(after) for c in convs]
    try:
        with torch.no_grad():
            for start in range(0, calibration.shape[0], CALIBRATION_BATCH):
                produced_by.clear()
                outputs.clear()
                _unfused_forward(fused, calibration[start:start + CALIBRATION_BATCH].to(fused_device(fused)))
    finally:
        for hook in hooks:
            hook.remove()
    by_id = {id(c): c for c in convs}
    for conv in convs:
        conv.int8 = Int8Conv(Activation8.from_range(*ranges[id(conv)]))
    for conv in convs:
        # Only a conv whose output no other module reads, and which is non-negative (ReLU),
        # hands over uint8 with zero point 0.
        consumers = feeds.get(id(conv), set())
        if conv.relu and len(consumers) == 1:
            consumer = by_id.get(next(iter(consumers)))
            if consumer is not None and consumer.int8.input.zero_point == 0:
                conv.int8.output = consumer.int8.input
    return len(convs)


def fused_device(fused: nn.Module) -> torch.device:
    return next(fused.parameters()).device
