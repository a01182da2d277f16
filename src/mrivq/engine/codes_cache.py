"""The codes cache: a VQ-VAE's codes of a set of slices, kept on disk between prior runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrivq.compression.codec import encode_images
from mrivq.nn import VQVAE2
from mrivq.run_dir import atomic_write


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
