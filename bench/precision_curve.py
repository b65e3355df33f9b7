"""Config B4's learning curve in float32 beside bf16 mixed precision, on the synthetic
datasets (``python -m models synth``): both runs train through ``python -m models train``
from the same seed, then their metrics.csv are plotted together:

    python bench/precision_curve.py --epochs 8 --work /tmp/curve

writes bench/results/precision-curve-cpu.csv and .png (loss and training accuracy per
epoch, one line per precision)."""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

from results_io import RESULTS_DIR

from models.__main__ import main as models_cli
from models.io import atomic_write

PRECISIONS = ("fp32", "bf16")


def train_runs(work: Path, epochs: int) -> dict[str, list[dict]]:
    data = work / "data"
    if not data.exists():
        models_cli(["synth", "--out", str(data)])
    histories = {}
    for precision in PRECISIONS:
        run = work / f"run-{precision}"
        resume = ["--resume"] if run.exists() else []  # an interrupted curve continues where it stopped
        models_cli(["train", "--config", "B4", "--data-root", str(data), "--cache", str(work / "cache"),
                    "--out", str(run), "--epochs", str(epochs), "--precision", precision, "--quiet", *resume])
        with open(run / "metrics.csv", newline="") as f:
            histories[precision] = list(csv.DictReader(f))
    return histories


def save(histories: dict[str, list[dict]]) -> None:
    rows = [{"precision": p, **row} for p, history in histories.items() for row in history]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(RESULTS_DIR / "precision-curve-cpu.csv", buf.getvalue())
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for precision, history in histories.items():
        epochs = [int(r["epoch"]) for r in history]
        style = "-" if precision == "fp32" else "--"
        loss_ax.plot(epochs, [float(r["loss"]) for r in history], style, marker="o", label=precision)
        for key in (k for k in history[0] if k.startswith("acc_")):
            acc_ax.plot(epochs, [float(r[key]) for r in history], style, marker=".", label=f"{key[4:]} {precision}")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="config B4, synthetic data: loss")
    acc_ax.set(xlabel="epoch", ylabel="training accuracy", title="accuracy (solid fp32, dashed bf16)", ylim=(0, 1))
    loss_ax.legend()
    acc_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(RESULTS_DIR / "precision-curve-cpu.png", buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default 8)")
    parser.add_argument("--work", type=Path, required=True, help="folder for the synthetic data and the two runs")
    args = parser.parse_args()
    save(train_runs(args.work, args.epochs))
    print(f"written: {RESULTS_DIR / 'precision-curve-cpu.png'}")


if __name__ == "__main__":
    main()
