"""Face crops for training and analysis: facenet-pytorch's MTCNN (its weights ship with
the package; nothing is downloaded) finds the most confident face, which is optionally
rotated so the eye line is level (paper 2, capped at 10 degrees), cropped, converted to
gray and resized. ``crop_dataset`` runs once per source and settings and caches the
result in one ``.npz``; an interrupted run resumes from its last saved chunk."""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..io import atomic_write
from .formats import SkipReport

CHUNK = 64  # images between two saves of a running crop job


def open_image(path, mode: str) -> tuple[Optional[Image.Image], str]:
    """(the image at ``path`` converted to ``mode``, "") or (None, "missing file" /
    "unreadable image"): the reasons every reader of image files reports."""
    try:
        with Image.open(path) as image:
            return image.convert(mode), ""
    except FileNotFoundError:
        return None, "missing file"
    except (UnidentifiedImageError, OSError, ValueError):
        return None, "unreadable image"


@dataclass(frozen=True)
class CropSettings:
    size: int = 48
    level_eyes: bool = False
    max_rotation: float = 10.0

    def key(self) -> str:
        return f"s{self.size}-eyes{int(self.level_eyes)}-r{self.max_rotation:g}"


@dataclass
class Face:
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in the source image
    landmarks: np.ndarray                    # [5, 2]: eyes, nose, mouth corners
    confidence: float


def crop_settings_for(config) -> CropSettings:
    """The crops a training config's network sees: paper 2 levels the eyes, paper 1 does not."""
    return CropSettings(size=config.image_size, level_eyes=config.model == "emotion-cnn")


class FaceCropper:
    def __init__(self, settings: CropSettings = CropSettings(), device: str = "cpu", min_face_size: int = 20):
        from facenet_pytorch import MTCNN

        if min_face_size < 12:  # MTCNN's first network sees 12x12 windows
            raise ValueError(f"min_face_size must be >= 12 pixels, got {min_face_size}")
        self.settings = settings
        self.detector = MTCNN(keep_all=True, device=device, min_face_size=min_face_size)
        # NHWC activations let the CPU's vectorised pooling and conv kernels run: the same
        # detections (boxes within 1e-3 px), about 1.5x faster on this project's benchmark photos.
        for net in (self.detector.pnet, self.detector.rnet, self.detector.onet):
            net.to(memory_format=torch.channels_last)

    def detect(self, image: Image.Image) -> list[Face]:
        """Every face MTCNN finds, most confident first."""
        return _faces_by_confidence(*self.detector.detect(image.convert("RGB"), landmarks=True))

    def crop(self, image: Image.Image, face: Face) -> np.ndarray:
        """uint8 [size, size] gray crop of ``face``."""
        return self.crops(image, [face])[0]

    def crops(self, image: Image.Image, faces: Sequence[Face]) -> list[np.ndarray]:
        """uint8 [size, size] gray crops of several faces of one image."""
        gray = image.convert("L")
        return [self._crop_gray(gray, face) for face in faces]

    def _crop_gray(self, gray: Image.Image, face: Face) -> np.ndarray:
        x0, y0, x1, y1 = face.box
        if self.settings.level_eyes:
            (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
            angle = math.degrees(math.atan2(ry - ly, rx - lx))
            angle = max(-self.settings.max_rotation, min(self.settings.max_rotation, angle))
            centre = ((lx + rx) / 2, (ly + ry) / 2)
            gray = gray.rotate(angle, resample=Image.BILINEAR, center=centre, fillcolor=0)
        crop = gray.crop((round(x0), round(y0), round(x1), round(y1)))
        return np.asarray(crop.resize((self.settings.size, self.settings.size), Image.BILINEAR), dtype=np.uint8)

    def crop_file(self, path: Path) -> tuple[Optional[np.ndarray], str]:
        return self.crop_files([path])[0]

    def crop_files(self, paths: Sequence[Path]) -> list[tuple[Optional[np.ndarray], str]]:
        """(crop, "") or (None, reason) per file, reason one of "missing file",
        "unreadable image", "no face". Images of equal size go through MTCNN as one batch."""
        results: list[tuple[Optional[np.ndarray], str]] = [(None, "")] * len(paths)
        loaded: dict[tuple[int, int], list[tuple[int, Image.Image]]] = {}
        for i, path in enumerate(paths):
            rgb, problem = open_image(path, "RGB")
            if problem:
                results[i] = (None, problem)
            else:
                loaded.setdefault(rgb.size, []).append((i, rgb))
        for group in loaded.values():
            boxes, probs, points = self.detector.detect([image for _, image in group], landmarks=True)
            for (i, image), b, p, pts in zip(group, boxes, probs, points):
                faces = _faces_by_confidence(b, p, pts)
                results[i] = (self.crop(image, faces[0]), "") if faces else (None, "no face")
        return results


def _faces_by_confidence(boxes, probs, points) -> list[Face]:
    if boxes is None:
        return []
    order = np.argsort(-np.asarray(probs, dtype=np.float64))
    # facenet-pytorch returns object arrays; faces carry plain float64
    return [Face(tuple(float(v) for v in boxes[i]), np.asarray(points[i], dtype=np.float64), float(probs[i]))
            for i in order]


def _cache_key(name: str, paths: Sequence[Path], settings: CropSettings) -> str:
    digest = hashlib.sha1(json.dumps([name, settings.key(), [str(p) for p in paths]]).encode()).hexdigest()
    return f"{name}-{settings.key()}-{digest[:12]}"


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write(path, buf.getvalue())


def crop_dataset(name: str, paths: Sequence[Path], cache_dir, settings: CropSettings = CropSettings(),
                 cropper: Optional[FaceCropper] = None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, SkipReport]:
    """Crops of every image: (uint8 [n_ok, S, S], indices into ``paths`` of those crops,
    report of the rest). Cached in ``cache_dir``; resumes a partial run."""
    cache_dir = Path(cache_dir)
    key = _cache_key(name, paths, settings)
    final, partial = cache_dir / f"{key}.npz", cache_dir / f"{key}.partial.npz"
    if final.exists():
        data = np.load(final, allow_pickle=False)
        return data["images"], data["kept"], _report(paths, data["reasons"])
    side = settings.size
    images = np.zeros((len(paths), side, side), np.uint8)
    reasons = np.full(len(paths), "", dtype="<U32")
    done = 0
    if partial.exists():
        data = np.load(partial, allow_pickle=False)
        done = int(data["done"])
        images[:done], reasons[:done] = data["images"][:done], data["reasons"][:done]
    cropper = cropper or FaceCropper(settings)
    from tqdm import tqdm

    with tqdm(total=len(paths), initial=done, desc=f"cropping {name}", disable=not progress, unit="img") as bar:
        for start in range(done, len(paths), CHUNK):
            stop = min(start + CHUNK, len(paths))
            for i, (crop, reason) in enumerate(cropper.crop_files([Path(p) for p in paths[start:stop]]), start):
                if crop is None:
                    reasons[i] = reason
                else:
                    images[i] = crop
            bar.update(stop - start)
            done = stop
            _save_npz(partial, done=np.array(done), images=images[:done], reasons=reasons[:done])
    kept = np.flatnonzero(reasons == "")
    _save_npz(final, images=images[kept], kept=kept, reasons=reasons)
    partial.unlink(missing_ok=True)
    return images[kept], kept, _report(paths, reasons)


def _report(paths: Sequence[Path], reasons: np.ndarray) -> SkipReport:
    report = SkipReport()
    for path, reason in zip(paths, reasons):
        if reason:
            report.add(str(path), str(reason))
    return report


def load_aligned(paths: Sequence[Path], size: int) -> tuple[np.ndarray, np.ndarray, SkipReport]:
    """Gray ``size`` x ``size`` versions of face crops a dataset ships already aligned: (uint8
    [n_ok, S, S], indices into ``paths`` of those, report of the unreadable rest)."""
    images, kept, report = [], [], SkipReport()
    for i, path in enumerate(paths):
        gray, problem = open_image(path, "L")
        if problem:
            report.add(str(path), problem)
        else:
            images.append(np.asarray(gray.resize((size, size), Image.BILINEAR), dtype=np.uint8))
            kept.append(i)
    stacked = np.stack(images) if images else np.zeros((0, size, size), np.uint8)
    return stacked, np.array(kept, dtype=np.int64), report


def prepare_source(records, cache_dir, settings: CropSettings = CropSettings(), cropper: Optional[FaceCropper] = None,
                   progress: bool = True):
    """(images uint8 [n, S, S], {task: labels [n]}, split [n], report) for a reader's
    records: FER-2013's pixels resized to S if needed, a dataset's own aligned crops
    (RAF-DB) resized, other image files through MTCNN crops."""
    if records.pixels is not None:
        pixels = records.pixels
        if pixels.shape[1:] != (settings.size, settings.size):
            side = (settings.size, settings.size)
            pixels = np.stack([np.asarray(Image.fromarray(p).resize(side, Image.BILINEAR)) for p in pixels]) \
                if len(pixels) else np.zeros((0, *side), np.uint8)
        return pixels, records.labels, records.split, records.report
    if records.aligned:
        images, kept, report = load_aligned(records.paths, settings.size)
    else:
        images, kept, report = crop_dataset(records.name, records.paths, cache_dir, settings, cropper, progress)
    report.skipped = records.report.skipped + report.skipped
    return images, {t: v[kept] for t, v in records.labels.items()}, records.split[kept], report
