"""Table 3: inference time per image of Multi-task BKNet and ResNet ver1 / ver2.

All in one run, at batch 1 and 128, on real faces (scikit-image's LFW crops), each row in
the precision its name says:

* float32: eager (NCHW), eager channels-last, torch.compile, ONNX Runtime, OpenVINO forced to
  f32 (both on ``python -m models export``'s ONNX file), mtkernels.fuse_for_inference;
* bfloat16: eager channels-last in bf16, torch.compile with freezing of that model,
  OpenVINO's defaults (bf16 where the CPU has it), mtkernels bf16;
* int8: ONNX Runtime static QDQ quantization, mtkernels int8 (both calibrated on the same
  64 faces);
* CUDA only: fp16 channels-last eager, its torch.compile with freezing, and the fused Triton
  path in fp16.

Every row gets its per-task argmax agreement with eager float32 (at batch 128, the worst
task), and each precision's matmul rate is measured in the same run, with each mtkernels
row's share of its precision's rate.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table

import models
import mtkernels
from models.export import CALIBRATION_FACES, calibration_faces, export_onnx
from models.report import PAPER_TABLE3
from models.summary import count_macs

SUITE = "inference"
NETWORKS = ("bknet", "resnet-v1", "resnet-v2")
BATCHES = (1, 128)
FP32_IMPLS = ("eager", "channels_last", "compile", "onnxruntime", "openvino_f32", "fused")
BF16_IMPLS = ("channels_last_bf16", "compile_bf16", "openvino", "fused_bf16")
INT8_IMPLS = ("onnxruntime_int8", "fused_int8")
FP16_IMPLS = ("channels_last_fp16", "compile_fp16", "fused_fp16")  # CUDA only
IMPLS = FP32_IMPLS + BF16_IMPLS + INT8_IMPLS + FP16_IMPLS
CPU_ONLY = {"onnxruntime", "openvino_f32", "openvino", "onnxruntime_int8", "fused_int8"}
STOCK_BF16 = ("channels_last_bf16", "compile_bf16", "openvino")
MATMUL_SIZE = 2048
FACES = 200  # all of scikit-image's LFW crops: the timing inputs and the agreement set


@functools.lru_cache(maxsize=None)
def network(name: str):
    torch.manual_seed(0)
    return models.build_model(name).eval()


@functools.lru_cache(maxsize=None)
def macs(name: str) -> int:
    m = network(name)
    return count_macs(m, (m.in_channels, m.input_size, m.input_size))


@functools.lru_cache(maxsize=None)
def onnx_file(name: str, quantized: bool = False) -> str:
    """The network exported as ``python -m models export`` does; ``quantized``: ONNX Runtime's
    static QDQ int8 quantization of it, calibrated on the mtkernels int8 rows' faces."""
    folder = Path(tempfile.mkdtemp(prefix="mtkernels-onnx-"))
    path = folder / f"{name}.onnx"
    export_onnx(network(name), path)
    if not quantized:
        return str(path)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calibration_faces(network(name).input_size)[i:i + 16].numpy()}
                                 for i in range(0, CALIBRATION_FACES, 16)])

        def get_next(self):
            return next(self.batches, None)

    out = folder / f"{name}-int8.onnx"
    quantize_static(str(path), str(out), Faces(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(out)


def onnxruntime_runner(path: str, x: torch.Tensor):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return (lambda: session.run(None, feed)), (lambda: torch.from_numpy(session.run(None, feed)[0]))


def openvino_runner(path: str, x: torch.Tensor, config: dict):
    ov = pytest.importorskip("openvino")
    request = ov.Core().compile_model(path, "CPU", config).create_infer_request()
    feed = {"x": x.numpy()}
    return (lambda: request.infer(feed)), (lambda: torch.from_numpy(np.array(request.infer(feed)[0])))


def compiled_frozen(model):
    """torch.compile of ``model`` with Inductor's weight freezing (constant folding, oneDNN
    weight prepacking), compiled on its first call inside this patch."""
    compiled = torch.compile(model, dynamic=False)

    def first_call(x):
        with torch._inductor.config.patch(freezing=True):
            return compiled(x)
    return compiled, first_call


def runner(impl: str, name: str, batch: int, device: str):
    """(a call to time, that call's logits as a float32 CPU tensor)."""
    if impl in CPU_ONLY and device != "cpu":
        pytest.skip(f"{impl} is measured on the CPU")
    if impl in FP16_IMPLS and device != "cuda":
        pytest.skip("fp16 rows are CUDA rows (no fp16 matrix unit on this CPU path)")
    model = network(name).to(device)
    x = calibration_faces(model.input_size, FACES)[:batch].to(device)
    if impl.startswith("onnxruntime"):
        return onnxruntime_runner(onnx_file(name, quantized=impl.endswith("int8")), x)
    if impl.startswith("openvino"):
        return openvino_runner(onnx_file(name), x, {"INFERENCE_PRECISION_HINT": "f32"} if impl.endswith("f32") else {})
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(impl.rsplit("_", 1)[-1])
    if impl == "eager":
        fn = model
    elif impl in ("channels_last", "channels_last_bf16", "channels_last_fp16", "compile_bf16", "compile_fp16"):
        fn = copy.deepcopy(model).to(dtype=low or torch.float32, memory_format=torch.channels_last)
        x = x.to(dtype=low or torch.float32, memory_format=torch.channels_last)
        if impl.startswith("compile_"):
            fn, first_call = compiled_frozen(fn)
            with torch.inference_mode():
                first_call(x)
    elif impl == "compile":
        fn = torch.compile(copy.deepcopy(model), dynamic=False)
    elif impl == "fused_fp16":  # the fp32 fused model keeps a half-precision input's dtype on CUDA
        fn, x = mtkernels.fuse_for_inference(model), x.to(torch.float16)
    elif impl == "fused_int8":
        fn = mtkernels.fuse_for_inference(model, "int8", calibration_faces(model.input_size))
    else:
        fn = mtkernels.fuse_for_inference(model, "bf16" if impl == "fused_bf16" else "fp32")

    def run():
        with torch.inference_mode():
            return fn(x)
    return run, lambda: run().float().cpu()


@functools.lru_cache(maxsize=None)
def reference_logits(name: str, batch: int) -> torch.Tensor:
    model = network(name).cpu()
    with torch.no_grad():
        return model(calibration_faces(model.input_size, FACES)[:batch])


def agreement(name: str, batch: int, logits: torch.Tensor) -> float:
    """The worst task's share of faces whose argmax matches eager float32."""
    model = network(name)
    pairs = zip(model.split(reference_logits(name, batch)), model.split(logits.reshape(batch, -1)))
    return min(float((r.argmax(1) == o.argmax(1)).float().mean()) for r, o in pairs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", NETWORKS)
def test_inference(benchmark, device, name, batch, impl):
    run, logits = runner(impl, name, batch, device)
    labels = {"agreement": agreement(name, batch, logits())} if batch == max(BATCHES) else {}
    heavy = batch > 1 and name != "bknet"
    rounds = 30 if batch == 1 else (3 if heavy else 6)
    measure(benchmark, run, device, SUITE, rounds=rounds, warmup=1 if heavy else 3,
            network=name, batch=batch, impl=impl, **labels)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "fp16"])
def test_matmul_peak(benchmark, device, precision):
    """The matmul rate in each precision the rows run in (fp32 is TF32 on CUDA, as the rows;
    int8: torch._int_mm, int32 accumulation)."""
    if precision == "fp16" and device != "cuda":
        pytest.skip("fp16 rows are CUDA rows")
    if precision == "int8":
        if device != "cpu":
            pytest.skip("int8 rows are CPU rows")
        a = torch.randint(-128, 127, (MATMUL_SIZE, MATMUL_SIZE), dtype=torch.int8)
        fn = functools.partial(torch._int_mm, a, a)
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
        fn = functools.partial(torch.mm, a, a)
    measure(benchmark, fn, device, SUITE, rounds=10, warmup=2, network="matmul", batch=MATMUL_SIZE,
            impl=f"torch.mm {precision}")


@register_report(SUITE)
def report(device, measurements):
    peaks = {m["impl"].split()[-1]: 2 * MATMUL_SIZE ** 3 / m["seconds"] / 1e9
             for m in measurements if m["network"] == "matmul"}
    times = {(m["network"], m["batch"], m["impl"]): m["seconds"] / m["batch"]
             for m in measurements if m["network"] != "matmul"}
    agreements = {(m["network"], m["impl"]): m["agreement"] for m in measurements if "agreement" in m}
    impls = [i for i in IMPLS if any(k[2] == i for k in times)]
    rows = []
    for name in NETWORKS:
        for batch in BATCHES:
            if not any(k[:2] == (name, batch) for k in times):
                continue
            row = {"network": name, "batch": batch, "paper TITAN X ms/img": f"{PAPER_TABLE3[name] * 1e3:.0f}"}
            for impl in impls:
                t = times.get((name, batch, impl))
                if t is not None:
                    row[f"{impl} ms/img"] = f"{t * 1e3:.3f}"
            fused = times.get((name, batch, "fused"))
            for base in ("eager", "compile", "onnxruntime"):
                if fused and (name, batch, base) in times:
                    row[f"fused vs {base}"] = f"{times[(name, batch, base)] / fused:.2f}x"
            stock = {i: times[(name, batch, i)] for i in STOCK_BF16 if (name, batch, i) in times}
            bf16 = times.get((name, batch, "fused_bf16"))
            if bf16 and stock:
                best = min(stock, key=stock.get)
                row["best stock bf16"] = best
                row["fused_bf16 vs best stock bf16"] = f"{stock[best] / bf16:.2f}x"
            int8 = times.get((name, batch, "fused_int8"))
            if int8 and bf16:
                row["fused_int8 vs fused_bf16"] = f"{bf16 / int8:.2f}x"
            for impl, precision in (("fused", "fp32"), ("fused_bf16", "bf16"), ("fused_int8", "int8"),
                                    ("fused_fp16", "fp16")):
                t = times.get((name, batch, impl))
                if t and precision in peaks:
                    row[f"{impl} of {precision} peak"] = f"{100 * 2 * macs(name) / t / 1e9 / peaks[precision]:.0f}%"
            if batch == max(BATCHES):
                for impl in impls:
                    if (name, impl) in agreements:
                        row[f"agree {impl}"] = f"{100 * agreements[(name, impl)]:.1f}%"
            rows.append(row)
    columns = (["network", "batch", "paper TITAN X ms/img"] + [f"{i} ms/img" for i in impls]
               + ["fused vs eager", "fused vs compile", "fused vs onnxruntime", "best stock bf16",
                  "fused_bf16 vs best stock bf16", "fused_int8 vs fused_bf16"]
               + [f"{i} of {p} peak" for i, p in (("fused", "fp32"), ("fused_bf16", "bf16"), ("fused_int8", "int8"),
                                                  ("fused_fp16", "fp16")) if p in peaks]
               + [f"agree {i}" for i in impls])
    columns = [c for c in columns if any(c in r for r in rows)]
    notes = ("Inference time per image (median of runs, divided by the batch) on scikit-image's LFW face crops. "
             "Precision by row: no suffix float32 (TF32 on CUDA), _bf16 bfloat16, _int8 int8, _fp16 float16; "
             "openvino is OpenVINO's default settings (its own inference precision: bf16 on a CPU with "
             "AVX512-BF16 or AMX), openvino_f32 forces f32; compile_bf16 is torch.compile with "
             "torch._inductor.config.freezing of the bf16 channels-last model; onnxruntime_int8 is ONNX Runtime's "
             "static QDQ quantization (per-channel int8 weights, uint8 activations) of the same export, calibrated "
             "on the same 64 faces as fused_int8. 'A vs B' = time of B / time of A: how many times faster A "
             "runs (higher is better). 'agree X': at batch 128, the worst task's share of faces "
             "whose argmax equals eager float32's (random-initialised networks, so near-ties exist). GFLOP counts "
             "2 x multiply-accumulates of the conv and linear layers (python -m models summary)."
             + "".join(f" This machine's {p} matmul ({MATMUL_SIZE}^3) ran at {g:.1f} GFLOP/s (or GOP/s) in the "
                       "same run." for p, g in peaks.items())
             + f" Reduced-precision units this CPU offers oneDNN: {mtkernels.fuse.matrix_units()}."
             + " Paper: Sang & Cuong 2018, Table 3, TITAN X, batch size not stated.")
    path = write_table(SUITE, device, rows, columns, f"Table 3: inference time per image, {device}", notes)
    panels = []
    for batch in BATCHES:
        sub = [r for r in rows if r["batch"] == batch]
        panels.append((f"batch {batch}", [r["network"] for r in sub],
                       {impl: [float(r.get(f"{impl} ms/img", "nan")) for r in sub] for impl in impls}))
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png", panels, "ms / image (lower is better)",
                   f"Inference time per image on {device}")
    return path
