"""The drop-in multi-task loss: ``multitask_loss`` and ``MultiTaskLoss``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._validation import Logits, LossSpec, check_tensors, loss_spec
from .device_path import takes_cuda_path
from .ops.multitask_loss import FusedMultiTaskLoss, fused_forward, multitask_loss_op

__all__ = ["multitask_loss", "MultiTaskLoss"]


def _fused_loss(logits: Logits, labels: torch.Tensor, spec: LossSpec, validate: Optional[bool]) -> torch.Tensor:
    logits, labels = check_tensors(logits, labels, spec)
    if validate is None:
        validate = not takes_cuda_path(logits)  # free on CPU; a host sync on GPU
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        loss, _ = multitask_loss_op(logits, labels, list(spec.num_classes), list(spec.task_weights),
                                    spec.kind, spec.margin, spec.reduction, needs_grad, validate)
        return loss
    if needs_grad:
        return FusedMultiTaskLoss.apply(logits, labels, spec, validate)
    return fused_forward(logits, labels, spec, False, validate)[0]


def multitask_loss(logits: Logits, labels: torch.Tensor, num_classes, kind: str = "ce",
                   task_weights=None, margin: float = 1.0, reduction: str = "mean",
                   *, validate: Optional[bool] = None) -> torch.Tensor:
    """Masked multi-task loss (papers' eqs. 1-3), fused: one pass over the logits.

    Same arguments and results as :func:`mtkernels.reference.multitask_loss`:
    ``logits`` ``[N, sum(C)]`` (or a list of ``[N, C_t]``), ``labels`` ``[N, T]`` with -1 for
    "no label for this task", ``kind`` "ce" or "svm", ``task_weights`` mu_t, ``margin`` for
    "svm", ``reduction`` "mean" (divide by all N), "sum" or "none" (``[N, T]``).
    The loss is float32 (float64 for float64 logits); the gradient has the logits' dtype.

    ``validate``: raise ValueError for labels outside [-1, C_t). Default: on for CPU,
    where it costs nothing; off for CUDA, where it needs a host sync. Unchecked
    out-of-range labels are treated as unlabelled, never read out of bounds.
    """
    return _fused_loss(logits, labels, loss_spec(num_classes, kind, task_weights, margin, reduction), validate)


class MultiTaskLoss(nn.Module):
    """``nn.Module`` form of :func:`multitask_loss`; arguments are validated once, here."""

    def __init__(self, num_classes, kind: str = "ce", task_weights=None, margin: float = 1.0,
                 reduction: str = "mean", validate: Optional[bool] = None):
        super().__init__()
        self.spec = loss_spec(num_classes, kind, task_weights, margin, reduction)
        self.validate = validate

    def forward(self, logits: Logits, labels: torch.Tensor) -> torch.Tensor:
        return _fused_loss(logits, labels, self.spec, self.validate)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"num_classes={s.num_classes}, kind={s.kind!r}, task_weights={s.task_weights}, "
                f"margin={s.margin}, reduction={s.reduction!r}")
