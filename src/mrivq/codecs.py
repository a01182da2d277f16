"""Standard image codecs at the model's bit rate, as a yardstick for the learned codes.

Each slice (``(H, W)`` in [0, 1]) is quantised to 8 bits, the only depth all of Pillow's
lossy codecs take, and compressed on its own with the best quality setting whose file
(headers included) fits the bit budget ``bits_per_pixel * H * W``; when even the lowest
quality is larger, the lowest is used and the achieved rate says so. The decoded slice is
scored under the SSIM protocol of :mod:`mrivq.metrics`, like the model's reconstructions.

Example::

    >>> comparison = compare_codecs(test.images[:20], bits_per_pixel=0.70)
    >>> comparison["jpeg"]["bits_per_pixel"]["mean"] <= 0.70, comparison["jpeg"]["ssim"]["mean"]
    (True, 0.81...)
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, features

from . import metrics

# name -> (Pillow format, Pillow feature, settings from best to worst quality, save options)
_JPEG2000_RATIOS = tuple(float(r) for r in np.geomspace(2.0, 1000.0, 128))
CODECS = {
    "jpeg": ("JPEG", "jpg", tuple(range(95, 0, -1)), lambda q: {"quality": q, "optimize": True}),
    "jpeg2000": ("JPEG2000", "jpg_2000", _JPEG2000_RATIOS,
                 lambda r: {"quality_mode": "rates", "quality_layers": [r], "irreversible": True,
                            "no_jp2": True}),
    "webp": ("WEBP", "webp", tuple(range(100, -1, -1)),
             lambda q: {"quality": q, "method": 4, "lossless": False}),
}
CODEC_PROTOCOL = (
    "Each test slice, quantised to 8 bits, is compressed on its own at the best quality setting "
    "whose file (headers included) fits the model's bits per pixel, decoded, and scored under "
    "the SSIM protocol; bits_per_pixel gives the rate achieved."
)
SETTING_NAMES = {"jpeg": "quality", "jpeg2000": "compression ratio", "webp": "quality"}


def available_codecs() -> list[str]:
    """The codecs of :data:`CODECS` this Pillow build can write (JPEG always; the others if built in)."""
    return [name for name, (_, feature, _, _) in CODECS.items() if features.check(feature)]


def to_8bit(slice2d: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> uint8 ``(H, W)`` (values clipped to [0, 1], rounded)."""
    return np.rint(np.clip(slice2d, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode(slice8: np.ndarray, codec: str, setting) -> bytes:
    """One uint8 ``(H, W)`` slice compressed by ``codec`` at ``setting`` (quality or ratio)."""
    fmt, _, _, options = CODECS[codec]
    buf = io.BytesIO()
    Image.fromarray(slice8).save(buf, format=fmt, **options(setting))
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """Compressed bytes -> float32 ``(H, W)`` in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def compress_at_rate(slice2d: np.ndarray, codec: str, bits_per_pixel: float) -> tuple[np.ndarray, float, object]:
    """Compress one slice at the best setting that fits ``bits_per_pixel``.

    Returns the decoded slice ``(H, W)`` in [0, 1], the achieved bits per pixel and the
    setting used. File size falls (close to monotonically) along the settings, so a binary
    search finds the first one within the budget.
    """
    slice8 = to_8bit(slice2d)
    budget_bytes = bits_per_pixel * slice8.size / 8.0
    settings = CODECS[codec][2]
    lo, hi = 0, len(settings) - 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        data = encode(slice8, codec, settings[mid])
        if len(data) <= budget_bytes:
            best, hi = (data, settings[mid]), mid - 1
        else:
            lo = mid + 1
    if best is None:  # even the lowest quality is over budget
        best = (encode(slice8, codec, settings[-1]), settings[-1])
    data, setting = best
    return decode(data), len(data) * 8.0 / slice8.size, setting


def compare_codecs(images: np.ndarray, bits_per_pixel: float, codecs: list[str] | None = None) -> dict:
    """Score standard codecs at ``bits_per_pixel`` on ``images`` ``(N, H, W)`` in [0, 1].

    Returns ``{codec: {"bits_per_pixel": {mean, max}, "setting": {name, median}, "ssim": stats,
    "psnr": stats, "per_slice": {"ssim": [...], "psnr": [...]}}}`` with the stats of
    :mod:`mrivq.evaluate` (mean, std, p5, min) under the SSIM protocol.
    """
    out = {}
    target = torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)
    for codec in codecs if codecs is not None else available_codecs():
        decoded, rates, settings = [], [], []
        for slice2d in images:
            rec, rate, setting = compress_at_rate(np.asarray(slice2d), codec, bits_per_pixel)
            decoded.append(rec)
            rates.append(rate)
            settings.append(setting)
        rec = torch.from_numpy(np.stack(decoded)).unsqueeze(1)
        ssim = metrics.ssim_per_image(rec, target).numpy()
        psnr = metrics.psnr_per_image(rec, target).numpy()
        out[codec] = {
            "bits_per_pixel": {"mean": float(np.mean(rates)), "max": float(np.max(rates))},
            "setting": {"name": SETTING_NAMES[codec], "median": float(np.median(settings))},
            "ssim": metrics.summary_stats(ssim),
            "psnr": metrics.summary_stats(psnr),
            "per_slice": {"ssim": [float(v) for v in ssim], "psnr": [float(v) for v in psnr]},
        }
    return out
