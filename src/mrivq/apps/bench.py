"""Speed and memory figures: training and prediction throughput, and slice loading.

``benchmark(config)`` times the configured model on one batch of phantom slices, first on
the path training uses (resolved precision and compile mode, channels-last) and then on a plain fp32 eager
path (contiguous tensors) with the same weights, and times loading the HipMRI-size phantom
set (12,660 slices) from a fresh cache (cold) and again (warm). It reports; it never fails
on a number.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mrivq import strict_json
from mrivq.apps import flags
from mrivq.config import Config, load_config
from mrivq.data.cache import load_split
from mrivq.data.phantom import make_volume
from mrivq.data.preprocess import Preprocessing, preprocess_slice
from mrivq.data.sources import phantom_set
from mrivq.data.splits import resolve_splits
from mrivq.engine.step import optimisation_step
from mrivq.engine.vqvae_training import vqvae_loss
from mrivq.errors import UserError
from mrivq.nn import VQVAE2
from mrivq.runtime import (
    autocast,
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
)

# What ``benchmark`` and ``mrivq bench`` time unless told otherwise.
BATCH_SIZE = 10  # slices per step
IMAGE_SIZE = (256, 128)  # HipMRI's slices
STEPS = 10  # timed steps per figure
WARMUP = 3  # untimed steps before them


def phantom_batch(batch_size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """``(B, 1, H, W)`` phantom slices in [0, 1], preprocessed as training sees them."""
    raw, _ = make_volume(seed=0, n_slices=max(batch_size, 1))
    prep = Preprocessing(image_size=tuple(image_size))
    slices = [preprocess_slice(s, prep)[0] for s in raw[:batch_size]]
    return torch.from_numpy(np.stack(slices)).unsqueeze(1)


def _train_throughput(model, batch, *, device, precision, channels_last, compile, steps, warmup) -> float:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).train()
    x = batch.to(device).contiguous(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model = torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        optimisation_step(model, optimizer, scaler,
                          lambda: vqvae_loss(model, x, precision=precision, latent_loss_weight=0.25), grad_clip=1.0)

    return _images_per_s(step, len(batch), steps, warmup, device)


@torch.inference_mode()
def _predict_throughput(model, batch, *, device, precision, channels_last, compile, steps, warmup) -> float:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format).eval()
    model = torch.compile(model) if compile else model
    x = batch.to(device).contiguous(memory_format=memory_format)

    def step():
        with autocast(device, precision):
            model(x).reconstruction.float().clamp_(0, 1)

    return _images_per_s(step, len(batch), steps, warmup, device)


def _images_per_s(step, batch_size: int, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def load_times(root: Path, workers: int | None = None) -> tuple[float, float, int]:
    """Seconds to load every split under ``root`` into a fresh cache, then again: (cold, warm, n)."""
    splits = resolve_splits(root)
    with tempfile.TemporaryDirectory() as cache:
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            n = sum(len(load_split(files, Preprocessing(), cache_dir=Path(cache), workers=workers, name=name))
                    for name, files in splits.as_dict().items())
            timings.append(time.perf_counter() - start)
    return timings[0], timings[1], n


def hipmri_phantom_root(config: Config) -> Path:
    """The HipMRI-size phantom set (11,460 / 660 / 540 slices), generated once into the cache."""
    return phantom_set(config.data.cache_dir, cases=None)


def benchmark(config: Config, *, batch_size: int = BATCH_SIZE, image_size: tuple[int, int] = IMAGE_SIZE,
              steps: int = STEPS, warmup: int = WARMUP, load: bool = True, log=print) -> list[dict]:
    """Figures as ``{"figure", "value", "unit"}`` dicts (see the module docstring)."""
    set_threads(config.train.num_threads)
    device = resolve_device(config.train.device)
    precision = resolve_precision(config.train.precision, device)
    compiled = resolve_compile(config.train.compile, device)
    seed_everything(config.seed)
    reference = VQVAE2(**config.model.model_dump())
    batch = phantom_batch(batch_size, image_size)
    log(f"model {sum(p.numel() for p in reference.parameters()) / 1e6:.2f}M parameters, batch "
        f"{batch_size}x1x{image_size[0]}x{image_size[1]}, device {device}, fast path: precision "
        f"{precision}, channels-last, torch.compile {'on' if compiled else 'off'}; reference: fp32 eager, contiguous; {steps} steps after {warmup}")
    figures = []

    def add(name, value, unit):
        figures.append({"figure": name, "value": round(float(value), 4), "unit": unit})

    for kind, measure in (("train", _train_throughput), ("predict", _predict_throughput)):
        fast = measure(copy.deepcopy(reference), batch, device=device, precision=precision,
                       channels_last=True, compile=compiled, steps=steps, warmup=warmup)
        plain = measure(copy.deepcopy(reference), batch, device=device, precision="fp32",
                        channels_last=False, compile=False, steps=steps, warmup=warmup)
        add(f"{kind}_images_per_s", fast, "images/s")
        add(f"{kind}_images_per_s_fp32_eager", plain, "images/s")
        add(f"{kind}_speedup", fast / plain, "x")
    if load:
        cold, warm, n = load_times(hipmri_phantom_root(config), config.data.workers)
        add("load_slices", n, "slices")
        add("load_cold_s", cold, "s")
        add("load_warm_s", warm, "s")
    add("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MB")
    if device.type == "cuda":
        add("peak_cuda_mb", torch.cuda.max_memory_allocated() / 2**20, "MB")
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--image-size", type=int, nargs=2, default=list(IMAGE_SIZE), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=STEPS, help="timed steps per figure (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed steps first (default %(default)s)")
    parser.add_argument("--no-load", action="store_true",
                        help="skip timing the HipMRI-size phantom load (generated once, ~1-2 min)")
    parser.add_argument("--json", action="store_true", help='one JSON object per line: {"figure", "value", "unit"}')


def main(args) -> int:
    """Print each figure (``--json``: one JSON object per line)."""
    if min(args.batch_size, args.steps, *args.image_size) < 1:
        raise UserError("--batch-size, --steps and --image-size must be positive")
    config = load_config(args.config, args.overrides)
    figures = benchmark(config, batch_size=args.batch_size, image_size=tuple(args.image_size),
                        steps=args.steps, warmup=max(args.warmup, 0), load=not args.no_load,
                        log=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    for f in figures:
        print(strict_json.dumps(f) if args.json else f"{f['figure']:34s} {f['value']:>12} {f['unit']}")
    return 0
