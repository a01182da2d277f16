"""``mrivq train``: train a VQ-VAE-2 on the configured slices, as one straight story.

setup (run directory, log, device, precision, seed) -> data (splits, cached slices) -> the
task (model, optimiser, loss: :class:`mrivq.engine.vqvae_training.VQVAETraining`) -> the loop
(:class:`mrivq.engine.loop.TrainingLoop`: steps, validation, metrics.csv, best/last
checkpoints) with this command's reporting hooked in (model.safetensors, curves, sample grids,
report.html, TensorBoard) -> a summary.

The run directory (see docs/contracts.md): config.yaml, logging/training.log, metrics.csv,
samples/epoch_{i}.png, visuals/{losses,ssims}.png, models/{best,last}.pt,
models/model.safetensors and report.html.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from mrivq import metrics
from mrivq.apps import flags
from mrivq.config import Config, load_config
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.data.splits import split_record
from mrivq.engine import distributed
from mrivq.engine import step as steps
from mrivq.engine.checkpoint import checkpoint_config, export_safetensors, load_checkpoint
from mrivq.engine.loop import (
    UNTIMED,
    LoopSettings,
    LoopState,
    TrainingLoop,
    steps_per_epoch,
    stop_on_signals,
)
from mrivq.engine.vqvae_training import COLUMNS, VQVAETraining
from mrivq.errors import UserError
from mrivq.logs import interactive, run_logger
from mrivq.reporting.html import write_report
from mrivq.reporting.plots import plot_curves, save_sample_grid
from mrivq.run_dir import (
    atomic_write,
    claim_run_dir,
    config_destination,
    recording,
    run_config_path,
)
from mrivq.runtime import (
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
)

log = logging.getLogger("mrivq")


def train(config: Config, *, resume: str | Path | None = None, overwrite: bool = False) -> dict:
    """Train a VQ-VAE-2 per ``config`` (or continue the run in ``resume``); returns a summary."""
    ckpt = None
    if resume is not None:
        config, ckpt = _run_to_resume(resume)
    # Under torchrun (WORLD_SIZE > 1) this process joins the group; rank 0 alone writes.
    dist = distributed.setup(resolve_device(config.train.device))
    try:
        if ckpt is None:
            claim_run_dir(config, "train", overwrite, remove=dist.is_main)
            distributed.barrier(dist)  # every rank checks the folders before rank 0 writes to them
        logger = run_logger(config.log_dir / "training.log") if dist.is_main else contextlib.nullcontext()
        with recording(config.run_dir, "train"), logger:
            return _train(config, dist, ckpt)
    finally:
        distributed.teardown(dist)


def _train(config: Config, dist: distributed.Context, ckpt: dict | None) -> dict:
    tc = config.train
    writer = _tensorboard_writer(config.log_dir / "tensorboard") if tc.tensorboard and dist.is_main else None
    loop = build_loop(config, dist, writer)
    task, state = loop.task, loop.state

    if dist.is_main:
        config_path = config_destination(config)
        atomic_write(config_path, lambda fh: fh.write(config.to_yaml().encode()))
        if config_path.name != "config.yaml":
            log.info("kept %s (the config that was read, or a file mrivq did not write); "
                     "wrote the resolved config to %s", config.run_dir / "config.yaml", config_path)
    if ckpt is not None:
        loop.load_state_dict(ckpt, config.model_dir / "last.pt")
        log.info("resumed %s at epoch %d, step %d", config.run_dir, state.epoch, state.step)

    length = (f"as many steps as fit train.max_time ({tc.max_time:.0f} s)" if state.total_steps == UNTIMED
              else f"{state.total_steps} steps in all")
    peak = (f"peak learning rate {tc.lr:g}" if tc.lr != "auto" else
            "peak learning rate by the run's length (train.lr auto), "
            + (f"{steps.auto_peak_lr(state.total_steps):.2g}" if state.total_steps != UNTIMED
               else "set once the budget's steps are timed"))
    log.info("training on %d slices, validating on %d; %d steps per epoch, %s; %s",
             task.n_examples, len(task.val_images), loop.steps_per_epoch, length, peak)
    log.info("device %s, precision %s (validation scored in %s), torch.compile %s, %d threads; "
             "model %.2fM parameters", dist.device, task.precision, metrics.SCORING_PRECISION,
             "on" if task.compile else "off", torch.get_num_threads(),
             sum(p.numel() for p in task.model.parameters()) / 1e6)
    if dist.active:
        log.info("distributed: %d processes (%s), batch %d per process, %d per step", dist.world_size,
                 torch.distributed.get_backend(), tc.batch_size, tc.batch_size * dist.world_size)

    try:
        with stop_on_signals(loop):
            history = loop.run()
    finally:
        if writer:
            writer.close()

    best = max(history, key=lambda r: r["val_ssim"]) if history else {}
    log.info("done: %d steps in %.0f s of training; best validation SSIM %.4f at step %s",
             state.step, state.elapsed, state.best, best.get("step"))
    return {"steps": state.step, "best_ssim": state.best, "best_step": best.get("step"),
            "run_dir": str(config.run_dir), "train_seconds": state.elapsed}


def build_loop(config: Config, dist: distributed.Context | None = None, writer=None) -> TrainingLoop:
    """Everything ``train`` runs, set up and not yet started: the data, the VQ-VAE task and the loop
    with this command's hooks (``writer``: a TensorBoard writer, or None)."""
    tc = config.train
    dist = dist or distributed.Context(device=resolve_device(tc.device))
    set_threads(tc.num_threads)
    precision = resolve_precision(tc.precision, dist.device)
    compile = resolve_compile(tc.compile, dist.device)
    seed_everything(config.seed)

    # The data: rank 0 makes the phantom and the slice cache, the others then read them.
    with distributed.main_first(dist):
        splits = data_splits(config.data, config.seed)
        prep = Preprocessing.from_settings(config.data)
        load = {"cache_dir": config.data.cache_dir, "on_bad_file": config.data.on_bad_file,
                "workers": config.data.workers, "progress": interactive() and dist.is_main}
        train_set = load_split(splits.train, prep, name="train", **load)
        val_set = load_split(splits.validate, prep, name="validate", **load)

    # How long: epochs of the training split, or as many steps as fit train.max_time.
    total = UNTIMED if tc.max_time else tc.epochs * steps_per_epoch(len(train_set.images), tc.batch_size,
                                                                    dist.world_size)
    if tc.max_steps:
        total = min(total, tc.max_steps)
    state = LoopState(total_steps=total)

    # The model, its optimiser and loss; the loop, with this command's reporting hooked in.
    task = VQVAETraining(config, train_set.images, val_set.images, dist=dist, precision=precision,
                         compile=compile, state=state,
                         extra_state={"splits": split_record(splits)})  # predict checks its test split against it
    hooks = [_export_best(config), _pictures(config, task), *([_tensorboard(writer, task)] if writer else [])]
    return TrainingLoop(task, LoopSettings(
        total_steps=total, interval=tc.interval, checkpoint_every=tc.checkpoint_every, run_dir=config.run_dir,
        model_dir=config.model_dir, columns=COLUMNS, seed=config.seed, max_time=tc.max_time,
        max_steps=tc.max_steps, warmup_steps=tc.warmup_steps, max_nonfinite_steps=tc.max_nonfinite_steps,
        # Under a time budget an epoch is no landmark, and on a small training split evaluating
        # at every epoch's end spent a sixth of a 3-minute budget: every train.interval steps only.
        evaluate_at_epoch_end=not tc.max_time,
    ), dist, hooks=hooks, state=state)


def _run_to_resume(resume: str | Path) -> tuple[Config, dict]:
    """The saved config and last checkpoint of the run directory ``resume``."""
    run_dir = Path(resume).expanduser().absolute()
    last = run_dir / "models" / "last.pt"
    if run_config_path(run_dir) is None or not last.is_file():
        raise UserError(f"{run_dir}: not a run directory to resume (expected config.yaml and "
                        "models/last.pt from an earlier `mrivq train`)")
    ckpt = load_checkpoint(last)
    config = checkpoint_config(ckpt, last)
    config.output.dir = run_dir
    return config, ckpt


# ---------------------------------------------------------------------------------------
# Hooks: what this command adds after each evaluation (rank 0)
# ---------------------------------------------------------------------------------------

def _export_best(config: Config):
    def export(loop, row, val, improved, final):
        if improved:  # the best weights in a shareable form beside best.pt
            export_safetensors(loop.task.evaluated_model, config, config.model_dir / "model.safetensors")
    return export


def _pictures(config: Config, task: VQVAETraining):
    def draw(loop, row, val, improved, final):
        plot_curves(loop.history, config.visual_dir)
        write_report(config.run_dir)
        if final:  # at each epoch's end and the last step: a grid of validation slices
            inputs, recons = _sample_slices(val, task)
            save_sample_grid(inputs, recons, config.sample_dir / f"epoch_{row['epoch']}.png",
                             title=f"epoch {row['epoch']}, step {row['step']}: validation SSIM {row['val_ssim']:.4f}",
                             labels=[f"{float(val.ssim[i]):.3f}" for i in task.sample_index])
    return draw


def _sample_slices(val, task: VQVAETraining) -> tuple[np.ndarray, np.ndarray]:
    """The sample slices' inputs and reconstructions ``(k, H, W)`` on [0, 1]."""
    return (np.stack([val.kept[i][0] for i in task.sample_index]),
            np.stack([val.kept[i][1] for i in task.sample_index]))


def _tensorboard(writer, task: VQVAETraining):
    def add(loop, row, val, improved, final):
        for key, value in row.items():
            if key not in ("epoch", "step"):
                writer.add_scalar(key, value, row["step"])
        if final:
            inputs, recons = _sample_slices(val, task)
            writer.add_images("validation/inputs_over_reconstructions",
                              np.concatenate([inputs, recons], axis=1)[:, None], row["step"])
    return add


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard is true but TensorBoard is not installed; "
                        "pip install 'mrivq[tensorboard]' or set train.tensorboard: false") from None
    return SummaryWriter(str(log_dir))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from models/last.pt")
    flags.add_overwrite(parser, "a run already in output.dir (only the files mrivq wrote for it) instead of refusing")


def main(args) -> int:
    if args.resume and (args.config or args.overrides):
        raise UserError("--resume continues a run with its own saved config; "
                        "drop --config/--set, or start a new run")
    config = None if args.resume else load_config(args.config, args.overrides)
    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0
