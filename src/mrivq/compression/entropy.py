"""Codes as bitstreams under their frequencies (``constriction``'s range coder), and what codes cost.

The **frequencies** coder: every code of a level is coded under that level's code counts over
the coded set (the counts travel with the stream): :func:`encode_with_frequencies`,
:func:`decode_with_frequencies`. One stream: every top code slice by slice, then every bottom
code. Coding under a prior is :mod:`mrivq.compression.driver`'s.

Streams are uint32 words. *raw* bits are ``log2(n_embed)`` per code
(:func:`raw_bits_per_pixel`): what fixed-width indices would take.
"""

from __future__ import annotations

import math

import numpy as np

from mrivq.compression.driver import coder


def raw_bits_per_pixel(image_size: tuple[int, int], top_shape: tuple[int, int],
                       bottom_shape: tuple[int, int], n_embed_top: int, n_embed_bottom: int) -> float:
    """Bits per pixel of the codes stored as fixed-width indices (log2 of each codebook size)."""
    bits = (math.prod(top_shape) * math.log2(n_embed_top)
            + math.prod(bottom_shape) * math.log2(n_embed_bottom))
    return bits / math.prod(image_size)


# ---------------------------------------------------------------------------------------
# Under code frequencies
# ---------------------------------------------------------------------------------------

def code_count_table(codes_top: np.ndarray, codes_bottom: np.ndarray, n_embed: int) -> np.ndarray:
    """``(2, n_embed)`` uint32: how often each code occurs at the top and at the bottom."""
    return np.stack([np.bincount(np.asarray(c).ravel(), minlength=n_embed) for c in (codes_top, codes_bottom)]
                    ).astype(np.uint32)


def _frequencies(counts: np.ndarray) -> np.ndarray:
    counts = counts.astype(np.float64)
    return counts / counts.sum()


def encode_with_frequencies(codes_top: np.ndarray, codes_bottom: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Range-code ``codes_top`` ``(N, h, w)`` then ``codes_bottom`` ``(N, 2h, 2w)`` under each level's
    ``counts`` (:func:`code_count_table` of the same codes); returns the stream (uint32 words)."""
    categorical, queue = coder()
    encoder = queue.RangeEncoder()
    for codes, level_counts in zip((codes_top, codes_bottom), counts):
        encoder.encode(np.ascontiguousarray(codes, dtype=np.int32).ravel(),
                       categorical(_frequencies(level_counts), perfect=False))
    return encoder.get_compressed()


def decode_with_frequencies(words: np.ndarray, counts: np.ndarray, n: int, top_grid: tuple[int, int],
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`encode_with_frequencies`: ``n`` top grids ``top_grid`` and bottom grids twice as
    large, int64."""
    categorical, queue = coder()
    decoder = queue.RangeDecoder(np.ascontiguousarray(words, dtype=np.uint32))
    grids = (tuple(top_grid), (2 * top_grid[0], 2 * top_grid[1]))
    return tuple(decoder.decode(categorical(_frequencies(level_counts), perfect=False), n * math.prod(grid))
                 .astype(np.int64).reshape(n, *grid) for grid, level_counts in zip(grids, counts))


def ideal_bits(counts: np.ndarray) -> float:
    """``-sum log2 p`` of the codes these per-level ``counts`` describe, under their own frequencies:
    the length no coder of them beats."""
    bits = 0.0
    for level_counts in np.asarray(counts, dtype=np.float64):
        used = level_counts[level_counts > 0]
        bits -= float((used * np.log2(used / used.sum())).sum())
    return bits


# ---------------------------------------------------------------------------------------
# Where the bits go
# ---------------------------------------------------------------------------------------

TOP_STRIDE, BOTTOM_STRIDE = 8, 4  # pixels per code side at each level (VQ-VAE-2's encoders)


def bits_per_pixel_map(bits_top: np.ndarray, bits_bottom: np.ndarray) -> np.ndarray:
    """Per-code bits ``(N, h, w)`` and ``(N, 2h, 2w)`` spread evenly over the pixels each code
    covers (8 x 8 at the top, 4 x 4 at the bottom) and added: ``(N, 8h, 8w)`` float32 bits per
    pixel, whose mean over a slice is what its codes cost per pixel."""
    def spread(bits, stride):
        return np.repeat(np.repeat(np.asarray(bits, dtype=np.float32), stride, axis=1), stride, axis=2) / stride**2
    return spread(bits_top, TOP_STRIDE) + spread(bits_bottom, BOTTOM_STRIDE)
