"""Choosing among implementations by timing them, once per machine.

A decision says which implementation of a layer, or which plan of a network, runs fastest
for one kind of input. It is valid for everything its key names: the layer (its
signature), the input's per-image shape, dtype and device, and the batch bucket; and, in
the file it is kept in, the CPU model, kernel variant (ISA), thread count and the torch
and mtkernels versions. Decisions are kept on disk in ``$MTKERNELS_CACHE_DIR`` or
``$XDG_CACHE_HOME/mtkernels`` (default ``~/.cache/mtkernels``), one JSON file per machine
context, so a new process reuses what an earlier one measured.

Files are replaced atomically (write a temporary file, then rename) under an exclusive
``flock``, merging what other processes wrote meanwhile. A corrupt or foreign file is
ignored with one warning and rewritten. ``MTKERNELS_TUNE=off`` never times anything: it
uses stored decisions where there are some and the heuristic choice elsewhere.
``MTKERNELS_TUNE=retime`` times every decision again, once per process, and replaces the
stored one: a decision timed while the machine was busy otherwise stays.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

TUNE_ENV = "MTKERNELS_TUNE"
CACHE_DIR_ENV = "MTKERNELS_CACHE_DIR"
FILE_FORMAT = 1

# Batch buckets: [1], [2, 3], [4, 15], [16, 63], [64, inf). One decision serves a bucket: the
# choice between kernels changes with the batch size only at these scales (batch 1 is
# latency-bound, 64 and up throughput-bound), and a stream of remainder batches then costs
# at most five rounds of timing per layer.
_BUCKET_STARTS = (1, 2, 4, 16, 64)
# The largest batch candidates are timed on (the first images of a larger one): the first
# size of the top bucket. Beyond it the time per image hardly changes, and timing costs more.
TUNING_BATCH = 64


def batch_bucket(n: int) -> str:
    """The name of the batch bucket of a batch of ``n`` (>= 1) images, e.g. ``"4-15"``."""
    if n < 1:
        raise ValueError(f"batch size must be >= 1 to have a bucket, got {n}")
    for start, end in zip(_BUCKET_STARTS, _BUCKET_STARTS[1:] + (None,)):
        if end is None or n < end:
            if end is None:
                return f"{start}+"
            return str(start) if end == start + 1 else f"{start}-{end - 1}"
    raise AssertionError("unreachable")


def tune_mode() -> str:
    """``MTKERNELS_TUNE``: "on" (the default; also 1 / true / yes), "off" (0 / false / no) or
    "retime"."""
    value = os.environ.get(TUNE_ENV, "on").strip().lower()
    if value in ("on", "1", "true", "yes", ""):
        return "on"
    if value in ("off", "0", "false", "no"):
        return "off"
    if value == "retime":
        return value
    raise ValueError(f"{TUNE_ENV} must be 'on', 'off' or 'retime', got {os.environ[TUNE_ENV]!r}")


def tuning_enabled() -> bool:
    """False when ``MTKERNELS_TUNE`` is ``off``."""
    return tune_mode() != "off"


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mtkernels"


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_context() -> dict:
    """What every decision in one file depends on beyond its own key."""
    from .. import _C, __version__

    return {"format": FILE_FORMAT, "cpu": _cpu_model(), "isa": _C.isa(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "mtkernels": __version__}


def fastest(candidates: Mapping[str, Callable[[torch.Tensor], object]], x: torch.Tensor, runs: int = 5,
            min_seconds: float = 1e-3) -> str:
    """The name of the candidate with the lowest best-of-``runs`` time per call on ``x``.
    Two untimed calls first build primitives, packed weights and buffers (the second also
    sets how often each timing repeats a candidate: until it covers ``min_seconds``, since one
    0.1 ms call is mostly timer noise). The candidates take turns, so a slow spell of the
    machine hits all. From the second round on, a candidate whose best is over twice the
    leader's drops out: it will not win, and timing it again only makes the first call
    slower. (After one round a single slow call could still be noise.)"""
    names = list(candidates)
    repeats = {}
    for name in names:
        run = candidates[name]
        run(x)
        start = time.perf_counter()
        run(x)
        repeats[name] = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-7)))
    best = {name: math.inf for name in names}
    alive = names
    for round_ in range(runs):
        for name in alive:
            run, n = candidates[name], repeats[name]
            start = time.perf_counter()
            for _ in range(n):
                run(x)
            best[name] = min(best[name], (time.perf_counter() - start) / n)
        if round_ >= 1:
            leader = min(best[name] for name in alive)
            alive = [name for name in alive if best[name] <= 2.0 * leader]
            if len(alive) == 1:
                break
    return min(alive, key=best.__getitem__)


class TuningCache:
    """Decisions by key, loaded from and written back to one JSON file per machine context."""

    def __init__(self, directory: Optional[Path] = None):
        self._directory = directory
        self._files: dict[Path, dict[str, str]] = {}
        self._warned: set[Path] = set()
        self.timed = 0  # candidate sets timed by this process (a warm cache times none)
        self.retimed: set[str] = set()  # keys timed by this process (MTKERNELS_TUNE=retime: once each)

    def path(self) -> tuple[Path, dict]:
        context = machine_context()
        digest = hashlib.sha1(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        return (self._directory or cache_dir()) / f"tuning-{digest}.json", context

    def _warn(self, path: Path, message: str) -> None:
        if path not in self._warned:
            self._warned.add(path)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _read(self, path: Path, context: dict) -> dict[str, str]:
        """The decisions in ``path``; {} for a missing, corrupt or foreign file (with a warning
        for the last two)."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as error:
            self._warn(path, f"mtkernels: cannot read the tuning cache {path} ({error}); tuning again")
            return {}
        try:
            data = json.loads(text)
            decisions = data["decisions"]
            valid = (data.get("format") == FILE_FORMAT and data.get("context") == context
                     and isinstance(decisions, dict)
                     and all(isinstance(k, str) and isinstance(v, str) for k, v in decisions.items()))
        except (ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            self._warn(path, f"mtkernels: ignoring the corrupt or foreign tuning cache {path}; it will be rewritten")
            return {}
        return decisions

    def lookup(self, key: str) -> Optional[str]:
        path, context = self.path()
        if path not in self._files:
            self._files[path] = self._read(path, context)
        return self._files[path].get(key)

    def store(self, key: str, choice: str) -> None:
        path, context = self.path()
        decisions = self._files.setdefault(path, {})
        decisions[key] = choice
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                merged = {**self._read(path, context), **decisions}
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"format": FILE_FORMAT, "context": context, "decisions": merged}, f, indent=1,
                                  sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    os.unlink(tmp)
                    raise
            self._files[path] = merged
        except OSError as error:
            self._warn(path, f"mtkernels: cannot write the tuning cache {path} ({error}); "
                             "decisions are kept for this process only")


_CACHE = TuningCache()


def tuning_cache() -> TuningCache:
    """The process's tuning cache (its ``timed`` counter says how much timing ran)."""
    return _CACHE


def choose(key: str, names: Sequence[str], build: Callable[[str], Callable[[torch.Tensor], object]],
           x: torch.Tensor, heuristic: str) -> str:
    """The implementation to use for ``key``: the stored decision if there is one, else the
    fastest of ``names`` on ``x`` (``build(name)`` makes each runnable), stored for next
    time; with tuning off, ``heuristic``. A decision is stored with the candidates it was
    made among, and not reused when others are offered now."""
    if heuristic not in names:
        raise ValueError(f"heuristic {heuristic!r} is not one of {list(names)}")
    if len(names) == 1:
        return names[0]
    offered = ",".join(names)
    stored = (_CACHE.lookup(key) or "").partition(" among ")
    retime = tune_mode() == "retime" and key not in _CACHE.retimed
    if stored[0] in names and stored[2] == offered and not retime:
        return stored[0]
    if not tuning_enabled():
        return heuristic
    _CACHE.timed += 1
    _CACHE.retimed.add(key)
    choice = fastest({name: build(name) for name in names}, x)
    _CACHE.store(key, f"{choice} among {offered}")
    return choice
