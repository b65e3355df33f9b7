"""Multi-source merge (paper 1, section 4.2) and the papers' splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


def kfold_splits(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, test) index pairs of a seeded permutation; test folds differ by at most one."""
    if k < 2 or n < k:
        raise ValueError(f"need 2 <= k <= n, got k={k}, n={n}")
    order = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(order, k)
    return [(np.sort(np.concatenate(folds[:i] + folds[i + 1:])), np.sort(folds[i])) for i in range(k)]


def split_by_fraction(n: int, train_fraction: float, seed: int, fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) indices with round(n * train_fraction) training rows (paper 2:
    0.9). ``fold`` k picks the k-th test block of one seeded permutation, so the folds' test
    sets are disjoint (cross-validation in the paper's train / test proportions)."""
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    test_size = n - int(round(n * train_fraction))
    if fold < 0 or (fold + 1) * test_size > n:
        raise ValueError(f"fold must be in [0, {n // max(1, test_size) - 1}] for n={n} and train_fraction="
                         f"{train_fraction}, got {fold}")
    stop = n - fold * test_size
    test = order[stop - test_size:stop]
    return np.sort(np.concatenate([order[:stop - test_size], order[stop:]])), np.sort(test)


def balancing_copies(sizes: Sequence[int]) -> list[int]:
    """How many times each source is repeated so tasks see about as many samples each:
    round(largest / size), at least 1 (paper 1, section 4.2: 3000 vs 30000 -> 10 copies)."""
    largest = max(sizes)
    return [max(1, int(round(largest / size))) for size in sizes]


@dataclass
class MultiTaskDataset:
    images: np.ndarray        # uint8 [N, H, W]
    labels: np.ndarray        # int64 [N, T], -1 where the sample's source has no label for the task
    task_names: tuple[str, ...]
    source: np.ndarray        # int [N], index into source_names
    source_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def merge_sources(sources: Sequence[tuple[str, np.ndarray, Mapping[str, np.ndarray]]],
                  task_names: Sequence[str], balance: bool = True) -> MultiTaskDataset:
    """Stack sources (name, images [n, H, W], {task: labels [n]}) into one dataset whose
    ``[N, T]`` label matrix holds -1 where a source does not label a task. With
    ``balance``, each source is repeated round(largest / its size) times, so tasks see
    about as many samples each (the paper's example: 3000 vs 30000 -> 10 copies, 60000)."""
    task_names = tuple(task_names)
    sizes = [len(images) for _, images, _ in sources]
    if any(s == 0 for s in sizes):
        empty = [name for (name, _, _), s in zip(sources, sizes) if s == 0]
        raise ValueError(f"sources without samples: {empty}")
    copies_per_source = balancing_copies(sizes) if balance else [1] * len(sizes)
    images, labels, origin = [], [], []
    for index, ((name, pixels, task_labels), size, copies) in enumerate(zip(sources, sizes, copies_per_source)):
        unknown = set(task_labels) - set(task_names)
        if unknown:
            raise ValueError(f"source {name!r} labels tasks {sorted(unknown)} not in task_names {task_names}")
        matrix = np.full((size, len(task_names)), -1, dtype=np.int64)
        for task, values in task_labels.items():
            if len(values) != size:
                raise ValueError(f"source {name!r}: {len(values)} {task} labels for {size} images")
            matrix[:, task_names.index(task)] = values
        images.append(np.concatenate([pixels] * copies))
        labels.append(np.concatenate([matrix] * copies))
        origin.append(np.full(size * copies, index))
    return MultiTaskDataset(np.concatenate(images), np.concatenate(labels), task_names, np.concatenate(origin),
                            tuple(name for name, _, _ in sources))
