"""Scores of reconstructions and codes, all in float32 on [0, 1] (the SSIM protocol: docs/contracts.md).

``image`` holds the SSIM protocol (whole slices), ``regions`` the scores inside mask
structures, ``codebook`` code counts and perplexity, ``stats`` the per-slice summary.
"""

from mrivq.metrics.codebook import code_counts, codebook_usage
from mrivq.metrics.image import (
    SCORING_PRECISION,
    SSIM_CHUNK,
    SSIM_PROTOCOL,
    UNIT_RANGE_POLICIES,
    mae_per_image,
    mse_per_image,
    psnr_per_image,
    ssim_map,
    ssim_per_image,
    to_unit_range,
    unit_range_images,
)
from mrivq.metrics.regions import REGION_PROTOCOL, region_metrics
from mrivq.metrics.stats import summary_stats

__all__ = [
    "REGION_PROTOCOL", "SCORING_PRECISION", "SSIM_CHUNK", "SSIM_PROTOCOL", "UNIT_RANGE_POLICIES", "code_counts",
    "codebook_usage", "mae_per_image", "mse_per_image", "psnr_per_image", "region_metrics", "ssim_map",
    "ssim_per_image", "summary_stats", "to_unit_range", "unit_range_images",
]
