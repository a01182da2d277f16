"""How a codebook is used: code counts, codes used and perplexity."""

from __future__ import annotations

import math

import torch


def code_counts(codes: torch.Tensor, n_embed: int) -> torch.Tensor:
    """How often each code index occurs in ``codes`` (any shape, int) -> ``(n_embed,)`` int64."""
    return torch.bincount(codes.reshape(-1).long(), minlength=n_embed)


def codebook_usage(counts: torch.Tensor) -> tuple[int, float]:
    """Codes used and perplexity (exp of the entropy of code frequencies) from counts."""
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return 0, 0.0
    probs = counts[counts > 0] / total
    entropy = -(probs * probs.log()).sum().item()
    return int((counts > 0).sum().item()), float(math.exp(entropy))
