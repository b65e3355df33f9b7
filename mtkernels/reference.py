"""Plain-PyTorch ground truth for the papers' losses (Sang & Cuong 2018, eqs. 1-3).

Every fused kernel is tested against this module. It computes in the logits' dtype,
exactly as a user would write it with PyTorch ops, and returns the loss in float32
(float64 for float64 logits), the dtype autocast uses for losses.

    L_t = 1/N * sum_i alpha_i^t * l(s_i^t, y_i^t)          (eq. 1 with l = CE, eq. 2 with l = squared hinge)
    L   = sum_t mu_t * L_t                                 (eq. 3; weight decay stays in the optimiser)

alpha_i^t = 0 is written as label -1. N counts every sample in the batch, labelled for
task t or not, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import Logits, LossSpec, check_label_range, check_tensors, loss_spec

__all__ = ["multitask_loss", "loss_from_spec", "per_task_losses", "loss_dtype"]


def loss_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def per_task_losses(logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """[N, T] unweighted losses l(s_i^t, y_i^t), 0 where unlabelled; in the logits' dtype."""
    columns = []
    for t, (lo, hi) in enumerate(zip(spec.offsets[:-1], spec.offsets[1:])):
        scores = logits[:, lo:hi]
        label = labels[:, t].long()
        labelled = label >= 0
        safe_label = label.clamp(min=0)  # any valid class; the row is zeroed below
        if spec.kind == "ce":
            loss = F.cross_entropy(scores, safe_label, reduction="none")
        else:
            true_score = scores.gather(1, safe_label[:, None])
            hinge = (scores - true_score + spec.margin).clamp(min=0)
            hinge = hinge.masked_fill(F.one_hot(safe_label, hi - lo).bool(), 0)
            loss = (hinge * hinge).sum(dim=1)
        columns.append(torch.where(labelled, loss, torch.zeros_like(loss)))
    return torch.stack(columns, dim=1)


def multitask_loss(logits: Logits, labels: torch.Tensor, num_classes, kind: str = "ce",
                   task_weights=None, margin: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Masked multi-task loss; same signature and semantics as ``mtkernels.multitask_loss``.

    Args:
        logits: ``[N, sum(C)]`` tensor with the tasks' scores side by side, or a sequence
            of ``[N, C_t]`` tensors.
        labels: ``[N, T]`` integer tensor; -1 marks a sample without a label for task t.
        num_classes: classes per task, e.g. ``(2, 7, 2)`` for smile, emotion, gender.
        kind: ``"ce"`` (softmax cross-entropy, eq. 1) or ``"svm"`` (squared hinge, eq. 2).
        task_weights: mu_t, default all 1.
        margin: hinge margin for ``"svm"`` (the paper uses 1).
        reduction: ``"mean"`` (sum over labelled samples / all N, then sum_t mu_t L_t),
            ``"sum"`` (no 1/N) or ``"none"`` (``[N, T]`` losses, mu not applied).
    """
    spec = loss_spec(num_classes, kind, task_weights, margin, reduction)
    logits, labels = check_tensors(logits, labels, spec)
    check_label_range(labels, spec)
    return loss_from_spec(logits, labels, spec)


def loss_from_spec(logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """The equations alone, on inputs already checked: what a user writes by hand, and
    what the benchmarks time (eager and under torch.compile)."""
    losses = per_task_losses(logits, labels, spec).to(loss_dtype(logits.dtype))
    if spec.reduction == "none":
        return losses
    weights = torch.tensor(spec.task_scale(logits.shape[0]), dtype=losses.dtype, device=losses.device)
    return (losses * weights).sum()
