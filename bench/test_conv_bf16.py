"""mtkernels' bfloat16 convs on BKNet's 3x3 layers at batch 1 and 128: the direct conv
(``mtkernels.ops.conv_bf16``) and the Winograd F(2x2, 3x3) conv
(``mtkernels.ops.conv_winograd_bf16``), against oneDNN's bfloat16 convolution through PyTorch
(weights packed once, its ReLU post-op, then PyTorch's 2x2 max-pool where the layer pools), in
the same run; and BKNet at batch 1 whole: the bfloat16 C++ chains against OpenVINO's defaults
(bf16 on this CPU) on the same face. All rows compute in bfloat16 with float32 accumulation."""

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
from mtkernels.ops.conv_winograd_bf16 import pack_conv_winograd_bf16_weight

SUITE = "conv_bf16"
# (C_in, C_out, side, pool) of BKNet's convs after the one-channel first one.
LAYERS = ((32, 32, 48, True), (32, 64, 24, False), (64, 64, 24, True), (64, 128, 12, False),
          (128, 128, 12, True), (128, 256, 6, False), (256, 256, 6, False), (256, 256, 6, True))


def layer_name(c_in, c_out, side, pool):
    return f"{c_in}->{c_out} {side}x{side}{' +pool' if pool else ''}"


BATCHES = (1, 128)
IMPLS = {"onednn": "oneDNN", "direct": "mtkernels direct", "winograd": "mtkernels Winograd"}
CHAINS = {"mtkernels_bf16_chain": False, "mtkernels_bf16_winograd_chain": True}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("c_in,c_out,side,pool", LAYERS)
def test_conv_bf16_layer(benchmark, device, c_in, c_out, side, pool, batch, impl):
    if device != "cpu":
        pytest.skip("a CPU kernel")
    if impl == "onednn" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("PyTorch's oneDNN runs no bf16 convolution on this CPU")
    torch.manual_seed(0)
    weight, bias = torch.randn(c_out, c_in, 3, 3) / (3 * c_in ** 0.5), torch.randn(c_out)
    threads = torch.get_num_threads()
    if impl == "onednn":
        x = torch.randn(batch, c_in, side, side).bfloat16().contiguous(memory_format=torch.channels_last)
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight.bfloat16(), [1, 1], [1, 1], [1, 1], 1,
                                                              list(x.shape))
        bias16 = bias.bfloat16()

        def run():
            y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias16, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            return F.max_pool2d(y, 2, 2) if pool else y
    else:
        src = bordered_input(batch, side, side, c_in)
        src[:, 1:-1, 1:-1].normal_()
        out = side // 2 if pool else side
        dst = bordered_input(batch, out, out, c_out)
        if impl == "direct":
            packed = pack_conv_bf16_weight(weight)

            def run():
                _C.conv_bf16_nhwc(src.data_ptr(), packed.data_ptr(), bias.data_ptr(), dst.data_ptr(), batch, side,
                                  side, c_in, c_out, 3, 1, 1, True, pool, 1, threads)
        else:
            packed = pack_conv_winograd_bf16_weight(weight)

            def run():
                _C.conv_winograd_bf16_nhwc(src.data_ptr(), packed.data_ptr(), bias.data_ptr(), dst.data_ptr(), batch,
                                           side, side, c_in, c_out, 1, True, pool, 1, threads)
    measure(benchmark, run, device, SUITE, rounds=200 if batch == 1 else 20, warmup=20 if batch == 1 else 3,
            layer=layer_name(c_in, c_out, side, pool), impl=impl, batch=batch,
            macs=9 * c_in * c_out * side * side * batch)


@pytest.mark.parametrize("impl", ["openvino", *CHAINS])
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
        chain = ChainStep(fused._layers, x.shape, bf16=True, winograd=CHAINS[impl])

        def run():
            return chain(x)
    measure(benchmark, run, device, SUITE, rounds=300, warmup=30, layer="BKNet, whole network", impl=impl, batch=1,
            macs=0)


def _us(m: dict) -> str:
    return f"{m['seconds'] * 1e6 / m['batch']:.1f}"


def _gflops(m: dict) -> str:
    return f"{2 * m['macs'] / m['seconds'] / 1e9:.0f}"


@register_report(SUITE)
def report(device, measurements):
    t = {(m["layer"], m["batch"], m["impl"]): m for m in measurements}
    rows = []
    for batch in BATCHES:
        for layer in [layer_name(*spec) for spec in LAYERS]:
            got = {impl: t[(layer, batch, impl)] for impl in IMPLS if (layer, batch, impl) in t}
            if len(got) < len(IMPLS):
                continue
            ours = min(got["direct"]["seconds"], got["winograd"]["seconds"])
            rows.append({"batch": batch, "layer": layer, **{f"{IMPLS[i]} us/img": _us(got[i]) for i in IMPLS},
                         **{f"{IMPLS[i]} GFLOP/s": _gflops(got[i]) for i in IMPLS},
                         "best mtkernels vs oneDNN": f"{got['onednn']['seconds'] / ours:.2f}x"})
    whole = "BKNet, whole network"
    if all((whole, 1, impl) in t for impl in ("openvino", *CHAINS)):
        theirs = t[(whole, 1, "openvino")]
        for impl, winograd in CHAINS.items():
            ours = t[(whole, 1, impl)]
            rows.append({"batch": 1, "layer": f"{whole}, {'Winograd' if winograd else 'direct'} chain "
                                              "(oneDNN column: OpenVINO default)",
                         "oneDNN us/img": _us(theirs), f"mtkernels {'Winograd' if winograd else 'direct'} us/img":
                         _us(ours), "best mtkernels vs oneDNN": f"{theirs['seconds'] / ours['seconds']:.2f}x"})
    if not rows:
        return None
    notes = ("bfloat16 activations and weights, float32 accumulation; median of 200 runs at batch 1, 20 at batch 128 "
             "(300 for the whole network); us per image. GFLOP/s counts the direct conv's 9 taps of every output, "
             "those on the zero border included, which oneDNN and the direct kernel skip (21% of a 6x6 map's "
             "products, 3% of a 48x48 one's); the Winograd kernel computes 16 products per 2x2 tile instead of 36, "
             "so its rate here is an equivalent one. oneDNN: torch.ops.mkldnn._convolution_pointwise with "
             "pre-packed weights and its ReLU post-op, then F.max_pool2d where the layer pools. mtkernels: "
             f"_C.conv_bf16_nhwc and _C.conv_winograd_bf16_nhwc (kernel variant {_C.isa()}), ReLU and pool in "
             "their epilogues, writing the next layer's zero-bordered input. Whole network: OpenVINO's default "
             "settings on `python -m models export`'s ONNX file against the mtkernels bf16 chains (bf16 convs, "
             "float32 heads), one face.")
    columns = ["batch", "layer", *[f"{name} us/img" for name in IMPLS.values()],
               *[f"{name} GFLOP/s" for name in IMPLS.values()], "best mtkernels vs oneDNN"]
    path = write_table(SUITE, device, rows, columns,
                       f"bfloat16 convs (BKNet's 3x3 layers) at batch 1 and 128, {device}", notes)
    panels = []
    for batch in BATCHES:
        layers = [r for r in rows if r["batch"] == batch and not r["layer"].startswith("BKNet")]
        if layers:
            panels.append((f"batch {batch}", [r["layer"].replace(" ", "\n") for r in layers],
                           {name: [float(r[f"{name} us/img"]) for r in layers] for name in IMPLS.values()}))
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png", panels, "us per image and layer",
                   f"BKNet's 3x3 convs in bf16 ({device})")
    return path
