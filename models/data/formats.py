"""Readers for the datasets exactly as distributed. Each takes a dataset's folder, reads
whichever of the dataset's known distributions (:data:`DISTRIBUTIONS`) it holds, and returns a
:class:`SourceRecords`: image files (or, for FER-2013, the pixels themselves), per-task labels,
the paper's split, and a :class:`SkipReport` of every row left out and why. Nothing here
raises for a bad row; a folder holding none of the distributions raises FileNotFoundError
naming the files that would have been recognised."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..tasks import FER_EMOTIONS, RAF_AGE, RAF_EMOTIONS, RAF_GENDER, RAF_RACE
from .merge import kfold_splits, split_by_fraction

FER_SIDE = 48
FER_USAGE = {"Training": "train", "PublicTest": "public_test", "PrivateTest": "private_test"}
# Paper 1, section 4.2: Wiki 30000 train / about 4200 test, IMDB 150000 / about 20000.
IMDB_WIKI_TRAIN_FRACTION = {"wiki": 30000 / 34200, "imdb": 150000 / 170000}


@dataclass
class SkipReport:
    """Rows left out, with the reason for each."""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, item: str, reason: str) -> None:
        self.skipped.append((item, reason))

    def counts(self) -> Counter:
        return Counter(reason for _, reason in self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return "nothing skipped"
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts().items()))


@dataclass
class SourceRecords:
    name: str
    labels: dict[str, np.ndarray]          # task -> int64 [N]
    split: np.ndarray                      # [N] str: train / test / public_test / private_test
    paths: Optional[list[Path]] = None     # image files, or
    pixels: Optional[np.ndarray] = None    # uint8 [N, H, W] for datasets that ship pixels
    report: SkipReport = field(default_factory=SkipReport)
    aligned: bool = False                  # the files are face crops the dataset already aligned

    def __len__(self) -> int:
        return len(self.split)


@dataclass(frozen=True)
class Distribution:
    """One form a dataset is distributed in, recognised by any of ``markers`` (paths relative
    to the dataset's folder)."""
    name: str
    markers: tuple[str, ...]

    def marker_in(self, folder: Path) -> Optional[Path]:
        return next((folder / m for m in self.markers if (folder / m).exists()), None)


DISTRIBUTIONS: dict[str, tuple[Distribution, ...]] = {
    "genki4k": (Distribution("GENKI-R2009a archive", ("Subsets/GENKI-4K/GENKI-4K_Labels.txt",)),
                Distribution("GENKI-4K subset folder", ("GENKI-4K_Labels.txt",)),
                Distribution("labels.txt + files/", ("labels.txt",))),
    "fer2013": (Distribution("fer2013.csv (challenge)", ("fer2013.csv",)),
                Distribution("image folders train/, test/", tuple(f"train/{e}" for e in FER_EMOTIONS))),
    "wiki": (Distribution("wiki_crop archive", ("wiki_crop/wiki.mat", "wiki.mat")),),
    "imdb": (Distribution("imdb_crop archive", ("imdb_crop/imdb.mat", "imdb.mat")),),
    "rafdb": (Distribution("RAF-DB basic/", ("basic/EmoLabel/list_patition_label.txt",
                                              "EmoLabel/list_patition_label.txt")),),
}


def find_distribution(name: str, folder) -> Optional[tuple[Distribution, Path]]:
    """The first of dataset ``name``'s distributions found in ``folder``, with its marker."""
    for distribution in DISTRIBUTIONS[name]:
        marker = distribution.marker_in(Path(folder))
        if marker is not None:
            return distribution, marker
    return None


def recognised_files(name: str) -> list[str]:
    return [m for d in DISTRIBUTIONS[name] for m in d.markers]


def _require(name: str, folder) -> tuple[Distribution, Path]:
    found = find_distribution(name, folder)
    if found is None:
        raise FileNotFoundError(f"no {name} dataset in {folder}: expected one of {', '.join(recognised_files(name))}")
    return found


def read_genki4k(root, seed: int = 0, fold: int = 0) -> SourceRecords:
    """GENKI-4K, as the GENKI-R2009a archive (``Subsets/GENKI-4K/GENKI-4K_Labels.txt`` and
    ``GENKI-4K_Images.txt``, images in ``Subsets/GENKI-4K/files/`` or the archive's ``files/``),
    its ``Subsets/GENKI-4K`` folder alone, or ``labels.txt`` + ``files/file0001.jpg``...
    Label line i: smile 0/1, then yaw, pitch, roll; image i: line i of the images list, else
    ``fileNNNN.jpg``. Split: fold ``fold`` (0-3) of a seeded 4-fold split, i.e. the paper's
    3000 train / 1000 test."""
    root = Path(root)
    _, labels_file = _require("genki4k", root)
    lines = labels_file.read_text().splitlines()
    names_file = labels_file.with_name("GENKI-4K_Images.txt")
    names = names_file.read_text().split() if labels_file.name != "labels.txt" and names_file.exists() else None
    image_dirs = list(dict.fromkeys([labels_file.parent / "files", labels_file.parent.parent.parent / "files"]))
    report, paths, smiles = SkipReport(), [], []
    for i, line in enumerate(lines, start=1):
        if names is not None and i > len(names):
            report.add(f"line {i}", "no image name")
            continue
        name = names[i - 1] if names is not None else f"file{i:04d}.jpg"
        path = next((d / name for d in image_dirs if (d / name).exists()), image_dirs[0] / name)
        fields = line.split()
        if not fields or fields[0] not in ("0", "1"):
            report.add(path.name, "bad label")
        elif not path.exists():
            report.add(path.name, "missing file")
        else:
            paths.append(path)
            smiles.append(int(fields[0]))
    split = np.full(len(paths), "train", dtype=object)
    if paths:
        split[kfold_splits(len(paths), 4, seed)[fold][1]] = "test"
    return SourceRecords("genki4k", {"smile": np.array(smiles, dtype=np.int64)}, split, paths=paths, report=report)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def read_fer2013(root) -> SourceRecords:
    """FER-2013: the challenge's ``fer2013.csv`` (columns emotion, pixels: 2304 gray values,
    Usage: Training / PublicTest / PrivateTest), or the image folders most copies hold today,
    ``train/<emotion>/*.jpg`` and ``test/<emotion>/*.jpg`` (48x48 gray; the test folder has no
    public / private split and becomes one split, ``test``)."""
    distribution, marker = _require("fer2013", Path(root))
    if marker.name != "fer2013.csv":
        return _read_fer2013_folders(Path(root))
    path = marker
    report, pixels, emotions, split = SkipReport(), [], [], []
    with path.open(newline="") as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):
            item = f"line {row_number}"
            try:
                values = np.array(row["pixels"].split(), dtype=np.int64)
                emotion = int(row["emotion"])
            except (ValueError, AttributeError, KeyError):
                report.add(item, "unparsable row")
                continue
            if values.size != FER_SIDE * FER_SIDE or values.min() < 0 or values.max() > 255:
                report.add(item, "bad pixels")
            elif not 0 <= emotion < len(FER_EMOTIONS):
                report.add(item, "bad label")
            elif row.get("Usage") not in FER_USAGE:
                report.add(item, "unknown usage")
            else:
                pixels.append(values.astype(np.uint8).reshape(FER_SIDE, FER_SIDE))
                emotions.append(emotion)
                split.append(FER_USAGE[row["Usage"]])
    images = np.stack(pixels) if pixels else np.zeros((0, FER_SIDE, FER_SIDE), np.uint8)
    return SourceRecords("fer2013", {"emotion": np.array(emotions, dtype=np.int64)},
                         np.array(split, dtype=object), pixels=images, report=report)


def _read_fer2013_folders(root: Path) -> SourceRecords:
    from PIL import Image, UnidentifiedImageError

    report, pixels, emotions, split = SkipReport(), [], [], []
    for split_name in ("train", "test"):
        for folder in sorted(p for p in (root / split_name).glob("*") if p.is_dir()):
            if folder.name.lower() not in FER_EMOTIONS:
                report.add(f"{split_name}/{folder.name}/", "unknown emotion folder")
                continue
            for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                try:
                    with Image.open(path) as image:
                        gray = image.convert("L")
                except (OSError, UnidentifiedImageError):
                    report.add(f"{split_name}/{folder.name}/{path.name}", "unreadable image")
                    continue
                if gray.size != (FER_SIDE, FER_SIDE):
                    gray = gray.resize((FER_SIDE, FER_SIDE), Image.BILINEAR)
                pixels.append(np.asarray(gray, dtype=np.uint8))
                emotions.append(FER_EMOTIONS.index(folder.name.lower()))
                split.append(split_name)
    images = np.stack(pixels) if pixels else np.zeros((0, FER_SIDE, FER_SIDE), np.uint8)
    return SourceRecords("fer2013", {"emotion": np.array(emotions, dtype=np.int64)},
                         np.array(split, dtype=object), pixels=images, report=report)


def _mat_column(struct, name: str) -> np.ndarray:
    return np.asarray(struct[name][0, 0]).reshape(-1)


def read_imdb_wiki(root, which: str = "wiki", seed: int = 0, fold: int = 0) -> SourceRecords:
    """IMDB-WIKI: ``{which}_crop/{which}.mat`` (``root`` holds ``{which}_crop/`` or is it), a
    MATLAB struct with full_path, gender (1 male, 0 female, NaN unknown), face_score (-inf: no
    face), second_face_score, dob, photo_taken. Rows with unknown gender or no face are skipped.
    Split: seeded, in the paper's proportions (Wiki 30000 / 34200, IMDB 150000 / 170000);
    ``fold`` k takes the k-th of the disjoint test blocks of one seeded permutation
    (cross-validation)."""
    from scipy.io import loadmat

    if which not in IMDB_WIKI_TRAIN_FRACTION:
        raise ValueError(f"which must be 'wiki' or 'imdb', got {which!r}")
    _, mat_file = _require(which, Path(root))
    folder = mat_file.parent
    try:
        struct = loadmat(mat_file)[which]
    except Exception as e:  # scipy's MatReadError and friends: a truncated or foreign download
        raise ValueError(f"{mat_file} is not a readable {which}.mat ({type(e).__name__}: {e})") from e
    full_path = [str(np.asarray(p).reshape(-1)[0]) for p in _mat_column(struct, "full_path")]
    gender = _mat_column(struct, "gender").astype(np.float64)
    face_score = _mat_column(struct, "face_score").astype(np.float64)
    report, paths, genders = SkipReport(), [], []
    for rel, g, score in zip(full_path, gender, face_score):
        path = folder / rel
        if np.isnan(g):
            report.add(rel, "unknown gender")
        elif np.isneginf(score):
            report.add(rel, "no face")
        elif not path.exists():
            report.add(rel, "missing file")
        else:
            paths.append(path)
            genders.append(int(g))
    train, _ = split_by_fraction(len(paths), IMDB_WIKI_TRAIN_FRACTION[which], seed, fold)
    split = np.full(len(paths), "test", dtype=object)
    split[train] = "train"
    return SourceRecords(which, {"gender": np.array(genders, dtype=np.int64)}, split, paths=paths, report=report)


def read_rafdb(root) -> SourceRecords:
    """RAF-DB basic (``root`` is ``basic/`` or holds it): ``EmoLabel/list_patition_label.txt``
    ("train_00001.jpg 5", emotions 1-7), aligned 100x100 images
    ``Image/aligned/train_00001_aligned.jpg``, and per image
    ``Annotation/manual/train_00001_manu_attri.txt``: five landmark lines, then gender (0 male,
    1 female, 2 unsure), race (0 Caucasian, 1 African-American, 2 Asian) and age group (0-4:
    0-3, 4-19, 20-39, 40-69, 70+). Split from the train_/test_ prefix."""
    _, partition_file = _require("rafdb", Path(root))
    root = partition_file.parent.parent
    lines = partition_file.read_text().splitlines()
    report, paths, split = SkipReport(), [], []
    labels = {"emotion": [], "gender": [], "race": [], "age": []}
    limits = {"emotion": len(RAF_EMOTIONS), "gender": len(RAF_GENDER), "race": len(RAF_RACE), "age": len(RAF_AGE)}
    for line in lines:
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            report.add(line, "bad line")
            continue
        name, emotion = fields[0], int(fields[1]) - 1
        stem = Path(name).stem
        image = root / "Image" / "aligned" / f"{stem}_aligned.jpg"
        annotation = root / "Annotation" / "manual" / f"{stem}_manu_attri.txt"
        if not image.exists():
            report.add(name, "missing file")
            continue
        try:
            attributes = [int(v) for v in annotation.read_text().split()[10:13]]
        except (OSError, ValueError):
            attributes = []
        if len(attributes) != 3:
            report.add(name, "missing annotation")
            continue
        values = dict(zip(("emotion", "gender", "race", "age"), [emotion] + attributes))
        if any(not 0 <= v < limits[t] for t, v in values.items()):
            report.add(name, "bad label")
            continue
        for t, v in values.items():
            labels[t].append(v)
        paths.append(image)
        split.append("test" if stem.startswith("test") else "train")
    # The aligned images are face crops with level eyes (the manual landmarks refer to the
    # original photos): they are used whole, without detection.
    return SourceRecords("rafdb", {t: np.array(v, dtype=np.int64) for t, v in labels.items()},
                         np.array(split, dtype=object), paths=paths, report=report, aligned=True)
