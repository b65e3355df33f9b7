"""Training convolutions, forward + backward (input and weight gradients), for every conv
layer shape of BKNet and Multi-task ResNet ver1 / ver2 at batch 128, channels-last float32:
PyTorch's own convolution (oneDNN), ``mtkernels::winograd_conv3x3`` (3x3 / stride 1 layers)
and ``mtkernels::gemm_conv2d``, in the same run, with the algorithm
``mtkernels.TrainingConv2d`` picks untimed for each shape (it times its candidates once per
machine, and should find the 'fastest' column). The shapes are read off the networks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table

import models
from mtkernels.ops.conv_training import conv_output_size, gemm_conv2d, winograd_conv3x3
from mtkernels.training import as_training_conv

SUITE = "conv_training"
BATCH = 128
NETWORKS = ("bknet", "resnet-v1", "resnet-v2")
# im2col copies every input pixel KH * KW times: past 12x12 outputs the copy alone costs
# more than oneDNN's whole layer, so the GEMM is not timed there.
GEMM_MAX_TIMED_PIXELS = 144


def layer_shapes() -> dict[tuple, Counter]:
    """(C_in, C_out, kernel, stride, padding, input side) -> layers of that shape per network."""
    shapes: dict[tuple, Counter] = {}
    for name in NETWORKS:
        model = models.build_model(name).eval()

        def record(conv, args, _name=name):
            key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                   args[0].shape[2])
            shapes.setdefault(key, Counter())[_name] += 1
        hooks = [m.register_forward_pre_hook(record) for m in model.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]  # the 1-channel stems need no input grad
        with torch.no_grad():
            model(torch.zeros(1, 1, model.input_size, model.input_size))
        for hook in hooks:
            hook.remove()
    return dict(sorted(shapes.items(), key=lambda kv: (-kv[0][5], kv[0])))


SHAPES = layer_shapes()


def label(shape: tuple) -> str:
    c_in, c_out, kernel, stride, padding, side = shape
    return f"{c_in}->{c_out} k{kernel}s{stride} @{side}"


def algorithms(shape: tuple) -> list[str]:
    c_in, c_out, kernel, stride, padding, side = shape
    out_side = conv_output_size(side, kernel, stride, padding)
    return (["torch"] + (["winograd"] if (kernel, stride, padding) == (3, 1, 1) else [])
            + (["gemm"] if out_side * out_side <= GEMM_MAX_TIMED_PIXELS else []))


def conv_fn(algorithm: str, stride: int, padding: int):
    if algorithm == "winograd":
        return lambda x, w: winograd_conv3x3(x, w, None)
    if algorithm == "gemm":
        return lambda x, w: gemm_conv2d(x, w, None, stride, padding)
    return lambda x, w: F.conv2d(x, w, None, stride, padding)


@pytest.mark.parametrize("shape,algorithm", [(s, a) for s in SHAPES for a in algorithms(s)],
                         ids=[f"{label(s)}-{a}" for s in SHAPES for a in algorithms(s)])
def test_conv_forward_backward(benchmark, device, shape, algorithm):
    if device == "cuda":
        pytest.skip("the training convolutions are CPU-only; CUDA runs PyTorch's own")
    c_in, c_out, kernel, stride, padding, side = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, c_in, side, side, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(c_out, c_in, kernel, kernel, generator=g) * 0.05).to(
        memory_format=torch.channels_last).requires_grad_()
    conv = conv_fn(algorithm, stride, padding)
    grad_y = torch.randn_like(conv(x, weight).detach())

    def step():
        torch.autograd.grad(conv(x, weight), (x, weight), grad_y)
    measure(benchmark, step, device, SUITE, rounds=3, warmup=1, shape=label(shape), algorithm=algorithm)


def untimed_choice(shape: tuple) -> str:
    c_in, c_out, kernel, stride, padding, side = shape
    conv = as_training_conv(torch.nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False))
    return conv.heuristic(conv.candidates(torch.empty(1, c_in, side, side).to(memory_format=torch.channels_last)))


@register_report(SUITE)
def report(device, measurements):
    t = {(m["shape"], m["algorithm"]): m["seconds"] for m in measurements}
    rows = []
    for shape, counts in SHAPES.items():
        name = label(shape)
        if (name, "torch") not in t:
            continue
        row = {"layer": name, **{f"{n} layers": counts.get(n, 0) for n in NETWORKS}}
        for algorithm in ("torch", "winograd", "gemm"):
            if (name, algorithm) in t:
                row[f"{algorithm} ms"] = f"{t[(name, algorithm)] * 1e3:.1f}"
        pick = untimed_choice(shape)
        fastest = min((a for a in ("torch", "winograd", "gemm") if (name, a) in t), key=lambda a: t[(name, a)])
        row.update({"untimed choice": pick, "fastest": fastest,
                    "speedup": f"{t[(name, 'torch')] / t[(name, pick)]:.2f}x" if (name, pick) in t else ""})
        rows.append(row)
    if not rows:
        return None
    columns = (["layer"] + [f"{n} layers" for n in NETWORKS] + ["torch ms", "winograd ms", "gemm ms",
                                                               "untimed choice", "fastest", "speedup"])
    notes = (f"Forward + backward (input and weight gradients) of one conv layer at batch {BATCH}, channels-last "
             f"float32, median of 3. 'torch' = F.conv2d (oneDNN); the GEMM is timed up to "
             f"{GEMM_MAX_TIMED_PIXELS} output pixels an image; 'untimed choice' = TrainingConv2d's choice without "
             f"timing (MTKERNELS_TUNE=off); it times its candidates once per machine instead; speedup = torch / the "
             f"untimed choice.")
    path = write_table(SUITE, device, rows, columns, f"Training convolutions, {device}", notes)
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png",
                   [("", [r["layer"] for r in rows],
                     {a: [float(r.get(f"{a} ms", "nan")) for r in rows] for a in ("torch", "winograd", "gemm")})],
                   "ms per forward + backward (lower is better)", f"Conv layers in training, batch {BATCH} ({device})")
    return path
