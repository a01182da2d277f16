"""data.preprocess: fitting slices to one shape, normalising them, and undoing it."""

import warnings

import numpy as np
import pytest

from mrivq.data.preprocess import (
    Preprocessing,
    denormalize,
    fit_to_shape,
    normalize,
    preprocess_slice,
)


@pytest.fixture
def raw_slice():
    """A (64, 32) slice of scanner-like values: background ~200, tissue up to ~1400."""
    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[:64, :32]
    body = np.exp(-(((rows - 32) / 20.0) ** 2 + ((cols - 16) / 10.0) ** 2))
    return (200 + 1200 * body + rng.normal(0, 5, body.shape)).astype(np.float32)


@pytest.mark.parametrize("policy", ["minmax", "percentile", "zscore"])
def test_normalize_returns_float32_and_offset_scale(raw_slice, policy):
    x, params = normalize(raw_slice, policy)
    assert x.dtype == np.float32 and x.shape == raw_slice.shape
    assert params.dtype == np.float32 and params.shape == (2,)


def test_minmax_maps_to_unit_range(raw_slice):
    x, (offset, scale) = normalize(raw_slice, "minmax")
    assert x.min() == 0.0 and x.max() == pytest.approx(1.0)
    assert offset == pytest.approx(raw_slice.min())
    assert scale == pytest.approx(np.ptp(raw_slice))


def test_percentile_clips_then_maps_to_unit_range(raw_slice):
    raw_slice[0, 0] = 1e5  # one hot pixel must not squash the rest
    x, _ = normalize(raw_slice, "percentile", (1.0, 99.0))
    assert x.min() == 0.0 and x.max() == pytest.approx(1.0)
    assert np.mean(x == 1.0) == pytest.approx(0.01, abs=0.005)
    assert np.median(x) > 0.01


def test_zscore_has_zero_mean_unit_std(raw_slice):
    x, _ = normalize(raw_slice, "zscore")
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x.std()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("policy", ["minmax", "zscore"])
def test_denormalize_inverts_normalize_exactly(raw_slice, policy):
    x, params = normalize(raw_slice, policy)
    np.testing.assert_allclose(denormalize(x, params), raw_slice, rtol=1e-5, atol=1e-3)


def test_denormalize_inverts_percentile_inside_the_clip_range(raw_slice):
    x, params = normalize(raw_slice, "percentile", (0.5, 99.5))
    low, high = np.percentile(raw_slice, (0.5, 99.5))
    inside = (raw_slice >= low) & (raw_slice <= high)
    back = denormalize(x, params)
    np.testing.assert_allclose(back[inside], raw_slice[inside], rtol=1e-5, atol=1e-3)
    assert back.max() == pytest.approx(high, rel=1e-5)


def test_denormalize_a_stack_with_per_slice_params(raw_slice):
    stack = np.stack([raw_slice, raw_slice * 2 + 10])
    xs, params = zip(*(normalize(s, "minmax") for s in stack))
    np.testing.assert_allclose(denormalize(np.stack(xs), np.stack(params)), stack, rtol=1e-5)


@pytest.mark.parametrize("policy", ["minmax", "percentile", "zscore"])
def test_constant_slice_normalises_to_zeros_without_warnings(policy):
    flat = np.full((16, 8), 731.25, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            x, params = normalize(flat, policy)
    assert np.all(x == 0.0)
    assert params[1] == 1.0
    np.testing.assert_array_equal(denormalize(x, params), flat)


def test_pad_crop_keeps_the_centre_columns_of_a_wider_slice():
    wide = np.random.default_rng(2).random((256, 144)).astype(np.float32)
    fitted = fit_to_shape(wide, (256, 128), "pad_crop")
    assert fitted.shape == (256, 128)
    np.testing.assert_array_equal(fitted, wide[:, 8:136])


def test_resize_keeps_the_content_of_a_wider_slice():
    rows, cols = np.mgrid[:256, :144]
    wide = (rows + 2.0 * cols).astype(np.float32)  # a linear ramp survives bilinear resizing
    fitted = fit_to_shape(wide, (256, 128), "resize")
    assert fitted.shape == (256, 128)
    np.testing.assert_allclose(fitted[:, 64], wide[:, 72], atol=1.5)  # centre column stays centre
    assert fitted.min() >= wide.min() and fitted.max() <= wide.max()
    assert np.all(np.diff(fitted, axis=1) > 0)  # no zero-filled slots


def test_resize_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(3).random((20, 12)).astype(np.float32)
    for size in [(16, 8), (32, 20), (20, 7)]:
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(image)[None, None], size=size, mode="bilinear", align_corners=False
        )[0, 0].numpy()
        np.testing.assert_allclose(fit_to_shape(image, size, "resize"), expected, atol=1e-5)


def test_pad_pads_centred_with_the_background_value():
    small = np.arange(1, 13, dtype=np.float32).reshape(4, 3) + 100
    fitted = fit_to_shape(small, (8, 6), "pad_crop")
    assert fitted.shape == (8, 6)
    np.testing.assert_array_equal(fitted[2:6, 1:4], small)
    background = np.ones_like(fitted, dtype=bool)
    background[2:6, 1:4] = False
    assert np.all(fitted[background] == small.min())


def test_pad_one_axis_and_crop_the_other():
    image = np.random.default_rng(4).random((10, 20)).astype(np.float32)
    fitted = fit_to_shape(image, (14, 16), "pad_crop")
    np.testing.assert_array_equal(fitted[2:12], image[:, 2:18])


def test_preprocess_normalises_on_the_original_then_fits(raw_slice):
    wide = np.pad(raw_slice, ((0, 0), (4, 4)), constant_values=0.0)  # the edge holds the minimum
    x, params = preprocess_slice(wide, Preprocessing(image_size=(64, 32)))
    assert x.shape == (64, 32) and x.dtype == np.float32
    assert params[0] == 0.0  # offset from the cropped-away columns: normalised before fitting
    np.testing.assert_allclose(denormalize(x, params), raw_slice, rtol=1e-5, atol=1e-3)


def test_preprocessing_rejects_unknown_policies():
    with pytest.raises(ValueError, match="fit"):
        Preprocessing(fit="stretch")
    with pytest.raises(ValueError, match="normalize"):
        Preprocessing(normalize="max")
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(image_size=(256,))


def test_preprocessing_accepts_a_list_image_size():
    assert Preprocessing(image_size=[64, 32]).image_size == (64, 32)
