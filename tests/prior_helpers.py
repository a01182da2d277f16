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


def fitted_to_runs(build, make_copy, seed: int = 0):
    """The prior ``build()`` makes (8 codes, an 8x4 top grid, references as a volume prior takes
    them) fitted to runs in which each grid repeats the one before it with a tenth of its codes
    redrawn, so that it learns to lean on its neighbours, with its integer copy ``make_copy(prior,
    top, bottom)``. Returns the prior, 13 held-back grids and their references (key slices 0, 8
    and 12; the rest between them)."""
    import numpy as np

    from mrivq.data.volumes import references
    from mrivq.nn.pass_prior import referenced_grids

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    grids = [rng.integers(0, 8, size=(8, 4))]
    for _ in range(60):
        grid = grids[-1].copy()
        change = rng.random(grid.shape) < 0.1
        grid[change] = rng.integers(0, 8, size=int(change.sum()))
        grids.append(grid)
    top = torch.as_tensor(np.stack(grids))
    bottom = top.repeat_interleave(2, 1).repeat_interleave(2, 2)
    prior = build()
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(100):
        i = torch.as_tensor(rng.integers(4, 44, size=8))
        gap = torch.as_tensor(rng.choice([0, 1, 2, 4], size=8))
        refs = torch.where((gap > 0)[:, None], torch.stack([i - gap, i + gap], 1), -1)
        nll_top, nll_bottom = prior.nll_bits(top[i], bottom[i], referenced_grids(refs, top, bottom))
        optimizer.zero_grad()
        (nll_top + 4 * nll_bottom).backward()
        optimizer.step()
    prior.eval()
    prior.integer = make_copy(prior, top[:32], bottom[:32])
    return prior, top[48:], bottom[48:], references([f"v_slice_{s}" for s in range(13)], key_every=8)
