"""The bf16 Winograd weight gradient (``mtkernels::conv_winograd_bf16_weight_grad``) against
oneDNN's bfloat16 weight gradient through PyTorch (``aten.convolution_backward``, the one
``torch.autocast`` runs), on BKNet's 3x3 layers after the first, at batch 128, in the same
run. Both read bfloat16 x and d y and sum in float32; oneDNN writes a bfloat16 gradient,
mtkernels a float32 one."""

from __future__ import annotations

import pytest
import torch
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table
from test_conv_bf16 import LAYERS

from mtkernels import _C
from mtkernels.ops.conv_training import conv_winograd_bf16_weight_grad

SUITE = "conv_winograd_bf16_weight_grad"
BATCH = 128
IMPLS = {"onednn": "oneDNN", "winograd": "mtkernels Winograd"}
# The weight gradient's input sides: the conv's (a pooling layer pools after it).
SHAPES = sorted({(c_in, c_out, side) for c_in, c_out, side, _ in LAYERS}, key=lambda s: (-s[2], s[0], s[1]))


def layer_name(c_in: int, c_out: int, side: int) -> str:
    return f"{c_in}->{c_out} {side}x{side}"


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("c_in,c_out,side", SHAPES)
def test_weight_grad(benchmark, device, c_in, c_out, side, impl):
    if device != "cpu":
        pytest.skip("a CPU kernel")
    if impl == "onednn" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("PyTorch's oneDNN runs no bf16 convolution on this CPU")
    torch.manual_seed(0)
    x = torch.randn(BATCH, c_in, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(BATCH, c_out, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
    weight = torch.empty(c_out, c_in, 3, 3, dtype=torch.bfloat16)
    if impl == "onednn":
        def run():
            return torch.ops.aten.convolution_backward(grad_y, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                       1, [False, True, False])
    else:
        def run():
            return conv_winograd_bf16_weight_grad(x, grad_y)
    measure(benchmark, run, device, SUITE, rounds=10, warmup=2, layer=layer_name(c_in, c_out, side), impl=impl,
            macs=9 * c_in * c_out * side * side * BATCH)


@register_report(SUITE)
def report(device, measurements):
    t = {(m["layer"], m["impl"]): m for m in measurements}
    rows = []
    for layer in [layer_name(*shape) for shape in SHAPES]:
        if not all((layer, impl) in t for impl in IMPLS):
            continue
        got = {impl: t[(layer, impl)] for impl in IMPLS}
        rows.append({"layer": layer, **{f"{IMPLS[i]} ms": f"{got[i]['seconds'] * 1e3:.2f}" for i in IMPLS},
                     **{f"{IMPLS[i]} GFLOP/s": f"{2 * got[i]['macs'] / got[i]['seconds'] / 1e9:.0f}" for i in IMPLS},
                     "Winograd vs oneDNN": f"{got['onednn']['seconds'] / got['winograd']['seconds']:.2f}x"})
    if not rows:
        return None
    notes = (f"Batch {BATCH}, median of 10 runs, ms per layer. GFLOP/s counts the direct weight gradient's 9 taps per "
             "output pixel (2 x C_in x C_out x 9 x N x H x W); the Winograd kernel computes 16 products per 2x2 tile "
             "instead of 36, so its rate is an equivalent one. oneDNN: aten.convolution_backward on bfloat16 "
             "channels-last tensors, weight gradient only. mtkernels: conv_winograd_bf16_weight_grad (kernel "
             f"variant {_C.isa()}), G^T dU G included.")
    columns = ["layer", *[f"{name} ms" for name in IMPLS.values()], *[f"{name} GFLOP/s" for name in IMPLS.values()],
               "Winograd vs oneDNN"]
    path = write_table(SUITE, device, rows, columns,
                       f"bfloat16 weight gradients (BKNet's 3x3 layers) at batch {BATCH}, {device}", notes)
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png",
                   [(f"batch {BATCH}", [r["layer"].replace(" ", "\n") for r in rows],
                     {name: [float(r[f"{name} ms"]) for r in rows] for name in IMPLS.values()})],
                   "ms per layer", f"bf16 weight gradients of BKNet's 3x3 convs ({device})")
    return path
