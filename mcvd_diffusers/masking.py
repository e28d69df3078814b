"""MCVD's conditioning masks: each sample's past (or future) block is dropped with probability p."""

from __future__ import annotations

import torch


def draw_keep_mask(
    batch_size: int, prob_mask: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor | None:
    """A (B,) bool tensor, False for the samples whose block is replaced by zeros; None when p == 0."""
    if not 0 <= prob_mask <= 1:
        raise ValueError(f"mask probability must be in [0, 1], got {prob_mask}")
    if prob_mask == 0:
        return None
    return torch.rand(batch_size, generator=generator, device=device) >= prob_mask
