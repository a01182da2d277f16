"""Image and codebook metrics, following the SSIM protocol in ARCHITECTURE.md.

SSIM: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, ``data_range=1``, computed per
image and averaged over images. Inputs are expected in [0, 1]; reconstructions are
clamped to [0, 1] before scoring. PSNR uses the same range.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

SSIM_PROTOCOL = (
    "SSIM per slice on [0, 1]-normalised images (reconstruction clamped to [0, 1]), "
    "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data_range 1, averaged over slices; "
    "PSNR with the same data range."
)


@torch.no_grad()
def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image. ``(B, C, H, W)`` in [0, 1] -> ``(B,)`` float32."""
    rec = reconstruction.float().clamp(0.0, 1.0)
    tgt = target.float()
    return structural_similarity_index_measure(
        rec, tgt, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0,
        k1=0.01, k2=0.03, reduction="none",
    ).reshape(-1)


@torch.no_grad()
def psnr_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image. ``(B, C, H, W)`` in [0, 1] -> ``(B,)`` float32."""
    rec = reconstruction.float().clamp(0.0, 1.0)
    tgt = target.float()
    return peak_signal_noise_ratio(
        rec, tgt, data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).reshape(-1)


@torch.no_grad()
def mse_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image on the clamped reconstruction -> ``(B,)``."""
    rec = reconstruction.float().clamp(0.0, 1.0)
    return (rec - target.float()).pow(2).flatten(1).mean(1)


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


def raw_bits_per_pixel(image_size: tuple[int, int], top_shape: tuple[int, int],
                       bottom_shape: tuple[int, int], n_embed_top: int, n_embed_bottom: int) -> float:
    """Bits per pixel of the codes stored as fixed-width indices (log2 of each codebook size)."""
    bits = (math.prod(top_shape) * math.log2(n_embed_top)
            + math.prod(bottom_shape) * math.log2(n_embed_bottom))
    return bits / math.prod(image_size)
