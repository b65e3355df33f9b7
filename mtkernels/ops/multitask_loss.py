"""Fused masked multi-task loss as a torch op: one pass computes loss and gradient.

Two entry points share :func:`fused_forward` and :func:`scale_saved_grad`:

* ``torch.ops.mtkernels.multitask_loss`` -- a ``torch.library`` custom op (schema,
  fake implementation, autograd). Opaque to ``torch.compile`` / export, so a compiled
  model plus this loss traces without graph breaks.
* :class:`FusedMultiTaskLoss` -- an ``autograd.Function`` used in eager mode, where the
  custom op's dispatch costs more than the whole kernel at the papers' batch of 128.

Devices: CPU runs the C++ kernel (``mtkernels._C``), CUDA the Triton kernel; float64
and any other device fall back to the plain-PyTorch reference.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _C
from .._validation import LossSpec, check_label_range, loss_spec
from ..device_path import takes_cuda_path
from ..reference import loss_dtype
from ..reference import multitask_loss as reference_multitask_loss

_C_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_C_KIND = {"ce": 0, "svm": 1}


def _unit_column_stride(logits: torch.Tensor) -> torch.Tensor:
    # The kernels take any row stride but need adjacent columns adjacent in memory.
    row_stride, column_stride = logits.stride()
    if column_stride == 1 and row_stride >= logits.shape[1]:
        return logits
    return logits.contiguous()


def _int64_labels(labels: torch.Tensor) -> torch.Tensor:
    if labels.dtype != torch.int64:
        labels = labels.to(torch.int64)
    return labels.contiguous()


@functools.lru_cache(maxsize=256)
def _cpu_call_constants(spec: LossSpec, rows: int) -> tuple:
    """The C kernel's arguments that depend only on the spec and N, built once per pair: at the
    papers' N = 128 the whole kernel takes a few microseconds, so per-call Python counts."""
    reduce = spec.reduction != "none"
    loss_shape = () if reduce else (rows, spec.num_tasks)
    return loss_shape, (spec.offsets, spec.task_scale(rows), _C_KIND[spec.kind], spec.margin, reduce)


def _cpu_forward(logits, labels, spec: LossSpec, compute_grad: bool, validate: bool):
    logits = _unit_column_stride(logits)
    labels = _int64_labels(labels)
    rows, width = logits.shape
    loss_shape, constants = _cpu_call_constants(spec, rows)
    loss = torch.empty(loss_shape)
    grad = None
    if compute_grad:
        grad = torch.empty_like(logits) if logits.is_contiguous() else torch.empty((rows, width), dtype=logits.dtype)
    invalid = _C.multitask_loss_forward(
        logits.data_ptr(), _C_DTYPE[logits.dtype], rows, width, logits.stride(0), labels.data_ptr(), *constants,
        loss.data_ptr(), grad.data_ptr() if compute_grad else 0, torch.get_num_threads())
    if invalid and validate:
        check_label_range(labels, spec)  # raises, naming the first bad label
    return loss, grad


def _cuda_forward(logits, labels, spec: LossSpec, compute_grad: bool, validate: bool):
    from ..triton.multitask_loss import multitask_loss_forward

    # Weights and 1/N go in separately: the device weight table then does not depend on N.
    row_losses, grad, invalid = multitask_loss_forward(
        _unit_column_stride(logits), _int64_labels(labels), spec.num_classes, spec.output_weights,
        spec.row_scale(logits.shape[0]), spec.kind, spec.margin, compute_grad)
    if validate and bool(invalid.item()):  # validate=True is the opt-in host sync
        check_label_range(labels, spec)
    return (row_losses.sum() if spec.reduction != "none" else row_losses), grad


def _reference_forward(logits, labels, spec: LossSpec, compute_grad: bool, validate: bool):
    # float64 and devices without a kernel: the reference, differentiated once here so
    # that backward has the same contract (scale a stored gradient) as the kernels.
    args = (spec.num_classes, spec.kind, spec.task_weights, spec.margin, spec.reduction)
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_(compute_grad)
        loss = reference_multitask_loss(leaf, labels, *args)
        grad = torch.autograd.grad(loss.sum(), leaf)[0] if compute_grad else None
    return loss.detach(), grad


def fused_forward(logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec, compute_grad: bool,
                  validate: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Loss (float32, or float64 for float64 logits) and, if asked, d loss / d logits.

    For "mean"/"sum" the gradient is of the reduced loss; for "none" it is of
    ``loss.sum()``, i.e. each column's derivative of its own task's per-row loss.
    """
    if logits.dtype in _C_DTYPE:
        if takes_cuda_path(logits):
            return _cuda_forward(logits, labels, spec, compute_grad, validate)
        if logits.is_cpu:
            return _cpu_forward(logits, labels, spec, compute_grad, validate)
    return _reference_forward(logits, labels, spec, compute_grad, validate)


def scale_saved_grad(grad: torch.Tensor, grad_loss: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Backward of the fused loss: the stored gradient times the incoming one."""
    if spec.reduction != "none":
        return grad * grad_loss.to(grad.dtype)
    per_column = torch.cat(
        [grad_loss[:, t:t + 1].expand(-1, c) for t, c in enumerate(spec.num_classes)], dim=1)
    return grad * per_column.to(grad.dtype)


class FusedMultiTaskLoss(torch.autograd.Function):
    """Eager path: forward runs the kernel and keeps its gradient; backward scales it."""

    @staticmethod
    def forward(ctx, logits, labels, spec: LossSpec, validate: bool):
        loss, grad = fused_forward(logits, labels, spec, True, validate)
        ctx.grad = grad
        ctx.spec = spec
        ctx.save_for_backward(logits, labels)  # read only by a second backward or create_graph=True
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Handed over rather than kept: autograd then stores it as .grad without a copy.
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through a graph kept by retain_graph=True
            logits, labels = ctx.saved_tensors
            grad = fused_forward(logits, labels, ctx.spec, True, False)[1]
        if ctx.spec.reduction == "none" or takes_cuda_path(grad) or grad_loss.item() != 1.0:
            grad = scale_saved_grad(grad, grad_loss, ctx.spec)
        # else loss.backward(): no pass over the gradient (eager only: .item() is free on the CPU)
        if torch.is_grad_enabled():  # create_graph=True: a later backward through grad must fail clearly
            grad = _NoDoubleBackward.apply(grad, ctx.saved_tensors[0])
        return grad, None, None, None


class _NoDoubleBackward(torch.autograd.Function):
    """``grad``, as a function of ``logits`` whose backward says that the fused loss has no
    second derivative."""

    @staticmethod
    def forward(ctx, grad, logits):
        return grad.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("mtkernels.multitask_loss does not support double backward (a gradient of its "
                           "gradient); use mtkernels.reference.multitask_loss, which has the same signature, "
                           "where higher-order gradients are needed")


# ---------------------------------------------------------------------------------
# torch.library custom op: used under torch.compile / export.


@torch.library.custom_op("mtkernels::multitask_loss", mutates_args=())
def multitask_loss_op(logits: torch.Tensor, labels: torch.Tensor, num_classes: list[int],
                      task_weights: list[float], kind: str, margin: float, reduction: str,
                      compute_grad: bool, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, grad); grad is empty when compute_grad is False."""
    spec = loss_spec(num_classes, kind, task_weights, margin, reduction)
    loss, grad = fused_forward(logits, labels, spec, compute_grad, validate)
    return loss, (grad if grad is not None else logits.new_empty(0))


@multitask_loss_op.register_fake
def _(logits, labels, num_classes, task_weights, kind, margin, reduction, compute_grad, validate):
    shape = () if reduction != "none" else (logits.shape[0], len(num_classes))
    loss = logits.new_empty(shape, dtype=loss_dtype(logits.dtype))
    grad = logits.new_empty((logits.shape[0], logits.shape[1]) if compute_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    _, _, num_classes, task_weights, kind, margin, reduction, _, _ = inputs
    ctx.spec = loss_spec(num_classes, kind, task_weights, margin, reduction)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    if grad.dim() != 2 and ctx.needs_input_grad[0]:  # the 1-D placeholder: no gradient was computed
        raise RuntimeError("mtkernels::multitask_loss was called with compute_grad=False; "
                           "call it with compute_grad=True when the logits need a gradient")
    return (scale_saved_grad(grad, grad_loss, ctx.spec),) + (None,) * 8


multitask_loss_op.register_autograd(_backward, setup_context=_setup_context)
