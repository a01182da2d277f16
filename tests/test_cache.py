"""data.cache: decode a split once, memory-map it afterwards, rebuild when anything changes."""

import logging
import os

import nibabel as nib
import numpy as np
import pytest

from mrivq.data import cache
from mrivq.data.cache import SliceSet, default_cache_dir, load_split
from mrivq.data.preprocess import Preprocessing, normalize
from mrivq.errors import UserError

PREP = Preprocessing(image_size=(16, 8))


def write_slice(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture
def slices(tmp_path):
    """Five (16, 8) slices with distinct values; the third one is 16×10 and stored 3-D."""
    folder = tmp_path / "keras_slices_train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths, arrays = [], []
    for i in range(5):
        shape = (16, 10, 1) if i == 2 else (16, 8)
        array = (rng.random(shape) * 1000 + 100 * i).astype(np.float32)
        paths.append(write_slice(folder / f"case_{i:03d}_week_0_slice_0.nii.gz", array))
        arrays.append(array.reshape(array.shape[:2]))
    return paths, arrays


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


def entries(cache_dir):
    folder = cache_dir / "slices"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def corrupt(path):
    path.write_text("not an image")
    return path


def test_load_split_gives_normalised_memory_mapped_rows(slices, cache_dir):
    paths, arrays = slices

    loaded = load_split(list(reversed(paths)), PREP, cache_dir=cache_dir, workers=1)

    assert isinstance(loaded, SliceSet)
    assert isinstance(loaded.images, np.memmap) and not loaded.images.flags.writeable
    assert loaded.images.shape == (5, 16, 8) and loaded.images.dtype == np.float32
    assert loaded.norm.shape == (5, 2) and loaded.norm.dtype == np.float32
    assert loaded.files == [str(p) for p in paths]  # sorted, whatever the input order
    assert loaded.original_shapes == [(16, 8), (16, 8), (16, 10), (16, 8), (16, 8)]
    assert loaded.skipped == []
    expected, params = normalize(arrays[0], "minmax")
    np.testing.assert_allclose(loaded.images[0], expected, atol=1e-6)
    np.testing.assert_allclose(loaded.norm[0], params)
    np.testing.assert_allclose(
        loaded.images[2], normalize(arrays[2], "minmax")[0][:, 1:9], atol=1e-6
    )


def test_parallel_decoding_matches_in_process(slices, tmp_path):
    paths, _ = slices
    serial = load_split(paths, PREP, cache_dir=tmp_path / "one", workers=1)
    parallel = load_split(paths, PREP, cache_dir=tmp_path / "two", workers=2, progress=True)
    np.testing.assert_array_equal(parallel.images, serial.images)
    np.testing.assert_array_equal(parallel.norm, serial.norm)
    assert parallel.original_shapes == serial.original_shapes


def test_second_load_reuses_the_cache_without_decoding(slices, cache_dir, monkeypatch):
    paths, _ = slices
    first = load_split(paths, PREP, cache_dir=cache_dir, workers=1)

    def no_decoding(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(cache, "read_slice", no_decoding)
    second = load_split(paths, PREP, cache_dir=cache_dir, workers=1)

    np.testing.assert_array_equal(second.images, first.images)
    assert len(entries(cache_dir)) == 1


def test_changed_file_gives_a_rebuild(slices, cache_dir):
    paths, arrays = slices
    before = np.array(load_split(paths, PREP, cache_dir=cache_dir, workers=1).images[1])
    write_slice(paths[1], arrays[1][::-1].copy())  # same size, different content
    os.utime(paths[1], ns=(1, 1))

    after = load_split(paths, PREP, cache_dir=cache_dir, workers=1).images[1]

    np.testing.assert_allclose(after, before[::-1], atol=1e-6)
    assert len(entries(cache_dir)) == 2


def test_changed_setting_gives_a_rebuild(slices, cache_dir):
    paths, _ = slices
    minmax = load_split(paths, PREP, cache_dir=cache_dir, workers=1)
    zscore = load_split(
        paths, Preprocessing(image_size=(16, 8), normalize="zscore"), cache_dir=cache_dir, workers=1
    )
    assert zscore.images.min() < 0 <= minmax.images.min()
    assert len(entries(cache_dir)) == 2


def test_bad_files_error_lists_them_all_at_once(slices, cache_dir):
    paths, _ = slices
    corrupt(paths[1])
    paths[3].write_bytes(b"")

    with pytest.raises(UserError) as info:
        load_split(paths, PREP, cache_dir=cache_dir, workers=2, name="train")

    message = str(info.value)
    assert message.startswith("2 bad files in split 'train'")
    assert "data.on_bad_file: skip" in message
    assert f"{paths[1].name}: not a NIfTI file" in message
    assert f"{paths[3].name}: empty file (0 bytes)" in message
    assert "\n" not in message
    assert [p for p, _ in info.value.bad_files] == [str(paths[1]), str(paths[3])]


def test_failed_build_leaves_nothing_a_later_load_trusts(slices, cache_dir, monkeypatch):
    paths, _ = slices
    corrupt(paths[4])
    with pytest.raises(UserError):
        load_split(paths, PREP, cache_dir=cache_dir, workers=1)
    assert entries(cache_dir) == []

    # Same files, same settings: must fail again rather than pick up a partial cache.
    with pytest.raises(UserError, match="1 bad file in split"):
        load_split(paths, PREP, cache_dir=cache_dir, workers=1)


def test_interrupted_build_leaves_no_cache(slices, cache_dir, monkeypatch):
    paths, _ = slices
    real_read = cache.read_slice
    calls = []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_read(path)

    monkeypatch.setattr(cache, "read_slice", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_split(paths, PREP, cache_dir=cache_dir, workers=1)
    assert entries(cache_dir) == []

    monkeypatch.setattr(cache, "read_slice", real_read)
    assert len(load_split(paths, PREP, cache_dir=cache_dir, workers=1)) == 5


def test_entry_without_manifest_is_not_trusted(slices, cache_dir):
    paths, _ = slices
    load_split(paths, PREP, cache_dir=cache_dir, workers=1)
    entry = cache_dir / "slices" / entries(cache_dir)[0]
    (entry / "manifest.json").unlink()
    np.save(entry / "images.npy", np.full((5, 16, 8), 9.0, np.float32))

    reloaded = load_split(paths, PREP, cache_dir=cache_dir, workers=1)
    assert reloaded.images.max() <= 1.0


def test_skip_leaves_bad_files_out_and_lists_them(slices, cache_dir, caplog):
    paths, arrays = slices
    corrupt(paths[0])
    corrupt(paths[3])

    with caplog.at_level(logging.WARNING, logger="mrivq.data"):
        loaded = load_split(
            paths, PREP, cache_dir=cache_dir, on_bad_file="skip", workers=2, name="validate"
        )

    assert loaded.files == [str(paths[i]) for i in (1, 2, 4)]
    assert loaded.skipped == [
        (str(paths[0]), "not a NIfTI file"),
        (str(paths[3]), "not a NIfTI file"),
    ]
    assert loaded.images.shape == (3, 16, 8)
    np.testing.assert_allclose(loaded.images[2], normalize(arrays[4], "minmax")[0], atol=1e-6)
    assert "skipped 2 bad file(s) in split 'validate'" in caplog.text

    with pytest.raises(UserError, match="2 bad files in split 'validate'"):
        load_split(
            paths, PREP, cache_dir=cache_dir, on_bad_file="error", workers=1, name="validate"
        )


def test_empty_file_list_is_a_user_error(cache_dir):
    with pytest.raises(UserError, match="split 'test' has no files"):
        load_split([], PREP, cache_dir=cache_dir, name="test")


def test_all_files_bad_with_skip_is_a_user_error(slices, cache_dir):
    paths, _ = slices
    for p in paths:
        corrupt(p)
    with pytest.raises(UserError, match="all 5 files of split 'split' are bad"):
        load_split(paths, PREP, cache_dir=cache_dir, on_bad_file="skip", workers=1)


def test_unknown_on_bad_file_is_refused_by_the_config_naming_the_key_and_by_the_loader(slices, cache_dir):
    from mrivq.config import load_config

    with pytest.raises(UserError, match="data.on_bad_file"):
        load_config(None, ["data.on_bad_file=ignore"])
    with pytest.raises(ValueError, match="on_bad_file"):
        load_split(slices[0], PREP, cache_dir=cache_dir, on_bad_file="ignore")


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MRIVQ_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MRIVQ_CACHE_DIR")
    assert default_cache_dir() == cache.Path.home() / ".cache" / "mrivq"


def test_cache_dir_defaults_to_the_environment(slices, monkeypatch, tmp_path):
    monkeypatch.setenv("MRIVQ_CACHE_DIR", str(tmp_path / "envcache"))
    load_split(slices[0], PREP, workers=1)
    assert len(entries(tmp_path / "envcache")) == 1
