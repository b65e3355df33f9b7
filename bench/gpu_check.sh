#!/usr/bin/env bash
# One prepared run for a short GPU slot (at most 8 minutes, build included): install with what
# the machine has, run every CUDA test, then the CUDA benchmarks (loss, inference, training),
# copy bench/results/*-cuda.* to $OUT and print a short table last. Each stage has its own
# time limit and is stopped with SIGINT, so pytest still writes what it measured.
# Usage (on the GPU machine, from the repository root): bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false or torch is missing); nothing run"
  exit 3
fi

OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25
  local rc=${PIPESTATUS[0]}
  echo "$name: exit $rc" >> "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

: > "$OUT/summary.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'CUDA', \
torch.version.cuda, 'GPU', torch.cuda.get_device_name())" | tee -a "$OUT/summary.txt"
# Pure-Python wheels this machine lacks travel in .gpu-wheels (made with pip download --no-deps).
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
  pip install --no-index --no-deps -q .gpu-wheels/*.whl
fi
stage build 150 pip install --no-build-isolation --no-deps -q -e .
# The CUDA tests decide whether the numbers mean anything: first.
stage tests 150 python -m pytest tests/ -m cuda -q -p no:cacheprovider
stage bench 240 python -m pytest bench/test_loss.py bench/test_inference.py bench/test_training.py \
  --benchmark-only --bench-device cuda -q -p no:cacheprovider
cp bench/results/*-cuda.* "$OUT"/ 2>/dev/null
for table in bench/results/*-cuda.md; do
  [ -e "$table" ] && { echo; head -n 40 "$table"; }
done
echo
cat "$OUT/summary.txt"
exit $status
