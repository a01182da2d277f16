"""What the commands that read scans take as input: NIfTI files, and DICOM series.

:func:`scan_inputs` turns a command line's inputs (NIfTI files, folders of them, DICOM folders,
DICOMDIR files, DICOM files) into :class:`Scan` objects that all read alike: the slices in
scanner units with each slice's affine, and the stored values with their scaling. A DICOM series
is one scan named ``series_<Series Number>.nii.gz`` (its slices ``series_<N>_slice_<k>``), as a
3-D NIfTI volume would be, so every later stage (codes files, decode's outputs, volume priors)
treats it as a volume.

Example::

    >>> scans = scan_inputs(["scan.nii.gz", "dicom/PROSTATE"])
    >>> [scan.name for scan in scans]
    ['scan.nii.gz', 'series_3.nii.gz']
    >>> slices, meta, is_volume, affines = scans[1].read()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrivq.data.dicom import DicomSeries, dicom_candidates, find_series, is_dicom_file
from mrivq.data.io import is_nifti, nifti_stem, read_slices, read_stored, slice_affine
from mrivq.errors import UserError


@dataclass
class NiftiScan:
    """A NIfTI slice or volume file."""

    path: Path
    dicom = None  # no DICOM header

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def read(self):
        """``(slices (S, H, W) float32 scanner units, meta, is_volume, affines (S, 4, 4))``."""
        stack, meta, is_volume = read_slices(self.path)
        return stack, meta, is_volume, np.stack([slice_affine(meta.affine, k) for k in range(len(stack))])

    def read_stored(self):
        """``(stored (S, H, W) int64 or float64, dtype, slopes (S,), intercepts (S,))``."""
        stored, dtype, slope, inter = read_stored(self.path)
        return stored, dtype, np.full(len(stored), slope), np.full(len(stored), inter)


@dataclass
class DicomScan:
    """A DICOM series, read as a volume (its slices in order along the normal)."""

    series: DicomSeries

    @property
    def path(self) -> Path:
        return Path(self.series.source)

    @property
    def name(self) -> str:
        return f"{self.series.name}.nii.gz"

    @property
    def dicom(self):
        """The first image's header (pydicom data set, no pixel data)."""
        return self.series.header

    @property
    def nbytes(self) -> int:
        return sum(path.stat().st_size for path in self.series.files)

    def read_stored(self):
        stored, slopes, inters, dtype = self.series.read_stored()
        return stored, dtype, slopes, inters

    def read(self):
        scanner, meta = self.series.read()
        return scanner, meta, True, self.series.affines


Scan = NiftiScan | DicomScan


def as_scan(item) -> Scan:
    """A scan of its own, or a NIfTI path as one."""
    return item if isinstance(item, NiftiScan | DicomScan) else NiftiScan(Path(item))


def scan_inputs(inputs) -> list[Scan]:
    """The scans a command line names: NIfTI files; folders (their NIfTI files, or, where they hold
    none, the DICOM series anywhere inside); DICOMDIR files; DICOM files (grouped into series with
    the others given). Outputs are named after their inputs, so two inputs with the same name are
    refused, like a missing input, a file that is neither NIfTI nor DICOM, or no input at all."""
    scans: list[Scan] = []
    dicom: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            nifti = sorted(p for p in path.iterdir() if is_nifti(p.name) and p.is_file())
            if nifti:
                scans += [NiftiScan(p) for p in nifti]
            elif dicom_candidates(path):
                dicom.append(path)
            else:
                raise UserError(f"input folder {path} holds no .nii/.nii.gz files and no DICOM files; give NIfTI "
                                "files, DICOM series or folders of them")
        elif not path.exists():
            raise UserError(f"input not found: {path} does not exist; give NIfTI files, DICOM series or folders of them")
        elif is_nifti(path):
            scans.append(NiftiScan(path))
        elif path.name.upper() == "DICOMDIR" or is_dicom_file(path):
            dicom.append(path)
        else:
            raise UserError(f"{path}: neither a .nii/.nii.gz file nor a DICOM file; give NIfTI files, DICOM series or "
                            "folders of them")
    if dicom:
        found = find_series(dicom)
        if not found:
            raise UserError(f"no DICOM images in {', '.join(map(str, dicom))} (only other DICOM objects); give the "
                            "folders of the image series")
        scans += [DicomScan(series) for series in found]
    if not scans:
        raise UserError("no input given; name one or more NIfTI files, DICOM series or folders of them")
    seen: dict[str, Scan] = {}
    for scan in scans:
        stem = nifti_stem(scan.name).lower()
        if stem in seen:
            raise UserError(f"two inputs are named {nifti_stem(scan.name)} ({seen[stem].path} and {scan.path}); their "
                            "outputs would overwrite each other: give them in separate runs")
        seen[stem] = scan
    return scans
