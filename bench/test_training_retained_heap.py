"""Table 4's last variant: the fused loss + channels_last training step after
``mtkernels.retain_freed_memory()``. A module of its own, run after test_training.py,
because the allocator change cannot be undone within the process; its rows join the
training report."""

from __future__ import annotations

import pytest

import mtkernels
from test_training import NETWORKS, RETAINED, measure_step


@pytest.mark.parametrize("name", NETWORKS)
def test_training_step_with_retained_heap(benchmark, device, name):
    if device == "cuda":
        pytest.skip("CUDA memory comes from PyTorch's own caching allocator")
    if not mtkernels.retain_freed_memory():
        pytest.skip("the C library is not glibc: nothing to retain")
    measure_step(benchmark, device, name, RETAINED)
