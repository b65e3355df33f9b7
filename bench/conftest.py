import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import device, pytest_addoption, pytest_sessionfinish  # noqa: F401  (fixture and hooks for pytest)

import mtkernels

# Every suite runs with freed CPU memory kept for reuse. With glibc's default, large
# allocations are page-faulted in afresh, at a cost that depends on what ran earlier in
# the process (eager BKNet at batch 128 measured 1.16 to 1.89 ms per image with the same
# code, depending on the suites before it); retained, every implementation is timed on
# the same footing. `python -m models train` retains it too.
mtkernels.retain_freed_memory()
