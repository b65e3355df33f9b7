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
    """No distribution of dataset ``name`` in any of ``folders``; the message names them all and
    the file names that would have been recognised."""

    def __init__(self, name: str, folders: list[Path]):
        self.name, self.folders = name, folders
        super().__init__(f"{name}: not found; {self.where()}")

    def where(self) -> str:
        if not self.folders:
            return f"no --data-root and no --dataset {self.name}=PATH given"
        return (f"looked in {', '.join(map(str, self.folders))}; a folder holding any of "
                f"{', '.join(recognised_files(self.name))} would have been recognised")


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
    folders = [] if root is None else search_folders(Path(root), name)
    for folder in folders:
        found = find_distribution(name, folder)
        if found is not None:
            return Located(name, folder, *found)
    raise DatasetNotFound(name, folders)
