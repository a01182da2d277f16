"""Metrics inside one labelled structure of a mask (region SSIM, PSNR and MAE).

Region SSIM is the mean of the per-pixel SSIM map (the protocol's window and constants, the
map computed on the whole slice) over the structure's pixels; region PSNR and MAE use only the
structure's pixels. A structure absent from a slice gives NaN for that slice.
"""

from __future__ import annotations

import torch

from mrivq.metrics.image import ssim_map

REGION_PROTOCOL = (
    "Inside one structure of the slice's mask: SSIM is the mean of the per-pixel SSIM map "
    "(the protocol's settings, computed on the whole slice, so windows at the structure's edge "
    "see its surroundings) over the structure's pixels; PSNR (data range 1) and MAE use the "
    "structure's pixels only; averaged over the slices that contain the structure."
)


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
