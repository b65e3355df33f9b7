"""Recording benchmark results: CSV + markdown (+ PNG) under bench/results/, with the machine."""

from __future__ import annotations

import csv
import io
import platform
from pathlib import Path

import torch

from models.io import atomic_write

RESULTS_DIR = Path(__file__).parent / "results"


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
        "CPU allocator": "freed memory retained (mtkernels.retain_freed_memory)",
        "device": device,
    }
    if device == "cuda":
        import triton

        info["gpu"] = torch.cuda.get_device_name()
        info["TF32"] = ("on" if torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                        else f"matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")
        info["triton"] = triton.__version__
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


def save_bar_chart(path: Path, panels, ylabel: str, title: str, log: bool = False) -> None:
    """Grouped bars, one panel per (panel_title, categories, {series: values}); PNG, atomic.
    Skipped without matplotlib: the CSV and markdown hold the same numbers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    most = max(len(categories) for _, categories, _ in panels)
    crowded = most > 8  # long category lists: a wider figure and slanted labels
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 5.5 * len(panels), 0.4 * most * len(panels)),
                                                      5 if crowded else 4), squeeze=False)
    for ax, (panel_title, categories, series) in zip(axes[0], panels):
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            ax.bar([i + k * width for i in range(len(categories))], values, width, label=name)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(categories))], categories, fontsize=7,
                      rotation=50 if crowded else 0, ha="right" if crowded else "center")
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
