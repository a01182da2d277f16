"""Which slices the data settings point at: real HipMRI folders, or the built-in phantom set.

``data`` below is the ``data`` section of a config (anything with its attributes).

With no ``data.root`` and no split folders, mrivq uses a phantom dataset generated once
into the cache (``<cache_dir>/phantom/...``) and reused by every later run. A root or split
folder that holds DICOM series (and no NIfTI files) is read once into the cache as NIfTI slices
(``<cache_dir>/dicom/...``, :func:`dicom_slices`) and used like a flat folder of HipMRI slices.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from mrivq.data.cache import default_cache_dir
from mrivq.data.dicom import holds_dicom
from mrivq.data.io import nifti_bytes, nifti_image
from mrivq.data.splits import Splits, resolve_splits
from mrivq.errors import UserError

log = logging.getLogger("mrivq.data")

PHANTOM_VERSION = 3


PHANTOM_SEED = 0  # fixed, so that runs with different training seeds share one data set


def phantom_set(cache_dir: Path | None, cases: int | None) -> Path:
    """Folder of a phantom set in the cache, generated on first use: ``cases`` case volumes, or
    with ``cases=None`` HipMRI's own counts (11,460 / 660 / 540 slices, for benchmarks)."""
    from mrivq.data.phantom import synthesize

    name = (f"hipmri-v{PHANTOM_VERSION}-seed{PHANTOM_SEED}" if cases is None
            else f"v{PHANTOM_VERSION}-cases{cases}-seed{PHANTOM_SEED}")
    root = Path(cache_dir or default_cache_dir()) / "phantom" / name
    if not root.is_dir():
        log.info("generating the built-in phantom set (%s) into %s",
                 "HipMRI's counts" if cases is None else f"{cases} cases", root)
        root.parent.mkdir(parents=True, exist_ok=True)
        if cases is None:
            synthesize(root, hipmri_counts=True, seed=PHANTOM_SEED, montage=False)
        else:
            synthesize(root, cases=cases, seed=PHANTOM_SEED, montage=True)
    return root


def phantom_root(data) -> Path:
    """Folder of the default phantom set for these data settings, generated on first use."""
    return phantom_set(data.cache_dir, data.phantom_cases)


def data_splits(data, seed: int) -> Splits:
    """The train/validate/test file lists of the data settings (the phantom when none is given; a
    folder of DICOM series as its NIfTI slices, :func:`dicom_slices`)."""
    root = phantom_root(data) if data.uses_phantom else data.root
    root, train, validate, test = (_as_slices(folder, data.cache_dir)
                                   for folder in (root, data.train_dir, data.validate_dir, data.test_dir))
    return resolve_splits(root, train, validate, test, fractions=tuple(data.split_fractions), seed=seed)


def _as_slices(folder, cache_dir):
    if folder is None or not Path(folder).expanduser().is_dir() or not holds_dicom(Path(folder).expanduser()):
        return folder
    return dicom_slices(Path(folder).expanduser(), cache_dir)


#: Bumped when :func:`dicom_slices` writes its slices differently.
DICOM_SLICES_VERSION = 1


def dicom_slices(folder: Path, cache_dir: Path | None) -> Path:
    """A folder of DICOM series (anywhere inside ``folder``) as HipMRI-named NIfTI slices in the
    cache, converted once and reused while the files are unchanged: each series a
    ``case_<patient>_week_<series>`` volume (patients numbered, never named), each slice in scanner
    units with its own affine, so the flat-folder split keeps every patient in one split."""
    from mrivq.data.dicom import DicomSeries, find_series

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256(f"v{DICOM_SLICES_VERSION}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    target = Path(cache_dir or default_cache_dir()) / "dicom" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    series: list[DicomSeries] = find_series([folder], names="hipmri")
    if not series:
        raise UserError(f"{folder} holds DICOM files but no image series; point data.root at the series' folder")
    log.info("reading %d DICOM series from %s into %s (once; reused while the files are unchanged)",
             len(series), folder, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        for one in tqdm(series, desc="DICOM series", unit="series", disable=None, leave=False):
            scanner, _ = one.read()
            for k, plane in enumerate(scanner):
                blob = nifti_bytes(nifti_image(plane, one.affines[k]))
                (partial / f"{one.name}_slice_{k}.nii.gz").write_bytes(blob)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
