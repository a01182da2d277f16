"""The integer copy of the VQ-VAE's decoder (what new residual files build on): close to the
float model, the same integers whatever the batch, thread count or product path, made the same
from the same model and ranges, and a file's ranges checked before use."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import run_main
from hostile_helpers import read_header, with_header

from mrivq.compression.codec import CodecInput
from mrivq.compression.portable import decoder
from mrivq.compression.portable.decoder import IntegerDecoder, calibrate, has_copy, range_names
from mrivq.engine.checkpoint import load_codec
from mrivq.nn.vqvae2 import VQVAE2


@pytest.fixture(scope="module")
def tiny():
    """A small random VQ-VAE-2 (16 channels, 2 blocks) and the codes of 4 random 64x32 slices."""
    torch.manual_seed(0)
    model = VQVAE2(channel=16, n_res_channel=8, embed_dim=8, n_embed=32).eval()
    with torch.no_grad():
        out = model(torch.rand(4, 1, 64, 32))
    return model, out.codes_top, out.codes_bottom


def test_the_copy_decodes_what_the_float_model_decodes_to_a_small_fraction_of_its_range(tiny):
    model, top, bottom = tiny
    pictures = IntegerDecoder(model, calibrate(model, top, bottom)).pictures(top, bottom)
    with torch.no_grad():
        reference = copy.deepcopy(model).double().decode_codes(top, bottom)[:, 0].numpy()
    assert pictures.dtype == np.float64 and pictures.shape == reference.shape
    assert np.abs(pictures - reference).max() < 0.01 * np.abs(reference).max()
    assert not np.array_equal(pictures, reference)  # integers times a unit, not the float decode


def test_the_same_integers_for_any_batch_thread_count_and_product_path(tiny, monkeypatch):
    """One slice at a time or four; 1 or 2 threads; int8 products through torch._int_mm or in
    floating point (CPUs without VNNI): the same pictures to the last bit."""
    model, top, bottom = tiny
    copy_ = IntegerDecoder(model, calibrate(model, top, bottom))
    together = copy_.pictures(top, bottom)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            alone = np.concatenate([copy_.pictures(top[i:i + 1], bottom[i:i + 1]) for i in range(len(top))])
            assert np.array_equal(alone, together)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr("mrivq.compression.portable.passes.int_mm_is_exact", lambda device: False)
    assert np.array_equal(copy_.pictures(top, bottom), together)


def test_a_copy_is_made_the_same_from_the_same_model_and_ranges(tiny):
    model, top, bottom = tiny
    ranges = calibrate(model, top, bottom)
    reloaded = VQVAE2(channel=16, n_res_channel=8, embed_dim=8, n_embed=32).eval()
    reloaded.load_state_dict(model.state_dict())
    assert IntegerDecoder(model, ranges).fingerprint == IntegerDecoder(reloaded, ranges).fingerprint
    other = [ranges[0] * 1.01, *ranges[1:]]
    assert IntegerDecoder(model, other).fingerprint != IntegerDecoder(model, ranges).fingerprint
    assert len(ranges) == len(range_names(model)) == 2 + 2 * 2 + 3  # two blocks


@pytest.mark.parametrize("ranges", [[1.0] * 3, [0.0] * 9, [math.inf] * 9, [math.nan] * 9, [2.0 ** 50] * 9,
                                    [2.0 ** 40] + [2.0 ** -40] * 8])
def test_ranges_that_do_not_fit_the_model_or_the_arithmetic_are_refused(tiny, ranges):
    with pytest.raises(ValueError, match="ranges"):
        IntegerDecoder(tiny[0], ranges)


def test_models_with_groupnorm_blocks_have_no_copy():
    assert has_copy(VQVAE2(channel=16, n_res_channel=8, embed_dim=8, n_embed=32))
    assert not has_copy(VQVAE2(channel=16, n_res_channel=8, embed_dim=8, n_embed=32, block="norm"))


def test_a_file_whose_copy_this_model_would_not_make_is_refused_in_one_line(work, tiny_phantom, tmp_path, capsys,
                                                                            one_thread):
    """Ranges edited in the header: the copy they make is not the one the file names (its
    fingerprint), or cannot be made at all; either way decode refuses the file, leaving nothing."""
    codec = load_codec(work["vqvae"])
    files = sorted((tiny_phantom / "keras_slices_test").glob("*.nii.gz"))[:2]
    packed = codec.compress(CodecInput.read(files, codec.prep, originals=True), layers=("residual",),
                            layer_options={"residual": {"max_error": 0}})
    header = read_header(packed.blob)
    assert header["picture"]["arithmetic"] == decoder.FORMAT
    for ranges, message in (([r * 1.01 for r in header["picture"]["ranges"]], "another integer copy"),
                            ([1e30] * len(header["picture"]["ranges"]), "picture ranges")):
        path = tmp_path / "edited.mrvq"
        path.write_bytes(with_header(packed.blob, {**header, "picture": {**header["picture"], "ranges": ranges}}))
        capsys.readouterr()
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not list((tmp_path / "out").glob("*.nii.gz"))
    # the same file decodes to the codes' picture alone (no copy needed)
    path = tmp_path / "codes_only.mrvq"
    path.write_bytes(packed.blob)
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(path), "--out", str(tmp_path / "pictures"),
                     "--codes-only"]) == 0
