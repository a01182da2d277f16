"""DICOM series in and out: scans as scanners and archives keep them.

**In.** :func:`find_series` turns folders of instances, DICOMDIR files and single instances into
:class:`DicomSeries`: the images grouped by Series Instance UID and ordered by their position
along the slice normal (never by file name). A series reads like a 3-D NIfTI volume: ``(S, H, W)``
stored values (rows, columns; before Rescale Slope / Intercept) with the scaling of each slice,
and an affine in NIfTI's RAS convention with nibabel's voxel axes for DICOM (first axis along
the rows, i.e. down a column, second along a row, third from slice to slice), so a series and
its NIfTI conversion carry the same geometry. Each slice keeps its own affine (its own Image
Position), so an unevenly spaced series loses nothing.

Every file is untrusted: its size is checked before it is read, a deflated data set is inflated
to a bound, rows, columns and bits are checked before any pixel array is made, a pixel data
element shorter than its header says is refused, and every failure is one line
(:class:`mrivq.errors.BadFileError`). Multi-frame objects (enhanced MR) are refused, as are
transfer syntaxes pydicom cannot decode here (the line names the package that would).

**Out.** :func:`instance_bytes` writes one slice as an MR Image Storage instance of a derived
series (Image Type DERIVED\\SECONDARY, Derivation Description, Lossy Image Compression), in
Explicit VR Little Endian or JPEG-LS lossless, with the slice's geometry; what else of an
original header it carries is only what :data:`KEPT_ATTRIBUTES` lists, and only when asked.

Example::

    >>> series = find_series(["dicom/ABDOMEN"])
    >>> series[0].name, series[0].shape
    ('series_3', (256, 256, 24))
    >>> stored, slopes, inters = series[0].read_stored()
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from mrivq.errors import BadFileError, UserError

log = logging.getLogger("mrivq.data")

#: The most bytes one DICOM file may hold, and the most its data set may inflate to (as a NIfTI).
MAX_DICOM_BYTES = 256 << 20
#: The most voxels one series may hold (a 512 x 512 x 256 volume, as :data:`io.MAX_NIFTI_BYTES`).
MAX_SERIES_VOXELS = 64 << 20
#: The most files a folder given as input may hold (walked recursively).
MAX_FILES = 100_000
MAX_SIDE = 32767

#: The attributes of an original header a derived series may carry (``--keep-dicom-header``):
#: the patient and study it belongs to, its frame of reference (so viewers overlay it), the
#: equipment and the MR acquisition. Nothing else is ever copied: no private tag, no sequence, no
#: free text beyond these descriptions, no overlay or burned-in annotation.
KEPT_ATTRIBUTES = {
    "PatientName": "PN", "PatientID": "LO", "PatientBirthDate": "DA", "PatientSex": "CS", "PatientAge": "AS",
    "StudyInstanceUID": "UI", "StudyDate": "DA", "StudyTime": "TM", "StudyID": "SH", "AccessionNumber": "SH",
    "ReferringPhysicianName": "PN", "StudyDescription": "LO",
    "SeriesNumber": "IS", "SeriesDescription": "LO", "BodyPartExamined": "CS", "PatientPosition": "CS",
    "FrameOfReferenceUID": "UI", "PositionReferenceIndicator": "LO",
    "Manufacturer": "LO", "ManufacturerModelName": "LO", "MagneticFieldStrength": "DS",
    "ScanningSequence": "CS*", "SequenceVariant": "CS*", "ScanOptions": "CS*", "MRAcquisitionType": "CS",
    "SequenceName": "SH", "RepetitionTime": "DS", "EchoTime": "DS", "EchoTrainLength": "IS", "InversionTime": "DS",
    "FlipAngle": "DS", "SliceThickness": "DS", "SpacingBetweenSlices": "DS", "ImagedNucleus": "SH",
    "ImagingFrequency": "DS", "NumberOfAverages": "DS",
}  # keyword -> its value representation (PS3.5); "*": several values allowed

#: What a kept value of each representation must look like (PS3.5 6.2): text without control
#: characters or backslashes, at most its length; dates, times, UIDs, code strings by their pattern.
_KEPT_TEXT = {"PN": 192, "LO": 64, "SH": 16}
_KEPT_PATTERN = {"DA": r"\d{8}", "TM": r"\d{2,6}(\.\d{1,6})?", "UI": r"\d+(\.\d+)*",
                 "CS": r"[A-Z0-9_ ]{1,16}", "AS": r"\d{3}[DWMY]"}


def kept_value(keyword: str, value):
    """``value`` if it is a valid value of kept attribute ``keyword`` (its representation's type,
    length and characters), else None: a codes file's header may carry only such values."""
    vr = KEPT_ATTRIBUTES.get(keyword)
    if vr is None:
        return None
    if vr.endswith("*"):
        values = value if isinstance(value, list) else [value]
        ok = 1 <= len(values) <= 16 and all(kept_value("MRAcquisitionType", v) is not None for v in values)
        return value if ok else None
    if vr == "IS":
        return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 30 else None
    if vr == "DS":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return value if ok and abs(value) < 1e15 else None
    if not isinstance(value, str):
        return None
    if vr in _KEPT_TEXT:
        ok = len(value) <= _KEPT_TEXT[vr] and value.isprintable() and "\\" not in value
        return value if ok else None
    if vr == "UI" and len(value) > 64:
        return None
    return value if re.fullmatch(_KEPT_PATTERN[vr], value) else None


_DEFLATED = "1.2.840.10008.1.2.1.99"
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def holds_dicom(folder) -> bool:
    """True when ``folder`` (walked recursively) holds DICOM Part 10 files and no NIfTI file: a
    folder of DICOM series. Stops at the first file that decides."""
    for path in Path(folder).rglob("*"):
        if path.name.lower().endswith((".nii", ".nii.gz")):
            return False
        if path.is_file() and is_dicom_file(path):
            return True
    return False


def _walk(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            files.append(path)
            if len(files) > MAX_FILES:
                raise UserError(f"{folder} holds more than {MAX_FILES} files; give the series' folders one by one")
    return files


# -- reading ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _silenced():
    """pydicom's warnings and log lines kept off stderr: what matters goes into the one error line."""
    logger = logging.getLogger("pydicom")
    handlers, propagate = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [logging.NullHandler()], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def _quiet_read(raw: bytes, path: Path, *, pixels: bool):
    """A pydicom data set from the bytes of a Part 10 file (with its pixel data's bytes:
    ``pixels``), every element converted here (pydicom converts lazily, and a damaged value would
    otherwise fail later, anywhere)."""
    import pydicom

    try:
        with _silenced():
            ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=not pixels)
            for _ in ds.iterall():
                pass
            syntax = ds.file_meta.get("TransferSyntaxUID")
            known = syntax is None or syntax.is_transfer_syntax
    except Exception as e:  # noqa: BLE001 -- pydicom raises assorted errors for damaged files
        said = " ".join(str(e).split())[:160]
        raise BadFileError(path, f"not a readable DICOM file (pydicom: {type(e).__name__}: {said})") from None
    if not known:
        raise BadFileError(path, f"its Transfer Syntax UID {str(syntax)[:64]!r} is not a transfer syntax")
    return ds


def _file_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file, its size bounded, a deflated data set checked to inflate within
    :data:`MAX_DICOM_BYTES` before pydicom inflates it."""
    try:
        size = path.stat().st_size
        if size > MAX_DICOM_BYTES:
            raise BadFileError(path, f"larger than the {MAX_DICOM_BYTES >> 20} MiB mrivq reads from one DICOM file")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_DICOM_BYTES + 1)
    except FileNotFoundError:
        raise BadFileError(path, "file not found") from None
    except OSError as e:
        raise BadFileError(path, f"cannot be read ({e.strerror or e})") from None
    if len(raw) < 132 or raw[128:132] != b"DICM":
        raise BadFileError(path, "not a DICOM Part 10 file (no DICM marker after the 128-byte preamble)")
    if _DEFLATED.encode() in raw[132:132 + 4096]:
        _check_deflate(raw, path)
    return raw


def _check_deflate(raw: bytes, path: Path) -> None:
    """Refuse a deflated data set that inflates beyond :data:`MAX_DICOM_BYTES` (a deflate bomb)."""
    if raw[132:136] != b"\x02\x00\x00\x00" or raw[136:138] != b"UL":
        raise BadFileError(path, "deflated DICOM file without the file meta group length; cannot bound it")
    (length,) = np.frombuffer(raw[140:144], dtype="<u4")
    start = 144 + int(length)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw[start:], MAX_DICOM_BYTES + 1)
    except zlib.error:
        raise BadFileError(path, "corrupt deflated data set") from None
    if len(out) > MAX_DICOM_BYTES or inflater.unconsumed_tail:
        raise BadFileError(path, f"its deflated data set inflates to more than {MAX_DICOM_BYTES >> 20} MiB")


def _numbers(ds, keyword: str, count: int, path: Path) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        numbers = np.array([float(v) for v in (value if count > 1 else [value])], dtype=np.float64)
    except (TypeError, ValueError):
        raise BadFileError(path, f"its {keyword} {value!r} is not {count} number(s)") from None
    if len(numbers) != count or not np.isfinite(numbers).all():
        raise BadFileError(path, f"its {keyword} {list(value) if count > 1 else value} is not {count} finite number(s)")
    return numbers


@dataclass
class _Instance:
    path: Path
    series_uid: str
    rows: int
    columns: int
    orientation: np.ndarray | None  # (6,) row then column direction cosines (LPS)
    position: np.ndarray | None  # (3,) LPS mm
    spacing: np.ndarray  # (2,) between rows, between columns (mm)
    number: int  # Instance Number, only to order a series without geometry
    thickness: float  # Spacing Between Slices, else Slice Thickness, else 1 (mm): a lone slice's depth


def _instance(path: Path, ds) -> _Instance | None:
    """The header facts of one image instance, checked; None for an object without pixel data
    (a report, a presentation state, a DICOMDIR) that a folder may also hold."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise BadFileError(path, "holds float pixel data (a parametric map); mrivq reads integer images")
    if ds.file_meta.get("MediaStorageSOPClassUID") == _DICOMDIR_CLASS or "PixelData" not in ds:
        return None
    frames = ds.get("NumberOfFrames")
    try:
        frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        raise BadFileError(path, f"its Number of Frames {frames!r} is not a number") from None
    if frames != 1:
        raise BadFileError(path, f"a multi-frame object ({frames} frames, {_sop_name(ds)}); mrivq reads series of "
                                 "single-frame images: convert it (e.g. with dcm2niix to NIfTI) first")
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int) or not (1 <= rows <= MAX_SIDE
                                                                       and 1 <= columns <= MAX_SIDE):
        raise BadFileError(path, f"its image size {rows} x {columns} is not 1 to {MAX_SIDE} rows and columns")
    if rows * columns > MAX_SERIES_VOXELS:
        raise BadFileError(path, f"its {rows} x {columns} image is larger than mrivq reads")
    bits, samples = ds.get("BitsAllocated"), ds.get("SamplesPerPixel", 1)
    if bits not in (8, 16, 32):
        raise BadFileError(path, f"Bits Allocated {bits}: mrivq reads images of 8, 16 or 32 bits")
    if samples != 1 or ds.get("PhotometricInterpretation") != "MONOCHROME2":
        raise BadFileError(path, f"a {ds.get('PhotometricInterpretation')} image with {samples} sample(s) per pixel; "
                                 "mrivq reads grey-scale (MONOCHROME2) images")
    if ds.get("PixelRepresentation", 0) not in (0, 1):
        raise BadFileError(path, f"Pixel Representation {ds.get('PixelRepresentation')} is not 0 or 1")
    spacing = _numbers(ds, "PixelSpacing", 2, path)
    if spacing is not None and not (spacing > 0).all():
        raise BadFileError(path, f"its Pixel Spacing {spacing.tolist()} is not positive")
    orientation = _numbers(ds, "ImageOrientationPatient", 6, path)
    position = _numbers(ds, "ImagePositionPatient", 3, path)
    if position is not None and np.abs(position).max() > 1e6:
        raise BadFileError(path, f"its Image Position (Patient) {position.tolist()} lies beyond a kilometre")
    if spacing is not None and spacing.max() > 1e4:
        raise BadFileError(path, f"its Pixel Spacing {spacing.tolist()} is beyond 10 m")
    if orientation is not None:
        row, col = orientation[:3], orientation[3:]
        if not (abs(np.linalg.norm(row) - 1) < 1e-3 and abs(np.linalg.norm(col) - 1) < 1e-3 and abs(row @ col) < 1e-3):
            raise BadFileError(path, f"its Image Orientation (Patient) {orientation.tolist()} is not two unit vectors "
                                     "at right angles")
        orientation = np.concatenate([row / np.linalg.norm(row), col / np.linalg.norm(col)])
    number = ds.get("InstanceNumber")
    try:
        number = int(number) if number not in (None, "") else 0
    except (TypeError, ValueError):
        number = 0
    thickness = 1.0
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        value = _numbers(ds, keyword, 1, path)
        thickness = float(value[0]) if value is not None and 0 < value[0] < 1e4 else thickness
    return _Instance(path, str(ds.get("SeriesInstanceUID", "")), rows, columns, orientation, position,
                     spacing if spacing is not None else np.ones(2), number, thickness)


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", str(uid)) if uid else "no SOP class"


@dataclass
class SeriesMeta:
    """What a DICOM series says about its volume, in :class:`mrivq.data.io.SliceMeta`'s terms:
    the on-disk shape ``(rows, columns, slices)``, the pixel data's type and the affine."""

    path: str
    affine: np.ndarray
    shape: tuple[int, ...]
    dtype: str
    header: object = None


@dataclass
class DicomSeries:
    """One series: its image files in slice order, geometry, and the first image's header."""

    name: str  # what mrivq calls it: series_<Series Number>, made unique
    files: list[Path]
    affines: np.ndarray  # (S, 4, 4) RAS, each slice's own
    header: object  # the first image's pydicom data set, without pixel data
    rows: int
    columns: int
    source: str = ""  # the folder or file it was found in (what errors name)
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.rows, self.columns, len(self.files)

    @property
    def affine(self) -> np.ndarray:
        """The volume's affine: the first slice's, its third column the mean step between slices."""
        return self.affines[0]

    def read_stored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """``(stored (S, H, W) int64, slopes (S,), intercepts (S,), dtype)``: the pixel values as
        stored, and each slice's Rescale Slope / Intercept (1, 0 where none)."""
        stored = np.empty((len(self.files), self.rows, self.columns), dtype=np.int64)
        slopes, inters, dtypes = np.ones(len(self.files)), np.zeros(len(self.files)), set()
        for k, path in enumerate(self.files):
            pixels, slopes[k], inters[k] = _read_pixels(path, self.rows, self.columns)
            dtypes.add(pixels.dtype.name)
            stored[k] = pixels
        if len(dtypes) > 1:
            raise BadFileError(self.files[0], f"the images of {self.name} store pixels in different types "
                                              f"({', '.join(sorted(dtypes))}); give them as separate series")
        return stored, slopes, inters, dtypes.pop()

    def read(self) -> tuple[np.ndarray, SeriesMeta]:
        """The slices in scanner units, float32 ``(S, H, W)``, and the volume's metadata."""
        stored, slopes, inters, dtype = self.read_stored()
        with np.errstate(all="ignore"):
            scanner = (stored * slopes[:, None, None] + inters[:, None, None]).astype(np.float32)
        if not np.isfinite(scanner).all():
            raise BadFileError(self.files[0], f"{self.name}'s Rescale Slope / Intercept overflow float32")
        return scanner, SeriesMeta(self.source, self.affine, self.shape, dtype, self.header)


def _read_pixels(path: Path, rows: int, columns: int) -> tuple[np.ndarray, float, float]:
    """One image's pixel array (its stored values) and its rescale slope and intercept."""
    raw = _file_bytes(path)
    ds = _quiet_read(raw, path, pixels=True)
    if (ds.get("Rows"), ds.get("Columns")) != (rows, columns):
        raise BadFileError(path, "changed while it was read (its size is not the one first read)")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    bits = int(ds.BitsAllocated)
    if syntax is not None and not syntax.is_compressed:
        need = rows * columns * bits // 8
        if len(ds.PixelData) < need:
            raise BadFileError(path, f"its pixel data holds {len(ds.PixelData)} bytes, its header's {rows} x {columns} "
                                     f"x {bits} bits need {need} (a truncated or damaged file)")
    else:
        _check_decoder(syntax, path)
    try:
        with _silenced():
            pixels = np.asarray(ds.pixel_array)
    except Exception as e:  # noqa: BLE001 -- the pixel decoders raise assorted errors
        said = " ".join(str(e).split())[:160]
        raise BadFileError(path, f"its pixel data does not decode ({type(e).__name__}: {said})") from None
    if pixels.shape != (rows, columns) or pixels.dtype.kind not in "ui":
        raise BadFileError(path, f"its pixel data decodes to {pixels.dtype} {pixels.shape}, not {rows} x {columns} "
                                 "integers")
    slope = _numbers(ds, "RescaleSlope", 1, path)
    inter = _numbers(ds, "RescaleIntercept", 1, path)
    slope = 1.0 if slope is None else float(slope[0])
    if slope == 0:
        raise BadFileError(path, "its Rescale Slope is 0")
    return pixels, slope, 0.0 if inter is None else float(inter[0])


def _check_decoder(syntax, path: Path) -> None:
    """Refuse, in one line naming what would decode it, a compressed syntax with no decoder here."""
    from pydicom.pixels import get_decoder

    name = getattr(syntax, "name", str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise BadFileError(path, f"its pixel data is {name} ({syntax}), which pydicom cannot decode; convert the "
                                 "series to an uncompressed or JPEG-LS / JPEG 2000 syntax (e.g. with gdcmconv)") from None
    if not decoder.is_available:
        missing = "; or ".join(decoder.missing_dependencies) or "a pydicom pixel data plugin"
        raise BadFileError(path, f"its pixel data is {name}, and no decoder for it is installed: install {missing}")


def _dicomdir_files(path: Path) -> list[Path]:
    """The image files a DICOMDIR lists, each checked to lie inside the DICOMDIR's folder."""
    ds = _quiet_read(_file_bytes(path), path, pixels=False)
    root = path.parent.resolve()
    files = []
    for record in ds.get("DirectoryRecordSequence", []):
        parts = record.get("ReferencedFileID")
        if parts is None:
            continue
        parts = [parts] if isinstance(parts, str) else list(parts)
        if not parts or any(not re.fullmatch(r"[A-Za-z0-9_]{1,16}", str(part)) for part in parts):
            raise BadFileError(path, f"lists a file {'/'.join(map(str, parts))!r} that is not a plain DICOM file ID")
        target = root.joinpath(*map(str, parts))
        if not target.exists():  # file IDs are upper case; a disk copied elsewhere may not be
            target = root.joinpath(*(str(p).lower() for p in parts))
        if root not in target.resolve().parents:
            raise BadFileError(path, f"lists a file outside its folder ({'/'.join(map(str, parts))})")
        files.append(target)
        if len(files) > MAX_FILES:
            raise BadFileError(path, f"lists more than {MAX_FILES} files")
    if not files:
        raise BadFileError(path, "a DICOMDIR that lists no files")
    return files


def dicom_candidates(item: Path) -> list[Path]:
    """The DICOM files an input stands for: a folder's (walked recursively), a DICOMDIR's, or itself."""
    if item.is_dir():
        return [p for p in _walk(item) if is_dicom_file(p)]
    if item.name.upper() == "DICOMDIR":
        return _dicomdir_files(item)
    return [item]


def find_series(inputs, *, names: str = "series") -> list[DicomSeries]:
    """The image series in ``inputs`` (folders, DICOMDIR files, single files), each ordered along
    its slice normal; headers only (pixels are read by :meth:`DicomSeries.read_stored`).

    ``names``: ``"series"`` calls each ``series_<Series Number>`` (made unique); ``"hipmri"``
    calls them ``case_<patient>_week_<series>`` (a number per patient, never the patient's ID),
    so that splits keep each patient in one split.
    """
    groups: dict[str, list[_Instance]] = {}
    headers: dict[str, object] = {}
    sources: dict[str, str] = {}
    for item in inputs:
        item = Path(item).expanduser()
        for path in dicom_candidates(item):
            ds = _quiet_read(_file_bytes(path), path, pixels=True)  # bytes only: no pixel is decoded
            instance = _instance(path, ds)
            for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if keyword in ds:
                    del ds[keyword]
            if instance is None:
                if not item.is_dir() and item.name.upper() != "DICOMDIR":
                    raise BadFileError(path, f"holds no image ({_sop_name(ds)})")
                continue
            if ds.get("BurnedInAnnotation", "NO") == "YES":
                raise BadFileError(path, "its pixels carry burned-in annotation (Burned In Annotation YES: text such "
                                         "as the patient's name); mrivq would carry it into every file it writes: "
                                         "give a de-identified series")
            groups.setdefault(instance.series_uid, []).append(instance)
            headers.setdefault(instance.series_uid, ds)
            sources.setdefault(instance.series_uid, str(item))
    series = []
    for uid, members in groups.items():
        affines = _ordered(members, uid)
        series.append(DicomSeries("", [m.path for m in members], affines, headers[uid], members[0].rows,
                                  members[0].columns, sources[uid]))
    _name(series, names)
    return series


def _ordered(members: list[_Instance], uid: str) -> np.ndarray:
    """Sort a series' images along the slice normal (in place) and return each one's affine;
    refuse images that disagree on size or orientation, or share a position."""
    first = members[0]
    for m in members[1:]:
        if (m.rows, m.columns) != (first.rows, first.columns):
            raise BadFileError(m.path, f"its {m.rows} x {m.columns} image differs from {first.path.name}'s "
                                       f"{first.rows} x {first.columns} in the same series; give them separately")
    located = [m.orientation is not None and m.position is not None for m in members]
    if len(members) > 1 and not all(located):
        missing = members[located.index(False)]
        raise BadFileError(missing.path, "has no Image Position / Orientation (Patient), so its series cannot be "
                                         "ordered in space")
    if math.prod((first.rows, first.columns, len(members))) > MAX_SERIES_VOXELS:
        raise BadFileError(first.path, f"its series of {len(members)} images of {first.rows} x {first.columns} is "
                                       f"larger than the {MAX_SERIES_VOXELS} voxels mrivq reads as one volume")
    if not all(located):  # one image without geometry: its pixel spacing, axes as stored
        affine = np.diag([*first.spacing, first.thickness, 1.0])
        return affine[None]
    for m in members[1:]:
        if np.abs(m.orientation - first.orientation).max() > 1e-4:
            raise BadFileError(m.path, f"its orientation differs from {first.path.name}'s in the same series; "
                                       "give them as separate series")
    # nibabel's normal (column cosine x row cosine): the voxel axes (down, along, normal) right-handed
    normal = np.cross(first.orientation[3:], first.orientation[:3])
    members.sort(key=lambda m: (float(m.position @ normal), m.number))
    places = np.array([m.position @ normal for m in members])
    if len(members) > 1 and np.diff(places).min() < 1e-3:
        k = int(np.argmin(np.diff(places)))
        raise BadFileError(members[k + 1].path, f"lies at the same position as {members[k].path.name} in one series "
                                                "(echoes, time points or repeats?); mrivq reads one image per "
                                                "position: give them as separate series")
    if len(members) > 1:
        step = (members[-1].position - members[0].position) / (len(members) - 1)
    else:
        step = normal * first.thickness
    affines = []
    for m in members:
        lps = np.eye(4)
        lps[:3, 0] = m.orientation[3:] * m.spacing[0]  # down a column: rows apart
        lps[:3, 1] = m.orientation[:3] * m.spacing[1]  # along a row: columns apart
        lps[:3, 2] = step
        lps[:3, 3] = m.position
        affines.append(_LPS_TO_RAS @ lps)
    return np.stack(affines)


def _name(series: list[DicomSeries], scheme: str) -> None:
    if scheme == "hipmri":
        patients: dict[str, list[DicomSeries]] = {}
        for s in series:
            patients.setdefault(str(s.header.get("PatientID", "")), []).append(s)
        # numbered in the order of a hash of the ID, so the names say nothing of the patient
        order = sorted(patients, key=lambda pid: zlib.crc32(pid.encode()))
        for case, pid in enumerate(order):
            for week, s in enumerate(sorted(patients[pid], key=lambda s: _series_key(s))):
                s.name = f"case_{case:03d}_week_{week}"
        return
    taken: set[str] = set()
    for s in sorted(series, key=_series_key):
        number = s.header.get("SeriesNumber")
        base = f"series_{int(number)}" if isinstance(number, int) or str(number).isdigit() else "series"
        name, k = base, 2
        while name.lower() in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name.lower())
        s.name = name
    series.sort(key=lambda s: s.name)


def _series_key(s: DicomSeries) -> tuple:
    number = s.header.get("SeriesNumber")
    return (int(number) if str(number).isdigit() else 1 << 30, str(s.header.get("SeriesInstanceUID", "")))


def kept_attributes(ds) -> dict:
    """The :data:`KEPT_ATTRIBUTES` an original header has, as JSON-ready values (strings, numbers,
    lists of them): what ``--keep-dicom-header`` carries into a codes file. A value that is not
    valid for its representation (:func:`kept_value`) is left out."""
    kept = {}
    for keyword in KEPT_ATTRIBUTES:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        value = kept_value(keyword, _plain(value))
        if value is not None:
            kept[keyword] = value
    return kept


def _plain(value):
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSfloat, PersonName

    if isinstance(value, MultiValue | list | tuple):
        items = [_plain(v) for v in value]
        return items if all(v is not None for v in items) and len(items) <= 16 else None
    if isinstance(value, IS | int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, DSfloat | float):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, PersonName | str):
        return str(value)[:256]
    return None


# -- writing ------------------------------------------------------------------------------------

#: Transfer syntaxes ``--dicom-syntax`` offers: uncompressed, and JPEG-LS lossless (pyjpegls).
SYNTAXES = ("explicit", "jpeg-ls")


@dataclass
class DerivedSeries:
    """What every instance of one written series shares: its UIDs, number and description, the
    kept attributes of its original (empty: a new study for an anonymous patient), how it was
    derived, and whether that was lossy (with its ratio)."""

    study_uid: str
    series_uid: str
    frame_uid: str
    number: int
    description: str
    derivation: str
    lossy: bool
    ratio: float | None = None
    kept: dict = field(default_factory=dict)

    @classmethod
    def new(cls, *, kept: dict | None, description: str, derivation: str, lossy: bool, ratio: float | None,
            number: int, study_uid: str | None = None) -> DerivedSeries:
        from pydicom.uid import generate_uid

        kept = dict(kept or {})
        return cls(kept.get("StudyInstanceUID") or study_uid or generate_uid(), generate_uid(),
                   kept.get("FrameOfReferenceUID") or generate_uid(), number, description[:64], derivation[:1024],
                   lossy, ratio, kept)


def pixel_values(values: np.ndarray, *, integer: bool, slope: float = 1.0, inter: float = 0.0,
                 signed: bool = False) -> tuple[np.ndarray, float, float, bool]:
    """Values of one slice as 16-bit pixels: ``(pixels uint16 or int16, slope, intercept, exact)``.
    Integer values that fit 16 bits are stored as they are under ``slope`` / ``inter`` (exact;
    ``signed``: as int16 where they fit, as the input stored them); anything else is mapped
    linearly onto 0 .. 65535 (``exact`` False)."""
    values = np.asarray(values)
    if integer and values.size:
        rounded = np.rint(values)
        lo, hi = float(rounded.min()), float(rounded.max())
        if np.array_equal(rounded, values) or values.dtype.kind in "ui":
            fits = {np.int16: lo >= -32768 and hi <= 32767, np.uint16: lo >= 0 and hi <= 65535}
            for dtype in ((np.int16, np.uint16) if signed else (np.uint16, np.int16)):
                if fits[dtype]:
                    return rounded.astype(dtype), slope, inter, True
    scanner = values.astype(np.float64) * slope + inter
    lo, hi = (float(scanner.min()), float(scanner.max())) if scanner.size else (0.0, 0.0)
    if integer and hi - lo <= 65535:  # integer scanner units: shift them, step 1
        offset = math.floor(lo)
        return np.rint(scanner - offset).astype(np.uint16), 1.0, float(offset), False
    step = (hi - lo) / 65535 if hi > lo else 1.0
    return np.rint((scanner - lo) / step).astype(np.uint16), step, lo, False


def _identify(ds, series: DerivedSeries, index: int) -> None:
    """Patient, study, series, equipment and image identity: the original's where kept, else empty
    (type 2) in a new study; the image derived, by mrivq."""
    from mrivq import __version__

    kept, now = series.kept, datetime.now()
    if any(isinstance(v, str) and not v.isascii() for v in kept.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, kept.get(keyword, ""))
    for keyword in ("PatientAge", "StudyDescription", "BodyPartExamined", "PatientPosition",
                    "ManufacturerModelName", "MagneticFieldStrength", "SequenceName", "FlipAngle",
                    "ImagedNucleus", "ImagingFrequency", "NumberOfAverages", "SpacingBetweenSlices"):
        if keyword in kept:
            setattr(ds, keyword, kept[keyword])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series.study_uid, series.series_uid
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", series.number, series.description
    ds.FrameOfReferenceUID = series.frame_uid
    ds.PositionReferenceIndicator = kept.get("PositionReferenceIndicator", "")
    ds.Manufacturer = kept.get("Manufacturer", "")
    ds.SoftwareVersions = f"mrivq {__version__}"
    ds.InstanceNumber = index + 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = series.derivation


def _place(ds, affine: np.ndarray, kept: dict) -> None:
    """Image Plane attributes of a slice with ``affine`` (NIfTI RAS, nibabel's DICOM axes); an
    affine whose first two axes are not at right angles (some NIfTI files) as the identity."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    down, along = lps[:3, 0], lps[:3, 1]
    spacing = [float(np.linalg.norm(down)), float(np.linalg.norm(along))]
    if min(spacing) <= 0 or abs(down @ along) > 1e-3 * spacing[0] * spacing[1]:
        down, along, spacing = np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), [1.0, 1.0]
    else:
        down, along = down / spacing[0], along / spacing[1]
    ds.PixelSpacing = [_ds_number(v) for v in spacing]
    ds.ImageOrientationPatient = [_ds_number(v) for v in (*along, *down)]
    ds.ImagePositionPatient = [_ds_number(v) for v in lps[:3, 3]]
    ds.SliceThickness = kept.get("SliceThickness", _ds_number(float(np.linalg.norm(lps[:3, 2])) or 1.0))


def _ds_number(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    text = format_number_as_ds(float(value))
    return "0" if text in ("-0", "-0.0") else text


def instance_bytes(values: np.ndarray, affine: np.ndarray, series: DerivedSeries, index: int, *,
                   integer: bool, slope: float = 1.0, inter: float = 0.0, signed: bool = False,
                   syntax: str = "explicit") -> bytes:
    """One slice ``(rows, columns)`` as the bytes of an MR Image Storage Part 10 file of ``series``:
    ``values`` (stored values under ``slope`` / ``inter``, or scanner values) written as
    :func:`pixel_values` makes them, ``affine`` (NIfTI RAS, nibabel's DICOM axes) as Image
    Position / Orientation and Pixel Spacing, instance number ``index + 1``."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, MRImageStorage, generate_uid

    if syntax not in SYNTAXES:
        raise UserError(f"--dicom-syntax {syntax}: give one of {', '.join(SYNTAXES)}")
    pixels, slope, inter, exact = pixel_values(values, integer=integer, slope=slope, inter=inter, signed=signed)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    _identify(ds, series, index)
    ds.LossyImageCompression = "01" if series.lossy or not exact else "00"
    if series.lossy and series.ratio:
        ds.LossyImageCompressionRatio = _ds_number(series.ratio)
        ds.LossyImageCompressionMethod = "MRIVQ"
    _place(ds, affine, series.kept)
    # MR image: the original's acquisition where kept, else research mode with nothing known
    kept = series.kept
    ds.ScanningSequence = kept.get("ScanningSequence", "RM")
    ds.SequenceVariant = kept.get("SequenceVariant", "NONE")
    for keyword in ("ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength"):
        setattr(ds, keyword, kept.get(keyword, ""))
    if "InversionTime" in kept:
        ds.InversionTime = kept["InversionTime"]
    # image pixel
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if (slope, inter) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds_number(slope), _ds_number(inter), "US"
    if pixels.size:
        lo, hi = np.percentile(pixels.astype(np.float64) * slope + inter, [0.5, 99.5])
        ds.WindowCenter, ds.WindowWidth = _ds_number((lo + hi) / 2), _ds_number(max(hi - lo, 1.0))
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    if syntax == "jpeg-ls":
        ds.compress(JPEGLSLossless, pixels, encoding_plugin="pyjpegls")
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()
