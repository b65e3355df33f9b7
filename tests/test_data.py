"""models/data: readers on generated fixtures in the real formats, MTCNN crops, merge,
batched augmentation."""

import math

import numpy as np
import pytest
import torch

from models.data import (
    augment_batch,
    kfold_splits,
    merge_sources,
    read_fer2013,
    read_genki4k,
    read_imdb_wiki,
    read_rafdb,
    split_by_fraction,
    synthetic,
)

# --- readers ------------------------------------------------------------------------------------

def test_genki4k_reader(tmp_path):
    synthetic.write_genki4k(tmp_path, n=12, missing=1, corrupt=1, faceless=1)
    records = read_genki4k(tmp_path)
    assert len(records) == 12 and records.report.counts() == {"missing file": 1}
    labels = [int(line.split()[0]) for line in (tmp_path / "labels.txt").read_text().splitlines()][:12]
    assert records.labels["smile"].tolist() == labels
    assert sorted(records.split.tolist()).count("test") == 3  # fold 0 of 4: a quarter


def test_fer2013_reader(tmp_path):
    synthetic.write_fer2013(tmp_path, n=40, bad_rows=1)
    records = read_fer2013(tmp_path)
    assert len(records) == 39 and records.report.counts() == {"bad pixels": 1}
    assert records.pixels.shape == (39, 48, 48) and records.pixels.dtype == np.uint8
    assert set(records.split) == {"train", "public_test", "private_test"}
    first = (tmp_path / "fer2013.csv").read_text().splitlines()[2].split(",")  # first good row
    assert records.labels["emotion"][0] == int(first[0])
    assert records.pixels[0].reshape(-1).tolist() == [int(v) for v in first[1].split()]


@pytest.mark.parametrize("which", ["wiki", "imdb"])
def test_imdb_wiki_reader(tmp_path, which):
    synthetic.write_imdb_wiki(tmp_path, which=which, n=30, unknown_gender=2, no_face=1)
    records = read_imdb_wiki(tmp_path, which)
    assert len(records) == 27
    assert records.report.counts() == {"unknown gender": 2, "no face": 1}
    assert set(records.labels["gender"]) <= {0, 1}
    assert all(p.exists() for p in records.paths)
    train = (records.split == "train").sum()
    fraction = {"wiki": 30000 / 34200, "imdb": 150000 / 170000}[which]
    assert train == round(27 * fraction)


def test_rafdb_reader(tmp_path):
    synthetic.write_rafdb(tmp_path, n=20, missing_annotation=1)
    records = read_rafdb(tmp_path)
    assert len(records) == 19 and records.report.counts() == {"missing annotation": 1}
    lines = (tmp_path / "EmoLabel" / "list_patition_label.txt").read_text().splitlines()[1:]
    assert records.labels["emotion"].tolist() == [int(line.split()[1]) - 1 for line in lines]
    assert set(records.labels) == {"emotion", "gender", "race", "age"}
    assert (records.split == "test").sum() == sum(line.startswith("test") for line in lines)


def test_missing_dataset_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.txt"):
        read_genki4k(tmp_path / "nowhere")


# --- faces ------------------------------------------------------------------------------------------

def test_mtcnn_crop_on_astronaut_and_faceless_image(tmp_path):
    from PIL import Image
    from skimage import data

    from models.data.faces import CropSettings, FaceCropper

    Image.fromarray(data.astronaut()).save(tmp_path / "astronaut.png")
    Image.fromarray(np.zeros((120, 120, 3), np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    cropper = FaceCropper(CropSettings(size=48))
    faces = cropper.detect(Image.open(tmp_path / "astronaut.png"))
    assert len(faces) == 1 and faces[0].confidence > 0.99
    x0, y0, x1, y1 = faces[0].box
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200  # her face, not the suit or the flag
    crop, reason = cropper.crop_file(tmp_path / "astronaut.png")
    assert reason == "" and crop.shape == (48, 48) and crop.dtype == np.uint8
    assert cropper.crop_file(tmp_path / "blank.png") == (None, "no face")
    assert cropper.crop_file(tmp_path / "broken.jpg") == (None, "unreadable image")
    assert cropper.crop_file(tmp_path / "gone.jpg") == (None, "missing file")


def test_channels_last_detector_finds_what_facenet_default_finds():
    from facenet_pytorch import MTCNN
    from PIL import Image
    from skimage import data

    from models.data.faces import FaceCropper

    lfw = (data.lfw_subset()[:16] * 255).astype(np.uint8)
    group = Image.new("L", (4 * 160, 4 * 160), 128)
    for k, face in enumerate(lfw):
        group.paste(Image.fromarray(face).resize((120, 120), Image.BICUBIC), ((k % 4) * 160 + 20, (k // 4) * 160 + 20))
    default = MTCNN(keep_all=True)
    cropper = FaceCropper()
    for image in (Image.fromarray(data.astronaut()), group.convert("RGB")):
        boxes, probs, points = (np.asarray(v, np.float64) for v in default.detect(image, landmarks=True))
        ours = sorted(cropper.detect(image), key=lambda f: (f.box[1], f.box[0]))
        order = np.lexsort((boxes[:, 0], boxes[:, 1]))
        assert len(ours) == len(boxes) >= 1
        np.testing.assert_allclose([f.box for f in ours], boxes[order], atol=1e-3)
        np.testing.assert_allclose([f.landmarks for f in ours], points[order], atol=1e-3)
        np.testing.assert_allclose([f.confidence for f in ours], probs[order], atol=1e-5)


def test_crop_dataset_caches_resumes_and_reports(tmp_path):
    from models.data.faces import CHUNK, CropSettings, crop_dataset

    class CountingCropper:
        """Stands in for MTCNN: 'finds' a face in every file whose name has no 'x'."""
        settings = CropSettings(size=8)
        calls = 0

        def crop_files(self, paths):
            return [self.crop_file(p) for p in paths]

        def crop_file(self, path):
            CountingCropper.calls += 1
            return (None, "no face") if "x" in path.name else (np.full((8, 8), len(path.name), np.uint8), "")

    paths = [tmp_path / (f"{i}x.jpg" if i % 7 == 0 else f"{i}.jpg") for i in range(CHUNK + 10)]
    images, kept, report = crop_dataset("demo", paths, tmp_path / "cache", CountingCropper.settings,
                                        cropper=CountingCropper(), progress=False)
    faceless = [i for i in range(len(paths)) if i % 7 == 0]
    assert kept.tolist() == [i for i in range(len(paths)) if i % 7]
    assert report.counts() == {"no face": len(faceless)} and images.shape == (len(kept), 8, 8)
    calls = CountingCropper.calls
    again = crop_dataset("demo", paths, tmp_path / "cache", CountingCropper.settings, cropper=CountingCropper(),
                         progress=False)
    assert CountingCropper.calls == calls and np.array_equal(again[0], images)  # served from the cache

    # A run killed after its first chunk: only the rest is cropped again.
    for f in (tmp_path / "cache").glob("*.npz"):
        f.unlink()
    CountingCropper.calls = 0

    class Killed(Exception):
        pass

    class DyingCropper(CountingCropper):
        def crop_file(self, path):
            if CountingCropper.calls == CHUNK:
                raise Killed
            return super().crop_file(path)

    with pytest.raises(Killed):
        crop_dataset("demo", paths, tmp_path / "cache", CountingCropper.settings, cropper=DyingCropper(),
                     progress=False)
    CountingCropper.calls = 0
    resumed = crop_dataset("demo", paths, tmp_path / "cache", CountingCropper.settings, cropper=CountingCropper(),
                           progress=False)
    assert CountingCropper.calls == len(paths) - CHUNK
    assert np.array_equal(resumed[0], images) and np.array_equal(resumed[1], kept)


# --- merge and splits --------------------------------------------------------------------------------

def test_merge_three_sources_by_hand():
    genki = ("genki", np.zeros((3, 4, 4), np.uint8), {"smile": np.array([1, 0, 1])})
    fer = ("fer", np.ones((30, 4, 4), np.uint8), {"emotion": np.arange(30) % 7})
    wiki = ("wiki", np.full((15, 4, 4), 2, np.uint8), {"gender": np.arange(15) % 2})
    merged = merge_sources([genki, fer, wiki], ("smile", "emotion", "gender"))
    # genki x round(30/3)=10, fer x1, wiki x round(30/15)=2: 30 + 30 + 30 rows
    assert len(merged) == 90 and np.bincount(merged.source).tolist() == [30, 30, 30]
    genki_rows = merged.labels[merged.source == 0]
    assert genki_rows[:, 0].tolist() == [1, 0, 1] * 10 and (genki_rows[:, 1:] == -1).all()
    fer_rows = merged.labels[merged.source == 1]
    assert (fer_rows[:, [0, 2]] == -1).all() and fer_rows[:, 1].tolist() == (np.arange(30) % 7).tolist()
    assert (merged.images[merged.source == 2] == 2).all()
    unbalanced = merge_sources([genki, fer, wiki], ("smile", "emotion", "gender"), balance=False)
    assert len(unbalanced) == 48


def test_paper_balancing_example():
    a = ("a", np.zeros((3000, 1, 1), np.uint8), {"t0": np.zeros(3000, int)})
    b = ("b", np.zeros((30000, 1, 1), np.uint8), {"t1": np.zeros(30000, int)})
    assert len(merge_sources([a, b], ("t0", "t1"))) == 60000


def test_merge_rejects_unknown_task_and_length_mismatch():
    with pytest.raises(ValueError, match="not in task_names"):
        merge_sources([("a", np.zeros((2, 1, 1)), {"age": np.zeros(2)})], ("smile",))
    with pytest.raises(ValueError, match="3 smile labels for 2 images"):
        merge_sources([("a", np.zeros((2, 1, 1)), {"smile": np.zeros(3)})], ("smile",))


def test_kfold_and_fraction_splits_are_partitions():
    folds = kfold_splits(4000, 4, seed=2)
    tests = np.concatenate([test for _, test in folds])
    assert sorted(tests.tolist()) == list(range(4000)) and all(len(test) == 1000 for _, test in folds)
    for train, test in folds:
        assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 4000
    train, test = split_by_fraction(1000, 0.9, seed=0)
    assert len(train) == 900 and len(np.union1d(train, test)) == 1000
    assert np.array_equal(kfold_splits(100, 4, 7)[1][1], kfold_splits(100, 4, 7)[1][1])


def test_fraction_folds_have_disjoint_test_sets_in_the_papers_proportions():
    n = 34200
    splits = [split_by_fraction(n, 30000 / 34200, seed=0, fold=k) for k in range(4)]
    for train, test in splits:
        assert len(train) == 30000 and len(test) == 4200
        assert len(np.intersect1d(train, test)) == 0 and len(np.union1d(train, test)) == n
    for a in range(4):
        for b in range(a + 1, 4):
            assert len(np.intersect1d(splits[a][1], splits[b][1])) == 0
    with pytest.raises(ValueError, match="fold must be in"):
        split_by_fraction(100, 0.75, seed=0, fold=4)


def test_readers_split_by_fold(tmp_path):
    from models.data.sources import read_source, write_synthetic

    for name in ("genki4k", "wiki", "fer2013"):
        write_synthetic(name, tmp_path)
    for name in ("genki4k", "wiki"):
        tests = [set(np.flatnonzero(read_source(name, tmp_path, fold=k).split == "test")) for k in (1, 2, 3, 4)]
        assert all(tests) and all(not (tests[a] & tests[b]) for a in range(4) for b in range(a + 1, 4))
    fer = [read_source("fer2013", tmp_path, fold=k).split for k in (1, 4)]
    assert np.array_equal(fer[0], fer[1])  # Kaggle's split in every fold
    with pytest.raises(ValueError, match="fold must be in 1..4"):
        read_source("genki4k", tmp_path, fold=5)


# --- augmentation -------------------------------------------------------------------------------------

def pattern(b=3, side=48):
    x = torch.zeros(b, 1, side, side)
    x[:, :, 10:20, 5:15] = 1.0  # an off-centre block: flips and rotations move it
    return x + torch.arange(b).view(b, 1, 1, 1) * 0.01


def test_identity_settings_return_the_input():
    x = pattern()
    torch.testing.assert_close(augment_batch(x, margin=0, max_degrees=0, flip=False), x)


def test_flip_and_shift_are_exact_pixel_moves():
    x = pattern(b=64)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, margin=3, max_degrees=0, flip=True)
    matched = 0
    for i in range(64):
        candidates = [torch.roll(v, (dy, dx), (1, 2)) for v in (x[i], torch.flip(x[i], [2]))
                      for dy in range(-3, 4) for dx in range(-3, 4)]
        # rolled copies differ from a black-filled shift only in the wrapped border
        if any(torch.allclose(out[i, :, 4:-4, 4:-4], c[:, 4:-4, 4:-4], atol=1e-5) for c in candidates):
            matched += 1
    assert matched == 64


def test_rotation_keeps_the_centre_and_fills_black():
    ones = torch.ones(32, 1, 48, 48)
    rotated = augment_batch(ones, torch.Generator().manual_seed(1), margin=0, max_degrees=15.0, flip=False)
    corners = rotated[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    centre = rotated[:, 0, 24, 24]
    assert torch.allclose(centre, torch.ones(32))
    assert (corners.min(dim=1).values < 0.5).float().mean() > 0.5  # most rotations bring black corners in


def test_rotation_angle_is_within_bounds():
    # A thin horizontal line through the centre: its tilt after augmentation is the rotation angle.
    x = torch.zeros(200, 1, 49, 49)
    x[:, :, 24, :] = 1.0
    out = augment_batch(x, torch.Generator().manual_seed(3), margin=0, max_degrees=15.0, flip=False)
    for img in out[:, 0]:
        cols = [c for c in (4, 44) if img[:, c].sum() > 0.5]
        ys = [float((img[:, c] * torch.arange(49.0)).sum() / img[:, c].sum()) for c in cols]
        angle = math.degrees(math.atan2(abs(ys[1] - ys[0]), 40)) if len(ys) == 2 else 0.0
        assert angle <= 15.5


def test_augmentation_is_deterministic_under_a_seed():
    x = pattern(b=8)
    a = augment_batch(x, torch.Generator().manual_seed(5))
    b = augment_batch(x, torch.Generator().manual_seed(5))
    c = augment_batch(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape


def test_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        augment_batch(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


def test_eye_line_rotation_is_capped(tmp_path):
    from PIL import Image
    from skimage import data

    from models.data.faces import CropSettings, FaceCropper

    tilted = Image.fromarray(data.astronaut()).rotate(-25, resample=Image.BILINEAR, center=(225, 115))
    level = FaceCropper(CropSettings(size=48, level_eyes=True, max_rotation=10.0))
    plain = FaceCropper(CropSettings(size=48))
    face = level.detect(tilted)[0]
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    assert abs(math.degrees(math.atan2(ry - ly, rx - lx))) > 15  # really tilted
    levelled, unlevelled = level.crop(tilted, face), plain.crop(tilted, face)
    capped = plain.crop(tilted.rotate(10 * np.sign(ry - ly), resample=Image.BILINEAR,
                                      center=((lx + rx) / 2, (ly + ry) / 2)), face)
    assert not np.array_equal(levelled, unlevelled)
    assert np.abs(levelled.astype(int) - capped.astype(int)).mean() < 1.0  # rotated by exactly the 10 degree cap


def test_prepare_source_crops_and_reports(tmp_path):
    from models.data.faces import CropSettings, prepare_source

    synthetic.write_genki4k(tmp_path / "genki", n=6, missing=1, corrupt=1, faceless=1)
    records = read_genki4k(tmp_path / "genki")
    images, labels, split, report = prepare_source(records, tmp_path / "cache", CropSettings(size=48), progress=False)
    assert report.counts() == {"missing file": 1, "unreadable image": 1, "no face": 1}
    assert images.shape == (4, 48, 48) and len(labels["smile"]) == 4 and len(split) == 4
    fer = read_fer2013(synthetic.write_fer2013(tmp_path / "fer", n=5, bad_rows=0))
    pixels, _, _, _ = prepare_source(fer, tmp_path / "cache", CropSettings(size=50), progress=False)
    assert pixels.shape == (5, 50, 50)


def test_synth_and_prepare_commands(tmp_path, capsys):
    from models.__main__ import main

    assert main(["synth", "--out", str(tmp_path), "--sources", "fer2013", "rafdb"]) == 0
    assert (tmp_path / "fer2013" / "fer2013.csv").exists()
    assert (tmp_path / "rafdb" / "EmoLabel" / "list_patition_label.txt").exists()
    assert main(["prepare", "--data-root", str(tmp_path), "--sources", "fer2013", "--cache",
                 str(tmp_path / "cache"), "--quiet"]) == 0
    assert "fer2013: 39 faces" in capsys.readouterr().out
    assert main(["prepare", "--data-root", str(tmp_path), "--sources", "genki4k", "--quiet"]) == 2
    assert "genki4k: not found" in capsys.readouterr().err
