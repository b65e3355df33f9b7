"""Independent float64 NumPy implementation of the papers' eqs. 1-3, for tests only."""

import numpy as np


def task_columns(num_classes):
    offsets = np.concatenate([[0], np.cumsum(num_classes)]).astype(int)
    return [(offsets[t], offsets[t + 1]) for t in range(len(num_classes))]


def per_task(logits, labels, num_classes, kind, margin=1.0):
    """Per-(row, task) losses and d l_it / d z (each column belongs to one task)."""
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[0]
    losses = np.zeros((n, len(num_classes)))
    grad = np.zeros_like(logits)
    rows = np.arange(n)
    for t, (lo, hi) in enumerate(task_columns(num_classes)):
        z = logits[:, lo:hi]
        y = labels[:, t]
        labelled = y >= 0
        y0 = np.where(labelled, y, 0)
        if kind == "ce":
            m = z.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
            loss = lse - z[rows, y0]
            g = np.exp(z - lse[:, None])
            g[rows, y0] -= 1.0
        else:
            h = np.maximum(0.0, z - z[rows, y0][:, None] + margin)
            h[rows, y0] = 0.0
            loss = (h * h).sum(axis=1)
            g = 2.0 * h
            g[rows, y0] = -g.sum(axis=1)
        losses[:, t] = np.where(labelled, loss, 0.0)
        grad[:, lo:hi] = g * labelled[:, None]
    return losses, grad


def multitask_loss(logits, labels, num_classes, kind="ce", task_weights=None, margin=1.0,
                   reduction="mean", upstream=None):
    """(loss, d(loss . upstream)/d logits); upstream is 1 for scalars, [N, T] for "none"."""
    labels = np.asarray(labels)
    n, num_tasks = labels.shape
    weights = np.ones(num_tasks) if task_weights is None else np.asarray(task_weights, dtype=np.float64)
    losses, grad = per_task(logits, labels, num_classes, kind, margin)
    column_task = np.repeat(np.arange(num_tasks), num_classes)
    if reduction == "none":
        up = np.ones((n, num_tasks)) if upstream is None else np.asarray(upstream, dtype=np.float64)
        return losses, grad * up[:, column_task]
    scale = weights / max(n, 1) if reduction == "mean" else weights
    up = 1.0 if upstream is None else float(upstream)
    return float((losses * scale).sum()), grad * scale[column_task] * up
