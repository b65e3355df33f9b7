"""mtkernels.fuse.plans: plans bounded per batch bucket, rebuilt when parameters change,
eager's semantics for non-finite inputs and empty batches, on the papers' four networks."""

import copy
import gc

import pytest
import torch
from test_fuse import randomise_batchnorm

import models
import mtkernels
from mtkernels.fuse import ChainStep, tuning
from mtkernels.lru import LruCache


@pytest.fixture(scope="module", params=sorted(models.MODELS))
def eager_and_fused(request):
    torch.manual_seed(3)
    model = randomise_batchnorm(models.build_model(request.param), seed=3).eval()
    return request.param, model, mtkernels.fuse_for_inference(model)


def images(model, n, seed=0, dtype=torch.float32):
    size = model.input_size
    return torch.randn(n, model.in_channels, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_equals_eager(fused, model, x):
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("batch", [1, 2, 7, 128])
def test_non_finite_pixel_reaches_exactly_its_images_logits(eager_and_fused, batch, value):
    name, model, fused = eager_and_fused
    if name.startswith("resnet") and batch == 128 and value == float("inf"):
        pytest.skip("ResNet batch 128 checked with NaN; inf covered at 1, 2 and 7")
    x = images(model, batch, seed=batch)
    corrupt = batch // 2
    x[corrupt, 0, 5, 7] = value
    with torch.no_grad():
        want, got = model(x), fused(x)
    bad = ~torch.isfinite(want)
    assert bad[corrupt].all() and not bad[torch.arange(batch) != corrupt].any()
    assert torch.equal(~torch.isfinite(got), bad)
    if value != value:
        assert torch.isnan(got[corrupt]).all()
    good = torch.arange(batch) != corrupt
    if good.any():
        torch.testing.assert_close(got[good], want[good], rtol=1e-4, atol=1e-4 * want[good].abs().max().item())


def test_an_empty_batch_gives_empty_logits(eager_and_fused):
    _, model, fused = eager_and_fused
    with torch.no_grad():
        got = fused(images(model, 0))
    assert got.shape == (0, sum(model.num_classes)) and got.dtype == torch.float32


def test_many_batch_sizes_tune_once_per_bucket_with_bounded_plans(monkeypatch):
    torch.manual_seed(0)
    model = randomise_batchnorm(models.build_model("bknet")).eval()
    fused = mtkernels.fuse_for_inference(model)
    stored = []
    real_store = tuning.TuningCache.store
    monkeypatch.setattr(tuning.TuningCache, "store", lambda self, key, choice: (stored.append(key),
                                                                              real_store(self, key, choice)))
    sizes = list(range(2, 41, 3)) + [1, 2, 64, 71, 130, 1]
    for n in sizes:
        assert_equals_eager(fused, model, images(model, n, seed=n))
        memory = fused.plan_memory()
        assert memory["plans"] <= memory["max_plans"]
    assert len(stored) == len(set(stored))  # no decision is timed twice
    buckets = {key.rsplit(":b", 1)[1] for key in stored}
    assert buckets <= {"1", "2-3", "4-15", "16-63", "64+"}
    per_bucket = {b: sum(key.endswith(":b" + b) for key in stored) for b in buckets}
    convs = sum(isinstance(m, mtkernels.fuse.FusedConv2d) for m in fused.modules())
    assert all(count <= convs + 1 for count in per_bucket.values())  # each conv and the net-level plan choice
    assert fused.plan_memory()["plans"] == min(len(set(sizes)), fused.plan_memory()["max_plans"])


def test_plans_are_capped_in_bytes():
    cache = LruCache(capacity=10, max_bytes=3000)
    for k in range(5):
        cache[k] = torch.empty(250)  # 1000 bytes each
    assert list(cache) == [2, 3, 4] and cache.nbytes() == 3000
    cache.get(2)
    cache[5] = torch.empty(250)
    assert list(cache) == [4, 2, 5]
    cache[6] = torch.empty(2000)  # larger than the cap alone: kept, everything older dropped
    assert list(cache) == [6]


@pytest.mark.parametrize("change", ["double-float", "to-dtype-and-back", "load_state_dict", "inplace", "half"])
def test_parameter_changes_rebuild_the_plans(change):
    torch.manual_seed(0)
    model = randomise_batchnorm(models.build_model("bknet")).eval()
    fused = mtkernels.fuse_for_inference(model)
    x1, x7 = images(model, 1), images(model, 7)
    assert_equals_eager(fused, model, x1)
    assert_equals_eager(fused, model, x7)  # plans (batch 1: the C++ chain) built and replayed
    if change == "double-float":
        fused.double()
        assert_equals_eager(fused, model.double(), x1.double())
        fused.float()
        model.float()
    elif change == "to-dtype-and-back":
        fused.to(torch.float64).to(torch.float32)
    elif change == "load_state_dict":
        other = randomise_batchnorm(models.build_model("bknet"), seed=9).eval()
        fused.load_state_dict(mtkernels.fuse_for_inference(other).state_dict())
        model = other
    elif change == "inplace":
        with torch.no_grad():
            for m in (model, fused):
                convs = (torch.nn.Conv2d, mtkernels.fuse.FusedConv2d)
                first_conv = next(c for c in m.modules() if isinstance(c, convs))
                first_conv.weight.mul_(1.5)
            model = copy.deepcopy(model)
    elif change == "half":
        fused.half()
        with pytest.raises(TypeError, match="input dtype torch.float32 is not supported on cpu"):
            fused(x1)
        fused.float()
        # The parameters went through float16: the reference is a model fused before any call
        # (no plan) whose parameters made the same trip.
        model = mtkernels.fuse_for_inference(model).half().float()
    gc.collect()
    for x in (x1, x7, x1):
        assert_equals_eager(fused, model, x)


@pytest.mark.cuda
def test_a_device_round_trip_rebuilds_the_plans():
    model = models.build_model("bknet").eval()
    fused = mtkernels.fuse_for_inference(model)
    x = images(model, 2)
    assert_equals_eager(fused, model, x)
    fused.cuda()
    torch.testing.assert_close(fused(x.cuda()).cpu(), model(x), rtol=1e-3, atol=1e-3)
    fused.cpu()
    assert_equals_eager(fused, model, x)


def test_input_on_another_device_than_the_model_is_named():
    model = models.build_model("bknet").eval()
    fused = mtkernels.fuse_for_inference(model)
    with pytest.raises(ValueError, match="input is on meta, the model on cpu"):
        fused(torch.empty(1, 1, 48, 48, device="meta"))


def test_a_chain_keeps_the_tensors_it_reads_alive():
    """The C++ chain holds references to its weights and buffers: dropping every Python
    reference to the layers it was built from leaves it able to run, with the same result."""
    torch.manual_seed(0)
    model = randomise_batchnorm(models.build_model("bknet")).eval()
    fused = mtkernels.fuse_for_inference(model)
    x = images(model, 1)
    layers = list(fused.trunk) + list(fused.heads.layers)
    chain = ChainStep(layers, x.shape)
    want = chain(x).clone()
    del fused, layers
    gc.collect()
    torch.randn(1 << 22).add_(1)  # reuse freed memory, if any were freed
    assert torch.equal(chain(x), want)


def test_a_chain_refuses_input_of_another_shape():
    model = models.build_model("bknet").eval()
    fused = mtkernels.fuse_for_inference(model)
    chain = ChainStep(list(fused.trunk) + list(fused.heads.layers), torch.Size((1, 1, 48, 48)))
    with pytest.raises(ValueError, match=r"runs float32 CPU input of shape \(1, 1, 48, 48\)"):
        chain(images(model, 2))
