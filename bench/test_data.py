"""Data pipeline throughput: augmented batches of 128 (paper 1's crop / flip / rotation)
per second, against one BKNet training step on the same batch size, in the same run --
the loader must be faster than the step it feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import measure, register_report, sgd_step
from results_io import write_table

import models
import mtkernels
from models.data import augment_batch, to_model_input

SUITE = "data"
BATCH = 128


@pytest.mark.parametrize("stage", ["augment", "train_step"])
def test_data_vs_training_step(benchmark, device, stage):
    g = torch.Generator().manual_seed(0)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (BATCH, 48, 48), dtype=np.uint8))
    labels = torch.stack([torch.randint(0, c, (BATCH,), generator=g) for c in (2, 7, 2)], 1).to(device)
    if stage == "augment":
        def run():
            augment_batch(to_model_input(images.to(device)), g if device == "cpu" else None)
    else:
        torch.manual_seed(0)
        model = models.MultiTaskBKNet().to(device).train()
        crit = mtkernels.MultiTaskLoss(model.num_classes)
        run = sgd_step(model, to_model_input(images.to(device)), lambda logits: crit(logits, labels))
    measure(benchmark, run, device, SUITE, rounds=20 if stage == "augment" else 5, warmup=2, stage=stage)


@register_report(SUITE)
def report(device, measurements):
    t = {m["stage"]: m["seconds"] for m in measurements}
    if "augment" not in t:
        return None
    row = {"batch": BATCH, "augment ms/batch": f"{t['augment'] * 1e3:.2f}",
           "augmented batches/s": f"{1 / t['augment']:.1f}"}
    if "train_step" in t:
        row["BKNet train step ms"] = f"{t['train_step'] * 1e3:.1f}"
        row["loader headroom"] = f"{t['train_step'] / t['augment']:.1f}x"
    columns = ["batch", "augment ms/batch", "augmented batches/s", "BKNet train step ms", "loader headroom"]
    notes = ("Augmentation: uint8 -> float, random crop with a 4-pixel margin, flip, rotation in [-15, 15] degrees "
             "with black fill, one affine resampling for the whole batch. Train step: BKNet forward, fused loss, "
             "backward, SGD (momentum 0.9, weight decay 0.01). Headroom = step time / augmentation time.")
    return write_table(SUITE, device, [row], columns, f"Data pipeline vs training step, {device}", notes)
