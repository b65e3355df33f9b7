"""mtkernels.fuse_for_inference on the papers' four networks: same outputs as eager eval."""

import copy

import pytest
import torch
from torch import nn

import models
import mtkernels
from mtkernels.fuse import AffineReLU, ChainStep, ChannelsLastFlatten, FusedConv2d, FusedHeads


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-identity running statistics and affine parameters, so folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(models.MODELS))
def eager_and_fused(request):
    torch.manual_seed(1)
    model = randomise_batchnorm(models.build_model(request.param)).eval()
    before = copy.deepcopy(model.state_dict())
    fused = mtkernels.fuse_for_inference(model)
    return request.param, model, fused, before


@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fused_equals_eager(eager_and_fused, batch, layout):
    name, model, fused, _ = eager_and_fused
    if name.startswith("resnet") and batch == 128 and layout == "channels_last":
        pytest.skip("batch 128 ResNet checked in NCHW; channels_last covered at 1 and 7")
    x = torch.randn(batch, 1, model.input_size, model.input_size, generator=torch.Generator().manual_seed(batch))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        got = fused(x)
        replayed = fused(x)  # later calls of a shape replay the layers' chosen implementations
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)
    assert torch.equal(replayed, got)


@pytest.mark.parametrize("batch", [1, 7])
def test_layer_chain_equals_layer_by_layer(eager_and_fused, isa, batch):
    """The leading layers that have whole-layer C++ kernels, as one C++ chain (all of BKNet;
    the 4-task CNN up to its first odd-sized pool), against the same fused layers called one
    by one, whatever the per-layer timing chose."""
    name, model, fused, _ = eager_and_fused
    if name.startswith("resnet"):
        pytest.skip("residual blocks have no whole-layer C++ kernel, so ResNets never chain")
    x = torch.randn(batch, 1, model.input_size, model.input_size, generator=torch.Generator().manual_seed(batch))
    layers, shape = [], x.shape
    for layer in list(fused.trunk) + list(fused.heads.layers):
        if not hasattr(layer, "chain_output_shape") or layer.chain_output_shape(shape) is None:
            break
        layers.append(layer)
        shape = torch.Size(layer.chain_output_shape(shape))
    assert len(layers) >= (13 if name == "bknet" else 3)
    want = x
    with torch.no_grad():
        for layer in layers:
            want = layer(want)
    got = ChainStep(layers, x.shape)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_layer_chain_refuses_layers_without_kernels(eager_and_fused):
    name, model, fused, _ = eager_and_fused
    if not name.startswith("resnet"):
        pytest.skip("only ResNets have layers without whole-layer C++ kernels")
    with pytest.raises(ValueError, match="has no C\\+\\+ kernel for input"):
        ChainStep(list(fused.trunk), torch.Size((1, 1, model.input_size, model.input_size)))


def test_original_is_untouched(eager_and_fused):
    _, model, _, before = eager_and_fused
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, (FusedConv2d, AffineReLU)) for m in model.modules())


def test_what_is_fused(eager_and_fused):
    name, model, fused, _ = eager_and_fused
    kinds = [type(m) for m in fused.modules()]
    assert nn.BatchNorm2d not in kinds and nn.BatchNorm1d not in kinds and nn.Dropout not in kinds
    convs = [m for m in fused.modules() if isinstance(m, FusedConv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    if name in ("bknet", "emotion-cnn"):
        # every conv block ends in a conv with the 2x2 pool attached; every conv carries its ReLU
        blocks = sum(isinstance(m, nn.MaxPool2d) for m in model.modules())
        assert sum(c.pool for c in convs) == blocks and all(c.relu for c in convs)
    if name in ("bknet", "emotion-cnn"):  # the flatten reads the last conv's output in memory order
        assert sum(isinstance(m, ChannelsLastFlatten) for m in fused.modules()) == 1
    if name == "bknet":  # the branches' equal second layers run as one batched GEMM
        assert fused.heads.layers[1].blocks is not None and fused.heads.layers[1].blocks.shape[0] == 3
    if name != "resnet-v2":
        heads = fused.heads
        assert isinstance(heads, FusedHeads)
        # one GEMM per branch depth, however many tasks
        depth = len([m for m in model.branches[0].modules() if isinstance(m, nn.Linear)])
        assert len(heads.layers) == depth
    if name.startswith("resnet"):
        assert sum(isinstance(m, AffineReLU) for m in fused.modules()) == sum(
            isinstance(m, nn.BatchNorm2d) for m in model.modules()) - 2 * sum(
            isinstance(m, models.resnet.PreActBottleneck) for m in model.modules())


def test_bad_input_is_reported(eager_and_fused):
    _, model, fused, _ = eager_and_fused
    s = model.input_size
    with pytest.raises(ValueError, match="channels"):
        fused(torch.randn(1, 3, s, s))
    with pytest.raises(ValueError, match=f"takes {s}x{s}"):
        fused(torch.randn(1, 1, s + 2, s + 2))
    with pytest.raises(TypeError, match="dtype"):
        fused(torch.randn(1, 1, s, s, dtype=torch.float64))
    with pytest.raises(ValueError, match="4-D"):
        fused(torch.randn(s, s))


def test_fuse_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mtkernels.fuse_for_inference(lambda x: x)


def test_plain_sequential_is_fused():
    torch.manual_seed(0)
    net = randomise_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))).eval()
    fused = mtkernels.fuse_for_inference(net)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), rtol=1e-4, atol=1e-5)
    assert [type(m).__name__ for m in fused] == ["FusedConv2d", "FusedConv2d", "Flatten", "FusedLinear", "FusedLinear"]


# --- Triton kernels of the CUDA path: interpreter numerics and ahead-of-time compilation ---------

import os  # noqa: E402

from triton_checks import run_under_interpreter  # noqa: E402

CONV_CASES = [  # (n, c_in, h, w, c_out, kernel, stride, padding, relu, pool)
    (2, 3, 8, 10, 20, 3, 1, 1, True, True),
    (1, 1, 6, 6, 16, 3, 1, 1, True, False),
    (2, 5, 7, 7, 12, 3, 2, 1, False, False),
    (1, 8, 4, 4, 24, 1, 1, 0, True, False),
]


def check_triton_kernels_under_interpreter(dtype_name):
    """Runs in a subprocess: TRITON_INTERPRET=1 must be set before triton is imported."""
    import torch.nn.functional as F

    from mtkernels.ops.conv import conv_weight_k_major
    from mtkernels.triton.conv import conv2d_bias_act, linear_bias_act

    assert os.environ.get("TRITON_INTERPRET") == "1"
    dtype = getattr(torch, dtype_name)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    g = torch.Generator().manual_seed(0)
    for n, c_in, h, w, c_out, k, stride, pad, relu, pool in CONV_CASES:
        x = torch.randn(n, c_in, h, w, generator=g).to(dtype)
        weight = torch.randn(c_out, c_in, k, k, generator=g).to(dtype)
        bias = torch.randn(c_out, generator=g).to(dtype)
        want = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=pad)
        want = F.relu(want) if relu else want
        want = F.max_pool2d(want, 2) if pool else want
        got = conv2d_bias_act(x.to(memory_format=torch.channels_last), conv_weight_k_major(weight), bias,
                              (k, k), stride, pad, relu, pool)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    x, weight, bias = torch.randn(5, 70, generator=g), torch.randn(33, 70, generator=g), torch.randn(33, generator=g)
    want = F.relu(F.linear(x.double(), weight.double(), bias.double()))
    got = linear_bias_act(x.to(dtype), weight.to(dtype), bias.to(dtype), True)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_kernels_under_interpreter(dtype):
    run_under_interpreter("test_fuse", "check_triton_kernels_under_interpreter", dtype)


def check_triton_kernels_propagate_nan():
    """Runs in a subprocess: a NaN pixel through the Triton conv (ReLU, pool) and linear
    (ReLU) gives NaN exactly where eager PyTorch does, whatever the sign of the weights."""
    import torch.nn.functional as F

    from mtkernels.ops.conv import conv_weight_k_major
    from mtkernels.triton.conv import conv2d_bias_act, linear_bias_act

    assert os.environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    x[1, 0, 3, 4] = float("nan")
    weight, bias = torch.randn(12, 3, 3, 3, generator=g), torch.randn(12, generator=g)
    want = F.max_pool2d(F.relu(F.conv2d(x.double(), weight.double(), bias.double(), padding=1)), 2)
    got = conv2d_bias_act(x.to(memory_format=torch.channels_last), conv_weight_k_major(weight), bias, (3, 3), 1, 1,
                          True, True)
    assert torch.isnan(want).any() and torch.equal(torch.isnan(got), torch.isnan(want))
    rows = torch.randn(3, 20, generator=g)
    rows[2, 7] = float("nan")
    got = linear_bias_act(rows, torch.randn(9, 20, generator=g), torch.randn(9, generator=g), True)
    assert torch.isnan(got[2]).all() and not torch.isnan(got[:2]).any()


def test_triton_kernels_propagate_nan_under_interpreter():
    run_under_interpreter("test_fuse", "check_triton_kernels_propagate_nan")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_cuda_fused_equals_eager(name, dtype):
    """The Triton path's error against float64 is no worse than cuDNN's eager model in the same
    precision (TF32 on for both in float32: 10-bit products, float32 accumulation), plus one
    rounding of that precision; the dtype is kept to the logits."""
    dtype = getattr(torch, dtype)
    torch.manual_seed(1)
    model = randomise_batchnorm(models.build_model(name)).eval()
    x = torch.randn(7, 1, model.input_size, model.input_size)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        fused = mtkernels.fuse_for_inference(model).cuda()
        got = fused(x.cuda().to(dtype))
        eager = copy.deepcopy(model).cuda().to(dtype)(x.cuda().to(dtype))
    assert got.dtype == dtype
    unit = torch.finfo(torch.float16 if dtype == torch.float32 else dtype).eps  # TF32 keeps fp16's mantissa
    eager_error = (eager.double().cpu() - exact).abs().max().item()
    got_error = (got.double().cpu() - exact).abs().max().item()
    assert got_error <= 2 * eager_error + unit * exact.abs().max().item(), (got_error, eager_error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_add_rounds_the_conv_plus_the_skip_once(dtype, monkeypatch):
    """A residual branch's last conv adds the skip in oneDNN's post-op: float32 accumulation
    of bfloat16 products (exact), the skip added in float32, one rounding of the output, so
    |y - y_64| <= u |y_64| + (1 + u) gamma_{K+2} (|w| * |x| + |b| + |skip|). A conv rounded
    to bfloat16 before a separate add (two roundings) lies outside this where the skip
    cancels most of the conv."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 convolution on this CPU")
    monkeypatch.setenv("MTKERNELS_TUNE", "off")  # the untimed choice of a 1x1 conv: oneDNN
    torch.manual_seed(0)
    conv = FusedConv2d(nn.Conv2d(64, 32, 1))
    conv.compute_dtype = dtype
    x = torch.randn(8, 64, 6, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(8, 32, 6, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    assert conv.implementation_name(x, "4-15") == "onednn"
    y = conv.forward_add(x, skip)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    w, b = (t.to(dtype).double() for t in (conv.weight, conv.bias))
    want = torch.nn.functional.conv2d(x.double(), w, b) + skip.double()
    magnitude = torch.nn.functional.conv2d(x.double().abs(), w.abs(), b.abs()) + skip.double().abs()
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -24
    k = 64 + 2
    gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    assert bool(((y.double() - want).abs() <= u * want.abs() + (1 + u) * gamma * magnitude).all())
