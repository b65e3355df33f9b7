"""Handing a network to other runtimes: its eager graph as ONNX (dynamic batch), and the
real-face calibration images that int8 inference needs."""

from __future__ import annotations

import functools
import io

import numpy as np
import torch
from PIL import Image

from .data.augment import to_model_input
from .io import atomic_write

ONNX_OPSET = 17
CALIBRATION_FACES = 64


def export_onnx(model: torch.nn.Module, path=None) -> bytes:
    """The eval-mode eager ``model`` as an ONNX file (input ``x`` [batch, C, H, W] float32,
    output ``logits`` [batch, sum(C)]), written atomically to ``path`` if given."""
    model = model.eval()
    example = torch.zeros(2, model.in_channels, model.input_size, model.input_size)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    data = buffer.getvalue()
    if path is not None:
        atomic_write(path, data)
    return data


@functools.lru_cache(maxsize=None)
def calibration_faces(size: int, count: int = CALIBRATION_FACES) -> torch.Tensor:
    """``count`` (at most 200) real gray faces from scikit-image's LFW crops, resized to
    ``size`` and normalised as the networks' input: [count, 1, size, size] float32."""
    from skimage import data

    crops = (data.lfw_subset()[:count] * 255).round().astype(np.uint8)
    resized = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in crops])
    return to_model_input(resized)
