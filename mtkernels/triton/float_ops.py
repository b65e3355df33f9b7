"""Triton helpers whose NaN behaviour matches eager PyTorch (the twin of csrc/float_ops.h):
``tl.maximum`` and ``tl.max`` return the other operand for NaN by default, which would hide
a corrupt input behind a ReLU, a hinge or a max-pool."""

import triton
import triton.language as tl


@triton.jit
def max_nan(a, b):
    """max(a, b), NaN when either is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_nan(x):
    """max(x, 0), NaN for NaN."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
