"""python -m models export: the ONNX file runs in ONNX Runtime with the eager model's
outputs at any batch size; the calibration faces are real LFW crops."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from skimage import data

import models
from models.__main__ import main
from models.checkpoint import model_record
from models.export import calibration_faces
from models.train import config_by_name


@pytest.mark.parametrize("config", ["B4", "paper2"])
def test_exported_onnx_matches_eager_at_any_batch(tmp_path, config, capsys):
    cfg = config_by_name(config)
    torch.manual_seed(0)
    model = models.build_model(cfg.model).eval()
    checkpoint = tmp_path / "model.pt"
    torch.save({**model_record(model, cfg), "epoch": 1}, checkpoint)
    out = tmp_path / "net.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert "ONNX opset 17" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = calibration_faces(model.input_size)[:batch]
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_export_needs_an_output_and_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "missing.pt")])
    assert "--out" in capsys.readouterr().err


def test_calibration_faces_are_the_lfw_crops_normalised():
    faces = calibration_faces(25)
    assert faces.shape == (64, 1, 25, 25) and faces.dtype == torch.float32
    expected = np.round(data.lfw_subset()[:64] * 255) / 255
    np.testing.assert_allclose(faces[:, 0].numpy(), expected, atol=1 / 255 + 1e-6)
