"""Triton kernel for the masked multi-task loss (CUDA / ROCm).

One launch covers every task: program (i, t) handles rows [i*BLOCK_N, (i+1)*BLOCK_N)
of task t's column segment. The forward pass computes the per-row loss and writes the
gradient, already scaled by mu_t / N, so backward never reads the logits again:

  ce:  online log-sum-exp over the segment in BLOCK_C chunks (any number of classes),
       then grad = (softmax - onehot) * scale in a second sweep over the same rows.
  svm: squared hinge h_j = max(0, s_j - s_y + margin), j != y; grad_j = 2 h_j scale,
       grad_y = -sum_j 2 h_j scale.

Labels outside [-1, C_t) are treated as unlabelled and counted in ``invalid`` with an
atomic add, so the host never has to synchronise; the caller decides whether to check.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .float_ops import relu_nan

# Elements per program tile: enough work per program, small enough to stay in registers.
TILE_ELEMENTS = 4096
MAX_BLOCK_C = 1024


@triton.jit
def multitask_loss_kernel(
    logits_ptr, labels_ptr, offsets_ptr, weights_ptr, loss_ptr, grad_ptr, invalid_ptr,
    n_rows, logits_row_stride, num_tasks, row_scale, margin,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, IS_SVM: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    task = tl.program_id(1)
    lo = tl.load(offsets_ptr + task)
    classes = tl.load(offsets_ptr + task + 1) - lo
    width = tl.load(offsets_ptr + num_tasks)
    scale = tl.load(weights_ptr + task) * row_scale

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    label = tl.load(labels_ptr + rows64 * num_tasks + task, mask=row_ok, other=-1)
    valid = row_ok & (label >= 0) & (label < classes)
    tl.atomic_add(invalid_ptr, tl.sum((row_ok & (label != -1) & ~valid).to(tl.int32), axis=0))
    label = tl.where(valid, label, 0).to(tl.int32)

    row_base = logits_ptr + rows64 * logits_row_stride + lo
    true_score = tl.load(row_base + label, mask=valid, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_C)

    if IS_SVM:
        hinge_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        hinge_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, classes, BLOCK_C):
            c = c0 + cols
            m = valid[:, None] & (c < classes)[None, :]
            z = tl.load(row_base[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
            h = relu_nan(z - true_score[:, None] + margin)
            h = tl.where(m & (c[None, :] != label[:, None]), h, 0.0)
            hinge_sum += tl.sum(h, axis=1)
            hinge_sq += tl.sum(h * h, axis=1)
        row_loss = hinge_sq
    else:
        run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, classes, BLOCK_C):
            c = c0 + cols
            m = valid[:, None] & (c < classes)[None, :]
            z = tl.load(row_base[:, None] + c[None, :], mask=m, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            # Rows with nothing loaded keep max = -inf; shift by 0 there to avoid inf - inf.
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe_max) + tl.sum(tl.exp(z - safe_max[:, None]), axis=1)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        row_loss = lse - true_score

    row_loss = tl.where(valid, row_loss, 0.0)
    tl.store(loss_ptr + rows64 * num_tasks + task, row_loss * scale, mask=row_ok)

    if COMPUTE_GRAD:
        grad_base = grad_ptr + rows64 * width + lo
        g_scale = tl.where(valid, scale, 0.0)
        for c0 in range(0, classes, BLOCK_C):
            c = c0 + cols
            in_seg = (c < classes)[None, :]
            m = valid[:, None] & in_seg
            z = tl.load(row_base[:, None] + c[None, :], mask=m, other=0.0).to(tl.float32)
            is_label = c[None, :] == label[:, None]
            if IS_SVM:
                h = relu_nan(z - true_score[:, None] + margin)
                g = tl.where(is_label, -hinge_sum[:, None], h) * (2.0 * g_scale)[:, None]
            else:
                g = (tl.exp(z - lse[:, None]) - is_label.to(tl.float32)) * g_scale[:, None]
            g = tl.where(m, g, 0.0)
            tl.store(grad_base[:, None] + c[None, :], g.to(grad_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & in_seg)


def loss_constexprs(num_classes: tuple[int, ...], kind: str, compute_grad: bool) -> dict:
    """The launch configuration for these tasks (the ahead-of-time tests compile every one)."""
    block_c = min(triton.next_power_of_2(max(num_classes)), MAX_BLOCK_C)
    block_n = max(1, min(256, TILE_ELEMENTS // block_c))
    return dict(BLOCK_N=block_n, BLOCK_C=block_c, IS_SVM=kind == "svm", COMPUTE_GRAD=compute_grad)


@functools.lru_cache(maxsize=64)
def _task_tables(num_classes: tuple[int, ...], weights: tuple[float, ...], device: torch.device):
    """Class offsets and task weights on the device, built once per configuration: a copy from
    the host, which CUDA-graph capture forbids, so the first call must come before any capture
    (the warm-up that capture needs anyway)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"mtkernels.multitask_loss with num_classes={num_classes} was first called on {device} "
                           "inside CUDA-graph capture; call it once before capturing (a warm-up step), so that "
                           "its device tables exist")
    offsets = [0]
    for c in num_classes:
        offsets.append(offsets[-1] + c)
    return (torch.tensor(offsets, dtype=torch.int32, device=device),
            torch.tensor(weights, dtype=torch.float32, device=device))


def multitask_loss_forward(logits: torch.Tensor, labels: torch.Tensor, num_classes: tuple[int, ...],
                           task_weights: tuple[float, ...], row_scale: float, kind: str, margin: float,
                           compute_grad: bool):
    """Launch the kernel. Returns per-row losses [N, T] already multiplied by mu_t * row_scale,
    the gradient (or None) and a 1-element int32 count of out-of-range labels.

    ``logits`` must have unit column stride; ``labels`` must be contiguous int64.
    """
    n_rows, width = logits.shape
    offsets, weights = _task_tables(num_classes, task_weights, logits.device)
    row_losses = torch.empty((n_rows, len(num_classes)), dtype=torch.float32, device=logits.device)
    grad = torch.empty((n_rows, width), dtype=logits.dtype, device=logits.device) if compute_grad else None
    invalid = torch.zeros(1, dtype=torch.int32, device=logits.device)
    constexprs = loss_constexprs(num_classes, kind, compute_grad)
    grid = (triton.cdiv(n_rows, constexprs["BLOCK_N"]), len(num_classes))
    if n_rows > 0:
        multitask_loss_kernel[grid](
            logits, labels, offsets, weights, row_losses, grad if compute_grad else row_losses, invalid,
            n_rows, logits.stride(0), len(num_classes), row_scale, margin, **constexprs)
    return row_losses, grad, invalid
