"""The residual layer (``residual``): lossless and bounded-error slices on top of the codes.

The picture decoded from the codes is a strong prediction of the slice; this layer range-codes
what is left, so that ``mrivq decode`` gives every stored value within ``max_error`` (δ) of
the input's, and exactly the input's at δ = 0 ("lossy plus residual" coding). Per slice:

1. **Prediction** ``P``: the picture (in the file's stored units: before ``scl_slope`` /
   ``scl_inter``) rounded to integers. New files' picture is the decoder's integer copy's (the
   same numbers on every machine); older files' was decoded in float64, and a machine that
   decodes it a few ulps away rounds the same way, except where the picture lies within a hair
   (:data:`GUARD` of its range) of a rounding tie: those few voxels' rounding is stored.
2. **Residual** ``r = X - P`` of the stored integers ``X``; for δ > 0 it is quantised with step
   2δ + 1 (``q = sign(r) ((|r| + δ) // (2δ + 1))``), so ``P + q (2δ + 1)`` is within δ of every
   voxel. Float data that are not integers are first put on a grid of step just under 2δ
   (δ = 0 is refused for them).
3. **Coding** in phases (:data:`THREE_PHASES`, or since version 5 :data:`FOUR_PHASES` where the
   encoder finds they pay, :func:`_four_phases`): a quarter of the voxels, the quarter between
   them, then the other half, or that half in two quarters (the odd rows' after the even rows').
   Each symbol is predicted by a linear mean
   (versions 2 on; :attr:`_Layout.mean_offsets`): weights, fitted per phase and slice by least squares and
   stored (since version 4, one set per :data:`MEAN_GROUPS` groups of the phase's voxels by the
   picture's local contrast, :func:`_mean_groups`), on the residuals already decoded around it
   (the four diagonal neighbours in the second phase, the four direct and eight knight's-move
   neighbours in the third, all eight nearest in a fourth) and on the
   picture's differences to its 3x3 neighbours (so the mean also sharpens the picture); version
   1's mean, one weight on the four neighbours' mean residual, is still decoded. What is left is
   coded under a discretised Laplace-to-Gaussian blend or a mixture with a wider Laplace (one of
   :data:`SHAPES`, chosen per class) whose scale is a linear estimate from integer context: the
   prediction's level (a one-hot of :data:`LEVELS` bins) and local contrast (and in four phases
   its spread over 5x5, :func:`_spread`), and after the first
   phase the size of the nearest decoded neighbours' residuals. Each level's median
   residual is added to the prediction first. The estimate picks one of :data:`N_CLASSES` scale
   classes a quarter octave apart; the few coefficients are fitted per slice and stored. All of
   it is integer arithmetic: the frequencies are the same on every machine, and constriction's
   range coder turns them into the stream.
4. **Volumes** (version 3): a slice coded given reference slices of its scan (the codec picks
   them; their values as decoded) adds their mean's difference to the prediction as one more
   mean column, and its size and (lossless) the references' spread (largest less least) as
   scale features (flag :data:`REFERENCED`).

A checksum of the reconstruction is stored and checked on decode: a file decodes to the
values the encoder checked against the input, or is refused. Payload layout: :data:`HEAD`, the
grid step (floats), the scaling, then small integers as zigzag varints (the values' range, each
level's median, per phase its escape width, classes used and (version 4) mean groups, then
every phase's mean weights, group by group; version 1: per phase width, classes and its one
mean weight), every phase's coefficients (version 3 on: :data:`COEFFICIENT_BITS` bits each, a
float16's top bits, and the weights in 1/128; versions 1 and 2: float16, weights in 1/256), each
phase's 5-bit shapes, the stored roundings, the escaped residuals, the coder's words.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal
from functools import lru_cache

import numpy as np

from mrivq.compression.layers import CodingLayer, Refused, Stored, register

NAME = "residual"

#: Picture values closer than this (times 1 + the largest magnitude) to a rounding tie have their
#: rounding stored: float64 decodes on different machines differ by ~1e-15 of the range.
GUARD = 1e-9
N_CLASSES = 64  # scale classes, a quarter octave apart (mean |residual| 0.07 ... 3,900)
BLENDS = 5  # Laplace, three blends, Gaussian
MIXES = (1, 2, 4, 8)  # sixteenths of a wider Laplace mixed in
WIDE = 8  # classes (two octaves) between a mixture's narrow part and its wide Laplace
SPIKES = (2, 4, 8)  # sixteenths of a narrower Laplace (one or two octaves) mixed in
SHAPES = BLENDS + 2 * len(MIXES) + 4 * len(SPIKES)
SHAPE_BITS = 5  # SHAPES <= 2**SHAPE_BITS
ESCAPE = 4095  # larger residuals are stored raw, after an escape symbol
LOGIT_UNITS = 64  # logits in 1/64 nat
CAP = 16 * LOGIT_UNITS  # the least probable symbols sit 16 nats below the most probable
#: The on-disk types a slice may be written back as (the payload stores the index).
DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64")

#: The payload version written: 5, a slice in three phases or four (flag :data:`FOUR`); 4, the
#: mean's weights per contrast group; 3, one set per phase;
#: 2, weights in 1/256 and float16 coefficients; 1, one weight on the neighbours' mean residual.
#: Every one of VERSIONS is still decoded.
VERSION = 5
VERSIONS = (1, 2, 3, 4, 5)
#: The payload's fixed start: version, kind (integers or floats) and scaling width (bit 1: float32),
#: on-disk type, height, width, the bound, the checksum of the rebuilt values.
HEAD = struct.Struct("<BBBHHdI")
INTEGERS, FLOATS = 0, 1
REFERENCED = 4  # the flags' bit of a payload coded given reference slices (version 3 on)
FOUR = 8  # the flags' bit of a payload coded in four phases (version 5 on: :func:`_four_phases`)


# -- fixed integer tables ----------------------------------------------------------------------

@lru_cache(maxsize=1)
def _exp_weights() -> np.ndarray:
    """Weight of a symbol ``d`` 1/64-nats below the most probable: ``round(2**20 exp(-d / 64))``,
    computed in decimal arithmetic (the same digits on every machine), as float64 (exact)."""
    context = Context(prec=40)
    return np.array([max(1, int(context.exp(Decimal(-d) / LOGIT_UNITS).scaleb(20).quantize(
        Decimal(1), rounding=ROUND_HALF_EVEN))) for d in range(CAP + 1)], dtype=np.float64)


def _root8(n: int) -> int:
    return math.isqrt(math.isqrt(math.isqrt(n)))  # floor(n ** (1/8)), exactly


#: Mean |residual| of each class times 2**14 (2 ** ((2b + 1) / 8 - 4)), and the boundaries between.
CLASS_MEAN = [_root8(1 << (2 * b + 81)) for b in range(N_CLASSES)]
CLASS_EDGES = np.array([_root8(1 << (2 * b + 82)) for b in range(N_CLASSES - 1)], dtype=np.int64)
ESTIMATE_SHIFT = 8  # coefficients in 2**(14 + 8) per unit: estimate = (c . features) >> 8
LEVEL_EDGES = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256, 512], dtype=np.int64)  # in 1/1024 of the range
LEVELS = len(LEVEL_EDGES) + 1


@lru_cache(maxsize=N_CLASSES * BLENDS)
def _gaps(cls: int, blend: int) -> np.ndarray:
    """int64 gaps (1/64 nat below the most probable) of |d| = 0, 1, ... until the cap, then the cap:
    blend 0 is a Laplace of class ``cls``'s mean |d|, blend BLENDS - 1 a Gaussian."""
    mean = CLASS_MEAN[cls]
    laplace = (LOGIT_UNITS << 54) // mean  # |d| / m nats, << 40
    gauss = (LOGIT_UNITS * 113 << 68) // (355 * mean * mean)  # d^2 / (pi m^2) nats, << 40
    d = np.arange(16 * mean // (1 << 14) + 3, dtype=np.int64)
    gap = ((BLENDS - 1 - blend) * ((d * laplace) >> 40) + blend * ((d * d * gauss) >> 40)) // (BLENDS - 1)
    return np.append(np.minimum(gap, CAP), CAP)


def _profile(cls: int, blend: int, d: np.ndarray) -> np.ndarray:
    """The exact weights of |d| under blend ``blend`` of class ``cls``."""
    gaps = _gaps(cls, blend)
    return _exp_weights()[gaps[np.minimum(d, len(gaps) - 1)]]


def _composition(shape: int) -> tuple[int, int, int, int]:
    """Shape ``shape`` as ``(blend, its weight, class offset of a Laplace mixed in, that one's
    weight)``: the Laplace-to-Gaussian blends alone, then a Laplace and a Gaussian each with a
    share k/16 (k in :data:`MIXES`) of a Laplace two octaves wider (heavier tails), then each with
    a share k/16 (k in :data:`SPIKES`) of a Laplace one or two octaves narrower (a sharper peak)."""
    if shape < BLENDS:
        return shape, 1, 0, 0
    j = shape - BLENDS
    if j < 2 * len(MIXES):
        k = MIXES[j % len(MIXES)]
        return (0, BLENDS - 1)[j // len(MIXES)], (16 - k) * 4, WIDE, k
    j -= 2 * len(MIXES)
    octaves, k = 1 + (j // len(SPIKES)) % 2, SPIKES[j % len(SPIKES)]
    return (0, BLENDS - 1)[j // (2 * len(SPIKES))], 16 - k, -4 * octaves, k << octaves


@lru_cache(maxsize=N_CLASSES * BLENDS)
def _half_profile(cls: int, blend: int) -> tuple[np.ndarray, np.ndarray]:
    """The weights of |d| = 0 .. ESCAPE under blend ``blend`` of class ``cls`` (float64, exact), and
    the sums of the weights of -w..w for every width w (exact: below 2**33)."""
    half = _profile(cls, blend, np.arange(ESCAPE + 1))
    return half, 2 * np.cumsum(half) - half[0]


@lru_cache(maxsize=1)
def _compositions() -> tuple[np.ndarray, ...]:
    """Every shape's :func:`_composition` as arrays: blend, its weight, offset, the other's weight."""
    return tuple(np.array(column) for column in zip(*(_composition(shape) for shape in range(SHAPES))))


def _shape_costs(width: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The classes used in ``counts`` (``(N_CLASSES, 2 width + 2)``: each class's count of the
    symbols -width..width and the escape), and the bits of coding each one's counts under each
    shape (``(SHAPES, len(used))``): -log2 of :func:`_weights`' normalised rows, read only where
    a count is not zero."""
    classes, bins = np.nonzero(counts)
    n, d = counts[classes, bins], np.abs(np.minimum(bins, 2 * width) - width)
    blends, weights, _, others = _compositions()
    profiles, mixed = _all_class_profiles()  # (N_CLASSES, BLENDS + k, 2, ESCAPE + 1), (SHAPES,)
    each = profiles[classes[:, None], np.arange(profiles.shape[1])[None, :], 0, d[:, None]].T  # (BLENDS + k, P)
    rows = weights[:, None] * each[blends] + others[:, None] * each[mixed]
    rows[:, bins == 2 * width + 1] = _exp_weights()[CAP]
    used, starts = np.unique(classes, return_index=True)
    totals = (weights[:, None] * profiles[used[None, :], blends[:, None], 1, width]
              + others[:, None] * profiles[used[None, :], mixed[:, None], 1, width] + _exp_weights()[CAP])
    return used, np.add.reduceat(n, starts) * np.log2(totals) - np.add.reduceat(np.log2(rows) * n, starts, axis=1)


@lru_cache(maxsize=1)
def _all_class_profiles() -> tuple[np.ndarray, np.ndarray]:
    """Every class's :func:`_half_profile` of every blend, then those of the Laplaces its shapes mix
    in (``(N_CLASSES, BLENDS + k, 2, ESCAPE + 1)``, 34 MB), and each shape's index of its mixed-in one."""
    offsets = _compositions()[2]
    distinct = sorted(set(offsets.tolist()))
    profiles = np.stack([np.stack([np.stack(_half_profile(cls, b)) for b in range(BLENDS)]
                                  + [np.stack(_half_profile(min(max(cls + o, 0), N_CLASSES - 1), 0)) for o in distinct])
                         for cls in range(N_CLASSES)])
    return profiles, BLENDS + np.searchsorted(distinct, offsets)


def _weights(cls: int, width: int) -> np.ndarray:
    """Every shape's weights of class ``cls`` (``(SHAPES, 2 width + 2)``): the tables :func:`_shape_costs`
    prices without building them (tests check the two agree)."""
    return np.stack([_shape_weights(cls, width, shape) for shape in range(SHAPES)])


def _shape_weights(cls: int, width: int, shape: int) -> np.ndarray:
    """Integer weights (float64, exact) of the symbols -width..width and the escape under shape
    ``shape`` of class ``cls`` (:func:`_composition`; what the coder needs): those of |d| = 0..width,
    mirrored, then the escape's."""
    blend, weight, offset, other = _composition(shape)
    half = weight * _half_profile(cls, blend)[0][:width + 1]
    if other:
        half += other * _half_profile(min(max(cls + offset, 0), N_CLASSES - 1), 0)[0][:width + 1]
    return np.concatenate([half[:0:-1], half, _exp_weights()[CAP:]])


# -- integer context ---------------------------------------------------------------------------

DIAGONAL = ((-1, -1), (-1, 1), (1, -1), (1, 1))
DIRECT = ((-1, 0), (1, 0), (0, -1), (0, 1))
KNIGHT = ((-1, -2), (-1, 2), (1, -2), (1, 2), (-2, -1), (-2, 1), (2, -1), (2, 1))


@dataclass(frozen=True)
class _Layout:
    """A payload's coding order and context (part of the format: :func:`_layout`)."""

    phases: tuple  # each phase's places (row, column) in every 2x2 cell of the slice
    neighbours: tuple  # per phase the decoded neighbours whose |q| sum is a scale feature (None: no feature)
    mean_offsets: tuple  # per phase the decoded residuals the mean weighs (:func:`_mean_columns`)
    spread: bool  # the picture's spread over 5x5 (:func:`_spread`) is a scale feature too


#: Versions 1 to 4: a quarter of the voxels (even row, even column) alone, then the quarter between
#: four of them diagonally, then the other half, each with four decoded neighbours.
THREE_PHASES = _Layout((((0, 0),), ((1, 1),), ((0, 1), (1, 0))), (None, DIAGONAL, DIRECT),
                       ((), DIAGONAL, DIRECT + KNIGHT), False)
#: Version 5, each slice one of two (flag :data:`FOUR`): the three phases, or the last half in two,
#: the odd rows' quarter after the even rows', so that it has eight decoded neighbours (its four
#: diagonal ones are the quarter before; the knight's-move ones add nothing there), with the
#: picture's 5x5 spread as a scale feature (on the phantom, where neither helps, it cost 0.002 bits
#: per voxel: so only with the fourth phase).
FOUR_PHASES = _Layout((((0, 0),), ((1, 1),), ((0, 1),), ((1, 0),)), (None, DIAGONAL, DIRECT, DIRECT + DIAGONAL),
                      ((), DIAGONAL, DIRECT + KNIGHT, DIRECT + DIAGONAL), True)


def _layout(version: int, flags: int) -> _Layout:
    """The coding order and context of a payload of ``version`` with ``flags``."""
    return FOUR_PHASES if version >= 5 and flags & FOUR else THREE_PHASES


def _phase_masks(shape, layout: _Layout) -> list[tuple[np.ndarray, tuple[int, int] | None]]:
    """Each phase's voxels as a mask, and its place in every 2x2 cell where it has one (None:
    several; :func:`_at` then gathers by the mask)."""
    rows, cols = np.indices(shape) % 2
    return [(np.logical_or.reduce([(rows == r) & (cols == c) for r, c in phase]), phase[0] if len(phase) == 1 else None)
            for phase in layout.phases]


def _at(x: np.ndarray, where: np.ndarray, cell: tuple[int, int] | None) -> np.ndarray:
    """``x`` at a phase's voxels, in raster order (a strided copy for a phase of one place a cell)."""
    return x.ravel().take(np.flatnonzero(where)) if cell is None else x[cell[0]::2, cell[1]::2].ravel()


def _contrast(prediction: np.ndarray) -> np.ndarray:
    """Largest absolute difference of each voxel's prediction to its four neighbours (edges repeated)."""
    p = np.pad(prediction, 1, mode="edge")
    centre = p[1:-1, 1:-1]
    return np.maximum.reduce([np.abs(centre - p[:-2, 1:-1]), np.abs(centre - p[2:, 1:-1]),
                              np.abs(centre - p[1:-1, :-2]), np.abs(centre - p[1:-1, 2:])])


def _spread(prediction: np.ndarray) -> np.ndarray:
    """Largest less least prediction over each voxel's 5x5 neighbourhood (edges repeated)."""
    height, width = prediction.shape
    p = np.pad(prediction, 2, mode="edge")
    across = [p[:, k:k + width] for k in range(5)]
    most, least = np.maximum.reduce(across), np.minimum.reduce(across)
    return (np.maximum.reduce([most[k:k + height] for k in range(5)])
            - np.minimum.reduce([least[k:k + height] for k in range(5)]))


def _picture_features(prediction: np.ndarray, quantiser: int, layout: _Layout) -> list[np.ndarray]:
    """The scale features read from the picture alone, in quantiser steps: its local contrast
    (first: version 4's mean groups are cut from it) and, in four phases, its spread."""
    features = [_contrast(prediction) // quantiser]
    return features + [_spread(prediction) // quantiser] if layout.spread else features


def _levels(prediction: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Each voxel's prediction as one of :data:`LEVELS` bins, log-spaced over the slice's range."""
    unit = max(1, (hi - lo + 1) >> 10)
    return np.searchsorted(LEVEL_EDGES, (prediction - lo) // unit, side="right")


def _neighbours(known: np.ndarray, offsets, where: np.ndarray,
                cell: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of |q| and sum of q over the neighbours at ``offsets`` (zero outside) of a phase's voxels
    (:func:`_at`), in raster order."""
    p = np.pad(known, 1)
    height, width = known.shape
    if cell is None:
        at = np.flatnonzero(where)
        around = [p[1 + dy:1 + dy + height, 1 + dx:1 + dx + width].ravel().take(at) for dy, dx in offsets]
    else:
        around = [p[1 + cell[0] + dy:1 + dy + height:2, 1 + cell[1] + dx:1 + dx + width:2].ravel() for dy, dx in offsets]
    return sum(np.abs(a) for a in around), sum(around)


def _phase_context(neighbours, where: np.ndarray, cell: tuple[int, int] | None, known: np.ndarray,
                   levels: np.ndarray, picture: list[np.ndarray],
                   apart: list[np.ndarray] = ()) -> tuple[_Features, np.ndarray]:
    """The features of one phase's voxels (``where``, ``cell``: :func:`_phase_masks`; :func:`_features`)
    and the sums of their decoded ``neighbours``' residuals (None: no such feature); ``picture``:
    :func:`_picture_features`; ``apart``: given references, how far their mean is from the
    prediction and how far apart they are from each other (in quantiser steps)."""
    first = [_at(feature, where, cell) for feature in picture]
    extra = [_at(feature, where, cell) for feature in apart]
    here = _at(levels, where, cell)
    if neighbours is None:
        return _features(here, *first, *extra), np.zeros(len(here), dtype=np.int64)
    size, total = _neighbours(known, neighbours, where, cell)
    return _features(here, *first, size, *extra), total


@dataclass(frozen=True)
class _Features:
    """One phase's scale features: each voxel's level (a one-hot of :data:`LEVELS` in the estimate)
    and further integer columns as rows ``(k, n)`` (clipped)."""

    levels: np.ndarray
    columns: np.ndarray

    @property
    def contrast(self) -> np.ndarray:
        """The first column: the picture's local contrast (clipped), from which version 4 cuts a
        phase's mean groups (part of the format: :func:`_phase_context` puts it first)."""
        return self.columns[0]

    def normal_equations(self, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``D^T D`` and ``D^T target`` of the design ``D`` (the one-hot, then the columns), without
        building the one-hot: every entry a sum of integers, exact in any order below 2**53."""
        rows = self.columns.astype(np.float64)
        target = target.astype(np.float64)
        cross = np.stack([np.bincount(self.levels, weights=row, minlength=LEVELS) for row in rows], axis=1)
        gram = np.block([[np.diag(np.bincount(self.levels, minlength=LEVELS).astype(np.float64)), cross],
                         [cross.T, rows @ rows.T]])
        return gram, np.concatenate([np.bincount(self.levels, weights=target, minlength=LEVELS), rows @ target])


def _features(levels: np.ndarray, *columns: np.ndarray) -> _Features:
    """The levels and the columns, clipped at 2**20."""
    out = np.empty((len(columns), len(levels)), dtype=np.int64)
    for j, column in enumerate(columns):
        np.minimum(column, 1 << 20, out=out[j])
    return _Features(levels, out)


def _classes(coefficients: np.ndarray, features: _Features) -> np.ndarray:
    """Scale class of each voxel: its estimated mean |d| (float16 coefficients made exact
    integers in 2**22 per unit), a quarter-octave class."""
    fixed = np.round(coefficients.astype(np.float64) * (1 << 22)).astype(np.int64)
    estimate = fixed[:LEVELS][features.levels] + _dot(fixed[LEVELS:], features.columns)
    return np.searchsorted(CLASS_EDGES, estimate >> ESTIMATE_SHIFT, side="right")


def _dot(weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``weights @ rows`` in int64 (``rows`` ``(k, n)``), a row at a time: numpy's integer matmul
    strides down the columns, 4x slower; integer sums are the same in any order."""
    out = rows[0] * weights[0]
    scaled = np.empty_like(out)
    for weight, row in zip(weights[1:].tolist(), rows[1:]):
        np.multiply(row, weight, out=scaled)
        out += scaled
    return out


def _mean_prediction(alpha: int, total: np.ndarray) -> np.ndarray:
    """Version 1's mean: round(alpha / 256 * mean of the four neighbours' residuals), in integers."""
    return np.floor_divide(alpha * total + 512, 1024)


#: Version 2's mean: per phase a linear prediction, weights fitted per slice and stored, from the
#: decoded residuals at the layout's offsets (all decoded before the phase: :attr:`_Layout.mean_offsets`)
#: and from the picture's differences to its 3x3 neighbours (an interpolation of the decoded values
#: and a sharpening of the picture in one).
PICTURE_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
WEIGHT_UNITS = {2: 256, 3: 128, 4: 128, 5: 128}  # by payload version: the mean's weights in 1/128 since version 3
WEIGHT_UNIT = WEIGHT_UNITS[VERSION]
#: The scale estimate's factors the fit tries for a bounded (δ > 0) residual.
FACTORS = (0.8, 1.0, 1.25)
COEFFICIENT_BITS = 9  # since version 3: a float16's sign, exponent and 3 mantissa bits
WEIGHT_LIMIT = 4096
COLUMN_LIMIT = 1 << 40  # columns clipped here: 20 of them times a weight stay far inside int64
#: Since version 4 a phase's voxels fall into this many groups by the picture's contrast (its
#: quartiles), each with its own mean weights, where each group would average GROUP_VOXELS voxels
#: (smaller phases keep one set: the weights' side information would cost more than they save).
#: Measured on the 46 real test slices and the phantom's 120 (ideal bits, the weights' cost
#: included): 2 groups -0.048 / -0.037 bits per voxel, 4 -0.057 / -0.051, 8 -0.044 / -0.018.
MEAN_GROUPS = 4
GROUP_VOXELS = 2048
MAX_MEAN_GROUPS = 16  # what a payload may declare


def _mean_columns(offsets, known: np.ndarray, prediction: np.ndarray, quantiser: int,
                  voxels: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """int64 ``(k, n)``, a row per column of the mean's design, for the phase's ``n`` ``voxels``
    (flat indices, in the order the columns are wanted): the decoded residuals at ``offsets`` around each (in
    stored units; zero beyond the edges), the picture's differences to its neighbours (the edge
    repeated) and, given a ``reference`` (the slices this one is coded after, in its stored
    units), its difference to the prediction."""
    width = known.shape[1] + 4
    rows, cols = np.divmod(voxels, known.shape[1])
    at = (rows + 2) * width + cols + 2  # each voxel in the arrays padded by 2
    residuals, picture = np.pad(known, 2).ravel(), np.pad(prediction, 2, mode="edge").ravel()
    out = np.empty((len(offsets) + len(PICTURE_OFFSETS) + (reference is not None), len(at)), dtype=np.int64)
    for j, (dy, dx) in enumerate(offsets):
        np.multiply(residuals.take(at + dy * width + dx), quantiser, out=out[j])
    centre = picture.take(at)
    for j, (dy, dx) in enumerate(PICTURE_OFFSETS, len(offsets)):
        np.subtract(picture.take(at + dy * width + dx), centre, out=out[j])
    if reference is not None:
        np.subtract(reference.ravel().take(voxels), prediction.ravel().take(voxels), out=out[-1])
    return np.clip(out, -COLUMN_LIMIT, COLUMN_LIMIT, out=out)


def _group_count(n: int) -> int:
    """How many mean groups a phase of ``n`` voxels gets (:data:`MEAN_GROUPS`)."""
    return MEAN_GROUPS if n >= MEAN_GROUPS * GROUP_VOXELS else 1


def _mean_groups(contrast: np.ndarray, groups: int) -> tuple[np.ndarray | None, np.ndarray]:
    """The phase's voxels by mean group: their order (stable; None for one group) and where each of
    the ``groups`` groups starts and ends in it. A voxel's group is the bin of its ``contrast`` (the
    picture's, the first scale feature) among bins split at the phase's quantiles (the decoder has
    the picture, so it finds the same groups; ties fall into the lower bin)."""
    n = len(contrast)
    if groups == 1 or n == 0:  # a phase without voxels: the payload's further rows are never used
        return None, np.array([0, n])
    picks = (n * np.arange(1, groups)) // groups
    group = np.zeros(n, dtype=np.uint8)  # MAX_MEAN_GROUPS <= 256
    for edge in np.partition(contrast, picks)[picks].tolist():
        group += contrast > edge
    return _runs(group, groups)


def _grouped_columns(offsets, known: np.ndarray, prediction: np.ndarray, quantiser: int, where: np.ndarray,
                     contrast: np.ndarray, groups: int,
                     reference: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The phase's :func:`_mean_columns` in mean-group order, the order and the groups' bounds
    (:func:`_mean_groups` of its voxels' ``contrast``)."""
    at = np.flatnonzero(where)
    order, bounds = _mean_groups(contrast, groups)
    columns = _mean_columns(offsets, known, prediction, quantiser, at if order is None else at[order], reference)
    return columns, order, bounds


def _grouped_mean(columns: np.ndarray, weights: np.ndarray, order: np.ndarray | None, bounds: np.ndarray,
                  quantiser: int, weight_unit: int = WEIGHT_UNIT) -> np.ndarray:
    """Each voxel's :func:`_weighted_mean` under its group's row of ``weights``, ``columns`` taken
    in group ``order`` (:func:`_mean_groups`), the means put back in the voxels' order."""
    means = [_weighted_mean(columns[:, lo:hi], row, quantiser, weight_unit)
             for row, (lo, hi) in zip(weights, itertools.pairwise(bounds))]
    if order is None:
        return means[0]
    out = np.empty(columns.shape[1], dtype=np.int64)
    out[order] = np.concatenate(means)
    return out


def _fit_weights(q: np.ndarray, columns: np.ndarray, quantiser: int) -> np.ndarray:
    """The weights (int64, in 1/WEIGHT_UNIT) of the columns (``(k, n)`` rows) that predict ``q``
    best, by least squares."""
    rows = columns.astype(np.float64)
    rows /= quantiser
    gram = rows @ rows.T
    gram += 1e-9 * (np.trace(gram) + 1) * np.eye(len(gram))  # a column of zeros (an edge) gets weight 0
    solution = np.linalg.solve(gram, rows @ q.astype(np.float64))
    return np.clip(np.round(solution * WEIGHT_UNIT), -WEIGHT_LIMIT, WEIGHT_LIMIT).astype(np.int64)


def _weighted_mean(columns: np.ndarray, weights: np.ndarray, quantiser: int, weight_unit: int = WEIGHT_UNIT) -> np.ndarray:
    """round(weights . columns / weight_unit / quantiser), in integers (``columns`` ``(k, n)`` rows)."""
    unit = weight_unit * quantiser
    return np.floor_divide(_dot(weights, columns) + unit // 2, unit)


def _symbol_index(symbols: np.ndarray, width: int) -> np.ndarray:
    index = np.clip(symbols, -width, width) + width
    index[np.abs(symbols) > width] = 2 * width + 1
    return index


# -- the phases ------------------------------------------------------------------------------

def _fit(symbols: np.ndarray, features: _Features,
         factors=(1.0,)) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Coefficients (float16, :func:`_coarse`), each used class's shape (in class order), the
    escape width of one phase and each voxel's class under those coefficients: least squares of
    |d| on the features, scaled by whichever of ``factors`` codes the phase in the fewest bits
    with, per class, the shape that codes its symbols in the fewest. (Lossless, searching 0.8 to
    1.25 changed no file by 0.0001 bits per voxel; at δ = 4 it saves 0.017 on the phantom:
    :data:`FACTORS`.)"""
    width = int(min(ESCAPE, np.abs(symbols).max(initial=0)))
    gram, moments = features.normal_equations(np.abs(symbols))
    solution = np.linalg.solve(gram + 1e-6 * np.eye(len(gram)), moments)  # least squares by the normal equations
    index = _symbol_index(symbols, width)
    best = (math.inf, None, None, None)
    for factor in factors:
        coefficients = _coarse(np.clip(solution * factor, -60000, 60000).astype(np.float16))
        classes = _classes(coefficients, features)
        counts = np.bincount(classes * (2 * width + 2) + index, minlength=N_CLASSES * (2 * width + 2))
        _, costs = _shape_costs(width, counts.reshape(N_CLASSES, 2 * width + 2))
        bits = float(costs.min(axis=0).sum())
        if bits < best[0]:
            best = (bits, coefficients, np.argmin(costs, axis=0).astype(np.uint8), classes)
    return best[1], best[2], width, best[3]


def _runs(keys: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The order that gathers equal ``keys`` (integers in ``[0, count)``, ``count`` <= 256) into
    runs, stable (a radix sort), and where each key's run starts and ends (``count + 1`` bounds)."""
    small = keys.astype(np.uint8)
    return np.argsort(small, kind="stable"), np.append(0, np.cumsum(np.bincount(small, minlength=count)))


def _by_class(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The voxels in class order (raster order within a class), the classes used and where each
    one's voxels start and end in that order (``len(used) + 1`` bounds)."""
    order, bounds = _runs(classes, N_CLASSES)
    used = np.flatnonzero(np.diff(bounds))
    return order, used, np.append(bounds[used], len(order))


def _code_phase(coder, model_class, symbols: np.ndarray, classes: np.ndarray, shapes: np.ndarray,
               width: int) -> np.ndarray:
    """Encode one phase's symbols, class by class (raster order within a class); returns the
    escaped residuals, in that order."""
    order, used, bounds = _by_class(classes)
    index = _symbol_index(symbols, width)[order].astype(np.int32)
    for k, (cls, shape) in enumerate(zip(used, shapes)):
        coder.encode(index[bounds[k]:bounds[k + 1]], model_class(_shape_weights(int(cls), width, int(shape)),
                                                                 perfect=False))
    return symbols[order][index == 2 * width + 1]


def _decode_phase(decoder, model_class, classes: np.ndarray, shapes: np.ndarray, width: int, escaped) -> np.ndarray:
    symbols = np.zeros(len(classes), dtype=np.int64)
    order, used, bounds = _by_class(classes)
    if len(used) != len(shapes) or (len(shapes) and shapes.max() >= SHAPES):
        raise ValueError("the residual payload's shapes do not fit its classes")
    for k, (cls, shape) in enumerate(zip(used, shapes)):
        where = order[bounds[k]:bounds[k + 1]]
        index = np.asarray(decoder.decode(model_class(_shape_weights(int(cls), width, int(shape)), perfect=False),
                                          len(where)),
                           dtype=np.int64)
        values = index - width
        out = np.flatnonzero(index == 2 * width + 1)
        if len(out):
            values[out] = escaped.take(len(out))
        symbols[where] = values
    return symbols


class _Escaped:
    """The escaped residuals a decoder hands out in order; running out means a damaged payload."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.at = values, 0

    def take(self, n: int) -> np.ndarray:
        if self.at + n > len(self.values):
            raise ValueError("more escaped residuals than the payload holds")
        self.at += n
        return self.values[self.at - n:self.at]


def _coder():
    import constriction

    return constriction.stream.model.Categorical, constriction.stream.queue


# -- what the layer stores ---------------------------------------------------------------------

def _grid(original: Stored, max_error: float) -> tuple[int, float, int]:
    """``(kind, step, quantiser)``: integers coded with quantiser 2δ + 1, or floats put on a grid."""
    values = original.values
    if not (math.isfinite(max_error) and max_error >= 0):
        raise Refused(f"the maximum error must be a number >= 0, not {max_error}")
    if np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)):
        if np.abs(values).max(initial=0) >= 2 ** 53:
            raise Refused("its values are beyond 2**53, more than this layer codes exactly")
        return INTEGERS, 1.0, 2 * int(max_error) + 1
    if max_error == 0:
        raise Refused("its values are not integers, so it cannot be stored exactly (lossless); "
                      "give --max-error above 0")
    # the grid is a little finer than 2δ, so that writing the value back in its type stays within δ
    unit = float(np.finfo(np.dtype(original.dtype) if original.dtype in ("float32", "float64") else np.float64).eps)
    step = 2 * max_error - 4 * unit * float(np.abs(values).max() + 2 * max_error)
    if not step > 0 or np.abs(values).max() / step >= 2 ** 50:
        raise Refused(f"--max-error {max_error} is below what its {original.dtype} values can resolve; give a larger one")
    return FLOATS, step, 1


def _prediction(picture: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round ``picture`` to integers; returns them and the voxels (flat indices) whose rounding
    is stored (too near a tie to recompute the same everywhere) with each one's rounding bit."""
    floor = np.floor(picture)
    frac = picture - floor
    up = frac >= 0.5
    near = np.flatnonzero(np.abs(frac - 0.5) < GUARD * (1 + np.abs(picture).max(initial=0)))
    return (floor + up).astype(np.int64), near.astype(np.uint32), up.ravel()[near]


def _stored_units(picture: np.ndarray, slope: float, inter: float, step: float) -> np.ndarray:
    units = (np.asarray(picture, dtype=np.float64) - inter) / slope / step
    if not np.isfinite(units).all() or np.abs(units).max(initial=0) >= 2 ** 52:
        raise ValueError("the decoded picture is out of the range this layer codes")
    return units


def encode(original: Stored, picture: np.ndarray, *, max_error: float = 0, references: tuple[Stored, ...] = ()) -> bytes:
    """The payload that makes ``picture`` (float64 scanner intensities) ``original``'s stored
    values within ``max_error`` (exactly at 0), given the ``references`` (the slices of its volume
    it is coded after, as they decode; none for a key slice). :class:`Refused` for a slice it
    cannot code so."""
    values = np.asarray(original.values)
    if values.shape != picture.shape or values.ndim != 2:
        raise ValueError(f"the slice {values.shape} and its picture {picture.shape} differ in shape")
    if not (math.isfinite(original.slope) and original.slope != 0 and math.isfinite(original.inter)):
        raise Refused(f"its scaling (scl_slope {original.slope}, scl_inter {original.inter}) cannot be undone")
    kind, step, quantiser = _grid(original, max_error)
    delta = (quantiser - 1) // 2
    target = values.astype(np.int64) if kind == INTEGERS else np.round(values / step).astype(np.int64)
    lo, hi = int(target.min()), int(target.max())
    prediction, near, bits = _prediction(_stored_units(picture, original.slope, original.inter, step))
    prediction = np.clip(prediction, lo, hi)
    levels = _levels(prediction, lo, hi)
    bias = _bias(target - prediction, levels)
    prediction = np.clip(prediction + bias[levels], lo, hi)
    r = target - prediction
    q = np.sign(r) * ((np.abs(r) + delta) // quantiser)
    rebuilt = np.clip(prediction + q * quantiser, lo, hi)
    written = _written(rebuilt, kind, step, original.dtype)
    error = np.abs(written.astype(np.float64) - values).max(initial=0)
    if error > max_error or (max_error == 0 and not np.array_equal(written, values)):  # float32 beyond 2**24
        raise Refused(f"its {original.dtype} values cannot be written back within {max_error} (they are "
                      f"{error} off); give a larger --max-error")

    reference = _reference(references, original, kind, step)
    four = _four_phases(q, prediction, quantiser, None if reference is None else reference[0])
    phases, escaped, words = _code_phases(q, prediction, levels, quantiser, reference, FOUR_PHASES if four else
                                          THREE_PHASES)
    scaling = np.array([original.slope, original.inter], dtype=np.float64)
    narrow = bool(np.array_equal(scaling.astype(np.float32), scaling))  # NIfTI-1 stores float32
    flags = kind | (2 * narrow) | (REFERENCED * (reference is not None)) | (FOUR * four)
    head = HEAD.pack(VERSION, flags, DTYPES.index(_dtype_name(original.dtype)), *values.shape,
                     float(max_error), _crc(rebuilt))
    numbers = [lo, hi, len(near), *bias.tolist()] + [v for w, _, sh, m in phases for v in (w, len(sh), len(m))]
    numbers += [v for _, _, _, weights in phases for v in weights.ravel().tolist()]
    parts = [head, struct.pack("<d", step) if kind == FLOATS else b"",
             scaling.astype("<f4" if narrow else "<f8").tobytes(), _varints(numbers)]
    parts += [_packed(np.concatenate([c for _, c, _, _ in phases]).view(np.uint16) >> (16 - COEFFICIENT_BITS),
                      COEFFICIENT_BITS)]
    parts += [_packed(sh, SHAPE_BITS) for _, _, sh, _ in phases]
    gaps = np.diff(near.astype(np.int64), prepend=-1) - 1
    parts += [_varints(gaps.tolist()), np.packbits(bits).tobytes(),
              _varints([len(e) for e in escaped] + np.concatenate(escaped).tolist()), words.tobytes()]
    return b"".join(parts)


def _code_phases(q: np.ndarray, prediction: np.ndarray, levels: np.ndarray, quantiser: int,
                 reference: np.ndarray | None, layout: _Layout) -> tuple[list, list, np.ndarray]:
    """Range-code the quantised residual ``q`` phase by phase in ``layout``: each phase's settings
    (escape width, coefficients, shapes, mean weights), its escaped residuals, and the coder's words."""
    picture = _picture_features(prediction, quantiser, layout)
    apart = _apart(reference, prediction, quantiser)
    reference = None if reference is None else reference[0]
    categorical, queue = _coder()
    coder = queue.RangeEncoder()
    known, phases, escaped = np.zeros_like(q), [], []
    for phase, (where, cell) in enumerate(_phase_masks(q.shape, layout)):
        features, _ = _phase_context(layout.neighbours[phase], where, cell, known, levels, picture, apart)
        columns, order, bounds = _grouped_columns(layout.mean_offsets[phase], known, prediction, quantiser, where,
                                                  features.contrast, _group_count(len(features.levels)), reference)
        here = q[where]
        target = here if order is None else here[order]
        weights = np.stack([_fit_weights(target[lo:hi], columns[:, lo:hi], quantiser)
                            for lo, hi in itertools.pairwise(bounds)])
        symbols = here - _grouped_mean(columns, weights, order, bounds, quantiser)
        coefficients, shapes, width, classes = _fit(symbols, features, FACTORS if quantiser > 1 else (1.0,))
        escaped.append(_code_phase(coder, categorical, symbols, classes, shapes, width))
        phases.append((width, coefficients, shapes, weights))
        known[where] = here
    return phases, escaped, np.asarray(coder.get_compressed(), dtype="<u4")


#: What :func:`_four_phases` counts a stored weight, a coefficient and a phase's shapes, in bits.
WEIGHT_BITS, SHAPES_BITS = 10, 100


def _four_phases(q: np.ndarray, prediction: np.ndarray, quantiser: int, reference: np.ndarray | None) -> bool:
    """Whether the slice is coded in :data:`FOUR_PHASES` (else :data:`THREE_PHASES`): where the
    odd rows' quarter is predicted enough better from its eight nearest residuals than from the
    three phases' twelve to pay for a fourth phase's settings. Each is a least-squares fit over that
    quarter, its gain the Gaussian code length of the smaller squared error (the encoder's choice
    alone: the flag tells the decoder). Measured on the 46 real test slices and the phantom's 120
    (2026-12-07): it picks what codes each slice in fewer bits every time lossless (the 256x256
    slices of two real scans, four phases; the phantom's and the upsampled small slices of a
    third, three), and for 165 of the 166 at δ = 2."""
    (first, _), (second, _), _, (where, _) = _phase_masks(q.shape, FOUR_PHASES)
    at = np.flatnonzero(where)
    if len(at) == 0:
        return False
    target = q.ravel().take(at).astype(np.float64)
    errors = []
    for known, offsets in ((np.where(first | second, q, 0), DIRECT + KNIGHT), (np.where(where, 0, q), DIRECT + DIAGONAL)):
        design = _mean_columns(offsets, known, prediction, quantiser, at, reference).astype(np.float64) / quantiser
        gram, moments = design @ design.T, design @ target
        solution = np.linalg.solve(gram + 1e-9 * (np.trace(gram) + 1) * np.eye(len(gram)), moments)
        errors.append(max(float(target @ target - solution @ moments), 1e-9))
    columns = len(DIRECT + DIAGONAL) + len(PICTURE_OFFSETS) + (reference is not None)
    settings = (columns * _group_count(len(at)) + LEVELS + 4) * WEIGHT_BITS + SHAPES_BITS
    return len(at) / 2 * math.log2(errors[0] / errors[1]) > settings


def _reference_features(quantiser: int) -> int:
    """How many scale features a slice coded given references has (:func:`_apart`): two lossless,
    one otherwise (the references' spread cost the phantom 0.014 bits per voxel at δ = 4 where it
    saved 0.004 at δ = 0)."""
    return 2 if quantiser == 1 else 1


def _apart(reference: tuple[np.ndarray, np.ndarray] | None, prediction: np.ndarray,
           quantiser: int) -> list[np.ndarray]:
    """The scale features of a slice coded given references (none otherwise): how far their mean
    is from the prediction (in quantiser steps), then their spread."""
    if reference is None:
        return []
    mean, spread = reference
    return [np.abs(mean - prediction) // quantiser, spread][:_reference_features(quantiser)]


def _reference(references: tuple[Stored, ...], original: Stored, kind: int,
               step: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The mean of the ``references``' values in ``original``'s stored units (int64, on its grid of
    ``step`` for floats) and their spread (largest less least), or None (no references, or one of
    another shape). Exact where their scaling is the slice's; else by IEEE operations alone (the
    same on every machine)."""
    shape = np.shape(original.values)
    if not references or any(np.shape(ref.values) != shape for ref in references):
        return None
    units = []
    for ref in references:
        if kind == INTEGERS and (ref.slope, ref.inter) == (original.slope, original.inter):
            units.append(np.asarray(ref.values).astype(np.int64))
        else:
            scanner = np.asarray(ref.values, dtype=np.float64) * ref.slope + ref.inter
            value = np.nan_to_num((scanner - original.inter) / original.slope / step)
            units.append(np.round(np.clip(value, -(2.0 ** 50), 2.0 ** 50)).astype(np.int64))
    return sum(units) // len(units), np.maximum.reduce(units) - np.minimum.reduce(units)


def _varints(values) -> bytes:
    """Integers as zigzag LEB128: small magnitudes in one byte."""
    out = bytearray()
    for value in values:
        value = int(value)
        zigzag = (value << 1) ^ (value >> 63) if -(1 << 63) <= value < (1 << 63) else None
        if zigzag is None:
            raise ValueError(f"{value} does not fit a payload number")
        zigzag &= (1 << 64) - 1
        while zigzag >= 0x80:
            out.append((zigzag & 0x7F) | 0x80)
            zigzag >>= 7
        out.append(zigzag)
    return bytes(out)


def _bias(residual: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The median residual of each level: what the picture is off by there (int64, ``LEVELS``)."""
    bias = np.zeros(LEVELS, dtype=np.int64)
    order, bounds = _runs(levels.ravel(), LEVELS)
    ranked = residual.ravel()[order]  # each level's residuals in a run
    for level in np.flatnonzero(np.diff(bounds)):
        bias[level] = int(np.clip(np.median(ranked[bounds[level]:bounds[level + 1]]), -(1 << 30), 1 << 30))
    return bias


def _packed(values: np.ndarray, width: int) -> bytes:
    """Small unsigned integers, ``width`` bits each, most significant first."""
    bits = (np.asarray(values, dtype=np.int64)[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return np.packbits(bits.ravel().astype(np.uint8)).tobytes()


def _unpacked(raw: bytes, n: int, width: int) -> np.ndarray:
    """:func:`_packed` undone: ``n`` integers (int64)."""
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n * width].reshape(n, width)
    return (bits.astype(np.int64) << np.arange(width - 1, -1, -1)).sum(1)


def _coarse(coefficients: np.ndarray) -> np.ndarray:
    """float16 coefficients rounded to :data:`COEFFICIENT_BITS` bits (their bit patterns rounded:
    the carry goes into the exponent); finite for magnitudes up to 60,000."""
    drop = 16 - COEFFICIENT_BITS
    pattern = coefficients.astype(np.float16).view(np.uint16).astype(np.int64)
    sign, magnitude = pattern & 0x8000, pattern & 0x7FFF
    magnitude = ((magnitude + (1 << (drop - 1))) >> drop) << drop
    return (sign | magnitude).astype(np.uint16).view(np.float16)


def _dtype_name(dtype: str) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise Refused(f"its on-disk type {dtype} is not one this layer writes back ({', '.join(DTYPES)})")
    return name


def _written(rebuilt: np.ndarray, kind: int, step: float, dtype: str) -> np.ndarray:
    """The reconstruction as the stored values of the file's type."""
    if kind == INTEGERS:
        info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
        if info is not None and (rebuilt.min(initial=0) < info.min or rebuilt.max(initial=0) > info.max):
            raise ValueError(f"the reconstruction does not fit {dtype}")
        return rebuilt.astype(dtype)
    return (rebuilt * step).astype(dtype)


def _crc(rebuilt: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(rebuilt, dtype="<i8").tobytes())


def decode(payload: bytes, picture: np.ndarray, references: tuple[Stored, ...] = ()) -> Stored:
    """Undo :func:`encode` given the same picture (to float64 rounding) and references: the stored
    values, each within the payload's bound of the input's. ``ValueError`` for a damaged payload,
    one coded given references that are not given (or the other way), or one whose
    reconstruction does not match the encoder's checksum."""
    try:
        return _decode(payload, picture, references)
    except (AssertionError, RuntimeError, OverflowError) as e:  # the range decoder meets words it never wrote
        raise ValueError(f"the residual stream does not decode ({e})") from None


class _Reader:
    """Reads a payload front to back; running past its end is a ``ValueError``."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.at = payload, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.payload):
            raise ValueError("the residual payload is shorter than its parts")
        self.at += n
        return self.payload[self.at - n:self.at]

    def varints(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            value, shift = 0, 0
            while True:
                byte = self.take(1)[0]
                value |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
                if shift > 63:
                    raise ValueError("a residual payload number is too long")
            out.append((value >> 1) ^ -(value & 1))
        return out


@dataclass
class _Payload:
    """A residual payload read and checked: the header's numbers and each part as arrays."""

    head: dict
    bias: np.ndarray
    phases: list  # per phase (escape width, classes used, the mean's weight or weights: _phase_settings)
    coefficients: list
    shapes: list
    near: np.ndarray
    bits: np.ndarray
    escaped: _Escaped
    words: np.ndarray


def max_error_of(payload: bytes) -> float:
    """The bound a payload was coded within (0: exact); ``ValueError`` for what is not a payload."""
    if len(payload) < HEAD.size:
        raise ValueError("not a residual payload this mrivq reads")
    return float(HEAD.unpack(payload[:HEAD.size])[5])


def _coefficients(version: int, layout: _Layout, reader: _Reader, extra: int) -> list[np.ndarray]:
    """Each phase's float16 coefficients: 16 bits each up to version 2, then :data:`COEFFICIENT_BITS`
    (``extra`` more per phase: the scale features given references, :func:`_apart`)."""
    sizes = [LEVELS + 1 + layout.spread + (neighbours is not None) + extra for neighbours in layout.neighbours]
    if version < 3:
        return [np.frombuffer(reader.take(2 * n), "<f2").astype(np.float16) for n in sizes]
    codes = _unpacked(reader.take((COEFFICIENT_BITS * sum(sizes) + 7) // 8), sum(sizes), COEFFICIENT_BITS)
    every = (codes << (16 - COEFFICIENT_BITS)).astype(np.uint16).view(np.float16)
    return np.split(every, np.cumsum(sizes)[:-1])


def _phase_settings(version: int, layout: _Layout, numbers: list[int], reader: _Reader,
                    referenced: bool = False) -> list[tuple]:
    """Per phase (escape width, classes used, the mean's setting): version 1's one weight (an int),
    later versions' weights (int64 ``(groups, k)``, a row per mean group (one before version 4),
    one weight per :func:`_mean_columns` row, read from ``reader``)."""
    n = len(layout.phases)
    if version == 1:
        return [tuple(numbers[3 * i:3 * i + 3]) for i in range(n)]
    per = 3 if version >= 4 else 2
    groups = [numbers[per * i + 2] if version >= 4 else 1 for i in range(n)]
    if not all(1 <= g <= MAX_MEAN_GROUPS for g in groups):
        raise ValueError("the residual payload's coder settings are not valid")
    counts = [len(offsets) + len(PICTURE_OFFSETS) + referenced for offsets in layout.mean_offsets]
    sizes = [g * k for g, k in zip(groups, counts)]
    weights = np.split(np.array(reader.varints(sum(sizes)), dtype=np.int64), np.cumsum(sizes)[:-1])
    return [(numbers[per * i], numbers[per * i + 1], weights[i].reshape(groups[i], counts[i])) for i in range(n)]


def _parse(payload: bytes, shape: tuple[int, int]) -> _Payload:
    """Read ``payload`` for a slice of ``shape``; ``ValueError`` where anything does not fit."""
    reader = _Reader(payload)
    version, flags, dtype, height, width, max_error, crc = HEAD.unpack(reader.take(HEAD.size))
    kind = flags & 1
    if version not in VERSIONS or flags > (15 if version >= 5 else 7 if version >= 3 else 3) or dtype >= len(DTYPES):
        raise ValueError("not a residual payload this mrivq reads")
    if (height, width) != tuple(shape):
        raise ValueError("the residual payload is for a slice of another shape")
    step = struct.unpack("<d", reader.take(8))[0] if kind == FLOATS else 1.0
    slope, inter = (float(v) for v in np.frombuffer(reader.take(8 if flags & 2 else 16), "<f4" if flags & 2 else "<f8"))
    layout = _layout(version, flags)
    n_phases = len(layout.phases)
    lo, hi, n_near, *rest = reader.varints(3 + LEVELS + (2 if version in (2, 3) else 3) * n_phases)
    referenced = bool(flags & REFERENCED)
    bias, phases = np.array(rest[:LEVELS], dtype=np.int64), _phase_settings(version, layout, rest[LEVELS:], reader,
                                                                              referenced)
    pixels = height * width
    if not (all(map(math.isfinite, (step, slope, inter, max_error))) and step > 0 and slope != 0 and max_error >= 0
            and lo <= hi and 0 <= n_near <= pixels and np.abs(bias).max() <= 1 << 62):
        raise ValueError("the residual payload's numbers are not valid")
    limit = 1024 if version == 1 else WEIGHT_LIMIT
    if any(not (0 <= w <= ESCAPE and 0 <= used <= N_CLASSES and np.abs(mean).max(initial=0) <= limit)
           for w, used, mean in phases):
        raise ValueError("the residual payload's coder settings are not valid")
    quantiser = 2 * int(max_error) + 1 if kind == INTEGERS else 1
    coefficients = _coefficients(version, layout, reader, _reference_features(quantiser) if referenced else 0)
    if not all(np.isfinite(c).all() for c in coefficients):
        raise ValueError("the residual payload's coder settings are not valid")
    shapes = [_unpacked(reader.take((SHAPE_BITS * used + 7) // 8), used, SHAPE_BITS).astype(np.uint8)
              for _, used, _ in phases]
    gaps = np.array(reader.varints(n_near), dtype=np.int64)
    near = np.cumsum(gaps + 1) - 1
    if len(near) and (gaps.min() < 0 or near[-1] >= pixels):
        raise ValueError("the residual payload's stored roundings are not valid")
    bits = np.unpackbits(np.frombuffer(reader.take((n_near + 7) // 8), np.uint8))[:n_near].astype(np.int64)
    counts = reader.varints(n_phases)
    if min(counts) < 0 or sum(counts) > pixels:
        raise ValueError("the residual payload lists more voxels than the slice has")
    escaped = _Escaped(np.array(reader.varints(sum(counts)), dtype=np.int64))
    if (len(payload) - reader.at) % 4:
        raise ValueError("the residual payload's parts do not add up")
    head = {"kind": kind, "dtype": dtype, "max_error": max_error, "step": step, "slope": slope, "inter": inter,
            "lo": lo, "hi": hi, "crc": crc, "version": version, "referenced": referenced, "layout": layout}
    return _Payload(head, bias, phases, coefficients, shapes, near,
                    bits, escaped, np.frombuffer(payload, "<u4", offset=reader.at).copy())


def _decode(payload: bytes, picture: np.ndarray, references: tuple[Stored, ...]) -> Stored:
    part = _parse(payload, picture.shape)
    head = part.head
    lo, hi, kind, step = head["lo"], head["hi"], head["kind"], head["step"]
    quantiser = 2 * int(head["max_error"]) + 1 if kind == INTEGERS else 1
    units = _stored_units(picture, head["slope"], head["inter"], step)
    prediction = np.floor(units + 0.5).astype(np.int64).ravel()
    prediction[part.near] = np.floor(units.ravel()[part.near]).astype(np.int64) + part.bits
    prediction = np.clip(prediction.reshape(units.shape), lo, hi)
    levels = _levels(prediction, lo, hi)
    prediction = np.clip(prediction + part.bias[levels], lo, hi)
    reference = _reference(references, Stored(prediction, DTYPES[head["dtype"]], head["slope"], head["inter"]),
                           kind, step) if head["referenced"] else None
    if head["referenced"] and reference is None:
        raise ValueError("the residual payload was coded given reference slices, and none of its shape was given")
    rebuilt = np.clip(prediction + _decode_phases(part, prediction, levels, quantiser, reference) * quantiser, lo, hi)
    if _crc(rebuilt) != head["crc"]:
        raise ValueError("the residual layer does not rebuild the values the encoder checked (checksum differs)")
    dtype = DTYPES[head["dtype"]]
    return Stored(_written(rebuilt, kind, step, dtype), dtype, head["slope"], head["inter"])


def _decode_phases(part: _Payload, prediction: np.ndarray, levels: np.ndarray, quantiser: int,
                   reference: np.ndarray | None) -> np.ndarray:
    """:func:`_code_phases` undone: the quantised residual (int64, the prediction's shape)."""
    version, layout = part.head["version"], part.head["layout"]
    picture = _picture_features(prediction, quantiser, layout)
    apart = _apart(reference, prediction, quantiser)
    reference = None if reference is None else reference[0]
    categorical, queue = _coder()
    decoder = queue.RangeDecoder(part.words)
    q = np.zeros(prediction.shape, dtype=np.int64)
    for phase, (where, cell) in enumerate(_phase_masks(q.shape, layout)):
        features, total = _phase_context(layout.neighbours[phase], where, cell, q, levels, picture, apart)
        width, _, mean = part.phases[phase]
        if version == 1:
            mean = _mean_prediction(mean, total)
        else:
            columns, order, bounds = _grouped_columns(layout.mean_offsets[phase], q, prediction, quantiser, where,
                                                      features.contrast, len(mean), reference)
            mean = _grouped_mean(columns, mean, order, bounds, quantiser, WEIGHT_UNITS[version])
        q[where] = _decode_phase(decoder, categorical, _classes(part.coefficients[phase], features),
                                part.shapes[phase], width, part.escaped) + mean
    return q


def _tables() -> None:
    """The coder's integer tables, built once (about 0.1 s; then shared by forked workers)."""
    _exp_weights()
    _all_class_profiles()


LAYER = register(CodingLayer(NAME, "the residual to the stored values, within --max-error", encode, decode,
                            references=True, prepare=_tables))
