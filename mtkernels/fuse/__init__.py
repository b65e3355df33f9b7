"""Inference fusion, one job per file:

* :mod:`~mtkernels.fuse.rewrite`: the module-graph rewrite (``fuse_for_inference``, ``Fuser``);
* :mod:`~mtkernels.fuse.layers`: the fused layers;
* :mod:`~mtkernels.fuse.tuning`: timing candidates, batch buckets, the on-disk decision cache;
* :mod:`~mtkernels.fuse.plans`: building, bounding and replaying a network's plans;
* :mod:`~mtkernels.fuse.precision`: bf16 and int8 (calibration, uint8 hand-over).
"""

from .layers import AffineReLU, ChannelsLastFlatten, FusedBranches, FusedConv2d, FusedHeads, FusedLinear, fold_batchnorm
from .plans import ChainStep, FusedMultiTaskNet
from .precision import PRECISIONS, matrix_units
from .rewrite import Fuser, flatten_channels_last, fuse_for_inference
from .tuning import batch_bucket, tuning_cache

__all__ = ["fuse_for_inference", "Fuser", "FusedConv2d", "FusedLinear", "AffineReLU", "FusedHeads", "FusedBranches",
           "FusedMultiTaskNet", "ChainStep", "ChannelsLastFlatten", "flatten_channels_last", "fold_batchnorm",
           "batch_bucket", "tuning_cache", "PRECISIONS", "matrix_units"]
