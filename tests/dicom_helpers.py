"""Real DICOM files for the tests: pydicom's own MR test images, and series built from them.

pydicom ships ``MR_small.dcm`` (a 64 x 64 Toshiba MR slice) and the same slice in every
compressed transfer syntax; :func:`write_series` makes a series of ``n`` instances from its real
header (the images shifted along the slice normal, their pixels rolled so slices differ), with
the files named so that name order is *not* slice order.
"""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

TEST_FILES = Path(os.path.dirname(pydicom.__file__)) / "data" / "test_files"
MR_SMALL = TEST_FILES / "MR_small.dcm"


def write_series(folder: Path, n: int = 5, *, spacing: float = 2.5, patient: str = "PAT0", number: int = 3,
                 slope: float | None = None, source: Path = MR_SMALL) -> list[Path]:
    """``n`` instances of one new series in ``folder`` (made), from ``source``'s real header;
    returns them in slice order (their names are not)."""
    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(source)
    pixels = original.pixel_array
    orientation = np.array([float(v) for v in original.ImageOrientationPatient])
    normal = np.cross(orientation[3:], orientation[:3])
    position = np.array([float(v) for v in original.ImagePositionPatient])
    series_uid, paths = generate_uid(), []
    for k in range(n):
        ds = original.copy()
        ds.file_meta = original.file_meta.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.PatientID, ds.InstanceNumber = series_uid, number, patient, k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position + k * spacing * normal]
        ds.PixelData = np.roll(pixels, 3 * k, axis=1).astype(pixels.dtype).tobytes()
        if slope is not None:
            ds.RescaleSlope, ds.RescaleIntercept = slope, -7
        path = folder / f"IM{(7 * k + 3) % n:04d}_{k}"  # name order is not slice order
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def with_element(path: Path, keyword: str, value) -> None:
    """Rewrite ``path`` with one attribute changed (None: removed)."""
    ds = pydicom.dcmread(path)
    if value is None:
        if keyword in ds:
            delattr(ds, keyword)
    else:
        setattr(ds, keyword, value)
    ds.save_as(path)


def deflated(path: Path, target: Path, bomb_mib: int = 0) -> Path:
    """``path`` written with the Deflated Explicit VR Little Endian syntax; ``bomb_mib``: its data
    set replaced by that many MiB of zeros, deflated (a deflate bomb; made a MiB at a time)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(target, enforce_file_format=True)
    if bomb_mib:
        blob = target.read_bytes()
        meta_end = 144 + int.from_bytes(blob[140:144], "little")
        squeeze, zeros = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS), bytes(1 << 20)
        target.write_bytes(blob[:meta_end] + b"".join(squeeze.compress(zeros) for _ in range(bomb_mib))
                           + squeeze.flush())
    return target


#: Header edits of the fuzz run: an attribute and the values a hostile file might give it.
HOSTILE_EDITS = {
    "Rows": [0, 1, 40000, 65535], "Columns": [0, 3, 65535], "BitsAllocated": [1, 12, 64, 0],
    "BitsStored": [0, 40], "HighBit": [63], "PixelRepresentation": [2, 7], "SamplesPerPixel": [3, 0],
    "NumberOfFrames": ["0", "5", "-1", "100000"], "PhotometricInterpretation": ["RGB", "MONOCHROME1", "PALETTE COLOR"],
    "ImageOrientationPatient": [["1", "0", "0", "1", "0", "0"], ["nan", "0", "0", "0", "1", "0"], ["1", "0"]],
    "ImagePositionPatient": [["1e308", "0", "0"], ["inf", "0", "0"], ["1"]], "PixelSpacing": [["0", "1"], ["-1", "1"]],
    "RescaleSlope": ["0", "1e300", "nan"], "RescaleIntercept": ["1e308", "inf"], "SeriesInstanceUID": ["", "1.2"],
    "BurnedInAnnotation": ["YES"],
}


def spoil_dicom(rng: random.Random, path: Path) -> str:
    """Spoil one file of a series in place: bytes flipped or cut, a header attribute set to a hostile
    value, its pixel data shortened, or its data set replaced by a deflate bomb; returns the kind."""
    kind = rng.choices(["bytes", "cut", "header", "pixels", "bomb", "syntax"], weights=[25, 15, 40, 10, 4, 6])[0]
    blob = path.read_bytes()
    if kind in ("bytes", "cut"):
        data = bytearray(blob)
        if kind == "cut":
            data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif kind == "header":
        keyword = rng.choice(sorted(HOSTILE_EDITS))
        with_element(path, keyword, rng.choice([*HOSTILE_EDITS[keyword], None]))
    elif kind == "pixels":
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[:rng.randrange(len(ds.PixelData))]
        ds.save_as(path)
    elif kind == "bomb":
        deflated(path, path, rng.choice([300, 600]))
    else:  # the raw pixels claimed to be MPEG-2, baseline JPEG, RLE or HTJ2K
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = rng.choice(["1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.50",
                                                      "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.201"])
        ds.PixelData = encapsulate([ds.PixelData])
        ds.save_as(path)
    return kind
