"""Loss forward+backward: eager reference, torch.compile of the reference, mtkernels, and
a plain copy of the same bytes (read logits, write gradient) as the memory-bound floor; at
N = 128 a do-nothing ``autograd.Function`` as the per-call floor; and one wide task (1024 to
32768 classes, N = 4096) against eager ``F.cross_entropy`` in float32 and bfloat16."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from harness import measure, register_report
from results_io import RESULTS_DIR, save_bar_chart, write_table

from mtkernels import MultiTaskLoss
from mtkernels._validation import loss_spec
from mtkernels.reference import loss_from_spec

SUITE = "loss"
SIZES = (128, 65536)
TASKS = ((2, 7, 2), (7, 3, 3, 5))
KINDS = ("ce", "svm")
IMPLS = ("eager", "compiled", "mtkernels", "graph", "copy", "noop")
WIDE_CLASSES = (1024, 8192, 32768)
WIDE_ROWS = 4096


class DoNothing(torch.autograd.Function):
    """The least an autograd loss costs: a forward and a backward that compute nothing."""

    @staticmethod
    def forward(ctx, logits):
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return None


def make_inputs(n, num_classes, device):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, sum(num_classes), generator=g) * 3
    labels = torch.stack([torch.randint(0, c, (n,), generator=g) for c in num_classes], 1)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -1  # multi-source: some tasks unlabelled
    return logits.to(device).requires_grad_(), labels.to(device)


@functools.lru_cache(maxsize=None)
def compiled_reference(spec):
    return torch.compile(lambda logits, labels: loss_from_spec(logits, labels, spec))


def graph_replay(step):
    """``step`` captured once in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def step_fn(impl, logits, labels, spec):
    if impl == "graph":
        return graph_replay(step_fn("mtkernels", logits, labels, spec))
    if impl == "copy":
        src, out = logits.detach(), torch.empty_like(logits)
        return lambda: out.copy_(src)
    if impl == "noop":
        loss_fn = lambda logits, labels: DoNothing.apply(logits)  # noqa: E731
    elif impl == "eager":
        loss_fn = functools.partial(loss_from_spec, spec=spec)
    elif impl == "compiled":
        loss_fn = compiled_reference(spec)
    else:
        loss_fn = MultiTaskLoss(spec.num_classes, spec.kind)

    def step():
        logits.grad = None
        loss_fn(logits, labels).backward()
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tasks", TASKS, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("n", SIZES)
def test_loss_forward_backward(benchmark, device, n, tasks, kind, impl):
    if impl == "noop" and n != 128:
        pytest.skip("the do-nothing floor is the per-call cost: measured at N = 128")
    if impl == "graph" and device != "cuda":
        pytest.skip("a CUDA-graph replay of the mtkernels step is a CUDA row")
    spec = loss_spec(tasks, kind)
    logits, labels = make_inputs(n, tasks, device)
    rounds = 400 if n <= 1024 else 20
    measure(benchmark, step_fn(impl, logits, labels, spec), device, SUITE, rounds=rounds, warmup=5,
            n=n, tasks="x".join(map(str, tasks)), kind=kind, impl=impl)


@pytest.mark.parametrize("impl", ["eager", "mtkernels"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("classes", WIDE_CLASSES)
def test_one_wide_task(benchmark, device, classes, dtype, impl):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(WIDE_ROWS, classes, generator=g).to(device=device, dtype=getattr(torch, dtype))
    labels = torch.randint(0, classes, (WIDE_ROWS, 1), generator=g).to(device)
    logits.requires_grad_()
    crit = MultiTaskLoss((classes,), reduction="sum")
    loss_fn = ((lambda: F.cross_entropy(logits, labels[:, 0], ignore_index=-1, reduction="sum")) if impl == "eager"
               else (lambda: crit(logits, labels)))

    def step():
        logits.grad = None
        loss_fn().backward()
    measure(benchmark, step, device, SUITE, rounds=5 if classes > 8192 else 10, warmup=2, n=WIDE_ROWS,
            tasks=str(classes), kind=f"ce {dtype}", impl=impl)


@register_report(SUITE)
def report(device, measurements):
    cases = {}
    for m in measurements:
        cases.setdefault((m["n"], m["tasks"], m["kind"]), {})[m["impl"]] = m["seconds"]
    rows = []
    for (n, tasks, kind), t in sorted(cases.items()):
        row = dict(N=n, tasks=tasks, kind=kind)
        for impl in IMPLS:
            if impl in t:
                row[f"{impl} us"] = f"{t[impl] * 1e6:.1f}"
        if "mtkernels" in t:
            for base in ("eager", "compiled"):
                if base in t:
                    row[f"vs {base}"] = f"{t[base] / t['mtkernels']:.2f}x"
            if "copy" in t:
                row["mtkernels / copy"] = f"{t['mtkernels'] / t['copy']:.2f}"
            if "noop" in t:
                row["mtkernels / noop"] = f"{t['mtkernels'] / t['noop']:.2f}"
        rows.append(row)
    columns = ["N", "tasks", "kind"] + [f"{i} us" for i in IMPLS] + ["vs eager", "vs compiled", "mtkernels / copy",
                                                                       "mtkernels / noop"]
    notes = ("Forward + backward of the masked multi-task loss, median per call. 'vs X' = time of X / time "
             "of mtkernels (higher is better); 'mtkernels / copy' = time of mtkernels / time of one copy of "
             "the logits into a gradient-sized buffer (lower is better); 'mtkernels / noop' = its time over a "
             "do-nothing autograd.Function's (forward + backward); 'graph' (CUDA) = the mtkernels step captured "
             "once in a CUDA graph and replayed. 30% of labels are -1. Rows 'ce float32' / "
             "'ce bfloat16': one task of that many classes, every row labelled, reduction 'sum', where 'eager' is "
             "F.cross_entropy(ignore_index=-1) in the same dtype.")
    path = write_table(SUITE, device, rows, columns, f"Multi-task loss, {device}", notes)
    categories = [f"N={r['N']}\n{r['tasks']} {r['kind']}" for r in rows]
    series = {impl: [float(r.get(f"{impl} us", "nan")) for r in rows] for impl in IMPLS}
    save_bar_chart(RESULTS_DIR / f"{SUITE}-{device}.png", [("", categories, series)],
                   "forward + backward, us (log)", f"Multi-task loss on {device}", log=True)
    return path
