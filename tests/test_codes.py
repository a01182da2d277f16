"""Codes: encode -> decode gives the model's reconstruction in scanner units; real entropy coding;
bad codes files are one clear error."""

from __future__ import annotations

import copy
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_main
from prior_helpers import train_tiny_vqvae

from mrivq.apps.decode import decode
from mrivq.apps.encode import encode
from mrivq.compression import driver
from mrivq.compression.entropy import (
    bits_per_pixel_map,
    code_count_table,
    decode_with_frequencies,
    encode_with_frequencies,
    ideal_bits,
)
from mrivq.compression.portable.transformer import transformer_copy
from mrivq.data.io import read_slice
from mrivq.data.preprocess import Preprocessing, denormalize, fit_to_shape, preprocess_slice, unfit
from mrivq.engine.checkpoint import load_vqvae
from mrivq.nn import TransformerPrior


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
    report = encode(vqvae, inputs, tmp_path / "codes.mrvq")
    written = decode(vqvae, tmp_path / "codes.mrvq", tmp_path / "out")
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


def test_the_printed_rate_is_the_files_own_size(vqvae, tiny_phantom, tmp_path):
    out = tmp_path / "codes.mrvq"
    report = encode(vqvae, [tiny_phantom / "keras_slices_test"], out)
    bpp, n = report["bits_per_pixel"], report["n_slices"]
    assert report["file_bytes"] == out.stat().st_size and report["verified"]
    assert bpp["file"] == pytest.approx(out.stat().st_size * 8 / (n * 64 * 32))
    # TINY_MODEL: 32 codes per level; top 8x4 and bottom 16x8 codes for 64x32 pixels.
    assert bpp["raw"] == pytest.approx((8 * 4 + 16 * 8) * math.log2(32) / (64 * 32))
    assert 0 < report["ideal_bits_per_pixel"] <= bpp["stream"] < bpp["file"]  # the file adds names, affines, tables
    assert sum(report["section_bytes"].values()) < report["file_bytes"]  # plus magic and section headers
    input_bytes = sum(f.stat().st_size for f in (tiny_phantom / "keras_slices_test").glob("*.nii.gz"))
    assert report["input_bytes"] == input_bytes
    assert report["compression_ratio"] == pytest.approx(input_bytes / out.stat().st_size)


def test_frequency_coding_round_trips_and_comes_close_to_the_entropy():
    rng = np.random.default_rng(0)
    probs = np.array([0.7, 0.2, 0.05, 0.05, 0.0])
    top = rng.choice(5, size=(40, 4, 2), p=probs)
    bottom = rng.choice(5, size=(40, 8, 4), p=probs[::-1])
    counts = code_count_table(top, bottom, 5)
    words = encode_with_frequencies(top, bottom, counts)
    decoded_top, decoded_bottom = decode_with_frequencies(words, counts, 40, (4, 2))
    assert np.array_equal(decoded_top, top) and np.array_equal(decoded_bottom, bottom)
    information = ideal_bits(counts)  # the ideal code length of this very message
    assert information <= words.size * 32 <= information * 1.01 + 64


def test_prior_coding_decodes_every_code_back():
    torch.manual_seed(0)
    prior = TransformerPrior(32, (4, 2), d_model=16, n_head=2, n_layer_top=1, n_layer_bottom=1,
                      bottom_window_rows=1).eval()
    top, bottom = prior.sample(5, generator=torch.Generator().manual_seed(1))  # codes the prior finds likely
    top[0, 0, 0] = (top[0, 0, 0] + 7) % 32  # and one it may not
    copy = transformer_copy(prior, top, bottom)
    words = driver.encode(copy, top.numpy(), bottom.numpy(), batch_size=2)
    decoded_top, decoded_bottom = driver.decode(copy, words, 5, batch_size=3)
    assert np.array_equal(decoded_top, top.numpy()) and np.array_equal(decoded_bottom, bottom.numpy())
    # the stream's length is the information the prior gives the codes (the teacher-forced NLL)
    with torch.inference_mode():
        nll_top, nll_bottom = prior.nll_bits(top, bottom)
    information = 5 * (float(nll_top) * 8 + float(nll_bottom) * 32)
    assert 0.95 * information <= words.size * 32 <= information * 1.05 + 5 * 96  # a length word and tail a slice


def test_the_bits_mapped_per_code_add_up_to_the_prior_coded_stream():
    torch.manual_seed(0)
    prior = TransformerPrior(32, (4, 2), d_model=16, n_head=2, n_layer_top=1, n_layer_bottom=1).eval()
    top, bottom = prior.sample(5, generator=torch.Generator().manual_seed(1))
    copy = transformer_copy(prior, top, bottom)
    bits_top, bits_bottom = driver.surprise_bits(copy, top.numpy(), bottom.numpy())
    assert bits_top.shape == (5, 4, 2) and bits_bottom.shape == (5, 8, 4) and (bits_top > 0).all()
    total = float(bits_top.sum() + bits_bottom.sum())
    words = driver.encode(copy, top.numpy(), bottom.numpy())
    assert 0.99 * total <= words.size * 32 <= total * 1.02 + 5 * 96
    maps = bits_per_pixel_map(bits_top, bits_bottom)  # 8x8 pixels per top code, 4x4 per bottom code
    assert maps.shape == (5, 32, 16)
    assert maps.sum(axis=(1, 2)) == pytest.approx(bits_top.sum(axis=(1, 2)) + bits_bottom.sum(axis=(1, 2)), rel=1e-5)
    assert maps[0, :8, :8].min() >= bits_top[0, 0, 0] / 64  # the top code's share covers its block


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
    good = tmp_path / "codes.mrvq"
    encode(vqvae, [tiny_phantom / "keras_slices_test"], good)
    blob = good.read_bytes()
    cases = {"truncated": (blob[:300], "truncated"), "garbage": (b"not a codes file" * 10, "not an mrivq codes file"),
             "old": (b"PK\x03\x04" + bytes(40), "older mrivq"), "version": (blob[:4] + bytes([9]) + blob[5:], "version 9"),
             "flipped": (blob[:-8] + bytes(b ^ 0xFF for b in blob[-8:]), "checksum")}
    out = tmp_path / "out"
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.mrvq"
        path.write_bytes(data)
        one_line_exit_2(["decode", "--checkpoint", str(vqvae), str(path), "--out", str(out)], capsys,
                        str(path), message)
    one_line_exit_2(["decode", "--checkpoint", str(vqvae), str(tmp_path / "missing.mrvq"), "--out", str(out)],
                    capsys, "codes file not found")
    assert not out.exists()


def test_codes_decoded_by_another_model_are_refused(vqvae, tiny_phantom, tmp_path, capsys):
    from mrivq.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(vqvae)  # a fine-tuned decoder with the same codebooks is another model
    ckpt["model"]["dec.blocks.0.weight"] = ckpt["model"]["dec.blocks.0.weight"] + 1.0
    other = tmp_path / "other.pt"
    save_checkpoint(other, {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    encode(vqvae, [tiny_phantom / "keras_slices_test"], tmp_path / "codes.mrvq")
    one_line_exit_2(["decode", "--checkpoint", str(other), str(tmp_path / "codes.mrvq"), "--out",
                     str(tmp_path / "out")], capsys, "encoded with another model")
    assert not (tmp_path / "out").exists()


def test_bad_encode_inputs_are_one_line_exit_2(vqvae, tiny_phantom, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    bad_nifti = tmp_path / "bad.nii.gz"
    bad_nifti.write_bytes(b"\x1f\x8b broken")
    cases = [
        ([str(tmp_path / "nothing.nii.gz")], "does not exist"),
        ([str(text)], "neither a .nii/.nii.gz file nor a DICOM file"),
        ([str(bad_nifti)], "bad.nii.gz"),
        ([str(tiny_phantom / "keras_slices_test"), str(tiny_phantom / "keras_slices_test")], "two inputs are named"),
    ]
    for inputs, message in cases:
        one_line_exit_2(["encode", "--checkpoint", str(vqvae), *inputs, "--out", str(tmp_path / "c.mrvq")],
                        capsys, message)
    one_line_exit_2(["encode", "--checkpoint", str(tmp_path / "none.pt"), str(text), "--out",
                     str(tmp_path / "c.mrvq")], capsys, "checkpoint not found")
    assert not (tmp_path / "c.mrvq").exists()


def test_the_codec_compresses_slices_to_bytes_and_back_as_the_commands_do(vqvae, tiny_phantom, tmp_path):
    """One interface: ``Codec.compress`` of a CodecInput gives the bytes ``mrivq encode`` writes, and
    ``Codec.decompress`` of them the slices ``mrivq decode`` writes; a codec of another model refuses them."""
    from mrivq.compression.codec import Codec, CodecInput
    from mrivq.compression.container import CodesFile
    from mrivq.data.scans import scan_inputs
    from mrivq.engine.checkpoint import load_codec
    from mrivq.errors import UserError

    inputs = [tiny_phantom / "keras_slices_test"]
    encode(vqvae, inputs, tmp_path / "codes.mrvq", device="cpu")
    written = decode(vqvae, tmp_path / "codes.mrvq", tmp_path / "out", device="cpu")
    codec = load_codec(vqvae, device="cpu")
    packed = codec.compress(CodecInput.read(scan_inputs(inputs), codec.prep))
    assert packed.blob == (tmp_path / "codes.mrvq").read_bytes()
    assert packed.report()["bits_per_pixel"]["file"] == len(packed.blob) * 8 / packed.report()["pixels"]
    file = CodesFile.from_bytes(packed.blob)
    slices = dict(codec.decompress(file))
    assert sorted(slices) == list(range(len(written)))
    for i, path in enumerate(written):
        assert np.array_equal(slices[i], nib.load(path).get_fdata(dtype=np.float32))
    other = copy.deepcopy(codec.model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(UserError, match="another model"):
        Codec(other, codec.prep).decompress_codes(file)
