"""Thin trainer for the papers' recipes (configs in ``config.py``, loop in ``trainer.py``)."""

from .config import CONFIGS, TrainConfig, config_by_name
from .trainer import TrainingDiverged, TrainResult, train

__all__ = ["CONFIGS", "TrainConfig", "config_by_name", "TrainingDiverged", "TrainResult", "train"]
