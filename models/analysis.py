"""Faces in photos and videos to smile, emotion and gender (paper 1's Figure 11), or to
emotion, gender, race and age for a paper 2 model.

Every face is found with facenet-pytorch's MTCNN, cropped and normalised exactly as the
training pipeline does (``FaceCropper.crop`` with the checkpoint's crop settings, then
``to_model_input``), and the trained network runs through ``mtkernels.fuse_for_inference``
on batches of faces gathered across images. One record per face (or per image or frame
that failed), in input order:

    {"source": "photos/a.jpg", "frame": null, "face": 0, "box": [x0, y0, x1, y1],
     "landmarks": [[x, y] x 5], "confidence": 0.99,
     "tasks": {"gender": {"label": "male", "probabilities": {"female": 0.1, "male": 0.9}}, ...}}
    {"source": "photos/b.jpg", "frame": null, "problem": "no face"}

A model trained with the SVM loss (configs A1/A3/B1/B3) gives ``"scores"`` (raw class
scores) instead of ``"probabilities"``: its outputs are not probabilities and are not
presented as such. Boxes and landmarks are in the source image's pixels; ``frame`` is the
frame index of a video (``null`` for a still image).
"""

from __future__ import annotations

import io
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import mtkernels

from .checkpoint import config_of, load_model
from .data.faces import Face, FaceCropper, crop_settings_for, open_image
from .export import calibration_faces
from .io import atomic_write
from .train.evaluate import task_scores

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"})
FEMALE_COLOUR, MALE_COLOUR, OTHER_COLOUR = (0, 0, 255), (255, 0, 0), (255, 200, 0)  # Figure 11: blue / red

ImageLike = Union[str, Path, Image.Image, np.ndarray]


def image_suffixes() -> frozenset[str]:
    """File endings Pillow can open, lower case."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass
class Frame:
    source: str
    frame: Optional[int]                  # video frame index; None for a still image
    image: Optional[Image.Image]          # RGB; None when it could not be read
    problem: str = ""
    output_name: str = ""                 # file name of its annotated copy


@dataclass
class AnalysisStats:
    files: int = 0
    frames: int = 0
    faces: int = 0
    problems: Counter = field(default_factory=Counter)
    read_s: float = 0.0
    detect_s: float = 0.0
    crop_s: float = 0.0
    model_s: float = 0.0
    annotate_s: float = 0.0
    total_s: float = 0.0

    @property
    def faces_per_s(self) -> float:
        return self.faces / self.total_s if self.total_s else 0.0

    def as_dict(self) -> dict:
        return {"files": self.files, "frames": self.frames, "faces": self.faces, "problems": dict(self.problems),
                "seconds": self.total_s, "faces_per_s": self.faces_per_s, "read_s": self.read_s,
                "detect_s": self.detect_s, "crop_s": self.crop_s, "model_s": self.model_s,
                "annotate_s": self.annotate_s}

    def summary(self) -> str:
        problems = ", ".join(f"{n} {reason}" for reason, n in sorted(self.problems.items())) or "none"
        return (f"{self.files} files, {self.frames} images/frames: {self.faces} faces in {self.total_s:.2f} s "
                f"= {self.faces_per_s:.1f} faces/s (detector {self.detect_s:.2f} s, crop {self.crop_s:.2f} s, "
                f"model {self.model_s:.2f} s, annotation {self.annotate_s:.2f} s); problems: {problems}")


def expand_inputs(items: Iterable[ImageLike]) -> list[tuple[ImageLike, str]]:
    """(input, output base name) per file to analyse: directories recursively (image and
    video files only, sorted), files and in-memory images as given. Base names are unique."""
    if isinstance(items, (str, Path, Image.Image, np.ndarray)):
        items = [items]
    known = image_suffixes() | VIDEO_SUFFIXES
    expanded, used = [], set()

    def add(item, name):
        stem, n = name, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        expanded.append((item, name))

    for index, item in enumerate(items):
        if isinstance(item, (Image.Image, np.ndarray)):
            add(item, f"image-{index}")
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
            for file in found:
                add(file, str(file.relative_to(path).with_suffix("")).replace("/", "__"))
            if not found:
                add(path, path.name)  # reported as a problem, not silently dropped
        else:
            add(path, path.stem)
    return expanded


def _pil_rgb(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"in-memory images must be uint8 [H, W] or [H, W, 3], got {array.dtype} {array.shape}")
    return Image.fromarray(array).convert("RGB")


def read_frames(item: ImageLike, name: str, every: int) -> Iterator[Frame]:
    """The RGB images of one input: a still image, or every ``every``-th frame of a video."""
    if isinstance(item, Image.Image):
        yield Frame(f"<{name}>", None, item.convert("RGB"), output_name=name)
        return
    if isinstance(item, np.ndarray):
        yield Frame(f"<{name}>", None, _pil_rgb(item), output_name=name)
        return
    source = str(item)
    if not item.exists():
        yield Frame(source, None, None, "missing file")
        return
    if item.is_dir():
        yield Frame(source, None, None, "no image or video files in directory")
        return
    if item.suffix.lower() in VIDEO_SUFFIXES:
        yield from _video_frames(item, name, every)
        return
    rgb, problem = open_image(item, "RGB")
    yield Frame(source, None, rgb, problem, output_name="" if problem else name)


def _video_frames(path: Path, name: str, every: int) -> Iterator[Frame]:
    try:
        import av
    except ImportError:
        yield Frame(str(path), None, None, "video support needs PyAV (pip install av)")
        return
    try:
        with av.open(str(path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % every == 0:
                    yield Frame(str(path), index, frame.to_image().convert("RGB"),
                                output_name=f"{name}-frame{index:06d}")
    except (av.FFmpegError, OSError, ValueError, IndexError) as e:
        # frames decoded before the error were already analysed
        yield Frame(str(path), None, None, f"unreadable video ({type(e).__name__})")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: one fixed-size bitmap font
        return ImageFont.load_default()


def box_colour(record: dict) -> tuple[int, int, int]:
    """Blue for a face predicted female, red for male (paper 1, Figure 11), amber otherwise."""
    label = record["tasks"].get("gender", {}).get("label")
    return {"female": FEMALE_COLOUR, "male": MALE_COLOUR}.get(label, OTHER_COLOUR)


def annotate(image: Image.Image, records: Sequence[dict]) -> Image.Image:
    """A copy of ``image`` with each face's box in its gender colour and its labels beside it."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    line_width = max(2, round(min(out.size) / 200))
    font = _font(max(10, round(min(out.size) / 40)))
    for record in records:
        x0, y0, x1, y1 = (round(v) for v in record["box"])
        colour = box_colour(record)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
        lines = []
        for task, result in record["tasks"].items():
            values = result.get("probabilities", result.get("scores"))
            lines.append(f"{task}: {result['label']} {values[result['label']]:.2f}")
        text = "\n".join(lines)
        left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
        width, height = right - left + 4, bottom - top + 4
        tx = x1 + line_width if x1 + line_width + width <= out.width else max(0, x0 - line_width - width)
        ty = min(max(0, y0), max(0, out.height - height))
        draw.rectangle((tx, ty, tx + width, ty + height), fill=colour)
        draw.multiline_text((tx + 2 - left, ty + 2 - top), text, fill=(255, 255, 255), font=font)
    return out


class Analyzer:
    """A trained model, its face detector and cropper, ready to analyse images.

    ``weights``: a checkpoint file or run directory written by ``python -m models train``.
    ``fused=False`` runs the plain eager network (for comparison); ``precision`` is the fused
    network's (``"fp32"``, ``"bf16"``, or ``"int8"`` calibrated on scikit-image's LFW faces)."""

    def __init__(self, weights, device: str = "cpu", batch_size: int = 64, fused: bool = True,
                 min_face_size: int = 20, precision: str = "fp32"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available here")
        model, state = load_model(weights)
        self.config = config_of(state)
        self.kind = self.config.loss
        self.task_names = tuple(state["task_names"])
        self.class_names = tuple(tuple(c) for c in state["class_names"])
        self.device, self.batch_size = torch.device(device), batch_size
        model = model.to(self.device)
        if precision != "fp32" and not fused:
            raise ValueError(f"precision={precision!r} needs the fused model (not --eager)")
        calibration = calibration_faces(model.input_size) if precision == "int8" else None
        self.model = mtkernels.fuse_for_inference(model, precision, calibration) if fused else model
        self.cropper = FaceCropper(crop_settings_for(self.config), device=device, min_face_size=min_face_size)
        history = state.get("history") or [{}]
        self.info = {"checkpoint": state["path"], "architecture": state["model_name"], "config": self.config.name,
                     "loss": self.kind, "epochs_trained": state.get("epoch", len(state.get("history", []))),
                     "fused": fused, "precision": precision,
                     "outputs": "probabilities" if self.kind == "ce" else "scores",
                     "last_validation_accuracy": {k[len("val_acc_"):]: v for k, v in history[-1].items()
                                                  if k.startswith("val_acc_")}}
        self.stats = AnalysisStats()

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """[n, sum(C)] class probabilities (cross-entropy model) or scores (SVM model) for
        uint8 face crops [n, S, S]."""
        return task_scores(self.model, crops, self.kind, self.batch_size).numpy().astype(np.float64)

    def _face_record(self, frame: Frame, index: int, face: Face, outputs: np.ndarray) -> dict:
        tasks, offset, key = {}, 0, "probabilities" if self.kind == "ce" else "scores"
        for task, classes in zip(self.task_names, self.class_names):
            values = outputs[offset:offset + len(classes)]
            offset += len(classes)
            tasks[task] = {"label": classes[int(values.argmax())],
                           key: {c: float(v) for c, v in zip(classes, values)}}
        return {"source": frame.source, "frame": frame.frame, "face": index,
                "box": [float(v) for v in face.box], "landmarks": face.landmarks.tolist(),
                "confidence": float(face.confidence), "tasks": tasks}

    def _finish(self, pending: list[tuple[Frame, list[Face], list[np.ndarray]]], out_dir: Optional[Path]):
        crops = [c for _, _, frame_crops in pending for c in frame_crops]
        began = time.perf_counter()
        outputs = self.predict(np.stack(crops)) if crops else np.zeros((0, 0))
        self.stats.model_s += time.perf_counter() - began
        row = 0
        for frame, faces, _ in pending:
            if frame.problem:
                self.stats.problems[frame.problem] += 1
                yield {"source": frame.source, "frame": frame.frame, "problem": frame.problem}
                continue
            records = [self._face_record(frame, i, face, outputs[row + i]) for i, face in enumerate(faces)]
            row += len(faces)
            self.stats.faces += len(records)
            if out_dir is not None:
                began = time.perf_counter()
                path = out_dir / f"{frame.output_name}.png"
                buf = io.BytesIO()
                annotate(frame.image, records).save(buf, format="PNG")
                atomic_write(path, buf.getvalue())
                for record in records:
                    record["annotated"] = str(path)
                self.stats.annotate_s += time.perf_counter() - began
            yield from records

    def run(self, images, every: int = 1, out_dir=None, progress: bool = False) -> Iterator[dict]:
        """Records (see the module docstring) for every face in ``images``: paths of images,
        videos or directories, PIL images or uint8 arrays. ``every``: analyse every k-th
        video frame. ``out_dir``: write an annotated PNG per image or frame with faces.
        Timings accumulate in ``self.stats``."""
        from tqdm import tqdm

        if every < 1:
            raise ValueError(f"every must be >= 1 (analyse every k-th video frame), got {every}")
        out_dir = Path(out_dir) if out_dir is not None else None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        inputs = expand_inputs(images)
        began = time.perf_counter()
        pending, pending_faces = [], 0
        for item, name in tqdm(inputs, desc="analysing", unit="file", disable=not progress):
            self.stats.files += 1
            frames = read_frames(item, name, every)
            while True:
                start = time.perf_counter()
                frame = next(frames, None)
                self.stats.read_s += time.perf_counter() - start
                if frame is None:
                    break
                faces, crops = [], []
                if not frame.problem:
                    self.stats.frames += 1
                    start = time.perf_counter()
                    faces = self.cropper.detect(frame.image)
                    self.stats.detect_s += time.perf_counter() - start
                    if not faces:
                        frame.problem = "no face"
                    start = time.perf_counter()
                    crops = self.cropper.crops(frame.image, faces)
                    self.stats.crop_s += time.perf_counter() - start
                pending.append((frame, faces, crops))
                pending_faces += len(faces)
                if pending_faces >= self.batch_size:
                    yield from self._finish(pending, out_dir)
                    pending, pending_faces = [], 0
        yield from self._finish(pending, out_dir)
        self.stats.total_s += time.perf_counter() - began


def analyze(images, weights=None, *, device: str = "cpu", batch_size: int = 64, every: int = 1,
            fused: bool = True, out_dir=None, min_face_size: int = 20, progress: bool = False) -> list[dict]:
    """Every face in ``images`` (paths of images, videos or directories, PIL images or uint8
    arrays) with the trained model in ``weights`` (checkpoint file or run directory): one
    record per face or failed input, as ``python -m models analyze`` writes them."""
    analyzer = Analyzer(weights, device=device, batch_size=batch_size, fused=fused, min_face_size=min_face_size)
    return list(analyzer.run(images, every=every, out_dir=out_dir, progress=progress))
