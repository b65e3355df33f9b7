"""mtkernels: fused kernels for multi-task face-attribute networks.

    loss = mtkernels.multitask_loss(logits, labels, num_classes=(2, 7, 2), kind="ce")
    crit = mtkernels.MultiTaskLoss(num_classes=(2, 7, 2))
    ref  = mtkernels.reference.multitask_loss(...)   # plain PyTorch ground truth
    fast = mtkernels.fuse_for_inference(model)       # eval-mode copy, same outputs
    mtkernels.fuse_for_training(model)               # CPU training: BatchNorm2d + ReLU as one op, faster convs
    mtkernels.retain_freed_memory()                  # CPU training: reuse freed memory, no page faults
"""

from . import reference
from .cpu_memory import retain_freed_memory
from .fuse import fuse_for_inference
from .loss import MultiTaskLoss, multitask_loss
from .training import BatchNormReLU2d, BatchNormReLUPool2d, TrainingConv2d, TrainingLinear, fuse_for_training

__all__ = ["multitask_loss", "MultiTaskLoss", "fuse_for_inference", "fuse_for_training", "BatchNormReLU2d",
           "BatchNormReLUPool2d", "TrainingConv2d", "TrainingLinear", "reference", "retain_freed_memory"]
__version__ = "0.1.0"
