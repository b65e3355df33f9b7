import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from harness import device, pytest_sessionfinish  # noqa: E402,F401  (fixture and hook for pytest)
