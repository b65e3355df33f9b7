"""Table 3: inference time per image of Multi-task BKNet and ResNet ver1 / ver2.

Eager fp32 (NCHW), eager channels_last, torch.compile, ONNX Runtime (CPU execution
provider, model exported here) and mtkernels.fuse_for_inference, all in one run, at batch
1 and 128; plus the achieved GFLOP/s against this machine's fp32 matmul rate, measured in
the same run.
"""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table

import models
import mtkernels
from models.report import PAPER_TABLE3
from models.summary import count_macs

SUITE = "inference"
NETWORKS = ("bknet", "resnet-v1", "resnet-v2")
BATCHES = (1, 128)
IMPLS = ("eager", "channels_last", "compile", "onnxruntime", "fused")
# CUDA only: cuDNN's channels-last eager model and the fused Triton path in half precisions.
HALF_IMPLS = ("channels_last_fp16", "fused_fp16", "channels_last_bf16", "fused_bf16")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MATMUL_SIZE = 2048


@functools.lru_cache(maxsize=None)
def network(name: str):
    torch.manual_seed(0)
    return models.build_model(name).eval()


@functools.lru_cache(maxsize=None)
def macs(name: str) -> int:
    m = network(name)
    return count_macs(m, (m.in_channels, m.input_size, m.input_size))


def onnx_session(model, example):
    ort = pytest.importorskip("onnxruntime")
    buf = io.BytesIO()
    torch.onnx.export(model, (example,), buf, dynamo=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])


def runner(impl: str, name: str, batch: int, device: str):
    model = network(name).to(device)
    x = torch.randn(batch, 1, model.input_size, model.input_size, device=device)
    if impl == "onnxruntime":
        if device != "cpu":
            pytest.skip("ONNX Runtime is measured with its CPU execution provider")
        session = onnx_session(model, x)
        feed = {"x": x.numpy()}
        return lambda: session.run(None, feed)
    if impl in HALF_IMPLS:
        if device != "cuda":
            pytest.skip("half-precision rows are CUDA rows here (this suite's CPU rows are float32)")
        dtype = HALF_DTYPES[impl.rsplit("_", 1)[1]]
        x = x.to(dtype=dtype, memory_format=torch.channels_last)
        fn = (mtkernels.fuse_for_inference(model) if impl.startswith("fused")
              else copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last))
    elif impl == "eager":
        fn = model
    elif impl == "channels_last":
        fn = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    elif impl == "compile":
        fn = torch.compile(copy.deepcopy(model), dynamic=False)
    else:
        fn = mtkernels.fuse_for_inference(model)

    def run():
        with torch.inference_mode():
            fn(x)
    return run


@pytest.mark.parametrize("impl", IMPLS + HALF_IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", NETWORKS)
def test_inference(benchmark, device, name, batch, impl):
    run = runner(impl, name, batch, device)
    heavy = batch > 1 and name != "bknet"
    rounds = 30 if batch == 1 else (3 if heavy else 6)
    measure(benchmark, run, device, SUITE, rounds=rounds, warmup=1 if heavy else 3,
            network=name, batch=batch, impl=impl)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_matmul_peak(benchmark, device, precision):
    """The matmul rate in each precision the rows run in (fp32 is TF32 on CUDA, as the rows)."""
    if precision != "fp32" and device != "cuda":
        pytest.skip("this suite's CPU rows are float32")
    dtype = HALF_DTYPES.get(precision, torch.float32)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    measure(benchmark, lambda: torch.mm(a, b), device, SUITE, rounds=10, warmup=2,
            network="matmul", batch=MATMUL_SIZE, impl=f"torch.mm {precision}")


@register_report(SUITE)
def report(device, measurements):
    peaks = {m["impl"].split()[-1]: 2 * MATMUL_SIZE ** 3 / m["seconds"] / 1e9
             for m in measurements if m["network"] == "matmul"}
    peak_gflops = peaks.get("fp32")
    times = {(m["network"], m["batch"], m["impl"]): m["seconds"] / m["batch"]
             for m in measurements if m["network"] != "matmul"}
    rows = []
    for name in NETWORKS:
        for batch in BATCHES:
            if (name, batch, "eager") not in times:
                continue
            row = {"network": name, "batch": batch, "paper TITAN X ms/img": f"{PAPER_TABLE3[name] * 1e3:.0f}"}
            for impl in IMPLS + HALF_IMPLS:
                t = times.get((name, batch, impl))
                if t is not None:
                    row[f"{impl} ms/img"] = f"{t * 1e3:.3f}"
            fused = times.get((name, batch, "fused"))
            if fused:
                for base in ("eager", "compile", "onnxruntime"):
                    if (name, batch, base) in times:
                        row[f"fused vs {base}"] = f"{times[(name, batch, base)] / fused:.2f}x"
                gflops = 2 * macs(name) / fused / 1e9
                row["fused GFLOP/s"] = f"{gflops:.1f}"
                if peak_gflops:
                    row["of matmul peak"] = f"{100 * gflops / peak_gflops:.0f}%"
            for precision in HALF_DTYPES:
                half = times.get((name, batch, f"fused_{precision}"))
                if half and precision in peaks:
                    share = 2 * macs(name) / half / 1e9 / peaks[precision]
                    row[f"fused_{precision} of {precision} peak"] = f"{100 * share:.0f}%"
            rows.append(row)
    half_columns = ([f"{i} ms/img" for i in HALF_IMPLS] + [f"fused_{p} of {p} peak" for p in HALF_DTYPES]
                    if any(m["impl"] in HALF_IMPLS for m in measurements) else [])
    columns = (["network", "batch", "paper TITAN X ms/img"] + [f"{i} ms/img" for i in IMPLS]
               + ["fused vs eager", "fused vs compile", "fused vs onnxruntime", "fused GFLOP/s", "of matmul peak"]
               + half_columns)
    notes = ("Inference time per image (median of runs, divided by the batch), float32 (TF32 on CUDA); the "
             "_fp16 / _bf16 rows (CUDA) run in that precision, input converted. 'fused vs X' = time of X "
             "/ time of fused (higher is better). GFLOP/s counts 2 x multiply-accumulates of the conv and linear "
             "layers (python -m models summary)."
             + "".join(f" This machine's {p} matmul ({MATMUL_SIZE}^3, torch.mm) ran at {g:.1f} GFLOP/s in the "
                       "same run." for p, g in peaks.items())
             + " Paper: Sang & Cuong 2018, Table 3, TITAN X, batch size not stated.")
    path = write_table(SUITE, device, rows, columns, f"Table 3: inference time per image, {device}", notes)
    panels = []
    for batch in BATCHES:
        sub = [r for r in rows if r["batch"] == batch]
        panels.append((f"batch {batch}", [r["network"] for r in sub],
                       {impl: [float(r.get(f"{impl} ms/img", "nan")) for r in sub] for impl in IMPLS + HALF_IMPLS
                        if any(f"{impl} ms/img" in r for r in rows)}))
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png", panels, "ms / image (lower is better)",
                   f"Inference time per image on {device}")
    return path
