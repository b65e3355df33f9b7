"""Parameter and multiply-accumulate counts, measured by running the network once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSummary:
    name: str
    parameters: int
    macs_per_image: int
    input_shape: tuple[int, ...]
    num_classes: tuple[int, ...]
    task_names: tuple[str, ...]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear layer
    (BN, ReLU, pooling and additions are not MACs and are not counted)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output):
        nonlocal total
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * per_output

    def linear_hook(module: nn.Linear, _inputs, output):
        nonlocal total
        total += output[0].numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(input_shape)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def summarize(name: str, model) -> ModelSummary:
    shape = (model.in_channels, model.input_size, model.input_size)
    return ModelSummary(name, count_parameters(model), count_macs(model, shape), shape,
                        model.num_classes, model.task_names)


def format_table(rows: list[ModelSummary]) -> str:
    lines = ["| model | input | tasks (classes) | parameters | MACs / image |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        tasks = ", ".join(f"{t} ({c})" for t, c in zip(r.task_names, r.num_classes))
        lines.append(f"| {r.name} | {'x'.join(map(str, r.input_shape))} | {tasks} | "
                     f"{r.parameters / 1e6:.2f} M | {r.macs_per_image / 1e6:.1f} M |")
    return "\n".join(lines)
