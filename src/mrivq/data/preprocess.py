"""Turn a raw slice into model input: normalise intensities, fit to one shape, and undo it.

Every slice is normalised on its own original pixels first (so padding never shifts the
statistics), then fitted to ``Preprocessing.image_size``. The normalisation is recorded as
``params = (offset, scale)`` with ``raw ≈ x * scale + offset``, so outputs can be written
back in scanner units with :func:`denormalize`.

Example::

    >>> x, params = preprocess_slice(raw, Preprocessing())   # raw: (256, 144) scanner values
    >>> x.shape, float(x.min()), float(x.max())
    ((256, 128), 0.0, 1.0)
    >>> raw_back = denormalize(x, params)                      # scanner units again
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIT_POLICIES = ("pad_crop", "resize")
NORMALIZE_POLICIES = ("minmax", "percentile", "zscore")


@dataclass(frozen=True)
class Preprocessing:
    """How raw slices become model input (the ``data.*`` settings of a config mirror it).

    Invalid values raise ``ValueError``; a config is validated where it is read, so users see
    the config key there.

    ``image_size`` is ``(H, W)``; ``fit`` is one of :data:`FIT_POLICIES`; ``normalize`` one of
    :data:`NORMALIZE_POLICIES`; ``percentiles`` (low, high) in [0, 100] apply to ``percentile``.
    """

    image_size: tuple[int, int] = (256, 128)
    fit: str = "pad_crop"
    normalize: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)

    @classmethod
    def from_settings(cls, data) -> Preprocessing:
        """From anything with ``image_size``, ``fit``, ``normalize`` and ``percentiles`` (``config.data``)."""
        return cls(image_size=tuple(data.image_size), fit=data.fit, normalize=data.normalize,
                   percentiles=tuple(data.percentiles))

    def __post_init__(self):
        try:
            size = tuple(int(n) for n in self.image_size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 2 or min(size) < 1:
            raise ValueError(
                f"image_size must be two positive integers [H, W], got {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        if self.fit not in FIT_POLICIES:
            raise ValueError(
                f"fit must be one of {', '.join(FIT_POLICIES)}, got {self.fit!r}"
            )
        if self.normalize not in NORMALIZE_POLICIES:
            raise ValueError(
                f"normalize must be one of {', '.join(NORMALIZE_POLICIES)}, got {self.normalize!r}"
            )
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(
                f"percentiles must be [low, high] with 0 <= low < high <= 100, got {self.percentiles!r}"
            )


def fit_to_shape(slice2d: np.ndarray, size: tuple[int, int], policy: str, dtype=np.float32) -> np.ndarray:
    """Fit a ``(h, w)`` slice to ``size = (H, W)``; returns ``(H, W)`` of ``dtype`` (float32, or
    float64 for the coding layers' picture).

    ``pad_crop``: per axis, a centred crop when too large and a centred pad with the slice
    minimum (the background) when too small; the odd pixel goes to the end. ``resize``:
    bilinear with half-pixel centres, the same as ``torch.nn.functional.interpolate(...,
    mode="bilinear", align_corners=False)`` without antialiasing.
    """
    slice2d = np.asarray(slice2d, dtype=dtype)
    if slice2d.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {slice2d.shape}")
    height, width = int(size[0]), int(size[1])
    if slice2d.shape == (height, width):
        return slice2d
    if policy == "pad_crop":
        return _pad_crop(slice2d, (height, width))
    if policy == "resize":
        return _resize_bilinear(slice2d, (height, width))
    raise ValueError(f"fit policy must be one of {FIT_POLICIES}, got {policy!r}")


def _pad_crop(slice2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    background = slice2d.min()
    crops, pads = [], []
    for have, want in zip(slice2d.shape, size):
        if have >= want:
            start = (have - want) // 2
            crops.append(slice(start, start + want))
            pads.append((0, 0))
        else:
            crops.append(slice(None))
            before = (want - have) // 2
            pads.append((before, want - have - before))
    fitted = slice2d[tuple(crops)]
    if any(p != (0, 0) for p in pads):
        fitted = np.pad(fitted, pads, mode="constant", constant_values=background)
    return np.ascontiguousarray(fitted, dtype=slice2d.dtype)


def _resize_bilinear(slice2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Separable linear interpolation along each axis, half-pixel centres (align_corners=False)."""
    out = slice2d.astype(np.float64)
    for axis, want in enumerate(size):
        have = out.shape[axis]
        if have == want:
            continue
        source = (np.arange(want, dtype=np.float64) + 0.5) * (have / want) - 0.5
        source = np.clip(source, 0.0, have - 1)
        lower = np.floor(source).astype(np.int64)
        upper = np.minimum(lower + 1, have - 1)
        weight = source - lower
        shape = [1, 1]
        shape[axis] = want
        weight = weight.reshape(shape)
        out = (
            np.take(out, lower, axis=axis) * (1.0 - weight)
            + np.take(out, upper, axis=axis) * weight
        )
    return out if slice2d.dtype == np.float64 else out.astype(np.float32)


def normalize(
    slice2d: np.ndarray, policy: str, percentiles: tuple[float, float] = (0.5, 99.5)
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise one slice; returns ``(x, params)`` with ``raw ≈ x * scale + offset``.

    ``x`` is float32 of the input shape; ``params`` is float32 ``(2,) = (offset, scale)``.
    ``minmax`` maps to [0, 1]; ``percentile`` clips to the given percentiles, then [0, 1];
    ``zscore`` gives ``(raw - mean) / std``. A slice with no spread (constant, or equal
    percentiles) maps to zeros with ``scale = 1``, so :func:`denormalize` gives ``offset`` back.
    """
    raw = np.asarray(slice2d, dtype=np.float64)
    if policy == "minmax":
        offset, spread = raw.min(), np.ptp(raw)
        source = raw
    elif policy == "percentile":
        offset, high = np.percentile(raw, percentiles)
        spread = high - offset
        source = np.clip(raw, offset, high)
    elif policy == "zscore":
        offset, spread = raw.mean(), raw.std()
        source = raw
        if np.ptp(raw) == 0:  # the std of a constant can round to a tiny non-zero value
            spread = 0.0
    else:
        raise ValueError(f"normalize policy must be one of {NORMALIZE_POLICIES}, got {policy!r}")
    if not spread > 0:
        return np.zeros(raw.shape, dtype=np.float32), np.array([offset, 1.0], dtype=np.float32)
    x = (source - offset) / spread
    return x.astype(np.float32), np.array([offset, spread], dtype=np.float32)


def denormalize(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalize`: ``x * scale + offset`` as float32, any shape.

    ``params`` is ``(2,)`` for one slice, or ``(N, 2)`` for a stack ``x`` of ``(N, ...)``.
    """
    x = np.asarray(x, dtype=np.float32)
    params = np.asarray(params, dtype=np.float32)
    offset, scale = params[..., 0], params[..., 1]
    if params.ndim == 2:
        extra = (1,) * (x.ndim - 1)
        offset, scale = offset.reshape(-1, *extra), scale.reshape(-1, *extra)
    return (x * scale + offset).astype(np.float32)


def clip_to_input_range(x: np.ndarray, policy: str) -> np.ndarray:
    """Model outputs back in the model-input range of ``policy``: [0, 1] for ``minmax`` and
    ``percentile`` (as the SSIM protocol clamps them), unchanged for ``zscore`` (unbounded)."""
    return x if policy == "zscore" else np.clip(x, 0.0, 1.0)


def preprocess_slice(raw2d: np.ndarray, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a raw ``(h, w)`` slice on its own pixels, then fit it to ``prep.image_size``.

    Returns float32 ``(H, W)`` and float32 params ``(2,) = (offset, scale)``.
    """
    x, params = normalize(raw2d, prep.normalize, prep.percentiles)
    return fit_to_shape(x, prep.image_size, prep.fit), params


def unfit(fitted: np.ndarray, original_shape: tuple[int, int], policy: str, dtype=np.float32) -> np.ndarray:
    """Undo :func:`mrivq.data.preprocess.fit_to_shape`: ``(H, W)`` back to the slice's own ``(h, w)``.

    ``pad_crop``: what was padded is cropped away; what was cropped is padded back with the
    slice's background (its minimum), since those pixels were never seen. ``resize``: bilinear
    back to ``(h, w)``.
    """
    fitted = np.asarray(fitted, dtype=dtype)
    if fitted.shape == tuple(original_shape):
        return fitted
    if policy == "resize":
        return fit_to_shape(fitted, original_shape, "resize", dtype)
    crops, pads = [], []
    for have, want in zip(original_shape, fitted.shape):  # have: original, want: fitted
        if have >= want:  # the original was cropped: put the fitted part back in the middle
            start = (have - want) // 2
            crops.append(slice(None))
            pads.append((start, have - want - start))
        else:  # the original was padded: cut the padding off
            before = (want - have) // 2
            crops.append(slice(before, before + have))
            pads.append((0, 0))
    out = fitted[tuple(crops)]
    return np.pad(out, pads, mode="constant", constant_values=fitted.min()).astype(dtype, copy=False)
