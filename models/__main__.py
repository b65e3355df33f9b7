"""Command line of the mtkernels application: ``python -m models COMMAND``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import numpy as np

from . import MODELS, build_model
from .summary import format_table, summarize


def cmd_summary(args: argparse.Namespace) -> int:
    rows = [summarize(name, build_model(name)) for name in args.models]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.sources import write_synthetic

    for name in args.sources:
        print(f"{name}: written to {write_synthetic(name, args.out)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.faces import CropSettings, prepare_source
    from .data.sources import read_source

    settings = CropSettings(size=args.size, level_eyes=args.level_eyes, max_rotation=args.max_rotation)
    for name in args.sources:
        try:
            records = read_source(name, args.data_root, overrides=args.dataset)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 2
        images, _, split, report = prepare_source(records, args.cache, settings, progress=not args.quiet)
        splits = ", ".join(f"{s} {int((split == s).sum())}" for s in sorted(set(split)))
        print(f"{name}: {len(images)} faces ({splits}); skipped: {report.summary()}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data.survey import format_survey, survey

    statuses = survey(args.data_root, args.dataset, progress=not args.quiet)
    print(format_survey(statuses))
    return 0 if any(s.usable for s in statuses) else 2


def _override(config, assignments: list[str]):
    """Apply --set key=value pairs, typed from the config's own fields."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set expects KEY=VALUE with KEY one of {sorted(fields)}, got {item!r}")
        current = getattr(config, key)
        if isinstance(current, bool):
            value = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple) or (current is None and key == "task_weights"):
            value = tuple(float(v) if key == "task_weights" else v for v in raw.split(","))
        elif isinstance(current, (int, float, str)):
            value = type(current)(raw)
        else:
            value = raw
        changes[key] = value
    return config.replace(**changes)


def load_sources(config, args: argparse.Namespace, extra: tuple[str, ...] = ()):
    """(name, images, {task: labels}, split) per source of ``config`` (and ``extra``), found
    under ``args.data_root`` or at ``args.dataset``, faces cropped and cached in ``args.cache``,
    split as in the config's cross-validation fold."""
    from .data.faces import crop_settings_for, prepare_source
    from .data.sources import read_source

    settings = crop_settings_for(config)
    loaded = []
    for name in dict.fromkeys(config.sources + tuple(extra)):
        records = read_source(name, args.data_root, config.fold, overrides=args.dataset)
        images, labels, split, report = prepare_source(records, args.cache, settings, progress=not args.quiet)
        print(f"{name}: {len(images)} faces; skipped: {report.summary()}")
        loaded.append((name, images, labels, split))
    return loaded


def split_for_training(config, sources):
    """(train parts, validation parts) as merge_sources takes them. Validation: a seeded
    ``config.val_fraction`` of each source's training rows if set (paper 2's 10%), else the
    sources' test splits (monitored only; nothing is chosen on them)."""
    from .data.merge import split_by_fraction

    train_parts, val_parts = [], []
    for name, images, labels, split in sources:
        train_rows = np.flatnonzero(split == "train")
        if config.val_fraction > 0:
            keep, held = split_by_fraction(len(train_rows), 1.0 - config.val_fraction, config.seed)
            train_rows, val_rows = train_rows[keep], train_rows[held]
        else:
            val_rows = np.flatnonzero(split != "train")
        train_parts.append((name, images[train_rows], {t: v[train_rows] for t, v in labels.items()}))
        if len(val_rows):
            val_parts.append((name, images[val_rows], {t: v[val_rows] for t, v in labels.items()}))
    return train_parts, val_parts


def _run_precision(run_dir: str, resume: bool) -> str | None:
    """The precision a run being resumed was trained in (its last checkpoint's config)."""
    from .checkpoint import epoch_checkpoints, load_checkpoint

    existing = epoch_checkpoints(run_dir) if resume else []
    return load_checkpoint(existing[-1])["config"].get("precision", "fp32") if existing else None


def cmd_train(args: argparse.Namespace) -> int:
    import os

    import torch

    from mtkernels.training import native_bf16

    from .data.merge import merge_sources
    from .train import config_by_name, train

    config = config_by_name(args.config)
    if args.epochs is not None:
        config = config.replace(epochs=args.epochs)
    if args.fold is not None:
        config = config.replace(fold=args.fold)
    config = _override(config, args.set)
    out = args.out or f"runs/{config.name}/fold-{config.fold}"
    precision = args.precision or _run_precision(out, args.resume)
    if precision is None and not any(item.startswith("precision=") for item in args.set):
        precision = "bf16" if native_bf16() else "fp32"
    config = config.replace(precision=precision or config.precision)
    tasks = build_model(config.model).task_names
    train_parts, val_parts = split_for_training(config, load_sources(config, args))
    train_set = merge_sources(train_parts, tasks)
    val_set = merge_sources(val_parts, tasks, balance=False) if val_parts else None
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one process per rank
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if device == "cpu":
        import mtkernels

        mtkernels.retain_freed_memory()  # no page faults for each step's activations
    result = train(config, train_set, out, val_set=val_set, resume=args.resume, loss_impl=args.loss_impl,
                   progress=not args.quiet, device=device, fuse_layers=not args.plain_layers)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 may still be writing the best checkpoint
        torch.distributed.destroy_process_group()
    last = result.history[-1] if result.history else {}
    print(f"{result.stopped} after {result.epochs_run} epochs; checkpoints and metrics.csv in {result.out_dir}; "
          + " ".join(f"{k}={v:.4f}" for k, v in last.items() if k.startswith(("acc_", "val_acc_"))
                     and not np.isnan(v)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import epoch_checkpoints
    from .io import atomic_write
    from .report import cross_validation_table
    from .train.evaluate import evaluate_run, run_config

    run = Path(args.run)
    folds = sorted(d for d in run.glob("fold-*") if d.is_dir() and epoch_checkpoints(d))
    accuracies: dict[tuple[str, str, str], list[float]] = {}
    for run_dir in folds or [run]:
        config = run_config(run_dir)
        rows = evaluate_run(run_dir, load_sources(config, args, tuple(args.also)))
        for row in rows:
            print(f"{run_dir.name:>8} {row['source']:>8} {row['split']:>13} {row['task']:>8}: "
                  f"{100 * row['accuracy']:.2f}% of {row['n']}")
            accuracies.setdefault((row["source"], row["split"], row["task"]), []).append(100 * row["accuracy"])
    if folds:
        table = cross_validation_table(accuracies)
        atomic_write(run / "cross-validation.md",
                     f"# {run.name}: {len(folds)}-fold cross-validation (config {config.name})\n\n{table}\n")
        print(table)
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .io import atomic_write
    from .report import table2, table3, table4

    out = Path(args.out)
    tables = {"table2.md": (table2(args.runs), f"no evaluated runs under {args.runs}: train and `evaluate` first")}
    for device in ("cpu", "cuda"):
        tables[f"table3-{device}.md"] = (table3(args.results, device),
                                         f"no {args.results}/inference-{device}.csv: run `pytest bench/ "
                                         f"--benchmark-only` (on a machine with {device})")
        tables[f"table4-{device}.md"] = (table4(args.results, device),
                                         f"no {args.results}/training-{device}.csv: run `pytest bench/ "
                                         f"--benchmark-only` (on a machine with {device})")
    for name, (text, missing) in tables.items():
        if text is None:
            print(f"{name}: skipped, {missing}", file=sys.stderr)
            continue
        atomic_write(out / name, text)
        print(f"{text}\n(written to {out / name})\n")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import Analyzer

    analyzer = Analyzer(args.weights, device=args.device, batch_size=args.batch_size, fused=not args.eager,
                        min_face_size=args.min_face_size, precision=args.precision)
    info = analyzer.info
    print(f"model: {info['architecture']} (config {info['config']}, {info['loss']} loss, "
          f"{info['epochs_trained']} epochs) from {info['checkpoint']}, "
          f"{'fused ' + info['precision'] if info['fused'] else 'eager'}, "
          f"on {args.device}", file=sys.stderr)
    records = analyzer.run(args.paths, every=args.every, out_dir=args.out, progress=not args.quiet)
    if args.json and not args.json.endswith(".jsonl"):
        from .io import atomic_write

        document = {"model": info, "records": list(records)}
        document["summary"] = analyzer.stats.as_dict()
        atomic_write(args.json, json.dumps(document, indent=1))
    else:
        # JSON lines are written as they come: an interrupted run keeps what it analysed
        stream = open(args.json, "w") if args.json else sys.stdout
        try:
            for record in records:
                stream.write(json.dumps(record) + "\n")
                stream.flush()
        finally:
            if stream is not sys.stdout:
                stream.close()
    print(f"analysed {analyzer.stats.summary()}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .export import export_onnx

    model, state = load_model(args.weights)
    data = export_onnx(model, args.out)
    print(f"{state['model_name']} from {state['path']} -> {args.out} ({len(data) / 1e6:.1f} MB, ONNX opset 17, "
          f"tasks {', '.join(state['task_names'])})")
    return 0


def at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def torch_device(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N, and only a CUDA device this machine has."""
    import torch

    if text != "cpu" and not (text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} requested but this machine has no CUDA device")
    return text


def dataset_override(text: str) -> tuple[str, str]:
    """argparse type: NAME=PATH with NAME a dataset this project reads."""
    from .data.locate import DATASETS

    name, sep, path = text.partition("=")
    if not sep or name not in DATASETS or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with NAME one of {', '.join(DATASETS)}, got {text!r}")
    return name, path


class DatasetOverrides(argparse.Action):
    """Collects repeated --dataset NAME=PATH into {name: Path}; the last one for a name wins."""

    def __call__(self, parser, namespace, value, option_string=None):
        from pathlib import Path

        overrides = dict(getattr(namespace, self.dest) or {})
        overrides[value[0]] = Path(value[1])
        setattr(namespace, self.dest, overrides)


def shared_flags() -> dict[str, argparse.ArgumentParser]:
    """Flags several commands take, declared once (argparse parent parsers)."""
    from .data.locate import DATASETS

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--data-root", metavar="DIR",
                      help="folder the datasets were extracted into: each is found there or one folder down, in any "
                           "of its common distributions (see `python -m models datasets --help`)")
    data.add_argument("--dataset", type=dataset_override, action=DatasetOverrides, default={}, metavar="NAME=PATH",
                      help=f"the folder of one dataset ({', '.join(DATASETS)}), searched instead of --data-root for "
                           "it; repeatable")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache", default="cache", help="folder for the cropped-face cache (default: ./cache)")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bars")
    return {"data": data, "cache": cache, "quiet": quiet}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models",
        description="Multi-task face-attribute networks of Sang & Cuong 2018 (BKNet, ResNet ver1/ver2) "
                    "and Saroop et al. 2021 (4-task CNN), built on mtkernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    flags = shared_flags()
    reads_data = [flags["data"], flags["cache"], flags["quiet"]]
    p = sub.add_parser("summary", help="parameter count and multiply-accumulates per image of each network",
                       description="Build each network and count its parameters and the multiply-accumulates "
                                   "of one image through its conv and linear layers (measured, not tabulated).")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), metavar="NAME",
                   help=f"networks to summarise (default: all of {', '.join(MODELS)})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(func=cmd_summary)

    from .data.sources import READERS

    def sources_argument(p, **kwargs):
        p.add_argument("--sources", nargs="+", choices=sorted(READERS), metavar="NAME", **kwargs)

    p = sub.add_parser("synth", help="write synthetic datasets in the real formats (to try the pipeline)",
                       description="Write small GENKI-4K, FER-2013, Wiki, IMDB and RAF-DB datasets in their exact "
                                   "on-disk formats, with real faces from scikit-image, class-dependent (learnable) "
                                   "pixels, and a few rows each reader must report and skip.")
    p.add_argument("--out", required=True, metavar="DATA_ROOT", help="folder to write DATA_ROOT/<source>/ into")
    sources_argument(p, default=sorted(READERS),
                     help=f"datasets to write (default: all of {', '.join(sorted(READERS))})")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("datasets", parents=[flags["data"], flags["quiet"]],
                       help="which datasets are found where, in which distribution, and what is broken",
                       description="Look for every dataset under --data-root (at the root or one folder down) and "
                                   "at each --dataset NAME=PATH, and print one row per dataset: found or not, the "
                                   "folder and distribution, images per split, and problems (listed files missing, "
                                   "unreadable images, rows without labels). For a missing dataset it names every "
                                   "folder looked in and the file names that would have been recognised. Known "
                                   "distributions: GENKI-4K as the GENKI-R2009a archive, its Subsets/GENKI-4K "
                                   "folder, or labels.txt + files/; FER-2013 as fer2013.csv or train/<emotion>/ + "
                                   "test/<emotion>/ image folders; Wiki and IMDB as wiki_crop/ and imdb_crop/ "
                                   "(with their .mat); RAF-DB as basic/ (or RAF-DB/basic/). Exit status 0 when at "
                                   "least one dataset is usable, 2 when none is.")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("prepare", parents=reads_data, help="read datasets, crop faces with MTCNN once, cache them",
                       description="Read each dataset in its distributed format (found as `datasets` shows), detect "
                                   "and crop faces (MTCNN, gray, SIZE x SIZE) and cache the crops in CACHE; a rerun "
                                   "uses the cache, an interrupted run resumes. Prints kept and skipped counts.")
    sources_argument(p, required=True, help=f"datasets to prepare: {', '.join(sorted(READERS))}")
    p.add_argument("--size", type=int, default=48, help="crop side in pixels (paper 1: 48, paper 2: 50)")
    p.add_argument("--level-eyes", action="store_true", help="rotate so the eye line is level (paper 2)")
    p.add_argument("--max-rotation", type=float, default=10.0, help="cap on that rotation, degrees (default 10)")
    p.set_defaults(func=cmd_prepare)

    from .train import CONFIGS

    p = sub.add_parser("train", parents=reads_data, help="train a paper's config (Table 1 A1-B4, ResNet, paper 2)",
                       description="Train one of the papers' recipes on its datasets (found as `datasets` shows; faces "
                                   "are cropped once and cached). Writes an atomic checkpoint and a metrics.csv "
                                   "row every epoch; --resume continues a stopped or killed run exactly.")
    p.add_argument("--config", required=True, choices=sorted(CONFIGS), help="recipe to train")
    p.add_argument("--epochs", type=int, help="number of epochs (default: the paper's)")
    p.add_argument("--fold", type=at_least(1), choices=range(1, 5), metavar="K",
                   help="cross-validation fold 1-4: which part of GENKI-4K / Wiki / IMDB is held out for testing "
                        "(FER-2013 and RAF-DB keep their official splits); default 1")
    p.add_argument("--out", help="run directory (default: runs/CONFIG/fold-K)")
    p.add_argument("--device", type=torch_device, default="cpu",
                   help="cpu, cuda or cuda:N (default cpu); under torchrun with cuda each rank takes its LOCAL_RANK")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--loss-impl", choices=["fused", "reference"], default="fused",
                   help="mtkernels' fused loss (default) or the plain-PyTorch reference, for comparison")
    p.add_argument("--plain-layers", action="store_true",
                   help="CPU: keep PyTorch's BatchNorm + ReLU, convolutions and NCHW activations (default: "
                        "channels-last, mtkernels' fused BatchNorm + ReLU and each conv layer's fastest algorithm; "
                        "steps measured 1.40x-1.59x faster with them, bench/results/training-cpu.md)")
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="CPU compute precision: fp32, or bf16 mixed precision (float32 parameters, bfloat16 convs, "
                        "linear layers and activations on the CPU's bfloat16 unit; float32 where it has none). "
                        "Default: the run's own when resuming, else bf16 where the CPU has a bfloat16 unit "
                        "(measured 1.9x faster for BKNet here, loss within 10%%: README, bf16 training) and fp32 "
                        "elsewhere")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set lr=0.02 --set batch_size=64 (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=reads_data, help="accuracy of a trained run on each dataset's test splits",
                       description="Score every test split of the run's datasets (FER-2013's public and private "
                                   "tests separately where its CSV gives them, its image folders' test/ as one "
                                   "split, 'test') with the run's last checkpoint, the average of its last "
                                   "checkpoints when the config uses the ensemble, or its best-validation weights "
                                   "(paper 2); writes evaluation.json and evaluation.md to the run directory. A "
                                   "directory holding fold-1 ... fold-4 runs is evaluated fold by fold (each on its "
                                   "own test split) and summarised as mean ± std in cross-validation.md.")
    p.add_argument("--run", required=True, help="run directory written by `train`, or the parent of its fold-K runs")
    p.add_argument("--also", nargs="+", default=[], choices=["wiki", "imdb"], metavar="SOURCE",
                   help="also score these gender datasets (paper 1's Table 2 reports Wiki and IMDB for every "
                        "config)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tables", help="the papers' Tables 2, 3 and 4 with our results beside them",
                       description="Write markdown tables laid out like paper 1's Table 2 (accuracy, mean ± std "
                                   "over the cross-validation folds of every evaluated run under RUNS), Table 3 "
                                   "(inference time per image) and Table 4 (training time) from the benchmark "
                                   "results, the paper's figures beside ours. Missing inputs are named, not fatal.")
    p.add_argument("--runs", default="runs", help="folder searched for evaluated runs (default: ./runs)")
    p.add_argument("--results", default="bench/results", help="benchmark results folder (default: bench/results)")
    p.add_argument("--out", default="reports", help="folder to write table2.md, table3-*.md, table4-*.md into")
    p.set_defaults(func=cmd_tables)

    p = sub.add_parser("analyze", parents=[flags["quiet"]],
                       help="find the faces in photos or videos and predict their attributes",
                       description="Detect every face (MTCNN) in the given images, videos and directories, crop "
                                   "and normalise each as in training, and run the trained model (fused for "
                                   "inference) over batches of faces. Prints one JSON record per face (box, "
                                   "landmarks, detector confidence, per task the label and every class's "
                                   "probability, or raw scores for an SVM-loss model) or per image that could "
                                   "not be read or holds no face; optionally writes annotated copies (blue box: "
                                   "female, red: male). Problems are reported, never fatal; a summary line with "
                                   "faces per second goes to standard error.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files, video files (every --every-th frame) or directories (searched recursively)")
    p.add_argument("--weights", metavar="RUN_DIR_OR_CKPT",
                   help="a run directory or checkpoint written by `python -m models train` (required)")
    p.add_argument("--out", metavar="DIR", help="write an annotated PNG per image or frame with faces to DIR")
    p.add_argument("--json", metavar="FILE",
                   help="write records to FILE: one JSON document with model and summary, or JSON lines if FILE "
                        "ends in .jsonl (default: JSON lines on standard output)")
    p.add_argument("--batch-size", type=at_least(1), default=64,
                   help="faces per model batch, across images (default 64)")
    p.add_argument("--device", type=torch_device, default="cpu",
                   help="cpu, cuda or cuda:N (default cpu); detector and model run there")
    p.add_argument("--every", type=at_least(1), default=1, metavar="K",
                   help="analyse every K-th frame of a video (default 1)")
    p.add_argument("--min-face-size", type=at_least(12), default=20,
                   help="smallest face side to look for, in pixels (default 20; larger is faster)")
    p.add_argument("--eager", action="store_true", help="run the plain eager model instead of the fused one")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                   help="the fused model's arithmetic: fp32 (default: exact; the face detector takes over 80%% "
                        "of the time anyway), bf16 (about 1.4-1.8x faster model from 4 faces a batch), int8 "
                        "(calibrated on scikit-image's LFW faces; fastest, least exact; see README)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("export", help="write a trained network as an ONNX file (for ONNX Runtime or OpenVINO)",
                       description="Export the eager network of a run or checkpoint written by `python -m models "
                                   "train` to ONNX (opset 17): input x [batch, 1, H, W] float32 in [0, 1], output "
                                   "logits [batch, sum of classes], tasks concatenated in the checkpoint's order; "
                                   "the batch dimension is dynamic. The file is written atomically.")
    p.add_argument("weights", metavar="RUN_OR_CHECKPOINT", help="a run directory or checkpoint file")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format (onnx)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write, e.g. bknet.onnx")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data.locate import DatasetNotFound

    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DatasetNotFound) as e:  # a user error, not a bug: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
