"""Bits of codes: raw indices, range coding under code frequencies, and range coding under the prior.

*raw* is ``log2(n_embed)`` per code; *entropy-coded* is the length of a real range-coded
bitstream (``constriction``) of each level's codes under that level's code frequencies over
the coded set, checked to decode back losslessly; *prior-coded* codes each symbol under the
prior's conditional probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mrivq.nn.prior import CodePrior

#: Side information per slice that decode needs besides the codes, in bytes: (offset, scale)
#: as float32, the affine's top 3x4 rows as float32, the original (h, w) as uint16.
SIDE_BYTES_PER_SLICE = 2 * 4 + 12 * 4 + 2 * 2


def raw_bits_per_pixel(image_size: tuple[int, int], top_shape: tuple[int, int],
                       bottom_shape: tuple[int, int], n_embed_top: int, n_embed_bottom: int) -> float:
    """Bits per pixel of the codes stored as fixed-width indices (log2 of each codebook size)."""
    bits = (math.prod(top_shape) * math.log2(n_embed_top)
            + math.prod(bottom_shape) * math.log2(n_embed_bottom))
    return bits / math.prod(image_size)


def range_code(symbols: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Range-code ``symbols`` (any shape, ints in ``[0, K)``) and return the bitstream (uint32 words).

    ``probabilities`` is ``(K,)`` for one distribution shared by all symbols, or
    ``(len(symbols), K)`` for one per symbol (in ``symbols.ravel()`` order). The stream is
    decoded again and compared: a mismatch is a bug, not a user error.
    """
    import constriction

    categorical = constriction.stream.model.Categorical
    flat = np.ascontiguousarray(symbols, dtype=np.int32).ravel()
    probs = np.ascontiguousarray(probabilities, dtype=np.float64)
    encoder = constriction.stream.queue.RangeEncoder()
    if probs.ndim == 1:
        encoder.encode(flat, categorical(probs, perfect=False))
    else:
        encoder.encode(flat, categorical(perfect=False), probs)
    words = encoder.get_compressed()
    decoder = constriction.stream.queue.RangeDecoder(words)
    if probs.ndim == 1:
        decoded = decoder.decode(categorical(probs, perfect=False), len(flat))
    else:
        decoded = decoder.decode(categorical(perfect=False), probs)
    if not np.array_equal(decoded, flat):
        raise RuntimeError("range coding did not round-trip")
    return words


def frequency_coded_bits(codes: np.ndarray, n_embed: int) -> dict:
    """Range-code one level's codes under their own frequencies over the set.

    Returns ``bits`` (the real bitstream length), ``entropy_bits`` (the ideal
    ``-sum log2 p``) and ``table_bytes`` (the frequency table a decoder needs: uint32 counts).
    """
    counts = np.bincount(codes.ravel(), minlength=n_embed).astype(np.float64)
    probs = counts / counts.sum()
    words = range_code(codes, probs)
    used = probs[probs > 0]
    return {"bits": int(words.size * 32),
            "entropy_bits": float(-(counts[counts > 0] * np.log2(used)).sum()),
            "table_bytes": int(n_embed * 4)}


def bits_report(codes_top: np.ndarray, codes_bottom: np.ndarray, n_embed: int,
                image_size: tuple[int, int], input_bytes: int | None = None,
                prior_bits: dict | None = None) -> dict:
    """Bits per pixel (raw, entropy-coded, ideal) of a set of code grids, and compression ratios.

    ``codes_*`` are ``(N, h, w)`` and ``(N, 2h, 2w)``; pixels are ``N x H x W`` of
    ``image_size``. ``input_bytes``: the input files' total size, for the ratios.
    ``prior_bits``: ``{"top": bits, "bottom": bits}`` of range coding under a prior.
    """
    n = len(codes_top)
    pixels = n * image_size[0] * image_size[1]
    raw = raw_bits_per_pixel(tuple(image_size), codes_top.shape[1:], codes_bottom.shape[1:],
                                     n_embed, n_embed)
    levels = {"top": frequency_coded_bits(codes_top, n_embed),
              "bottom": frequency_coded_bits(codes_bottom, n_embed)}
    coded_bits = sum(level["bits"] for level in levels.values())
    tables = sum(level["table_bytes"] for level in levels.values())
    coded_bytes = math.ceil(coded_bits / 8) + tables + n * SIDE_BYTES_PER_SLICE
    report = {
        "n_slices": n,
        "n_codes": {"top": int(codes_top[0].size), "bottom": int(codes_bottom[0].size)},
        "bits_per_pixel": {
            "raw": raw,
            "entropy_coded": coded_bits / pixels,
            "entropy_ideal": sum(level["entropy_bits"] for level in levels.values()) / pixels,
        },
        "bits_per_code": {name: level["bits"] / codes.size
                          for (name, level), codes in zip(levels.items(), (codes_top, codes_bottom))},
        "coded_bytes": coded_bytes,
        "coder": "range coding (constriction) under per-level code frequencies; the frequency "
                 "tables and per-slice side information are counted in coded_bytes",
    }
    if prior_bits is not None:
        bits = prior_bits["top"] + prior_bits["bottom"]
        report["bits_per_pixel"]["prior_coded"] = bits / pixels
        report["prior_coded_bytes"] = math.ceil(bits / 8) + n * SIDE_BYTES_PER_SLICE
    if input_bytes:
        report["input_bytes"] = int(input_bytes)
        report["compression_ratio"] = input_bytes / coded_bytes
        if prior_bits is not None:
            report["compression_ratio_prior"] = input_bytes / report["prior_coded_bytes"]
    return report


@torch.inference_mode()
def prior_coded_bits(prior: CodePrior, codes_top: np.ndarray, codes_bottom: np.ndarray,
                     batch_size: int = 16) -> dict:
    """Range-code both levels under the prior's conditional probabilities; real stream bits per level.

    The probabilities of every position come from one teacher-forced pass. A decoder would
    recompute them position by position, through the cached path that sampling uses; that
    path differs from this one in floating-point rounding, so a decoder needs the encoder's
    exact computation (same path, same device) to stay in step. The figure is the size of
    this stream, not yet a round trip through such a decoder.
    """
    bits = {"top": 0, "bottom": 0}
    for lo in range(0, len(codes_top), batch_size):
        top = torch.as_tensor(np.asarray(codes_top[lo:lo + batch_size], dtype=np.int64))
        bottom = torch.as_tensor(np.asarray(codes_bottom[lo:lo + batch_size], dtype=np.int64))
        for level, logits, codes in zip(("top", "bottom"), prior(top, bottom), (top, bottom)):
            probs = torch.softmax(logits.double(), dim=1).permute(0, 2, 3, 1).reshape(-1, prior.n_embed)
            bits[level] += int(range_code(codes.numpy(), probs.numpy()).size * 32)
    return bits
