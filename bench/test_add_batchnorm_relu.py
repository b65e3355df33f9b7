"""A residual network's sum and the BatchNorm + ReLU after it, in training, on ResNet ver1's
residual activations at batch 128 (channels-last, bfloat16 and float32), forward and
backward with a gradient reaching the sum through the next identity shortcut as in the
network: PyTorch's add, BatchNorm2d and ReLU; the add then ``mtkernels.BatchNormReLU2d``;
``mtkernels.training.add_bn_relu``'s one op (``mtkernels::add_batchnorm_relu``). All in one
run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table

import mtkernels
from mtkernels.training import add_bn_relu

SUITE = "add_batchnorm_relu"
BATCH = 128
SHAPES = ((256, 24), (512, 12), (1024, 6), (2048, 3))  # (channels, side) of ResNet ver1's four stages' sums
IMPLS = ("pytorch", "add+bn_relu", "add_bn_relu")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("channels,side", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_add_batchnorm_relu_forward_backward(benchmark, device, dtype, channels, side, impl):
    if device == "cuda":
        pytest.skip("the fused op is CPU-only")
    torch.manual_seed(0)

    def activation(grad=False):
        t = torch.randn(BATCH, channels, side, side).to(DTYPES[dtype]).contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(grad)
    x, residual, grad_total, grad_y = activation(True), activation(True), activation(), activation()
    bn = (torch.nn.BatchNorm2d if impl == "pytorch" else mtkernels.BatchNormReLU2d)(channels)

    def step():
        if impl == "add_bn_relu":
            total, y = add_bn_relu(bn, x, residual)
        else:
            total = x + residual
            y = F.relu(bn(total)) if impl == "pytorch" else bn(total)
        torch.autograd.grad((total, y), (x, residual, bn.weight, bn.bias), (grad_total, grad_y))
    measure(benchmark, step, device, SUITE, rounds=10, warmup=2, shape=f"{channels}x{side}x{side}", impl=impl,
            dtype=dtype)


@register_report(SUITE)
def report(device, measurements):
    t = {(m["dtype"], m["shape"], m["impl"]): m["seconds"] for m in measurements}
    rows = []
    for dtype in DTYPES:
        for channels, side in SHAPES:
            shape = f"{channels}x{side}x{side}"
            if all((dtype, shape, impl) in t for impl in IMPLS):
                ms = {impl: t[(dtype, shape, impl)] * 1e3 for impl in IMPLS}
                rows.append({"dtype": dtype, "activation": shape,
                             "MB": f"{BATCH * channels * side * side * DTYPES[dtype].itemsize / 1e6:.1f}",
                             **{f"{impl} ms": f"{v:.2f}" for impl, v in ms.items()},
                             "fused vs pytorch": f"{ms['pytorch'] / ms['add_bn_relu']:.2f}x",
                             "fused vs add+bn_relu": f"{ms['add+bn_relu'] / ms['add_bn_relu']:.2f}x"})
    if not rows:
        return None
    notes = (f"Forward + backward (the gradients of both terms of the sum, BatchNorm's weight and bias) of "
             f"x + residual followed by training-mode BatchNorm + ReLU, at batch {BATCH}, channels-last, median of "
             f"10; a gradient reaches the sum itself too (the next block's identity shortcut). pytorch = its add, "
             f"BatchNorm2d and ReLU; add+bn_relu = its add, then mtkernels.BatchNormReLU2d; add_bn_relu = "
             f"mtkernels.training.add_bn_relu (one op). Parameters float32 in every row.")
    columns = ["dtype", "activation", "MB", *(f"{impl} ms" for impl in IMPLS), "fused vs pytorch",
               "fused vs add+bn_relu"]
    path = write_table(SUITE, device, rows, columns, f"Residual sum + BatchNorm + ReLU in training, {device}", notes)
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png",
                   [(dtype, [r["activation"] for r in rows if r["dtype"] == dtype],
                     {impl: [float(r[f"{impl} ms"]) for r in rows if r["dtype"] == dtype] for impl in IMPLS})
                    for dtype in DTYPES if any(r["dtype"] == dtype for r in rows)],
                   "ms per forward + backward", f"x + residual, BatchNorm + ReLU at batch {BATCH} ({device})")
    return path
