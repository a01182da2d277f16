"""The synthetic pelvis phantom writes a HipMRI-layout dataset: names, shapes, labels, splits."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrivq.data import phantom
from mrivq.data.phantom import make_volume, synthesize
from mrivq.errors import UserError

SHAPE = (64, 32)
WIDE = (64, 36)  # round(32 * 144 / 128)
SLICES = 5
IMAGE_NAME = re.compile(r"case_(\d{3})_week_(\d+)_slice_(\d+)\.nii\.gz")
SPLITS = ("train", "validate", "test")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Four cases of five 64x32 slices, with a montage; returns (root, summary)."""
    root = tmp_path_factory.mktemp("phantom") / "hipmri"
    summary = synthesize(root, cases=4, seed=0, slices_per_volume=SLICES, shape=SHAPE)
    return root, summary


def volumes_in(folder: Path) -> dict[tuple[str, str], list[int]]:
    """``{(case, week): [slice indices]}`` from the image file names in a folder."""
    volumes: dict[tuple[str, str], list[int]] = {}
    for path in folder.iterdir():
        match = IMAGE_NAME.fullmatch(path.name)
        assert match, f"unexpected file {path.name}"
        volumes.setdefault(match.group(1, 2), []).append(int(match.group(3)))
    return volumes


def test_writes_the_hipmri_folders_and_file_names(tiny_set):
    root, summary = tiny_set
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [f"keras_slices_{s}" for s in SPLITS] + [f"keras_slices_seg_{s}" for s in SPLITS]
        + ["montage.png"])
    for split in SPLITS:
        volumes = volumes_in(root / f"keras_slices_{split}")
        assert all(sorted(s) == list(range(SLICES)) for s in volumes.values())
        assert summary[split]["slices"] == SLICES * len(volumes) > 0
        assert summary[split]["cases"] == len({case for case, _ in volumes})
        images = sorted(p.name for p in (root / f"keras_slices_{split}").iterdir())
        masks = sorted(p.name for p in (root / f"keras_slices_seg_{split}").iterdir())
        assert masks == [name.replace("case_", "seg_", 1) for name in images]
    assert summary["out_dir"] == str(root)
    assert Path(summary["montage"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(root.parent.glob(".*partial*"))


def test_files_load_with_hipmri_shapes_dtypes_and_affines(tiny_set):
    root, _ = tiny_set
    shapes_per_volume: dict[tuple[str, str], set] = {}
    for split in SPLITS:
        for path in (root / f"keras_slices_{split}").iterdir():
            image = nib.load(path)
            mask = nib.load(str(path).replace("keras_slices_", "keras_slices_seg_").replace(
                "/case_", "/seg_"))
            assert image.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
            assert image.shape == mask.shape
            case, week, slice_index = IMAGE_NAME.fullmatch(path.name).groups()
            shapes_per_volume.setdefault((case, week), set()).add(image.shape)
            assert image.affine[2, 3] == pytest.approx(2.5 * int(slice_index))
            assert abs(image.affine[0, 0]) == pytest.approx(0.9375 * 256 / SHAPE[0])
    assert all(len(shapes) == 1 for shapes in shapes_per_volume.values())
    shapes = {next(iter(s)) for s in shapes_per_volume.values()}
    assert shapes <= {SHAPE, WIDE, SHAPE + (1,), WIDE + (1,)}
    assert any(s[:2] == WIDE for s in shapes), "no wide (256x144-like) volume"
    assert any(len(s) == 3 for s in shapes), "no file with a singleton third axis"


def test_splits_are_by_case(tiny_set):
    root, _ = tiny_set
    cases = {split: {case for case, _ in volumes_in(root / f"keras_slices_{split}")}
             for split in SPLITS}
    assert all(cases.values())
    assert not (cases["train"] & cases["validate"] or cases["train"] & cases["test"]
                or cases["validate"] & cases["test"])


def test_masks_hold_every_hipmri_label():
    _, masks = make_volume(1, n_slices=30, shape=SHAPE)
    assert masks.dtype == np.uint8
    assert sorted(np.unique(masks)) == [0, 1, 2, 3, 4, 5]
    # bladder in the upper half, prostate in the lower half
    lower, upper = masks[:15], masks[15:]
    assert (upper == 3).sum() > 5 * (lower == 3).sum()
    assert (lower == 5).sum() > 5 * (upper == 5).sum()


def test_intensities_are_raw_scanner_values():
    images, masks = make_volume(2, n_slices=20, shape=SHAPE)
    assert images.dtype == np.float32 and images.shape == (20, *SHAPE)
    assert np.array_equal(images, np.rint(images)) and images.min() >= 0
    assert 100 < np.median(images[masks > 0]) < 1000
    assert 800 < images.max() < 5000
    assert np.median(images[masks == 0]) < 60
    # T2 contrast: urine much brighter than the body average
    assert np.median(images[masks == 3]) > 1.3 * np.median(images[masks == 1])


def test_neighbouring_slices_are_much_more_similar_than_distant_ones():
    images, _ = make_volume(3, n_slices=60, shape=SHAPE)
    near = np.mean([np.abs(images[s + 1] - images[s]).mean() for s in range(50)])
    far = np.mean([np.abs(images[s + 30] - images[s]).mean() for s in range(30)])
    assert near < 0.6 * far


def test_same_seed_same_arrays_other_seed_differs(tmp_path):
    first, first_masks = make_volume(5, n_slices=4, shape=SHAPE)
    again, again_masks = make_volume(5, n_slices=4, shape=SHAPE)
    other, _ = make_volume(6, n_slices=4, shape=SHAPE)
    assert first.tobytes() == again.tobytes() and first_masks.tobytes() == again_masks.tobytes()
    assert not np.array_equal(first, other)

    kwargs = {"cases": 3, "slices_per_volume": 2, "shape": SHAPE, "montage": False}
    synthesize(tmp_path / "a", seed=7, **kwargs)
    synthesize(tmp_path / "b", seed=7, **kwargs)
    synthesize(tmp_path / "c", seed=8, **kwargs)
    def written(name):
        return sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*.nii.gz"))

    files = written("a")
    assert files == written("b")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in files)
    assert files != written("c")

def test_hipmri_counts_reproduce_the_study_volumes(tmp_path):
    summary = synthesize(tmp_path / "hipmri", hipmri_counts=True, slices_per_volume=1,
                         shape=(16, 8), montage=False)
    assert [summary[s]["volumes"] for s in SPLITS] == [191, 11, 9]
    assert [summary[s]["slices"] for s in SPLITS] == [191, 11, 9]
    assert summary["train"]["cases"] < 191  # some cases have several weeks
    assert 191 / 20 <= summary["wide_volumes"] <= 211 / 10
    cases = {s: {c for c, _ in volumes_in(tmp_path / "hipmri" / f"keras_slices_{s}")}
             for s in SPLITS}
    assert sum(len(c) for c in cases.values()) == len(set().union(*cases.values()))


def test_refuses_a_non_empty_out_dir_and_accepts_an_empty_one(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        synthesize(tmp_path / "full", cases=3, slices_per_volume=1, shape=SHAPE, montage=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    summary = synthesize(tmp_path / "empty", cases=3, slices_per_volume=1, shape=SHAPE,
                         montage=False)
    assert summary["train"]["slices"] == 1


def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def fail_on_second_volume(job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(job)

    real_write = phantom._write_volume
    monkeypatch.setattr(phantom, "_write_volume", fail_on_second_volume)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "set", cases=3, slices_per_volume=1, shape=SHAPE, montage=False)
    assert list(tmp_path.iterdir()) == []
