"""Trained-model files: what the trainer writes beside the weights, and the one way every
reader (``evaluate``, ``analyze``) opens them. A checkpoint records the architecture, the
tasks and their class names and the training config, so a model is rebuilt from the file
alone. Files are read with ``torch.load(weights_only=True)``: opening a checkpoint someone
sent you runs no code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from . import MODELS, build_model

CHECKPOINTS = "checkpoints"
BEST = "best.pt"  # paper 2's early stopping: the weights of the best validation epoch
REQUIRED = ("model", "model_name", "task_names", "class_names", "num_classes", "config")
HOW_TO_TRAIN = ("train a model first, e.g. `python -m models train --config B4 --data-root DATA --out runs/B4` "
                "(`python -m models synth --out DATA` writes small datasets to try it), then use runs/B4")


class CheckpointError(ValueError):
    """The weights given are missing, unreadable, or not a model the trainer wrote."""


def model_record(model, config) -> dict:
    """What a checkpoint stores besides the optimisation state: enough to rebuild ``model``."""
    import dataclasses

    return {"model": model.state_dict(), "model_name": config.model, "task_names": tuple(model.task_names),
            "class_names": tuple(tuple(c) for c in model.class_names), "num_classes": tuple(model.num_classes),
            "config": dataclasses.asdict(config)}


def epoch_checkpoints(run_dir) -> list[Path]:
    """A run's epoch checkpoints, oldest first."""
    return sorted((Path(run_dir) / CHECKPOINTS).glob("epoch-*.pt"))


def resolve(weights) -> Path:
    """The checkpoint file meant by ``weights``: a file as given; a run directory gives its
    ``best.pt`` if training kept one (paper 2), else its last epoch checkpoint."""
    if weights is None:
        raise CheckpointError(f"no weights given: a trained model is needed; {HOW_TO_TRAIN}")
    path = Path(weights)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"weights {str(path)!r} does not exist; {HOW_TO_TRAIN}")
    if (path / BEST).is_file():
        return path / BEST
    found = epoch_checkpoints(path) or sorted(path.glob("epoch-*.pt"))
    if not found:
        raise CheckpointError(f"no checkpoint in run directory {str(path)!r} (expected {CHECKPOINTS}/epoch-*.pt); "
                              f"{HOW_TO_TRAIN}")
    return found[-1]


def load_checkpoint(path) -> dict:
    """The contents of a trainer checkpoint, checked to be one."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; {HOW_TO_TRAIN}") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint written by `python -m models train` (it holds "
                              f"Python objects besides tensors and plain data, which are not loaded for safety); "
                              f"{HOW_TO_TRAIN}") from None
    except Exception as e:  # torch raises many types for a file that is not a torch save at all
        raise CheckpointError(f"{str(path)!r} is not a checkpoint written by `python -m models train` "
                              f"(unreadable: {type(e).__name__}); {HOW_TO_TRAIN}") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint written by `python -m models train` "
                              f"(it lacks {', '.join(missing)}); {HOW_TO_TRAIN}")
    if state["model_name"] not in MODELS:
        raise CheckpointError(f"{str(path)!r} holds an unknown architecture {state['model_name']!r} "
                              f"(known: {', '.join(sorted(MODELS))})")
    return state


def config_of(state: dict):
    """The TrainConfig a checkpoint was trained with."""
    from .train.config import TrainConfig

    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})


def load_model(weights) -> tuple[torch.nn.Module, dict]:
    """(the trained network in eval mode, its checkpoint contents) for a checkpoint file or run directory."""
    path = resolve(weights)
    state = load_checkpoint(path)
    model = build_model(state["model_name"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{str(path)!r}: weights do not fit a {state['model_name']}: "
                              f"{str(e).splitlines()[0]}") from None
    state["path"] = str(path)
    return model.eval(), state
