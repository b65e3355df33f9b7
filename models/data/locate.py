"""Where each dataset is on disk. Users extract the downloads into one folder (``--data-root``),
so a dataset is looked for in that folder and one folder down, in any of its distributions
(:data:`.formats.DISTRIBUTIONS`); ``--dataset NAME=PATH`` names one dataset's folder and wins
over the search."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .formats import DISTRIBUTIONS, Distribution, find_distribution, recognised_files

DATASETS = tuple(DISTRIBUTIONS)


class DatasetNotFound(FileNotFoundError):
    """No distribution of a dataset in any folder searched; the message names them all and the
    file names that would have been recognised."""


@dataclass(frozen=True)
class Located:
    name: str
    folder: Path               # the folder the reader is given
    distribution: Distribution
    marker: Path               # the file or folder that identified the distribution


def search_folders(root: Path, name: str) -> list[Path]:
    """``root``, then its sub-folder named after the dataset (this project's own layout), then
    its other sub-folders in name order."""
    root = Path(root)
    if not root.is_dir():
        return [root]
    children = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: (p.name != name, p.name))
    return [root, *children]


def locate(name: str, data_root=None, overrides: Optional[Mapping[str, Path]] = None) -> Located:
    """Dataset ``name`` at ``overrides[name]`` if given, else under ``data_root``."""
    if name not in DISTRIBUTIONS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    root = (overrides or {}).get(name, data_root)
    if root is None:
        raise DatasetNotFound(f"{name}: no --data-root and no --dataset {name}=PATH given")
    folders = search_folders(Path(root), name)
    for folder in folders:
        found = find_distribution(name, folder)
        if found is not None:
            return Located(name, folder, *found)
    raise DatasetNotFound(f"{name}: looked in {', '.join(map(str, folders))}; a folder holding any of "
                          f"{', '.join(recognised_files(name))} would have been recognised")
