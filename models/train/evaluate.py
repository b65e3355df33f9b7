"""Test-time use of a run: load checkpoints, score images, average the last checkpoints
(paper 1's ensemble of the last 10 epochs), per-task accuracy over labelled rows."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import build_model


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
