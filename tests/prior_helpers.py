"""A tiny trained VQ-VAE-2 for the codes and prior tests, and the one-ulp nudge of the
portability tests (not a test module)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from conftest import PINNED_PRECISION, TINY_MODEL
from torch.overrides import TorchFunctionMode

TINY_PRIOR = {"kind": "transformer", "transformer.d_model": 16, "transformer.n_head": 2, "transformer.n_layer_top": 1,
              "transformer.n_layer_bottom": 1, "transformer.condition_blocks": 1, "batch_size": 8, "warmup_steps": 2,
              "transformer.dropout": 0.0, "copies.shift": 2}


def tiny_data_overrides(phantom: Path, cache: Path) -> list[str]:
    return [f"data.root={phantom}", "data.image_size=[64,32]", f"data.cache_dir={cache}", "data.workers=1",
            "train.num_threads=1", *PINNED_PRECISION]


def train_tiny_vqvae(phantom: Path, work: Path) -> Path:
    """Train a tiny VQ-VAE for a few steps on the tiny phantom; returns its models/best.pt."""
    from mrivq.apps.train import train
    from mrivq.config import load_config

    sets = tiny_data_overrides(phantom, work / "cache") + [
        "train.epochs=2", "train.batch_size=4", "train.interval=6", "train.warmup_steps=2",
        "train.sample_size=2", f"output.dir={work / 'vqvae'}"]
    sets += [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    train(load_config(None, sets))
    return work / "vqvae" / "models" / "best.pt"


def prior_overrides(phantom: Path, work: Path, run: str, **extra) -> list[str]:
    sets = tiny_data_overrides(phantom, work / "cache") + [f"output.dir={work / run}"]
    sets += [f"prior.{k}={v}" for k, v in {**TINY_PRIOR, **extra}.items()]
    return sets


def use_step_clock(monkeypatch):
    """Every training loop's clock reads its step: each step takes one second."""
    from mrivq.engine.loop import TrainingLoop

    original_init = TrainingLoop.__init__

    def init_with_step_clock(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.clock = lambda: float(self.state.step)

    monkeypatch.setattr(TrainingLoop, "__init__", init_with_step_clock)


class OneUlp(TorchFunctionMode):
    """Every floating-point tensor a torch function returns, moved one ulp (up and down in turn)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
            self.calls += 1
            towards = math.inf if self.calls % 2 else -math.inf
            return torch.nextafter(out, torch.full_like(out, towards))
        return out


def flat_prior(prior: dict) -> dict:
    """A config's prior section (today's nested shape, as ``Config.to_dict`` gives it) in the flat
    shape mrivq stored before the section was nested (``mrivq.compat.PRIOR_MOVED`` backwards);
    the shared ``condition_blocks`` from the selected kind's section."""
    from mrivq.compat import PRIOR_MOVED

    out = {key: value for key, value in prior.items() if key not in ("kind", "passes", "volume", "transformer", "rows", "copies")}
    for old, new in PRIOR_MOVED.items():
        key = next((key for key in new if key.startswith(f"{prior['kind']}.")), new[0])
        section, _, name = key.rpartition(".")
        out[old] = (prior[section] if section else prior)[name]
    return out
