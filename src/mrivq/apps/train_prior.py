"""Training a prior over the codes (``mrivq train-prior``): encode the splits -> the loop -> checkpoints.

``train_prior(config, checkpoint)`` encodes the configured train and validation splits with
a trained VQ-VAE-2 (preprocessed as that model was trained), fits a prior of ``prior.kind`` (:mod:`mrivq.compression.priors`) to the
codes by maximum likelihood (:class:`mrivq.engine.prior_training.PriorTraining` in the loop both
trainers use, :class:`mrivq.engine.loop.TrainingLoop`), and writes into ``output.dir``:

    logging/prior.log          NLL per level, learning rate, codes/s at every evaluation
    prior_metrics.csv          one row per evaluation (train and validation NLL in bits per code)
    visuals/prior_losses.png   train and validation NLL against step, with the uniform line
    models/prior_best.pt       lowest validation NLL
    models/prior_last.pt       everything needed to resume (``--resume RUN_DIR``)

The file names carry ``prior_`` so a prior can share the run directory of its VQ-VAE. A
prior checkpoint also holds the VQ-VAE's weights and config, so ``mrivq sample`` needs it
alone. Checkpoints are written atomically; a kill never leaves a broken one, and a resumed
CPU run continues with the same batches and dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from mrivq.apps import flags
from mrivq.compression.codec import model_fingerprint
from mrivq.config import Config, config_from_dict, load_config
from mrivq.data.augment import prior_training_copies
from mrivq.data.cache import default_cache_dir, load_split
from mrivq.data.io import read_slice
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.data.volumes import gap_shares, neighbours, references
from mrivq.engine import distributed
from mrivq.engine.checkpoint import (
    PRIOR_KIND,
    checkpoint_config,
    load_checkpoint,
    load_vqvae,
    model_from_checkpoint,
    run_config,
)
from mrivq.engine.codes_cache import cached_codes
from mrivq.engine.loop import UNTIMED, LoopSettings, LoopState, TrainingLoop, stop_on_signals
from mrivq.engine.prior_training import COLUMNS, PriorTraining
from mrivq.errors import ConfigError, UserError
from mrivq.logs import interactive, run_logger
from mrivq.reporting.plots import plot_series
from mrivq.run_dir import claim_run_dir, recording
from mrivq.runtime import resolve_device, seed_everything, set_threads

_clock = time.perf_counter  # times the encoding that prior.max_time includes (tests replace it)
_copies_clock = time.perf_counter  # times the training copies' share of it (tests replace it)
log = logging.getLogger("mrivq")

BEST, LAST, METRICS, LOG = "prior_best.pt", "prior_last.pt", "prior_metrics.csv", "prior.log"


def train_prior(config: Config, checkpoint: str | Path | None = None, *, resume: str | Path | None = None,
                overwrite: bool = False) -> dict:
    """Fit a prior to the codes a trained VQ-VAE gives the configured data; returns a summary.

    ``checkpoint``: the VQ-VAE (``models/best.pt`` of a training run). ``resume``: a run
    directory holding ``models/prior_last.pt``; the run continues with its saved config and
    VQ-VAE.
    """
    if resume is not None:
        config, vq_config, vqvae, ckpt, last = _resumed_run(resume)
        differs = []
    else:
        config, vq_config, vqvae, differs = _new_run(config, checkpoint, overwrite)
        ckpt = last = None
    with recording(config.run_dir, "train-prior"), run_logger(config.log_dir / LOG):
        set_threads(config.train.num_threads)
        seed_everything(config.seed)
        for setting in differs:
            log.warning("the prior trains with %s, given explicitly", setting)
        vqvae = vqvae.to(resolve_device(config.train.device))
        started = _clock()
        kept = None if ckpt is None else ckpt["reference"].get("training_copies")  # a resumed run's copies
        kept = kept if isinstance(kept, int) and kept >= 0 else None  # (a run from before they were counted: all)
        codes, reference, refs = _encode_splits(config, vq_config, vqvae, kept)
        encoding = _clock() - started
        if config.prior.max_time and ckpt is None:
            log.info("prior.max_time %.0f s: %.0f s went to reading the slices and encoding their codes; the "
                     "loop gets the rest", config.prior.max_time, encoding)
        loop = prior_loop(config, codes, n_embed=vqvae.quantize_top.n_embed,
                          vqvae={"model": vqvae.state_dict(), "config": vq_config.to_dict()},
                          fingerprint=model_fingerprint(vqvae), reference=reference, references=refs,
                          spent=encoding if ckpt is None else 0.0)
        if ckpt is not None:
            if ckpt.get("fingerprint") != loop.task.fingerprint:
                raise UserError(f"{last}: its VQ-VAE does not match its codes; start a new run")
            loop.load_state_dict(ckpt, last)
            log.info("resumed %s at step %d", config.run_dir, loop.state.step)
        _log_plan(config, loop.task)
        with stop_on_signals(loop):
            history = loop.run()
    return _finish(config, loop, history)


def _resumed_run(resume: str | Path) -> tuple[Config, Config, torch.nn.Module, dict, Path]:
    """``--resume RUN_DIR``: the run's saved config (its outputs in ``RUN_DIR``), the VQ-VAE's
    config and weights from its last checkpoint, that checkpoint and its path."""
    run_dir = Path(resume).expanduser().absolute()
    last = run_dir / "models" / LAST
    if not last.is_file():
        raise UserError(f"{run_dir}: not a prior run to resume (expected models/{LAST} from an "
                        "earlier `mrivq train-prior`)")
    ckpt = load_checkpoint(last)
    if ckpt.get("kind") != PRIOR_KIND:
        raise UserError(f"{last}: not a prior checkpoint")
    config = checkpoint_config(ckpt)
    config.output.dir = run_dir
    vq_config = config_from_dict(ckpt["vqvae"]["config"])
    vqvae = model_from_checkpoint(ckpt["vqvae"], last).eval()
    return config, vq_config, vqvae, ckpt, last


def _new_run(config: Config, checkpoint: str | Path | None,
             overwrite: bool) -> tuple[Config, Config, torch.nn.Module, list[str]]:
    """A new run on the VQ-VAE at ``checkpoint``: the config to train with (the VQ-VAE's own data,
    seed and run directory, unless given explicitly), the VQ-VAE's config and weights, and the
    settings given explicitly; the run directory is claimed."""
    if checkpoint is None:
        raise UserError("train-prior needs the VQ-VAE: --checkpoint FILE (e.g. runs/default/models/best.pt)")
    vqvae, vq_config = load_vqvae(checkpoint)
    config, differs = run_config(config, vq_config, Path(checkpoint))
    size = vq_config.data.image_size
    if max(config.prior.copies.shift, default=0) >= min(size):
        raise ConfigError(f"prior.copies.shift ({max(config.prior.copies.shift)}) must be smaller than the "
                          f"slices ({size[0]} x {size[1]}); [] turns shifting off")
    claim_run_dir(config, "train-prior", overwrite)
    return config, vq_config, vqvae, differs


def _log_plan(config: Config, task: PriorTraining) -> None:
    """One line: the codes, the prior's size, how long it trains, where and in what precision."""
    pc = config.prior
    log.info("prior: %d training and %d validation code grids; top %s, bottom %s, %d codes per level; "
             "%.2fM parameters; %s on %s in %s (validation in fp32)", len(task.train_top), len(task.val_top),
             "x".join(map(str, task.top_grid)), "x".join(map(str, task.train_bottom.shape[1:])),
             task.n_embed, sum(p.numel() for p in task.model.parameters()) / 1e6,
             f"as many steps as fit prior.max_time ({pc.max_time:.0f} s)" if pc.max_time else f"{pc.steps} steps",
             task.device, task.precision)


def _finish(config: Config, loop: TrainingLoop, history: list[dict]) -> dict:
    """Log the end of the run and return what :func:`train_prior` returns."""
    state, task = loop.state, loop.task
    best = min(history, key=lambda r: r["val_nll"]) if history else {}
    uniform = math.log2(task.n_embed)
    log.info("done: %d steps in %.0f s; best validation NLL %.3f bits per code (uniform: %.3f) at step %s",
             state.step, state.elapsed, state.best, uniform, best.get("step"))
    return {"steps": state.step, "best_val_nll": state.best, "uniform_bits": uniform,
            "best_step": best.get("step"), "run_dir": str(config.run_dir),
            "best_val_bits_per_pixel": best.get("val_bits_per_pixel")}


def prior_loop(config: Config, codes: dict, *, n_embed: int, vqvae: dict, fingerprint: str,
               reference: dict, references: dict | None = None, spent: float = 0.0) -> TrainingLoop:
    """The prior task (see :class:`PriorTraining` for the arguments) in the training loop, with
    this command's plot hooked in; set up and not yet started. ``spent``: seconds of
    ``prior.max_time`` already gone (reading the slices, encoding the codes)."""
    pc = config.prior
    max_time = max(1.0, pc.max_time - spent) if pc.max_time else None
    device = resolve_device(config.train.device)
    # How long: prior.steps, or as many steps as fit prior.max_time.
    state = LoopState(total_steps=UNTIMED if pc.max_time else pc.steps)
    task = PriorTraining(config, codes, n_embed=n_embed, vqvae=vqvae, fingerprint=fingerprint,
                         reference=reference, device=device, state=state, references=references)
    return TrainingLoop(task, LoopSettings(
        total_steps=state.total_steps, interval=pc.interval, checkpoint_every=pc.checkpoint_every,
        max_time=max_time, max_time_key="prior.max_time", warmup_steps=pc.warmup_steps,
        run_dir=config.run_dir, model_dir=config.model_dir, metrics_name=METRICS, columns=COLUMNS,
        best_name=BEST, last_name=LAST, resume_command="mrivq train-prior --resume", seed=config.seed,
        evaluate_at_epoch_end=False,
    ), distributed.Context(device=device), hooks=[_plot_losses(config)], state=state)


def _plot_losses(config: Config):
    def plot(loop, row, details, improved, final):
        plot_series(loop.history, [("train_nll", "train NLL", "-"), ("val_nll", "validation NLL", "o-"),
                                   ("uniform_bits", "uniform (log2 n_embed)", ":")],
                    title="Prior: negative log-likelihood", ylabel="bits per code",
                    path=config.visual_dir / "prior_losses.png")
    return plot


#: The share of ``prior.max_time`` the training copies' codes may take (the rest trains): a 5-minute
#: prior of 577 real slices spent 267 s on 22 copies and had 91 steps left.
COPIES_SHARE = 0.25


def _encode_splits(config: Config, vq_config: Config, vqvae, kept: int | None = None) -> tuple[dict, dict, dict]:
    """Codes of the train and validate splits, preprocessed as the VQ-VAE was trained, and for a
    volume prior the grids each is coded after (:class:`PriorTraining`'s ``references``; a
    training copy's among its own copy's). Under ``prior.max_time``, training copies are encoded while
    they fit :data:`COPIES_SHARE` of it (each copy as long as the last one took), the rest left out;
    ``kept``: that many copies (a resumed run's, as its ``reference["training_copies"]`` says)."""
    prep = Preprocessing.from_settings(vq_config.data)
    deadline = _copies_clock() + COPIES_SHARE * config.prior.max_time if config.prior.max_time and kept is None \
        else math.inf
    splits = data_splits(config.data, config.seed)
    load = {"cache_dir": config.data.cache_dir, "on_bad_file": config.data.on_bad_file,
            "workers": config.data.workers, "progress": interactive()}
    codes, refs, fingerprint = {}, {}, model_fingerprint(vqvae)
    key_every = getattr(config.prior.settings, "key_every", None)  # a prior that codes slices as volumes
    cache_dir = config.data.cache_dir or default_cache_dir()
    for name, files in (("train", splits.train), ("validate", splits.validate)):
        slices = load_split(files, prep, name=name, **load)
        versions = {"": slices.images}
        if name == "train":  # the training codes only: validation scores the slices as they are
            copies = config.prior.copies
            versions.update(prior_training_copies(slices.images, flip=copies.flip, shifts=copies.shift,
                                                  scales=copies.scale))
        grids, took = [], 0.0
        for version, images in versions.items():
            if version and (_copies_clock() + took > deadline or len(grids) > (kept if kept is not None else math.inf)):
                log.info("prior.max_time: %d of the %d training copies encoded (they may take %.0f%% of it); "
                         "the rest left out", len(grids) - 1, len(versions) - 1, 100 * COPIES_SHARE)
                break
            t0 = _copies_clock()
            *pair, cached = cached_codes(vqvae, images, cache_dir=cache_dir, batch_size=config.prior.batch_size,
                                         key="-".join(filter(None, (fingerprint, slices.key,
                                                                    getattr(images, "tag", "")))))
            grids.append(pair)
            took = _copies_clock() - t0
            log.info("%s the %s split%s: %d slices in %.1f s", "read the cached codes of" if cached else "encoded",
                     name, f" ({version.replace('-', ' ')})" if version else "", len(slices), took)
        codes[name] = tuple(np.concatenate(level, dtype=np.int32) for level in zip(*grids))
        if key_every is not None:  # validation scores the order encode codes in; training draws gaps
            names = [Path(f).name for f in slices.files]
            refs[name] = _in_copies(references(names, key_every), len(grids)) if name == "validate" else {
                gap: _in_copies(neighbours(names, gap), len(grids)) for gap in gap_shares(key_every) if gap}
        if name == "train":
            _, meta = read_slice(slices.files[0])
            reference = {"affine": torch.from_numpy(meta.affine.astype(np.float64)),
                         "norm": torch.from_numpy(np.median(np.asarray(slices.norm), axis=0)),
                         "image_size": list(prep.image_size), "training_copies": len(grids) - 1}
    return codes, reference, refs or None


def _in_copies(table: np.ndarray, copies: int) -> np.ndarray:
    """Indices among a split's grids (``(N, 2)``, -1: none) for ``copies`` copies of the split one
    after another, each copy's grids referring to their own copy's."""
    return np.concatenate([np.where(table >= 0, table + k * len(table), -1) for k in range(copies)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser)
    parser.add_argument("--checkpoint", metavar="FILE", help="the VQ-VAE (e.g. runs/default/models/best.pt)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the prior run in RUN_DIR from models/prior_last.pt")
    flags.add_device(parser, default=None, help="where the VQ-VAE and the prior run (default: train.device, auto)")
    flags.add_overwrite(parser, "a prior run already in output.dir (only the files mrivq wrote for it)")


def main(args) -> int:
    if args.resume and (args.config or args.overrides or args.checkpoint or args.device):
        raise UserError("--resume continues a prior run with its own saved config and VQ-VAE; "
                        "drop --config/--set/--checkpoint/--device, or start a new run")
    overrides = [*args.overrides, *([f"train.device={args.device}"] if args.device else [])]
    config = None if args.resume else load_config(args.config, overrides)
    train_prior(config, args.checkpoint, resume=args.resume, overwrite=args.overwrite)
    return 0
