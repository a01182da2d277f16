"""Image and codebook metrics, following the SSIM protocol in ARCHITECTURE.md.

SSIM: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, ``data_range=1``, computed per
image and averaged over images. Inputs are expected in [0, 1]; reconstructions are
clamped to [0, 1] before scoring. PSNR uses the same range. Model outputs under a
normalisation that is not already [0, 1] (``zscore``) are mapped there first with
:func:`to_unit_range`, so a perfect reconstruction scores SSIM 1 under every policy.
Scores are always computed in float32, whatever precision trained the model.

Region metrics (inside one labelled structure of a mask): region SSIM is the mean of the
per-pixel SSIM map (same window and constants, map computed on the whole slice) over the
structure's pixels; region PSNR and MAE use only the structure's pixels. A structure absent
from a slice gives NaN for that slice.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

SCORING_PRECISION = "fp32"

SSIM_PROTOCOL = (
    "SSIM per slice on [0, 1]-normalised images (z-scored slices mapped to [0, 1] by the "
    "target slice's own minimum and maximum; reconstruction clamped to [0, 1]), computed in float32, "
    "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data_range 1, averaged over slices; "
    "PSNR with the same data range. Region metrics: SSIM is the mean of the SSIM map "
    "(same settings, computed on the whole slice) over the structure's mask pixels; PSNR and "
    "MAE use the structure's pixels only."
)
REGION_PROTOCOL = (
    "Inside one structure of the slice's mask: SSIM is the mean of the per-pixel SSIM map "
    "(the protocol's settings, computed on the whole slice, so windows at the structure's edge "
    "see its surroundings) over the structure's pixels; PSNR (data range 1) and MAE use the "
    "structure's pixels only; averaged over the slices that contain the structure."
)


#: Normalisations whose model input is already [0, 1] (scored as it is).
UNIT_RANGE_POLICIES = ("minmax", "percentile")


def to_unit_range(reconstruction: torch.Tensor, target: torch.Tensor,
                  normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-space ``(B, C, H, W)`` reconstruction and target -> the scoring range, float32.

    ``minmax`` and ``percentile`` inputs are in [0, 1] already and come back unchanged (as
    float32). ``zscore`` inputs are mapped by each target slice's own minimum and maximum,
    ``(v - min) / (max - min)``, applied alike to the reconstruction (not clamped here:
    the metrics clamp it), so the target spans [0, 1] and a perfect reconstruction scores 1.
    Differentiable (the SSIM/L1 training loss goes through it).

    Example::

        >>> x = torch.randn(2, 1, 8, 8) * 3 + 1
        >>> rec, tgt = to_unit_range(x, x, "zscore")
        >>> float(tgt.min()), float(tgt.max()), torch.equal(rec, tgt)
        (0.0, 1.0, True)
    """
    rec, tgt = reconstruction.float(), target.float()
    if normalize in UNIT_RANGE_POLICIES:
        return rec, tgt
    low = tgt.amin(dim=(-2, -1), keepdim=True)
    spread = (tgt.amax(dim=(-2, -1), keepdim=True) - low).clamp_min(1e-12)
    return (rec - low) / spread, (tgt - low) / spread


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
def ssim_map(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM under the protocol. ``(B, C, H, W)`` in [0, 1] -> ``(B, C, H, W)`` float32.

    Its mean over all pixels is :func:`ssim_per_image` (the slice is reflection-padded by half
    the window, so the map has the input's size).
    """
    rec = reconstruction.float().clamp(0.0, 1.0)
    tgt = target.float()
    _, full = structural_similarity_index_measure(
        rec, tgt, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0,
        k1=0.01, k2=0.03, reduction="none", return_full_image=True,
    )
    return full


@torch.no_grad()
def region_metrics(reconstruction: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                   labels: dict[str, int | tuple[int, ...]]) -> dict[str, dict[str, torch.Tensor]]:
    """SSIM, PSNR and MAE inside each structure of each image.

    ``reconstruction`` and ``target`` are ``(B, 1, H, W)`` in [0, 1]; ``masks`` is ``(B, H, W)``
    integer labels; ``labels`` maps a structure name to its label (or labels). Returns
    ``{name: {"ssim", "psnr", "mae": (B,) float32}}``, NaN where the structure has no pixels.

    Example::

        >>> x = torch.rand(1, 1, 32, 32); m = torch.zeros(1, 32, 32, dtype=torch.long)
        >>> m[:, 8:16, 8:16] = 5
        >>> region_metrics(x, x, m, {"prostate": 5})["prostate"]["mae"]
        tensor([0.])
    """
    rec = reconstruction.float().clamp(0.0, 1.0)[:, 0]
    tgt = target.float()[:, 0]
    ssim_full = ssim_map(reconstruction, target)[:, 0]
    error = rec - tgt
    masks = masks.to(rec.device)
    out = {}
    for name, label in labels.items():
        wanted = torch.tensor(label if isinstance(label, (tuple, list)) else (label,), device=rec.device)
        inside = torch.isin(masks, wanted).float()
        pixels = inside.flatten(1).sum(1)
        empty = pixels == 0
        pixels = pixels.clamp(min=1)
        ssim = (ssim_full * inside).flatten(1).sum(1) / pixels
        mse = (error.pow(2) * inside).flatten(1).sum(1) / pixels
        mae = (error.abs() * inside).flatten(1).sum(1) / pixels
        psnr = 10.0 * torch.log10(1.0 / mse)  # inf for a perfect region, as the whole-slice PSNR
        nan = torch.tensor(float("nan"), device=rec.device)
        out[name] = {k: torch.where(empty, nan, v).float()
                     for k, v in (("ssim", ssim), ("psnr", psnr), ("mae", mae))}
    return out


@torch.no_grad()
def mae_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of each image on the clamped reconstruction -> ``(B,)``."""
    rec = reconstruction.float().clamp(0.0, 1.0)
    return (rec - target.float()).abs().flatten(1).mean(1)


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


def summary_stats(values) -> dict:
    """``{mean, std, p5, min}`` of per-slice values (a tensor or array) that exist.

    NaN marks a missing value (a structure absent from a slice) and is left out; an infinite
    one (the PSNR of a perfect slice) counts, so a mean it makes infinite stays infinite (and
    is written to JSON as null). All NaN when no value exists.
    """
    v = torch.as_tensor(values).double().reshape(-1)
    present = v[~torch.isnan(v)]
    if not len(present):
        return {"mean": math.nan, "std": math.nan, "p5": math.nan, "min": math.nan}
    return {"mean": float(present.mean()), "std": float(present.std(unbiased=False)),
            "p5": float(torch.quantile(present, 0.05)), "min": float(present.min())}


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
