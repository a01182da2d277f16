"""Training-only augmentation: per-slice flips and intensity factors from the global torch RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrivq.config import validate
from mrivq.data.augment import augment, prior_training_copies


def phantom_batch(n: int = 6) -> torch.Tensor:
    """``(n, 1, 32, 24)`` channels-last slices, no two equal and none symmetric."""
    torch.manual_seed(123)
    return torch.rand(n, 1, 32, 24).contiguous(memory_format=torch.channels_last)


def test_flips_off_and_intensity_zero_leave_the_batch_unchanged():
    slices = phantom_batch()
    assert torch.equal(augment(slices, flip="none", intensity=0.0), slices)
    defaults = validate({}).data
    assert torch.equal(augment(slices, flip=defaults.augment_flip, intensity=defaults.augment_intensity), slices)


def test_horizontal_flips_flip_exactly_the_slices_the_rng_picked():
    slices = phantom_batch()
    torch.manual_seed(5)
    chosen = torch.rand(len(slices)) < 0.5
    assert 0 < chosen.sum() < len(slices)  # the seed picks some slices and leaves others
    torch.manual_seed(5)
    out = augment(slices, flip="horizontal")
    for i, flipped in enumerate(chosen):
        expected = torch.flip(slices[i], dims=[-2]) if flipped else slices[i]  # along H: left-right on screen
        assert torch.equal(out[i], expected), i


def test_both_flips_add_independent_up_down_flips():
    slices = phantom_batch()
    torch.manual_seed(7)
    left_right, up_down = torch.rand(len(slices)) < 0.5, torch.rand(len(slices)) < 0.5
    torch.manual_seed(7)
    out = augment(slices, flip="both")
    for i in range(len(slices)):
        dims = [d for d, on in ((-2, left_right[i]), (-1, up_down[i])) if on]
        assert torch.equal(out[i], torch.flip(slices[i], dims=dims) if dims else slices[i]), i


def test_intensity_factors_are_per_slice_and_within_the_range():
    slices = phantom_batch(64) + 0.1  # no zero pixels: every ratio is the factor
    out = augment(slices, intensity=0.1)
    factors = (out / slices).flatten(1)
    assert torch.allclose(factors, factors[:, :1].expand_as(factors))  # one factor per slice
    assert factors.min() >= 0.9 - 1e-6 and factors.max() <= 1.1 + 1e-6
    assert factors[:, 0].std() > 0.03  # spread over the range, not one value


def test_the_same_seed_gives_the_same_batch_and_the_input_is_not_modified():
    slices = phantom_batch()
    before = slices.clone()
    torch.manual_seed(0)
    first = augment(slices, flip="both", intensity=0.2)
    torch.manual_seed(0)
    second = augment(slices, flip="both", intensity=0.2)
    assert torch.equal(first, second)
    assert not torch.equal(first, slices)
    assert torch.equal(slices, before)


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_layout_and_dtype_are_kept(channels):
    slices = torch.rand(4, channels, 16, 8).contiguous(memory_format=torch.channels_last)
    out = augment(slices, flip="both", intensity=0.1)
    assert out.stride() == slices.stride() and out.dtype == slices.dtype


@pytest.mark.parametrize(("flip", "intensity"), [("vertical", 0.0), ("none", 1.0), ("none", -0.1)])
def test_bad_settings_are_rejected(flip, intensity):
    with pytest.raises(ValueError):
        augment(phantom_batch(), flip=flip, intensity=intensity)


def test_prior_training_copies_mirror_shift_and_zoom_without_wrapping_around():
    images = np.random.default_rng(0).random((3, 10, 6)).astype(np.float32)
    assert prior_training_copies(images) == {}
    copies = prior_training_copies(images, flip="horizontal", shifts=[2], scales=[1.5])
    moves = ["shifted-up-2px", "shifted-down-2px", "shifted-left-2px", "shifted-right-2px", "scaled-1.5x"]
    assert list(copies) == moves + ["mirrored"] + [f"mirrored-{move}" for move in moves]
    assert all(copy.shape == images.shape for copy in copies.values())
    # Directions as the pictures show a slice (its transpose): H runs left to right, W top to bottom.
    # Mirrored left-right: along H, so a HipMRI patient's sides swap and the front stays in front.
    assert np.array_equal(copies["mirrored"], images[:, ::-1])
    left, right = np.asarray(copies["shifted-left-2px"]), np.asarray(copies["shifted-right-2px"])
    assert np.array_equal(left[:, :8], images[:, 2:]) and np.array_equal(left[:, 8:], images[:, [9, 9]])
    assert np.array_equal(right[:, 2:], images[:, :8]) and np.array_equal(right[:, :2], images[:, [0, 0]])
    up, down = np.asarray(copies["shifted-up-2px"]), np.asarray(copies["shifted-down-2px"])
    assert np.array_equal(copies["shifted-up-2px"][1:3], up[1:3])  # batch by batch, the same
    assert np.array_equal(up[:, :, :4], images[:, :, 2:]) and np.array_equal(up[:, :, 4:], images[:, :, [5, 5]])
    assert np.array_equal(down[:, :, 2:], images[:, :, :4]) and np.array_equal(down[:, :, :2], images[:, :, [0, 0]])
    # mirrored, then moved: the mirror image of the slices moved the other way
    assert np.array_equal(np.asarray(copies["mirrored-shifted-left-2px"]), right[:, ::-1])
    # each copy's cache tag names its transform, so codes cached by another transform are never read
    tags = [copy.tag for copy in copies.values()]
    assert len(set(tags)) == len(tags) and copies["mirrored-shifted-left-2px"].tag == "mirrorH_dy-2"
    # zoomed about the centre: a bright centre grows, the corners come from nearer the middle
    square = np.zeros((1, 12, 12), np.float32)
    square[:, 4:8, 4:8] = 1
    zoomed = np.asarray(prior_training_copies(square, scales=[1.5])["scaled-1.5x"])
    assert zoomed.shape == (1, 12, 12) and zoomed.sum() > 1.5 * square.sum()
    assert np.allclose(zoomed, zoomed[:, ::-1]) and np.allclose(zoomed, zoomed[:, :, ::-1])  # still centred
    shrunk = np.asarray(prior_training_copies(square, scales=[0.5])["scaled-0.5x"])
    assert shrunk.sum() < 0.5 * square.sum() and shrunk.min() >= 0
    with pytest.raises(ValueError, match="shift"):
        prior_training_copies(images, shifts=[6])
    with pytest.raises(ValueError, match="scale"):
        prior_training_copies(images, scales=[1])
    with pytest.raises(ValueError, match="flip"):
        prior_training_copies(images, flip="both")


def test_train_crop_cuts_one_window_at_the_place_the_rng_picked():
    slices = phantom_batch()
    torch.manual_seed(11)
    top, left = int(torch.randint(32 - 16 + 1, ())), int(torch.randint(24 - 8 + 1, ()))
    torch.manual_seed(11)
    out = augment(slices, crop=(16, 8))
    assert out.shape == (6, 1, 16, 8)
    assert torch.equal(out, slices[..., top:top + 16, left:left + 8])
    with pytest.raises(ValueError, match="does not fit"):
        augment(slices, crop=(40, 8))


def test_the_default_window_is_128_square_with_shorter_sides_taken_whole():
    """``train_crop: auto`` (the default): 128 x 128 windows of HipMRI's 256 x 128 slices, a side
    shorter than 128 whole, whole slices where both are; a stored config from before the key
    existed trains on whole slices, as it did."""
    from mrivq.compat import stored_config

    assert validate({}).data.train_crop == "auto" and validate({}).data.crop == (128, 128)
    sizes = {(256, 256): (128, 128), (96, 200): (96, 128), (64, 32): None, (128, 128): None}
    for size, window in sizes.items():
        assert validate({"data": {"image_size": list(size)}}).data.crop == window
    assert validate({"data": {"train_crop": [64, 64]}}).data.crop == (64, 64)
    assert validate({"data": {"train_crop": None}}).data.crop is None
    assert validate(stored_config({"data": {"image_size": [256, 128]}})).data.crop is None


def test_train_crop_must_be_multiples_of_8_within_the_image_size():
    assert validate({"data": {"train_crop": [128, 64]}}).data.train_crop == (128, 64)
    for bad in ([12, 64], [512, 64]):
        with pytest.raises(Exception, match="train_crop"):
            validate({"data": {"train_crop": bad}})
