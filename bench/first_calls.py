"""One fresh process's first calls of a network, eager or fused, timed from inside (the
interpreter start and imports, equal for both, are left out). Run by bench/test_plans.py:

    python bench/first_calls.py --impl fused --workload first-calls --network bknet

prints one JSON line: seconds, and how many candidate sets the fused model timed."""

from __future__ import annotations

import argparse
import json
import time

import torch

import models
import mtkernels

WORKLOADS = {
    "first-calls": (1, 7, 128, 1),             # a user's first calls: one photo, a few, a batch, one again
    "40-sizes": tuple(range(2, 120, 3)),       # 40 different batch sizes, as remainder batches and streams give
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["eager", "fused"], required=True)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--network", choices=sorted(models.MODELS), default="bknet")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = models.build_model(args.network).eval()
    inputs = [torch.randn(n, model.in_channels, model.input_size, model.input_size) for n in WORKLOADS[args.workload]]
    with torch.no_grad():
        start = time.perf_counter()
        run = mtkernels.fuse_for_inference(model) if args.impl == "fused" else model
        for x in inputs:
            run(x)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "timed": mtkernels.fuse.tuning_cache().timed}))


if __name__ == "__main__":
    main()
