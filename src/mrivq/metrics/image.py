"""Whole-image metrics, following the SSIM protocol in docs/contracts.md.

SSIM: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, ``data_range=1``, computed per
image and averaged over images. Inputs are expected in [0, 1]; reconstructions are
clamped to [0, 1] before scoring. PSNR uses the same range. Model outputs under a
normalisation that is not already [0, 1] (``zscore``) are mapped there first with
:func:`to_unit_range`, so a perfect reconstruction scores SSIM 1 under every policy.
Scores are always computed in float32, whatever precision trained the model.

The scores are torchmetrics' own, imported when first computed: importing torchmetrics loads
matplotlib, which the model and compression layers must not pull in.
"""

from __future__ import annotations

import numpy as np
import torch

SCORING_PRECISION = "fp32"

SSIM_PROTOCOL = (
    "SSIM per slice on [0, 1]-normalised images (z-scored slices mapped to [0, 1] by the "
    "target slice's own minimum and maximum; reconstruction clamped to [0, 1]), computed in float32, "
    "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data_range 1, averaged over slices; "
    "PSNR with the same data range. Region metrics: SSIM is the mean of the SSIM map "
    "(same settings, computed on the whole slice) over the structure's mask pixels; PSNR and "
    "MAE use the structure's pixels only."
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


def unit_range_images(images: np.ndarray, normalize: str) -> np.ndarray:
    """Model-input slices ``(N, H, W)`` on the scoring range [0, 1] (what codecs compress, what pictures show)."""
    if normalize in UNIT_RANGE_POLICIES:
        return images
    stack = torch.from_numpy(np.array(images, dtype=np.float32))[:, None]
    return to_unit_range(stack, stack, normalize)[1][:, 0].numpy()


#: Images per torchmetrics SSIM call. Each image's SSIM is its own, so the numbers do not depend on
#: it (identical on this project's AVX-512 machine; at most float32 rounding where a CPU's
#: convolution picks another kernel for another batch size); the time does: 540 slices of 256x128 took 6.9 s in one call and 2.3 s in calls of 32 on 2
#: cores (the whole batch's five filtered maps, 350 MB, do not stay in cache).
SSIM_CHUNK = 32


@torch.no_grad()
def ssim_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image. ``(B, C, H, W)`` in [0, 1] -> ``(B,)`` float32."""
    return torch.cat([_ssim(reconstruction[i:i + SSIM_CHUNK], target[i:i + SSIM_CHUNK]).reshape(-1)
                      for i in range(0, max(len(target), 1), SSIM_CHUNK)])


@torch.no_grad()
def ssim_map(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM under the protocol. ``(B, C, H, W)`` in [0, 1] -> ``(B, C, H, W)`` float32.

    Its mean over all pixels is :func:`ssim_per_image` (the slice is reflection-padded by half
    the window, so the map has the input's size).
    """
    return torch.cat([_ssim(reconstruction[i:i + SSIM_CHUNK], target[i:i + SSIM_CHUNK], full=True)[1]
                      for i in range(0, max(len(target), 1), SSIM_CHUNK)])


def _ssim(reconstruction: torch.Tensor, target: torch.Tensor, full: bool = False):
    """torchmetrics' SSIM under the protocol: per image, and with ``full`` the map too."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        reconstruction.float().clamp(0.0, 1.0), target.float(), gaussian_kernel=True, sigma=1.5, kernel_size=11,
        data_range=1.0, k1=0.01, k2=0.03, reduction="none", return_full_image=full,
    )


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
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        rec, tgt, data_range=1.0, reduction="none", dim=(1, 2, 3)
    ).reshape(-1)


@torch.no_grad()
def mse_per_image(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image on the clamped reconstruction -> ``(B,)``."""
    rec = reconstruction.float().clamp(0.0, 1.0)
    return (rec - target.float()).pow(2).flatten(1).mean(1)
