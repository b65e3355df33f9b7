"""Benchmark harness (used by bench/conftest.py and the suites): every benchmark runs on the
devices chosen with ``--bench-device`` (default: cuda on a machine that has one, so that
`pytest bench/ --benchmark-only` there times the GPU and not every CPU suite; cpu elsewhere;
an absent device is skipped, never faked) and records what it measured, so the suites can
write their tables, with ratios taken within the same run, at the end. On CUDA, TF32 is on
for float32 matmuls and convolutions (cuDNN's default, and what the Triton kernels use), and
every CUDA table says so."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import torch

DEVICES = ["cpu", "cuda"]
# suite -> device -> list of measurements; each suite's module writes its own report.
MEASUREMENTS: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
REPORTERS = {}


def pytest_addoption(parser):
    parser.addoption("--bench-device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                     help="devices to benchmark: auto (default) = cuda where there is one, else cpu")


def chosen_devices(config) -> tuple[str, ...]:
    choice = config.getoption("--bench-device")
    if choice == "auto":
        return ("cuda",) if torch.cuda.is_available() else ("cpu",)
    return tuple(DEVICES) if choice == "all" else (choice,)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    if request.param not in chosen_devices(request.config):
        pytest.skip(f"--bench-device {request.config.getoption('--bench-device')} leaves out {request.param}")
    if request.param == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return request.param


def synchronizer(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def measure(benchmark, fn, device: str, suite: str, rounds: int, warmup: int = 3, **labels) -> float:
    """Time ``fn`` with pytest-benchmark; record and return the median in seconds."""
    sync = synchronizer(device)

    def run():
        fn()
        sync()

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median
    MEASUREMENTS[suite][device].append(dict(labels, seconds=median))
    benchmark.extra_info.update(labels)
    return median


def sgd_step(model: torch.nn.Module, x: torch.Tensor, loss_fn, forward=None):
    """One training step with paper 1's optimiser (SGD, lr 0.01, momentum 0.9, weight decay
    0.01): ``forward(x)`` (default: the model), ``loss_fn(logits)``, backward, update.
    Returns the step to time."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    forward = model if forward is None else forward

    def step():
        optimiser.zero_grad(set_to_none=True)
        loss_fn(forward(x)).backward()
        optimiser.step()
    return step


def one_epoch_bknet_run(run_dir: Path) -> Path:
    """A BKNet run directory trained for one epoch on 64 random images: what the analysis
    benchmarks load (their timings do not depend on what the model learned)."""
    import numpy as np

    from models.data import merge_sources
    from models.train import config_by_name, train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 48, 48), dtype=np.uint8)
    dataset = merge_sources([("fer2013", images, {"emotion": rng.integers(0, 7, 64)}),
                             ("wiki", images, {"gender": rng.integers(0, 2, 64)})], ("smile", "emotion", "gender"))
    train(config_by_name("B4").replace(epochs=1, batch_size=64), dataset, run_dir, progress=False)
    return run_dir


def register_report(suite: str):
    """Decorator for a function(device, measurements) that writes a suite's results."""
    def wrap(fn):
        REPORTERS[suite] = fn
        return fn
    return wrap


def pytest_sessionfinish(session, exitstatus):
    for suite, by_device in MEASUREMENTS.items():
        if suite in REPORTERS:
            for device, rows in by_device.items():
                path = REPORTERS[suite](device, rows)
                if path is not None:
                    print(f"\n[{suite}/{device}] results written to {path}\n{Path(path).read_text()}")
