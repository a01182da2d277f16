"""Reconstruction losses: the report's MSE, L1, and a mix of (1 - SSIM) and L1 matched to the metric.

SSIM is what mrivq is judged by, and MSE is a poor proxy for it (Zhao et al., "Loss Functions
for Image Restoration with Neural Networks", 2017, found an SSIM/L1 mix better than L2 on every
metric, SSIM included). The SSIM here follows the scoring protocol of :mod:`mrivq.metrics`
(Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1, on the [0, 1] scoring range,
float32, the slice padded by reflection as the metric does) but blurs with two 1-D passes
instead of one 11x11 convolution, and leaves the reconstruction unclamped so every pixel has a
gradient: the metric's own implementation (torchmetrics) made a CPU training step 2.6x slower.

Example::

    >>> loss = reconstruction_loss(rec, x, kind="ssim_l1", ssim_weight=0.84, normalize="minmax")
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mrivq.metrics import UNIT_RANGE_POLICIES, to_unit_range

LOSSES = ("mse", "l1", "ssim_l1")
WINDOW, SIGMA, K1, K2 = 11, 1.5, 0.01, 0.03


@functools.lru_cache(maxsize=8)
def _gaussian(device: torch.device) -> torch.Tensor:
    """The protocol's 1-D Gaussian window, ``(WINDOW,)`` float32, summing to 1.

    Made outside inference mode even when first asked for inside it: the cached tensor must
    serve losses that need gradients later."""
    with torch.inference_mode(False):
        offsets = torch.arange(WINDOW, dtype=torch.float32) - (WINDOW - 1) / 2
        window = torch.exp(-(offsets**2) / (2 * SIGMA**2))
        return (window / window.sum()).to(device)


def differentiable_ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Differentiable SSIM of each image: ``(B, 1, H, W)`` on [0, 1] -> ``(B,)`` float32.

    The mean of the SSIM map over every pixel, the image reflection-padded by half the window
    (H, W >= 6); the reconstruction is not clamped. Equals :func:`mrivq.metrics.ssim_per_image`
    up to float rounding for reconstructions inside [0, 1].
    """
    rec, tgt = reconstruction.float(), target.float()
    window = _gaussian(rec.device)
    pad = (WINDOW - 1) // 2
    rec, tgt = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (rec, tgt))
    maps = torch.cat([rec, tgt, rec * rec, tgt * tgt, rec * tgt], dim=1)  # (B, 5, H + 10, W + 10)
    maps = F.conv2d(maps, window.view(1, 1, 1, WINDOW).expand(5, 1, 1, WINDOW), groups=5)
    maps = F.conv2d(maps, window.view(1, 1, WINDOW, 1).expand(5, 1, WINDOW, 1), groups=5)
    mu_r, mu_t, rr, tt, rt = maps.unbind(1)
    var_r, var_t, cov = rr - mu_r**2, tt - mu_t**2, rt - mu_r * mu_t
    c1, c2 = K1**2, K2**2
    ssim = ((2 * mu_r * mu_t + c1) * (2 * cov + c2)) / ((mu_r**2 + mu_t**2 + c1) * (var_r + var_t + c2))
    return ssim.flatten(1).mean(1)


def clamp_passing_gradients(reconstruction: torch.Tensor) -> torch.Tensor:
    """``reconstruction`` clamped to [0, 1] in value, its gradient passed through unchanged.

    Under a loss against a target in [0, 1] this charges what the clamped picture shows: a pixel
    below 0 whose target is 0 costs nothing and gets no gradient, while one below 0 whose target
    is above it is still pulled up (the gradient of ``clamp`` itself would be zero there, and such
    a pixel would never recover).

    >>> rec = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    >>> ((clamp_passing_gradients(rec) - torch.tensor([0.0, 0.5, 0.5])) ** 2).sum().backward()
    >>> rec.grad.tolist()
    [0.0, 0.0, 1.0]
    """
    return reconstruction + (reconstruction.clamp(0.0, 1.0) - reconstruction).detach()


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, *, kind: str = "mse",
                        ssim_weight: float = 0.84, normalize: str = "minmax",
                        clamped: bool = False) -> torch.Tensor:
    """Scalar float32 loss of a ``(B, 1, H, W)`` reconstruction against its model-space target.

    ``mse`` and ``l1`` compare in model space; ``ssim_l1`` is ``ssim_weight x (1 - SSIM) +
    (1 - ssim_weight) x L1`` on the scoring range (``normalize`` says how to map there).
    ``clamped`` compares the reconstruction as it is scored and decoded, clamped to [0, 1]
    (:func:`clamp_passing_gradients`; ``minmax`` and ``percentile`` only, whose model space is
    the scoring range).
    """
    rec, tgt = reconstruction.float(), target.float()
    if clamped:
        if normalize not in UNIT_RANGE_POLICIES:
            raise ValueError(f"a clamped loss needs a [0, 1] model space, not normalize {normalize!r}")
        rec = clamp_passing_gradients(rec)
    if kind == "mse":
        return F.mse_loss(rec, tgt)
    if kind == "l1":
        return F.l1_loss(rec, tgt)
    if kind == "ssim_l1":
        rec, tgt = to_unit_range(rec, tgt, normalize)
        ssim = differentiable_ssim(rec, tgt).mean()
        return ssim_weight * (1 - ssim) + (1 - ssim_weight) * F.l1_loss(rec, tgt)
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")
