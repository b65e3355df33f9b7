"""The ``datasets`` command's report: for each dataset, whether it was found, where and in
which distribution, its images per split and what is broken in it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .formats import SkipReport
from .locate import DATASETS, DatasetNotFound, locate
from .sources import read_source


@dataclass
class DatasetStatus:
    name: str
    status: str                   # found, unusable or missing
    distribution: str = "-"
    folder: str = "-"
    splits: str = "-"
    problems: str = "-"
    not_found: str = ""           # for a missing dataset: where it was looked for

    @property
    def usable(self) -> bool:
        return self.status == "found"


def unreadable_images(paths: list[Path], progress: bool, name: str) -> list[Path]:
    """The files whose header PIL cannot read (as the face cropper would find them)."""
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    bad = []
    for path in tqdm(paths, desc=f"checking {name}", unit="img", disable=not progress, leave=False):
        try:
            with Image.open(path):
                pass
        except (OSError, UnidentifiedImageError):
            bad.append(path)
    return bad


def survey_one(name: str, data_root, overrides: Optional[Mapping[str, Path]], progress: bool) -> DatasetStatus:
    try:
        located = locate(name, data_root, overrides)
    except DatasetNotFound as e:
        return DatasetStatus(name, "missing", problems="not found (see below)", not_found=f"{name}: {e.where()}")
    status = DatasetStatus(name, "found", located.distribution.name, str(located.folder))
    try:
        records = read_source(name, overrides={name: located.folder})
    except (OSError, ValueError) as e:  # a truncated or foreign download
        status.status, status.problems = "unusable", str(e)
        return status
    problems = SkipReport(list(records.report.skipped))
    for path in unreadable_images(records.paths or [], progress, name):
        problems.add(str(path), "unreadable image")
    counts = ", ".join(f"{s} {int((records.split == s).sum())}" for s in sorted(set(records.split)))
    status.splits = f"{counts or 'no images'} ({', '.join(records.labels)} labels)"
    status.problems = "none" if not problems.skipped else problems.summary()
    return status


def survey(data_root=None, overrides: Optional[Mapping[str, Path]] = None,
           progress: bool = True) -> list[DatasetStatus]:
    return [survey_one(name, data_root, overrides, progress) for name in DATASETS]


def format_survey(statuses: list[DatasetStatus]) -> str:
    header = ("dataset", "status", "distribution", "folder", "images per split", "problems")
    rows = [(s.name, s.status, s.distribution, s.folder, s.splits, s.problems) for s in statuses]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [s.not_found for s in statuses if s.not_found]
    return "\n".join(lines)
