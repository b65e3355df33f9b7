"""Test-time use of a run: load checkpoints, score images, average the last checkpoints
(paper 1's ensemble of the last 10 epochs), per-task accuracy over labelled rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import build_model
from ..io import atomic_write


def load_model(checkpoint) -> torch.nn.Module:
    """The network stored in a trainer checkpoint, in eval mode."""
    state = torch.load(Path(checkpoint), weights_only=False)
    model = build_model(state["model_name"])
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def task_scores(model: torch.nn.Module, images: np.ndarray, kind: str, batch_size: int = 256) -> torch.Tensor:
    """[N, sum(C)]: per-task softmax probabilities (``kind="ce"``) or raw scores (``"svm"``)."""
    outputs = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).unsqueeze(1).float().div_(255.0)
        logits = model(x)
        if kind == "ce":
            logits = torch.cat([s.softmax(dim=1) for s in logits.split(tuple(model.num_classes), dim=1)], dim=1)
        outputs.append(logits)
    return torch.cat(outputs) if outputs else torch.zeros(0, sum(model.num_classes))


def ensemble_scores(checkpoints: Sequence, images: np.ndarray, kind: str) -> torch.Tensor:
    """Mean of ``task_scores`` over the checkpoints (probabilities for ce, scores for svm)."""
    if not checkpoints:
        raise ValueError("ensemble_scores needs at least one checkpoint")
    return torch.stack([task_scores(load_model(c), images, kind) for c in checkpoints]).mean(dim=0)


def accuracy(scores: torch.Tensor, labels: np.ndarray, num_classes: Sequence[int],
             task_names: Sequence[str]) -> dict[str, float]:
    """Accuracy per task over the rows labelled for it (NaN where none is)."""
    out = {}
    labels = torch.from_numpy(np.asarray(labels))
    for t, (name, s) in enumerate(zip(task_names, scores.split(tuple(num_classes), dim=1))):
        labelled = labels[:, t] >= 0
        n = int(labelled.sum())
        out[name] = float((s.argmax(dim=1)[labelled] == labels[labelled, t]).float().mean()) if n else float("nan")
    return out


def run_config(run_dir) -> dict:
    """The training config stored in a run's last checkpoint."""
    checkpoints = sorted((Path(run_dir) / "checkpoints").glob("epoch-*.pt"))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints in {run_dir}/checkpoints: train a model first "
                                f"(python -m models train --config B4 --data-root DATA --out {run_dir})")
    from .config import TrainConfig

    stored = torch.load(checkpoints[-1], weights_only=False)["config"]
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})


def evaluate_run(run_dir, sources) -> list[dict]:
    """Accuracy per (source, test split, task the source labels) of a run: its last
    checkpoint, or the mean of its last ``ensemble_size`` ones if ``config.ensemble``.
    ``sources``: (name, images, {task: labels}, split) as the CLI's ``load_sources`` gives.
    Also writes evaluation.json and evaluation.md into ``run_dir``."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch-*.pt"))
    used = checkpoints[-config.ensemble_size:] if config.ensemble else checkpoints[-1:]
    model = load_model(used[-1])
    rows = []
    for name, images, labels, split in sources:
        for part in sorted(set(split) - {"train"}):
            mask = split == part
            scores = ensemble_scores(used, images[mask], config.loss)
            matrix = np.full((int(mask.sum()), len(model.task_names)), -1, dtype=np.int64)
            for task, values in labels.items():
                matrix[:, model.task_names.index(task)] = values[mask]
            for task, acc in accuracy(scores, matrix, model.num_classes, model.task_names).items():
                if task in labels:
                    rows.append({"source": name, "split": part, "task": task, "accuracy": acc,
                                 "n": int(mask.sum()), "checkpoints": len(used)})
    atomic_write(run_dir / "evaluation.json", json.dumps(rows, indent=2))
    lines = [f"# Evaluation of {run_dir.name} (config {config.name}, {len(used)} checkpoint(s))", "",
             "| dataset | split | task | accuracy | images |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['source']} | {r['split']} | {r['task']} | {100 * r['accuracy']:.2f}% | {r['n']} |" for r in rows]
    atomic_write(run_dir / "evaluation.md", "\n".join(lines) + "\n")
    return rows
