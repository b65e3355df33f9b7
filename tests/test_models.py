"""The papers' networks: shapes, parameter counts derived from the layer lists, gradients."""

import pytest
import torch

import models
import mtkernels
from models.summary import count_macs, count_parameters, summarize


def conv_bn(cin, cout, k=3):
    return k * k * cin * cout + 2 * cout


def fc_bn(fin, fout):
    return fin * fout + 2 * fout


def fc(fin, fout):
    return fin * fout + fout


def bknet_params(classes=(2, 7, 2)):
    channels = [1, 32, 32, 64, 64, 128, 128, 256, 256, 256]
    trunk = sum(conv_bn(a, b) for a, b in zip(channels, channels[1:]))
    return trunk + sum(fc_bn(256 * 3 * 3, 256) + fc_bn(256, 256) + fc(256, c) for c in classes)


def bottleneck(cin, m, projection):
    return 2 * cin + cin * m + 2 * m + 9 * m * m + 2 * m + m * 4 * m + (cin * 4 * m if projection else 0)


def resnet_stage(cin, m, blocks):
    return bottleneck(cin, m, True) + (blocks - 1) * bottleneck(4 * m, m, False)


def resnet_params(version, classes=(2, 7, 2)):
    stem = 9 * 64
    stages = [resnet_stage(64, 64, 3), resnet_stage(256, 128, 4), resnet_stage(512, 256, 6)]
    last = resnet_stage(1024, 512, 3)
    if version == 1:
        return stem + sum(stages) + last + 2 * 2048 + sum(
            fc_bn(2048, 256) + fc_bn(256, 256) + fc(256, c) for c in classes)
    return stem + sum(stages) + sum(last + 2 * 2048 + fc(2048, c) for c in classes)


def emotion_cnn_params(classes=(7, 3, 3, 5)):
    channels = [1, 64, 64, 128, 128, 256, 256]
    trunk = sum(conv_bn(a, b) for a, b in zip(channels, channels[1:]))
    return trunk + fc_bn(256 * 6 * 6, 256) + sum(fc(256, c) for c in classes)


EXPECTED_PARAMS = {
    "bknet": bknet_params(),
    "resnet-v1": resnet_params(1),
    "resnet-v2": resnet_params(2),
    "emotion-cnn": emotion_cnn_params(),
}


@pytest.fixture(scope="module", params=sorted(models.MODELS))
def named_model(request):
    torch.manual_seed(0)
    return request.param, models.build_model(request.param)


def test_parameter_count_matches_layer_list(named_model):
    name, model = named_model
    assert count_parameters(model) == EXPECTED_PARAMS[name]


def test_output_shape_and_metadata(named_model):
    name, model = named_model
    size = model.input_size
    model.eval()
    with torch.no_grad():
        for batch in (1, 5):
            out = model(torch.randn(batch, 1, size, size))
            assert out.shape == (batch, sum(model.num_classes))
    assert len(model.task_names) == len(model.num_classes) == len(model.class_names)
    assert [len(c) for c in model.class_names] == list(model.num_classes)


def test_channels_last_equals_nchw(named_model):
    _, model = named_model
    model.eval()
    x = torch.randn(3, 1, model.input_size, model.input_size)
    with torch.no_grad():
        want = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    # Same math, different float32 summation order in the NHWC kernels.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_training_step_gives_finite_gradients_everywhere(named_model):
    _, model = named_model
    model.train()
    x = torch.randn(4, 1, model.input_size, model.input_size)
    labels = torch.stack([torch.randint(0, c, (4,)) for c in model.num_classes], 1)
    model.zero_grad()
    mtkernels.multitask_loss(model(x), labels, model.num_classes).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    model.zero_grad()


def test_bknet_macs_match_formula():
    # 3x3 convs at 48, 24, 12, 6 pixels, then the three FC branches.
    convs = [(48, 1, 32), (48, 32, 32), (24, 32, 64), (24, 64, 64), (12, 64, 128), (12, 128, 128),
             (6, 128, 256), (6, 256, 256), (6, 256, 256)]
    macs = sum(s * s * 9 * a * b for s, a, b in convs)
    macs += sum(2304 * 256 + 256 * 256 + 256 * c for c in (2, 7, 2))
    model = models.MultiTaskBKNet()
    assert count_macs(model, (1, 48, 48)) == macs
    assert model.training  # counting restores the mode


def test_bknet_init_is_gaussian_std_001():
    w = models.MultiTaskBKNet().trunk[0].weight
    assert abs(w.std().item() - 0.01) < 0.002


def test_resnet_version_is_checked():
    with pytest.raises(ValueError, match="version must be 1 or 2"):
        models.MultiTaskResNet(version=3)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="model must be one of"):
        models.build_model("vgg")


def test_summary_cli_prints_every_model(capsys):
    from models.__main__ import main

    assert main(["summary", "--models", "bknet", "emotion-cnn"]) == 0
    out = capsys.readouterr().out
    assert "| bknet | 1x48x48 |" in out and f"{bknet_params() / 1e6:.2f} M" in out
    assert summarize("bknet", models.MultiTaskBKNet()).macs_per_image > 1e8
