"""The papers' result tables with ours beside them: Table 2 (accuracy, mean +- std over the
cross-validation folds of finished, evaluated runs), Table 3 (inference time) and Table 4
(training time) from the benchmark results in ``bench/results/``."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Optional

# Paper 1 (Sang & Cuong 2018), Table 2: accuracy % (mean, std over 4 folds) per config.
TABLE2_COLUMNS = (  # (source, split, task, heading)
    ("genki4k", "test", "smile", "GENKI-4K"),
    ("fer2013", "public_test", "emotion", "FER-2013 public"),
    ("fer2013", "private_test", "emotion", "FER-2013 private"),
    ("wiki", "test", "gender", "Wiki"),
    ("imdb", "test", "gender", "IMDB"),
)
PAPER_TABLE2 = {
    "A1": ((95.25, 0.43), (68.10, 0.14), (69.10, 0.57), (93.33, 0.19), (89.60, 0.22)),
    "A2": ((95.56, 0.66), (68.47, 0.33), (69.40, 0.21), (93.67, 0.26), (90.50, 0.24)),
    "A3": ((95.60, 0.41), (70.43, 0.19), (71.90, 0.36), (93.70, 0.37), (91.33, 0.42)),
    "A4": ((96.23, 0.58), (70.15, 0.19), (71.62, 0.39), (94.00, 0.24), (92.20, 0.11)),
    "B1": ((95.25, 0.44), (68.60, 0.27), (69.28, 0.41), (95.25, 0.15), (88.18, 0.26)),
    "B2": ((95.13, 0.20), (69.12, 0.18), (69.40, 0.22), (95.75, 0.18), (88.68, 0.15)),
    "B3": ((95.52, 0.37), (70.63, 0.11), (71.78, 0.08), (95.95, 0.15), (88.83, 0.18)),
    "B4": ((95.70, 0.25), (71.03, 0.11), (72.18, 0.23), (96.33, 0.16), (89.34, 0.15)),
    "resnet-v1-B4": ((95.55, 0.28), (70.09, 0.13), (71.55, 0.19), (96.03, 0.22), (89.01, 0.18)),
    "resnet-v2-B4": ((95.30, 0.34), (69.33, 0.31), (71.27, 0.11), (95.99, 0.14), (88.88, 0.07)),
}
# Paper 1, Table 3: seconds per image on a TITAN X (batch size not stated).
PAPER_TABLE3 = {"bknet": 0.02, "resnet-v1": 0.065, "resnet-v2": 0.071}
# Paper 1, Table 4: (epochs, minutes per epoch, total minutes) on a TITAN X.
PAPER_TABLE4 = {"bknet": (250, 3.42, 854), "resnet-v1": (100, 8.12, 817), "resnet-v2": (80, 8.67, 693)}
# Paper 2 (Saroop et al. 2021): emotion accuracy on its 10% RAF-DB validation split.
PAPER2_EMOTION_VALIDATION = 79.26


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def fold_accuracies(runs_root) -> dict[str, dict[tuple[str, str, str], list[float]]]:
    """config name -> (source, split, task) -> accuracy % of each evaluated run (fold) of it,
    from every ``evaluation.json`` under ``runs_root``."""
    from .checkpoint import epoch_checkpoints

    found: dict[str, dict[tuple[str, str, str], list[float]]] = {}
    for evaluation in sorted(Path(runs_root).rglob("evaluation.json")):
        if not epoch_checkpoints(evaluation.parent):
            continue
        for row in json.loads(evaluation.read_text()):  # each row names its run's config
            table = found.setdefault(row["config"], {})
            table.setdefault((row["source"], row["split"], row["task"]), []).append(100 * row["accuracy"])
    return found


def cross_validation_table(accuracies: dict[tuple[str, str, str], list[float]]) -> str:
    """One run directory's folds: accuracy mean ± sample std per (dataset, split, task)."""
    cells = [[source, split, task, _mean_std(values), str(len(values))]
             for (source, split, task), values in sorted(accuracies.items())]
    return _markdown_table(["dataset", "split", "task", "accuracy % (mean ± std)", "folds"], cells, 3)


def table2(runs_root) -> Optional[str]:
    """Paper 1's Table 2 with our cross-validated accuracy beside the paper's, per config
    found under ``runs_root``; paper 2's RAF-DB runs in a table of their own."""
    found = fold_accuracies(runs_root)
    if not found:
        return None
    head = ["config", "folds"] + [f"{c[3]} {who}" for c in TABLE2_COLUMNS for who in ("ours", "paper")]
    cells, other = [], []
    for name, table in sorted(found.items()):
        if name not in PAPER_TABLE2:
            other.append((name, table))
            continue
        folds = max(len(v) for v in table.values())
        row = [name, str(folds)]
        for (source, split, task, _), (mean, std) in zip(TABLE2_COLUMNS, PAPER_TABLE2[name]):
            values = table.get((source, split, task), [])
            partial = f" ({len(values)} of {folds} folds)" if 0 < len(values) < folds else ""
            row += [_mean_std(values) + partial, f"{mean:.2f} ± {std:.2f}"]
        cells.append(row)
    lines = ["## Table 2: accuracy % (mean ± std over cross-validation folds)", "", _markdown_table(head, cells, 1)]
    for name, table in other:
        lines += ["", f"## {name}: accuracy % (mean ± std over runs)", ""]
        if name == "paper2":
            lines += [f"Paper 2 reports {PAPER2_EMOTION_VALIDATION}% emotion accuracy on its RAF-DB validation "
                      "split (10% of the training images).", ""]
        lines.append(cross_validation_table(table))
    return "\n".join(lines) + "\n"


def _markdown_table(head: list[str], rows: list[list[str]], text_columns: int) -> str:
    """A markdown table; columns after the first ``text_columns`` are right-aligned numbers."""
    align = "|" + "---|" * text_columns + "---:|" * (len(head) - text_columns)
    return "\n".join(["| " + " | ".join(head) + " |", align] + ["| " + " | ".join(r) + " |" for r in rows])


def _bench_rows(results_dir, suite: str, device: str) -> Optional[list[dict]]:
    """The rows of ``bench/results/<suite>-<device>.csv``, or None if that benchmark has not run."""
    path = Path(results_dir) / f"{suite}-{device}.csv"
    if not path.exists():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table3(results_dir, device: str) -> Optional[str]:
    """Table 3 (seconds per image) from ``inference-<device>.csv``."""
    rows = _bench_rows(results_dir, "inference", device)
    if not rows:
        return None
    impls = [c[:-len(" ms/img")] for c in rows[0] if c.endswith(" ms/img") and not c.startswith("paper")]
    head = ["framework", "batch", "paper (TITAN X) s/img"] + [f"{i} s/img" for i in impls]
    cells = [[row["network"], row["batch"], f"{PAPER_TABLE3[row['network']]:.3f}"]
             + [f"{float(row[f'{i} ms/img']) / 1e3:.5f}" if row.get(f"{i} ms/img") else "-" for i in impls]
             for row in rows]
    return f"## Table 3: inference time per image, {device}\n\n{_markdown_table(head, cells, 1)}\n"


def table4(results_dir, device: str) -> Optional[str]:
    """Table 4 (minutes per epoch and in total) from ``training-<device>.csv``."""
    rows = _bench_rows(results_dir, "training", device)
    if not rows:
        return None
    variants = [c[:-len(" min/epoch")] for c in rows[0] if c.endswith(" min/epoch") and not c.startswith("paper")]
    head = ["framework", "epochs", "paper min/epoch", "paper total min"]
    head += [f"{v} {what}" for v in variants for what in ("min/epoch", "total min")]
    cells = []
    for row in rows:
        epochs, minutes, total = PAPER_TABLE4[row["network"]]
        cells.append([row["network"], str(epochs), f"{minutes:.2f}", str(total)]
                     + [row.get(f"{v} {what}") or "-" for v in variants for what in ("min/epoch", "total min")])
    return (f"## Table 4: training time, {device} (projected from measured steps at batch 128)\n\n"
            f"{_markdown_table(head, cells, 1)}\n")
