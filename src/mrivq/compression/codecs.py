"""Standard image codecs at the model's bit rate, as a yardstick for the learned codes.

Each slice (``(H, W)`` in [0, 1]) is quantised to 8 bits, the only depth all of these lossy
codecs take (JPEG, JPEG 2000, WebP and AVIF through Pillow; JPEG XL and HTJ2K through
imagecodecs), and compressed on its own with the best quality setting whose file
(headers included) fits the bit budget ``bits_per_pixel * H * W``; when even the lowest
quality is larger, the lowest is used and the achieved rate says so. The decoded slice is
scored under the SSIM protocol of :mod:`mrivq.metrics`, like the model's reconstructions.
:func:`rate_distortion` traces each codec's whole curve instead: every slice at each of a few
fixed settings (:data:`RATE_DISTORTION_SETTINGS`), one encode each.

:func:`compare_sequences` is the yardstick that also sees the volume: the consecutive slices
of one scan coded together as an AVIF image sequence (AV1 with inter prediction, so a slice is
predicted from the slices before it), at the best quality whose file fits a byte budget, every
decoded slice scored the same way.

Example::

    >>> comparison = compare_codecs(test.images[:20], bits_per_pixel=0.70)
    >>> comparison["jpeg"]["bits_per_pixel"]["mean"] <= 0.70, comparison["jpeg"]["ssim"]["mean"]
    (True, 0.81...)
    >>> curves = rate_distortion(test.images[:20], ["jpeg"])
    >>> [round(point["bits_per_pixel"], 2) for point in curves["jpeg"]]
    [0.24, 0.37, 0.55, 0.75, 0.89, 1.15, 1.61, 2.83]
    >>> volume = test.images[20:40]  # 20 consecutive slices of one scan
    >>> sequence = compare_sequences([volume], bytes_budget=0.70 * volume.size / 8)
    >>> sequence["avif_sequence"]["bits_per_pixel"]["mean"] <= 0.70
    True
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, features
from tqdm import tqdm

from mrivq import metrics

try:  # JPEG XL, HTJ2K, AVIF sequences: imagecodecs (a dependency; an install without it compares the rest)
    import imagecodecs
except ImportError:  # pragma: no cover - depends on the install
    imagecodecs = None


@dataclass(frozen=True)
class ImageCodec:
    """A standard codec as the yardstick uses it: uint8 ``(H, W)`` slice <-> bytes."""

    label: str  # how plots and tables name it
    setting_name: str  # what ``settings`` are
    settings: tuple  # from best to worst quality: the search for a bit budget walks them
    curve: tuple  # the rate-distortion curve's settings, lowest quality first
    write: Callable[[np.ndarray, object], bytes]  # (uint8 slice, setting) -> file
    read: Callable[[bytes], np.ndarray]  # file -> uint8 (H, W)
    available: Callable[[], bool]


def _pillow_writer(fmt: str, options: Callable[[object], dict]) -> Callable[[np.ndarray, object], bytes]:
    def write(slice8: np.ndarray, setting) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(slice8).save(buf, format=fmt, **options(setting))
        return buf.getvalue()
    return write


def _pillow_read(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def _pillow_has(feature: str) -> Callable[[], bool]:
    return lambda: bool(features.check(feature))


def _imagecodecs_has(name: str) -> Callable[[], bool]:
    return lambda: imagecodecs is not None and bool(getattr(imagecodecs, name).available)


#: JPEG XL's lossy effort: its best pictures at a rate. On 30 phantom and real test slices at
#: 0.25 bits per pixel, effort 9 scored SSIM 0.823 at 0.269 bpp against effort 7's 0.806 at 0.290
#: (the budget is out of reach for some slices at any distance), and 0.9299 against 0.9290 at
#: 0.7; effort 8 is a hair behind 9. About 4x slower than effort 7.
JPEGXL_LOSSY_EFFORT = 9

CODECS = {
    "jpeg": ImageCodec("JPEG", "quality", tuple(range(95, 0, -1)), (5, 10, 20, 35, 50, 70, 85, 95),
                  _pillow_writer("JPEG", lambda q: {"quality": q, "optimize": True}), _pillow_read,
                  _pillow_has("jpg")),
    "jpeg2000": ImageCodec("JPEG 2000", "compression ratio", tuple(float(r) for r in np.geomspace(2.0, 1000.0, 128)),
                      (200.0, 120.0, 64.0, 32.0, 16.0, 10.0, 6.0, 4.0),
                      _pillow_writer("JPEG2000", lambda r: {"quality_mode": "rates", "quality_layers": [r],
                                                            "irreversible": True, "no_jp2": True}),
                      _pillow_read, _pillow_has("jpg_2000")),
    "webp": ImageCodec("WebP", "quality", tuple(range(100, -1, -1)), (0, 5, 15, 30, 50, 70, 85, 95),
                  _pillow_writer("WEBP", lambda q: {"quality": q, "method": 4, "lossless": False}), _pillow_read,
                  _pillow_has("webp")),
    # AVIF (AV1 intra frames) through Pillow's libavif; quality 100 would be lossless.
    "avif": ImageCodec("AVIF", "quality", tuple(range(99, -1, -1)), (0, 15, 30, 45, 55, 65, 75, 85),
                  _pillow_writer("AVIF", lambda q: {"quality": q, "speed": 6}), _pillow_read, _pillow_has("avif")),
    # JPEG XL through imagecodecs' libjxl: the setting is the Butteraugli distance (1: visually
    # lossless; libjxl's range ends at 25), at its strongest effort (JPEGXL_LOSSY_EFFORT).
    "jpegxl": ImageCodec("JPEG XL", "distance", tuple(float(d) for d in np.geomspace(0.05, 25.0, 128)),
                    (25.0, 12.0, 7.0, 4.5, 3.0, 2.0, 1.3, 0.8),
                    lambda s8, d: bytes(imagecodecs.jpegxl_encode(s8, distance=d, effort=JPEGXL_LOSSY_EFFORT,
                                                                  numthreads=1)),
                    lambda data: imagecodecs.jpegxl_decode(data, numthreads=1), _imagecodecs_has("JPEGXL")),
    # High-throughput JPEG 2000 (Part 15) through imagecodecs' OpenJPH: the setting is the
    # quantisation step of the irreversible wavelet.
    "htj2k": ImageCodec("HTJ2K", "quantisation step", tuple(float(q) for q in np.geomspace(0.001, 1.0, 128)),
                   (0.6, 0.3, 0.15, 0.08, 0.045, 0.025, 0.014, 0.008),
                   lambda s8, q: bytes(imagecodecs.htj2k_encode(s8, level=q, reversible=False)),
                   imagecodecs.htj2k_decode if imagecodecs is not None else None, _imagecodecs_has("HTJ2K")),
}
CODEC_PROTOCOL = (
    "Each test slice, quantised to 8 bits, is compressed on its own at the best quality setting "
    "whose file (headers included) fits the model's bits per pixel, decoded, and scored under "
    "the SSIM protocol; bits_per_pixel gives the rate achieved."
)
SETTING_NAMES = {name: codec.setting_name for name, codec in CODECS.items()}
# Settings of the rate-distortion curves, lowest quality first: on 256x128 MRI slices they
# span about 0.05-2.8 bits per pixel (a blank slice's JPEG file alone is 0.07).
RATE_DISTORTION_SETTINGS = {name: codec.curve for name, codec in CODECS.items()}


#: Threads for the codecs' work on separate slices (imagecodecs and Pillow's encoders release the
#: GIL; each encode keeps its own settings, AVIF one thread, so the files are the same however many).
CODEC_THREADS = max(1, min(4, os.cpu_count() or 1))


def parallel_map(fn: Callable, items, desc: str | None = None) -> list:
    """``[fn(item) for item in items]`` on :data:`CODEC_THREADS` threads, in order; with ``desc``, a
    progress bar by that name on a terminal."""
    items = list(items)
    with tqdm(total=len(items), desc=desc, disable=None if desc else True, leave=False) as bar:
        if CODEC_THREADS == 1 or len(items) < 2:
            return [_counted(fn(item), bar) for item in items]
        with ThreadPoolExecutor(CODEC_THREADS) as pool:
            return [_counted(result, bar) for result in pool.map(fn, items)]


def _counted(result, bar):
    bar.update()
    return result


def available_codecs() -> list[str]:
    """The codecs of :data:`CODECS` this install can write (JPEG always; the others if built in)."""
    return [name for name, codec in CODECS.items() if codec.available()]


def to_8bit(slice2d: np.ndarray) -> np.ndarray:
    """``(H, W)`` (or a stack ``(S, H, W)``) in [0, 1] -> uint8 of the same shape (values clipped to
    [0, 1], rounded)."""
    return np.rint(np.clip(slice2d, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode(slice8: np.ndarray, codec: str, setting) -> bytes:
    """One uint8 ``(H, W)`` slice compressed by ``codec`` at ``setting`` (quality, ratio, ...)."""
    return CODECS[codec].write(slice8, setting)


def decode(data: bytes, codec: str) -> np.ndarray:
    """A ``codec`` file -> float32 ``(H, W)`` in [0, 1]."""
    return np.asarray(CODECS[codec].read(data), dtype=np.float32) / 255.0


def compress_at_rate(slice2d: np.ndarray, codec: str, bits_per_pixel: float, *, known: dict | None = None,
                     guess: int | None = None, slope: float | None = None) -> tuple[np.ndarray, float, object]:
    """Compress one slice at the best setting that fits ``bits_per_pixel``.

    Returns the decoded slice ``(H, W)`` in [0, 1], the achieved bits per pixel and the
    setting used, found by :func:`best_setting_within` (``known``, ``guess``, ``slope``: its).
    """
    slice8 = to_8bit(slice2d)
    data, setting = best_setting_within(lambda setting: encode(slice8, codec, setting), CODECS[codec].settings,
                                        bits_per_pixel * slice8.size / 8.0, known=known, guess=guess, slope=slope)
    return decode(data, codec), len(data) * 8.0 / slice8.size, setting


def compare_codecs(images: np.ndarray, bits_per_pixel: float, codecs: list[str] | None = None,
                   known: dict | None = None) -> dict:
    """Score standard codecs at ``bits_per_pixel`` on ``images`` ``(N, H, W)`` in [0, 1].

    Returns ``{codec: {"bits_per_pixel": {mean, max}, "setting": {name, median}, "ssim": stats,
    "psnr": stats, "per_slice": {"ssim": [...], "psnr": [...]}}}`` with the stats of
    :mod:`mrivq.engine.evaluator` (mean, std, p5, min) under the SSIM protocol. The first slice's
    setting is searched first; the others' searches start from it (and from the slope of its file
    sizes along the settings). ``known``: a dict the files written are kept in (by ``(codec,
    slice)``, and each codec's answers under ``(codec, "answers")``), so that comparing the same
    images at another rate starts from them, each slice from its own last answer moved as the
    first slice's moved (the same answers, fewer encodes).
    """
    out = {}
    target = _as_target(images)
    known = {} if known is None else known
    for codec in codecs if codecs is not None else available_codecs():
        settings = CODECS[codec].settings
        files = [known.setdefault((codec, i), {}) for i in range(len(images))]
        first = compress_at_rate(np.asarray(images[0]), codec, bits_per_pixel, known=files[0])
        answer = settings.index(first[2])
        last = known.get((codec, "answers"))
        guesses = ([int(np.clip(a + answer - last[0], 0, len(settings) - 1)) for a in last]
                   if last is not None and len(last) == len(images) else [answer] * len(images))
        slope = size_slope(files[0])
        rest = parallel_map(lambda i, codec=codec, files=files, guesses=guesses, slope=slope: compress_at_rate(
            np.asarray(images[i]), codec, bits_per_pixel, known=files[i], guess=guesses[i], slope=slope),
            range(1, len(images)), desc=f"{codec} at {bits_per_pixel:.3f} bpp")
        decoded, rates, chosen = zip(first, *rest)
        known[(codec, "answers")] = [settings.index(setting) for setting in chosen]
        out[codec] = _comparison(decoded, target, rates, chosen, SETTING_NAMES[codec])
    return out


def size_slope(files: dict[int, bytes]) -> float | None:
    """How the log file size changes per setting index, fitted over ``files`` (by index): the
    slope searches of similar slices extrapolate with; None when it is not falling or is unknown."""
    if len(files) < 2:
        return None
    index, size = zip(*sorted((i, math.log(max(len(data), 1))) for i, data in files.items()))
    slope = float(np.polyfit(index, size, 1)[0])
    return slope if slope < 0 else None


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
            encoded = parallel_map(lambda slice8, codec=codec, setting=setting: encode(slice8, codec, setting), slices8)
            ssim, psnr = _score(parallel_map(lambda data, codec=codec: decode(data, codec), encoded), target)
            points.append({
                "setting": setting,
                "bits_per_pixel": float(np.mean([len(data) * 8.0 / slice8.size
                                                 for data, slice8 in zip(encoded, slices8)])),
                "ssim": metrics.summary_stats(ssim)["mean"],
                "psnr": metrics.summary_stats(psnr)["mean"],
            })
        out[codec] = points
    return out


# AVIF image sequence through imagecodecs' libavif (libaom): frame i is slice i, the first an
# intra frame and every later one predicted from those before it. Quality 100 would be
# lossless. Speed 3 of libaom's 0 (slowest) - 10: one encode of 20 consecutive 256x128 phantom
# slices takes 0.8-2 s, 2.5-3x less than speed 2 and ~20x less than speed 0, for files at most
# 4% (speed 2) and 7% (speed 0) larger at the same quality; speeds 4-6 save little time and
# cost up to 3% (4) and 9% (6) more bytes. The search needs about 7 encodes per volume.
SEQUENCE_CODEC = "avif_sequence"
SEQUENCE_LABEL = "AVIF sequence"
SEQUENCE_SETTING_NAME = "quality"
SEQUENCE_QUALITIES = tuple(range(99, -1, -1))  # from best to worst, as ImageCodec.settings
SEQUENCE_SPEED = 3
SEQUENCE_PROTOCOL = (
    "The consecutive test slices of each scan, quantised to 8 bits, are compressed together as one "
    f"AVIF image sequence (AV1 with inter prediction, libaom speed {SEQUENCE_SPEED}) at the best quality "
    "whose file (headers included) fits the scan's share of the byte budget, decoded, and every slice "
    "scored under the SSIM protocol; bits_per_pixel gives the rate achieved."
)


def sequence_available() -> bool:
    """Whether this install can write AVIF image sequences (imagecodecs built with libavif)."""
    return _imagecodecs_has("AVIF")()


def encode_sequence(slices8: np.ndarray, quality: int, speed: int = SEQUENCE_SPEED) -> bytes:
    """Consecutive uint8 slices ``(S, H, W)`` -> one AVIF image sequence file, frame i = slice i.

    imagecodecs codes a one-channel array losslessly whatever the quality, so the slices go in
    as grey RGB and are coded as monochrome (YUV 4:0:0; the luma of grey is the grey value).
    One thread: libaom's output depends on the thread count.
    """
    grey = np.repeat(slices8[..., None], 3, axis=-1)
    return bytes(imagecodecs.avif_encode(grey, level=quality, speed=speed, pixelformat="yuv400",
                                         numthreads=1))


def decode_sequence(data: bytes) -> np.ndarray:
    """An AVIF image sequence file -> float32 ``(S, H, W)`` in [0, 1], every frame."""
    # All frames in one call: asking for one frame (``index=``) other than the last corrupts
    # the heap in imagecodecs 2026.3.6 with libavif 1.4.
    frames = np.asarray(imagecodecs.avif_decode(data, numthreads=1), dtype=np.float32)
    return frames.reshape(-1, *frames.shape[-2:]) / 255.0  # a one-frame file decodes to (H, W)


def compress_sequence_at_size(volume: np.ndarray, budget_bytes: float, speed: int = SEQUENCE_SPEED, *,
                              known: dict | None = None, guess: int | None = None,
                              slope: float | None = None) -> tuple[np.ndarray, int, int]:
    """Compress consecutive slices ``(S, H, W)`` in [0, 1] as one AVIF sequence within ``budget_bytes``.

    Returns the decoded slices ``(S, H, W)`` in [0, 1], the file's size in bytes and the
    quality used: the best that fits, or the lowest (0) when even that is over budget
    (``known``, ``guess``, ``slope``: :func:`best_setting_within`'s, by index into :data:`SEQUENCE_QUALITIES`).
    """
    slices8 = to_8bit(volume)
    data, quality = best_setting_within(lambda quality: encode_sequence(slices8, quality, speed),
                                        SEQUENCE_QUALITIES, budget_bytes, known=known, guess=guess, slope=slope)
    return decode_sequence(data), len(data), quality


def compare_sequences(volumes: list[np.ndarray], bytes_budget: float | list[float],
                      speed: int = SEQUENCE_SPEED, known: dict | None = None) -> dict:
    """Score AVIF image sequences of ``volumes`` (each ``(S, H, W)`` in [0, 1], consecutive slices of
    one scan, all slices of one shape) within ``bytes_budget``.

    ``bytes_budget`` is one number, the bytes allowed for all the volumes together (say the
    model's files for the same slices), shared out in proportion to the volumes' pixel counts
    so that each gets the same bits per pixel, like the per-slice codecs; or a list, the bytes
    allowed for each volume. Each volume's quality is searched on its own, the first few side by
    side and the others' starting from theirs (their answer and the slope of their file sizes, or
    a volume's own slope where it has files from another budget); ``known``: as
    :func:`compare_codecs`' (by volume).

    Returns ``{"avif_sequence": entry}`` with the entry of :func:`compare_codecs` (each slice
    charged its volume's bits per pixel, so the mean is total bits over total pixels and the max
    the worst volume's; the setting's median over slices), the slices in the order given, plus
    ``"bytes": {"total", "budget"}``, ``"per_volume": {"bytes", "budget", "quality"}`` and
    ``"speed"``.
    """
    volumes = [np.asarray(volume, dtype=np.float32) for volume in volumes]
    if not volumes or any(v.ndim != 3 or v.shape[1:] != volumes[0].shape[1:] for v in volumes):
        raise ValueError(f"compare_sequences needs volumes of slices (S, H, W) of one H x W, "
                         f"got shapes {[v.shape for v in volumes]}")
    if np.ndim(bytes_budget) == 0:
        pixels = np.array([volume.size for volume in volumes], dtype=np.float64)
        budgets = [float(b) for b in bytes_budget * pixels / pixels.sum()]
    elif len(bytes_budget) == len(volumes):
        budgets = [float(b) for b in bytes_budget]
    else:
        raise ValueError(f"compare_sequences: {len(bytes_budget)} byte budgets for {len(volumes)} volumes; "
                         "give one per volume, or one number for them all")
    known = {} if known is None else known
    files = [known.setdefault(("sequence", speed, k), {}) for k in range(len(volumes))]
    wave = min(CODEC_THREADS, len(volumes))  # the first volumes searched side by side, the rest from them
    own = [size_slope(known_files) for known_files in files]  # a volume's files from another budget
    first = parallel_map(lambda k: compress_sequence_at_size(volumes[k], budgets[k], speed, known=files[k],
                                                             slope=own[k]), range(wave))
    guess = int(np.median([SEQUENCE_QUALITIES.index(quality) for _, _, quality in first]))
    slopes = [slope for slope in map(size_slope, files[:wave]) if slope is not None]
    slope = float(np.median(slopes)) if slopes else None
    rest = parallel_map(lambda k: compress_sequence_at_size(volumes[k], budgets[k], speed, known=files[k], guess=guess,
                                                            slope=own[k] or slope), range(wave, len(volumes)),
                        desc="AVIF sequences")
    decoded, sizes, qualities = zip(*first, *rest)
    slices_per_volume = [len(volume) for volume in volumes]
    entry = _comparison(np.concatenate(decoded), _as_target(np.concatenate(volumes)),
                        np.repeat([n * 8.0 / v.size for n, v in zip(sizes, volumes)], slices_per_volume),
                        np.repeat(qualities, slices_per_volume), SEQUENCE_SETTING_NAME)
    entry["bytes"] = {"total": int(sum(sizes)), "budget": float(sum(budgets))}
    entry["per_volume"] = {"bytes": list(sizes), "budget": budgets, "quality": list(qualities)}
    entry["speed"] = speed
    return {SEQUENCE_CODEC: entry}


#: JPEG XL's lossless effort: its smallest files. In libjxl 0.11 (imagecodecs 2026.3.6) effort 6
#: is smaller than 9 on MR slices and as small as the best of efforts 5, 6, 7 and 9 tried on each
#: slice (to 0.001 bits per voxel): 5.748 bits per voxel against 5.823 at effort 9 on the phantom's
#: 120 test slices, 6.315 against 6.450 on the 46 real-scan test slices (`benchmarks/lossless.py`),
#: and 6x faster.
JPEGXL_LOSSLESS_EFFORT = 6

#: The lossless and near-lossless codecs :func:`lossless_sizes` runs, at their strongest settings.
LOSSLESS_PROTOCOL = (
    "each slice's stored integers (offset to start at 0, as uint16) through imagecodecs: JPEG-LS at NEAR = the "
    f"maximum error (0: lossless); at 0 also JPEG XL lossless at effort {JPEGXL_LOSSLESS_EFFORT} (its smallest files "
    "here), JPEG 2000 and HTJ2K reversible (level 0) and PNG at level 9; bits per voxel of the files, headers included")


def lossless_sizes(stored: np.ndarray, max_error: int) -> dict[str, int]:
    """Bytes of one slice's stored integers ``(h, w)`` under each lossless codec (``max_error`` 0) or
    near-lossless one (JPEG-LS NEAR = ``max_error``); ``{}`` without imagecodecs, or for values
    spanning more than 16 bits."""
    values = np.asarray(stored, dtype=np.int64)
    if imagecodecs is None or np.ptp(values) >= 1 << 16:
        return {}
    u16 = np.ascontiguousarray((values - values.min()).astype(np.uint16))
    sizes = {"JPEG-LS": len(imagecodecs.jpegls_encode(u16, level=int(max_error)))}
    if max_error == 0:
        sizes.update({
            "JPEG XL": len(imagecodecs.jpegxl_encode(u16, lossless=True, effort=JPEGXL_LOSSLESS_EFFORT)),
            "JPEG 2000": len(imagecodecs.jpeg2k_encode(u16, level=0, reversible=True)),
            "HTJ2K": len(imagecodecs.htj2k_encode(u16, level=0, reversible=True)),
            "PNG": len(imagecodecs.png_encode(u16, level=9)),
        })
    return sizes


#: Lossy codecs at a lossless ladder's rates (:func:`lossy_at_rate`): the settings each search walks,
#: best first. JPEG XL on 16-bit integers (distance), AVIF at 12 bits (quality), WebP at 8 (quality).
LOSSY_AT_RATE = {"JPEG XL": tuple(float(d) for d in np.geomspace(0.01, 25.0, 64)),
                 "AVIF": tuple(range(100, -1, -1)), "WebP": tuple(range(100, -1, -1))}
LOSSY_AT_RATE_PROTOCOL = (
    "each slice's stored integers (offset to start at 0) at the best setting whose file fits the residual layer's bits per "
    f"voxel at that maximum error: JPEG XL on 16 bits (distance, effort {JPEGXL_LOSSY_EFFORT}), AVIF monochrome at 12 bits "
    "(quality, speed 6; values above 4,095 shifted down and back) and WebP at 8 bits (quality; all it takes); their "
    "largest error over every voxel, SSIM and PSNR")


def lossy_at_rate(values: np.ndarray, bits_per_voxel: float, known: dict | None = None,
                  like: dict | None = None) -> dict[str, tuple[np.ndarray, int]]:
    """One slice's stored integers ``(h, w)`` through the lossy codecs of :data:`LOSSY_AT_RATE` at the best
    setting within ``bits_per_voxel``: ``{codec: (decoded values (h, w) int64, file bytes)}``, or ``{}``
    without imagecodecs or for values spanning more than 16 bits. ``known``: a dict the files written are
    kept in (by codec), so the search at the next rate starts from them; ``like``: another slice's
    ``known`` after its search at this rate, where a codec's search starts when this slice has no files
    of its own (that slice's answer and slope; the same answers, fewer encodes)."""
    x = np.asarray(values, dtype=np.int64)
    if imagecodecs is None or np.ptp(x) >= 1 << 16:
        return {}
    known = {} if known is None else known
    budget, low = bits_per_voxel * x.size / 8, int(x.min())
    u16 = np.ascontiguousarray((x - low).astype(np.uint16))
    shift = max(0, int(u16.max()).bit_length() - 12)
    grey = np.ascontiguousarray(np.repeat((u16 >> shift)[..., None], 3, axis=-1))  # one channel: always lossless
    span = max(1, int(u16.max()))
    u8 = np.round(u16 / span * 255).astype(np.uint8)
    writers = {
        "JPEG XL": lambda d: bytes(imagecodecs.jpegxl_encode(u16, distance=d, effort=JPEGXL_LOSSY_EFFORT, numthreads=1)),
        "AVIF": lambda q: bytes(imagecodecs.avif_encode(grey, level=q, bitspersample=12, pixelformat="yuv400",
                                                        speed=6, numthreads=1)),
        "WebP": lambda q: encode(u8, "webp", q),
    }
    out = {}
    for name, write in writers.items():
        files = known.setdefault(name, {})
        other = {} if files else (like or {}).get(name, {})
        guess = min((i for i, data in other.items() if len(data) <= budget), default=None)
        data, _ = best_setting_within(write, LOSSY_AT_RATE[name], budget, known=files, guess=guess,
                                      slope=size_slope(files) or size_slope(other))
        if name == "JPEG XL":
            back = imagecodecs.jpegxl_decode(data, numthreads=1).astype(np.int64)
        elif name == "AVIF":
            frame = imagecodecs.avif_decode(data, numthreads=1)
            back = (frame if frame.ndim == 2 else frame[..., 0]).astype(np.int64) << shift
        else:
            back = np.round(CODECS["webp"].read(data).astype(np.float64) / 255 * span).astype(np.int64)
        out[name] = (back.reshape(x.shape) + low, len(data))
    return out


def best_setting_within(write: Callable[[object], bytes], settings: tuple, budget_bytes: float, *,
                        known: dict[int, bytes] | None = None, guess: int | None = None,
                        slope: float | None = None) -> tuple[bytes, object]:
    """The file and setting of the best quality in ``settings`` (best first) whose file from
    ``write(setting)`` fits ``budget_bytes``; the last setting when none does.

    File size falls (close to monotonically) along the settings, so a search that keeps the
    worst setting known to be over the budget and the best known within it finds the first one
    within. ``known``: the files already written, by index into ``settings`` (filled in here), so a
    search at another budget starts between the nearest ones known; ``guess``: an index to try
    first when the known files do not bound the answer on both sides (the answer of a similar
    slice), then steps away from it until they do: to where the log file size, extrapolated at
    ``slope`` (its change per setting, fitted on a similar slice: :func:`size_slope`) or else
    from the two nearest known sizes, crosses the budget, each step at most double the last
    without a ``slope``. Inside a bracket each probe goes where the log size interpolated between
    its ends crosses the budget, kept close enough to the middle that the search needs at most
    two probes more than bisection would; a smooth size curve needs about two in all. With file
    sizes falling, the answer is the one plain bisection gives; only the encodes are fewer.
    """
    search = _SettingSearch(write, settings, budget_bytes, {} if known is None else known, slope)
    if guess is not None and search.over < guess < search.within and (search.over == -1 or search.within == search.n):
        search.from_guess(guess)
    search.close_in()
    chosen = search.within if search.within < search.n else search.n - 1  # none fits: the lowest quality
    search.size(chosen)
    return search.known[chosen], settings[chosen]


class _SettingSearch:
    """One search of :func:`best_setting_within`: the files known by setting index, and the bracket,
    ``over`` (the worst setting known over the budget; -1: none) and ``within`` (the best known
    within it; ``n``: none)."""

    def __init__(self, write: Callable[[object], bytes], settings: tuple, budget: float, known: dict[int, bytes],
                 slope: float | None = None):
        self.write, self.settings, self.budget, self.known, self.slope = write, settings, budget, known, slope
        self.n = len(settings)
        self.target = math.log(max(budget, 1.0))
        self.over = max((i for i, data in known.items() if len(data) > budget), default=-1)
        self.within = min((i for i, data in known.items() if len(data) <= budget), default=self.n)

    def size(self, i: int) -> int:
        if i not in self.known:
            self.known[i] = self.write(self.settings[i])
        return len(self.known[i])

    def probe(self, i: int) -> None:
        if self.size(i) <= self.budget:
            self.within = min(self.within, i)
        else:
            self.over = max(self.over, i)

    def from_guess(self, guess: int) -> None:
        """Probe ``guess``, then step away from it (towards worse settings while all are over the
        budget, better ones while all fit), each step at most twice the last, until bounded."""
        self.probe(guess)
        step = 1
        while self.within == self.n and self.over < self.n - 1:
            self.probe(self.over + self._stride(self.over, +1, step))
            step *= 2
        while self.over == -1 and self.within > 0:
            self.probe(self.within - self._stride(self.within, -1, step))
            step *= 2

    def _stride(self, end: int, direction: int, step: int) -> int:
        """How far beyond ``end`` to probe next (at least 1, in range): to the first setting past
        where the size extrapolated from ``end`` crosses the budget, at ``slope`` (and then at least
        ``step // 2``, so a slope too steep still gets there in doubling steps) or else at the
        slope of ``end`` and its known neighbour (and then at most ``step``)."""
        room = self.n - 1 - end if direction > 0 else end
        if self.slope:
            x = end + (self.target - math.log(max(self.size(end), 1))) / self.slope
            low, high = max(1, step // 2), room
        else:
            x = self._crossing(end, self._beside(end, -direction))
            low, high = 1, min(step, room)
        if x is None or (x - end) * direction <= 0:
            return high
        first = math.ceil(x) if direction > 0 else math.ceil(x) - 1  # the answer, or the setting above it
        return int(min(max(abs(first - end), low), high))

    def close_in(self) -> None:
        """Probe inside the bracket until it closes: at the interpolated crossing, kept where at
        most one probe more than bisection's still closes it."""
        left = math.ceil(math.log2(max(self.within - self.over, 1))) + 2
        while self.within - self.over > 1:
            reach = 2 ** (left - 1)  # after this probe the bracket must be at most this wide
            x = self._estimate()
            p = (self.over + self.within) // 2 if x is None else math.ceil(x)
            p = min(max(p, self.over + 1, self.within - reach), self.within - 1, self.over + reach)
            self.probe(p)
            left -= 1

    def _estimate(self) -> float | None:
        """Where the log size crosses the budget: between the bracket's ends, or extrapolated from
        the end known and its known neighbour; None when neither end is known."""
        if self.over >= 0 and self.within < self.n:
            return self._crossing(self.over, self.within)
        if self.over >= 0:
            return self._crossing(self.over, self._beside(self.over, -1))
        if self.within < self.n:
            return self._crossing(self.within, self._beside(self.within, +1))
        return None

    def _beside(self, i: int, direction: int) -> int | None:
        """The known setting nearest ``i`` on its ``direction`` side, or None."""
        side = [j for j in self.known if (j - i) * direction > 0]
        return (min(side) if direction > 0 else max(side)) if side else None

    def _crossing(self, i: int, j: int | None) -> float | None:
        """Where the line through (i, log size i) and (j, log size j) meets the budget's log, or None."""
        if j is None:
            return None
        a, b = math.log(max(self.size(i), 1)), math.log(max(self.size(j), 1))
        return None if a == b else i + (self.target - a) * (j - i) / (b - a)


def _comparison(decoded, target: torch.Tensor, rates, settings, setting_name: str) -> dict:
    """One codec's entry of :func:`compare_codecs`: decoded slices ``(H, W)`` scored against
    ``target`` ``(N, 1, H, W)``, with the bits per pixel and setting of each slice."""
    ssim, psnr = _score(list(decoded), target)
    return {
        "bits_per_pixel": {"mean": float(np.mean(rates)), "max": float(np.max(rates))},
        "setting": {"name": setting_name, "median": float(np.median(settings))},
        "ssim": metrics.summary_stats(ssim),
        "psnr": metrics.summary_stats(psnr),
        "per_slice": {"ssim": [float(v) for v in ssim], "psnr": [float(v) for v in psnr]},
    }


def _as_target(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W)`` in [0, 1] -> float32 ``(N, 1, H, W)``, the reference the codecs are scored against
    (copied where the array is read-only, as a cached split's is: torch warns on those)."""
    images = np.asarray(images, dtype=np.float32)
    return torch.from_numpy(images if images.flags.writeable else images.copy()).unsqueeze(1)


def _score(decoded: list[np.ndarray], target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice SSIM and PSNR ``(N,)`` of decoded slices ``(H, W)`` against ``target``."""
    rec = torch.from_numpy(np.stack(decoded)).unsqueeze(1)
    return metrics.ssim_per_image(rec, target).numpy(), metrics.psnr_per_image(rec, target).numpy()
