"""data.io: reading NIfTI slices and volumes, and rejecting files that cannot be used."""

import os

import nibabel as nib
import numpy as np
import pytest

from mrivq.data.io import SliceMeta, list_nifti, read_slice, read_volume
from mrivq.errors import BadFileError, UserError

AFFINE = np.diag([0.5, 0.5, 2.0, 1.0])


def write_nifti(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


@pytest.fixture
def slice16x8():
    return np.arange(16 * 8, dtype=np.float32).reshape(16, 8) * 7.5 + 300.0


def test_read_slice_gives_float32_2d_and_metadata(tmp_path, slice16x8):
    path = write_nifti(tmp_path / "case_001_week_0_slice_0.nii.gz", slice16x8.astype(np.int16))

    data, meta = read_slice(path)

    assert data.dtype == np.float32 and data.shape == (16, 8)
    np.testing.assert_array_equal(data, slice16x8.astype(np.int16))
    assert isinstance(meta, SliceMeta)
    assert meta.path == str(path)
    assert meta.shape == (16, 8)
    assert meta.dtype == "int16"
    np.testing.assert_allclose(meta.affine, AFFINE)
    assert isinstance(meta.header, nib.Nifti1Header)


def test_read_slice_squeezes_a_singleton_third_axis(tmp_path, slice16x8):
    path = write_nifti(tmp_path / "s.nii.gz", slice16x8[..., None])

    data, meta = read_slice(path)

    assert data.shape == (16, 8)
    assert meta.shape == (16, 8, 1)
    np.testing.assert_array_equal(data, slice16x8)


def test_read_slice_reads_uncompressed_nii(tmp_path, slice16x8):
    data, _ = read_slice(write_nifti(tmp_path / "s.nii", slice16x8))
    np.testing.assert_array_equal(data, slice16x8)


def test_read_volume_stacks_slices_along_the_chosen_axis(tmp_path):
    volume = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    path = write_nifti(tmp_path / "vol.nii.gz", volume)

    along_z, _ = read_volume(path)
    along_x, _ = read_volume(path, axis=0)

    assert along_z.shape == (4, 6, 5) and along_z.dtype == np.float32
    np.testing.assert_array_equal(along_z[3], volume[:, :, 3])
    assert along_x.shape == (6, 5, 4)
    np.testing.assert_array_equal(along_x[2], volume[2])


def test_read_volume_of_a_2d_file_is_one_slice(tmp_path, slice16x8):
    stack, meta = read_volume(write_nifti(tmp_path / "s.nii.gz", slice16x8))
    assert stack.shape == (1, 16, 8)
    assert meta.shape == (16, 8)


def test_truncated_gzip_is_a_bad_file(tmp_path, slice16x8):
    whole = write_nifti(tmp_path / "whole.nii.gz", slice16x8).read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])

    with pytest.raises(BadFileError, match="truncated or corrupt gzip") as info:
        read_slice(path)
    assert info.value.path == str(path)


def test_text_file_named_nii_gz_is_not_a_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("these are not the slices you are looking for\n")
    with pytest.raises(BadFileError, match="not a NIfTI file"):
        read_slice(path)


def test_4d_image_is_a_bad_file_with_its_shape(tmp_path):
    path = write_nifti(tmp_path / "four.nii.gz", np.zeros((16, 8, 2, 3), np.float32))
    with pytest.raises(BadFileError, match=r"4-D image \(16, 8, 2, 3\); expected a 2-D slice"):
        read_slice(path)
    with pytest.raises(BadFileError, match="4-D image"):
        read_volume(path)


def test_3d_volume_is_not_a_slice(tmp_path):
    path = write_nifti(tmp_path / "vol.nii.gz", np.zeros((16, 8, 3), np.float32))
    with pytest.raises(BadFileError, match=r"3-D image \(16, 8, 3\); expected a 2-D slice"):
        read_slice(path)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_a_bad_file(tmp_path, slice16x8, bad_value):
    slice16x8[3, 4] = bad_value
    with pytest.raises(BadFileError, match="NaN or Inf"):
        read_slice(write_nifti(tmp_path / "s.nii.gz", slice16x8))


def test_zero_byte_file_is_a_bad_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(BadFileError, match="empty file"):
        read_slice(path)


def test_unreadable_file_is_a_bad_file(tmp_path, slice16x8):
    path = write_nifti(tmp_path / "locked.nii.gz", slice16x8)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running with privileges that read any file (root)")
        with pytest.raises(BadFileError, match="permission denied"):
            read_slice(path)
    finally:
        path.chmod(0o644)


def test_constant_image_reads_fine(tmp_path):
    data, _ = read_slice(write_nifti(tmp_path / "flat.nii.gz", np.full((16, 8), 42.0, np.float32)))
    assert np.all(data == 42.0)


def test_bad_file_message_names_the_file(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("x")
    with pytest.raises(BadFileError) as info:
        read_slice(path)
    assert str(info.value) == f"{path}: not a NIfTI file"


def test_list_nifti_returns_sorted_nifti_files_only(tmp_path, slice16x8):
    for name in ["b.nii.gz", "a.nii", "c.nii.gz"]:
        write_nifti(tmp_path / name, slice16x8)
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub.nii.gz").mkdir()

    assert [p.name for p in list_nifti(tmp_path)] == ["a.nii", "b.nii.gz", "c.nii.gz"]


def test_list_nifti_missing_folder_says_so(tmp_path):
    with pytest.raises(UserError, match=r"nowhere does not exist") as info:
        list_nifti(tmp_path / "nowhere")
    assert "\n" not in str(info.value)


def test_list_nifti_empty_folder_says_so(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path} is empty"):
        list_nifti(tmp_path)


def test_list_nifti_folder_without_nifti_says_so(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="has no .nii or .nii.gz files"):
        list_nifti(tmp_path)
