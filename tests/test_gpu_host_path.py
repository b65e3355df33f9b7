"""The CUDA branch of the public API, driven on a machine without a GPU: each check runs in a
subprocess under Triton's interpreter with ``mtkernels.device_path.cpu_tensors_take_cuda_path``,
so CPU tensors take the CUDA branch (its launch parameters, device tables, dtype handling and
autograd glue) and the Triton kernels run interpreted. Each result is compared with the CPU
path, and each check asserts that the Triton launchers really ran."""

import contextlib
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from test_fuse import randomise_batchnorm
from torch import nn
from triton_checks import run_under_interpreter

import models
import mtkernels
from models.common import MultiTaskNet, fc_branch, init_he
from models.resnet import head_pool, stage
from mtkernels.device_path import cpu_tensors_take_cuda_path

pytestmark = pytest.mark.gpu_host_path

SIZES = (2, 7, 2)
WEIGHTS = (2.0, 0.1, 1.5)
DTYPES = ("float32", "float16", "bfloat16")


@contextlib.contextmanager
def cuda_path_launches():
    """Within the block CPU tensors take the CUDA branch; yields a Counter of the Triton
    launchers called."""
    import mtkernels.triton.conv as conv_module
    import mtkernels.triton.multitask_loss as loss_module

    assert os.environ.get("TRITON_INTERPRET") == "1"
    calls: Counter = Counter()
    originals = {(m, name): getattr(m, name) for m, name in ((loss_module, "multitask_loss_forward"),
                                                              (conv_module, "conv2d_bias_act"),
                                                              (conv_module, "linear_bias_act"))}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    for (module, name), fn in originals.items():
        setattr(module, name, counted(name, fn))
    try:
        with cpu_tensors_take_cuda_path():
            yield calls
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def batch(n, dtype, seed=0, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, sum(sizes), generator=g) * 3).to(dtype)
    labels = torch.stack([torch.randint(0, c, (n,), generator=g) for c in sizes], 1)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -1
    return logits, labels


def loss_and_grad(logits, labels, upstream=None, **kw):
    x = logits.clone().requires_grad_()
    loss = mtkernels.multitask_loss(x, labels, **kw)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), grad


def assert_matches_cpu_path(got, want, dtype, logits):
    """Both paths compute in float32 and round the gradient once to ``dtype``. In float32,
    z - lse carries an absolute error of a few ulps of max |z| in each path, which the exp
    turns into that relative error of every gradient entry; then one rounding to ``dtype``
    may land either side: one ulp of ``dtype`` at the largest gradient's binade, whose top
    (the next power of two) is where two values straddling it differ most (63.5 against 64.0
    in bfloat16 was eps times 64, over eps times the largest |gradient|, 63.0)."""
    (loss, grad), (want_loss, want_grad) = got, want
    assert loss.dtype == want_loss.dtype and grad.dtype == want_grad.dtype == dtype
    finite = logits[torch.isfinite(logits)].abs()
    float32_error = 4 * torch.finfo(torch.float32).eps * (1 + (finite.max().item() if finite.numel() else 0))
    torch.testing.assert_close(loss, want_loss, rtol=float32_error, atol=1e-6, equal_nan=True)
    largest = want_grad[torch.isfinite(want_grad)].abs().max().item()
    binade_top = 2.0 ** math.ceil(math.log2(largest)) if largest > 0 else 0.0
    bound = float32_error * largest + torch.finfo(dtype).eps * binade_top
    torch.testing.assert_close(grad.double(), want_grad.double(), rtol=0, atol=bound, equal_nan=True)


# --- the loss ------------------------------------------------------------------------------------

def check_loss_every_reduction_and_dtype(kind):
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        for reduction in ("mean", "sum", "none"):
            logits, labels = batch(37, dtype, seed=len(reduction))
            upstream = (torch.rand(37, 3, generator=torch.Generator().manual_seed(1)) if reduction == "none"
                        else None)
            kw = dict(num_classes=SIZES, kind=kind, task_weights=WEIGHTS, reduction=reduction, margin=0.5)
            want = loss_and_grad(logits, labels, upstream, **kw)
            with cuda_path_launches() as calls:
                got = loss_and_grad(logits, labels, upstream, **kw)
            assert calls["multitask_loss_forward"] == 1, (dtype_name, reduction, calls)
            assert_matches_cpu_path(got, want, dtype, logits)


@pytest.mark.parametrize("kind", ["ce", "svm"])
def test_loss_every_reduction_and_dtype(kind):
    run_under_interpreter("test_gpu_host_path", "check_loss_every_reduction_and_dtype", kind)


def check_loss_module_list_and_strided_logits():
    crit = mtkernels.MultiTaskLoss(SIZES, task_weights=WEIGHTS)
    logits, labels = batch(20, torch.float32)
    wide = torch.zeros(20, 16)
    wide[:, 3:14] = logits
    strided = wide[:, 3:14]  # row stride 16: read in place
    parts = list(logits.split(SIZES, dim=1))
    want = crit(logits, labels)
    with cuda_path_launches() as calls:
        got_strided, got_parts = crit(strided, labels), crit(parts, labels)
    assert calls["multitask_loss_forward"] == 2
    torch.testing.assert_close(got_strided, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_parts, want, rtol=1e-6, atol=0)


def test_loss_module_list_and_strided_logits():
    run_under_interpreter("test_gpu_host_path", "check_loss_module_list_and_strided_logits")


def check_loss_empty_batch():
    for reduction in ("mean", "sum", "none"):
        logits, labels = torch.zeros(0, 11, requires_grad=True), torch.zeros(0, 3, dtype=torch.int64)
        with cuda_path_launches():
            loss = mtkernels.multitask_loss(logits, labels, SIZES, reduction=reduction)
            loss.sum().backward()
        assert loss.shape == ((0, 3) if reduction == "none" else ())
        assert loss.sum().item() == 0.0 and logits.grad.shape == (0, 11)


def test_loss_empty_batch():
    run_under_interpreter("test_gpu_host_path", "check_loss_empty_batch")


def check_loss_out_of_range_labels():
    logits, labels = batch(9, torch.float32)
    bad = labels.clone()
    bad[4, 1] = 7  # task 1 has 7 classes
    masked = bad.clone()
    masked[4, 1] = -1
    with cuda_path_launches():
        unchecked = mtkernels.multitask_loss(logits, bad, SIZES)  # CUDA default: no host sync, treated as -1
        with pytest.raises(ValueError, match="7"):
            mtkernels.multitask_loss(logits, bad, SIZES, validate=True)
    torch.testing.assert_close(unchecked, mtkernels.multitask_loss(logits, masked, SIZES), rtol=1e-6, atol=0)


def test_loss_out_of_range_labels():
    run_under_interpreter("test_gpu_host_path", "check_loss_out_of_range_labels")


def check_loss_non_finite_and_retained_backward():
    logits, labels = batch(6, torch.float32)
    labels[2] = torch.tensor([1, 3, 0])
    logits[2, 4] = float("nan")  # a labelled row of task 1
    logits[5] = float("inf")
    labels[5] = -1  # unlabelled: contributes exactly 0
    want = loss_and_grad(logits, labels, num_classes=SIZES)
    x = logits.clone().requires_grad_()
    with cuda_path_launches():
        loss = mtkernels.multitask_loss(x, labels, SIZES)
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        x.grad = None
        loss.backward()  # recomputed from the saved logits
    assert torch.isnan(loss) and torch.isnan(want[0])
    assert torch.equal(torch.isnan(first), torch.isnan(want[1])) and torch.isnan(first[2, 2:9]).all()
    torch.testing.assert_close(x.grad, first, equal_nan=True)
    assert_matches_cpu_path((loss.detach(), first), want, torch.float32, logits)


def test_loss_non_finite_and_retained_backward():
    run_under_interpreter("test_gpu_host_path", "check_loss_non_finite_and_retained_backward")


def check_loss_custom_op():
    from mtkernels.ops.multitask_loss import multitask_loss_op

    logits, labels = batch(13, torch.float32)
    args = (logits.requires_grad_(), labels, list(SIZES), list(WEIGHTS), "ce", 1.0, "mean", True, False)
    want_loss, want_grad = multitask_loss_op(*args)
    with cuda_path_launches() as calls:
        loss, grad = multitask_loss_op(*args)
        torch.library.opcheck(multitask_loss_op, args, test_utils=("test_schema", "test_autograd_registration",
                                                                    "test_faketensor"))
    assert calls["multitask_loss_forward"] >= 1
    assert_matches_cpu_path((loss, grad), (want_loss, want_grad), torch.float32, logits)


def test_loss_custom_op():
    run_under_interpreter("test_gpu_host_path", "check_loss_custom_op")


# --- fused inference -----------------------------------------------------------------------------

class NarrowResNet(MultiTaskNet):
    """The ResNets' blocks (pre-activation bottlenecks: 1x1 convs, a strided 3x3, 1x1 shortcut
    convs) at widths below 64 channels and 16x16 input, so the interpreter runs them in seconds.
    ``version`` 1: shared stages and MLP heads; 2: a stage per task."""

    def __init__(self, version: int):
        tasks = {"smile": ("no", "yes"), "emotion": tuple("abcdefg"), "gender": ("f", "m")}
        trunk = [nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.MaxPool2d(2, 2), stage(16, 4, 2, 1)]
        if version == 1:
            trunk += [stage(16, 8, 1, 2), *head_pool(32)]
            branches = [fc_branch(32, (24,), len(c), 0.5) for c in tasks.values()]
        else:
            branches = [nn.Sequential(stage(16, 8, 1, 2), *head_pool(32), nn.Linear(32, len(c)))
                        for c in tasks.values()]
        super().__init__(tasks, nn.Sequential(*trunk), branches, input_size=16)
        init_he(self)


NETWORKS = {
    "bknet": lambda: models.MultiTaskBKNet(input_size=16),
    "resnet-v1-narrow": lambda: NarrowResNet(1),
    "resnet-v2-narrow": lambda: NarrowResNet(2),
    "four-task-cnn": lambda: models.FourTaskCNN(input_size=10),
}


def check_fused_network(name):
    torch.manual_seed(0)
    model = randomise_batchnorm(NETWORKS[name]()).eval()
    fused = mtkernels.fuse_for_inference(model)
    x = torch.randn(3, 1, model.input_size, model.input_size)
    with torch.no_grad():
        want = fused(x)  # the CPU path
        with cuda_path_launches() as calls:
            got = fused(x)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert calls["conv2d_bias_act"] == convs and calls["linear_bias_act"] >= 1, calls
    # The interpreter multiplies in float32 as the CPU does: only summation order differs.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_fused_network(name):
    run_under_interpreter("test_gpu_host_path", "check_fused_network", name)


def check_half_precision_kept_end_to_end(dtype_name):
    """fp16 / bf16 input stays in that dtype through every fused layer (the conv, linear and
    affine + ReLU layers convert their parameters, never the activations). In fp16 the result
    is no further from float64 than eager PyTorch in the same dtype, plus one rounding. Not in
    bf16: Triton's interpreter has no bf16 arithmetic and multiplies in ``tl.dot`` what it stores
    (a 4-channel 5x5 conv came out 4.5e10 off), so the bf16 numbers are checked on a GPU
    (test_fuse.py::test_cuda_fused_equals_eager, run by bench/gpu_check.sh)."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = randomise_batchnorm(NarrowResNet(1)).eval()
    fused = mtkernels.fuse_for_inference(model)
    x = torch.randn(3, 1, 16, 16)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append((type(m).__name__, o.dtype)))
             for m in fused.modules() if not list(m.children())]
    with torch.no_grad(), cuda_path_launches():
        got = fused(x.to(dtype))
    for h in hooks:
        h.remove()
    assert got.dtype == dtype and outputs and all(d == dtype for _, d in outputs), outputs
    if dtype == torch.bfloat16:
        return
    with torch.no_grad():
        exact = model.double()(x.double())
        eager = model.to(dtype)(x.to(dtype)).double()
    eager_error = (eager - exact).abs().max().item()
    got_error = (got.double() - exact).abs().max().item()
    assert got_error <= 2 * eager_error + torch.finfo(dtype).eps * exact.abs().max().item(), (got_error, eager_error)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_kept_end_to_end(dtype):
    run_under_interpreter("test_gpu_host_path", "check_half_precision_kept_end_to_end", dtype)


def check_bf16_precision_on_the_cuda_path():
    """fuse_for_inference(precision="bf16") on the CUDA branch: float32 input is converted once,
    every fused layer runs in bf16 (the Triton kernels launched), and the logits come back
    float32; a NaN image is flagged. (Dtypes only: see check_half_precision_kept_end_to_end.)"""
    torch.manual_seed(0)
    model = randomise_batchnorm(NarrowResNet(2)).eval()
    fused = mtkernels.fuse_for_inference(model, precision="bf16")
    x = torch.randn(3, 1, 16, 16)
    x[1, 0, 2, 2] = float("nan")
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append((type(m).__name__, o.dtype)))
             for m in fused.modules() if not list(m.children())]
    with torch.no_grad(), cuda_path_launches():
        got = fused(x)
    for h in hooks:
        h.remove()
    assert got.dtype == torch.float32 and outputs and all(d == torch.bfloat16 for _, d in outputs), outputs
    assert torch.isnan(got[1]).all()
    with pytest.raises(TypeError, match="not supported"), cpu_tensors_take_cuda_path():
        fused(x.bfloat16())


def test_bf16_precision_on_the_cuda_path():
    run_under_interpreter("test_gpu_host_path", "check_bf16_precision_on_the_cuda_path")


# --- the trainer ---------------------------------------------------------------------------------

def check_trainer_cuda_step(out_dir):
    """The trainer's step on its CUDA branch (model left unfused, the Triton loss) and on its CPU
    branch without layer fusion, one batch of 48: the same loss and updated weights. (Over more
    steps the two drift apart as any two float32 summation orders do: the loss gradients agree
    to 1e-6 relative, yet the mean loss of three steps of 16 differed by 1e-3.)"""
    from pathlib import Path

    from models.checkpoint import load_checkpoint
    from models.data import merge_sources
    from models.train import config_by_name, train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 48, 48), dtype=np.uint8)
    dataset = merge_sources([("fer2013", images, {"emotion": rng.integers(0, 7, 24)}),
                             ("wiki", images, {"gender": rng.integers(0, 2, 24)})], ("smile", "emotion", "gender"))
    config = config_by_name("B4").replace(epochs=1, batch_size=48)
    want = train(config, dataset, Path(out_dir) / "cpu", progress=False, fuse_layers=False)
    with cuda_path_launches() as calls:
        got = train(config, dataset, Path(out_dir) / "cuda-path", progress=False)
    assert len(dataset) == 48 and calls["multitask_loss_forward"] == 1
    assert len(got.history) == len(want.history) == 1
    for g, w in zip(got.history, want.history):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
    got_weights, want_weights = (load_checkpoint(r.checkpoints[-1])["model"] for r in (got, want))
    assert got_weights.keys() == want_weights.keys()
    for name, w in want_weights.items():
        torch.testing.assert_close(got_weights[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_cuda_step(tmp_path):
    run_under_interpreter("test_gpu_host_path", "check_trainer_cuda_step", str(tmp_path))


def test_switch_refuses_without_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the interpreter")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with cpu_tensors_take_cuda_path():
            pass
