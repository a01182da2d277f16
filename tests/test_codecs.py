"""Standard codecs at the model's bit rate: the budget is kept and the scores are sane; their
rate-distortion curves rise with quality."""

from __future__ import annotations

import numpy as np
import pytest

from mrivq.compression import codecs


@pytest.fixture(scope="module")
def phantom_slices(tiny_phantom):
    from mrivq.data.io import read_slice
    from mrivq.data.preprocess import Preprocessing, preprocess_slice
    from mrivq.data.splits import resolve_splits

    prep = Preprocessing(image_size=(64, 32))
    return np.stack([preprocess_slice(read_slice(f)[0], prep)[0] for f in resolve_splits(tiny_phantom).test])


def test_jpeg_is_always_available():
    assert "jpeg" in codecs.available_codecs()


@pytest.mark.parametrize("codec", codecs.available_codecs())
def test_codec_stays_within_the_bit_budget_and_uses_most_of_it(phantom_slices, codec):
    slice2d = phantom_slices[0]
    # A budget every codec can meet on a 64x32 slice (headers are a few hundred bits).
    target = 3.0
    decoded, rate, _ = codecs.compress_at_rate(slice2d, codec, target)
    assert decoded.shape == slice2d.shape and decoded.dtype == np.float32
    assert rate <= target
    assert rate > 0.6 * target  # the search took the best quality that fits, not the lowest
    assert np.abs(decoded - slice2d).mean() < 0.05


def test_more_bits_give_a_better_slice(phantom_slices):
    low = codecs.compare_codecs(phantom_slices, 1.5, ["jpeg"])["jpeg"]
    high = codecs.compare_codecs(phantom_slices, 4.0, ["jpeg"])["jpeg"]
    assert low["bits_per_pixel"]["max"] <= 1.5 and high["bits_per_pixel"]["max"] <= 4.0
    assert 0 < low["ssim"]["mean"] < high["ssim"]["mean"] <= 1
    assert 10 < low["psnr"]["mean"] < high["psnr"]["mean"] < 60
    assert len(high["per_slice"]["ssim"]) == len(phantom_slices)


def test_an_unreachable_budget_uses_the_lowest_quality_and_says_so(phantom_slices):
    _, rate, setting = codecs.compress_at_rate(phantom_slices[0], "jpeg", 0.01)
    assert setting == 1 and rate > 0.01


def test_rate_distortion_rises_in_rate_and_ssim_with_jpeg_quality(phantom_slices):
    points = codecs.rate_distortion(phantom_slices[:3], ["jpeg"])["jpeg"]
    assert [p["setting"] for p in points] == list(codecs.RATE_DISTORTION_SETTINGS["jpeg"])
    rates, ssims = [p["bits_per_pixel"] for p in points], [p["ssim"] for p in points]
    assert (np.diff(rates) > 0).all()
    assert (np.diff(ssims) > 0).all() and 0 < ssims[0] and ssims[-1] <= 1


def test_a_rate_distortion_point_is_the_mean_file_size_of_one_encode_per_slice(phantom_slices):
    slices = phantom_slices[:2]
    (point,) = codecs.rate_distortion(slices, ["jpeg"], {"jpeg": (50,)})["jpeg"]
    sizes = [len(codecs.encode(codecs.to_8bit(s), "jpeg", 50)) for s in slices]
    assert point["bits_per_pixel"] == pytest.approx(np.mean(sizes) * 8 / slices[0].size)
    assert 10 < point["psnr"] < 60


def test_the_strongest_still_image_codecs_are_in_the_comparison():
    assert {"jpeg", "jpeg2000", "webp", "avif", "jpegxl", "htj2k"} <= set(codecs.available_codecs())


@pytest.mark.parametrize("codec", codecs.available_codecs())
def test_each_codecs_curve_spends_more_bits_for_a_better_slice(phantom_slices, codec):
    points = codecs.rate_distortion(phantom_slices[:2], [codec])[codec]
    rates, ssims = [p["bits_per_pixel"] for p in points], [p["ssim"] for p in points]
    assert (np.diff(rates) >= 0).all() and rates[-1] > 2 * rates[0]
    assert ssims[-1] > ssims[0] and ssims[-1] <= 1
