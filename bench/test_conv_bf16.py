"""The direct bfloat16 conv (``mtkernels.ops.conv_bf16``) on BKNet's 3x3 layers at batch 1,
against oneDNN's bfloat16 convolution through PyTorch (weights packed once, its ReLU post-op,
then PyTorch's 2x2 max-pool where the layer pools), in the same run; and BKNet at batch 1
whole: the bfloat16 C++ chain against OpenVINO's defaults (bf16 on this CPU) on the same
faces. All rows compute in bfloat16 with float32 accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table
from test_inference import network, onnx_file, openvino_runner

from mtkernels import _C
from mtkernels.fuse.plans import ChainStep
from mtkernels.ops.conv_bf16 import bordered_input, pack_conv_bf16_weight

SUITE = "conv_bf16"
# (C_in, C_out, side, pool) of BKNet's convs after the one-channel first one.
LAYERS = ((32, 32, 48, True), (32, 64, 24, False), (64, 64, 24, True), (64, 128, 12, False),
          (128, 128, 12, True), (128, 256, 6, False), (256, 256, 6, False), (256, 256, 6, True))


def layer_name(c_in, c_out, side, pool):
    return f"{c_in}->{c_out} {side}x{side}{' +pool' if pool else ''}"


@pytest.mark.parametrize("impl", ["onednn", "mtkernels"])
@pytest.mark.parametrize("c_in,c_out,side,pool", LAYERS)
def test_conv_bf16_layer(benchmark, device, c_in, c_out, side, pool, impl):
    if device != "cpu":
        pytest.skip("a CPU kernel")
    if impl == "onednn" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("PyTorch's oneDNN runs no bf16 convolution on this CPU")
    torch.manual_seed(0)
    weight, bias = torch.randn(c_out, c_in, 3, 3) / (3 * c_in ** 0.5), torch.randn(c_out)
    if impl == "mtkernels":
        src, packed = bordered_input(1, side, side, c_in), pack_conv_bf16_weight(weight)
        src[:, 1:-1, 1:-1].normal_()
        out = side // 2 if pool else side
        dst = bordered_input(1, out, out, c_out)

        def run():
            _C.conv_bf16_nhwc(src.data_ptr(), packed.data_ptr(), bias.data_ptr(), dst.data_ptr(), 1, side, side,
                              c_in, c_out, 3, 1, 1, True, pool, 1, torch.get_num_threads())
    else:
        x = torch.randn(1, c_in, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight.bfloat16(), [1, 1], [1, 1], [1, 1], 1,
                                                              list(x.shape))
        bias16 = bias.bfloat16()

        def run():
            y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias16, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            return F.max_pool2d(y, 2, 2) if pool else y
    measure(benchmark, run, device, SUITE, rounds=200, warmup=20, layer=layer_name(c_in, c_out, side, pool),
            impl=impl, macs=9 * c_in * c_out * side * side)


@pytest.mark.parametrize("impl", ["openvino", "mtkernels_bf16_chain"])
def test_bknet_batch1(benchmark, device, impl):
    if device != "cpu":
        pytest.skip("a CPU path")
    from models.export import calibration_faces

    model = network("bknet")
    x = calibration_faces(model.input_size, 1)
    if impl == "openvino":
        run, _ = openvino_runner(onnx_file("bknet"), x, {})
    else:
        import mtkernels

        fused = mtkernels.fuse_for_inference(model, precision="bf16")
        chain = ChainStep(fused._layers, x.shape, bf16=True)

        def run():
            return chain(x)
    measure(benchmark, run, device, SUITE, rounds=300, warmup=30, layer="BKNet, whole network", impl=impl, macs=0)


@register_report(SUITE)
def report(device, measurements):
    t = {(m["layer"], m["impl"]): m for m in measurements}
    rows = []
    for layer in [layer_name(*spec) for spec in LAYERS]:
        if (layer, "onednn") in t and (layer, "mtkernels") in t:
            ours, theirs = t[(layer, "mtkernels")], t[(layer, "onednn")]
            rows.append({"layer": layer, "oneDNN us": f"{theirs['seconds'] * 1e6:.1f}",
                         "mtkernels us": f"{ours['seconds'] * 1e6:.1f}",
                         "oneDNN GFLOP/s": f"{2 * theirs['macs'] / theirs['seconds'] / 1e9:.0f}",
                         "mtkernels GFLOP/s": f"{2 * ours['macs'] / ours['seconds'] / 1e9:.0f}",
                         "speedup": f"{theirs['seconds'] / ours['seconds']:.2f}x"})
    whole = "BKNet, whole network"
    if (whole, "openvino") in t and (whole, "mtkernels_bf16_chain") in t:
        ours, theirs = t[(whole, "mtkernels_bf16_chain")], t[(whole, "openvino")]
        rows.append({"layer": whole + " (oneDNN column: OpenVINO default)",
                     "oneDNN us": f"{theirs['seconds'] * 1e6:.1f}", "mtkernels us": f"{ours['seconds'] * 1e6:.1f}",
                     "oneDNN GFLOP/s": "", "mtkernels GFLOP/s": "",
                     "speedup": f"{theirs['seconds'] / ours['seconds']:.2f}x"})
    if not rows:
        return None
    notes = ("Batch 1, bfloat16 activations and weights, float32 accumulation, median of 200 (300 for the whole "
             "network). GFLOP/s counts all 9 taps of every output, those on the zero border included, which both "
             "kernels skip (21% of a 6x6 map's products, 3% of a 48x48 one's). oneDNN: "
             "torch.ops.mkldnn._convolution_pointwise with pre-packed weights and its ReLU post-op, then "
             "F.max_pool2d where the layer pools. mtkernels: _C.conv_bf16_nhwc "
             f"(kernel variant {_C.isa()}), ReLU and pool in its epilogue, writing the next layer's zero-bordered "
             "input. Whole network: OpenVINO's default settings on `python -m models export`'s ONNX file against "
             "the mtkernels bf16 chain (bf16 convs, float32 heads), one face.")
    path = write_table(SUITE, device, rows, ["layer", "oneDNN us", "mtkernels us", "oneDNN GFLOP/s",
                                             "mtkernels GFLOP/s", "speedup"],
                       f"Direct bfloat16 conv (BKNet's 3x3 layers) at batch 1, {device}", notes)
    layers = [r for r in rows if not r["layer"].startswith("BKNet")]
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png",
                   [("", [r["layer"].replace(" ", "\n") for r in layers],
                     {name: [float(r[f"{name} us"]) for r in layers] for name in ("oneDNN", "mtkernels")})],
                   "us per layer (batch 1)", f"BKNet's 3x3 convs in bf16 at batch 1 ({device})")
    return path
