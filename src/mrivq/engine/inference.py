"""A model over NumPy slices in batches: slices to a device batch, slices to codes and codes to slices.

Everything here runs under ``torch.inference_mode`` in eval mode; nothing changes the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mrivq.nn import VQVAE2
from mrivq.run_dir import atomic_write

#: The most pixels one batch of slices may hold (16 slices of 256 x 128): larger slices go in
#: smaller batches, so memory does not grow with a model's image size.
MAX_BATCH_PIXELS = 16 * 256 * 128


def _batch(size: tuple[int, ...], batch_size: int) -> int:
    return max(1, min(batch_size, MAX_BATCH_PIXELS // max(1, int(np.prod(size)))))


def slices_to_batch(slices: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W)`` float32 array -> ``(B, 1, H, W)`` channels-last tensor on ``device``."""
    # A copy: the cached slices are a read-only memory map, and the batch must not alias it.
    batch = torch.from_numpy(np.array(slices, dtype=np.float32, copy=True)).unsqueeze(1)
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def encode_images(model: VQVAE2, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``images`` ``(N, H, W)`` float32 in model input range (an array, or anything
    with ``len()`` that slices into such arrays, as :class:`mrivq.data.augment.TransformedSlices`).

    Batches go in as :func:`slices_to_batch` makes them (channels-last), as in evaluation, so a
    model in the same memory format gives the same codes here as :func:`mrivq.engine.evaluator.evaluate`.
    Returns ``(codes_top, codes_bottom)``: int64 ``(N, h, w)`` and ``(N, 2h, 2w)``.
    """
    model.eval()
    device = next(model.parameters()).device
    tops, bottoms = [], []
    batch_size = _batch(np.shape(images[:1])[1:], batch_size)
    for lo in range(0, len(images), batch_size):
        top, bottom = model.encode(slices_to_batch(images[lo:lo + batch_size], device))
        tops.append(top.cpu().numpy())
        bottoms.append(bottom.cpu().numpy())
    return np.concatenate(tops), np.concatenate(bottoms)


@torch.inference_mode()
def decode_images(model: VQVAE2, codes_top: np.ndarray, codes_bottom: np.ndarray,
                  batch_size: int = 32) -> np.ndarray:
    """Slices from codes: ``(N, h, w)`` and ``(N, 2h, 2w)`` int -> ``(N, 8h, 8w)`` float32 (unclamped)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    batch_size = _batch(tuple(8 * side for side in np.shape(codes_top)[1:]), batch_size)
    for lo in range(0, len(codes_top), batch_size):
        top = torch.as_tensor(np.asarray(codes_top[lo:lo + batch_size], dtype=np.int64), device=device)
        bottom = torch.as_tensor(np.asarray(codes_bottom[lo:lo + batch_size], dtype=np.int64), device=device)
        out.append(model.decode_codes(top, bottom)[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def cached_codes(model: VQVAE2, images: np.ndarray, *, cache_dir: Path, key: str,
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, bool]:
    """:func:`encode_images`, kept in ``cache_dir/codes/<key>.npz``: ``key`` must change with the
    model (its whole-state fingerprint) and the slices (their cache key). Returns the codes and
    whether they came from the cache."""
    path = Path(cache_dir) / "codes" / f"{key}.npz"
    try:
        with np.load(path) as npz:
            top, bottom = npz["codes_top"].astype(np.int64), npz["codes_bottom"].astype(np.int64)
        if len(top) == len(images):
            return top, bottom, True
    except (OSError, KeyError, ValueError, EOFError):
        pass  # absent or unreadable: encode again
    top, bottom = encode_images(model, images, batch_size)
    atomic_write(path, lambda fh: np.savez(fh, codes_top=top.astype(np.uint16), codes_bottom=bottom.astype(np.uint16)),
                 listed=False)  # a cache, not a run file: in no run's manifest
    return top, bottom, False
