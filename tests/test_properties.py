"""Property-based tests (hypothesis) of every C++ and Triton entry point: random shapes,
strides, dtypes, label densities, class counts, N from 0, and non-finite values at random
places, each against float64 PyTorch within the error bound the example-based tests use.

The default run tries a few examples per property (seconds); ``HYPOTHESIS_PROFILE=long``
(a separate step of .ci/run) tries many. A failure prints the shrunk example."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_conv import WINOGRAD_RELATIVE_BOUND, assert_winograd_nan, winograd_nan_reach
from test_conv_training import (
    DIRECT_RELATIVE_BOUND,
    RESULTS,
    assert_within,
    float64_conv_and_bounds,
    forward_backward,
)
from test_multitask_loss import assert_no_worse_than_eager, loss_and_grad
from triton_checks import run_under_interpreter

import mtkernels
from mtkernels import reference
from mtkernels.ops.batchnorm_relu import batchnorm_relu
from mtkernels.ops.conv import (
    conv3x3_single_channel,
    conv_weight_k_major,
    grouped_linear,
    maxpool2x2,
    winograd_conv3x3_bias_act,
    winograd_conv3x3_one_pass,
    winograd_weight,
    winograd_weight_blocked,
)
from mtkernels.ops.conv_training import gemm_conv2d, winograd_conv3x3

settings.register_profile("default", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=1000, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
NON_FINITE = st.sampled_from([float("nan"), float("inf"), float("-inf")])
seeds = st.integers(0, 2**31 - 1)


def randn(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


# --- the loss --------------------------------------------------------------------------------

@st.composite
def loss_batches(draw, max_rows=300, max_classes=3000):
    """(logits, labels, num_classes): 1-4 tasks of 1 to ``max_classes`` classes, 0 to
    ``max_rows`` rows, any share of labels -1, rows strided."""
    num_classes = tuple(draw(st.lists(st.one_of(st.integers(1, 12), st.integers(13, max_classes)), min_size=1,
                                      max_size=4)))
    n = draw(st.integers(0, max_rows))
    seed, density = draw(seeds), draw(st.floats(0.0, 1.0))
    g = torch.Generator().manual_seed(seed)
    width = sum(num_classes)
    pad = draw(st.integers(0, 3))  # a strided view: rows further apart than their width
    logits = (torch.randn(n, width + pad, generator=g) * draw(st.sampled_from([0.1, 3.0, 30.0])))[:, :width]
    labels = torch.stack([torch.randint(0, c, (n,), generator=g) for c in num_classes], 1) if n else \
        torch.zeros(0, len(num_classes), dtype=torch.long)
    labels[torch.rand(labels.shape, generator=g) >= density] = -1
    return logits, labels, num_classes


@given(batch=loss_batches(), dtype=DTYPES, kind=st.sampled_from(["ce", "svm"]),
       reduction=st.sampled_from(["mean", "sum", "none"]))
def test_loss_no_worse_than_eager(batch, dtype, kind, reduction):
    logits, labels, num_classes = batch
    logits = logits.to(dtype)
    if logits.shape[0] == 0:
        loss = mtkernels.multitask_loss(logits, labels, num_classes, kind=kind, reduction=reduction)
        assert loss.shape == ((0, len(num_classes)) if reduction == "none" else ()) and loss.sum().item() == 0
        return
    # a gradient beyond the dtype's range (squared hinges over thousands of classes in float16)
    # overflows in every implementation: not an example of this rule
    _, exact = loss_and_grad(reference.multitask_loss, logits.double(), labels, torch.ones(labels.shape),
                             num_classes=num_classes, kind=kind, reduction="none")
    assume(np.abs(exact).max(initial=0.0) < torch.finfo(dtype).max / 4)
    assert_no_worse_than_eager(logits, labels, num_classes, dtype, kind=kind, reduction=reduction)


@given(batch=loss_batches(), dtype=DTYPES, kind=st.sampled_from(["ce", "svm"]), value=NON_FINITE,
       where=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=4))
def test_loss_non_finite_rows(batch, dtype, kind, value, where):
    logits, labels, num_classes = batch
    assume(logits.shape[0] > 0)
    logits = logits.clone()
    for r, c in where:
        logits[r % logits.shape[0], c % logits.shape[1]] = value
    logits = logits.to(dtype)
    ones = torch.ones(labels.shape)
    got, grad = loss_and_grad(mtkernels.multitask_loss, logits, labels, ones, num_classes=num_classes, kind=kind,
                              reduction="none")
    want, _ = loss_and_grad(reference.multitask_loss, logits.double(), labels, ones, num_classes=num_classes,
                            kind=kind, reduction="none")
    labelled = labels.numpy() >= 0
    assert np.array_equal(np.isfinite(got), np.isfinite(want) | ~labelled)
    assert (got[~labelled] == 0).all()
    offsets = np.cumsum((0,) + num_classes)
    for t in range(len(num_classes)):
        columns = grad[:, offsets[t]:offsets[t + 1]]
        assert (columns[~labelled[:, t]] == 0).all()  # unlabelled: exactly 0, whatever the row holds
        if dtype == torch.float32:  # a finite loss has a finite gradient (16-bit gradients may overflow)
            assert np.isfinite(columns[np.isfinite(got[:, t])]).all()


def check_triton_loss_properties(max_examples):
    """Runs in a subprocess under TRITON_INTERPRET=1 (the interpreter has no bf16 arithmetic)."""
    from mtkernels.triton import multitask_loss as triton_loss

    @settings(max_examples=max_examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=loss_batches(max_rows=64, max_classes=300), kind=st.sampled_from(["ce", "svm"]),
           value=st.one_of(st.none(), NON_FINITE))
    def run(batch, kind, value):
        logits, labels, num_classes = batch
        assume(logits.shape[0] > 0)
        logits = logits.contiguous()
        if value is not None:
            logits[0, -1] = value
        weights = tuple(1.0 for _ in num_classes)
        rows, grad, _ = triton_loss.multitask_loss_forward(logits, labels, num_classes, weights, 1.0, kind, 1.0, True)
        want, want_grad = loss_and_grad(reference.multitask_loss, logits.double(), labels, torch.ones(labels.shape),
                                        num_classes=num_classes, kind=kind, reduction="none")
        got = rows.double().numpy()
        labelled = labels.numpy() >= 0
        assert np.array_equal(np.isfinite(got), np.isfinite(want) | ~labelled)
        finite = np.isfinite(want) & labelled
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)
        if value is None:
            np.testing.assert_allclose(grad.double().numpy(), want_grad, rtol=1e-4, atol=1e-5)
    run()


def test_triton_loss_properties_under_interpreter():
    examples = settings.default.max_examples
    run_under_interpreter("test_properties", "check_triton_loss_properties", examples)


# --- inference kernels -----------------------------------------------------------------------

@st.composite
def feature_maps(draw, max_channels=40, even=False):
    n, c = draw(st.integers(0, 5)), draw(st.integers(1, max_channels))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    if even:
        h, w = 2 * ((h + 1) // 2), 2 * ((w + 1) // 2)
    return randn((n, c, h, w), draw(seeds)).to(memory_format=torch.channels_last)


def poison(x, value, where):
    """A copy of ``x`` (same memory format) with ``value`` at a few places of its memory."""
    x = x.clone(memory_format=torch.preserve_format)
    if x.numel() and value is not None:
        memory = x if x.is_contiguous() else x.permute(0, 2, 3, 1)  # channels-last: NHWC order
        flat = memory.view(-1)
        for k in where:
            flat[k % flat.numel()] = value
    return x


WHERE = st.lists(st.integers(0, 10**6), min_size=1, max_size=3)


def assert_same_values(got, want):
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-5, atol=1e-5)


@given(x=feature_maps(even=True), value=st.one_of(st.none(), NON_FINITE), where=WHERE, relu=st.booleans())
def test_maxpool_is_eagers(x, value, where, relu):
    x = poison(x, value, where)
    want = F.max_pool2d(x.double(), 2, 2)
    assert_same_values(maxpool2x2(x, relu), F.relu(want) if relu else want)


@given(x=feature_maps(max_channels=1), c_out=st.integers(1, 70), relu=st.booleans(), seed=seeds,
       value=st.one_of(st.none(), NON_FINITE), where=WHERE)
def test_single_channel_conv_is_eagers(x, c_out, relu, seed, value, where):
    x = poison(x.contiguous(), value, where)
    weight, bias = randn((c_out, 1, 3, 3), seed), randn((c_out,), seed + 1)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    got = conv3x3_single_channel(x, conv_weight_k_major(weight), bias, relu)
    assert_same_values(got, F.relu(want) if relu else want)


def winograd_error_scale(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What a Winograd F(2x2, 3x3) output's rounding error is bounded against, per output
    (float64): each 2x2 output block is computed from its 4x4 input tile and all 9 taps
    (the transforms mix every tap and every tile value, padding included), so the scale is
    sum_c (sum of |x_c| over the tile) (sum of |w_oc| over the taps) + |b_o|. On images of a
    few pixels it is far above conv(|x|, |w|): there most taps meet zero padding, but the
    transforms still add and subtract them."""
    n, _, h, w = x.shape
    padded = F.pad(x.double().abs(), (1, 1 + w % 2, 1, 1 + h % 2))
    tile_sums = F.avg_pool2d(padded, 4, stride=2) * 16  # [N, C, ceil(H / 2), ceil(W / 2)]
    per_tile = torch.einsum("nchw,oc->nohw", tile_sums, weight.double().abs().sum((2, 3)))
    per_tile = per_tile + bias.double().abs().view(1, -1, 1, 1)
    return per_tile.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :h, :w]


@given(x=feature_maps(), c_out=st.integers(1, 70), relu=st.booleans(), pool=st.booleans(),
       one_pass=st.booleans(), seed=seeds, nan=st.booleans(), where=WHERE)
def test_winograd_within_its_bound(x, c_out, relu, pool, one_pass, seed, nan, where):
    assume(not pool or (x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0))
    x = poison(x, float("nan") if nan else None, where)
    weight, bias = randn((c_out, x.shape[1], 3, 3), seed), randn((c_out,), seed + 1)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    scale = winograd_error_scale(x, weight, bias)
    want = F.relu(want) if relu else want
    if pool:
        want, scale = F.max_pool2d(want, 2, 2), F.max_pool2d(scale, 2, 2)
    u = winograd_weight(weight)
    got = (winograd_conv3x3_one_pass(x, winograd_weight_blocked(u), bias, relu, pool) if one_pass
           else winograd_conv3x3_bias_act(x, u, bias, relu, pool))
    assert got.shape == want.shape
    reach = winograd_nan_reach(x, c_out, pool)
    assert_winograd_nan(got, want, reach)
    assert ((got.double() - want).abs()[~reach] <= WINOGRAD_RELATIVE_BOUND * scale[~reach]).all()


@given(batch=st.integers(0, 9), groups=st.integers(1, 4), width_in=st.integers(1, 300), width_out=st.integers(1, 70),
       relu=st.booleans(), seed=seeds, value=st.one_of(st.none(), NON_FINITE), where=WHERE)
def test_grouped_linear_is_eagers(batch, groups, width_in, width_out, relu, seed, value, where):
    x = randn((batch, groups * width_in), seed)
    if batch and value is not None:
        for k in where:
            x.view(-1)[k % x.numel()] = value
    weight, bias = randn((groups, width_out, width_in), seed + 1), randn((groups * width_out,), seed + 2)
    want = torch.cat([x[:, k * width_in:(k + 1) * width_in].double() @ weight[k].double().t() for k in range(groups)],
                     dim=1) + bias.double()
    want = F.relu(want) if relu else want
    got = grouped_linear(x, weight, bias, relu)
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got.double()[finite], want[finite], rtol=1e-5, atol=1e-4)


# --- training kernels ------------------------------------------------------------------------

def winograd_weight_grad_scale(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The same for the Winograd weight gradient (d U = V^T d M per tile, then d w = G^T d U G):
    every tap of d w[o, c] mixes, per tile, all of the 4x4 input tile of channel c with all of
    the 2x2 output block of d y_o, so the scale of every tap is
    sum over images and tiles of (sum over the tile |x_c|)(sum over the block |d y_o|)."""
    _, _, h, w = x.shape
    tile_sums = F.avg_pool2d(F.pad(x.double().abs(), (1, 1 + w % 2, 1, 1 + h % 2)), 4, stride=2) * 16
    block_sums = F.avg_pool2d(F.pad(grad_y.double().abs(), (0, w % 2, 0, h % 2)), 2, stride=2) * 4
    per_pair = torch.einsum("ncij,noij->oc", tile_sums, block_sums)
    return per_pair[:, :, None, None].expand(-1, -1, 3, 3)


@given(x=feature_maps(), c_out=st.integers(1, 40), bias=st.booleans(), seed=seeds)
def test_training_winograd_within_its_bound(x, c_out, bias, seed):
    """y and d x are Winograd convolutions (of x with w; of d y with the flipped, transposed
    w), d w its adjoint: each against its tile scale; d bias is a plain sum."""
    assume(x.shape[0] > 0)
    weight = randn((c_out, x.shape[1], 3, 3), seed)
    b = randn((c_out,), seed + 1) if bias else None
    got, grad_y = forward_backward(winograd_conv3x3, x, weight, b)
    want, scale = float64_conv_and_bounds(x, weight, b, grad_y, 1, 1)
    y_scale = winograd_error_scale(x, weight, b if b is not None else torch.zeros(c_out))
    x_scale = winograd_error_scale(grad_y, weight.flip(2, 3).transpose(0, 1), torch.zeros(x.shape[1]))
    assert_within(got[:3], want[:3], [y_scale, x_scale, winograd_weight_grad_scale(x, grad_y)],
                  WINOGRAD_RELATIVE_BOUND)
    assert_within(got[3:], want[3:], scale[3:], DIRECT_RELATIVE_BOUND, RESULTS[3:])


@given(x=feature_maps(max_channels=16), c_out=st.integers(1, 24), kernel=st.sampled_from([1, 3, 5]),
       stride=st.integers(1, 2), padding=st.integers(0, 2), bias=st.booleans(), seed=seeds)
def test_gemm_conv_within_its_bound(x, c_out, kernel, stride, padding, bias, seed):
    assume(x.shape[0] > 0 and x.shape[2] + 2 * padding >= kernel and x.shape[3] + 2 * padding >= kernel)
    weight = randn((c_out, x.shape[1], kernel, kernel), seed)
    b = randn((c_out,), seed + 1) if bias else None
    got, grad_y = forward_backward(lambda *a: gemm_conv2d(*a, stride, padding), x, weight, b)
    want, scale = float64_conv_and_bounds(x, weight, b, grad_y, stride, padding)
    assert_within(got, want, scale, DIRECT_RELATIVE_BOUND)


@given(x=feature_maps(), seed=seeds, flat=st.booleans())
def test_batchnorm_relu_is_eagers(x, seed, flat):
    # At least 8 values per channel: with fewer the normalised values hardly depend on x, and
    # float32 rounding in the gradient grows as 1 / std, beyond the fixed tolerance used here.
    assume(x.shape[0] * x.shape[2] * x.shape[3] >= 8)
    x = (x * 3 + 1).permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if flat else x * 3 + 1
    c = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) - 0.5
    grad_y = randn(x.shape, seed)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
    y, _, _ = batchnorm_relu(xs, ws, bs, 1e-5)
    got = (y, *torch.autograd.grad(y, (xs, ws, bs), grad_y))
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    y64 = F.relu(F.batch_norm(x64, None, None, w64, b64, training=True, eps=1e-5))
    want = (y64, *torch.autograd.grad(y64, (x64, w64, b64), grad_y.double()))
    for name, g, w in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-4, msg=name)


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
