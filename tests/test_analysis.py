"""models.analysis / `python -m models analyze`: faces found where they are, records complete
and consistent, annotated copies coloured by the predicted gender, problems reported
without stopping, fused and eager model agreeing, any trainer checkpoint accepted and
anything else refused with a way forward."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from test_train import learnable_dataset, small_config

import models
from models.__main__ import main
from models.analysis import FEMALE_COLOUR, MALE_COLOUR, Analyzer
from models.checkpoint import CheckpointError, model_record
from models.io import atomic_write
from models.tasks import PAPER1_TASKS, PAPER2_TASKS
from models.train import config_by_name, train

# Eileen Collins' face in skimage's astronaut photo, boxed by hand (x0, y0, x1, y1).
ASTRONAUT_FACE = (180, 65, 265, 180)


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(small_config(epochs=1, augment=False), learnable_dataset(32), out, progress=False)
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder with one good photo, one corrupt file and one image without a face."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    Image.fromarray(gradient).save(folder / "no-face.png")
    return folder


def check_face_record(record, task_names, class_names, key="probabilities"):
    assert set(record) >= {"source", "frame", "face", "box", "landmarks", "confidence", "tasks"}
    x0, y0, x1, y1 = record["box"]
    assert x0 < x1 and y0 < y1 and 0 < record["confidence"] <= 1
    landmarks = np.array(record["landmarks"])
    assert landmarks.shape == (5, 2)
    assert (landmarks[:, 0] > x0).all() and (landmarks[:, 0] < x1).all()
    assert (landmarks[:, 1] > y0).all() and (landmarks[:, 1] < y1).all()
    assert tuple(record["tasks"]) == tuple(task_names)
    for task, classes in zip(task_names, class_names):
        result = record["tasks"][task]
        values = result[key]
        assert tuple(values) == tuple(classes)
        assert result["label"] == max(values, key=values.get)
        if key == "probabilities":
            assert sum(values.values()) == pytest.approx(1.0, abs=1e-6)
            assert all(0 <= v <= 1 for v in values.values())


def test_astronaut_face_found_labelled_and_drawn_in_its_gender_colour(trained_run, photos, tmp_path):
    records = models.analyze(photos / "astronaut.png", weights=trained_run, out_dir=tmp_path)
    assert len(records) == 1
    face = records[0]
    check_face_record(face, PAPER1_TASKS, PAPER1_TASKS.values())
    assert face["source"] == str(photos / "astronaut.png") and face["frame"] is None and face["face"] == 0
    assert iou(face["box"], ASTRONAUT_FACE) > 0.6
    (left_eye, right_eye, nose, mouth_left, mouth_right) = np.array(face["landmarks"])
    assert left_eye[1] < nose[1] < mouth_left[1] and right_eye[1] < nose[1] < mouth_right[1]

    annotated = np.asarray(Image.open(face["annotated"]).convert("RGB"))
    assert annotated.shape == data.astronaut().shape
    x0, y0, x1, y1 = (round(v) for v in face["box"])
    on_left_edge = annotated[(y0 + y1) // 2, x0 + 1]
    on_bottom_edge = annotated[y1 - 1, (x0 + x1) // 2]
    want = FEMALE_COLOUR if face["tasks"]["gender"]["label"] == "female" else MALE_COLOUR
    assert tuple(on_left_edge) == want and tuple(on_bottom_edge) == want


def test_directory_reports_problems_and_keeps_going(trained_run, photos, tmp_path, capsys):
    out_json = tmp_path / "faces.json"
    code = main(["analyze", str(photos), "--weights", str(trained_run), "--json", str(out_json),
                 "--out", str(tmp_path / "annotated"), "--quiet"])
    assert code == 0
    document = json.loads(out_json.read_text())
    records = document["records"]
    problems = {r["source"].rsplit("/", 1)[-1]: r["problem"] for r in records if "problem" in r}
    assert problems == {"corrupt.jpg": "unreadable image", "no-face.png": "no face"}
    faces = [r for r in records if "problem" not in r]
    assert len(faces) == 1 and faces[0]["source"].endswith("astronaut.png")
    summary = document["summary"]
    assert summary["files"] == 3 and summary["faces"] == 1
    assert summary["problems"] == {"unreadable image": 1, "no face": 1}
    assert document["model"]["architecture"] == "bknet" and document["model"]["outputs"] == "probabilities"
    assert sorted(p.name for p in (tmp_path / "annotated").iterdir()) == ["astronaut.png"]
    err = capsys.readouterr().err
    assert "1 faces" in err and "faces/s" in err and "1 no face" in err and "1 unreadable image" in err


def test_json_lines_on_standard_output(trained_run, photos, capsys):
    assert main(["analyze", str(photos / "astronaut.png"), str(photos / "missing.png"),
                 "--weights", str(trained_run), "--quiet"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [("problem" in r) for r in lines] == [False, True]
    assert lines[1]["problem"] == "missing file"


def test_fused_and_eager_models_agree(trained_run, photos):
    images = [data.astronaut(), np.asarray(Image.open(photos / "astronaut.png").rotate(8, fillcolor=0))]
    fused = Analyzer(trained_run, fused=True).run(images)
    eager = Analyzer(trained_run, fused=False).run(images)
    pairs = list(zip(fused, eager, strict=True))
    assert len(pairs) == 2
    for f, e in pairs:
        assert f["box"] == e["box"]
        for task in f["tasks"]:
            assert f["tasks"][task]["label"] == e["tasks"][task]["label"]
            for c, p in f["tasks"][task]["probabilities"].items():
                assert p == pytest.approx(e["tasks"][task]["probabilities"][c], abs=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_option(trained_run, photos, precision, capsys):
    """--precision runs the fused model in bf16 / int8: the same faces, probabilities that
    still sum to 1 per task, and the precision in the model line on standard error."""
    assert main(["analyze", str(photos / "astronaut.png"), "--weights", str(trained_run), "--quiet",
                 "--precision", precision]) == 0
    captured = capsys.readouterr()
    assert f"fused {precision}" in captured.err
    (record,) = [json.loads(line) for line in captured.out.splitlines()]
    (reference,) = Analyzer(trained_run).run([data.astronaut()])
    assert record["box"] == reference["box"]
    for task in record["tasks"]:
        assert sum(record["tasks"][task]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    with pytest.raises(ValueError, match="needs the fused model"):
        Analyzer(trained_run, fused=False, precision=precision)


def test_video_every_kth_frame(trained_run, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    face = Image.fromarray(data.astronaut()).resize((256, 256))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.asarray(face.rotate(2 * i)), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    records = models.analyze([path, broken], weights=trained_run, every=2, out_dir=tmp_path / "out")
    assert [r["frame"] for r in records] == [0, 2, 4, None]
    assert all("problem" not in r for r in records[:3])
    assert records[3]["source"] == str(broken) and records[3]["problem"].startswith("unreadable video")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "clip-frame000000.png", "clip-frame000002.png", "clip-frame000004.png"]


@pytest.mark.parametrize("config, tasks, key", [
    ("paper2", PAPER2_TASKS, "probabilities"),   # 4 tasks, RAF-DB class names, 50x50 eye-levelled crops
    ("B3", PAPER1_TASKS, "scores"),              # SVM loss: raw scores, not probabilities
])
def test_any_trainer_checkpoint_kind(tmp_path, config, tasks, key):
    cfg = config_by_name(config)
    torch.manual_seed(0)
    model = models.build_model(cfg.model)
    checkpoint = tmp_path / "model.pt"
    torch.save({**model_record(model, cfg), "epoch": 1}, checkpoint)
    (record,) = models.analyze(data.astronaut(), weights=checkpoint)
    check_face_record(record, tasks, tasks.values(), key)


def test_missing_or_wrong_weights_stop_with_a_way_forward(photos, tmp_path, capsys):
    not_a_checkpoint = tmp_path / "weights.pt"
    torch.save(models.build_model("bknet").state_dict(), not_a_checkpoint)  # bare weights: no tasks, no classes
    text_file = tmp_path / "notes.pt"
    atomic_write(text_file, "not a checkpoint")
    for weights in ([], ["--weights", str(not_a_checkpoint)], ["--weights", str(text_file)],
                    ["--weights", str(tmp_path)]):
        assert main(["analyze", str(photos / "astronaut.png"), *weights, "--quiet"]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # no predictions at all
        assert "python -m models train" in captured.err
    with pytest.raises(CheckpointError, match="lacks"):
        models.analyze(photos, weights=not_a_checkpoint)


def test_bad_options_are_refused(trained_run, photos, capsys):
    for option in (["--batch-size", "0"], ["--every", "-1"], ["--min-face-size", "5"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            main(["analyze", str(photos), "--weights", str(trained_run), *option])
        assert option[0] in capsys.readouterr().err
