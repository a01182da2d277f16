"""Standard image codecs at the model's bit rate, as a yardstick for the learned codes.

Each slice (``(H, W)`` in [0, 1]) is quantised to 8 bits, the only depth all of Pillow's
lossy codecs take, and compressed on its own with the best quality setting whose file
(headers included) fits the bit budget ``bits_per_pixel * H * W``; when even the lowest
quality is larger, the lowest is used and the achieved rate says so. The decoded slice is
scored under the SSIM protocol of :mod:`mrivq.metrics`, like the model's reconstructions.
:func:`rate_distortion` traces each codec's whole curve instead: every slice at each of a few
fixed settings (:data:`RATE_DISTORTION_SETTINGS`), one encode each.

Example::

    >>> comparison = compare_codecs(test.images[:20], bits_per_pixel=0.70)
    >>> comparison["jpeg"]["bits_per_pixel"]["mean"] <= 0.70, comparison["jpeg"]["ssim"]["mean"]
    (True, 0.81...)
    >>> curves = rate_distortion(test.images[:20], ["jpeg"])
    >>> [round(point["bits_per_pixel"], 2) for point in curves["jpeg"]]
    [0.24, 0.37, 0.55, 0.75, 0.89, 1.15, 1.61, 2.83]
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, features

from mrivq import metrics

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
# Settings of the rate-distortion curves, lowest quality first: on 256x128 MRI slices they
# span about 0.05-2.8 bits per pixel (a blank slice's JPEG file alone is 0.07).
RATE_DISTORTION_SETTINGS = {
    "jpeg": (5, 10, 20, 35, 50, 70, 85, 95),
    "jpeg2000": (200.0, 120.0, 64.0, 32.0, 16.0, 10.0, 6.0, 4.0),
    "webp": (0, 5, 15, 30, 50, 70, 85, 95),
}


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
    :mod:`mrivq.engine.evaluator` (mean, std, p5, min) under the SSIM protocol.
    """
    out = {}
    target = _as_target(images)
    for codec in codecs if codecs is not None else available_codecs():
        decoded, rates, settings = [], [], []
        for slice2d in images:
            rec, rate, setting = compress_at_rate(np.asarray(slice2d), codec, bits_per_pixel)
            decoded.append(rec)
            rates.append(rate)
            settings.append(setting)
        ssim, psnr = _score(decoded, target)
        out[codec] = {
            "bits_per_pixel": {"mean": float(np.mean(rates)), "max": float(np.max(rates))},
            "setting": {"name": SETTING_NAMES[codec], "median": float(np.median(settings))},
            "ssim": metrics.summary_stats(ssim),
            "psnr": metrics.summary_stats(psnr),
            "per_slice": {"ssim": [float(v) for v in ssim], "psnr": [float(v) for v in psnr]},
        }
    return out


def rate_distortion(images: np.ndarray, codecs: list[str] | None = None,
                    settings: dict[str, tuple] | None = None) -> dict:
    """Each codec's rate-distortion curve on ``images`` ``(N, H, W)`` in [0, 1].

    Every slice, quantised to 8 bits, is compressed once at each of the codec's ``settings``
    (default :data:`RATE_DISTORTION_SETTINGS`; no search, so the cost is N encodes per
    setting) and scored against the unquantised slice as :func:`compare_codecs` does.
    Returns ``{codec: [{"setting", "bits_per_pixel", "ssim", "psnr"}, ...]}``, one point per
    setting in the order given, each value the mean over the slices (bits per pixel include
    each file's headers). A perfectly kept slice makes the mean PSNR infinite.
    """
    settings = RATE_DISTORTION_SETTINGS if settings is None else settings
    target = _as_target(images)
    slices8 = [to_8bit(np.asarray(slice2d)) for slice2d in images]
    out = {}
    for codec in codecs if codecs is not None else available_codecs():
        points = []
        for setting in settings[codec]:
            encoded = [encode(slice8, codec, setting) for slice8 in slices8]
            ssim, psnr = _score([decode(data) for data in encoded], target)
            points.append({
                "setting": setting,
                "bits_per_pixel": float(np.mean([len(data) * 8.0 / slice8.size
                                                 for data, slice8 in zip(encoded, slices8)])),
                "ssim": metrics.summary_stats(ssim)["mean"],
                "psnr": metrics.summary_stats(psnr)["mean"],
            })
        out[codec] = points
    return out


def _as_target(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W)`` in [0, 1] -> float32 ``(N, 1, H, W)``, the reference the codecs are scored against."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32)).unsqueeze(1)


def _score(decoded: list[np.ndarray], target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice SSIM and PSNR ``(N,)`` of decoded slices ``(H, W)`` against ``target``."""
    rec = torch.from_numpy(np.stack(decoded)).unsqueeze(1)
    return metrics.ssim_per_image(rec, target).numpy(), metrics.psnr_per_image(rec, target).numpy()
