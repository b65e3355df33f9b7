"""The training loop: one epoch = one seeded pass over the merged dataset, then an atomic
checkpoint holding everything needed to continue bit-for-bit (weights, optimiser,
scheduler, the global RNG that drives dropout); data order and augmentation of epoch e
come from a generator seeded with (seed, e), so they need no saved state."""

from __future__ import annotations

import csv
import io
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import mtkernels
from mtkernels.device_path import device_takes_cuda_path

from .. import build_model
from ..checkpoint import BEST, CHECKPOINTS, epoch_checkpoints, load_checkpoint, model_record
from ..data.augment import augment_batch, to_model_input
from ..data.merge import MultiTaskDataset
from ..io import atomic_write
from .config import TrainConfig
from .evaluate import accuracy, correct_counts, task_scores


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops, earlier checkpoints are kept."""


@dataclass
class TrainResult:
    out_dir: Path
    epochs_run: int
    stopped: str                           # "completed", "lr below min_lr"
    history: list[dict] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def _world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed was initialised (torchrun)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(index: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a global batch. Every rank draws the same global order; with the
    loss's "mean" over the local rows and DDP's gradient average, the update equals the
    single-process one on the whole batch (when the batch divides evenly)."""
    return index[rank::world]


def _all_sum(values: list[float]) -> list[float]:
    rank, world = _world()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def epoch_generator(config: TrainConfig, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)


def _check_out_dir(out_dir: Path, model: torch.nn.Module) -> None:
    """Fail before training, with a clear message, if checkpoints could not be written."""
    try:
        (out_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the output directory {out_dir}: {e.strerror or e}") from e
    # weights + optimiser state (momentum) + a temporary copy while replacing a file
    needed = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) + (1 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise OSError(f"only {free / 2**20:.1f} MiB free in {out_dir}; a checkpoint needs about "
                      f"{needed / 2**20:.1f} MiB")


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    if config.schedule == "exponential":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: config.decay_rate ** (step / config.decay_steps))
    if config.schedule in ("plateau", "val_plateau"):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if config.schedule == "plateau" else "max", factor=config.plateau_factor,
            patience=config.patience)
    raise ValueError(f"schedule must be 'exponential', 'plateau' or 'val_plateau', got {config.schedule!r}")


def _loss_fn(config: TrainConfig, num_classes, loss_impl: str):
    if loss_impl == "fused":
        return mtkernels.MultiTaskLoss(num_classes, kind=config.loss, task_weights=config.task_weights)
    if loss_impl == "reference":
        return lambda logits, labels: mtkernels.reference.multitask_loss(
            logits, labels, num_classes, kind=config.loss, task_weights=config.task_weights)
    raise ValueError(f"loss_impl must be 'fused' or 'reference', got {loss_impl!r}")


def _save_checkpoint(out_dir: Path, epoch: int, model, optimizer, scheduler, config: TrainConfig, history,
                     device: torch.device) -> Path:
    state = {**model_record(model, config), "epoch": epoch, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "history": history}
    if device.type == "cuda":  # dropout on the GPU draws from the device's generator
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    path = out_dir / CHECKPOINTS / f"epoch-{epoch:04d}.pt"
    atomic_write(path, _serialise(state))
    for old in epoch_checkpoints(out_dir)[:-max(1, config.ensemble_size)]:  # the ensemble's last N stay
        old.unlink()
    return path


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out_dir / "metrics.csv", buf.getvalue())
    _plot_learning_curves(out_dir, history)


def _plot_learning_curves(out_dir: Path, history: list[dict]) -> None:
    """learning_curves.png: loss, and accuracy per task (train solid, validation dashed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # metrics.csv holds the same numbers
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_ax.plot(epochs, [row["loss"] for row in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key in history[-1]:
        if key.startswith("acc_") and not all(math.isnan(row.get(key, math.nan)) for row in history):
            line, = acc_ax.plot(epochs, [row.get(key, math.nan) for row in history], marker="o", label=key[4:])
            if f"val_{key}" in history[-1]:
                acc_ax.plot(epochs, [row.get(f"val_{key}", math.nan) for row in history], linestyle="--",
                            color=line.get_color())
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy (dashed: validation)", ylim=(0, 1))
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out_dir / "learning_curves.png", buf.getvalue())


def train(config: TrainConfig, train_set: MultiTaskDataset, out_dir, val_set: Optional[MultiTaskDataset] = None,
          resume: bool = False, loss_impl: str = "fused", progress: bool = True, device="cpu",
          fuse_layers: bool = True) -> TrainResult:
    """Train ``config.model`` on ``train_set`` for ``config.epochs`` epochs on ``device``,
    writing a checkpoint and a metrics row per epoch to ``out_dir``. ``resume`` continues
    from the last checkpoint. ``fuse_layers``: on the CPU, channels-last activations,
    BatchNorm + ReLU as one op and each conv layer's fastest algorithm
    (``mtkernels.fuse_for_training``; same state_dict)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
    fused_cpu = fuse_layers and device.type == "cpu" and not device_takes_cuda_path(device)
    if config.precision != "fp32" and not fused_cpu:
        raise ValueError(f"precision {config.precision!r} is mtkernels' fused CPU training path: it needs "
                         f"device 'cpu' (got {str(device)!r}) and fused layers (no --plain-layers)")
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)  # initialised on the CPU: the same weights on any device
    if fused_cpu:
        model = mtkernels.fuse_for_training(model, precision=config.precision).to(memory_format=torch.channels_last)
    if tuple(train_set.task_names) != tuple(model.task_names):
        raise ValueError(f"dataset tasks {train_set.task_names} do not match {config.model}'s {model.task_names}")
    if config.schedule == "val_plateau" and val_set is None:
        raise ValueError("schedule 'val_plateau' needs a validation set (val_set)")
    rank, world = _world()
    if rank == 0:
        _check_out_dir(out_dir, model)
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer)
    crit = _loss_fn(config, model.num_classes, loss_impl)
    history: list[dict] = []
    start_epoch = 1
    existing = epoch_checkpoints(out_dir)
    if resume and existing:
        state = load_checkpoint(existing[-1])
        trained_in = state["config"].get("precision", "fp32")
        if trained_in != config.precision:
            raise ValueError(f"{out_dir} was trained with precision {trained_in!r}; resume it with that precision, "
                             f"not {config.precision!r}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history = state["history"]
        start_epoch = state["epoch"] + 1
    elif existing:
        raise FileExistsError(f"{out_dir} already holds checkpoints; pass resume=True (--resume) to continue, "
                              f"or choose another output directory")

    net = model
    if world > 1:
        # CPU (gloo) keeps per-rank BatchNorm statistics: SyncBatchNorm is GPU-only in torch.
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    stopped = "completed"
    epoch = start_epoch - 1
    best_val, best_state, best_epoch = -math.inf, None, 0
    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        gen = epoch_generator(config, epoch)
        order = torch.randperm(len(train_set), generator=gen)
        total_loss, right, seen, began = 0.0, 0.0, 0.0, time.perf_counter()
        batches = range(0, len(order), config.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, unit="batch", leave=False)
        for start in bar:
            index = shard(order[start:start + config.batch_size], rank, world)
            images = to_model_input(train_set.images[index.numpy()]).to(device, non_blocking=True)
            if config.augment:
                images = augment_batch(images, gen)
            labels = torch.from_numpy(train_set.labels[index.numpy()]).to(device, non_blocking=True)
            logits = net(images)
            loss = crit(logits, labels)
            if not torch.isfinite(loss):
                last = epoch_checkpoints(out_dir)
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch}, batch {start // config.batch_size + 1}; "
                    f"stopping. Last good checkpoint: {last[-1] if last else 'none (diverged in the first epoch)'}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if config.schedule == "exponential":
                scheduler.step()
            total_loss += loss.item() * len(index)
            r, s = correct_counts(logits.detach(), labels, model.num_classes)
            right, seen = right + r, seen + s
            bar.set_postfix(loss=f"{total_loss / (start + len(index)):.4f}",
                            samples_per_s=f"{(start + len(index)) / (time.perf_counter() - began):.0f}")
        seconds = time.perf_counter() - began
        total_loss, *counts = _all_sum([total_loss, *right, *seen])
        right, seen = np.array(counts[:len(right)]), np.array(counts[len(right):])
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": total_loss / len(train_set),
               "seconds": seconds, "samples_per_s": len(train_set) / seconds}
        row.update({f"acc_{t}": float(r / s) if s else math.nan for t, r, s in zip(train_set.task_names, right, seen)})
        if val_set is not None:
            model.eval()
            val_scores = task_scores(model, val_set.images, config.loss)
            row.update({f"val_acc_{t}": a for t, a in accuracy(val_scores, val_set.labels, model.num_classes,
                                                                val_set.task_names).items()})
        if config.schedule == "plateau":
            scheduler.step(row["loss"])
        elif config.schedule == "val_plateau":
            val = row[f"val_acc_{train_set.task_names[0]}"]
            scheduler.step(val)
            if val > best_val:
                best_val, best_epoch = val, epoch
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
        history.append(row)
        if rank == 0:
            _save_checkpoint(out_dir, epoch, model, optimizer, scheduler, config, history, device)
            _write_metrics(out_dir, history)
        if world > 1:
            torch.distributed.barrier()
        if progress and rank == 0:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if optimizer.param_groups[0]["lr"] < config.min_lr:
            stopped = "lr below min_lr"
            break
    if best_state is not None:  # paper 2: keep the weights of the best validation epoch
        model.load_state_dict(best_state)
        if rank == 0:
            atomic_write(out_dir / BEST, _serialise({**model_record(model, config), "epoch": best_epoch,
                                                     "history": history[:best_epoch]}))
    return TrainResult(out_dir, epoch, stopped, history, epoch_checkpoints(out_dir))


def _serialise(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
