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


@pytest.fixture(scope="module")
def consecutive_slices():
    """Six consecutive 64x32 slices from the middle of one phantom scan: ``(6, 64, 32)`` in [0, 1]."""
    from mrivq.data.phantom import make_volume
    from mrivq.data.preprocess import Preprocessing, preprocess_slice

    raw, _ = make_volume(0, n_slices=40, shape=(64, 32))
    prep = Preprocessing(image_size=(64, 32))
    return np.stack([preprocess_slice(slice2d, prep)[0] for slice2d in raw[17:23]])


def test_avif_sequences_are_available():
    assert codecs.sequence_available()


def test_an_avif_sequence_decodes_to_every_slice_it_was_given(consecutive_slices):
    slices8 = codecs.to_8bit(consecutive_slices)
    decoded = codecs.decode_sequence(codecs.encode_sequence(slices8, 60))
    assert decoded.shape == consecutive_slices.shape and decoded.dtype == np.float32
    # every frame is its own slice, not the first one again
    assert np.abs(decoded - consecutive_slices).mean(axis=(1, 2)).max() < 0.05
    assert codecs.decode_sequence(codecs.encode_sequence(slices8[:1], 60)).shape == (1, 64, 32)


def test_an_avif_sequence_predicts_a_slice_from_the_slices_before_it(consecutive_slices):
    # Four copies of a slice against the slice flipped four ways: coded frame by frame the two
    # stacks cost the same; with inter prediction the copies cost far less.
    slice8 = codecs.to_8bit(consecutive_slices[2])
    copies = np.stack([slice8] * 4)
    flips = np.stack([slice8, slice8[::-1], slice8[:, ::-1], slice8[::-1, ::-1]])
    assert len(codecs.encode_sequence(copies, 60)) < 0.75 * len(codecs.encode_sequence(flips, 60))


def test_an_avif_sequence_stays_within_its_byte_budget_and_scores_every_slice(consecutive_slices):
    budget = 2.0 * consecutive_slices.size / 8  # bytes: 2 bits per pixel
    sequence = codecs.compare_sequences([consecutive_slices], budget)[codecs.SEQUENCE_CODEC]
    assert budget * 0.8 < sequence["bytes"]["total"] <= budget  # the best quality that fits, not the lowest
    total_bits = sequence["bytes"]["total"] * 8
    assert sequence["bits_per_pixel"]["mean"] == pytest.approx(total_bits / consecutive_slices.size)
    assert sequence["setting"]["name"] == "quality" and 0 < sequence["setting"]["median"] < 100
    assert len(sequence["per_slice"]["ssim"]) == len(consecutive_slices)
    assert all(0.8 < ssim <= 1 for ssim in sequence["per_slice"]["ssim"])


def test_a_total_byte_budget_is_shared_in_proportion_to_the_slices(consecutive_slices):
    volumes = [consecutive_slices[:2], consecutive_slices[2:]]
    budget = 4.0 * consecutive_slices.size / 8  # a sequence file's headers alone are ~1 kB
    sequence = codecs.compare_sequences(volumes, budget)[codecs.SEQUENCE_CODEC]
    assert sequence["per_volume"]["budget"] == pytest.approx([budget / 3, 2 * budget / 3])  # 2 and 4 slices
    per_volume = sequence["per_volume"]
    assert all(size <= share for size, share in zip(per_volume["bytes"], per_volume["budget"]))
    assert len(sequence["per_slice"]["ssim"]) == len(consecutive_slices)
    given = codecs.compare_sequences(volumes, [2000, 3000])[codecs.SEQUENCE_CODEC]
    assert given["per_volume"]["budget"] == [2000, 3000] and given["bytes"]["total"] <= 5000
    with pytest.raises(ValueError, match="3 byte budgets for 2 volumes"):
        codecs.compare_sequences(volumes, [1000, 1000, 1000])


def test_an_avif_sequence_beats_per_slice_avif_at_the_same_bytes_on_consecutive_slices(consecutive_slices):
    # At 64x32 part of the gain is one file's headers (~1 kB) instead of six (~300 bytes each);
    # the copies-against-flips test isolates the inter prediction.
    per_slice = codecs.compare_codecs(consecutive_slices, 2.0, ["avif"])["avif"]
    sequence = codecs.compare_sequences([consecutive_slices], 2.0 * consecutive_slices.size / 8)
    assert sequence[codecs.SEQUENCE_CODEC]["ssim"]["mean"] > per_slice["ssim"]["mean"] + 0.05


def test_an_unreachable_byte_budget_codes_the_sequence_at_the_lowest_quality_and_says_so(consecutive_slices):
    decoded, size, quality = codecs.compress_sequence_at_size(consecutive_slices, 100)
    assert quality == 0 and size > 100 and decoded.shape == consecutive_slices.shape


def _plain_bisection(sizes: list[int], budget: float) -> int:
    """The first index whose size fits, by the textbook bisection (the last when none does)."""
    lo, hi, best = 0, len(sizes) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if sizes[mid] <= budget:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    return len(sizes) - 1 if best is None else best


def test_a_search_from_a_guess_or_known_files_finds_what_bisection_finds_with_fewer_encodes():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 130))
        sizes = sorted(rng.integers(10, 5000, n).tolist(), reverse=True)  # falling along the settings
        budget = float(rng.integers(0, 5200))
        writes = []

        def write(i, writes=writes, sizes=sizes):
            writes.append(i)
            return b"x" * sizes[i]
        known = {}
        answer = _plain_bisection(sizes, budget)
        slope = [None, None, -0.01, -2.0][trial % 4]  # none, or a slope too shallow or too steep
        data, setting = codecs.best_setting_within(write, tuple(range(n)), budget, known=known, slope=slope,
                                                   guess=int(rng.integers(0, n)) if trial % 2 else None)
        assert setting == answer and len(data) == sizes[answer]
        again, before = float(rng.integers(0, 5200)), len(writes)  # another budget, from what is known
        _, setting = codecs.best_setting_within(write, tuple(range(n)), again, known=known)
        assert setting == _plain_bisection(sizes, again)
        assert len(writes) == len(set(writes)) and len(writes) - before <= max(1, int(np.ceil(np.log2(n + 1))) + 2)
    writes.clear()  # a guess two settings off: a handful of encodes, not log2(125) = 7
    sizes = list(range(2000, 1000, -8))  # 125 settings
    codecs.best_setting_within(lambda i: (writes.append(i), b"x" * sizes[i])[1], tuple(range(125)), 1500.5, guess=61)
    assert len(writes) <= 4, writes


def test_a_smooth_size_curve_is_searched_in_a_few_encodes_from_another_slices_slope():
    sizes = [int(4000 * np.exp(-0.03 * i)) for i in range(128)]  # log size falling along the settings
    writes = []
    _, setting = codecs.best_setting_within(lambda i: (writes.append(i), b"x" * sizes[i])[1], tuple(range(128)), 1500.0, guess=20,
                                            slope=codecs.size_slope({i: b"x" * sizes[i] for i in (10, 40)}))
    assert setting == _plain_bisection(sizes, 1500.0) and len(writes) <= 3, writes


def test_comparing_at_a_second_rate_from_what_the_first_found_gives_what_a_fresh_comparison_gives(phantom_slices):
    images = phantom_slices[:6]
    known = {}
    codecs.compare_codecs(images, 0.9, ["jpeg", "webp"], known=known)
    again = codecs.compare_codecs(images, 0.5, ["jpeg", "webp"], known=known)
    fresh = codecs.compare_codecs(images, 0.5, ["jpeg", "webp"])
    for codec in ("jpeg", "webp"):
        assert again[codec]["per_slice"] == fresh[codec]["per_slice"]
        assert again[codec]["bits_per_pixel"] == fresh[codec]["bits_per_pixel"]
    assert len(known[("jpeg", "answers")]) == len(images)


def test_a_slices_lossy_searches_start_from_a_like_slices_answers_and_find_the_same(consecutive_slices, monkeypatch):
    stored = [np.round(s * 900).astype(np.int64) for s in consecutive_slices[:3]]  # stored integers, 10 bits
    rate = 3.0  # bits per voxel
    first = {}
    codecs.lossy_at_rate(stored[0], rate, first)
    encodes = []  # WebP and JPEG XL encodes
    encode, jxl = codecs.encode, codecs.imagecodecs.jpegxl_encode
    monkeypatch.setattr(codecs, "encode", lambda *a: encodes.append(1) or encode(*a))
    monkeypatch.setattr(codecs.imagecodecs, "jpegxl_encode", lambda *a, **k: encodes.append(1) or jxl(*a, **k))
    alone = [codecs.lossy_at_rate(values, rate, {}) for values in stored[1:]]
    searched_alone = len(encodes)
    liked = [codecs.lossy_at_rate(values, rate, {}, like=first) for values in stored[1:]]
    assert len(encodes) - searched_alone < searched_alone  # fewer from the like slice's answer
    for a, b in zip(alone, liked):
        assert a.keys() == b.keys() == {"JPEG XL", "AVIF", "WebP"}
        assert all(a[name][1] == b[name][1] and np.array_equal(a[name][0], b[name][0]) for name in a)
