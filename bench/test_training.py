"""Table 4: training time. Seconds per SGD step at batch 128 for BKNet and Multi-task ResNet
ver1 / ver2, in one run, turn by turn. float32: the plain-PyTorch reference loss (the eager
baseline), the same with channels_last activations, the fused loss, the fused loss with
channels_last, then also BatchNorm + ReLU fused, then also the convolutions of
``mtkernels.TrainingConv2d`` (all of ``mtkernels.fuse_for_training``). bf16 mixed precision:
eager ``torch.autocast`` channels_last with the fused loss, ``torch.compile`` of that step,
and ``mtkernels.fuse_for_training(precision="bf16")``; and those two bf16 steps once more
turn by turn (one step of each in every round), whose ratio the machine's drift between
rows does not move. Also the projected minutes per epoch of config B4, whose size follows
from paper 1's dataset sizes (section 4.2)."""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from harness import MEASUREMENTS, measure, register_report, sgd_step
from results_io import RESULTS_DIR, save_bar_chart, write_table

import models
import mtkernels
from models.data.merge import balancing_copies
from models.report import PAPER_TABLE4

SUITE = "training"
BATCH = 128
NETWORKS = ("bknet", "resnet-v1", "resnet-v2")
FP32_VARIANTS = ("reference", "reference+channels_last", "fused", "fused+channels_last",
                 "fused+channels_last+bn_relu", "fused+channels_last+bn_relu+conv")
BF16_VARIANTS = ("autocast_bf16", "autocast_bf16+compile", "mtkernels_bf16")
VARIANTS = FP32_VARIANTS + BF16_VARIANTS
MTKERNELS_FP32 = FP32_VARIANTS[2:]
# Paper 1, section 4.2, config B4 training splits: GENKI-4K 3000, FER-2013 (Kaggle) 28709, Wiki 30000.
B4_TRAIN_SIZES = {"genki4k": 3000, "fer2013": 28709, "wiki": 30000}


def b4_epoch_samples() -> int:
    sizes = list(B4_TRAIN_SIZES.values())
    return sum(s * c for s, c in zip(sizes, balancing_copies(sizes)))


def make_step(name: str, variant: str, device: str):
    """One SGD step of network ``name`` at batch 128 with the loss and layout of ``variant``."""
    torch.manual_seed(0)
    model = models.build_model(name).to(device).train()
    x = torch.rand(BATCH, 1, model.input_size, model.input_size, device=device)
    labels = torch.stack([torch.randint(0, c, (BATCH,)) for c in model.num_classes], 1).to(device)
    labels[torch.rand(labels.shape) < 2 / 3] = -1  # multi-source batches: one task labelled per sample
    if "bn_relu" in variant:
        mtkernels.fuse_for_training(model, convs="conv" in variant)
    if variant == "mtkernels_bf16":
        mtkernels.fuse_for_training(model, precision="bf16")
    if "channels_last" in variant or variant in BF16_VARIANTS:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if variant.startswith("reference"):
        def loss_fn(logits):
            return mtkernels.reference.multitask_loss(logits, labels, model.num_classes)
    else:
        crit = mtkernels.MultiTaskLoss(model.num_classes)

        def loss_fn(logits):
            return crit(logits, labels)
    if variant.startswith("autocast"):
        def forward(inputs):
            with torch.autocast(device, dtype=torch.bfloat16):
                return model(inputs)
        if variant.endswith("compile"):
            compiled = torch.compile(lambda inputs: loss_fn(forward(inputs)))
            return sgd_step(model, x, lambda logits: logits, forward=compiled)
        return sgd_step(model, x, loss_fn, forward=forward)
    return sgd_step(model, x, loss_fn)


def measure_step(benchmark, device, name, variant):
    measure(benchmark, make_step(name, variant, device), device, SUITE, rounds=6 if name == "bknet" else 3,
            warmup=1, network=name, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", NETWORKS)
def test_training_step(benchmark, device, name, variant):
    if device == "cuda" and ("bn_relu" in variant or variant == "mtkernels_bf16"):
        pytest.skip("fused BatchNorm + ReLU, the conv algorithms and bf16 training are CPU kernels: on CUDA these "
                    "rows would time PyTorch's own layers again")
    measure_step(benchmark, device, name, variant)


TURN_BY_TURN = ("autocast_bf16", "mtkernels_bf16")


@pytest.mark.parametrize("name", NETWORKS)
def test_bf16_steps_turn_by_turn(benchmark, device, name):
    if device == "cuda":
        pytest.skip("bf16 training is a CPU path")
    steps = {variant: make_step(name, variant, device) for variant in TURN_BY_TURN}
    times: dict[str, list[float]] = {variant: [] for variant in TURN_BY_TURN}

    def turn():
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)

    benchmark.pedantic(turn, rounds=8 if name == "bknet" else 4, warmup_rounds=1, iterations=1)
    for variant, seconds in times.items():
        MEASUREMENTS[SUITE][device].append(dict(network=name, variant=f"{variant} turn by turn",
                                                seconds=statistics.median(seconds[1:])))  # [0]: the warm-up


@register_report(SUITE)
def report(device, measurements):
    t = {(m["network"], m["variant"]): m["seconds"] for m in measurements}
    steps = math.ceil(b4_epoch_samples() / BATCH)
    rows = []
    for name in NETWORKS:
        if (name, "reference") not in t:
            continue
        epochs, paper_minutes, paper_total = PAPER_TABLE4[name]
        row = {"network": name, "paper epochs": epochs, "paper min/epoch (TITAN X)": paper_minutes,
               "paper total min": paper_total}
        for variant in VARIANTS:
            if (name, variant) in t:
                row[f"{variant} s/step"] = f"{t[(name, variant)]:.3f}"
                row[f"{variant} min/epoch"] = f"{t[(name, variant)] * steps / 60:.1f}"
                row[f"{variant} total min"] = f"{t[(name, variant)] * steps * epochs / 60:.0f}"
        best = min((t[(name, v)] for v in MTKERNELS_FP32 if (name, v) in t), default=None)
        if best:
            row["mtkernels fp32 vs reference"] = f"{t[(name, 'reference')] / best:.2f}x"
        if (name, "mtkernels_bf16") in t and (name, "autocast_bf16") in t:
            row["mtkernels bf16 vs autocast"] = f"{t[(name, 'autocast_bf16')] / t[(name, 'mtkernels_bf16')]:.2f}x"
        autocast, mine = ((name, f"{variant} turn by turn") for variant in TURN_BY_TURN)
        if autocast in t and mine in t:
            row["turn by turn: autocast s/step"] = f"{t[autocast]:.3f}"
            row["turn by turn: mtkernels bf16 s/step"] = f"{t[mine]:.3f}"
            row["mtkernels bf16 vs autocast, turn by turn"] = f"{t[autocast] / t[mine]:.2f}x"
        rows.append(row)
    columns = (["network", "paper epochs", "paper min/epoch (TITAN X)", "paper total min"]
               + [f"{v} {u}" for v in VARIANTS for u in ("s/step", "min/epoch", "total min")]
               + ["mtkernels fp32 vs reference", "mtkernels bf16 vs autocast", "turn by turn: autocast s/step",
                  "turn by turn: mtkernels bf16 s/step", "mtkernels bf16 vs autocast, turn by turn"])
    notes = (f"One SGD step (forward, loss, backward, update) at batch {BATCH}, median. Epoch = config B4's merged, "
             f"balanced training set from paper 1's sizes {B4_TRAIN_SIZES} = {b4_epoch_samples()} samples = "
             f"{steps} steps. 'mtkernels fp32 vs reference' = reference step time / the fastest float32 mtkernels "
             f"variant; 'mtkernels bf16 vs autocast' = autocast_bf16 step time / mtkernels_bf16's. The first six "
             f"variants are float32; autocast_bf16 (eager torch.autocast bfloat16, channels_last, fused loss), "
             f"autocast_bf16+compile (torch.compile of that forward + loss) and mtkernels_bf16 "
             f"(mtkernels.fuse_for_training(precision='bf16')) compute in bfloat16 with float32 parameters; "
             f"bn_relu = BatchNorm + ReLU as one op (mtkernels.fuse_for_training(model, convs=False)); conv = "
             f"also each conv layer's algorithm timed fastest (mtkernels.TrainingConv2d). The 'turn by turn' columns "
             f"time autocast_bf16 and mtkernels_bf16 alternately, one step each per round (median), so the "
             f"machine's drift between the rows above does not enter their ratio.")
    path = write_table(SUITE, device, rows, columns, f"Table 4: training time, {device}", notes)
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png",
                   [("", [r["network"] for r in rows],
                     {v: [float(r.get(f"{v} s/step", "nan")) for r in rows] for v in VARIANTS})],
                   "seconds per step (lower is better)", f"Training step at batch {BATCH} on {device}")
    return path
