"""mtkernels.reference: the papers' equations against a NumPy oracle and hand-computed values."""

import math

import loss_oracle
import numpy as np
import pytest
import torch

from mtkernels import reference

CLASSES = (2, 7, 2)


def random_batch(n, num_classes=CLASSES, labelled=0.7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, sum(num_classes), generator=g, dtype=torch.float64) * 3
    labels = torch.stack([torch.randint(0, c, (n,), generator=g) for c in num_classes], dim=1)
    mask = torch.rand(n, len(num_classes), generator=g) < labelled
    return logits.to(dtype), torch.where(mask, labels, torch.full_like(labels, -1))


# --- hand-computed cases ------------------------------------------------------------------

def test_ce_hand_computed():
    # Two equal scores: -log(1/2). Second task: scores (0, log 3), label 1: -log(3/4).
    logits = torch.tensor([[0.0, 0.0, 0.0, math.log(3.0)]], dtype=torch.float64)
    labels = torch.tensor([[0, 1]])
    loss = reference.multitask_loss(logits, labels, (2, 2), reduction="none")
    torch.testing.assert_close(loss, torch.tensor([[math.log(2.0), -math.log(0.75)]], dtype=torch.float64))


def test_svm_hand_computed():
    # scores (1, 3, 0.5), label 0, margin 1: max(0, 3-1+1)^2 + max(0, 0.5-1+1)^2 = 9 + 0.25
    logits = torch.tensor([[1.0, 3.0, 0.5]], dtype=torch.float64)
    loss = reference.multitask_loss(logits, torch.tensor([[0]]), (3,), kind="svm", reduction="sum")
    assert loss.item() == pytest.approx(9.25)
    loss = reference.multitask_loss(logits, torch.tensor([[0]]), (3,), kind="svm", margin=0.0, reduction="sum")
    assert loss.item() == pytest.approx(4.0)


def test_mean_divides_by_all_samples_and_applies_weights():
    # Row 0 labelled for task 0 only, row 1 for task 1 only: L_t = l / N with N = 2.
    logits = torch.zeros(2, 4, dtype=torch.float64)
    labels = torch.tensor([[0, -1], [-1, 1]])
    loss = reference.multitask_loss(logits, labels, (2, 2), task_weights=(2.0, 0.5))
    assert loss.item() == pytest.approx((2.0 * math.log(2) + 0.5 * math.log(2)) / 2)


# --- against the oracle --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ce", "svm"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("labelled", [0.0, 0.6, 1.0])
def test_matches_numpy_oracle(kind, reduction, labelled):
    logits, labels = random_batch(33, labelled=labelled, seed=3)
    weights, margin = (1.0, 2.0, 0.25), 0.7
    x = logits.clone().requires_grad_()
    loss = reference.multitask_loss(x, labels, CLASSES, kind, weights, margin, reduction)
    upstream = torch.rand(33, 3, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    want_loss, want_grad = loss_oracle.multitask_loss(
        logits.numpy(), labels.numpy(), CLASSES, kind, weights, margin, reduction,
        upstream.numpy() if reduction == "none" else None)
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["ce", "svm"])
def test_all_unlabelled_gives_zero_loss_and_zero_grad(kind):
    logits = torch.randn(5, 11, requires_grad=True)
    labels = torch.full((5, 3), -1)
    loss = reference.multitask_loss(logits, labels, CLASSES, kind)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_empty_batch_gives_zero():
    loss = reference.multitask_loss(torch.zeros(0, 11), torch.zeros(0, 3, dtype=torch.long), CLASSES)
    assert loss.item() == 0.0


def test_loss_dtype_is_float32_for_half_inputs():
    logits, labels = random_batch(4, dtype=torch.bfloat16)
    assert reference.multitask_loss(logits, labels, CLASSES).dtype == torch.float32
    assert reference.multitask_loss(logits.double(), labels, CLASSES).dtype == torch.float64


def test_sequence_of_task_logits_equals_concatenated():
    logits, labels = random_batch(6, seed=5)
    parts = list(logits.split(CLASSES, dim=1))
    torch.testing.assert_close(reference.multitask_loss(parts, labels, CLASSES),
                               reference.multitask_loss(logits, labels, CLASSES))


@pytest.mark.parametrize("kind", ["ce", "svm"])
def test_gradcheck(kind):
    logits, labels = random_batch(6, seed=7)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: reference.multitask_loss(z, labels, CLASSES, kind, (1.0, 0.5, 2.0), 1.0, "mean"), (logits,))


# --- bad input -------------------------------------------------------------------------------

BAD_INPUTS = [
    (dict(labels=torch.tensor([[2, 0, 0]])), ValueError, r"labels\[0, 0\] = 2"),
    (dict(labels=torch.tensor([[0, -2, 0]])), ValueError, r"labels\[0, 1\] = -2"),
    (dict(labels=torch.tensor([[0.0, 0.0, 0.0]])), TypeError, "integer tensor"),
    (dict(labels=torch.tensor([[0, 0]])), ValueError, r"shape \[N, T\] = \[1, 3\]"),
    (dict(logits=torch.zeros(1, 12)), ValueError, "12 columns but sum"),
    (dict(logits=torch.zeros(11)), ValueError, "2-D"),
    (dict(logits=torch.zeros(1, 11, dtype=torch.long)), TypeError, "logits must be float"),
    (dict(logits=[torch.zeros(1, 2), torch.zeros(1, 7)]), ValueError, "2 task tensors"),
    (dict(logits="scores"), TypeError, "logits must be a tensor"),
    (dict(num_classes=(2, 8)), ValueError, "11 columns but sum"),
    (dict(num_classes=(2, 0, 9)), ValueError, "num_classes entries must be >= 1"),
    (dict(num_classes=(2.0, 7, 2)), TypeError, "num_classes must be a sequence of ints"),
    (dict(kind="hinge"), ValueError, "kind must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(task_weights=(1.0, -1.0, 1.0)), ValueError, "task_weights must be finite and >= 0"),
    (dict(task_weights=(1.0, 1.0)), ValueError, "task_weights has 2 entries"),
    (dict(margin=float("nan")), ValueError, "margin must be finite"),
]


@pytest.mark.parametrize("override,error,message", BAD_INPUTS)
def test_bad_input_raises(override, error, message):
    args = dict(logits=torch.zeros(1, 11), labels=torch.tensor([[0, 0, 0]]), num_classes=CLASSES)
    args.update(override)
    with pytest.raises(error, match=message):
        reference.multitask_loss(**args)
