"""Test-time use of a run: load checkpoints, score images, average the last checkpoints
(paper 1's ensemble of the last 10 epochs), per-task accuracy over labelled rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..checkpoint import BEST, HOW_TO_TRAIN, CheckpointError, config_of, epoch_checkpoints, load_checkpoint
from ..checkpoint import load_model as load_trained
from ..data.augment import to_model_input
from ..io import atomic_write


def load_model(checkpoint) -> torch.nn.Module:
    """The network stored in a trainer checkpoint, in eval mode."""
    return load_trained(checkpoint)[0]


@torch.no_grad()
def task_scores(model: torch.nn.Module, images: np.ndarray, kind: str, batch_size: int = 256) -> torch.Tensor:
    """[N, sum(C)] on the CPU: per-task softmax probabilities (``kind="ce"``) or raw scores
    (``"svm"``), computed on the model's device."""
    outputs, device = [], next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        logits = model(to_model_input(images[start:start + batch_size]).to(device))
        if kind == "ce":
            logits = torch.cat([s.softmax(dim=1) for s in logits.split(tuple(model.num_classes), dim=1)], dim=1)
        outputs.append(logits.cpu())
    return torch.cat(outputs) if outputs else torch.zeros(0, sum(model.num_classes))


def mean_scores(checkpoints: Sequence, image_sets: Sequence[np.ndarray], kind: str) -> list[torch.Tensor]:
    """For each image set, the mean of ``task_scores`` over the checkpoints; each checkpoint
    is loaded once, and one model is in memory at a time."""
    if not checkpoints:
        raise ValueError("need at least one checkpoint to score with")
    totals = None
    for checkpoint in checkpoints:
        model = load_model(checkpoint)
        scores = [task_scores(model, images, kind) for images in image_sets]
        totals = scores if totals is None else [t + s for t, s in zip(totals, scores)]
    return [t / len(checkpoints) for t in totals]


def ensemble_scores(checkpoints: Sequence, images: np.ndarray, kind: str) -> torch.Tensor:
    """Mean of ``task_scores`` over the checkpoints (probabilities for ce, scores for svm)."""
    return mean_scores(checkpoints, [images], kind)[0]


def correct_counts(scores: torch.Tensor, labels, num_classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per task: how many labelled rows the argmax gets right, and how many rows are labelled."""
    labels = torch.as_tensor(labels)
    right, seen = np.zeros(len(num_classes)), np.zeros(len(num_classes))
    for t, task in enumerate(scores.split(tuple(num_classes), dim=1)):
        labelled = labels[:, t] >= 0
        right[t] = (task.argmax(dim=1)[labelled] == labels[labelled, t]).sum().item()
        seen[t] = labelled.sum().item()
    return right, seen


def accuracy(scores: torch.Tensor, labels, num_classes: Sequence[int],
             task_names: Sequence[str]) -> dict[str, float]:
    """Accuracy per task over the rows labelled for it (NaN where none is)."""
    right, seen = correct_counts(scores, labels, num_classes)
    return {name: (float(r / s) if s else float("nan")) for name, r, s in zip(task_names, right, seen)}


def _last_checkpoint(run_dir) -> tuple[list[Path], dict]:
    """All epoch checkpoints of a run and the contents of the last one."""
    checkpoints = epoch_checkpoints(run_dir)
    if not checkpoints:
        raise CheckpointError(f"no checkpoints in {run_dir}/checkpoints; {HOW_TO_TRAIN}")
    return checkpoints, load_checkpoint(checkpoints[-1])


def run_config(run_dir):
    """The training config (a TrainConfig) stored in a run's last checkpoint."""
    return config_of(_last_checkpoint(run_dir)[1])


def evaluate_run(run_dir, sources) -> list[dict]:
    """Accuracy per (source, test split, task the source labels) of a run: the mean of its
    last ``ensemble_size`` checkpoints if ``config.ensemble``, else its best-validation
    weights (``best.pt``, paper 2) if kept, else its last checkpoint.
    ``sources``: (name, images, {task: labels}, split) as the CLI's ``load_sources`` gives.
    Also writes evaluation.json and evaluation.md into ``run_dir``."""
    run_dir = Path(run_dir)
    checkpoints, state = _last_checkpoint(run_dir)
    config = config_of(state)
    task_names, num_classes = tuple(state["task_names"]), tuple(state["num_classes"])
    if config.ensemble:
        used = checkpoints[-config.ensemble_size:]
    else:
        used = [run_dir / BEST] if (run_dir / BEST).is_file() else checkpoints[-1:]
    parts = []  # (source, split, images, [N, T] labels, tasks the source labels)
    for name, images, labels, split in sources:
        for part in sorted(set(split) - {"train"}):
            mask = split == part
            matrix = np.full((int(mask.sum()), len(task_names)), -1, dtype=np.int64)
            for task, values in labels.items():
                matrix[:, task_names.index(task)] = values[mask]
            parts.append((name, part, images[mask], matrix, set(labels)))
    rows = []
    for (name, part, images, matrix, labelled), scores in zip(
            parts, mean_scores(used, [p[2] for p in parts], config.loss) if parts else []):
        for task, acc in accuracy(scores, matrix, num_classes, task_names).items():
            if task in labelled:
                rows.append({"config": config.name, "source": name, "split": part, "task": task, "accuracy": acc,
                             "n": len(images), "checkpoints": len(used)})
    atomic_write(run_dir / "evaluation.json", json.dumps(rows, indent=2))
    lines = [f"# Evaluation of {run_dir.name} (config {config.name}, {len(used)} checkpoint(s))", "",
             "| dataset | split | task | accuracy | images |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['source']} | {r['split']} | {r['task']} | {100 * r['accuracy']:.2f}% | {r['n']} |" for r in rows]
    atomic_write(run_dir / "evaluation.md", "\n".join(lines) + "\n")
    return rows
