"""The papers' networks, and the application around mtkernels (``python -m models``)."""

from .bknet import MultiTaskBKNet
from .common import MultiTaskNet
from .emotion_cnn import FourTaskCNN
from .resnet import MultiTaskResNet

MODELS = {
    "bknet": MultiTaskBKNet,
    "resnet-v1": lambda: MultiTaskResNet(version=1),
    "resnet-v2": lambda: MultiTaskResNet(version=2),
    "emotion-cnn": FourTaskCNN,
}


def build_model(name: str) -> MultiTaskNet:
    """One of ``MODELS`` by name, freshly initialised."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name]()


from .analysis import analyze  # noqa: E402  (after build_model, which it uses)

__all__ = ["MultiTaskBKNet", "MultiTaskResNet", "FourTaskCNN", "MultiTaskNet", "MODELS", "build_model", "analyze"]
