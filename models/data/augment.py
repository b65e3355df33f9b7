"""Paper 1, section 3.6 augmentation on whole batches: random crop with margins, horizontal
flip, rotation in [-15, 15] degrees with black fill -- one affine resampling per batch
(``affine_grid`` + ``grid_sample``), no per-image Python."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def to_model_input(pixels) -> torch.Tensor:
    """uint8 gray faces [N, H, W] (NumPy or torch) -> float [N, 1, H, W] in [0, 1], the networks' input."""
    pixels = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
    return pixels.unsqueeze(1).float().div_(255.0)


def augment_batch(images: torch.Tensor, generator: Optional[torch.Generator] = None, margin: int = 4,
                  max_degrees: float = 15.0, flip: bool = True) -> torch.Tensor:
    """Random crop of the image padded by ``margin`` black pixels (a shift of up to
    ``margin`` pixels each way), flip with probability 1/2, rotation uniform in
    [-max_degrees, max_degrees] about the centre; outside the source is black (0).
    ``images``: float [B, C, H, W]. Deterministic for a given ``generator`` state."""
    if images.dim() != 4 or not images.dtype.is_floating_point:
        raise ValueError(f"images must be a float [B, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    if margin < 0 or max_degrees < 0:
        raise ValueError(f"margin and max_degrees must be >= 0, got {margin}, {max_degrees}")
    b, _, h, w = images.shape
    device = images.device

    def uniform(low, high):
        return torch.rand(b, generator=generator) * (high - low) + low

    angle = uniform(-max_degrees, max_degrees) * (math.pi / 180.0)
    mirror = (torch.rand(b, generator=generator) < 0.5).float() * 2 - 1 if flip else torch.ones(b)
    shift_x = torch.randint(-margin, margin + 1, (b,), generator=generator).float()
    shift_y = torch.randint(-margin, margin + 1, (b,), generator=generator).float()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output coordinates to input coordinates in [-1, 1] (align_corners=False):
    # rotate, then mirror x, then shift by whole pixels (2 / size per pixel).
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * mirror
    theta[:, 0, 1] = -sin * mirror * (h / w)
    theta[:, 1, 0] = sin * (w / h)
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = shift_x * 2.0 / w
    theta[:, 1, 2] = shift_y * 2.0 / h
    grid = F.affine_grid(theta.to(device=device, dtype=images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
