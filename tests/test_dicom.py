"""DICOM in and out, with pydicom's real MR test images (``dicom_helpers``).

In: series found by Series Instance UID and ordered along the normal (never by name), nibabel's
affine, every pixel data syntax pydicom decodes here, DICOMDIR, Rescale Slope / Intercept, and
one line (exit 2) for what mrivq refuses. Out: ``decode --format dicom`` and ``reconstruct
--format dicom`` write series pydicom reads back with the original's geometry (within 1e-4 mm),
the values NIfTI output has (exactly the stored ones for a lossless file), and the MR Image
IOD's type 1 and 2 attributes; nothing of the patient travels unless asked.
"""

from __future__ import annotations

import shutil
import warnings
import zlib

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import run_main
from dicom_helpers import MR_SMALL, TEST_FILES, deflated, with_element, write_series
from prior_helpers import train_tiny_vqvae
from pydicom.fileset import FileSet

from mrivq.data.dicom import find_series
from mrivq.data.scans import scan_inputs
from mrivq.errors import UserError

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def vqvae(tiny_phantom, tmp_path_factory):
    return train_tiny_vqvae(tiny_phantom, tmp_path_factory.mktemp("dicom"))


def refused(args, capsys, *expected) -> str:
    capsys.readouterr()
    assert run_main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mrivq: error: ") and "Traceback" not in err[0], err
    assert all(e in err[0] for e in expected), err
    return err[0]


def nibabel_affine(path) -> np.ndarray:
    """nibabel's affine of one DICOM image (voxels to LPS mm), its "experimental" warning hushed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import dicomwrappers

        return dicomwrappers.wrapper_from_file(str(path)).affine


# -- reading --------------------------------------------------------------------------------------


def test_a_series_is_ordered_along_its_normal_with_nibabels_geometry(tmp_path):
    paths = write_series(tmp_path / "s", 5, spacing=2.5)
    (series,) = find_series([tmp_path / "s"])
    assert series.files == paths  # slice order, though the names sort otherwise
    assert sorted(p.name for p in paths) != [p.name for p in paths]
    assert series.name == "series_3" and series.shape == (64, 64, 5)
    np.testing.assert_allclose(series.affines[0][:, :2], (LPS @ nibabel_affine(paths[0]))[:, :2], atol=1e-6)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        np.testing.assert_allclose(LPS @ series.affines[k] @ [0, 0, 0, 1], [*map(float, ds.ImagePositionPatient), 1],
                                   atol=1e-9)
    assert np.linalg.norm(series.affine[:3, 2]) == pytest.approx(2.5, abs=1e-4)
    stored, slopes, inters, dtype = series.read_stored()
    original = pydicom.dcmread(MR_SMALL).pixel_array
    np.testing.assert_array_equal(stored[2], np.roll(original, 6, axis=1))
    assert dtype == "int16" and (slopes == 1).all() and (inters == 0).all()


def test_a_lone_image_has_nibabels_affine():
    (series,) = find_series([MR_SMALL])
    np.testing.assert_allclose(series.affine, LPS @ nibabel_affine(MR_SMALL), atol=1e-9)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_other_syntaxes_read_the_same_pixels(name):
    (series,) = find_series([TEST_FILES / name])
    np.testing.assert_array_equal(series.read_stored()[0][0], pydicom.dcmread(MR_SMALL).pixel_array)


def test_a_deflated_file_reads_the_same_pixels(tmp_path):  # its bomb: tests/test_hostile_files.py
    (series,) = find_series([deflated(MR_SMALL, tmp_path / "deflated.dcm")])
    np.testing.assert_array_equal(series.read_stored()[0][0], pydicom.dcmread(MR_SMALL).pixel_array)


def test_rescale_slope_and_intercept_give_scanner_units(tmp_path):
    write_series(tmp_path / "s", 3, slope=2.0)
    (scan,) = scan_inputs([tmp_path / "s"])
    slices, meta, is_volume, affines = scan.read()
    stored, dtype, slopes, inters = scan.read_stored()
    assert is_volume and meta.shape == (64, 64, 3) and affines.shape == (3, 4, 4) and dtype == "int16"
    np.testing.assert_array_equal(slices, (stored * 2 - 7).astype(np.float32))
    assert slopes.tolist() == [2, 2, 2] and inters.tolist() == [-7, -7, -7]


def test_a_dicomdir_lists_the_series_and_may_not_point_outside(tmp_path, capsys, vqvae):
    paths = write_series(tmp_path / "s", 4)
    fs = FileSet()
    for path in paths:
        fs.add(pydicom.dcmread(path))
    fs.write(tmp_path / "disk")
    (series,) = find_series([tmp_path / "disk" / "DICOMDIR"])
    np.testing.assert_array_equal(series.read_stored()[0], find_series([tmp_path / "s"])[0].read_stored()[0])
    ds = pydicom.dcmread(tmp_path / "disk" / "DICOMDIR")
    image = next(r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r)
    with warnings.catch_warnings():  # pydicom warns of the values a hostile disk holds
        warnings.simplefilter("ignore")
        image.ReferencedFileID = ["..", "s", paths[0].name]
        ds.save_as(tmp_path / "disk" / "DICOMDIR")
    refused(["encode", "--checkpoint", vqvae, tmp_path / "disk" / "DICOMDIR", "--out", tmp_path / "c.mrvq"], capsys,
            "DICOMDIR", "not a plain DICOM file ID")


def _series_with(tmp_path, keyword, value, which=1):
    paths = write_series(tmp_path / "s", 3)
    with_element(paths[which], keyword, value)
    return tmp_path / "s"


@pytest.mark.parametrize("keyword, value, message", [
    ("NumberOfFrames", "5", "multi-frame object (5 frames"),
    ("Rows", 32, "differs from"),
    ("ImageOrientationPatient", ["1", "0", "0", "0", "0", "-1"], "orientation differs"),
    ("ImagePositionPatient", None, "cannot be ordered in space"),
    ("BitsAllocated", 64, "Bits Allocated 64"),
    ("PhotometricInterpretation", "RGB", "grey-scale"),
    ("BurnedInAnnotation", "YES", "burned-in annotation"),
    ("Columns", 65535, "is not 1 to 32767 rows and columns"),
])
def test_series_mrivq_cannot_read_are_one_line(tmp_path, capsys, vqvae, keyword, value, message):
    folder = _series_with(tmp_path, keyword, value)
    refused(["encode", "--checkpoint", vqvae, folder, "--out", tmp_path / "c.mrvq"], capsys, message)
    assert not (tmp_path / "c.mrvq").exists()


def test_an_image_too_large_to_read_is_refused_before_its_pixels(tmp_path, capsys, vqvae):
    (path,) = write_series(tmp_path / "s", 1)
    with_element(path, "Rows", 30000)
    with_element(path, "Columns", 30000)  # 1.7 GiB of 16-bit pixels claimed
    refused(["encode", "--checkpoint", vqvae, path, "--out", tmp_path / "c.mrvq"], capsys,
            "30000 x 30000 image is larger than mrivq reads")


def test_pixel_data_shorter_than_its_header_says_is_refused(tmp_path, capsys, vqvae):
    (path,) = write_series(tmp_path / "s", 1)
    with_element(path, "Columns", 128)  # 64 x 128 x 16 bits need 16384 bytes; it holds 8192
    refused(["encode", "--checkpoint", vqvae, path, "--out", tmp_path / "c.mrvq"], capsys,
            "pixel data holds 8192 bytes", "need 16384")


def test_two_images_at_one_position_and_truncated_files_are_refused(tmp_path, capsys, vqvae):
    paths = write_series(tmp_path / "s", 3)
    with_element(paths[2], "ImagePositionPatient", pydicom.dcmread(paths[1]).ImagePositionPatient)
    refused(["encode", "--checkpoint", vqvae, tmp_path / "s", "--out", tmp_path / "c.mrvq"], capsys,
            "same position")
    refused(["encode", "--checkpoint", vqvae, TEST_FILES / "MR_truncated.dcm", "--out", tmp_path / "c.mrvq"], capsys,
            "MR_truncated.dcm", "truncated or damaged")


def test_a_syntax_without_a_decoder_names_what_would_decode_it(tmp_path, capsys, vqvae, monkeypatch):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(MR_SMALL)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.HTJ2KLossless
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(tmp_path / "htj2k.dcm")
    refused(["encode", "--checkpoint", vqvae, tmp_path / "htj2k.dcm", "--out", tmp_path / "c.mrvq"], capsys,
            "High-Throughput JPEG 2000", "install", "pylibjpeg-openjpeg")
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.save_as(tmp_path / "mpeg.dcm")
    refused(["encode", "--checkpoint", vqvae, tmp_path / "mpeg.dcm", "--out", tmp_path / "c.mrvq"], capsys,
            "MPEG2", "pydicom cannot decode")


def test_a_folder_of_neither_nifti_nor_dicom_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no .nii/.nii.gz files and no DICOM files"):
        scan_inputs([tmp_path / "d"])


# -- writing --------------------------------------------------------------------------------------

#: The MR Image IOD's (PS3.3 A.4) type 1 attributes (present, not empty) and type 2 (present) that
#: mrivq writes, by module; checked on every written instance.
TYPE_1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "SeriesInstanceUID", "FrameOfReferenceUID",
          "PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SamplesPerPixel",
          "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
          "PixelRepresentation", "PixelData", "ImageType", "ScanningSequence", "SequenceVariant")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "PositionReferenceIndicator",
          "Manufacturer", "InstanceNumber", "SliceThickness", "ScanOptions", "MRAcquisitionType", "EchoTime",
          "EchoTrainLength")


def conformant(path):
    """Read back under pydicom's strict validation, with the file meta checked and the IOD's
    attributes present; returns the data set."""
    from pydicom import config
    from pydicom.dataset import validate_file_meta

    before = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        ds = pydicom.dcmread(path)
        for element in ds.iterall():
            element.value  # noqa: B018 -- every value converted, under RAISE
    finally:
        config.settings.reading_validation_mode = before
    validate_file_meta(ds.file_meta, enforce_standard=True)
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
    missing = [k for k in TYPE_1 if k not in ds or ds[k].value in (None, "", [])] + [k for k in TYPE_2 if k not in ds]
    assert not missing, missing
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"] and "mrivq" in ds.DerivationDescription
    assert not any(element.tag.is_private for element in ds.iterall())
    return ds


def _geometry(ds):
    return np.array([*map(float, ds.ImagePositionPatient), *map(float, ds.ImageOrientationPatient),
                     *map(float, ds.PixelSpacing)])


@pytest.mark.parametrize("syntax", ["explicit", "jpeg-ls"])
def test_a_lossless_round_trip_gives_the_stored_values_and_the_geometry(tmp_path, vqvae, syntax):
    paths = write_series(tmp_path / "s", 4, slope=2.0)
    for path in paths:  # a private tag and patient data the codes file must not carry
        ds = pydicom.dcmread(path)
        ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x01, "LO", "secret")
        ds.save_as(path)
    codes = tmp_path / "c.mrvq"
    assert run_main(["encode", "--checkpoint", str(vqvae), str(tmp_path / "s"), "--out", str(codes),
                     "--max-error", "0"]) == 0
    raw = codes.read_bytes()
    header = zlib.decompress(raw[raw.index(b"header") + 10:])  # the first section: the header
    original = pydicom.dcmread(paths[0])
    for secret in (str(original.PatientName), original.StudyInstanceUID, original.FrameOfReferenceUID, "secret"):
        assert secret.encode() not in header and secret.encode() not in raw
    assert run_main(["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(tmp_path / "dcm"),
                     "--format", "dicom", "--dicom-syntax", syntax]) == 0
    assert run_main(["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(tmp_path / "nii")]) == 0
    written = sorted((tmp_path / "dcm").glob("*.dcm"))
    assert [p.name for p in written] == [f"series_3_slice_{k}.dcm" for k in range(4)]
    volume = nib.load(tmp_path / "nii" / "series_3.nii.gz").get_fdata()
    series_uids, study_uids = set(), set()
    for k, (path, source) in enumerate(zip(written, paths)):
        ds, before = conformant(path), pydicom.dcmread(source)
        assert ds.file_meta.TransferSyntaxUID == (pydicom.uid.JPEGLSLossless if syntax == "jpeg-ls"
                                                  else pydicom.uid.ExplicitVRLittleEndian)
        np.testing.assert_array_equal(ds.pixel_array, before.pixel_array)  # the stored values, exactly
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (2.0, -7.0)
        np.testing.assert_array_equal(ds.pixel_array * 2.0 - 7, volume[..., k])
        np.testing.assert_allclose(_geometry(ds), _geometry(before), atol=1e-4)
        assert ds.LossyImageCompression == "00" and ds.InstanceNumber == k + 1
        assert str(ds.PatientName) == "" and ds.StudyInstanceUID != before.StudyInstanceUID
        assert ds.FrameOfReferenceUID != before.FrameOfReferenceUID
        series_uids.add(ds.SeriesInstanceUID)
        study_uids.add(ds.StudyInstanceUID)
    assert len(series_uids) == 1 and len(study_uids) == 1
    (back,) = find_series([tmp_path / "dcm"])  # mrivq reads its own output as the same volume
    np.testing.assert_allclose(back.affines, find_series([tmp_path / "s"])[0].affines, atol=1e-4)


def test_images_rescaled_differently_decode_losslessly_to_one_nifti_volume(tmp_path, vqvae):
    paths = write_series(tmp_path / "s", 3, slope=2.0)
    with_element(paths[1], "RescaleSlope", "3")  # each image its own scaling, as some scanners write
    codes = tmp_path / "c.mrvq"
    assert run_main(["encode", "--checkpoint", str(vqvae), str(tmp_path / "s"), "--out", str(codes),
                     "--max-error", "0"]) == 0
    assert run_main(["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(tmp_path / "nii")]) == 0
    (scan,) = scan_inputs([tmp_path / "s"])
    original, *_ = scan.read()
    volume = np.asarray(nib.load(tmp_path / "nii" / "series_3.nii.gz").dataobj)
    np.testing.assert_array_equal(np.moveaxis(volume, 2, 0), original)
    assert run_main(["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(tmp_path / "dcm"),
                     "--format", "dicom"]) == 0
    second = conformant(tmp_path / "dcm" / "series_3_slice_1.dcm")
    assert float(second.RescaleSlope) == 3.0
    np.testing.assert_array_equal(second.pixel_array, pydicom.dcmread(paths[1]).pixel_array)


def test_kept_header_puts_the_decoded_series_in_the_original_study(tmp_path, vqvae):
    paths = write_series(tmp_path / "s", 3)
    codes = tmp_path / "c.mrvq"
    assert run_main(["encode", "--checkpoint", str(vqvae), str(tmp_path / "s"), "--out", str(codes),
                     "--keep-dicom-header"]) == 0
    assert run_main(["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(tmp_path / "dcm"),
                     "--format", "dicom"]) == 0
    assert run_main(["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(tmp_path / "nii")]) == 0
    volume = nib.load(tmp_path / "nii" / "series_3.nii.gz").get_fdata()
    before = pydicom.dcmread(paths[0])
    for k, path in enumerate(sorted((tmp_path / "dcm").glob("*.dcm"))):
        ds = conformant(path)
        scanner = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        assert np.abs(scanner - volume[..., k]).max() <= 0.5  # NIfTI's float values, rounded to integers
        assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientName, ds.PatientID, ds.EchoTime) == (
            before.StudyInstanceUID, before.FrameOfReferenceUID, before.PatientName, before.PatientID, before.EchoTime)
        assert ds.SeriesInstanceUID != before.SeriesInstanceUID and ds.SeriesNumber == 1003
        assert ds.LossyImageCompression == "01" and float(ds.LossyImageCompressionRatio) > 1
        assert ds.LossyImageCompressionMethod == "MRIVQ"


@pytest.mark.parametrize("keyword, value", [
    ("StudyInstanceUID", "../../etc/passwd"), ("PatientName", "a\x00b\nc"), ("PatientID", "x" * 65),
    ("EchoTime", "fast"), ("SeriesNumber", 1e300), ("SeriesNumber", 2 ** 40), ("StudyDate", "yesterday"),
    ("ScanningSequence", ["SE"] * 17), ("PrivateTag", "x"), ("PatientName", {"a": 1}),
])
def test_a_kept_header_value_a_dicom_could_not_hold_is_refused(tmp_path, capsys, vqvae, keyword, value):
    import json

    from hostile_helpers import read_header, with_header

    write_series(tmp_path / "s", 2)
    codes = tmp_path / "c.mrvq"
    assert run_main(["encode", "--checkpoint", str(vqvae), str(tmp_path / "s"), "--out", str(codes),
                     "--keep-dicom-header"]) == 0
    header = read_header(codes.read_bytes())
    header["dicom"]["series_3.nii.gz"][keyword] = value
    (tmp_path / "edited.mrvq").write_bytes(with_header(codes.read_bytes(), json.dumps(header)))
    refused(["decode", "--checkpoint", vqvae, tmp_path / "edited.mrvq", "--out", tmp_path / "out", "--format", "dicom"],
            capsys, "edited.mrvq", "series_3.nii.gz")
    assert not (tmp_path / "out").exists()


def test_phantom_slices_decode_as_one_dicom_series_per_case_week(tmp_path, vqvae, tiny_phantom):
    test = sorted((tiny_phantom / "keras_slices_test").glob("*.nii.gz"))
    codes = tmp_path / "c.mrvq"
    assert run_main(["encode", "--checkpoint", str(vqvae), *map(str, test), "--out", str(codes)]) == 0
    assert run_main(["decode", "--checkpoint", str(vqvae), str(codes), "--out", str(tmp_path / "dcm"),
                     "--format", "dicom"]) == 0
    written = sorted((tmp_path / "dcm").glob("*.dcm"))
    assert len(written) == len(test)
    by_series = {}
    for path in written:
        ds = conformant(path)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
        assert ds.LossyImageCompression == "01"
    volumes = {p.name.rsplit("_slice_", 1)[0] for p in test}
    assert len(by_series) == len(volumes) and len({d.StudyInstanceUID for g in by_series.values() for d in g}) == 1
    image = nib.load(test[0])
    ds = pydicom.dcmread(tmp_path / "dcm" / test[0].name.replace(".nii.gz", ".dcm"))
    assert (ds.Rows, ds.Columns) == tuple(n for n in image.shape if n != 1)
    np.testing.assert_allclose([*map(float, ds.ImagePositionPatient)], (LPS @ image.affine)[:3, 3], atol=1e-4)


def test_reconstruct_writes_two_derived_series_in_the_original_study(tmp_path, vqvae):
    paths = write_series(tmp_path / "s", 3)
    assert run_main(["reconstruct", "--checkpoint", str(vqvae), str(tmp_path / "s"), "--out", str(tmp_path / "r"),
                     "--format", "dicom"]) == 0
    before = pydicom.dcmread(paths[0])
    recon = [conformant(p) for p in sorted((tmp_path / "r").glob("series_3_recon_slice_*.dcm"))]
    diff = [conformant(p) for p in sorted((tmp_path / "r").glob("series_3_diff_slice_*.dcm"))]
    assert len(recon) == len(diff) == 3
    assert {d.StudyInstanceUID for d in recon + diff} == {before.StudyInstanceUID}
    assert len({d.SeriesInstanceUID for d in recon}) == 1 and recon[0].SeriesInstanceUID != diff[0].SeriesInstanceUID
    for k, path in enumerate(paths):
        np.testing.assert_allclose(_geometry(recon[k]), _geometry(pydicom.dcmread(path)), atol=1e-4)
    assert run_main(["reconstruct", "--checkpoint", str(vqvae), str(tmp_path / "s"), "--out", str(tmp_path / "n")]) == 0
    assert nib.load(tmp_path / "n" / "series_3_recon.nii.gz").shape == (64, 64, 3)


def test_a_dicom_root_trains_as_hipmri_slices_with_patients_apart(tmp_path):
    from mrivq.data.sources import dicom_slices
    from mrivq.data.splits import resolve_splits

    for patient in range(4):
        write_series(tmp_path / "root" / f"P{patient}" / "T2", 3, patient=f"PAT{patient}")
    write_series(tmp_path / "root" / "P0" / "T1", 2, patient="PAT0", number=5)
    folder = dicom_slices(tmp_path / "root", tmp_path / "cache")
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 14 and all(n.startswith("case_") and "_week_" in n and "PAT" not in n for n in names)
    assert dicom_slices(tmp_path / "root", tmp_path / "cache") == folder  # converted once
    splits = resolve_splits(folder, fractions=(0.5, 0.25, 0.25), seed=0)
    cases = [{n.name.split("_week_")[0] for n in files} for files in splits.as_dict().values()]
    assert sum(map(len, cases)) == 4 and not (cases[0] & cases[1] or cases[0] & cases[2])
    shutil.rmtree(tmp_path / "root" / "P3")
    assert dicom_slices(tmp_path / "root", tmp_path / "cache") != folder  # files changed: read again
