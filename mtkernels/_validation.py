"""Input checks shared by every implementation of the multi-task loss.

The static part of a call (classes, kind, weights, margin, reduction) is parsed once
into a hashable :class:`LossSpec` and cached, so the per-call cost on the hot path is a
handful of attribute reads on the tensors.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch

KINDS = ("ce", "svm")
REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTEGER_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                            torch.uint64))

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class LossSpec:
    num_classes: tuple[int, ...]
    kind: str
    task_weights: tuple[float, ...]
    margin: float
    reduction: str

    @property
    def num_tasks(self) -> int:
        return len(self.num_classes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First column of each task, plus the total width: length T + 1. Not a
        functools.cached_property: its lock stops torch.compile's tracing on Python 3.11."""
        return tuple(itertools.accumulate(self.num_classes, initial=0))

    @property
    def width(self) -> int:
        return self.offsets[-1]

    def row_scale(self, rows: int) -> float:
        """1 / N for "mean" (N = all rows, labelled or not), else 1."""
        return 1.0 / max(rows, 1) if self.reduction == "mean" else 1.0

    @property
    def output_weights(self) -> tuple[float, ...]:
        """mu_t, or all 1 for "none" (its [N, T] losses are unweighted)."""
        return self.task_weights if self.reduction != "none" else (1.0,) * self.num_tasks

    def task_scale(self, rows: int) -> list[float]:
        """mu_t / N for "mean", mu_t for "sum", 1 for "none"."""
        scale = self.row_scale(rows)
        return [w * scale for w in self.output_weights]


def _as_tuple(name: str, value, element: type, element_name: str, cast) -> tuple:
    """``value`` (a sequence or tensor) as a tuple of ``cast`` values, or TypeError naming ``name``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of {element_name}, got {type(value).__name__}")
    if any(isinstance(v, bool) or not isinstance(v, element) for v in value):
        raise TypeError(f"{name} must be a sequence of {element_name}, got {list(value)!r}")
    return tuple(cast(v) for v in value)


def loss_spec(num_classes, kind: str = "ce", task_weights=None, margin: float = 1.0,
              reduction: str = "mean") -> LossSpec:
    """Validate the static arguments of ``multitask_loss`` and return their cached spec."""
    classes = _as_tuple("num_classes", num_classes, numbers.Integral, "ints", int)
    weights = None if task_weights is None else _as_tuple("task_weights", task_weights, numbers.Real, "numbers", float)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number, got {type(margin).__name__}")
    for name, value in (("kind", kind), ("reduction", reduction)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return _cached_spec(classes, kind, weights, float(margin), reduction)


@functools.lru_cache(maxsize=512)
def _cached_spec(classes: tuple[int, ...], kind, weights, margin: float, reduction) -> LossSpec:
    if not classes:
        raise ValueError("num_classes must name at least one task, got ()")
    bad = [c for c in classes if c < 1]
    if bad:
        raise ValueError(f"num_classes entries must be >= 1, got {classes}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weights is None:
        weights = (1.0,) * len(classes)
    if len(weights) != len(classes):
        raise ValueError(
            f"task_weights has {len(weights)} entries but num_classes has {len(classes)} tasks")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"task_weights must be finite and >= 0, got {weights}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    return LossSpec(classes, kind, weights, margin, reduction)


def check_tensors(logits: Logits, labels: torch.Tensor, spec: LossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes, dtypes and devices; returns the logits as one [N, sum(C)] tensor."""
    if not isinstance(logits, torch.Tensor):
        logits = _concat_task_logits(logits, spec)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, sum(num_classes)], got shape {tuple(logits.shape)}")
    if logits.shape[1] != spec.width:
        raise ValueError(
            f"logits has {logits.shape[1]} columns but sum(num_classes) = {spec.width} "
            f"for num_classes={spec.num_classes}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in INTEGER_DTYPES:
        raise TypeError(f"labels must be an integer tensor (-1 = unlabelled), got {labels.dtype}")
    if labels.shape != (logits.shape[0], spec.num_tasks):
        raise ValueError(
            f"labels must have shape [N, T] = [{logits.shape[0]}, {spec.num_tasks}], "
            f"got {tuple(labels.shape)}")
    if (labels.is_cpu != logits.is_cpu) or (not logits.is_cpu and labels.device != logits.device):
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")
    return logits, labels


def _concat_task_logits(logits, spec: LossSpec) -> torch.Tensor:
    if isinstance(logits, (str, bytes)) or not isinstance(logits, Sequence):
        raise TypeError(
            f"logits must be a tensor or a sequence of per-task tensors, got {type(logits).__name__}")
    if len(logits) != spec.num_tasks:
        raise ValueError(f"logits has {len(logits)} task tensors but num_classes has {spec.num_tasks} tasks")
    for t, (part, classes) in enumerate(zip(logits, spec.num_classes)):
        if not isinstance(part, torch.Tensor):
            raise TypeError(f"logits[{t}] must be a torch.Tensor, got {type(part).__name__}")
        if part.dim() != 2 or part.shape[1] != classes or part.shape[0] != logits[0].shape[0]:
            raise ValueError(
                f"logits[{t}] must have shape [N, {classes}], got {tuple(part.shape)}")
    return torch.cat(list(logits), dim=1)


def check_label_range(labels: torch.Tensor, spec: LossSpec) -> None:
    """Raise ValueError naming the first label outside [-1, C_t). Reads the labels (a sync on GPU)."""
    limits = torch.tensor(spec.num_classes, device=labels.device)
    bad = (labels < -1) | (labels >= limits)
    if bool(bad.any()):
        row, task = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"labels[{row}, {task}] = {int(labels[row, task])} is out of range for task {task} "
            f"with {spec.num_classes[task]} classes (valid: -1 for unlabelled, 0..{spec.num_classes[task] - 1})")
