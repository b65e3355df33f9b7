"""fuse_for_training(precision="bf16"): every layer's forward, input gradient and weight
gradient inside one SGD step of BKNet and ResNet ver1 / ver2 against float64 within a
derived bfloat16 bound; the bfloat16 BatchNorm + ReLU kernels per ISA; state_dict, resume
and torch.compile; 200 SGD steps on real faces beside float32; bad arguments.

The bound. A layer receives x (bfloat16, or float32 for the first layer, which rounds it)
and computes from w rounded to bfloat16: each operand carries a relative error of at most
u = 2^-8 (bfloat16's unit roundoff), so each product |x w| one of 2u + u^2. The products
of two bfloat16 values are exact in float32, and oneDNN accumulates them in float32: K
additions in any order add at most gamma_K = K eps / (1 - K eps) (eps = 2^-24) of the sum
of the |terms|. The result is rounded to bfloat16 once more (u of itself). So with
A = the layer applied to |x| and |w| (for a gradient, to |x| and |dy|, or |dy| and |w|):

    |out - out_64| <= c A + u (|out_64| + c A),   c = 2u + u^2 + gamma_K (1 + u)^2,

K being the length of the dot products: C_in KH KW for the forward, C_out KH KW for the
input gradient, N OH OW for the weight gradient. out_64 is the float64 layer on the
same x and dy and the float32 w. The incoming gradient dy is what the bfloat16 run
produced, so each layer is checked on its own, in the network, at its real shapes.

A conv run by mtkernels' bf16 Winograd kernel (forward and input gradient) rounds its
transformed operands instead: tests/test_conv_winograd_bf16.py derives that bound, here with
the weight rounded twice (to bfloat16, then its transform: 2u + u^2) and the output once more.
Its weight gradient, Winograd's too, has the bound derived there (winograd_weight_grad_bound),
its output rounded once more.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_conv_winograd_bf16 import winograd_error_bound, winograd_weight_grad_bound

import models
import mtkernels
from models.export import calibration_faces
from mtkernels import BatchNormReLU2d, BatchNormReLUPool2d, TrainingConv2d, TrainingLinear
from mtkernels import training as training_module

U = 2.0 ** -8
EPS32 = 2.0 ** -24
needs_bf16 = pytest.mark.skipif(not training_module.native_bf16(),
                                reason="this CPU has no bfloat16 unit: precision='bf16' trains in float32 here")


def gamma(k: int) -> float:
    return k * EPS32 / (1.0 - k * EPS32)


def product_bound(magnitude: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    c = 2 * U + U * U + gamma(k) * (1 + U) ** 2
    return c * magnitude + U * (reference.abs() + c * magnitude)


def assert_within(name: str, got: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> float:
    """Asserts |got - reference| <= bound everywhere; returns how much of the bound the
    worst element used."""
    err = (got.double() - reference).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (f"{name}: error {err.flatten()[worst].item():.3g} above its bound "
                                        f"{bound.flatten()[worst].item():.3g} (reference "
                                        f"{reference.flatten()[worst].item():.3g})")
    return float((err / bound.clamp_min(1e-300)).max().detach())


def winograd_bound(x_abs: torch.Tensor, w_abs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The bound of a bf16 Winograd conv (no bias) of bfloat16 input magnitudes ``x_abs`` with
    the float32 weight's ``w_abs``, rounded to bfloat16: the weight is rounded to bfloat16, its
    transform computed in float32 (exact products, two stages of sums of at most three terms:
    gamma_4) and rounded again (2u + u^2 + gamma_4 (1 + u)^2 of the transform of |w|), the
    output once more (u)."""
    before_rounding = winograd_error_bound(x_abs, w_abs, 2 * U + U * U + gamma(4) * (1 + U) ** 2)
    return before_rounding + U * (reference.abs() + before_rounding)


def check_conv(name, conv: TrainingConv2d, x, y, dy, dx):
    x64, w64 = x.double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    geometry = dict(stride=conv.stride, padding=conv.padding)
    y64 = F.conv2d(x64, w64, None, **geometry)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    ax, aw, ady = x64.detach().abs(), w64.detach().abs(), dy.double().abs()
    c_out, c_in, kh, kw = conv.weight.shape
    winograd = "winograd_bf16" in conv.__dict__.get("_chosen_algorithms", {}).values()
    forward_bound = (winograd_bound(ax, aw, y64) if winograd
                     else product_bound(F.conv2d(ax, aw, None, **geometry), y64, c_in * kh * kw))
    assert_within(f"{name} forward", y, y64, forward_bound)
    if winograd:  # the kernel's float32 sums reach the float32 weight unrounded
        weight_bound = winograd_weight_grad_bound(ax, ady)
    else:
        weight_bound = product_bound(torch.nn.grad.conv2d_weight(ax, conv.weight.shape, ady, **geometry), dw64,
                                     dy[:, 0].numel())
    assert_within(f"{name} weight gradient", conv.weight.grad, dw64, weight_bound)
    if dx is not None:
        input_bound = (winograd_bound(ady, aw.transpose(0, 1).flip(2, 3), dx64) if winograd
                       else product_bound(torch.nn.grad.conv2d_input(x.shape, aw, ady, **geometry), dx64,
                                          c_out * kh * kw))
        assert_within(f"{name} input gradient", dx, dx64, input_bound)
    return winograd


def check_linear(name, linear: TrainingLinear, x, y, dy, dx):
    x64, w64 = x.double().requires_grad_(), linear.weight.detach().double().requires_grad_()
    b64 = None if linear.bias is None else linear.bias.detach().double().requires_grad_()
    y64 = F.linear(x64, w64, b64)
    grads = torch.autograd.grad(y64, [t for t in (x64, w64, b64) if t is not None], dy.double())
    ax, aw, ady = x64.detach().abs(), w64.detach().abs(), dy.double().abs()
    magnitude = ax @ aw.t() + (0 if b64 is None else b64.detach().abs())
    assert_within(f"{name} forward", y, y64, product_bound(magnitude, y64, linear.in_features + 1))
    assert_within(f"{name} weight gradient", linear.weight.grad, grads[1],
                  product_bound(ady.t() @ ax, grads[1], x.shape[0]))
    if b64 is not None:
        assert_within(f"{name} bias gradient", linear.bias.grad, grads[2],
                      product_bound(ady.sum(0), grads[2], x.shape[0]))
    if dx is not None:
        assert_within(f"{name} input gradient", dx, grads[0], product_bound(ady @ aw, grads[0], linear.out_features))


def bn_relu_reference(x, dy, weight, bias, eps, pool=False):
    """float64 BatchNorm (batch statistics) + ReLU (+ 2x2 max-pool with ``pool``) of
    bfloat16 x, its input gradient for dy, and the bounds of the bfloat16 kernels' results.
    The kernels compute in float32 from double statistics: y = relu(x scale + shift), dx =
    p g + q - s x (g = dy where the ReLU passed), each a few float32 roundings (5 eps of the
    |terms|, coefficients included), then rounded to bfloat16 (u of itself). The centred
    input x - mean of the reduction is float32: eps |x - mean| per term, which moves s and q
    by at most the last term of dx's bound. Where the float64 pre-activation is within
    float32's error of 0 the mask may differ (bfloat16 inputs do land exactly on the mean):
    such an element's own dx may be off by |p dy|, and it moves its channel's two
    reductions, so every dx of the channel by p (its |dy| / rows + invstd^2 |x - mean|
    |dy (x_i - mean)| / rows). The pool: a max moves by at most the largest error of its
    window's values, and where another value of the window lies within the two values'
    bounds of the float64 maximum, the window's gradient may go to either: each such value
    is ambiguous as above, with the window's |dy|."""
    x64 = x.double().requires_grad_()
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    y64 = F.relu(F.batch_norm(x64, None, None, weight.double(), bias.double(), True, 0.0, eps))
    out64 = F.max_pool2d(y64, 2, 2) if pool else y64
    dx64, dy_full = torch.autograd.grad(out64, (x64, y64), dy.double())
    xd = x.double()
    mean, var = xd.mean(dims), xd.var(dims, unbiased=False)
    invstd = torch.rsqrt(var + eps)
    scale = (weight.double() * invstd).view(shape)
    shift = bias.double().view(shape) - mean.view(shape) * scale
    pre = xd * scale + shift
    pre_err = 5 * EPS32 * ((xd * scale).abs() + shift.abs() + (mean.view(shape) * scale).abs())
    y_bound = U * y64.detach().abs() + (1 + U) * pre_err
    g = torch.where(pre > 0, dy_full, 0.0)
    centred = (xd - mean.view(shape)).abs()
    rows = x.numel() // x.shape[1]
    p = scale
    k = invstd ** 2 * (g * (xd - mean.view(shape))).sum(dims) / rows
    q, s = p * (k * mean - g.sum(dims) / rows).view(shape), p * k.view(shape)
    k_err = (invstd ** 2 * EPS32 * (g.abs() * centred).sum(dims) / rows).view(shape)
    dx_err = 5 * EPS32 * ((p * g).abs() + q.abs() + (s * xd).abs()) + 2 * p.abs() * k_err * centred
    ambiguous = torch.where(pre.abs() <= pre_err, dy_full.abs(), 0.0)
    if pool:
        ambiguous = ambiguous + ambiguous_routing(y64.detach(), y_bound, dy.double())
        y_bound = F.max_pool2d(y_bound, 2, 2)
    mask_err = ambiguous.sum(dims).view(shape) / rows + invstd.view(shape) ** 2 * centred * (
        ambiguous * centred).sum(dims).view(shape) / rows
    dx_err = dx_err + p.abs() * (ambiguous + mask_err)
    dx_bound = U * dx64.abs() + (1 + U) * dx_err
    return out64.detach(), y_bound, dx64, dx_bound


def ambiguous_routing(y64, y_bound, dy_pooled):
    """|dy| of its window at each value of a 2x2 window whose maximum could be another
    value than float64's: every value within its own and the maximum's bound of the
    maximum, in windows with two or more such values."""
    n, c, h, w = y64.shape
    windows = y64[:, :, :h // 2 * 2, :w // 2 * 2].unfold(2, 2, 2).unfold(3, 2, 2)    # [N, C, OH, OW, 2, 2]
    bounds = y_bound[:, :, :h // 2 * 2, :w // 2 * 2].unfold(2, 2, 2).unfold(3, 2, 2)
    top = windows.amax((-1, -2), keepdim=True)
    at_top = bounds.flatten(-2).gather(-1, windows.flatten(-2).argmax(-1, keepdim=True)).unsqueeze(-1)
    candidates = windows >= top - bounds - at_top
    contested = candidates & (candidates.sum((-1, -2), keepdim=True) > 1)
    per_value = torch.where(contested, dy_pooled.abs()[..., None, None], 0.0)
    full = torch.zeros_like(y64)
    full[:, :, :h // 2 * 2, :w // 2 * 2] = per_value.permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2 * 2, w // 2 * 2)
    return full


def check_bn_relu(name, bn: BatchNormReLU2d, x, y, dy, dx):
    y64, y_bound, dx64, dx_bound = bn_relu_reference(x, dy, bn.weight.detach(), bn.bias.detach(), bn.eps,
                                                     pool=isinstance(bn, BatchNormReLUPool2d))
    assert_within(f"{name} forward", y, y64, y_bound)
    assert_within(f"{name} input gradient", dx, dx64, dx_bound)


CHECKS = {TrainingConv2d: check_conv, TrainingLinear: check_linear, BatchNormReLU2d: check_bn_relu,
          BatchNormReLUPool2d: check_bn_relu}


def bf16_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.build_model(name).train()
    return mtkernels.fuse_for_training(model, precision="bf16").to(memory_format=torch.channels_last)


def face_batch(model, n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = calibration_faces(model.input_size, n).contiguous(memory_format=torch.channels_last)
    labels = torch.stack([torch.randint(0, c, (n,), generator=generator) for c in model.num_classes], 1)
    return x, labels


def force_winograd(monkeypatch, tmp_path) -> None:
    """Every conv that the bf16 Winograd kernel takes runs it (the timing left out)."""
    from mtkernels.fuse import tuning

    monkeypatch.setattr(tuning, "_CACHE", tuning.TuningCache(tmp_path))
    monkeypatch.setattr(tuning, "fastest", lambda candidates, x, **kw: "winograd_bf16"
                        if "winograd_bf16" in candidates else next(iter(candidates)))


# Winograd: every conv that the bf16 Winograd kernel takes runs it (at batch 8 the timing picks
# it for few layers): BKNet's eight convs after the first, the ResNets' 3x3 convs on even maps.
WINOGRAD_CONVS = {"bknet": 8, "resnet-v1": 11, "resnet-v2": 11}


@needs_bf16
@pytest.mark.parametrize("winograd", [False, True], ids=["timed", "winograd"])
@pytest.mark.parametrize("name", ["bknet", "resnet-v1", "resnet-v2"])
def test_one_step_per_layer_within_the_bf16_bound(name, winograd, monkeypatch, tmp_path):
    if winograd:
        force_winograd(monkeypatch, tmp_path)
    model = bf16_model(name)
    x, labels = face_batch(model, 8)
    records, handles = {}, []

    def forward_hook(module, inputs, output):
        records[module] = {"x": inputs[0].detach(), "y": output.detach()}

    def backward_hook(module, grad_input, grad_output):
        records[module].update(dy=grad_output[0], dx=grad_input[0])

    for module in model.modules():
        if type(module) in CHECKS:
            handles += [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]
    logits = model(x)
    assert logits.dtype == torch.float32
    mtkernels.MultiTaskLoss(model.num_classes)(logits, labels).backward()
    for h in handles:
        h.remove()
    names = {module: n for n, module in model.named_modules()}
    kinds = {kind: 0 for kind in CHECKS}
    winograd_convs = 0
    for module, r in records.items():
        assert r["y"].dtype == torch.bfloat16 and r["dy"].dtype == torch.bfloat16, names[module]
        winograd_convs += bool(CHECKS[type(module)](names[module], module, r["x"], r["y"], r["dy"], r["dx"]))
        kinds[type(module)] += 1
    if winograd:
        assert winograd_convs == WINOGRAD_CONVS[name]
    kinds = {kind: count for kind, count in kinds.items() if kind is not BatchNormReLUPool2d or name == "bknet"}
    assert all(kinds.values()), kinds  # convs, linear layers and BatchNorm + ReLU (+ pool) were all checked
    for p in model.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)


def test_bound_catches_bfloat16_accumulation():
    """The characteristic bf16-kernel mistake, accumulating in bfloat16 instead of float32,
    lies outside the bound, while oneDNN's bf16 convolution lies inside it."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 12, 12).bfloat16().to(memory_format=torch.channels_last)
    w = torch.randn(32, 32, 3, 3)
    y64 = F.conv2d(x.double(), w.double(), padding=1)
    bound = product_bound(F.conv2d(x.double().abs(), w.double().abs(), padding=1), y64, 32 * 9)
    cols = F.unfold(x.float(), 3, padding=1)                           # [N, C * 9, pixels]
    products = w.bfloat16().float().view(32, -1)[None, :, :, None] * cols[:, None]  # exact in float32
    accumulated = torch.zeros(4, 32, 144, dtype=torch.bfloat16)
    for k in range(products.shape[2]):
        accumulated = (accumulated.float() + products[:, :, k]).bfloat16()
    with pytest.raises(AssertionError, match="above its bound"):
        assert_within("bfloat16 accumulation", accumulated.view(y64.shape), y64, bound)
    assert_within("oneDNN bf16", F.conv2d(x, w.bfloat16(), padding=1), y64, bound)


@needs_bf16
@pytest.mark.parametrize("shape, pool", [((64, 48), False), ((16, 32, 12, 12), False), ((8, 96, 5, 7), False),
                                         ((16, 32, 12, 12), True), ((8, 96, 5, 7), True)])
def test_batchnorm_relu_bf16_kernels_per_isa(isa, shape, pool):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 1).bfloat16()
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    xg = x.clone().requires_grad_()
    y, mean, var = torch.ops.mtkernels.batchnorm_relu(xg, weight, bias, 1e-5, pool)
    assert y.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    dy = torch.randn(y.shape).bfloat16()
    dx, = torch.autograd.grad(y, xg, dy)
    assert dx.dtype == torch.bfloat16
    y64, y_bound, dx64, dx_bound = bn_relu_reference(x, dy, weight, bias, 1e-5, pool)
    assert_within(f"{isa} forward", y, y64, y_bound)
    assert_within(f"{isa} input gradient", dx, dx64, dx_bound)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean.double(), x.double().mean(dims), rtol=0, atol=1e-6)


def test_batchnorm_relu_bf16_propagates_nan_and_inf():
    x = torch.randn(16, 8).bfloat16()
    x[3, 2], x[5, 4] = float("nan"), float("inf")
    y, mean, var = torch.ops.mtkernels.batchnorm_relu(x, torch.ones(8), torch.zeros(8), 1e-5)
    ref = F.relu(F.batch_norm(x.float(), None, None, torch.ones(8), torch.zeros(8), True, 0.0, 1e-5))
    assert torch.equal(y.float().isnan(), ref.isnan())
    torch.testing.assert_close(mean, x.float().mean(0), equal_nan=True)  # nan in channel 2, inf in 4


@needs_bf16
def test_state_dict_round_trip_is_exact_and_unchanged_in_bf16():
    plain = models.build_model("bknet")
    model = bf16_model("bknet")
    state = model.state_dict()
    assert {k: (v.dtype, v.shape) for k, v in state.items()} == \
        {k: (v.dtype, v.shape) for k, v in plain.state_dict().items()}
    x, labels = face_batch(model, 16)
    model.eval()
    before = model(x)
    again = bf16_model("bknet")
    with torch.no_grad():
        for p in again.parameters():
            p.add_(1.0)
    again.load_state_dict(state)
    again.eval()
    assert torch.equal(again(x), before)


@needs_bf16
@pytest.mark.parametrize("winograd", [False, True], ids=["timed", "winograd"])
def test_torch_compile_fullgraph_traces_a_bf16_step(winograd, monkeypatch, tmp_path):
    """The forward and the fused loss trace as one graph; backward runs through AOT
    autograd; with dropout off (its draws differ between the two), the step matches eager
    bf16 but for rounding (Inductor fuses the elementwise work between the same kernels: the
    trace takes each conv's algorithm that eager timed. Another algorithm's bf16 rounding
    moves this random network's early-layer gradients as far as bf16 itself does, cosine
    0.75-0.89 against float32's)."""
    if winograd:
        force_winograd(monkeypatch, tmp_path)
    model = bf16_model("bknet")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x, labels = face_batch(model, 16)
    crit = mtkernels.MultiTaskLoss(model.num_classes)
    eager = crit(model(x), labels)
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(lambda inp, lab: crit(model(inp), lab), fullgraph=True)
    loss = compiled(x, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), eager.item(), rel_tol=0.02)
    for n, p in model.named_parameters():
        cos = F.cosine_similarity(want[n].flatten(), p.grad.flatten(), dim=0)
        assert cos > 0.99, n


@pytest.mark.precision_long
@needs_bf16
def test_200_sgd_steps_on_real_faces_follow_float32():
    """200 steps of BKNet (paper 1's optimiser) on 64 fixed LFW crops with fixed random
    labels: bf16's mean training loss is within 10% of float32's, and falls as it does."""
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = mtkernels.fuse_for_training(models.build_model("bknet").train(), precision=precision)
        model = model.to(memory_format=torch.channels_last)
        x, labels = face_batch(model, 64, seed=1)
        crit = mtkernels.MultiTaskLoss(model.num_classes)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
        history = []
        for _ in range(200):
            optimiser.zero_grad(set_to_none=True)
            loss = crit(model(x), labels)
            loss.backward()
            optimiser.step()
            history.append(loss.item())
        losses[precision] = torch.tensor(history)
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert abs(bf16.mean() - fp32.mean()) <= 0.1 * fp32.mean(), (bf16.mean(), fp32.mean())
    for curve in (fp32, bf16):
        assert curve[-20:].mean() < 0.5 * curve[:20].mean()


def test_bad_precision_names_the_argument():
    with pytest.raises(ValueError, match="precision must be one of"):
        mtkernels.fuse_for_training(models.build_model("bknet"), precision="fp16")
    with pytest.raises(ValueError, match="float32 model"):
        mtkernels.fuse_for_training(models.build_model("bknet").double(), precision="bf16")


@needs_bf16
def test_bf16_needs_the_training_convs():
    with pytest.raises(ValueError, match="convs=True"):
        mtkernels.fuse_for_training(models.build_model("bknet"), convs=False, precision="bf16")


def test_without_a_bf16_unit_it_warns_once_and_trains_in_float32(monkeypatch):
    monkeypatch.setattr(training_module, "native_bf16", lambda: False)
    monkeypatch.setattr(training_module, "_warned_no_bf16", False)
    with pytest.warns(RuntimeWarning, match="no bfloat16 unit"):
        model = mtkernels.fuse_for_training(models.build_model("bknet"), precision="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mtkernels.fuse_for_training(models.build_model("bknet"), precision="bf16")
    assert all(m.compute_dtype == torch.float32 for m in model.modules() if isinstance(m, TrainingConv2d))


@needs_bf16
@pytest.mark.parametrize("cap", ["AVX512_CORE", "AVX512_CORE_BF16", "AVX512_CORE_AMX"])
def test_per_layer_bound_under_each_onednn_isa(cap):
    """oneDNN picks its bf16 kernels by ISA itself (AVX512_CORE emulates bfloat16 through
    float32, where products are exact too); capped at each, BKNet's per-layer check passes."""
    if cap == "AVX512_CORE_AMX" and not mtkernels._C.cpu_features().get("amx-permitted"):
        pytest.skip("AVX512_CORE_AMX: this CPU (or its OS) offers no AMX tiles")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
    test = f"{__file__}::test_one_step_per_layer_within_the_bf16_bound[bknet-timed]"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
