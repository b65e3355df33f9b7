"""Training-mode BatchNorm + ReLU, forward and backward, on BKNet's activations at batch 128
(channels-last float32): PyTorch's BatchNorm2d then ReLU against
``mtkernels.BatchNormReLU2d`` in the same run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table

import mtkernels

SUITE = "batchnorm_relu"
BATCH = 128
SHAPES = ((32, 48), (64, 24), (128, 12), (256, 6))  # (channels, side) of BKNet's four blocks


@pytest.mark.parametrize("impl", ["pytorch", "mtkernels"])
@pytest.mark.parametrize("channels,side", SHAPES)
def test_batchnorm_relu_forward_backward(benchmark, device, channels, side, impl):
    if device == "cuda":
        pytest.skip("the fused op is CPU-only; CUDA runs PyTorch's BatchNorm")
    torch.manual_seed(0)
    x = torch.randn(BATCH, channels, side, side).to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)
    module = (mtkernels.BatchNormReLU2d if impl == "mtkernels" else torch.nn.BatchNorm2d)(channels)

    def step():
        y = module(x)
        y = F.relu(y) if impl == "pytorch" else y
        torch.autograd.grad(y, (x, module.weight, module.bias), grad)
    measure(benchmark, step, device, SUITE, rounds=10, warmup=2, shape=f"{channels}x{side}x{side}", impl=impl)


@register_report(SUITE)
def report(device, measurements):
    t = {(m["shape"], m["impl"]): m["seconds"] for m in measurements}
    rows = []
    for channels, side in SHAPES:
        shape = f"{channels}x{side}x{side}"
        if (shape, "pytorch") in t and (shape, "mtkernels") in t:
            rows.append({"activation": shape, "MB": f"{BATCH * channels * side * side * 4 / 1e6:.1f}",
                         "pytorch ms": f"{t[(shape, 'pytorch')] * 1e3:.2f}",
                         "mtkernels ms": f"{t[(shape, 'mtkernels')] * 1e3:.2f}",
                         "speedup": f"{t[(shape, 'pytorch')] / t[(shape, 'mtkernels')]:.2f}x"})
    if not rows:
        return None
    notes = (f"Forward + backward (input, weight and bias gradients) of training-mode BatchNorm + ReLU at batch "
             f"{BATCH}, channels-last float32, median of 10.")
    path = write_table(SUITE, device, rows, ["activation", "MB", "pytorch ms", "mtkernels ms", "speedup"],
                       f"BatchNorm + ReLU in training, {device}", notes)
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png",
                   [("", [r["activation"] for r in rows],
                     {i: [float(r[f"{i} ms"]) for r in rows] for i in ("pytorch", "mtkernels")})],
                   "ms per forward + backward", f"BatchNorm + ReLU at batch {BATCH} ({device})")
    return path
