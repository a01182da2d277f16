"""Region metrics: SSIM, PSNR and MAE inside a labelled structure, and fitting masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mrivq import metrics
from mrivq.data.hipmri import STRUCTURES, fit_mask, load_masks


def _slice_with_prostate(seed: int = 0):
    """A textured (1, 1, 64, 32) slice in [0, 1] and a mask with a prostate block (label 5)."""
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.uniform(0.2, 0.8, (1, 1, 64, 32)).astype(np.float32))
    mask = torch.zeros(1, 64, 32, dtype=torch.long)
    mask[:, 8:56, 4:28] = 1
    mask[:, 24:40, 10:22] = 5
    return image, mask


def test_identical_images_give_perfect_region_metrics():
    image, mask = _slice_with_prostate()
    scores = metrics.region_metrics(image, image, mask, {"prostate": 5, "body": 1})
    for name in ("prostate", "body"):
        assert scores[name]["ssim"].item() == pytest.approx(1.0, abs=1e-5)
        assert scores[name]["mae"].item() == 0.0
        assert math.isinf(scores[name]["psnr"].item())


def test_a_change_outside_the_prostate_leaves_prostate_metrics_perfect():
    image, mask = _slice_with_prostate()
    changed = image.clone()
    changed[:, :, :8, :] = 0.0  # far from the prostate: more than the SSIM window's reach
    scores = metrics.region_metrics(changed, image, mask, {"prostate": 5, "body": 1})
    assert scores["prostate"]["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    assert scores["prostate"]["mae"].item() == 0.0
    assert math.isinf(scores["prostate"]["psnr"].item())
    # ... while the whole slice sees it, and the body region (which holds rows 8-15) does too.
    assert metrics.ssim_per_image(changed, image).item() < 0.99
    assert metrics.mae_per_image(changed, image).item() > 0.03


def test_region_mae_and_psnr_use_only_the_structure_pixels():
    image, mask = _slice_with_prostate()
    changed = image.clone()
    inside = mask[:, None] == 5
    changed[inside] = (changed[inside] + 0.1).clamp(max=1.0)
    scores = metrics.region_metrics(changed, image, mask, {"prostate": 5})["prostate"]
    error = (changed - image)[inside]
    assert scores["mae"].item() == pytest.approx(error.abs().mean().item(), rel=1e-5)
    assert scores["psnr"].item() == pytest.approx(10 * math.log10(1 / error.pow(2).mean().item()), rel=1e-5)


def test_region_ssim_is_the_ssim_map_averaged_over_the_mask():
    image, mask = _slice_with_prostate()
    noisy = (image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    ssim_map = metrics.ssim_map(noisy, image)
    assert ssim_map.shape == image.shape
    assert ssim_map.mean().item() == pytest.approx(metrics.ssim_per_image(noisy, image).item(), abs=1e-6)
    region = metrics.region_metrics(noisy, image, mask, {"prostate": 5})["prostate"]["ssim"].item()
    assert region == pytest.approx(ssim_map[0, 0][mask[0] == 5].mean().item(), abs=1e-6)


def test_an_absent_structure_is_nan_not_zero():
    image, mask = _slice_with_prostate()
    scores = metrics.region_metrics(image, image, mask, {"bladder": 3})["bladder"]
    assert all(math.isnan(scores[k].item()) for k in ("ssim", "psnr", "mae"))


def test_structures_put_the_prostate_first_with_hipmri_labels():
    assert next(iter(STRUCTURES)) == "prostate"
    assert STRUCTURES["prostate"] == (5,) and STRUCTURES["bladder"] == (3,)
    assert STRUCTURES["foreground"] == (1, 2, 3, 4, 5)


def test_masks_are_fitted_like_their_slices_and_stay_labels():
    mask = np.zeros((256, 144), dtype=np.uint8)
    mask[100:140, 60:90] = 5
    cropped = fit_mask(mask, (256, 128), "pad_crop")
    assert cropped.shape == (256, 128) and cropped[120, 75 - 8] == 5 and set(np.unique(cropped)) == {0, 5}
    resized = fit_mask(mask, (64, 32), "resize")
    assert resized.shape == (64, 32) and set(np.unique(resized)) == {0, 5}


def test_phantom_masks_are_found_for_the_test_slices(tiny_phantom):
    from mrivq.data.io import read_slice
    from mrivq.data.preprocess import Preprocessing
    from mrivq.data.splits import resolve_splits

    files = resolve_splits(tiny_phantom).test
    shapes = [read_slice(f)[0].shape for f in files]
    masks, present = load_masks(files, shapes, Preprocessing(image_size=(64, 32)))
    assert present.all() and masks.shape == (len(files), 64, 32)
    assert set(np.unique(masks)) <= {0, 1, 2, 3, 4, 5} and (masks == 1).any()
