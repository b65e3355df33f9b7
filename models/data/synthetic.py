"""Synthetic datasets in the exact on-disk formats of GENKI-4K, FER-2013, IMDB-WIKI and
RAF-DB, built from the real faces scikit-image ships (``astronaut``, ``lfw_subset``).
Labels are learnable from the pixels (each class draws its own stripe), so a trainer has
something to learn; ``corrupt``, ``faceless``, ``missing`` and the like plant the rows a
reader must report and skip."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    from skimage import data

    return (data.lfw_subset() * 255).astype(np.uint8)  # [200, 25, 25] real faces


def _astronaut_face() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # 512x512 RGB, one face at about (180..270, 60..170)


def _labelled_face(rng: np.random.Generator, label: int, classes: int, side: int) -> np.ndarray:
    faces = _faces()
    face = faces[rng.integers(len(faces))]
    image = np.asarray(Image.fromarray(face).resize((side, side), Image.BILINEAR), dtype=np.float32)
    band = side // (classes + 1)
    row = band * (label + 1) - band // 2
    image[row:row + max(1, band // 2), :] = 255.0  # the class is visible: a learnable task
    return image.astype(np.uint8)


GENKI_LAYOUTS = ("labels", "archive")
FER_LAYOUTS = ("csv", "folders")


def write_genki4k(root, n: int = 12, seed: int = 0, missing: int = 1, corrupt: int = 1, faceless: int = 1,
                  layout: str = "labels") -> Path:
    """Photos with a real face (one ``faceless``, one ``corrupt``) and labels with one more line
    than there are files (``missing``). ``layout`` "labels": ``root/files/fileNNNN.jpg`` and
    ``labels.txt``; "archive": as the GENKI-R2009a archive, ``root/Subsets/GENKI-4K/`` holding
    ``GENKI-4K_Labels.txt``, ``GENKI-4K_Images.txt`` and ``files/``."""
    if layout not in GENKI_LAYOUTS:
        raise ValueError(f"layout must be one of {GENKI_LAYOUTS}, got {layout!r}")
    root = Path(root)
    folder = root if layout == "labels" else root / "Subsets" / "GENKI-4K"
    (folder / "files").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photo = _astronaut_face()
    lines, names = [], []
    for i in range(1, n + missing + 1):
        smile = int(rng.integers(2))
        lines.append(f"{smile} {rng.normal():.6f} {rng.normal():.6f} {rng.normal():.6f}")
        names.append(f"file{i:04d}.jpg")
        path = folder / "files" / names[-1]
        if i > n:
            continue  # listed in the labels, file absent
        if i <= corrupt:
            path.write_bytes(b"\xff\xd8 this is not a jpeg")
        elif i <= corrupt + faceless:
            Image.fromarray(rng.integers(0, 40, (160, 160, 3), dtype=np.uint8)).save(path)
        else:
            shift = rng.integers(-20, 21, 2)
            shifted = np.roll(photo, tuple(shift), axis=(0, 1))
            Image.fromarray(shifted).resize((256, 256)).save(path)
    if layout == "labels":
        (folder / "labels.txt").write_text("\n".join(lines) + "\n")
    else:
        (folder / "GENKI-4K_Labels.txt").write_text("\n".join(lines) + "\n")
        (folder / "GENKI-4K_Images.txt").write_text("\n".join(names) + "\n")
    return root


def write_fer2013(root, n: int = 40, seed: int = 0, bad_rows: int = 1, layout: str = "csv") -> Path:
    """FER-2013 faces whose usage cycles through the three splits. ``layout`` "csv":
    ``root/fer2013.csv`` (emotion, pixels, Usage), the first ``bad_rows`` rows with a wrong
    number of pixels; "folders": ``root/train/<emotion>/`` and ``root/test/<emotion>/`` PNGs
    (public and private test both in ``test/``), the bad rows as files that are no image."""
    from ..tasks import FER_EMOTIONS

    if layout not in FER_LAYOUTS:
        raise ValueError(f"layout must be one of {FER_LAYOUTS}, got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    usages = ["Training"] * 8 + ["PublicTest", "PrivateTest"]
    rows = ["emotion,pixels,Usage"]
    for i in range(n):
        emotion = int(rng.integers(7))
        face = _labelled_face(rng, emotion, 7, 48)
        usage = usages[i % len(usages)]
        if layout == "csv":
            pixels = face.reshape(-1)[:100] if i < bad_rows else face.reshape(-1)
            rows.append(f"{emotion},{' '.join(map(str, pixels))},{usage}")
            continue
        folder = root / ("train" if usage == "Training" else "test") / FER_EMOTIONS[emotion]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{usage}_{i:05d}.png"
        if i < bad_rows:
            path.write_bytes(b"not a png")
        else:
            Image.fromarray(face).save(path)
    if layout == "csv":
        (root / "fer2013.csv").write_text("\n".join(rows) + "\n")
    return root


def write_imdb_wiki(root, which: str = "wiki", n: int = 30, seed: int = 0, unknown_gender: int = 2,
                    no_face: int = 1) -> Path:
    """``root/{which}_crop/{which}.mat`` as distributed (a 1x1 struct of 1xN fields) and the
    JPEGs under ``{which}_crop/NN/``; the first rows have NaN gender, then -inf face_score."""
    from scipy.io import savemat

    folder = Path(root) / f"{which}_crop"
    rng = np.random.default_rng(seed)
    full_path = np.empty((1, n), dtype=object)
    gender = np.zeros((1, n))
    face_score = rng.uniform(1.0, 5.0, (1, n))
    second = np.full((1, n), np.nan)
    for i in range(n):
        rel = f"{i % 100:02d}/nm{i:07d}_rm{i}_1970-01-01_2000.jpg"
        full_path[0, i] = np.array([rel])
        label = int(rng.integers(2))
        gender[0, i] = np.nan if i < unknown_gender else label
        if unknown_gender <= i < unknown_gender + no_face:
            face_score[0, i] = -np.inf
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_labelled_face(rng, label, 2, 64)).save(folder / rel)
    struct = {"full_path": full_path, "gender": gender, "face_score": face_score, "second_face_score": second,
              "dob": rng.integers(700000, 730000, (1, n)).astype(np.float64),
              "photo_taken": rng.integers(1990, 2015, (1, n)).astype(np.float64),
              "name": full_path.copy(), "face_location": np.empty((1, n), dtype=object)}
    for i in range(n):
        struct["face_location"][0, i] = np.array([[1.0, 1.0, 60.0, 60.0]])
    savemat(folder / f"{which}.mat", {which: struct})
    return Path(root)


def write_rafdb(root, n: int = 20, seed: int = 0, missing_annotation: int = 1) -> Path:
    """RAF-DB basic: ``EmoLabel/list_patition_label.txt``, ``Image/aligned/*_aligned.jpg``
    (100x100) and ``Annotation/manual/*_manu_attri.txt`` (landmarks, gender, race, age)."""
    root = Path(root)
    for sub in ("EmoLabel", "Image/aligned", "Annotation/manual"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        stem = f"{'train' if i % 5 else 'test'}_{i + 1:05d}"
        emotion = int(rng.integers(7))
        lines.append(f"{stem}.jpg {emotion + 1}")
        Image.fromarray(_labelled_face(rng, emotion, 7, 100)).save(root / "Image" / "aligned" / f"{stem}_aligned.jpg")
        if i < missing_annotation:
            continue
        landmarks = "\n".join(f"{rng.uniform(20, 80):.2f}\t{rng.uniform(20, 80):.2f}" for _ in range(5))
        attributes = f"{rng.integers(3)}\n{rng.integers(3)}\n{rng.integers(5)}"
        (root / "Annotation" / "manual" / f"{stem}_manu_attri.txt").write_text(f"{landmarks}\n{attributes}\n")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return root
