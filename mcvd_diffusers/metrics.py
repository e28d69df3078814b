"""Per-frame metrics on videos in [0, 1]."""

from __future__ import annotations

import torch


def mse_per_frame(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) pairs -> (B, F) mean squared error of each frame."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return (prediction.float() - target.float()).pow(2).flatten(2).mean(-1)
