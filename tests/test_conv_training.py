"""mtkernels::winograd_conv3x3, mtkernels::conv_winograd_bf16 and mtkernels::gemm_conv2d
(mtkernels.ops.conv_training) and the TrainingConv2d that picks between them, against float64
PyTorch convolutions."""

import pytest
import torch
import torch.nn.functional as F
from test_conv import WINOGRAD_RELATIVE_BOUND
from test_conv_winograd_bf16 import gamma, winograd_error_bound

import models
import mtkernels
from mtkernels.fuse import tuning
from mtkernels.ops.conv_training import (
    conv_winograd_bf16,
    conv_winograd_bf16_input_grad,
    conv_winograd_bf16_weight_grad,
    gemm_conv2d,
    gemm_conv2d_col2im,
    gemm_conv2d_im2col,
    winograd_conv3x3,
    winograd_conv3x3_weight_grad,
)
from mtkernels.training import TrainingConv2d, as_training_conv

# A direct convolution's float32 error relative to sum |w| |x| (a GEMM's accumulation order)
DIRECT_RELATIVE_BOUND = 1e-6


def conv_inputs(shape, c_out, kernel, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(memory_format=torch.channels_last)
    weight = torch.randn(c_out, shape[1], kernel, kernel, generator=g)
    return x, weight, torch.randn(c_out, generator=g) if bias else None


def float64_conv_and_bounds(x, weight, bias, grad_y, stride, padding):
    """(y, d x, d weight, d bias) in float64, and the same computed on absolute values: the
    scale each float32 result's rounding error is bounded against."""
    def run(sign):
        x64, w64 = (sign(t.detach().double()).requires_grad_() for t in (x, weight))
        b64 = None if bias is None else sign(bias.double()).requires_grad_()
        y = F.conv2d(x64, w64, b64, stride, padding)
        grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], sign(grad_y.double()))
        return (y, *grads)
    return run(lambda t: t), run(torch.abs)


RESULTS = ("y", "grad_x", "grad_weight", "grad_bias")


def assert_within(got, want, scale, bound, names=RESULTS):
    for name, g, w, s in zip(names, got, want, scale):
        assert g.shape == w.shape, name
        assert ((g.double() - w).abs() <= bound * s + 1e-12).all(), name


def forward_backward(op, x, weight, bias, grad_y_seed=1):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    y = op(x, weight, bias)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_y_seed))
    return (y, *torch.autograd.grad(y, [t for t in (x, weight, bias) if t is not None], grad_y)), grad_y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,c_out", [((2, 64, 6, 6), 64), ((3, 5, 7, 9), 6), ((1, 3, 1, 1), 2),
                                         ((4, 70, 3, 3), 33), ((2, 8, 12, 10), 16)])
def test_winograd_conv_and_gradients_within_error_bound(isa, shape, c_out, bias):
    x, weight, b = conv_inputs(shape, c_out, 3, bias)
    got, grad_y = forward_backward(winograd_conv3x3, x, weight, b)
    want, scale = float64_conv_and_bounds(x, weight, b, grad_y, 1, 1)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[1].shape == x.shape
    # y, d x and d weight are Winograd's; d bias a plain sum
    assert_within(got[:3], want[:3], scale[:3], WINOGRAD_RELATIVE_BOUND)
    assert_within(got[3:], want[3:], scale[3:], DIRECT_RELATIVE_BOUND, RESULTS[3:])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,c_out,kernel,stride,padding", [
    ((3, 16, 3, 3), 24, 1, 1, 0), ((2, 12, 6, 6), 20, 1, 2, 0), ((2, 9, 7, 5), 4, 1, 2, 0),
    ((3, 8, 6, 6), 8, 3, 2, 1), ((2, 6, 3, 3), 5, 3, 1, 1), ((1, 4, 5, 7), 3, 3, 1, 0), ((2, 3, 9, 8), 2, 5, 2, 2)])
def test_gemm_conv_and_gradients_match_float64(shape, c_out, kernel, stride, padding, bias):
    x, weight, b = conv_inputs(shape, c_out, kernel, bias)
    got, grad_y = forward_backward(lambda *a: gemm_conv2d(*a, stride, padding), x, weight, b)
    want, scale = float64_conv_and_bounds(x, weight, b, grad_y, stride, padding)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert_within(got, want, scale, DIRECT_RELATIVE_BOUND)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel,stride,padding", [((2, 16, 3, 3), 3, 1, 1), ((3, 5, 7, 6), 3, 2, 1),
                                                         ((2, 4, 6, 6), 1, 2, 0), ((1, 3, 9, 8), 5, 2, 2)])
def test_im2col_and_col2im_against_unfold_and_fold(isa, dtype, shape, kernel, stride, padding):
    """gemm_conv2d's one-pass copies: im2col equals F.unfold's columns (reordered (ky, kx, c))
    exactly; col2im, its adjoint, equals F.fold in float64 within a float32 sum of the taps
    (at most KH KW terms) rounded once to the dtype."""
    torch.manual_seed(2)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    n, c, h, w = shape
    cols = gemm_conv2d_im2col(x, kernel, kernel, stride, padding)
    unfolded = F.unfold(x.float(), kernel, padding=padding, stride=stride)  # [N, C KH KW, L], (c, ky, kx)
    want = unfolded.view(n, c, kernel * kernel, -1).permute(0, 3, 2, 1).reshape(cols.shape)
    assert cols.dtype == dtype and torch.equal(cols.float(), want)
    grad_cols = torch.randn(cols.shape).to(dtype)
    got = gemm_conv2d_col2im(grad_cols, list(shape), kernel, kernel, stride, padding)
    as_unfolded = grad_cols.double().view(n, -1, kernel * kernel, c).permute(0, 3, 2, 1).reshape(unfolded.shape)
    fold = dict(output_size=(h, w), kernel_size=kernel, padding=padding, stride=stride)
    reference, magnitude = F.fold(as_unfolded, **fold), F.fold(as_unfolded.abs(), **fold)
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    bound = gamma(kernel * kernel) * magnitude
    bound = bound + u * (reference.abs() + bound)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    assert bool(((got.double() - reference).abs() <= bound).all())


def test_im2col_and_col2im_ops_and_bad_arguments():
    x = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.mtkernels.gemm_conv2d_im2col, (x, 3, 3, 2, 1))
    cols = torch.randn(2 * 9, 27).requires_grad_()
    torch.library.opcheck(torch.ops.mtkernels.gemm_conv2d_col2im, (cols, [2, 3, 5, 5], 3, 3, 2, 1))
    with pytest.raises(ValueError, match="does not fit in x of size 2x2"):
        gemm_conv2d_im2col(x[:, :, :2, :2], 3, 3, 1, 0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        gemm_conv2d_im2col(x, 3, 3, 0, 1)
    with pytest.raises(ValueError, match=r"kernel sizes and stride must be >= 1 and padding >= 0, got kernel -1x3"):
        gemm_conv2d_im2col(x, -1, 3, 1, 0)
    with pytest.raises(ValueError, match=r"x's shape must be \[N, C, H, W\]"):
        gemm_conv2d_im2col(x[0], 3, 3, 1, 1)
    with pytest.raises(TypeError, match="x must be a float32 or bfloat16 CPU tensor, got torch.float64"):
        gemm_conv2d_im2col(x.double(), 3, 3, 1, 1)
    with pytest.raises(ValueError, match=r"x's shape must be \[N, C, H, W\] with no negative size, got \[2, 3, 5\]"):
        gemm_conv2d_col2im(cols, [2, 3, 5], 3, 3, 2, 1)
    with pytest.raises(ValueError, match=r"cols must be a float32 or bfloat16 CPU tensor \[18, 27\], got "
                                         r"torch.float32 \(18, 26\)"):
        gemm_conv2d_col2im(cols[:, :26], [2, 3, 5, 5], 3, 3, 2, 1)


def test_opcheck():
    x, weight, bias = conv_inputs((2, 4, 5, 5), 3, 3, True)
    args = (x, weight.requires_grad_(), bias.requires_grad_())
    torch.library.opcheck(torch.ops.mtkernels.winograd_conv3x3, args)
    torch.library.opcheck(torch.ops.mtkernels.gemm_conv2d, (*args, 2, 1))
    torch.library.opcheck(torch.ops.mtkernels.gemm_conv2d, (x, weight[:, :, :1, :1], None, 1, 0))
    grad_y = torch.randn(2, 3, 5, 5).requires_grad_()
    torch.library.opcheck(torch.ops.mtkernels.winograd_conv3x3_input_grad, (grad_y, weight))
    torch.library.opcheck(torch.ops.mtkernels.winograd_conv3x3_weight_grad, (x.clone().requires_grad_(), grad_y))


def test_conv_winograd_bf16_ops():
    """The bf16 Winograd training ops: opcheck (schema, fake tensors, autograd registration);
    the forward and the input gradient against float64 within the kernel's derived bound
    (tests/test_conv_winograd_bf16.py); the weight gradient the bf16 Winograd weight
    gradient's (bounded in tests/test_conv_winograd_bf16.py) rounded to bfloat16, the bias
    gradient the sum of d y."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 6).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(32, 16, 3, 3) / 12).bfloat16().requires_grad_()
    bias = torch.randn(32).bfloat16().requires_grad_()
    torch.library.opcheck(torch.ops.mtkernels.conv_winograd_bf16, (x, weight, bias))
    grad_y = torch.randn(2, 32, 4, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.mtkernels.conv_winograd_bf16_input_grad, (grad_y, weight.detach()))

    y = conv_winograd_bf16(x, weight, bias)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), grad_y)
    x64, w64, dy64 = x.detach().double(), weight.detach().double(), grad_y.double()
    y64 = F.conv2d(x64, w64, bias.detach().double(), padding=1)
    # U of the bfloat16 weight: computed in float32 (exact products, two stages of sums of at
    # most three terms: gamma_4), rounded to bfloat16
    beta = 2.0 ** -8 + gamma(4) * (1 + 2.0 ** -8)
    bound = winograd_error_bound(x64.abs(), w64.abs(), beta) + gamma(5) * bias.detach().double().abs().view(1, -1, 1, 1)
    assert bool(((y.double() - y64).abs() <= bound + 2.0 ** -8 * (y64.abs() + bound)).all())
    dx64 = F.conv_transpose2d(dy64, w64, padding=1)
    bound = winograd_error_bound(dy64.abs(), w64.abs().transpose(0, 1).flip(2, 3), beta)
    assert bool(((dx.double() - dx64).abs() <= bound + 2.0 ** -8 * (dx64.abs() + bound)).all())
    assert torch.equal(dw, conv_winograd_bf16_weight_grad(x.detach(), grad_y).bfloat16())
    assert torch.equal(db, grad_y.double().sum((0, 2, 3)).float().bfloat16())


def test_conv_winograd_bf16_bad_inputs_are_named():
    x, weight = torch.randn(1, 16, 4, 4).bfloat16(), torch.randn(16, 16, 3, 3).bfloat16()
    with pytest.raises(TypeError, match="x must be a bfloat16 CPU tensor"):
        conv_winograd_bf16(x.float(), weight, None)
    with pytest.raises(ValueError, match=r"must have C_in and C_out multiples of 16 and an even H and W, got "
                                         r"\(1, 16, 5, 4\)"):
        conv_winograd_bf16(torch.randn(1, 16, 5, 4).bfloat16(), weight, None)
    with pytest.raises(ValueError, match="must have C_in and C_out multiples of 16"):
        conv_winograd_bf16(x[:, :8], weight[:, :8], None)
    with pytest.raises(ValueError, match=r"bias must be None or a float32 or bfloat16 tensor of shape \(16,\), got "
                                         r"torch.float64 \(16,\)"):
        conv_winograd_bf16(x, weight, torch.zeros(16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"weight must be a float32 or bfloat16 CPU tensor \[C_out, 16, KH, KW\]"):
        conv_winograd_bf16(x, weight.double(), None)


def test_conv_winograd_bf16_of_a_float32_weight_is_that_of_its_bfloat16_copy():
    """A float32 weight and bias (training's master parameters) give the output and input
    gradient of their bfloat16 copies bit for bit, and their gradients in float32: the weight's
    the kernel's float32 sums, unrounded; the bias's the float32 sum of d y."""
    torch.manual_seed(1)
    x = torch.randn(2, 16, 4, 6).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(32, 16, 3, 3) / 12).requires_grad_()
    bias = torch.randn(32).requires_grad_()
    torch.library.opcheck(torch.ops.mtkernels.conv_winograd_bf16, (x, weight, bias))
    grad_y = torch.randn(2, 32, 4, 6).bfloat16().contiguous(memory_format=torch.channels_last)
    y = conv_winograd_bf16(x, weight, bias)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), grad_y)
    copy = weight.detach().bfloat16()
    assert torch.equal(y, conv_winograd_bf16(x.detach(), copy, bias.detach().bfloat16()))
    assert torch.equal(dx, conv_winograd_bf16_input_grad(grad_y, copy))
    assert dw.dtype == torch.float32 and torch.equal(dw, conv_winograd_bf16_weight_grad(x.detach(), grad_y))
    assert db.dtype == torch.float32 and torch.equal(db, grad_y.double().sum((0, 2, 3)).float())


def test_bad_inputs_are_named():
    x, weight, bias = conv_inputs((2, 4, 5, 5), 3, 3, True)
    with pytest.raises(TypeError, match="x must be a float32 CPU tensor"):
        winograd_conv3x3(x.double(), weight, bias)
    with pytest.raises(ValueError, match=r"weight must be a float32 CPU tensor \[C_out, 4, KH, KW\]"):
        winograd_conv3x3(x, weight[:, :2], bias)
    with pytest.raises(ValueError, match=r"weight must be \[C_out, C_in, 3, 3\], got \(3, 4, 1, 1\)"):
        winograd_conv3x3(x, weight[:, :, :1, :1], bias)
    with pytest.raises(ValueError, match=r"grad_y must be \[2, C_out, 5, 5\] \(x is \(2, 4, 5, 5\)\), got \(2, 3, 4,"):
        winograd_conv3x3_weight_grad(x, torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"bias must be None or a float32 tensor of shape \(3,\)"):
        gemm_conv2d(x, weight, bias[:2], 1, 1)
    with pytest.raises(ValueError, match="stride must be >= 1 and padding >= 0, got stride=0"):
        gemm_conv2d(x, weight, bias, 0, 1)
    with pytest.raises(ValueError, match="does not fit in x of size 2x2"):
        gemm_conv2d(x[:, :, :2, :2], weight, bias, 1, 0)


def layer(c_in, c_out, kernel, **options):
    return as_training_conv(torch.nn.Conv2d(c_in, c_out, kernel, bias=False, **options))


@pytest.mark.parametrize("conv,shape,candidates,untimed", [
    (layer(64, 64, 3, padding=1), (2, 64, 12, 12), ["torch", "winograd"], "winograd"),
    (layer(32, 64, 3, padding=1), (2, 32, 12, 12), ["torch", "winograd"], "torch"),  # timed; untimed too few channels
    (layer(16, 64, 3, padding=1), (2, 16, 12, 12), ["torch"], "torch"),
    (layer(512, 2048, 1), (2, 512, 3, 3), ["torch", "gemm"], "gemm"),                 # 9 output pixels an image
    (layer(256, 256, 3, stride=2, padding=1), (2, 256, 6, 6), ["torch", "gemm"], "gemm"),
    (layer(256, 64, 1), (2, 256, 24, 24), ["torch"], "torch"),
    (layer(64, 64, 3, padding=2, dilation=2), (2, 64, 3, 3), ["torch"], "torch"),
    (layer(64, 64, 3, padding=1, groups=2), (2, 64, 3, 3), ["torch"], "torch"),
    (layer(512, 512, 3, padding=1), (2, 512, 3, 3), ["torch", "gemm", "winograd"], "gemm"),  # GEMM first on small maps
])
def test_training_conv_candidates_by_shape_and_each_equals_conv2d(conv, shape, candidates, untimed):
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    assert conv.candidates(x) == candidates
    assert conv.heuristic(candidates) == untimed
    assert conv.candidates(x.contiguous()) == ["torch"]  # NCHW activations stay with PyTorch's own
    want = F.conv2d(x.double(), conv.weight.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    for algorithm in candidates:
        torch.testing.assert_close(conv._run(algorithm, x, conv.weight, None).double(), want, rtol=1e-4, atol=1e-4)


def test_bf16_pointwise_convs_are_offered_the_gemm():
    """In bfloat16, every 1x1 layer may run as one GEMM (the timing decides), whatever its map
    size; in float32 only where an image has at most 16 output pixels."""
    conv = layer(256, 64, 1)
    x = torch.randn(2, 256, 24, 24).to(memory_format=torch.channels_last)
    assert conv.candidates(x) == ["torch"]
    assert conv.candidates(x.bfloat16()) == ["torch", "gemm"]
    assert layer(256, 512, 1, stride=2).candidates(x.bfloat16()) == ["torch", "gemm"]
    assert layer(256, 64, 3, stride=2, padding=1).candidates(x.bfloat16()) == ["torch"]


def test_training_conv_times_its_candidates_once_and_remembers(monkeypatch, tmp_path):
    """The choice is the timed fastest of a training step (forward + backward), stored on
    disk under the layer's key, so neither this layer nor a new one like it times again;
    MTKERNELS_TUNE=off takes the untimed choice."""
    monkeypatch.setenv("MTKERNELS_CACHE_DIR", str(tmp_path))
    x = torch.randn(4, 64, 12, 12).to(memory_format=torch.channels_last)
    timed = []

    def fastest(candidates, inputs, **_):
        timed.append(sorted(candidates))
        for run in candidates.values():
            run(inputs)  # each runs a forward and backward without touching the layer's gradients
        return "torch"

    monkeypatch.setattr(tuning, "fastest", fastest)
    conv = layer(64, 64, 3, padding=1)
    assert conv.algorithm(x) == "torch" and conv.weight.grad is None
    assert layer(64, 64, 3, padding=1).algorithm(x) == "torch"  # a new layer: the stored decision
    assert timed == [["torch", "winograd"]]
    monkeypatch.setenv("MTKERNELS_TUNE", "off")
    assert layer(64, 64, 3, padding=1).algorithm(x[:1]) == "winograd"  # another batch bucket, untimed


def test_resnet_fused_for_training_steps_as_close_to_float64_as_plain_float32(monkeypatch):
    """A Multi-task ResNet ver2 step with every conv algorithm in use (untimed: Winograd in
    the stages, GEMM on the 3x3 maps, PyTorch's own on the stem and at 24x24). At batch 4
    the last stages' BatchNorms see 36 values a channel, which amplifies rounding: float32
    itself is about 2% from float64 here, so the bound is relative to it."""
    monkeypatch.setenv("MTKERNELS_TUNE", "off")
    torch.manual_seed(0)
    plain = models.build_model("resnet-v2").train()
    fused, reference = models.build_model("resnet-v2").train(), models.build_model("resnet-v2").train().double()
    for model in (fused, reference):
        model.load_state_dict(plain.state_dict())
    mtkernels.fuse_for_training(fused)
    used = set()
    for m in fused.modules():
        if isinstance(m, TrainingConv2d):
            m.register_forward_pre_hook(lambda mod, args: used.add(mod.algorithm(args[0])))
    x, labels = torch.rand(4, 1, 48, 48), torch.randint(0, 2, (4, 3))
    grads = []
    for model, inputs in ((reference, x.double()), (plain.to(memory_format=torch.channels_last), x),
                          (fused.to(memory_format=torch.channels_last), x)):
        mtkernels.reference.multitask_loss(model(inputs), labels, model.num_classes).backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    assert used == {"winograd", "gemm", "torch"}
    want, plain_grad, fused_grad = grads
    plain_error = (plain_grad - want).norm() / want.norm()
    fused_error = (fused_grad - want).norm() / want.norm()
    assert fused_error <= 1.5 * plain_error


def test_winograd_conv_is_twice_differentiable():
    x, weight, bias = conv_inputs((2, 3, 4, 5), 4, 3, True)
    args = (x.double().requires_grad_(), weight.double().requires_grad_(), bias.double().requires_grad_())
    torch.autograd.gradgradcheck(lambda *a: winograd_conv3x3(*(t.float() for t in a)).double(), args,
                                 eps=1e-2, atol=1e-2, rtol=1e-2)


def test_training_convs_under_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("MTKERNELS_TUNE", "off")  # eager takes the untimed choice, as compile does
    torch.manual_seed(0)
    convs = torch.nn.Sequential(layer(64, 64, 3, padding=1), layer(64, 32, 3, stride=2, padding=1))
    x = torch.randn(2, 64, 6, 6).to(memory_format=torch.channels_last)
    assert [conv.algorithm(t) for conv, t in ((convs[0], x), (convs[1], convs[0](x)))] == ["winograd", "gemm"]
    compiled = torch.compile(convs, fullgraph=True)
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in convs.parameters()]
    convs.zero_grad()
    want = x.double()
    for conv in convs:
        want = F.conv2d(want, conv.weight.double(), None, conv.stride, conv.padding)
    want.square().sum().backward()
    torch.testing.assert_close(compiled(x).double(), want, rtol=1e-4, atol=1e-4)
    for g, p in zip(got, convs.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4)
