"""Recipe options: reconstruction losses matched to the metric, and a wall-clock budget."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from mrivq import metrics
from mrivq.apps.train import train
from mrivq.config import load_config
from mrivq.engine import losses
from mrivq.engine import step as steps
from mrivq.engine.checkpoint import load_checkpoint
from mrivq.engine.loop import TrainingLoop
from mrivq.run_dir import read_metrics


def smooth_images(n: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.nn.functional.avg_pool2d(torch.rand(n, 1, 64, 32), 5, 1, 2)


def test_the_loss_ssim_equals_the_metric_on_images_in_range():
    target = smooth_images()
    rec = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    assert torch.allclose(losses.differentiable_ssim(rec, target), metrics.ssim_per_image(rec, target), atol=1e-5)


@pytest.mark.parametrize("normalize", ["minmax", "zscore"])
@pytest.mark.parametrize("kind", losses.LOSSES)
def test_each_loss_is_zero_for_a_perfect_reconstruction_and_positive_otherwise(kind, normalize):
    target = smooth_images()
    if normalize == "zscore":
        target = (target - target.mean()) / target.std()
    perfect = losses.reconstruction_loss(target, target, kind=kind, normalize=normalize)
    assert float(perfect) == pytest.approx(0.0, abs=1e-6)
    rec = (target + 0.1 * torch.randn_like(target)).requires_grad_()
    loss = losses.reconstruction_loss(rec, target, kind=kind, normalize=normalize)
    loss.backward()
    assert float(loss.detach()) > 0 and rec.grad.abs().sum() > 0


def test_ssim_l1_weighs_one_minus_ssim_against_l1():
    target = smooth_images()
    rec = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    ssim = float(losses.differentiable_ssim(rec, target).mean())
    l1 = float((rec - target).abs().mean())
    mixed = float(losses.reconstruction_loss(rec, target, kind="ssim_l1", ssim_weight=0.25))
    assert mixed == pytest.approx(0.25 * (1 - ssim) + 0.75 * l1, rel=1e-5)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_a_clamped_loss_charges_what_the_clamped_picture_shows(kind):
    target = smooth_images()
    target[..., :8, :] = 0.0  # a black border, as real scans have
    rec = target + 0.05 * torch.randn_like(target)
    below = rec.clone()
    below[..., :8, :] = -0.3  # far below black where the slice is black: the same picture once clamped
    above = rec.clone()
    above[..., :8, :] = 0.3  # grey where it is black: a different picture
    loss = functools.partial(losses.reconstruction_loss, kind=kind, clamped=True)
    black = rec.clone()
    black[..., :8, :] = 0.0
    assert float(loss(below, target)) == pytest.approx(float(loss(black, target)), rel=1e-5)
    assert float(loss(above, target)) > float(loss(black, target)) * 1.1
    # unclamped, the black-below-black border is charged like any other error
    assert float(losses.reconstruction_loss(below, target, kind=kind)) > float(loss(below, target)) * 1.1


def test_a_clamped_loss_still_pulls_a_pixel_below_black_up_where_its_target_is_not_black():
    target = torch.full((1, 1, 8, 8), 0.5)
    target[..., :4, :] = 0.0
    rec = torch.full_like(target, -0.2).requires_grad_()
    losses.reconstruction_loss(rec, target, clamped=True).backward()
    assert torch.all(rec.grad[..., 4:, :] < 0)  # a step against the gradient raises them
    assert torch.all(rec.grad[..., :4, :] == 0)  # black below black: nothing to learn
    with pytest.raises(ValueError, match="zscore"):
        losses.reconstruction_loss(rec, target, clamped=True, normalize="zscore")


def test_training_with_the_ssim_l1_loss_logs_that_loss_for_training_and_validation(tiny_overrides):
    config = load_config(None, tiny_overrides + ["train.loss=ssim_l1", "train.epochs=1"])
    train(config)
    rows = read_metrics(config.run_dir / "metrics.csv")
    assert rows and all(0 < r["val_recon_loss"] < 1 for r in rows)
    assert load_checkpoint(config.model_dir / "best.pt")["config"]["train"]["loss"] == "ssim_l1"


def one_second_per_step(monkeypatch) -> None:
    """Give every training loop a clock on which each step takes one second."""
    original_init = TrainingLoop.__init__

    def init_with_step_clock(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.clock = lambda: float(self.state.step)

    monkeypatch.setattr(TrainingLoop, "__init__", init_with_step_clock)


def test_max_time_fits_the_schedule_to_the_budget_and_ends_with_checkpoints(tiny_overrides, monkeypatch):
    """A clock on which every step takes one second: a 30-second budget fits 30 steps, whatever
    the epochs say, and the learning rate reaches its floor at the last of them."""
    config = load_config(None, tiny_overrides + ["train.max_time=30s", "train.epochs=1", "train.interval=8",
                                                 "train.min_lr_ratio=0.1"])
    one_second_per_step(monkeypatch)
    summary = train(config)
    assert summary["steps"] == 30  # far more than one epoch of the tiny phantom (6 steps)
    last = load_checkpoint(config.model_dir / "last.pt")
    assert last["step"] == 30 and last["total_steps"] == 30
    assert (config.model_dir / "best.pt").is_file()
    assert read_metrics(config.run_dir / "metrics.csv")[-1]["step"] == 30
    assert last["scheduler"]["_last_lr"][0] == pytest.approx(steps.peak_lr(config.train.lr, 30) * 0.1, rel=1e-3)
    assert "train.max_time 30 s: 30 steps in all" in (config.log_dir / "training.log").read_text()


def test_a_long_warm_up_does_not_hold_back_the_budget_fit(tiny_overrides, monkeypatch):
    """Under torchrun the fit is what ends a budgeted run, so it comes 50 steps in even when the
    warm-up is longer: a 70-second budget with a 480-step warm-up is fitted to 70 steps."""
    config = load_config(None, tiny_overrides + ["train.max_time=70s", "train.epochs=1", "train.interval=100",
                                                 "train.warmup_steps=480"])
    one_second_per_step(monkeypatch)
    assert train(config)["steps"] == 70
    assert "train.max_time 70 s: 70 steps in all" in (config.log_dir / "training.log").read_text()


def test_the_auto_learning_rate_follows_the_length_the_budget_fits(tiny_overrides, monkeypatch):
    """train.lr auto, with the rule's ends moved to 40 and 80 steps: a 60-step budget (fitted
    once the first steps are timed) peaks between the ends' rates and ends at its floor."""
    monkeypatch.setattr(steps, "AUTO_LR", ((40, 2e-3), (80, 5e-4)))
    config = load_config(None, tiny_overrides + ["train.max_time=60s", "train.epochs=1", "train.interval=30",
                                                 "train.min_lr_ratio=0.1", "train.lr=auto",
                                                 "train.warmup_steps=2"])
    one_second_per_step(monkeypatch)
    train(config)
    peak = steps.auto_peak_lr(60)
    assert 5e-4 < peak < 2e-3
    last = load_checkpoint(config.model_dir / "last.pt")
    assert last["step"] == 60
    assert last["scheduler"]["_last_lr"][0] == pytest.approx(peak * 0.1, rel=1e-6)


@pytest.mark.parametrize(("total", "peak"), [(1, 2e-3), (4_000, 2e-3), (13_000, 5e-4), (10**9, 5e-4)])
def test_the_auto_peak_is_high_for_short_runs_and_low_for_long_ones(total, peak):
    assert steps.auto_peak_lr(total) == peak
    assert steps.peak_lr(1e-4, total) == 1e-4  # a number is the peak, whatever the length


def test_the_auto_peak_falls_steadily_between_the_ends():
    peaks = [steps.auto_peak_lr(n) for n in range(4_000, 13_001, 500)]
    assert all(a > b for a, b in itertools.pairwise(peaks))


def test_the_auto_learning_rate_trains_a_short_run_exactly_as_its_peak_would(tiny_overrides, tmp_path):
    """The default phantom run is short: auto must give bit for bit the weights of lr 2e-3."""
    weights = []
    for lr in ("auto", "0.002"):
        config = load_config(None, tiny_overrides + ["train.epochs=1", f"train.lr={lr}",
                                                     f"output.dir={tmp_path / lr}", "train.precision=fp32"])
        train(config)
        weights.append(load_checkpoint(config.model_dir / "last.pt")["model"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_max_time_reads_units():
    assert load_config(None, ["train.max_time=10m"]).train.max_time == 600
    assert load_config(None, ["train.max_time=1.5h"]).train.max_time == 5400
    assert load_config(None, ["train.max_time=45"]).train.max_time == 45


def test_training_on_crops_steps_on_windows_and_validates_whole_slices(tiny_overrides, monkeypatch):
    from mrivq.engine.vqvae_training import VQVAETraining

    shapes = []
    step = VQVAETraining.train_step

    def record(self, batch):
        shapes.append(tuple(batch.shape[-2:]))
        return step(self, batch)

    monkeypatch.setattr(VQVAETraining, "train_step", record)
    config = load_config(None, tiny_overrides + ["data.train_crop=[32,16]", "train.epochs=1"])
    train(config)
    assert shapes and set(shapes) == {(32, 16)}
    rows = read_metrics(config.run_dir / "metrics.csv")
    assert rows and 0 < rows[-1]["val_ssim"] <= 1  # validation on whole 64 x 32 slices
