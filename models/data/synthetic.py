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


def write_genki4k(root, n: int = 12, seed: int = 0, missing: int = 1, corrupt: int = 1, faceless: int = 1) -> Path:
    """``root/files/fileNNNN.jpg`` (photos with a real face, one ``faceless``, one
    ``corrupt``), ``labels.txt`` with one more line than there are files (``missing``)."""
    root = Path(root)
    (root / "files").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photo = _astronaut_face()
    lines = []
    for i in range(1, n + missing + 1):
        smile = int(rng.integers(2))
        lines.append(f"{smile} {rng.normal():.6f} {rng.normal():.6f} {rng.normal():.6f}")
        path = root / "files" / f"file{i:04d}.jpg"
        if i > n:
            continue  # listed in labels.txt, file absent
        if i <= corrupt:
            path.write_bytes(b"\xff\xd8 this is not a jpeg")
        elif i <= corrupt + faceless:
            Image.fromarray(rng.integers(0, 40, (160, 160, 3), dtype=np.uint8)).save(path)
        else:
            shift = rng.integers(-20, 21, 2)
            shifted = np.roll(photo, tuple(shift), axis=(0, 1))
            Image.fromarray(shifted).resize((256, 256)).save(path)
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def write_fer2013(root, n: int = 40, seed: int = 0, bad_rows: int = 1) -> Path:
    """``root/fer2013.csv``: emotion, pixels, Usage; the usage cycles through the three
    splits; ``bad_rows`` rows carry a wrong number of pixels."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    usages = ["Training"] * 8 + ["PublicTest", "PrivateTest"]
    rows = ["emotion,pixels,Usage"]
    for i in range(n):
        emotion = int(rng.integers(7))
        pixels = _labelled_face(rng, emotion, 7, 48).reshape(-1)
        if i < bad_rows:
            pixels = pixels[:100]
        rows.append(f"{emotion},{' '.join(map(str, pixels))},{usages[i % len(usages)]}")
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
