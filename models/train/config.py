"""Training recipes of the papers as small dataclasses; every field can be overridden.

Paper 1 Table 1: A1-A4 train on GENKI-4K + FER-2013 + IMDB, B1-B4 on GENKI-4K + FER-2013 +
Wiki; odd configs use the SVM loss, even ones cross-entropy; A3/A4/B3/B4 add the ensemble of
the last 10 epoch checkpoints. BKNet: SGD momentum 0.9, batch 128, weight decay 0.01,
lr 0.01 * 0.8^(step / 10000), 250 epochs. ResNet ver1 / ver2 (config B4): weight decay 1e-4,
lr 0.05 divided by 10 when the training loss stops improving, 100 / 80 epochs. Paper 2: batch
32, lr 3e-4, loss weights emotion 2, gender 0.1, race 1.5, age 4; lr x0.2 after 5 epochs
without a better validation emotion accuracy, stop when lr < 1e-6, keep the best weights;
validation is 10% of the training images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TrainConfig:
    name: str
    model: str = "bknet"
    sources: tuple[str, ...] = ("genki4k", "fer2013", "wiki")
    loss: str = "ce"                      # "ce" or "svm"
    ensemble: bool = False                # average the last `ensemble_size` epoch checkpoints at test time
    ensemble_size: int = 10
    epochs: int = 250
    batch_size: int = 128
    optimizer: str = "sgd"                # "sgd" (momentum) or "adam" (paper 2)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.01
    schedule: str = "exponential"         # "exponential" | "plateau" (train loss) | "val_plateau"
    decay_rate: float = 0.8               # exponential: lr * decay_rate^(step / decay_steps)
    decay_steps: int = 10000
    plateau_factor: float = 0.1           # plateau schedules: lr *= factor after `patience` epochs
    patience: int = 5
    min_lr: float = 0.0                   # stop when lr falls below (paper 2: 1e-6)
    task_weights: Optional[tuple[float, ...]] = None
    image_size: int = 48
    augment: bool = True
    seed: int = 2
    fold: int = 1                         # cross-validation fold 1-4: which test split GENKI-4K / Wiki / IMDB hold out
    val_fraction: float = 0.0             # > 0: validate on this seeded share of the training rows (paper 2: 0.1)
    precision: str = "fp32"               # "fp32" or "bf16" (mixed precision on the CPU, mtkernels.fuse_for_training)

    def replace(self, **overrides) -> "TrainConfig":
        return dataclasses.replace(self, **overrides)


def _paper1(name: str, gender_source: str, loss: str, ensemble: bool) -> TrainConfig:
    return TrainConfig(name=name, sources=("genki4k", "fer2013", gender_source), loss=loss, ensemble=ensemble)


CONFIGS: dict[str, TrainConfig] = {
    "A1": _paper1("A1", "imdb", "svm", False),
    "A2": _paper1("A2", "imdb", "ce", False),
    "A3": _paper1("A3", "imdb", "svm", True),
    "A4": _paper1("A4", "imdb", "ce", True),
    "B1": _paper1("B1", "wiki", "svm", False),
    "B2": _paper1("B2", "wiki", "ce", False),
    "B3": _paper1("B3", "wiki", "svm", True),
    "B4": _paper1("B4", "wiki", "ce", True),
    "resnet-v1-B4": _paper1("resnet-v1-B4", "wiki", "ce", True).replace(
        model="resnet-v1", epochs=100, lr=0.05, weight_decay=1e-4, schedule="plateau"),
    "resnet-v2-B4": _paper1("resnet-v2-B4", "wiki", "ce", True).replace(
        model="resnet-v2", epochs=80, lr=0.05, weight_decay=1e-4, schedule="plateau"),
    "paper2": TrainConfig(name="paper2", model="emotion-cnn", sources=("rafdb",), epochs=100, batch_size=32,
                          optimizer="adam", lr=3e-4, weight_decay=0.0, schedule="val_plateau", plateau_factor=0.2,
                          patience=5, min_lr=1e-6, task_weights=(2.0, 0.1, 1.5, 4.0), image_size=50,
                          val_fraction=0.1),
}


def config_by_name(name: str) -> TrainConfig:
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {name!r}")
    return CONFIGS[name]
