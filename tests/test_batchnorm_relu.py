"""mtkernels::batchnorm_relu (csrc/batchnorm_kernel.cpp via mtkernels.ops.batchnorm_relu),
BatchNormReLU2d and fuse_for_training, against float64 PyTorch."""

import pytest
import torch
import torch.nn.functional as F

import models
import mtkernels
from mtkernels.ops.batchnorm_relu import add_batchnorm_relu, batchnorm_relu

EPS = 1e-5


def float64_reference(x, weight, bias, grad_y, pool=False):
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = F.relu(F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS))
    if pool:
        y = F.max_pool2d(y, 2, 2)
    return (y, *torch.autograd.grad(y, (x64, w64, b64), grad_y.double()))


def inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 1
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) - 0.5
    return x, weight, bias, torch.randn(shape, generator=g)


@pytest.mark.parametrize("shape", [(128, 32, 12, 12), (3, 5, 7, 9), (2, 256, 3, 3), (64, 19), (1, 4, 2, 1)])
def test_forward_and_gradients_match_float64(isa, shape):
    x, weight, bias, grad_y = inputs(shape)
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    y, mean, var = batchnorm_relu(x, weight, bias, EPS)
    got = (y, *torch.autograd.grad(y, (x, weight, bias), grad_y))
    want = float64_reference(x, weight, bias, grad_y)
    for name, g, w in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)
    dims = [0, 2, 3] if x.dim() == 4 else [0]
    torch.testing.assert_close(mean.double(), x.double().mean(dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), x.double().var(dims, unbiased=False), rtol=1e-5, atol=1e-6)
    if x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(128, 32, 12, 12), (3, 5, 7, 9), (2, 256, 3, 3), (4, 3, 2, 5), (1, 4, 2, 2)])
def test_pooled_forward_and_gradients_match_float64(isa, shape):
    """pool=True against float64 max_pool2d(relu(batch_norm(x)), 2, 2), odd sizes included
    (their last row / column is in no window)."""
    x, weight, bias, _ = inputs(shape)
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    y, mean, var = batchnorm_relu(x, weight, bias, EPS, True)
    assert y.shape == (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = (y, *torch.autograd.grad(y, (x, weight, bias), grad_y))
    want = float64_reference(x, weight, bias, grad_y, pool=True)
    for name, g, w in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(var.double(), x.double().var([0, 2, 3], unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 37, 7, 3), (3, 200, 5, 7), (130, 16, 4, 4), (64, 64, 6, 6)])
def test_bfloat16_sums_within_their_bound(isa, shape):
    """bfloat16 activations sum in float32 over blocks of at most 64 rows (then double):
    rows of up to 128 bytes four at a time, longer ones singly, channel counts off the
    vector width included. Against float64 sums of the same bfloat16 values, each sum is
    off by at most 63 float32 roundings (u = 2^-24) of its sum of magnitudes, plus one
    rounding to float32; the variance adds the mean's error through mean^2. The bias is
    large enough that the ReLU passes everything, so d bias is the plain sum of d y and
    d weight the sum of d y (x - mean) * invstd (with the op's own mean and variance)."""
    u = 2.0 ** -24
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(shape, generator=g) * 3 + 5).bfloat16().contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(shape, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.full((channels,), 1000.0)
    x_ = x.clone().requires_grad_()
    weight_ = weight.clone().requires_grad_()
    bias_ = bias.clone().requires_grad_()
    y, mean, var = batchnorm_relu(x_, weight_, bias_, EPS)
    grad_x, grad_weight, grad_bias = torch.autograd.grad(y, (x_, weight_, bias_), grad_y)
    dims = [0, 2, 3]
    x64, dy64 = x.double(), grad_y.double()
    abs_mean, sq_mean = x64.abs().mean(dims), (x64 * x64).mean(dims)
    mean_error = 64 * u * abs_mean
    assert bool(((mean.double() - x64.mean(dims)).abs() <= mean_error).all())
    want_var = x64.var(dims, unbiased=False)
    var_bound = 63 * u * sq_mean + 2 * x64.mean(dims).abs() * mean_error + mean_error ** 2 + u * want_var
    assert bool(((var.double() - want_var).abs() <= var_bound).all())
    assert bool(((grad_bias.double() - dy64.sum(dims)).abs() <= 64 * u * dy64.abs().sum(dims)).all())
    centred = x64 - mean.double()[None, :, None, None]
    invstd = torch.rsqrt(var.double() + EPS)
    products = (dy64 * centred).sum(dims) * invstd
    product_bound = 66 * u * (dy64 * centred).abs().sum(dims) * invstd
    assert bool(((grad_weight.double() - products).abs() <= product_bound).all())


def float64_add_reference(x, residual, weight, bias, grad_total, grad_y):
    """float64 (total, y, d x, d residual, d weight, d bias) of total = x + residual,
    y = relu(batch_norm(total)), with gradients grad_total and grad_y reaching the outputs."""
    x64, r64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, residual, weight, bias))
    total = x64 + r64
    y = F.relu(F.batch_norm(total, None, None, w64, b64, training=True, eps=EPS))
    grads = torch.autograd.grad((total, y), (x64, r64, w64, b64), (grad_total.double(), grad_y.double()))
    return (total, y, *grads)


@pytest.mark.parametrize("shape", [(128, 32, 12, 12), (3, 5, 7, 9), (2, 256, 3, 3), (64, 19)])
def test_add_forward_and_gradients_match_float64(isa, shape):
    """add_batchnorm_relu: the sum, the pre-activation and all four gradients, with a
    gradient reaching the sum from later layers (a residual network's identity shortcut)
    and without one (the sum used only by the BatchNorm)."""
    x, weight, bias, grad_y = inputs(shape)
    residual, _, _, grad_total = inputs(shape, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    total, y, mean, var = add_batchnorm_relu(*leaves, EPS)
    got = (total, y, *torch.autograd.grad((total, y), leaves, (grad_total, grad_y), retain_graph=True))
    want = float64_add_reference(x, residual, weight, bias, grad_total, grad_y)
    names = ("total", "y", "grad_x", "grad_residual", "grad_weight", "grad_bias")
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)
    dims = [0, 2, 3] if x.dim() == 4 else [0]
    torch.testing.assert_close(var.double(), want[0].var(dims, unbiased=False), rtol=1e-5, atol=1e-6)
    only_y = torch.autograd.grad(y, leaves, grad_y)
    want = float64_add_reference(x, residual, weight, bias, torch.zeros(shape), grad_y)
    for name, g, w in zip(names[2:], only_y, want[2:]):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)


def test_add_in_bfloat16_is_eager_addition_then_the_op():
    """bfloat16: the sum is PyTorch's bfloat16 addition bit for bit (ties, NaN and inf
    included), its statistics and output those of batchnorm_relu on that sum; d x is the
    BatchNorm gradient plus the shortcut's, rounded once: within half a bfloat16 ulp
    (at most 2^-8 relative) of the float64 value, plus the float32 op's own tolerance (that of
    test_forward_and_gradients_match_float64)."""
    shape = (16, 40, 6, 5)
    x, weight, bias, grad_y = inputs(shape)
    residual, _, _, grad_total = inputs(shape, seed=1)
    x, residual = x.bfloat16(), (residual * 2 ** -8).bfloat16()  # sums that round, ties among them
    grad_y, grad_total = grad_y.bfloat16(), grad_total.bfloat16()
    total, y, mean, var = add_batchnorm_relu(x, residual, weight, bias, EPS)
    assert torch.equal(total, x + residual)
    assert all(torch.equal(a, b) for a, b in zip((y, mean, var), batchnorm_relu(x + residual, weight, bias, EPS)))
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    grads = torch.autograd.grad(add_batchnorm_relu(*leaves, EPS)[:2], leaves, (grad_total, grad_y))
    total64 = total.double().requires_grad_()
    w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
    y64 = F.relu(F.batch_norm(total64, None, None, w64, b64, training=True, eps=EPS))
    bn_dx, = torch.autograd.grad(y64, total64, grad_y.double())
    want = bn_dx + grad_total.double()
    bound = 2.0 ** -8 * want.abs() + 1e-5 * (bn_dx.abs() + grad_total.double().abs()) + 1e-5
    for got in grads[:2]:
        assert bool(((got.double() - want).abs() <= bound).all())

    special = x.clone()
    special[0, 0, 0, 0], special[1, 2, 3, 4] = float("nan"), float("inf")
    total, y, _, _ = add_batchnorm_relu(special, residual, weight, bias, EPS)
    assert torch.equal(total.isnan(), (special + residual).isnan())
    torch.testing.assert_close(total, special + residual, rtol=0, atol=0, equal_nan=True)
    assert bool(y[:, 0].isnan().all()) and bool(y[:, 2].isnan().all())  # as eager: NaN statistics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_picks_the_maximum_the_unfused_layers_pick(isa, dtype):
    """Inputs full of exact ties (integers, and in bfloat16 values that round together):
    the pooled op routes each window's gradient where PyTorch's max_pool2d after the
    unfused op does (the first of equal maxima, zeros of the ReLU included). The two differ
    only in how they sum (the pooled op value by value in double, the unpooled one in
    blocks, in float32 for bfloat16), which can move a float32 coefficient by a few ulps:
    float32 results agree to 1e-6, bfloat16 ones within one bfloat16 rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (16, 8, 7, 6), generator=g).float() * (1 + 2 ** -10 * torch.rand(16, 8, 7, 6, generator=g))
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(8, generator=g) + 0.5, torch.rand(8, generator=g) - 0.5
    dy = torch.randn(16, 8, 3, 3, generator=g).to(dtype)
    fused_x, unfused_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, _, _ = batchnorm_relu(fused_x, weight, bias, EPS, True)
    want = F.max_pool2d(batchnorm_relu(unfused_x, weight, bias, EPS)[0], 2, 2)
    assert torch.equal(y, want)
    got_dx, = torch.autograd.grad(y, fused_x, dy)
    want_dx, = torch.autograd.grad(want, unfused_x, dy)
    if dtype == torch.float32:
        torch.testing.assert_close(got_dx, want_dx, rtol=1e-6, atol=1e-6)
    else:
        assert bool(((got_dx.float() - want_dx.float()).abs() <= 2.0 ** -8 * want_dx.float().abs()).all())


def test_pooled_propagates_nan_as_the_unfused_layers():
    x, weight, bias, _ = inputs((4, 3, 6, 6))
    x[1, 2, 3, 4] = float("nan")
    y, _, _ = batchnorm_relu(x, weight, bias, EPS, True)
    want = F.max_pool2d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, EPS)), 2, 2)
    assert torch.equal(y.isnan(), want.isnan()) and bool(y[:, 2].isnan().all())  # the NaN spreads over its channel
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("pool", [False, True])
def test_opcheck(pool):
    x, weight, bias, _ = inputs((4, 6, 5, 5))
    torch.library.opcheck(torch.ops.mtkernels.batchnorm_relu,
                          (x, weight.requires_grad_(), bias.requires_grad_(), EPS, pool))


def test_add_opcheck():
    x, weight, bias, _ = inputs((4, 6, 5, 5))
    residual, _, _, _ = inputs((4, 6, 5, 5), seed=1)
    torch.library.opcheck(torch.ops.mtkernels.add_batchnorm_relu,
                          (x.requires_grad_(), residual.requires_grad_(), weight.requires_grad_(),
                           bias.requires_grad_(), EPS))


def test_bad_inputs_are_named():
    x, weight, bias, _ = inputs((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"residual must match x \(torch.float32 \(2, 3, 4, 4\) on cpu\), got "
                                         r"torch.float32 \(2, 3, 4, 3\)"):
        add_batchnorm_relu(x, x[..., :3], weight, bias, EPS)
    _, mean, var = batchnorm_relu(x, weight, bias, EPS)
    with pytest.raises(ValueError, match=r"grad_add must have x's shape \(2, 3, 4, 4\) and device \(cpu\) and pool "
                                         r"be False, got \(2, 3, 4, 4\) on cpu with pool=True"):
        torch.ops.mtkernels.batchnorm_relu_backward(x, x, weight, bias, mean, var, EPS, True, x)
    with pytest.raises(TypeError, match="x must be a float32 or bfloat16 CPU tensor"):
        batchnorm_relu(x.double(), weight, bias, EPS)
    with pytest.raises(ValueError, match=r"weight must be a float32 CPU tensor of shape \(3,\)"):
        batchnorm_relu(x, weight[:2], bias, EPS)
    with pytest.raises(ValueError, match="more than one value per channel"):
        batchnorm_relu(torch.zeros(1, 3), weight, bias, EPS)
    with pytest.raises(ValueError, match=r"pool=True needs x of shape \[N, C, H >= 2, W >= 2\], got \(2, 3, 1, 4\)"):
        batchnorm_relu(x[:, :, :1], weight, bias, EPS, True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_tracks_running_statistics_like_batchnorm2d(momentum):
    ref = torch.nn.BatchNorm2d(8, momentum=momentum)
    fused = mtkernels.BatchNormReLU2d(8, momentum=momentum)
    for step in range(3):
        x, *_ = inputs((6, 8, 5, 5), seed=step)
        ref(x.double().float())  # same float32 input
        fused(x)
    torch.testing.assert_close(fused.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert fused.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
    ref.eval(), fused.eval()
    x, *_ = inputs((2, 8, 5, 5), seed=9)
    torch.testing.assert_close(fused(x), F.relu(ref(x)), rtol=1e-5, atol=1e-6)  # eval: running statistics


def test_fuse_for_training_keeps_the_state_dict_and_the_training_step():
    """A BKNet training step after fuse_for_training is at least as close to float64 as the
    plain float32 network (whose convolutions set the noise floor), with the same state_dict."""
    torch.manual_seed(0)
    plain = models.MultiTaskBKNet(dropout=0.0).train()
    fused, reference = models.MultiTaskBKNet(dropout=0.0).train(), models.MultiTaskBKNet(dropout=0.0).train().double()
    fused.load_state_dict(plain.state_dict())
    reference.load_state_dict(plain.state_dict())
    keys = list(fused.state_dict())
    assert mtkernels.fuse_for_training(fused) is fused
    assert list(fused.state_dict()) == keys
    kinds = [type(m).__name__ for m in fused.trunk]
    assert kinds.count("BatchNormReLU2d") == 5 and kinds.count("BatchNormReLUPool2d") == 4
    assert "ReLU" not in kinds and "MaxPool2d" not in kinds and kinds.count("Identity") == 9 + 4
    x, labels = torch.rand(16, 1, 48, 48), torch.randint(0, 2, (16, 3))
    results = []
    for model, inputs_ in ((reference, x.double()), (plain.to(memory_format=torch.channels_last), x),
                           (fused.to(memory_format=torch.channels_last), x)):
        loss = mtkernels.reference.multitask_loss(model(inputs_), labels, model.num_classes)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.double().flatten() for p in model.parameters()])))
    (want_loss, want_grad), (plain_loss, plain_grad), (fused_loss, fused_grad) = results
    assert fused_loss == pytest.approx(want_loss, rel=1e-6)
    plain_error = (plain_grad - want_grad).norm() / want_grad.norm()
    fused_error = (fused_grad - want_grad).norm() / want_grad.norm()
    assert fused_error <= 1.5 * plain_error and fused_error < 1e-2


@pytest.mark.parametrize("name", ["bknet", "resnet-v1", "resnet-v2"])
def test_a_model_fused_for_training_fuses_for_inference_to_the_same_outputs(name):
    torch.manual_seed(0)
    model = models.build_model(name)
    for m in model.modules():  # non-trivial statistics, so a lost ReLU or BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        want = model.eval()(x)
        trained = mtkernels.fuse_for_training(model)
        assert any(isinstance(m, mtkernels.BatchNormReLU2d) for m in trained.modules())
        torch.testing.assert_close(trained(x), want, rtol=1e-5, atol=1e-5)  # eval: PyTorch's own BN + ReLU
        torch.testing.assert_close(mtkernels.fuse_for_inference(trained)(x), want, rtol=1e-4, atol=1e-4)


def test_resnet_stages_fuse_each_sum_with_the_next_pre_activation():
    """ResNet ver1 after fuse_for_training: every block's sum but each stage's last one is
    computed with the next block's pre-activation by add_batchnorm_relu (3 + 4 + 6 + 3
    blocks: 12 fused sums), and the training step is at least as close to float64 as the
    plain float32 network's."""
    torch.manual_seed(0)
    plain = models.MultiTaskResNet(1, dropout=0.0).train()
    fused, reference = models.MultiTaskResNet(1, dropout=0.0).train(), models.MultiTaskResNet(1, dropout=0.0).train()
    fused.load_state_dict(plain.state_dict())
    reference.load_state_dict(plain.state_dict())
    reference.double()
    mtkernels.fuse_for_training(fused)
    x, labels = torch.rand(8, 1, 48, 48), torch.randint(0, 2, (8, 3))
    results = []
    for model, inputs_ in ((reference, x.double()), (plain.to(memory_format=torch.channels_last), x),
                           (fused.to(memory_format=torch.channels_last), x)):
        with torch.profiler.profile() as profile:
            loss = mtkernels.reference.multitask_loss(model(inputs_), labels, model.num_classes)
            loss.backward()
        results.append((loss.item(), torch.cat([p.grad.double().flatten() for p in model.parameters()])))
    calls = {e.key: e.count for e in profile.key_averages()}
    assert calls.get("mtkernels::add_batchnorm_relu") == 12
    (want_loss, want_grad), (_, plain_grad), (fused_loss, fused_grad) = results
    assert fused_loss == pytest.approx(want_loss, rel=1e-5)
    plain_error = (plain_grad - want_grad).norm() / want_grad.norm()
    fused_error = (fused_grad - want_grad).norm() / want_grad.norm()
    assert fused_error <= 1.5 * plain_error and fused_error < 1e-2
