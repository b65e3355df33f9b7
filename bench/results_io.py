"""Recording benchmark results: CSV + markdown (+ PNG) under bench/results/, with the machine."""

from __future__ import annotations

import csv
import io
import os
import platform
import tempfile
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file beside ``path`` and rename it: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: str) -> dict[str, str]:
    from mtkernels import _C

    features = _C.cpu_features()
    info = {
        "cpu": cpu_model(),
        "cpu flags": " ".join(sorted(f for f, on in features.items() if on)),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "mtkernels ISA": _C.isa(),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_table(suite: str, device: str, rows: list[dict], columns: list[str], title: str,
                notes: str = "") -> Path:
    """Save rows as bench/results/<suite>-<device>.csv and .md; returns the markdown path."""
    stem = RESULTS_DIR / f"{suite}-{device}"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(stem.with_suffix(".csv"), buf.getvalue())

    machine = machine_description(device)
    lines = [f"# {title}", "", "Machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()), ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    atomic_write(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    return stem.with_suffix(".md")
