"""data.splits: finding the split folders and keeping each case in one split."""

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrivq.data.splits import Splits, mask_path, parse_name, resolve_splits
from mrivq.errors import UserError

TINY = np.ones((4, 2), np.float32)


def write_slices(folder: Path, cases, weeks=(0,), slices=(0, 1), prefix="case"):
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        for week in weeks:
            for index in slices:
                name = f"{prefix}_{case:03d}_week_{week}_slice_{index}.nii.gz"
                nib.save(nib.Nifti1Image(TINY, np.eye(4)), str(folder / name))
    return folder


def keras_root(tmp_path, train=(1, 2, 3), validate=(4,), test=(5,)):
    for split, cases in [("train", train), ("validate", validate), ("test", test)]:
        write_slices(tmp_path / f"keras_slices_{split}", cases)
        write_slices(tmp_path / f"keras_slices_seg_{split}", cases, prefix="seg")
    return tmp_path


def case_ids(files):
    return {parse_name(f)[0] for f in files}


def test_parse_name_reads_case_week_slice():
    assert parse_name("/d/case_004_week_0_slice_12.nii.gz") == ("case_004", 0, 12)
    assert parse_name("case_120_week_3_slice_59.nii") == ("case_120", 3, 59)


def test_parse_name_maps_masks_to_their_case():
    assert parse_name("seg_004_week_1_slice_2.nii.gz") == ("case_004", 1, 2)


def test_parse_name_of_other_files_is_the_stem():
    assert parse_name("/d/patient7_t2.nii.gz") == ("patient7_t2", None, None)
    assert parse_name("scan.nii") == ("scan", None, None)


def test_keras_layout_uses_the_three_folders(tmp_path):
    splits = resolve_splits(keras_root(tmp_path))

    assert isinstance(splits, Splits)
    assert case_ids(splits.train) == {"case_001", "case_002", "case_003"}
    assert case_ids(splits.validate) == {"case_004"}
    assert case_ids(splits.test) == {"case_005"}
    assert splits.train == sorted(splits.train)
    assert all(p.parent.name == "keras_slices_train" for p in splits.train)


def test_explicit_dirs_win_over_root(tmp_path):
    root = keras_root(tmp_path / "hipmri")
    other = write_slices(tmp_path / "mine", [9])

    splits = resolve_splits(root, validate_dir=other)

    assert case_ids(splits.validate) == {"case_009"}
    assert case_ids(splits.train) == {"case_001", "case_002", "case_003"}


def test_explicit_dirs_without_root(tmp_path):
    dirs = [write_slices(tmp_path / name, [i]) for i, name in enumerate(["a", "b", "c"], start=1)]
    splits = resolve_splits(None, *dirs)
    assert [case_ids(s) for s in (splits.train, splits.validate, splits.test)] == [
        {"case_001"},
        {"case_002"},
        {"case_003"},
    ]


def test_missing_explicit_dir_names_the_key(tmp_path):
    a = write_slices(tmp_path / "a", [1])
    with pytest.raises(UserError, match=r"data.test_dir is not set"):
        resolve_splits(train_dir=a, validate_dir=a)


def test_flat_folder_is_split_by_case_without_sharing(tmp_path):
    flat = write_slices(tmp_path / "flat", range(20))

    splits = resolve_splits(flat, fractions=(0.8, 0.1, 0.1), seed=3)

    train, validate, test = (case_ids(s) for s in (splits.train, splits.validate, splits.test))
    assert (len(train), len(validate), len(test)) == (16, 2, 2)
    assert not (train & validate) and not (train & test) and not (validate & test)
    assert len(splits.train) + len(splits.validate) + len(splits.test) == 40
    assert splits.test == sorted(splits.test)


def test_flat_split_is_deterministic_for_a_seed(tmp_path):
    flat = write_slices(tmp_path / "flat", range(20))
    first = resolve_splits(flat, seed=7)
    assert resolve_splits(flat, seed=7) == first
    assert resolve_splits(flat, seed=8) != first


def test_flat_split_gives_every_split_a_case_from_three(tmp_path):
    splits = resolve_splits(write_slices(tmp_path / "flat", [1, 2, 3]))
    assert all(len(case_ids(s)) == 1 for s in (splits.train, splits.validate, splits.test))


def test_flat_split_leaves_masks_out(tmp_path):
    flat = write_slices(tmp_path / "flat", range(5))
    write_slices(flat, range(5), prefix="seg")
    splits = resolve_splits(flat)
    assert not any(
        p.name.startswith("seg_") for s in (splits.train, splits.validate, splits.test) for p in s
    )


def test_case_in_two_splits_is_warned_about(tmp_path):
    root = keras_root(tmp_path, train=(1, 2), validate=(2,), test=(3,))
    with pytest.warns(UserWarning, match="case_002"):
        resolve_splits(root)


def test_clean_splits_do_not_warn(tmp_path):
    root = keras_root(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_splits(root)


def test_root_with_neither_layout_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(
        UserError, match="neither keras_slices_train/validate/test folders nor .nii"
    ):
        resolve_splits(tmp_path)


def test_root_with_some_keras_folders_names_the_missing_one(tmp_path):
    root = keras_root(tmp_path)
    for p in (root / "keras_slices_test").iterdir():
        p.unlink()
    (root / "keras_slices_test").rmdir()
    with pytest.raises(UserError, match="no keras_slices_test"):
        resolve_splits(root)


def test_no_root_and_no_dirs_is_a_user_error():
    with pytest.raises(UserError, match="data.root"):
        resolve_splits()


def test_mask_path_finds_the_seg_file(tmp_path):
    root = keras_root(tmp_path)
    image = root / "keras_slices_validate" / "case_004_week_0_slice_1.nii.gz"
    assert mask_path(image) == root / "keras_slices_seg_validate" / "seg_004_week_0_slice_1.nii.gz"


def test_mask_path_is_none_without_a_mask(tmp_path):
    root = keras_root(tmp_path)
    (root / "keras_slices_seg_train" / "seg_001_week_0_slice_0.nii.gz").unlink()
    assert mask_path(root / "keras_slices_train" / "case_001_week_0_slice_0.nii.gz") is None
    assert (
        mask_path(write_slices(tmp_path / "flat", [1]) / "case_001_week_0_slice_0.nii.gz") is None
    )
