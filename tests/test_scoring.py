"""Scores that mean what they say: [0, 1] under every normalisation, float32, strict JSON."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from mrivq import metrics, strict_json
from mrivq.data.io import read_slice
from mrivq.data.preprocess import normalize
from mrivq.engine.evaluator import evaluate
from mrivq.nn import VQVAE2

POLICIES = ["minmax", "percentile", "zscore"]


def reject_nan(token: str):
    raise ValueError(f"not strict JSON: {token}")


def strict_load(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as jq and JavaScript do."""
    return json.loads(text, parse_constant=reject_nan)


class PerfectVQVAE2(VQVAE2):
    """A tiny VQ-VAE-2 whose reconstruction is its input, exactly."""

    def forward(self, x):
        return super().forward(x)._replace(reconstruction=x.clone())


@pytest.fixture(scope="module")
def phantom_slices(tiny_phantom):
    files = sorted((tiny_phantom / "keras_slices_test").glob("case_*.nii.gz"))[:4]
    return np.stack([read_slice(f)[0] for f in files])  # (4, 64, 32) scanner intensities


@pytest.mark.parametrize("policy", POLICIES)
def test_a_perfect_reconstruction_scores_ssim_one_and_infinite_psnr(phantom_slices, policy):
    x = torch.from_numpy(np.stack([normalize(s, policy)[0] for s in phantom_slices]))[:, None]
    rec, target = metrics.to_unit_range(x, x, policy)
    assert float(target.min()) >= 0.0 and float(target.max()) == pytest.approx(1.0)
    assert torch.allclose(metrics.ssim_per_image(rec, target), torch.ones(len(x)), atol=1e-5)
    assert torch.isinf(metrics.psnr_per_image(rec, target)).all()


@pytest.mark.parametrize("policy", POLICIES)
def test_evaluation_of_a_perfect_model_scores_one_under_every_normalisation(phantom_slices, policy):
    images = np.stack([normalize(s, policy)[0] for s in phantom_slices])
    torch.manual_seed(0)
    model = PerfectVQVAE2(**TINY_MODEL)
    result = evaluate(model, images, batch_size=2, device=torch.device("cpu"), normalize=policy, keep=[0])
    assert torch.allclose(result.ssim, torch.ones(len(images)), atol=1e-5)
    assert torch.isinf(result.psnr).all() and float(result.mae.max()) == 0.0
    picture_in, picture_out = result.kept[0]
    assert picture_in.min() >= 0.0 and picture_in.max() == pytest.approx(1.0)
    assert np.array_equal(picture_in, picture_out)


def test_the_same_error_scores_the_same_under_minmax_and_zscore(phantom_slices):
    """z-scoring is an affine map of min-max: mapped back to [0, 1], the scores must agree."""
    raw = phantom_slices.astype(np.float64)
    noise = np.random.default_rng(0).normal(0, 0.03, raw.shape)
    scores = {}
    for policy in ("minmax", "zscore"):
        x, params = zip(*(normalize(s, policy) for s in raw))
        x = torch.from_numpy(np.stack(x))[:, None]
        scale = np.stack(params)[:, 1]
        # the same error in scanner units (a fraction of each slice's range) in this policy's units
        ptp = np.ptp(raw, axis=(1, 2))
        rec = x + torch.from_numpy((noise * ptp[:, None, None] / scale[:, None, None]).astype(np.float32))[:, None]
        scores[policy] = metrics.ssim_per_image(*metrics.to_unit_range(rec, x, policy))
    assert float(scores["minmax"].mean()) < 0.99  # the error is visible
    assert torch.allclose(scores["minmax"], scores["zscore"], atol=1e-4)


def test_a_zscore_reconstruction_written_back_to_scanner_units_is_not_clamped(tmp_path, phantom_slices):
    from mrivq.apps.reconstruct import reconstruct
    from mrivq.config import load_config
    from mrivq.engine.checkpoint import save_checkpoint

    config = load_config(None, ["data.image_size=[64,32]", "data.normalize=zscore",
                                *(f"model.{k}={v}" for k, v in TINY_MODEL.items())])
    model = VQVAE2(**config.model.model_dump())
    last = [m for m in model.dec.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, 2.5)  # 2.5 standard deviations above the mean: outside [0, 1]
    save_checkpoint(tmp_path / "models" / "best.pt", {"config": config.to_dict(), "model": model.state_dict()})
    raw = phantom_slices[0].astype(np.float32)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), str(tmp_path / "case_001_week_0_slice_0.nii.gz"))
    [item] = reconstruct(tmp_path / "models" / "best.pt", [tmp_path / "case_001_week_0_slice_0.nii.gz"],
                         tmp_path / "out", device="cpu")
    written = np.asarray(nib.load(item["reconstruction"]).dataobj, dtype=np.float64)
    expected = raw.astype(np.float64).mean() + 2.5 * raw.astype(np.float64).std()
    assert written == pytest.approx(np.full(raw.shape, expected), rel=1e-4)


def test_strict_json_writes_null_for_nan_and_infinity():
    text = strict_json.dumps({"rectum": {"ssim": {"mean": math.nan}}, "psnr": [math.inf, -math.inf, 31.5]})
    assert strict_load(text) == {"rectum": {"ssim": {"mean": None}}, "psnr": [None, None, 31.5]}


def test_every_json_file_a_run_writes_is_strict_even_for_a_perfect_model(tiny_overrides, monkeypatch, tmp_path):
    from mrivq.apps import predict as evaluate_module
    from mrivq.apps.train import train
    from mrivq.config import load_config
    from mrivq.engine.checkpoint import model_from_checkpoint

    config = load_config(None, tiny_overrides + ["train.epochs=1"])
    train(config)

    def perfect_model(ckpt, path):
        model = PerfectVQVAE2(**TINY_MODEL)
        model.load_state_dict(model_from_checkpoint(ckpt, path).state_dict())
        return model

    monkeypatch.setattr(evaluate_module, "model_from_checkpoint", perfect_model)
    summary = evaluate_module.predict(config)
    assert math.isinf(summary["psnr"]["mean"])
    written = sorted({*config.run_dir.rglob("*.json"), *config.data.cache_dir.rglob("*.json")})
    assert config.run_dir / "predict" / "summary.json" in written and len(written) >= 3
    for path in written:
        strict_load(path.read_text())  # raises on NaN or Infinity
    stored = strict_load((config.run_dir / "predict" / "summary.json").read_text())
    assert stored["ssim"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert stored["psnr"]["mean"] is None  # infinite: strict JSON has no token for it


def test_ssim_in_chunks_is_torchmetrics_ssim_of_the_whole_batch():
    from torchmetrics.functional.image import structural_similarity_index_measure

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2 * metrics.SSIM_CHUNK + 5, 1, 40, 24, generator=generator)
    reconstruction = target + 0.1 * torch.randn(target.shape, generator=generator)  # clamped when scored
    settings = {"gaussian_kernel": True, "sigma": 1.5, "kernel_size": 11, "data_range": 1.0, "k1": 0.01, "k2": 0.03,
                "reduction": "none"}
    whole, full = structural_similarity_index_measure(reconstruction.clamp(0, 1), target, return_full_image=True,
                                                      **settings)
    # each image's SSIM is its own: the same to float32 rounding (identical on the AVX-512 machine;
    # another CPU's convolution may pick another kernel for another batch size)
    assert torch.allclose(metrics.ssim_per_image(reconstruction, target), whole.reshape(-1), rtol=0, atol=1e-6)
    assert torch.allclose(metrics.ssim_map(reconstruction, target), full, rtol=0, atol=1e-6)
