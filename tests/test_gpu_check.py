"""bench/gpu_check.sh, the one script for a GPU slot: on a machine without CUDA it prints one
line saying so and exits 3, having run nothing."""

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "bench" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run for real")
def test_exits_3_with_one_line_without_cuda(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin:" + str(Path(__import__("sys").executable).parent),
                                 "OUT": str(tmp_path)})
    assert result.returncode == 3, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA device" in result.stdout
    assert not any(tmp_path.iterdir())  # nothing run, nothing written
