"""Synthetic T2-weighted axial pelvis slices and masks in the HipMRI layout (``mrivq synth``).

HipMRI itself is not shipped, so every default run and every test uses this phantom. It
writes the same folders, file names, shapes, dtypes and labels as the real study, so the
code that reads it runs unchanged on the real folders::

    OUT_DIR/keras_slices_{train,validate,test}/case_NNN_week_W_slice_S.nii.gz   float32
    OUT_DIR/keras_slices_seg_{train,validate,test}/seg_NNN_week_W_slice_S.nii.gz uint8
    OUT_DIR/montage.png                                                         a look at it

Orientation (one convention, used everywhere here). A slice array has shape ``(H, W)``,
``(256, 128)`` by default, as the real files load in nibabel:

- axis 0 (``H``, 256) runs left-right, from the patient's right (index 0) to the left;
- axis 1 (``W``, 128) runs anterior-posterior, from the front (index 0) to the back;
- slice index ``S`` runs inferior to superior: slice 0 lies below the prostate apex,
  the last slice near the bladder dome and the lower sacrum.

Displayed transposed (``imshow(slice.T)``), a slice is what a radiologist sees: a wide body
oval, anterior at the top, the patient's right on the viewer's left. The affine says the same
in RAS+ millimetres (see :func:`slice_affine`).

Anatomy is drawn in normalised, isotropic coordinates (``x`` left-right in [-1, 1] across
``H``; ``y`` anterior-posterior in units of ``H / 2`` pixels, so [-0.5, 0.5] across 128
pixels), hence any shape works: (64, 32) for tests, and the wide HipMRI variant
(``W = round(W * 144 / 128)``) shows the same body with more background front and back.
Every size and position is a smooth function of the slice level ``t`` in [0, 1], so the
anatomy changes smoothly from slice to slice; case parameters (body habitus, fat, prostate
size, bone positions, intensities) differ between cases, and session parameters (bladder
filling, rectal gas, positioning, bias field, noise) between the weeks of one case.

Intensities are raw-scanner-like: float32 values that are whole numbers (as scanner integers
converted to float), background around 20-40, muscle around 200-350, fat 600-1000, urine
1000-2500. Image formation: tissue map -> per-tissue intensity with texture -> in-plane
partial-volume blur -> smooth multiplicative bias field -> Rician noise (magnitude of the
signal plus complex Gaussian noise).

Masks use the HipMRI labels in :data:`mrivq.data.hipmri.LABELS`; everything inside the body outline that is
not bone, bladder, rectum or prostate is ``1`` (body).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from mrivq.data.io import nifti_bytes
from mrivq.errors import UserError

SPLITS = ("train", "validate", "test")
HIPMRI_VOLUMES = {"train": 191, "validate": 11, "test": 9}  # x 60 slices = 11,460 / 660 / 540
WIDE_WIDTH_RATIO = 144 / 128
PIXEL_SPACING_MM = 0.9375  # at H = 256; scaled so that the field of view stays 240 mm
SLICE_THICKNESS_MM = 2.5

# Which volumes (by position in the dataset, train first) are wide or carry a singleton
# third axis: a fixed pattern, so that even a three-case dataset has one of each.
_WIDE_EVERY, _WIDE_AT = 13, 1
_SINGLETON_EVERY, _SINGLETON_AT = 5, 2

# Tissue classes of the internal tissue map (not written anywhere).
(AIR, FAT, MUSCLE, PELVIC_FAT, CORTEX, MARROW, URINE, BLADDER_WALL, RECTAL_WALL, RECTAL_GAS,
 RECTAL_CONTENT, PERIPHERAL_ZONE, TRANSITION_ZONE, STROMA, SEMINAL, VESSEL, URETHRA) = range(17)
_N_TISSUES = 17

# T2 intensity of each tissue before the case's gain, and texture strength (fine, coarse).
_T2 = np.zeros(_N_TISSUES, np.float32)
_TEXTURE = np.zeros((_N_TISSUES, 2), np.float32)
for _tissue, _value, _fine, _coarse in [
    (AIR, 0, 0, 0), (FAT, 820, 0.04, 0.05), (MUSCLE, 240, 0.12, 0.08),
    (PELVIC_FAT, 800, 0.06, 0.15), (CORTEX, 35, 0.1, 0), (MARROW, 760, 0.10, 0.10),
    (URINE, 1350, 0.01, 0.03), (BLADDER_WALL, 200, 0.08, 0.05), (RECTAL_WALL, 280, 0.10, 0.10),
    (RECTAL_GAS, 12, 0, 0), (RECTAL_CONTENT, 430, 0.15, 0.35), (PERIPHERAL_ZONE, 700, 0.10, 0.12),
    (TRANSITION_ZONE, 360, 0.12, 0.30), (STROMA, 170, 0.08, 0.05), (SEMINAL, 900, 0.10, 0.35),
    (VESSEL, 70, 0.1, 0), (URETHRA, 520, 0.05, 0),
]:
    _T2[_tissue] = _value
    _TEXTURE[_tissue] = (_fine, _coarse)

# Mask label of each tissue; organs override this where they are painted.
_TISSUE_LABEL = np.ones(_N_TISSUES, np.uint8)
_TISSUE_LABEL[AIR] = 0


def make_volume(seed: int, n_slices: int = 60,
                shape: tuple[int, int] = (256, 128)) -> tuple[np.ndarray, np.ndarray]:
    """One case-week volume: images float32 (n_slices, H, W) raw intensities, masks uint8
    (n_slices, H, W) with the HipMRI labels.

    The same ``seed`` gives the same arrays, byte for byte. Example::

        images, masks = make_volume(0, n_slices=60, shape=(256, 128))
        images.shape, images.dtype, np.unique(masks)  # (60, 256, 128) float32 [0 1 2 3 4 5]
    """
    return _render_volume((seed,), (seed, 0), n_slices, shape)


def slice_affine(slice_index: int, shape: tuple[int, int] = (256, 128)) -> np.ndarray:
    """RAS+ voxel-to-mm affine (4, 4) of one slice: axis 0 right->left, axis 1 anterior->posterior.

    Pixel spacing is 0.9375 mm at H = 256 (field of view 240 mm), slices are 2.5 mm apart and
    the slice index moves the z offset.
    """
    height, width = shape
    spacing = PIXEL_SPACING_MM * 256 / height
    affine = np.diag([-spacing, -spacing, SLICE_THICKNESS_MM, 1.0])
    affine[:3, 3] = [spacing * (height - 1) / 2, spacing * (width - 1) / 2,
                     SLICE_THICKNESS_MM * slice_index]
    return affine


def synthesize(out_dir, *, cases: int = 16, seed: int = 0, slices_per_volume: int = 60,
               shape: tuple[int, int] = (256, 128), hipmri_counts: bool = False,
               fractions: tuple[float, float, float] = (0.75, 0.125, 0.125),
               montage: bool = True, progress: bool = False) -> dict:
    """Write a phantom dataset in the HipMRI layout; returns a summary dict with per-split slice
    and case counts, the output folder and the montage path (``montage.png`` in ``out_dir``, a
    grid of generated slices drawn with matplotlib's Agg canvas).

    Args:
        out_dir: folder to create; it must not exist or be empty. The set is written into a
            hidden folder beside it and renamed into place at the end, so an interrupted run
            never leaves a half-written set under ``out_dir``.
        cases: number of case volumes (one week each), split by case with ``fractions``
            (train, validate, test); each split gets at least one case when ``cases >= 3``.
        seed: the same seed writes the same arrays.
        slices_per_volume: slices per volume (HipMRI: 60).
        shape: ``(H, W)`` of a normal slice; wide volumes have ``W = round(W * 144 / 128)``.
        hipmri_counts: ignore ``cases``/``fractions`` and write HipMRI's 191 / 11 / 9 volumes
            (11,460 / 660 / 540 slices at 60 per volume); cases have one to six weeks.
        montage: write ``montage.png``.
        progress: show a tqdm bar over volumes.

    Returns:
        ``{"out_dir": str, "montage": str | None, "train": {"cases", "volumes", "slices"},
        "validate": {...}, "test": {...}, "wide_volumes": int, "singleton_axis_volumes": int,
        "seconds": float}``.

    Example::

        summary = synthesize("/tmp/hipmri_phantom", cases=16, seed=0)
        summary["train"]  # {'cases': 12, 'volumes': 12, 'slices': 720}
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    height, width = (int(v) for v in shape)
    if height < 8 or width < 8:
        raise UserError(f"phantom shape must be at least 8x8 pixels, got {tuple(shape)}")
    if slices_per_volume < 1:
        raise UserError(f"slices_per_volume must be at least 1, got {slices_per_volume}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; "
                        "choose a new folder or remove it first")

    volumes = _plan_volumes(cases, seed, fractions, hipmri_counts)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    wide_width = round(width * WIDE_WIDTH_RATIO)
    montage_rows = _montage_picks(volumes) if montage else set()
    jobs = [
        _VolumeJob(partial, v.split, v.case_id, v.week, seed, slices_per_volume,
                   (height, wide_width if v.wide else width), v.singleton_axis,
                   keep_for_montage=i in montage_rows)
        for i, v in enumerate(volumes)
    ]
    _write_dataset(jobs, partial, out_dir, montage=montage, progress=progress)
    return _dataset_summary(out_dir, volumes, slices_per_volume, montage=montage,
                            seconds=round(time.perf_counter() - started, 2))


def _write_dataset(jobs: list[_VolumeJob], partial: Path, out_dir: Path, *, montage: bool,
                   progress: bool) -> None:
    """Write every volume (and the montage) into the hidden folder ``partial``, the jobs' root,
    then rename it to ``out_dir``; on any failure ``partial`` is removed and nothing is left."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for split in SPLITS:
            (partial / f"keras_slices_{split}").mkdir(parents=True)
            (partial / f"keras_slices_seg_{split}").mkdir(parents=True)
        kept = {}
        for i, result in enumerate(_run_jobs(jobs, progress)):
            if result is not None:
                kept[i] = result
        if montage:
            _write_montage(partial / "montage.png", [(jobs[i], kept[i]) for i in sorted(kept)])
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked by synthesize
        os.replace(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _dataset_summary(out_dir: Path, volumes: list[_PlannedVolume], slices_per_volume: int, *,
                     montage: bool, seconds: float) -> dict:
    """What :func:`synthesize` returns: the folder, the montage, per-split counts, odd volumes."""
    summary: dict = {"out_dir": str(out_dir),
                     "montage": str(out_dir / "montage.png") if montage else None}
    for split in SPLITS:
        in_split = [v for v in volumes if v.split == split]
        summary[split] = {"cases": len({v.case_id for v in in_split}), "volumes": len(in_split),
                          "slices": len(in_split) * slices_per_volume}
    summary["wide_volumes"] = sum(v.wide for v in volumes)
    summary["singleton_axis_volumes"] = sum(v.singleton_axis for v in volumes)
    summary["seconds"] = seconds
    return summary


# --------------------------------------------------------------------------- dataset plan


@dataclass(frozen=True)
class _PlannedVolume:
    split: str
    case_id: int
    week: int
    wide: bool
    singleton_axis: bool


def _plan_volumes(cases: int, seed: int, fractions, hipmri_counts: bool) -> list[_PlannedVolume]:
    """Case ids, weeks and splits of every volume, train first, then validate, then test."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    if hipmri_counts:
        weeks_per_case = {}
        for split in SPLITS:
            remaining, split_cases = HIPMRI_VOLUMES[split], []
            while remaining:
                weeks = int(min(remaining, rng.integers(1, 7)))
                split_cases.append(weeks)
                remaining -= weeks
            weeks_per_case[split] = split_cases
    else:
        if int(cases) != cases or cases < 1:
            raise UserError(f"cases must be a positive whole number, got {cases}")
        counts = _phantom_split_sizes(int(cases), fractions)
        weeks_per_case = {split: [1] * n for split, n in zip(SPLITS, counts)}

    n_cases = sum(len(w) for w in weeks_per_case.values())
    case_ids = [int(c) for c in rng.choice(np.arange(1, 1000), size=n_cases, replace=False)]
    planned, taken = [], 0
    for split in SPLITS:
        split_ids = sorted(case_ids[taken:taken + len(weeks_per_case[split])])
        taken += len(split_ids)
        for case_id, n_weeks in zip(split_ids, weeks_per_case[split]):
            for week in range(n_weeks):
                k = len(planned)
                planned.append(_PlannedVolume(split, case_id, week,
                                              wide=k % _WIDE_EVERY == _WIDE_AT,
                                              singleton_axis=k % _SINGLETON_EVERY == _SINGLETON_AT))
    return planned


def _phantom_split_sizes(cases: int, fractions) -> tuple[int, int, int]:
    """Cases per split: proportional to ``fractions``, at least one each when ``cases >= 3``."""
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise UserError(f"fractions must be three non-negative numbers (train, validate, test), "
                        f"got {tuple(fractions)}")
    fractions = fractions / fractions.sum()
    if cases < 3:
        return (cases, 0, 0) if cases == 1 else (1, 1, 0)
    validate = max(1, round(cases * fractions[1]))
    test = max(1, round(cases * fractions[2]))
    train = cases - validate - test
    while train < 1:  # tiny sets with small train fractions: give train its one case
        if validate >= test:
            validate -= 1
        else:
            test -= 1
        train += 1
    return train, validate, test


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _VolumeJob:
    root: Path
    split: str
    case_id: int
    week: int
    seed: int
    n_slices: int
    shape: tuple[int, int]
    singleton_axis: bool
    keep_for_montage: bool

    @property
    def name(self) -> str:
        return f"{self.case_id:03d}_week_{self.week}"


def _write_volume(job: _VolumeJob):
    """Render one volume and write its slices; returns the arrays when the montage needs them."""
    images, masks = _render_volume((job.seed, job.case_id), (job.seed, job.case_id, job.week),
                                   job.n_slices, job.shape)
    image_dir = job.root / f"keras_slices_{job.split}"
    mask_dir = job.root / f"keras_slices_seg_{job.split}"
    for s in range(job.n_slices):
        affine = slice_affine(s, job.shape)
        image, mask = images[s], masks[s]
        if job.singleton_axis:
            image, mask = image[..., None], mask[..., None]
        for array, path in ((image, image_dir / f"case_{job.name}_slice_{s}.nii.gz"),
                            (mask, mask_dir / f"seg_{job.name}_slice_{s}.nii.gz")):
            img = nib.Nifti1Image(array, affine)
            img.header.set_xyzt_units("mm")
            # The same bytes as img.to_filename(path), a third faster: nibabel streams the
            # array through gzip in many small writes. mtime=0 keeps files byte-identical.
            path.write_bytes(nifti_bytes(img, compresslevel=1))
    if not job.keep_for_montage:
        return None
    levels = _montage_levels(job.n_slices)
    return levels, images[levels], masks[levels]


def _run_jobs(jobs: list[_VolumeJob], progress: bool):
    """Yield each job's result in order, in worker processes when the set is large."""
    voxels = sum(j.n_slices * j.shape[0] * j.shape[1] for j in jobs)
    workers = min(os.cpu_count() or 1, 8, len(jobs))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="volume", desc="phantom")
    try:
        if workers < 2 or voxels < 8_000_000:
            for job in jobs:
                yield _write_volume(job)
                if bar is not None:
                    bar.update()
        else:
            # fork is fast, but forking a process that already runs torch's thread pools can
            # hang the children; spawn is the safe choice then.
            method = "fork" if sys.platform == "linux" and "torch" not in sys.modules else "spawn"
            context = multiprocessing.get_context(method)
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for result in pool.map(_write_volume, jobs):
                    yield result
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()


def _montage_picks(volumes: list[_PlannedVolume]) -> set[int]:
    """Positions of the volumes the montage shows: the first three and the first wide one."""
    picks = set(range(min(3, len(volumes))))
    wide = [i for i, v in enumerate(volumes) if v.wide]
    if wide:
        picks.add(wide[0])
    return picks


def _montage_levels(n_slices: int) -> np.ndarray:
    """Six slice indices from near the bottom to near the top of a volume."""
    return np.round(np.linspace(0.08, 0.92, 6) * (n_slices - 1)).astype(int)


def _write_montage(path: Path, shown) -> None:
    """A grid of slices at six levels per shown volume, plus the masks of the first one.

    Slices are drawn transposed (anterior at the top, patient's right on the left).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    n_levels = len(_montage_levels(2))
    rows = len(shown) + 1
    fig = Figure(figsize=(2.6 * n_levels, 1.55 * rows), dpi=110, facecolor="black")
    label_colours = ListedColormap(["none", "none", "#ffd23f", "#3fa7ff", "#b04aff", "#ff4a4a"])
    for row in range(rows):
        job, (levels, images, masks) = shown[min(row, len(shown) - 1)]
        for col, level in enumerate(levels):
            ax = fig.add_subplot(rows, n_levels, row * n_levels + col + 1)
            image = images[col].T
            ax.imshow(image, cmap="gray", vmin=0, vmax=np.percentile(image, 99.5),
                      interpolation="nearest")
            title = f"case_{job.name}_slice_{level}"
            if row == len(shown):
                ax.imshow(masks[col].T, cmap=label_colours, vmin=0, vmax=5, alpha=0.45,
                          interpolation="nearest")
                title = "mask " + title
            ax.set_title(f"{title} ({images.shape[1]}x{images.shape[2]})", color="white",
                         fontsize=6)
            ax.axis("off")
    fig.subplots_adjust(left=0.005, right=0.995, top=0.95, bottom=0.005, wspace=0.03, hspace=0.2)
    fig.savefig(path, facecolor="black")


# --------------------------------------------------------------------------- rendering


class _Region(NamedTuple):
    """A shape on its bounding box: ``rho`` (nz, h, w) < 1 inside; ``minor`` (nz,) its
    smaller half-axis per slice."""

    box: tuple[slice, slice, slice]
    rho: np.ndarray
    minor: np.ndarray


class _Canvas:
    """Tissue map and mask of one volume, painted shape by shape.

    Coordinates: ``x[i]`` in [-1, 1] along axis 0 (right to left), ``y[j]`` along axis 1
    (anterior to posterior) in the same units, ``t[s]`` in [0, 1] (inferior to superior).
    Shapes are evaluated only in their bounding box, which keeps a volume fast.
    """

    def __init__(self, n_slices: int, shape: tuple[int, int], deform: np.ndarray):
        height, width = shape
        half = height / 2
        self.x = ((np.arange(height) + 0.5 - height / 2) / half).astype(np.float32)
        self.y = ((np.arange(width) + 0.5 - width / 2) / half).astype(np.float32)
        self.t = np.linspace(0.0, 1.0, n_slices) if n_slices > 1 else np.array([0.5])
        self.half = half
        self.width = width
        self.tissue = np.zeros((n_slices, height, width), np.uint8)
        self.label = np.zeros((n_slices, height, width), np.uint8)
        self.deform = deform  # (n, H, W) smooth noise that makes outlines irregular

    def shape(self, cx, cy, ax, ay, *, angle=0.0, power=2.0, wobble=0.0):
        """Normalised radius of an ellipse (or superellipse) per slice, on its bounding box.

        ``cx, cy, ax, ay`` are scalars or ``(n,)`` arrays over slices (``ax <= 0``: absent);
        ``angle`` in degrees turns the ``ax`` axis from +x towards +y; ``power`` > 2 squares
        the corners off like a superellipse; ``wobble`` scales the smooth deformation noise
        that makes the outline irregular. Returns a :class:`_Region` (``rho < 1`` inside), or
        ``None`` when the shape is in no slice.
        """
        n = len(self.t)
        cx, cy, ax, ay = (np.broadcast_to(np.asarray(v, np.float32), (n,))
                          for v in (cx, cy, ax, ay))
        present = np.flatnonzero((ax > 0) & (ay > 0))
        if present.size == 0:
            return None
        z0, z1 = present[0], present[-1] + 1
        reach = np.maximum(ax, ay)[z0:z1] * (1 + 4 * abs(wobble)) + 2 / self.half
        i0, i1 = self._index_range(self.x, (cx[z0:z1] - reach).min(), (cx[z0:z1] + reach).max())
        j0, j1 = self._index_range(self.y, (cy[z0:z1] - reach).min(), (cy[z0:z1] + reach).max())
        if i0 >= i1 or j0 >= j1:
            return None
        box = (slice(z0, z1), slice(i0, i1), slice(j0, j1))
        dx = self.x[None, i0:i1, None] - cx[z0:z1, None, None]
        dy = self.y[None, None, j0:j1] - cy[z0:z1, None, None]
        if angle:
            c, s = np.float32(np.cos(np.radians(angle))), np.float32(np.sin(np.radians(angle)))
            dx, dy = dx * c + dy * s, dy * c - dx * s
        with np.errstate(divide="ignore", invalid="ignore"):
            u = dx / ax[z0:z1, None, None]
            v = dy / ay[z0:z1, None, None]
            u2, v2 = u * u, v * v
            rho = u2 + v2
            if power != 2.0:
                # A cheap superellipse: the same radius along the diagonals, no pow().
                squareness = np.float32(4 * (1 - 2 ** (2 / power - 1)))
                rho -= squareness * u2 * v2 / np.maximum(rho, np.float32(1e-12))
            rho = np.sqrt(rho)
        rho[~((ax[z0:z1] > 0) & (ay[z0:z1] > 0))] = np.inf
        if wobble:
            rho += np.float32(wobble) * self.deform[box]
        return _Region(box, rho, np.minimum(ax, ay)[z0:z1])

    @staticmethod
    def _index_range(coords, low, high):
        return int(np.searchsorted(coords, low)), int(np.searchsorted(coords, high, side="right"))

    def paint(self, region, tissue, label=None, *, level=1.0, inset=0.0, where=None, only=None):
        """Set ``tissue`` (and mask ``label``) inside ``region``'s ``rho < level``.

        ``inset``: shrink the shape by about this distance (x units) instead, per slice;
        ``where``: extra boolean condition broadcastable to the box; ``only``: tissues that
        may be painted over (default: any).
        """
        if region is None:
            return
        box, rho, minor = region
        if inset:
            with np.errstate(divide="ignore"):
                level = (1 - inset / minor)[:, None, None]
        inside = rho < level
        if where is not None:
            inside &= where
        tissues = self.tissue[box]
        if only is not None:
            allowed = np.zeros(_N_TISSUES, bool)
            allowed[list(only)] = True
            inside &= allowed[tissues]
        tissues[inside] = tissue
        self.label[box][inside] = _TISSUE_LABEL[tissue] if label is None else label

    def rows_y(self, region):
        """The y coordinate of each column of ``region``'s box, shaped to broadcast."""
        return self.y[None, None, region.box[2]]


def _render_volume(case_key: tuple, week_key: tuple, n_slices: int,
                   shape: tuple[int, int], *, thermal_noise: bool = True) -> tuple[np.ndarray, ...]:
    """Images float32 (n, H, W) and masks uint8 (n, H, W) of one case in one week;
    ``thermal_noise=False``: the images before the Rician noise, the masks and the noise's sd
    (what no coder can predict: ``benchmarks/lossless.py``'s floor)."""
    case = np.random.default_rng(np.random.SeedSequence([*case_key, 1]))
    week = np.random.default_rng(np.random.SeedSequence([*week_key, 2]))
    noise = np.random.default_rng(np.random.SeedSequence([*week_key, 3]))
    height = shape[0]
    deform = _smooth_noise(noise, n_slices, shape, cell=0.08 * height / 2, cell_t=0.1)
    canvas = _Canvas(n_slices, shape, np.clip(deform, -3, 3))
    fascia = _smooth_noise(noise, n_slices, shape, cell=0.09 * height / 2, cell_t=0.12)
    _draw_anatomy(canvas, case, week, fascia)

    gain = case.uniform(0.75, 1.4)
    t2 = _T2 * gain * case.uniform(0.92, 1.08, _N_TISSUES).astype(np.float32)
    texture = _smooth_noise(noise, n_slices, shape, cell=0.022 * height / 2, cell_t=0.05)
    texture *= _TEXTURE[:, 1][canvas.tissue]
    # Fine texture is white noise here; the partial-volume blur below gives it its grain
    # (a 0.75-pixel blur leaves about a third of the noise's spread).
    fine = noise.standard_normal(texture.shape, dtype=np.float32)
    fine *= (_TEXTURE[:, 0] * 1.0)[canvas.tissue]
    texture += fine
    texture += 1
    texture *= t2[canvas.tissue]
    blur = 0.75 * height / 256  # partial volume: edges a pixel or so wide
    images = ndimage.gaussian_filter(texture, sigma=(0, blur, blur), truncate=2.5)
    images *= _bias_field(canvas, week)
    # Noise sd 0.7-1.1 % of fat: SNR about 90-140 in fat and 25-40 in muscle, as in a clinical
    # 3 T T2 turbo spin echo of the prostate after the scanner's own reconstruction.
    sigma = np.float32(_T2[FAT] * gain * week.uniform(0.007, 0.011))
    if not thermal_noise:
        return images, canvas.label, float(sigma)
    real = noise.standard_normal(images.shape, dtype=np.float32)
    real *= sigma
    real += images
    imag = noise.standard_normal(images.shape, dtype=np.float32)
    imag *= sigma
    np.square(real, out=real)
    np.square(imag, out=imag)
    real += imag
    images = np.rint(np.sqrt(real, out=real), out=real)
    return images, canvas.label


def _smooth_noise(rng, n_slices, shape, *, cell: float, cell_t: float) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise (n, H, W) float32 with features about ``cell``
    pixels across and ``cell_t`` of the volume's height deep, so it changes smoothly across
    slices as well. Coarse random values, spread by separable Gaussian weights (three
    matrix products: fast, and no interpolation creases)."""
    height, width = shape
    low = rng.standard_normal((int(np.ceil(1 / cell_t)) + 3 if n_slices > 1 else 1,
                               int(np.ceil(height / cell)) + 3, int(np.ceil(width / cell)) + 3),
                              dtype=np.float32)
    lz, lh, lw = low.shape
    field = np.tensordot(_spread(n_slices, lz), low, axes=(1, 0))  # (n, lh, lw)
    field = field.reshape(-1, lw) @ _spread(width, lw).T  # (n * lh, W)
    field = field.reshape(n_slices, lh, width).transpose(1, 0, 2).reshape(lh, -1)
    field = (_spread(height, lh) @ field).reshape(height, n_slices, width).transpose(1, 0, 2)
    field = np.ascontiguousarray(field)
    return field * np.float32(1 / 0.53)  # rows of unit-norm-ish weights shrink the variance


def _spread(n_out: int, n_low: int) -> np.ndarray:
    """(n_out, n_low) float32 Gaussian interpolation weights from ``n_low`` coarse points."""
    if n_low == 1:
        return np.ones((n_out, 1), np.float32)
    position = (np.arange(n_out) + 0.5) / n_out * (n_low - 3) + 1.0
    weights = np.exp(-0.5 * ((position[:, None] - np.arange(n_low)[None, :]) / 0.9) ** 2)
    weights /= np.sqrt((weights ** 2).sum(axis=1, keepdims=True))
    return (weights * 0.8).astype(np.float32)


def _bias_field(canvas: _Canvas, week) -> np.ndarray:
    """Smooth multiplicative field (n, H, W), about 0.8-1.3: coil sensitivity and tilt."""
    x = canvas.x[None, :, None]
    y = canvas.y[None, None, :]
    t = (canvas.t.astype(np.float32) - 0.5)[:, None, None]
    c = week.normal(0, 1, 6).astype(np.float32)
    # Pelvic phased-array coils lie in front and behind: brighter near those surfaces.
    log_gain = (0.10 * c[0] * x + 0.25 * c[1] * y + 0.08 * c[2] * x * x
                + (0.5 + 0.2 * c[3]) * y * y + 0.10 * c[4] * t + 0.12 * c[5] * x * y)
    return np.exp(log_gain - np.float32(0.06)).astype(np.float32)


def _profile(t, centre, half):
    """Cross-section radius of an ellipsoid of half-length ``half`` along t, in [0, 1]."""
    return np.sqrt(np.clip(1 - ((t - centre) / half) ** 2, 0, None))


def _ramp(t, t0, t1):
    """Smooth step from 0 at ``t0`` to 1 at ``t1``."""
    s = np.clip((t - t0) / (t1 - t0), 0, 1)
    return s * s * (3 - 2 * s)


def _draw_anatomy(c: _Canvas, case, week, fascia: np.ndarray) -> None:
    """Paint body, muscles, fat planes, organs and bones of one case-week onto ``c``.

    Distances are in x units (half the left-right field of view); x > 0 is the patient's
    left, y > 0 posterior, t = 0 the lowest slice. ``fascia`` (n, H, W) is smooth noise whose
    zero crossings become the fat planes inside muscle.
    """
    t = c.t.astype(np.float32)

    def jit(sd: float) -> float:  # case-level anatomical variation
        return float(case.normal(0, sd))

    t = t + float(week.normal(0, 0.025))  # the table position differs a little per week
    sides = (-1.0, 1.0)  # the patient's right, left
    dx, dy = float(week.normal(0, 0.01)), float(week.normal(0, 0.006))

    # Body outline, subcutaneous fat (thicker behind, and over the lower abdomen in front).
    body_a = 0.82 + jit(0.035)
    body_b = 0.44 + jit(0.02)
    fat = float(np.clip(0.075 + jit(0.02), 0.04, 0.12))
    bx = dx + 0.01 * np.sin(2.1 * t + jit(1))
    by = dy + 0.008 * np.sin(1.7 * t + jit(1))
    ba = body_a * (1 + 0.05 * np.sin(np.pi * np.clip(t, 0, 1)))
    bb = body_b * (1 + 0.03 * t)
    c.paint(c.shape(bx, by, ba, bb, power=2.3, wobble=0.012), FAT)
    for s in sides:  # buttocks and hips bulge the outline behind and to the sides
        lobe = 1 - 0.4 * _ramp(t, 0.5, 1.0)
        c.paint(c.shape(bx + s * 0.36 * ba / 0.82, by + 0.17, 0.45 * lobe, 0.27 * lobe,
                        angle=-s * 12, wobble=0.02), FAT)
    front, back = fat * (0.8 + 0.7 * np.clip(t, 0, 1)), fat * 1.4
    side = fat * (1.0 + 0.3 * np.cos(np.pi * np.clip(t, 0, 1)))
    c.paint(c.shape(bx, by + (front - back) / 2, ba - side, bb - (front + back) / 2,
                    power=2.3, wobble=-0.025), MUSCLE, only=[FAT])
    # Natal cleft below the coccyx: a fold of skin in a wedge of fat at the posterior midline.
    cleft = np.clip(0.5 - t, 0, None) / 0.5
    c.paint(c.shape(bx, by + bb - 0.03, 0.07 * cleft, 0.16 * cleft, wobble=0.03), FAT,
            only=[MUSCLE])
    c.paint(c.shape(bx, by + bb + 0.03, 0.008 * cleft, 0.16 * cleft), AIR)

    # Pelvic cavity fat (perirectal, perivesical; the ischioanal fossae below).
    px, py = dx, dy
    cav_a = 0.26 + jit(0.015) + 0.05 * _ramp(t, 0.65, 1.0)
    cav_b = 0.21 + jit(0.01)
    cav_y = py + 0.0 + 0.04 * (1 - _ramp(t, 0.1, 0.5))
    c.paint(c.shape(px, cav_y, cav_a, cav_b, wobble=0.05), PELVIC_FAT, only=[MUSCLE])
    head_r = 0.105 + jit(0.006)
    head_t = 0.52 + jit(0.03)
    hx = {s: px + s * (0.47 + jit(0.015)) for s in sides}
    hy = {s: py - 0.04 + jit(0.01) for s in sides}
    for s in sides:
        # Gluteus maximus, outlined by a fat plane.
        glut = c.shape(px + s * 0.34, py + 0.24 + 0.02 * t, 0.33, 0.13, angle=-s * 22, wobble=0.04)
        c.paint(glut, PELVIC_FAT, level=1.08, only=[MUSCLE])
        c.paint(glut, MUSCLE, only=[PELVIC_FAT, MUSCLE])
        # Femoral triangle: fat holding the femoral artery and vein (flow voids).
        low = np.sqrt(np.clip(0.62 - t, 0, None) / 0.62)
        fx, fy = hx[s] - s * 0.12, hy[s] - 0.25
        c.paint(c.shape(fx, fy, 0.11 * low, 0.08 * low, angle=s * 25, wobble=0.06), PELVIC_FAT,
                only=[MUSCLE])
        on = (low > 0.2).astype(np.float32)
        c.paint(c.shape(fx + s * 0.012, fy + 0.03, 0.01 * on, 0.01 * on), VESSEL,
                only=[PELVIC_FAT])
        c.paint(c.shape(fx - s * 0.015, fy + 0.035, 0.013 * on, 0.011 * on), MUSCLE,
                only=[PELVIC_FAT])
    # Fat planes between and inside muscles: where the smooth fascia field crosses zero.
    muscle_fascia = (np.abs(fascia) < 0.04) & (c.deform > 0.2) & (c.tissue == MUSCLE)
    c.tissue[muscle_fascia] = PELVIC_FAT
    for s in sides:
        # Obturator internus lines the pelvic side wall; iliopsoas lies in front of the hip.
        oi = _profile(t, 0.42, 0.36)
        c.paint(c.shape(px + s * (cav_a - 0.02), cav_y + 0.02, 0.045 * oi, 0.15 * oi,
                        angle=s * 8, wobble=0.03), MUSCLE)
        ip = _ramp(t, 0.3, 0.6)
        up = _ramp(t, 0.6, 1.0)
        c.paint(c.shape(hx[s] - s * (0.08 + 0.1 * up), hy[s] - 0.15 + 0.06 * up, 0.08 * ip,
                        0.055 * ip, angle=s * 10, wobble=0.03), MUSCLE)
    # Rectum position; levator ani: a muscular sling around it in the lower slices.
    rx = px + 0.012 * np.sin(3 * t + jit(1)) + 0.08 * _ramp(t, 0.8, 1.1)
    ry = py + 0.06 + 0.07 * _ramp(t, 0.3, 1.0)
    r_size = (0.045 + 0.03 * _ramp(t, 0.0, 0.4)) * (1 + jit(0.08)) * week.uniform(0.9, 1.15)
    sling = np.sqrt(np.clip(0.45 - t, 0, None) / 0.45)
    levator = c.shape(rx, ry - 0.05, (1.15 * r_size + 0.06) * sling,
                      (0.85 * r_size + 0.08) * sling, wobble=0.02)
    if levator is not None:
        behind = c.rows_y(levator) > (ry[levator.box[0]] - 0.1)[:, None, None]
        c.paint(levator, MUSCLE, where=behind, only=[PELVIC_FAT])
        c.paint(levator, PELVIC_FAT, level=0.8, only=[MUSCLE])

    # Organ levels: the prostate low, the bladder (filled differently each week) above it.
    prostate_t = 0.25 + jit(0.025)
    prostate_half = 0.16 + jit(0.01)
    prostate_top = prostate_t + prostate_half
    fill = week.uniform(0.4, 1.0)
    bl_half = (0.32 + 0.24 * fill) / 2 + 0.06
    bl_t = prostate_top - 0.02 + bl_half
    bl_prof = np.sqrt(_profile(t, bl_t, bl_half))
    bl_size = (0.13 + 0.08 * fill) * (1 + jit(0.05))
    # Seminal vesicles: a lobulated bow tie between bladder and rectum above the prostate.
    sv = _profile(t, prostate_top + 0.04, 0.09)
    for s in sides:
        c.paint(c.shape(px + s * 0.075, py + 0.0, 0.08 * sv, 0.025 * sv, angle=-s * 20,
                        wobble=0.08), SEMINAL, only=[PELVIC_FAT, MUSCLE])

    # Prostate: bright peripheral zone around a darker, nodular transition zone.
    size = 0.12 + abs(jit(0.02))
    grow = _ramp(t, prostate_t - prostate_half, prostate_top)
    prof = _profile(t, prostate_t, prostate_half) * (0.8 + 0.35 * grow)
    pa, pb = size * prof, 0.72 * size * prof
    pcx, pcy = px + 0.005 * np.sin(4 * t), py - 0.09
    prostate = c.shape(pcx, pcy, pa, pb, wobble=0.02)
    c.paint(prostate, STROMA, 5)
    c.paint(prostate, PERIPHERAL_ZONE, 5, inset=0.01)
    tz = (0.3 + 0.5 * grow) * (1 + jit(0.1))
    c.paint(c.shape(pcx, pcy - 0.3 * pb, pa * 0.78 * tz, pb * 0.72 * tz, wobble=0.03),
            TRANSITION_ZONE, 5, only=[PERIPHERAL_ZONE])
    c.paint(c.shape(pcx, pcy - 0.85 * pb, 0.5 * pa, 0.25 * pb), STROMA, 5,
            only=[PERIPHERAL_ZONE, TRANSITION_ZONE])
    ur = 0.011 * (prof > 0.25)
    c.paint(c.shape(pcx, pcy - 0.15 * pb, ur, ur), URETHRA, 5,
            only=[TRANSITION_ZONE, PERIPHERAL_ZONE])
    for s in sides:  # neurovascular bundles
        nv = 0.011 * (prof > 0.3)
        c.paint(c.shape(pcx + s * 0.95 * pa, pcy + 0.7 * pb, nv, nv), VESSEL, only=[PELVIC_FAT])

    # Rectum: dark muscular wall, brighter mucosa and content, gas rising anteriorly (the
    # patient lies supine, so the air-fluid level is a coronal plane).
    rectum = c.shape(rx, ry, 1.15 * r_size, 0.85 * r_size, wobble=0.035)
    c.paint(rectum, RECTAL_WALL, 4)
    c.paint(rectum, RECTAL_CONTENT, 4, inset=0.018)
    gas = week.uniform(0.1, 0.9) * (0.55 + 0.45 * np.sin(3 * t + week.uniform(0, 6))) * (t > 0.08)
    gas_line = ry - 0.85 * r_size + 1.7 * r_size * gas
    if rectum is not None:
        c.paint(rectum, RECTAL_GAS, 4, inset=0.022,
                where=c.rows_y(rectum) < gas_line[rectum.box[0], None, None])

    # Bladder: very bright urine behind a thin dark wall, anterior, in the upper slices. Its
    # base sits on the prostate base, so it is painted after the prostate.
    bl_y = py - 0.13 + 0.05 * (1 - _ramp(t, prostate_top, bl_t))
    bladder = c.shape(px + 0.01 * np.sin(2 * t), bl_y, bl_size * bl_prof,
                      0.75 * bl_size * bl_prof, power=2.3, wobble=0.025)
    c.paint(bladder, BLADDER_WALL, 3)
    c.paint(bladder, URINE, 3, inset=0.011)

    # Bones: pelvis first (cortex everywhere, then marrow, so that pieces merge), then the
    # femora on top, so that the hip joint shows as a dark line between head and acetabulum.
    pelvis = []
    for s in sides:
        acetabulum = _profile(t, head_t + 0.08, 0.21)
        pelvis.append(c.shape(hx[s] - s * 0.07, hy[s] + 0.02, 0.14 * acetabulum,
                              0.16 * acetabulum, wobble=0.02))
        ischium = _profile(t, head_t - 0.25, 0.2)
        pelvis.append(c.shape(hx[s] - s * 0.15, hy[s] + 0.15 + 0.05 * (1 - ischium),
                              0.055 * ischium, 0.09 * ischium, angle=s * 15, wobble=0.02))
        superior_ramus = _profile(t, head_t - 0.05, 0.09)
        pelvis.append(c.shape(px + s * 0.21, hy[s] - 0.16, 0.17 * superior_ramus,
                              0.035 * superior_ramus, angle=s * 18, wobble=0.01))
        pubis = _profile(t, head_t - 0.22, 0.17)
        pelvis.append(c.shape(px + s * 0.05, py - 0.25, 0.04 * pubis, 0.065 * pubis,
                              angle=-s * 10, wobble=0.01))
        inferior_ramus = _profile(t, head_t - 0.34, 0.14)
        pelvis.append(c.shape(px + s * 0.17, py - 0.16, 0.12 * inferior_ramus,
                              0.03 * inferior_ramus, angle=s * 60, wobble=0.01))
        ilium = _ramp(t, head_t + 0.12, head_t + 0.36)
        pelvis.append(c.shape(px + s * 0.34, py + 0.1, 0.2 * ilium, 0.04 * ilium, angle=-s * 42,
                              wobble=0.02))
    sacrum = _ramp(t, head_t + 0.1, head_t + 0.45)
    pelvis.append(c.shape(px, py + 0.28, 0.16 * sacrum, 0.06 * sacrum, power=2.5, wobble=0.02))
    coccyx = _profile(t, head_t - 0.05, 0.15)
    pelvis.append(c.shape(px, py + 0.28, 0.025 * coccyx, 0.02 * coccyx))
    femur = []
    for s in sides:
        head = head_r * _profile(t, head_t, 0.17)
        femur.append(c.shape(hx[s], hy[s], head, head, wobble=0.005))
        neck = _profile(t, head_t - 0.12, 0.1)
        femur.append(c.shape(hx[s] + s * 0.09, hy[s] + 0.01, 0.11 * neck, 0.055 * neck,
                             angle=-s * 12, wobble=0.01))
        trochanter = _profile(t, head_t - 0.15, 0.13)
        femur.append(c.shape(hx[s] + s * 0.17, hy[s] + 0.03, 0.065 * trochanter,
                             0.075 * trochanter, wobble=0.02))
        shaft = 0.05 * (t < head_t - 0.22)
        femur.append(c.shape(hx[s] + s * 0.14, hy[s] + 0.01, shaft, shaft, wobble=0.005))
    for group in (pelvis, femur):
        for region in group:
            c.paint(region, CORTEX, 2)
        for region in group:
            c.paint(region, MARROW, 2, inset=0.011)
