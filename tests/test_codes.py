"""Codes: encode -> decode gives the model's reconstruction in scanner units; real entropy coding;
bad codes files are one clear error."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_main
from prior_helpers import train_tiny_vqvae

from mrivq.apps.decode import decode
from mrivq.apps.encode import encode
from mrivq.compression.entropy import range_code
from mrivq.data.io import read_slice
from mrivq.data.preprocess import Preprocessing, denormalize, fit_to_shape, preprocess_slice, unfit
from mrivq.engine.checkpoint import load_vqvae


@pytest.fixture(scope="module")
def vqvae(tiny_phantom, tmp_path_factory):
    return train_tiny_vqvae(tiny_phantom, tmp_path_factory.mktemp("codes"))


def odd_inputs(phantom):
    """The test split plus a wide (64x36) slice and one stored with a singleton third axis."""
    train_files = sorted((phantom / "keras_slices_train").glob("*.nii.gz"))
    wide = next(f for f in train_files if nib.load(f).shape[1] != 32)
    singleton = next(f for f in train_files if len(nib.load(f).shape) == 3)
    return [phantom / "keras_slices_test", wide, singleton]


def test_codes_round_trip_equals_the_models_reconstruction(vqvae, tiny_phantom, tmp_path):
    inputs = odd_inputs(tiny_phantom)
    report = encode(vqvae, inputs, tmp_path / "codes.npz")
    written = decode(vqvae, tmp_path / "codes.npz", tmp_path / "out")
    model, trained = load_vqvae(vqvae)
    prep = Preprocessing.from_settings(trained.data)
    sources = sorted((inputs[0]).glob("*.nii.gz")) + inputs[1:]
    assert [p.name for p in written] == [s.name for s in sources]
    assert report["n_slices"] == len(sources)
    spreads = []
    for source, path in zip(sources, written):
        raw, meta = read_slice(source)
        x, params = preprocess_slice(raw, prep)
        with torch.inference_mode():
            rec = model(torch.from_numpy(x)[None, None]).reconstruction[0, 0].clamp(0, 1).numpy()
        expected = denormalize(unfit(rec, raw.shape, prep.fit), params).reshape(meta.shape)
        image = nib.load(path)
        assert image.shape == meta.shape
        np.testing.assert_allclose(image.affine, meta.affine)
        np.testing.assert_allclose(np.asarray(image.dataobj), expected, rtol=1e-5, atol=1e-3 * params[1])
        spreads.append(expected.std())
    assert min(spreads) > 0  # a real reconstruction, not a constant


def test_bits_report_has_raw_and_range_coded_rates_and_a_ratio(vqvae, tiny_phantom, tmp_path):
    report = encode(vqvae, [tiny_phantom / "keras_slices_test"], tmp_path / "codes.npz")
    bpp = report["bits_per_pixel"]
    # TINY_MODEL: 32 codes per level; top 8x4 and bottom 16x8 codes for 64x32 pixels.
    assert bpp["raw"] == pytest.approx((8 * 4 + 16 * 8) * math.log2(32) / (64 * 32))
    assert 0 < bpp["entropy_ideal"] <= bpp["entropy_coded"] <= bpp["raw"] + 0.01
    input_bytes = sum(f.stat().st_size for f in (tiny_phantom / "keras_slices_test").glob("*.nii.gz"))
    assert report["input_bytes"] == input_bytes
    assert report["compression_ratio"] == pytest.approx(input_bytes / report["coded_bytes"])


def test_range_coding_is_lossless_and_close_to_the_entropy():
    rng = np.random.default_rng(0)
    probs = np.array([0.7, 0.2, 0.05, 0.05, 0.0])
    symbols = rng.choice(5, size=4000, p=probs)
    words = range_code(symbols, probs)  # decodes and compares inside
    information = -np.log2(probs[symbols]).sum()  # the ideal code length of this very message
    assert information <= words.size * 32 <= information * 1.01 + 64


@pytest.mark.parametrize("size, policy", [((64, 36), "pad_crop"), ((60, 30), "pad_crop"), ((70, 40), "resize")])
def test_unfit_undoes_fit_to_shape(size, policy):
    original = np.random.default_rng(1).random(size).astype(np.float32)
    back = unfit(fit_to_shape(original, (64, 32), policy), size, policy)
    assert back.shape == size
    if policy == "pad_crop":
        kept = tuple(slice((s - min(s, t)) // 2, (s - min(s, t)) // 2 + min(s, t)) for s, t in zip(size, (64, 32)))
        np.testing.assert_array_equal(back[kept], original[kept])
    else:
        assert np.abs(back - original).mean() < 0.25


def one_line_exit_2(args, capsys, *expected):
    capsys.readouterr()
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(e in err[0] for e in expected), err
    assert "Traceback" not in err[0]


def test_corrupt_or_foreign_codes_files_are_one_line_exit_2(vqvae, tiny_phantom, tmp_path, capsys):
    good = tmp_path / "codes.npz"
    encode(vqvae, [tiny_phantom / "keras_slices_test"], good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all" * 10)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with np.load(good) as npz:
        arrays = dict(npz)
    arrays["codes_top"] = arrays["codes_top"][:, :4]
    reshaped = tmp_path / "reshaped.npz"
    np.savez(reshaped, **arrays)
    out = tmp_path / "out"
    for path, message in [(truncated, "not a readable codes file"), (garbage, "not a readable codes file"),
                          (foreign, "not an mrivq codes file"), (reshaped, "inconsistent"),
                          (tmp_path / "missing.npz", "codes file not found")]:
        one_line_exit_2(["decode", "--checkpoint", str(vqvae), str(path), "--out", str(out)], capsys,
                        str(path), message)
    assert not out.exists()


def test_codes_decoded_by_another_model_are_refused(vqvae, tiny_phantom, tmp_path, capsys):
    from mrivq.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(vqvae)
    ckpt["model"]["quantize_bottom.embed"] = ckpt["model"]["quantize_bottom.embed"] + 1.0
    other = tmp_path / "other.pt"
    save_checkpoint(other, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    encode(vqvae, [tiny_phantom / "keras_slices_test"], tmp_path / "codes.npz")
    one_line_exit_2(["decode", "--checkpoint", str(other), str(tmp_path / "codes.npz"), "--out",
                     str(tmp_path / "out")], capsys, "encoded with another model")
    assert not (tmp_path / "out").exists()


def test_bad_encode_inputs_are_one_line_exit_2(vqvae, tiny_phantom, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    bad_nifti = tmp_path / "bad.nii.gz"
    bad_nifti.write_bytes(b"\x1f\x8b broken")
    cases = [
        ([str(tmp_path / "nothing.nii.gz")], "does not exist"),
        ([str(text)], "not a .nii or .nii.gz file"),
        ([str(bad_nifti)], "bad.nii.gz"),
        ([str(tiny_phantom / "keras_slices_test"), str(tiny_phantom / "keras_slices_test")], "two inputs are named"),
    ]
    for inputs, message in cases:
        one_line_exit_2(["encode", "--checkpoint", str(vqvae), *inputs, "--out", str(tmp_path / "c.npz")],
                        capsys, message)
    one_line_exit_2(["encode", "--checkpoint", str(tmp_path / "none.pt"), str(text), "--out",
                     str(tmp_path / "c.npz")], capsys, "checkpoint not found")
    assert not (tmp_path / "c.npz").exists()
