"""`mrivq reconstruct`: NIfTI slices and volumes in, reconstructions that overlay them out."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, run_main

from mrivq.apps.reconstruct import reconstruct


def _save_tiny_model(path, half_grey: bool = False):
    """An untrained tiny model as a checkpoint (reconstruct needs only the format). With
    ``half_grey`` its last layer outputs 0.5 everywhere, so the scanner scale is known exactly."""
    from mrivq.config import load_config
    from mrivq.engine.checkpoint import save_checkpoint
    from mrivq.nn import VQVAE2

    config = load_config(None, ["data.image_size=[64,32]", *(f"model.{k}={v}" for k, v in TINY_MODEL.items())])
    torch.manual_seed(0)
    model = VQVAE2(**config.model.model_dump())
    if half_grey:
        last = [m for m in model.dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.constant_(last.bias, 0.5)
    save_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict(), "step": 0})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def half_grey(tmp_path_factory):
    return _save_tiny_model(tmp_path_factory.mktemp("ckpt") / "half_grey.pt", half_grey=True)


@pytest.fixture(scope="module")
def test_slices(tiny_phantom):
    return sorted((tiny_phantom / "keras_slices_test").glob("case_*.nii.gz"))


def _write(path, data, affine, dtype=np.float32, slope=None):
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        image.header.set_slope_inter(slope, 10.0)
    nib.save(image, str(path))
    return path


def _affine():
    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    affine[:3, 3] = [-30.0, 12.5, 40.0]
    return affine


def test_a_2d_slice_comes_back_with_its_affine_header_shape_and_scale(half_grey, test_slices, tmp_path):
    source = test_slices[0]
    original = nib.load(source)
    out = tmp_path / "out"
    [item] = reconstruct(half_grey, [source], out)
    stem = source.name[: -len(".nii.gz")]
    recon, diff = nib.load(out / f"{stem}_recon.nii.gz"), nib.load(out / f"{stem}_diff.nii.gz")
    for image in (recon, diff):
        assert image.shape == original.shape
        np.testing.assert_allclose(image.affine, original.affine)
        assert image.header.get_data_dtype() == original.header.get_data_dtype()
        np.testing.assert_allclose(image.header.get_zooms(), original.header.get_zooms())
        assert image.header.get_xyzt_units() == original.header.get_xyzt_units()
    raw, rec = original.get_fdata(), recon.get_fdata()
    # scanner units: the model's 0.5 is halfway between the slice's own min and max
    np.testing.assert_allclose(rec, raw.min() + 0.5 * np.ptp(raw), rtol=1e-5)
    np.testing.assert_allclose(diff.get_fdata(), rec - raw, atol=1e-3 * np.ptp(raw))
    assert item["slices"] == 1 and item["mae"] == pytest.approx(np.abs(rec - raw).mean(), rel=1e-4)


def test_a_3d_volume_is_reconstructed_slice_by_slice_and_reassembled(checkpoint, test_slices, tmp_path):
    slices = [np.squeeze(nib.load(f).get_fdata()) for f in test_slices[:4]]
    volume = _write(tmp_path / "volume.nii", np.stack(slices, axis=2), _affine())
    out = tmp_path / "out"
    reconstruct(checkpoint, [volume], out)
    recon = nib.load(out / "volume_recon.nii")  # the input's suffix is kept: uncompressed
    assert recon.shape == (64, 32, 4)
    np.testing.assert_allclose(recon.affine, _affine())
    assert recon.header.get_xyzt_units() == ("mm", "sec")
    # slice k of the volume is the reconstruction of slice k alone: nothing shuffled between axes
    single = _write(tmp_path / "single.nii.gz", slices[2], _affine())
    reconstruct(checkpoint, [single], out)
    np.testing.assert_allclose(recon.get_fdata()[:, :, 2], nib.load(out / "single_recon.nii.gz").get_fdata(),
                               rtol=1e-5, atol=1e-3)


def test_integer_input_keeps_its_data_type_and_scanner_scale(half_grey, test_slices, tmp_path):
    raw = np.squeeze(nib.load(test_slices[1]).get_fdata())
    source = _write(tmp_path / "int16.nii.gz", np.rint(raw / 2.0), _affine(), dtype=np.int16, slope=2.0)
    scaled = nib.load(source).get_fdata()  # what a viewer shows: stored * 2 + 10
    reconstruct(half_grey, [source], tmp_path / "out")
    recon = nib.load(tmp_path / "out" / "int16_recon.nii.gz")
    assert recon.header.get_data_dtype() == np.int16
    np.testing.assert_allclose(recon.get_fdata(), scaled.min() + 0.5 * np.ptp(scaled), atol=0.02 * np.ptp(scaled))


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d / "missing.nii.gz", "input not found"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "neither a .nii/.nii.gz file nor a DICOM file"),
    (lambda d: (d / "broken.nii.gz").write_bytes(gzip.compress(b"not a nifti")) and d / "broken.nii.gz",
     "not a NIfTI file"),
    (lambda d: _write(d / "four_d.nii.gz", np.ones((8, 8, 3, 2)), np.eye(4)), "expected a 2-D slice or a 3-D volume"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(checkpoint, test_slices, tmp_path, capsys,
                                                         make_input, message):
    bad = make_input(tmp_path)
    out = tmp_path / "out"
    # a good input first: it must not be written either when a later one is bad
    code = run_main(["reconstruct", "--checkpoint", str(checkpoint), str(test_slices[0]), str(bad),
                     "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_a_missing_checkpoint_is_one_line_exit_2(test_slices, tmp_path, capsys):
    code = run_main(["reconstruct", "--checkpoint", str(tmp_path / "none.pt"), str(test_slices[0]),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoint not found" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
