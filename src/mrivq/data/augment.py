"""Training-only augmentation: random flips and intensity factors of model-space batches, and the
fixed mirrored, shifted and zoomed copies of a split that the prior trains on.

Used by training alone; validation, test and every score see the slices as they are. The
random draws come from the global torch CPU RNG, which the trainer saves in ``last.pt``, so a
resumed run augments exactly as the uninterrupted one would have. They are drawn on the CPU and
moved to the batch's device without a host sync, so a CUDA step stays sync-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

FLIPS = ("none", "horizontal", "both")


def augment(
    slices: torch.Tensor,
    *,
    flip: Literal["none", "horizontal", "both"] = "none",
    intensity: float = 0.0,
    crop: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Randomly crop, flip and rescale each slice of a model-space batch ``(B, C, H, W)``.

    Args:
        slices: ``(B, C, H, W)`` (``C = 1`` for MRI slices), any device and memory format.
        flip: ``"none"``; ``"horizontal"``: each slice is mirrored left-right as the pictures
            show it (along ``H``, HipMRI's right-to-left axis: the patient's sides swap) with
            probability 1/2; ``"both"``: also, independently, up-down (along ``W``, anterior to
            posterior) with probability 1/2.
        intensity: ``0`` for none, else each slice is multiplied by a factor uniform in
            ``[1 - intensity, 1 + intensity]`` (``0 <= intensity < 1``).
        crop: ``None``, or ``(h, w)``: the batch is cut to an ``h x w`` window at one random
            place (the same for every slice of the batch), so a step costs ``hw / HW`` of a
            whole slice's.

    Returns ``(B, C, H, W)`` (``(B, C, h, w)`` with ``crop``), same dtype, device and memory
    format; ``slices`` is not modified (and is returned itself when nothing is to be done).
    Draws, in order: ``torch.randint`` twice for the crop's corner (``crop``),
    ``torch.rand(B)`` for left-right flips, for up-down flips (``"both"``), for the factors
    (``intensity > 0``).

    Example:
        >>> _ = torch.manual_seed(0)  # the flip draws are then [0.496, 0.768]: below 1/2 flips
        >>> slices = torch.arange(3.0).view(1, 1, 3, 1).repeat(2, 1, 1, 1)
        >>> augment(slices, flip="horizontal")[:, 0, :, 0]
        tensor([[2., 1., 0.],
                [0., 1., 2.]])
    """
    if flip not in FLIPS:
        raise ValueError(f"flip must be one of {', '.join(FLIPS)}, got {flip!r}")
    if not 0 <= intensity < 1:
        raise ValueError(f"intensity must be in [0, 1), got {intensity}")
    batch_size = slices.shape[0]
    out = slices
    if crop is not None:
        (height, width), (h, w) = slices.shape[-2:], crop
        if not (0 < h <= height and 0 < w <= width):
            raise ValueError(f"crop {h} x {w} does not fit in slices of {height} x {width}")
        top = int(torch.randint(height - h + 1, ()))
        left = int(torch.randint(width - w + 1, ()))
        out = out[..., top:top + h, left:left + w]
    if flip != "none":
        out = _flip_chosen(out, _per_slice(torch.rand(batch_size) < 0.5, out), dim=-2)
    if flip == "both":
        out = _flip_chosen(out, _per_slice(torch.rand(batch_size) < 0.5, out), dim=-1)
    if intensity > 0:
        factors = 1 + intensity * (2 * torch.rand(batch_size) - 1)
        out = out * _per_slice(factors, out).to(out.dtype)
    return out  # elementwise ops keep the input's memory format (channels_last stays)


def _per_slice(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` CPU draws -> ``(B, 1, 1, 1)`` on ``like``'s device (a copy without a host sync)."""
    return values.to(like.device, non_blocking=True).view(-1, 1, 1, 1)


def _flip_chosen(slices: torch.Tensor, chosen: torch.Tensor, dim: int) -> torch.Tensor:
    # torch.where rather than indexing: a boolean index would wait for the device.
    return torch.where(chosen, slices.flip(dim), slices)


def prior_training_copies(images: np.ndarray, *, flip: str = "none", shifts: Sequence[int] = (),
                          scales: Sequence[float] = ()) -> dict:
    """The extra versions of ``images`` ``(N, H, W)`` whose codes the prior also trains on.

    Directions are those of the pictures (:func:`mrivq.reporting.plots.display`: the array's
    first axis runs left to right, its second top to bottom). For each ``s`` in ``shifts``, four
    copies moved by ``s`` pixels up, down, left and right (``"shifted-up-4px"`` ...), the edge
    rows or columns repeated into the gap, so nothing wraps around and anatomy that touches an
    edge stays whole. For each ``f`` in ``scales``, a copy zoomed by ``f`` about the centre
    (``"scaled-1.08x"``: bigger than life above 1, edges repeated below it), bilinear.
    ``flip="horizontal"``: the slices and each of those copies mirrored left-right too
    (``"mirrored"``, ``"mirrored-shifted-up-4px"`` ...): the patient's sides swap, the front
    stays at the front.

    The copies are :class:`TransformedSlices`: nothing is computed until a batch of them is
    read, so a split whose codes are cached costs nothing and one being encoded costs one batch
    of memory. Returns ``{name: array-like (N, H, W)}`` in a fixed order; empty when all are off.
    """
    if flip not in ("none", "horizontal"):
        raise ValueError(f"flip must be none or horizontal, got {flip!r}")
    limit = min(images.shape[1:])
    for shift in shifts:
        if not 0 < shift < limit:
            raise ValueError(f"each shift must be in (0, {limit}), got {shift}")
    for scale in scales:
        if not 0.5 <= scale <= 2 or scale == 1:
            raise ValueError(f"each scale must be in [0.5, 2] and not 1, got {scale}")
    moves = [(f"shifted-{name}-{s}px", {"dy": dy * s, "dx": dx * s}) for s in shifts
             for name, (dy, dx) in (("up", (0, -1)), ("down", (0, 1)), ("left", (-1, 0)), ("right", (1, 0)))]
    moves += [(f"scaled-{f:g}x", {"scale": f}) for f in scales]
    copies = {name: TransformedSlices(images, **move) for name, move in moves}
    if flip == "horizontal":
        copies["mirrored"] = TransformedSlices(images, mirror=True)
        copies.update({f"mirrored-{name}": TransformedSlices(images, mirror=True, **move) for name, move in moves})
    return copies


class TransformedSlices:
    """``images`` ``(N, H, W)`` mirrored along ``H`` (``mirror``), then moved ``dy`` pixels along
    ``H`` and ``dx`` along ``W`` with the edges repeated, then zoomed by ``scale`` about the
    centre, computed batch by batch: ``len()``, ``.shape``, ``[lo:hi]`` -> ``(n, H, W)`` array,
    and ``np.asarray`` for all of it. ``tag`` names exactly that transform (for cache keys)."""

    def __init__(self, images: np.ndarray, *, mirror: bool = False, dy: int = 0, dx: int = 0,
                 scale: float = 1.0) -> None:
        self.images, self.mirror, self.dy, self.dx, self.scale = images, mirror, dy, dx, scale
        self.shape = images.shape
        self.tag = "_".join(part for part, on in (("mirrorH", mirror), (f"dy{dy}", dy), (f"dx{dx}", dx),
                                                  (f"zoom{scale:g}", scale != 1)) if on)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: slice) -> np.ndarray:
        batch = self.images[rows]
        if self.mirror:
            batch = batch[:, ::-1]
        height, width = batch.shape[1:]
        dy, dx = self.dy, self.dx
        if dy or dx:
            padded = np.pad(batch, ((0, 0), (max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))), mode="edge")
            top, left = max(-dy, 0), max(-dx, 0)
            batch = padded[:, top:top + height, left:left + width]
        if self.scale != 1:
            batch = _zoom(batch, self.scale)
        return batch

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.ascontiguousarray(self[:])
        return out if dtype is None else out.astype(dtype)


def _zoom(batch: np.ndarray, factor: float) -> np.ndarray:
    """``(n, H, W)`` zoomed by ``factor`` about the centre, the same size; edges repeated, bilinear."""
    slices = torch.from_numpy(np.array(batch, dtype=np.float32))[:, None]
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=slices.dtype).expand(len(batch), 2, 3)
    grid = F.affine_grid(theta, list(slices.shape), align_corners=False)
    return F.grid_sample(slices, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0].numpy()
