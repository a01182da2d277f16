"""Residual blocks shared by the VQ-VAE-2 and the priors.

``ResBlock`` is the seed report's block; ``NormResBlock`` adds GroupNorm and SiLU and starts
as the identity. Both map ``(B, C, H, W)`` to the same shape.
"""

from __future__ import annotations

import torch
from torch import nn


class ResBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``; ``(B, in_channel, H, W)`` -> same shape."""

    def __init__(self, in_channel: int, channel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_channel, channel, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channel, in_channel, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def group_count(channels: int, most: int = 32) -> int:
    """GroupNorm groups for ``channels``: the largest divisor of ``channels`` up to ``most``."""
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


class NormResBlock(nn.Module):
    """``x + conv3x3(silu(gn(conv3x3(silu(gn(x))))))``; ``(B, in_channel, H, W)`` -> same shape.

    ``channel`` is the hidden width. The last convolution starts at zero, so a freshly built
    block is the identity and a deep stack of them starts as a plain encoder/decoder.
    """

    def __init__(self, in_channel: int, channel: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.GroupNorm(group_count(in_channel), in_channel),
            nn.SiLU(),
            nn.Conv2d(in_channel, channel, 3, padding=1),
            nn.GroupNorm(group_count(channel), channel),
            nn.SiLU(),
            nn.Conv2d(channel, in_channel, 3, padding=1),
        )
        nn.init.zeros_(self.conv[-1].weight)
        nn.init.zeros_(self.conv[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


#: Residual block classes by ``model.block``; each maps ``(in_channel, hidden) -> module``.
RESIDUAL_BLOCKS: dict[str, type[nn.Module]] = {"relu": ResBlock, "norm": NormResBlock}
