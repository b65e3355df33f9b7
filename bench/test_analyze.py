"""`python -m models analyze` end to end: faces per second on a folder of real face photos
(scikit-image's astronaut and cameraman, and its 100 LFW faces laid out as group photos of
16), split into reading, detection (MTCNN), cropping and the model, eager against
``fuse_for_inference`` in the same run. The model is a BKNet trained for one epoch by the
benchmark itself: its timings do not depend on what it learned."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from harness import MEASUREMENTS, measure, one_epoch_bknet_run, register_report
from PIL import Image
from results_io import RESULTS_DIR, save_bar_chart, write_table
from skimage import data

from models.analysis import Analyzer

SUITE = "analyze"
GROUP = 16          # LFW faces per group photo
FACE_SIDE = 120     # LFW's 25x25 crops are upscaled to this before being laid out


def write_photos(folder) -> int:
    """The benchmark's photos; returns how many faces they hold."""
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg", quality=92)
    Image.fromarray(data.camera()).save(folder / "cameraman.jpg", quality=92)
    lfw = data.lfw_subset()[:100]  # the first 100 are faces
    cell = FACE_SIDE * 3 // 2
    for start in range(0, len(lfw), GROUP):
        group = lfw[start:start + GROUP]
        photo = Image.new("L", (4 * cell, cell * ((len(group) + 3) // 4)), 128)
        for k, face in enumerate(group):
            tile = Image.fromarray((face * 255).astype(np.uint8)).resize((FACE_SIDE, FACE_SIDE), Image.BICUBIC)
            photo.paste(tile, ((k % 4) * cell + (cell - FACE_SIDE) // 2, (k // 4) * cell + (cell - FACE_SIDE) // 2))
        photo.save(folder / f"lfw-group-{start // GROUP:02d}.jpg", quality=92)
    return 2 + len(lfw)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    faces = write_photos(folder)
    return folder, one_epoch_bknet_run(tmp_path_factory.mktemp("run")), faces


@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_analyze_faces_per_second(benchmark, device, workload, impl):
    folder, run, expected_faces = workload
    torch.manual_seed(0)
    analyzer = Analyzer(run, device=device, fused=impl == "fused")
    runs = []

    def analyse_folder():
        analyzer.stats = type(analyzer.stats)()
        records = list(analyzer.run(folder))
        runs.append(analyzer.stats)
        return records

    measure(benchmark, analyse_folder, device, SUITE, rounds=3, warmup=1, impl=impl)
    found = runs[-1].faces
    assert found >= 0.95 * expected_faces, f"detector found {found} of {expected_faces} faces"
    MEASUREMENTS[SUITE][device][-1].update(
        faces=found, images=runs[-1].frames,
        **{part: statistics.median(getattr(s, part) for s in runs)
           for part in ("read_s", "detect_s", "crop_s", "model_s", "total_s")})


@register_report(SUITE)
def report(device, measurements):
    rows = []
    for m in measurements:
        rows.append({
            "model": m["impl"], "images": m["images"], "faces": m["faces"],
            "end to end s": f"{m['seconds']:.3f}", "faces/s": f"{m['faces'] / m['seconds']:.1f}",
            "read s": f"{m['read_s']:.3f}", "detector s": f"{m['detect_s']:.3f}", "crop s": f"{m['crop_s']:.3f}",
            "model s": f"{m['model_s']:.4f}", "model faces/s": f"{m['faces'] / m['model_s']:.0f}",
            "detector share": f"{m['detect_s'] / m['seconds']:.0%}"})
    by_impl = {m["impl"]: m for m in measurements}
    notes = ("BKNet (trained one epoch by the benchmark), batch 64 faces across images; MTCNN with facenet-pytorch's "
             "defaults (min face 20 px). Median of 3 runs after one warm-up; the parts are medians too.")
    if {"eager", "fused"} <= set(by_impl):
        e, f = by_impl["eager"], by_impl["fused"]
        notes += (f" Fused model alone: {e['model_s'] / f['model_s']:.2f}x eager; end to end: "
                  f"{e['seconds'] / f['seconds']:.2f}x.")
    columns = ["model", "images", "faces", "end to end s", "faces/s", "read s", "detector s", "crop s", "model s",
               "model faces/s", "detector share"]
    path = write_table(SUITE, device, rows, columns, f"Face analysis end to end, {device}", notes)
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png",
                   [("seconds per folder", [m["impl"] for m in measurements],
                     {part: [m[f"{part}_s"] for m in measurements] for part in ("read", "detect", "crop", "model")})],
                   "seconds", f"analyze: where the time goes ({device})")
    return path
