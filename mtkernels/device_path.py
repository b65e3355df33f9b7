"""Which branch a tensor takes: CUDA tensors run the Triton kernels, CPU tensors the C++ ones.

Machines without a GPU still exercise the CUDA branch's host code (launch parameters, device
tables, dtype handling, the autograd glue): under Triton's interpreter (``TRITON_INTERPRET=1``,
set before triton is imported) Triton kernels run on CPU tensors, and
:func:`cpu_tensors_take_cuda_path` sends CPU tensors down the CUDA branch. It is a test
switch: the interpreter is far too slow for real work."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_CPU_TAKES_CUDA_PATH = [False]


def takes_cuda_path(x: torch.Tensor) -> bool:
    return x.is_cuda or (_CPU_TAKES_CUDA_PATH[0] and x.is_cpu)


def device_takes_cuda_path(device: torch.device) -> bool:
    return device.type == "cuda" or (_CPU_TAKES_CUDA_PATH[0] and device.type == "cpu")


@contextlib.contextmanager
def cpu_tensors_take_cuda_path() -> Iterator[None]:
    """Within the block, CPU tensors run the CUDA branch (its Triton kernels interpreted)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("cpu_tensors_take_cuda_path needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                           "triton is imported (CPU tensors cannot reach a compiled Triton kernel)")
    before = _CPU_TAKES_CUDA_PATH[0]
    _CPU_TAKES_CUDA_PATH[0] = True
    try:
        yield
    finally:
        _CPU_TAKES_CUDA_PATH[0] = before
