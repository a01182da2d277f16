"""Training: setup -> loop -> evaluate -> checkpoint, as one straight story.

``train(config)`` trains a VQ-VAE-2 on the configured data and fills the run directory
(see ARCHITECTURE.md): config.yaml, logging/training.log, metrics.csv, samples/epoch_{i}.png,
visuals/{losses,ssims}.png, models/{best,last}.pt and models/model.safetensors.

Loss = reconstruction loss (``train.loss``: MSE, L1 or an SSIM/L1 mix) +
``latent_loss_weight`` x commitment loss. The learning rate
warms up linearly for ``warmup_steps`` and then follows a cosine down to
``min_lr_ratio`` x ``lr`` (or stays constant).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import inspect
import io
import logging
import math
import random
import signal
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import distributed, metrics
from .checkpoint import (
    atomic_write,
    checkpoint_config,
    export_safetensors,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from .config import Config
from .data.augment import augment_from_config
from .data.cache import load_split
from .data.sources import data_splits
from .data.splits import split_record
from .errors import TrainingInterrupted, UserError
from .evaluate import Evaluation, evaluate, preprocessing, slices_to_batch
from .html_report import write_report
from .logs import interactive, run_logger
from .losses import reconstruction_loss
from .models import VQVAE2
from .report import plot_curves, save_sample_grid
from .run_dir import claim_run_dir, config_destination, recording, run_config_path
from .runtime import (
    autocast,
    resolve_compile,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_threads,
)

log = logging.getLogger("mrivq")

METRIC_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_recon_loss", "train_commitment_loss", "train_ssim",
    "val_loss", "val_recon_loss", "val_commitment_loss", "val_ssim", "val_psnr",
    "val_top_used", "val_top_perplexity", "val_bottom_used", "val_bottom_perplexity",
    "top_restarts", "bottom_restarts",
    "train_images_per_s", "val_images_per_s", "elapsed_s",
]

TRAIN_SSIM_EVERY = 5
SYNC_EVERY = 10  # on CUDA: read NaN/Inf counts and agree on a stop signal every this many steps
BUDGET_FIT_AFTER = 20  # train.max_time: steps timed (at least the warm-up) before the first fit
UNTIMED = 2**62  # train.max_time: total_steps until the first fit
RUNNING_SUMS = 8  # see Trainer._reset_running



def sync_free_steps(device: torch.device) -> bool:
    """Whether training steps avoid waiting for the device (CUDA); see optimisation_step."""
    return device.type == "cuda"


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up, then cosine."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to stop after its current step; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if trainer.stop_signal is not None:
            raise KeyboardInterrupt
        trainer.stop_signal = signum
        log.warning("%s received: finishing the current step, then saving the last checkpoint",
                    signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StepResult(NamedTuple):
    """Detached results of one optimisation step."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    commitment_loss: torch.Tensor
    reconstruction: torch.Tensor  # (B, 1, H, W) float32
    applied: torch.Tensor  # () bool on the device: False when the loss or a gradient was NaN/Inf


def optimisation_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, batch: torch.Tensor, *, device: torch.device,
                      precision: str, latent_loss_weight: float, grad_clip: float | None,
                      sync_free: bool = False, recon_loss_fn=None) -> StepResult:
    """Forward, loss, backward, clip, optimiser step on ``batch`` ``(B, 1, H, W)`` in [0, 1].

    Loss = reconstruction loss (``recon_loss_fn(reconstruction, batch)``, default MSE; see
    :func:`mrivq.losses.reconstruction_loss`) + ``latent_loss_weight`` x commitment loss. One NaN policy: when
    the loss or any gradient is NaN or Inf, nothing is applied (weights, optimiser state and the
    forward pass's EMA codebook update are left as they were) and ``applied`` is False.

    ``sync_free`` (for CUDA) never waits for the device: the finiteness test stays a device
    tensor, the codebook is restored with ``torch.where`` and the optimiser skips its update
    through ``found_inf``, which needs a fused optimiser (``Adam(fused=True)``), as GradScaler
    uses it. Otherwise the test is read at once, and a bad loss skips the backward pass too.
    """
    codebooks = {name: buf.clone() for name, buf in model.named_buffers()}

    def restore_codebooks(keep: torch.Tensor) -> None:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(torch.where(keep, buf, codebooks[name]))

    with autocast(device, precision):
        out = model(batch)
    reconstruction = out.reconstruction.float()
    recon_loss = (recon_loss_fn or F.mse_loss)(reconstruction, batch)
    commitment_loss = out.commitment_loss.float()
    loss = recon_loss + latent_loss_weight * commitment_loss
    result = StepResult(loss.detach(), recon_loss.detach(), commitment_loss.detach(), reconstruction.detach(),
                        torch.ones((), dtype=torch.bool, device=loss.device))
    # Under torchrun every rank must agree, or one would wait forever in the gradient all-reduce.
    finite = distributed.all_true(torch.isfinite(loss))
    if not sync_free and not finite.item():
        restore_codebooks(finite)
        return result._replace(applied=finite)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    # The norm is NaN/Inf exactly when some gradient is (or overflows): such a step is skipped
    # like a NaN loss, rather than clip_grad_norm_ scaling every gradient by NaN. Under torchrun
    # the gradients are all-reduced already, so every rank computes the same norm.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    finite = finite & torch.isfinite(grad_norm)
    restore_codebooks(finite)
    if not sync_free and not finite.item():
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():  # unscale_ was called: let the scaler forget this step
            scaler.update()
        return result._replace(applied=finite)
    if sync_free and not scaler.is_enabled():
        optimizer.found_inf = (~finite).float()  # the fused kernel skips the update where 1
    scaler.step(optimizer)
    scaler.update()
    return result._replace(applied=finite)


class Trainer:
    """Holds what changes while training: model, optimiser, schedule, step, RNG, history."""

    def __init__(self, config: Config, dist_ctx: distributed.Context | None = None):
        self.config = config
        tc = config.train
        set_threads(tc.num_threads)
        self.dist = dist_ctx or distributed.Context(device=resolve_device(tc.device))
        self.device = self.dist.device
        self.precision = resolve_precision(tc.precision, self.device)
        self.compile = resolve_compile(tc.compile, self.device)
        seed_everything(config.seed)

        with distributed.main_first(self.dist):  # rank 0 makes the phantom and the cache
            splits = data_splits(config.data, config.seed)
            self.splits = split_record(splits)  # predict checks its test split against it
            prep = preprocessing(config)
            load = {"cache_dir": config.data.cache_dir, "on_bad_file": config.data.on_bad_file,
                    "workers": config.data.workers, "progress": interactive() and self.dist.is_main}
            self.train_set = load_split(splits.train, prep, name="train", **load)
            self.val_set = load_split(splits.validate, prep, name="validate", **load)

        if len(self.val_set.images) < self.dist.world_size:
            raise UserError(f"{len(self.val_set.images)} validation slices for {self.dist.world_size} "
                            "processes: each needs at least one; run fewer processes or add slices")
        self.model = VQVAE2(**config.model.model_dump()).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        # Training steps run through DistributedDataParallel (several processes) and/or
        # torch.compile; evaluation and checkpoints use the plain module (same parameters),
        # so saved weights carry no `module.` or compile prefix.
        self.step_model = self.model
        if self.dist.active:
            # The quantizer keeps the codebook buffers identical itself (all-reduced statistics,
            # rank 0's restarts broadcast), so DDP need not broadcast buffers every step.
            ddp = torch.nn.parallel.DistributedDataParallel
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(ddp).parameters
                              else {"broadcast_buffers": False})
            self.step_model = ddp(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                  else None, **no_buffer_sync)
        if self.compile:
            self.step_model = torch.compile(self.step_model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        # On CUDA a step never waits for the GPU: NaN/Inf skips happen on the device (fused Adam's
        # found_inf) and are counted there, read every SYNC_EVERY steps. On the CPU a tensor's
        # value is at hand anyway, so the plain (foreach) Adam and an exact per-step check serve.
        self.sync_free = sync_free_steps(self.device)
        self.optimizer = opt_cls(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                 **({"fused": True} if self.sync_free else {}))
        # train.batch_size is per process: one step of N processes sees N x batch_size slices.
        per_rank = math.ceil(len(self.train_set.images) / self.dist.world_size)
        self.steps_per_epoch = math.ceil(per_rank / tc.batch_size)
        # With train.max_time the budget, not the epochs, sets the length: _fit_to_budget sets
        # total_steps once steps are timed (max_steps still caps it).
        self.total_steps = UNTIMED if tc.max_time else tc.epochs * self.steps_per_epoch
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.fit_after = max(tc.warmup_steps, BUDGET_FIT_AFTER)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, tc.warmup_steps, tc.schedule,
                                                tc.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.recon_loss_fn = functools.partial(reconstruction_loss, kind=tc.loss, ssim_weight=tc.ssim_weight,
                                               normalize=config.data.normalize)
        self.shuffle = torch.Generator().manual_seed(config.seed)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0          # batches of the current epoch already trained
        self.epoch_shuffle_state = self.shuffle.get_state()
        self.best_ssim = -math.inf
        self.nonfinite_in_a_row = 0
        # Sync-free mode: NaN/Inf steps in a row now, and the longest such run since the last check.
        self.nonfinite_run = torch.zeros((), dtype=torch.long, device=self.device)
        self.nonfinite_worst = torch.zeros((), dtype=torch.long, device=self.device)
        self.compiled_once = False
        self.stop_signal: int | None = None
        self.history: list[dict] = []
        self.elapsed = 0.0  # seconds spent in training steps
        self.clock = time.perf_counter  # the budget's clock (tests replace it)
        self.loop_start = self.clock()
        self.wall_before = 0.0
        self._reset_running()
        n_val = len(self.val_set.images)
        k = min(tc.sample_size, n_val)
        self.sample_index = np.linspace(0, n_val - 1, k).round().astype(int).tolist()
        self.writer = None

    # ------------------------------------------------------------------ state ----------
    def _reset_running(self) -> None:
        # Sums over the steps since the last evaluation, kept on the device: no host sync per step.
        # [loss, recon, commitment, ssim sum, ssim count, applied steps, top restarts, bottom
        # restarts], summed on the device.
        self.running = torch.zeros(RUNNING_SUMS, dtype=torch.float64, device=self.device)
        self.running_steps = 0
        self.running_images = 0
        self.running_time = 0.0

    def state_dict(self, running: torch.Tensor | None = None) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            "precision": self.precision,  # the training precision; scores are always fp32
            "splits": self.splits,
            "best_ssim": self.best_ssim,
            "elapsed_s": self.elapsed,
            "wall_s": self.wall_clock(),
            "total_steps": self.total_steps,
            "rng": {
                "shuffle_epoch_start": self.epoch_shuffle_state,
                "torch": torch.get_rng_state(),
                "numpy": _numpy_rng_state(),
                "python": _python_rng_state(),
            },
            "running": {"sums": (self.running if running is None else running).cpu(),
                        "steps": self.running_steps,
                        "images": self.running_images, "time": self.running_time},
            "normalization": {"policy": self.config.data.normalize,
                              "percentiles": list(self.config.data.percentiles),
                              "image_size": list(self.config.data.image_size)},
        }

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != self.dist.world_size:
            # Steps per epoch, the shards and the schedule all depend on the number of processes.
            how = ("mrivq train --resume" if saved_world == 1
                   else f"torchrun --nproc_per_node {saved_world} -m mrivq train --resume (on one node)")
            raise UserError(f"{path} was saved by a run of {saved_world} process(es), this is "
                            f"{self.dist.world_size}; resume it with `{how}`, or start a new run")
        load_model_state(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.best_ssim = float(ckpt["best_ssim"])
        self.elapsed = float(ckpt["elapsed_s"])
        self.wall_before = float(ckpt.get("wall_s", self.elapsed))
        if self.config.train.max_time and "total_steps" in ckpt:  # the budget's schedule, as fitted
            self.total_steps = int(ckpt["total_steps"])
        rng = ckpt["rng"]
        self.epoch_shuffle_state = rng["shuffle_epoch_start"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state_from(rng["numpy"]))
        random.setstate(_python_state_from(rng["python"]))
        running = ckpt["running"]
        sums = running["sums"]
        if len(sums) == 5:  # written before the applied-steps count existed: all steps were applied
            sums = torch.cat([sums, torch.tensor([float(running["steps"])], dtype=sums.dtype)])
        sums = torch.cat([sums, sums.new_zeros(RUNNING_SUMS - len(sums))])  # before restart counts
        self.running = sums.to(self.device)
        self.running_steps, self.running_images = int(running["steps"]), int(running["images"])
        self.running_time = float(running["time"])
        # Rows written after this checkpoint (then lost to a kill) are dropped: they will be redone.
        self.history = read_metrics(self.config.run_dir / "metrics.csv", up_to_step=self.step)
        if self.dist.is_main:
            write_metrics(self.config.run_dir / "metrics.csv", self.history)

    # ------------------------------------------------------------------ loop -----------
    def train_step(self, batch: torch.Tensor) -> bool:
        """One optimiser step on ``batch`` ``(B, 1, H, W)``; False (and nothing applied) when the
        loss or a gradient is NaN or Inf. Sync-free (CUDA) steps always return True and count
        skips on the device instead."""
        tc = self.config.train
        first_compiled = self.compile and not self.compiled_once
        before = {name: buf.clone() for name, buf in self.model.named_buffers()} if first_compiled else {}
        try:
            result = optimisation_step(self.step_model, self.optimizer, self.scaler, batch, device=self.device,
                                       precision=self.precision,
                                       latent_loss_weight=tc.latent_loss_weight,
                                       grad_clip=tc.grad_clip, sync_free=self.sync_free,
                                       recon_loss_fn=self.recon_loss_fn)
        except Exception as exc:  # torch.compile could not build this model here: go on eagerly
            if not self.compile or self.compiled_once:
                raise
            log.warning("torch.compile failed (%s); training continues without it",
                        str(exc).splitlines()[0][:160])
            self.compile = False
            self.step_model = getattr(self.step_model, "_orig_mod", self.model)
            with torch.no_grad():  # a compiled forward may have run (and moved the codebooks) already
                for name, buf in self.model.named_buffers():
                    buf.copy_(before[name])
            return self.train_step(batch)
        self.compiled_once = True
        self.scheduler.step()  # the schedule follows self.step, skipped steps included
        ok = result.applied
        if not self.sync_free and not ok:
            return False
        losses = torch.stack([result.loss, result.recon_loss, result.commitment_loss]).double()
        self.running[:3] += torch.where(ok, losses, 0.0)
        self.running[5] += ok.double()
        restarts = torch.stack([self.model.quantize_top.n_restarted, self.model.quantize_bottom.n_restarted])
        self.running[6:8] += torch.where(ok, restarts.double(), 0.0)
        if self.running_steps % TRAIN_SSIM_EVERY == 0:
            # Training SSIM on every few batches is enough for the curve and costs ~1 % instead of ~6 %.
            scored = metrics.to_unit_range(result.reconstruction, batch, self.config.data.normalize)
            ssim = metrics.ssim_per_image(*scored).mean().double()
            self.running[3] += torch.where(ok, ssim, 0.0)
            self.running[4] += ok.double()
        if self.sync_free:
            self.nonfinite_run = torch.where(ok, 0, self.nonfinite_run + 1)
            self.nonfinite_worst = torch.maximum(self.nonfinite_worst, self.nonfinite_run)
        self.running_steps += 1
        self.running_images += len(batch)
        return True

    def run(self) -> dict:
        cfg, tc = self.config, self.config.train
        length = (f"as many steps as fit train.max_time ({tc.max_time:.0f} s)" if self.total_steps == UNTIMED
                  else f"{self.total_steps} steps in all")
        log.info("training on %d slices, validating on %d; %d steps per epoch, %s",
                 len(self.train_set.images), len(self.val_set.images), self.steps_per_epoch, length)
        log.info("device %s, precision %s (validation scored in %s), torch.compile %s, %d threads; "
                 "model %.2fM parameters", self.device, self.precision, metrics.SCORING_PRECISION,
                 "on" if self.compile else "off",
                 torch.get_num_threads(),
                 sum(p.numel() for p in self.model.parameters()) / 1e6)
        if self.dist.active:
            log.info("distributed: %d processes (%s), batch %d per process, %d per step",
                     self.dist.world_size, torch.distributed.get_backend(), tc.batch_size,
                     tc.batch_size * self.dist.world_size)
        if tc.tensorboard and self.dist.is_main:
            self.writer = _tensorboard_writer(cfg.log_dir / "tensorboard")
        with logging_redirect_tqdm(loggers=[log]):
            self._loop()
        if self.writer:
            self.writer.close()
        distributed.barrier(self.dist)
        best = max(self.history, key=lambda r: r["val_ssim"]) if self.history else {}
        log.info("done: %d steps in %.0f s of training; best validation SSIM %.4f at step %s",
                 self.step, self.elapsed, self.best_ssim, best.get("step"))
        return {"steps": self.step, "best_ssim": self.best_ssim, "best_step": best.get("step"),
                "run_dir": str(cfg.run_dir), "train_seconds": self.elapsed}

    def wall_clock(self) -> float:
        """Wall-clock seconds of the training loop so far (evaluations included), over resumes."""
        return self.wall_before + self.clock() - self.loop_start

    def _fit_to_budget(self, bar) -> None:
        """train.max_time: fit total_steps (and so the schedule) to the time left, at the rate so
        far, evaluations included. Every rank calls this at the same steps and takes rank 0's."""
        tc = self.config.train
        if not tc.max_time or self.step < self.fit_after or self.step >= self.total_steps:
            return
        wall = self.wall_clock()
        per_step = wall / self.step
        total = self.step + max(0, int((tc.max_time - wall) / per_step))
        total = min(total, tc.max_steps or total)
        if self.dist.active:
            mine = torch.tensor([total if self.dist.is_main else 0], dtype=torch.float64, device=self.device)
            total = int(distributed.sum_(self.dist, mine).item())
        if self.step == self.fit_after:
            log.info("train.max_time %.0f s: %d steps in all at %.3f s per step so far (evaluations "
                     "included); the schedule follows", tc.max_time, total, per_step)
        self.total_steps = max(total, self.step)
        bar.total = self.total_steps
        bar.refresh()

    def _loop(self) -> None:
        tc = self.config.train
        images = self.train_set.images
        n = len(images)
        self.loop_start = self.clock()
        bar = tqdm(total=None if self.total_steps == UNTIMED else self.total_steps, initial=self.step, desc="train",
                   disable=not (interactive() and self.dist.is_main),
                   dynamic_ncols=True)
        while self.step < self.total_steps:
            self.shuffle.set_state(self.epoch_shuffle_state)
            order = distributed.shard(torch.randperm(n, generator=self.shuffle).numpy(), self.dist)
            next_epoch_state = self.shuffle.get_state()
            # A finished epoch rolls over below, rather than looping without stepping.
            self.batch_in_epoch = min(self.batch_in_epoch, self.steps_per_epoch)
            self.model.train()
            for b in range(self.batch_in_epoch, self.steps_per_epoch):  # empty if the epoch is done
                if self.step >= self.total_steps:
                    break
                idx = np.sort(order[b * tc.batch_size:(b + 1) * tc.batch_size])
                t0 = time.perf_counter()
                batch = augment_from_config(slices_to_batch(images[idx], self.device), self.config.data)
                applied = self.train_step(batch)
                self.step += 1
                self.batch_in_epoch = b + 1
                epoch_done = self.batch_in_epoch == self.steps_per_epoch
                due = (self.step % tc.interval == 0 or self.step % tc.checkpoint_every == 0 or epoch_done
                       or self.step == self.total_steps)
                # On the CPU every step checks; on CUDA every SYNC_EVERY steps and before any save.
                check = not self.sync_free or due or self.step % SYNC_EVERY == 0
                if check:
                    self._check_nonfinite(applied)
                if self.device.type == "cuda" and self.step % tc.interval == 0:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.running_time += dt
                self.elapsed += dt
                bar.update(1)
                if self.step == self.fit_after:
                    self._fit_to_budget(bar)
                elif tc.max_time and not self.dist.active and self.wall_clock() >= tc.max_time:
                    self.total_steps = self.step  # out of time: evaluate, save and end now
                stopping = self.stop_signal is not None  # one snapshot: the handler may fire any time
                if self.dist.active:
                    # A signal may reach the ranks at different steps: stop only on an agreed value,
                    # checked where every rank checks, so all make the same collective calls.
                    stopping = check and distributed.any_rank(self.dist, stopping)
                    if stopping and self.stop_signal is None:
                        self.stop_signal = signal.SIGTERM
                if self.nonfinite_in_a_row and self.step < self.total_steps and not stopping:
                    pass  # nothing new to evaluate or save: last.pt stays the last good step
                elif self.step % tc.interval == 0 or epoch_done or self.step == self.total_steps:
                    self.evaluate_and_save(epoch_end=epoch_done)
                    self._fit_to_budget(bar)  # evaluations take time too: refit
                elif self.step % tc.checkpoint_every == 0 or stopping:
                    self.save_last()
                if stopping:
                    raise TrainingInterrupted(self.stop_signal, self.step, self.config.run_dir)
            if self.batch_in_epoch == self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.epoch_shuffle_state = next_epoch_state
        bar.close()

    # --------------------------------------------------------------- evaluation ---------
    def evaluate_and_save(self, *, epoch_end: bool) -> None:
        cfg, tc = self.config, self.config.train
        val = self._validate()
        scores = val.scalars(tc.latent_loss_weight)
        row = {"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0]}
        if self.running_steps:
            sums = self._mean_running().tolist()
            images = self.running_images * self.dist.world_size
            applied = max(sums[5], 1)
            row.update(train_loss=sums[0] / applied,
                       train_recon_loss=sums[1] / applied,
                       train_commitment_loss=sums[2] / applied,
                       train_ssim=sums[3] / max(sums[4], 1),
                       top_restarts=sums[6], bottom_restarts=sums[7],
                       train_images_per_s=images / max(self.running_time, 1e-9))
        row.update({f"val_{k}": v for k, v in scores.items() if k != "images_per_s"})
        row["val_images_per_s"] = scores["images_per_s"]
        row["elapsed_s"] = self.elapsed
        self.history.append(row)
        self._reset_running()
        if not self.dist.is_main:  # every rank has the same row (and best); rank 0 writes
            self.best_ssim = max(self.best_ssim, row["val_ssim"])
            self.save_last()
            return
        write_metrics(cfg.run_dir / "metrics.csv", self.history)
        message = (f"epoch {self.epoch} step {self.step}/{self.total_steps}: "
                   f"train loss {row.get('train_loss', math.nan):.5f} SSIM {row.get('train_ssim', math.nan):.4f} | "
                   f"val loss {row['val_loss']:.5f} SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} dB | "
                   f"codes top {row['val_top_used']}/{self.model.quantize_top.n_embed} "
                   f"(ppl {row['val_top_perplexity']:.0f}, {row.get('top_restarts', 0):.0f} restarts) "
                   f"bottom {row['val_bottom_used']}/{self.model.quantize_bottom.n_embed} "
                   f"(ppl {row['val_bottom_perplexity']:.0f}, {row.get('bottom_restarts', 0):.0f} restarts) | "
                   f"{row.get('train_images_per_s', math.nan):.1f} images/s")
        log.info(message)
        if self.writer:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.writer.add_scalar(key, value, self.step)
        if row["val_ssim"] > self.best_ssim:
            self.best_ssim = row["val_ssim"]
            save_checkpoint(cfg.model_dir / "best.pt", self.state_dict())
            export_safetensors(self.model, cfg, cfg.model_dir / "model.safetensors")
            log.info("new best validation SSIM %.4f: saved %s", self.best_ssim, cfg.model_dir / "best.pt")
        self.save_last()
        plot_curves(self.history, cfg.visual_dir)
        write_report(cfg.run_dir)
        if epoch_end or self.step == self.total_steps:
            inputs = np.stack([val.kept[i][0] for i in self.sample_index])
            recons = np.stack([val.kept[i][1] for i in self.sample_index])
            save_sample_grid(inputs, recons, cfg.sample_dir / f"epoch_{self.epoch}.png",
                             title=f"epoch {self.epoch}, step {self.step}: validation SSIM "
                                   f"{row['val_ssim']:.4f}",
                             labels=[f"{float(val.ssim[i]):.3f}" for i in self.sample_index])
            if self.writer:
                self.writer.add_images("validation/inputs_over_reconstructions",
                                       np.concatenate([inputs, recons], axis=1)[:, None], self.step)

    def _check_nonfinite(self, applied: bool) -> None:
        """Count NaN/Inf steps in a row; stop the run after train.max_nonfinite_steps of them."""
        limit = self.config.train.max_nonfinite_steps
        if self.sync_free:  # counted on the device since the last check: one read now
            run, worst = (int(v) for v in torch.stack([self.nonfinite_run, self.nonfinite_worst]).tolist())
            self.nonfinite_worst.zero_()
            self.nonfinite_in_a_row, longest = run, worst
            if worst:
                log.warning("up to step %d: %d NaN/Inf steps in a row skipped", self.step, worst)
        else:
            self.nonfinite_in_a_row = 0 if applied else self.nonfinite_in_a_row + 1
            longest = self.nonfinite_in_a_row
            if longest:
                log.warning("step %d: loss or gradient is NaN or Inf; step skipped (%d in a row)", self.step,
                            longest)
        if longest >= limit:
            raise UserError(
                f"training stopped: the loss or a gradient was NaN or Inf for {longest} steps in a row (up to step "
                f"{self.step}); models/last.pt and best.pt hold the last good state; lower train.lr "
                "or check the data")

    def save_last(self) -> None:
        """Rank 0 writes models/last.pt; every rank must call this (state_dict reduces over ranks)."""
        state = self.state_dict(running=self._mean_running())
        if self.dist.is_main:
            save_checkpoint(self.config.model_dir / "last.pt", state)

    def _mean_running(self) -> torch.Tensor:
        """The running training sums averaged over ranks (one all-reduce under torchrun).

        On resume every rank starts from this average, so the average over ranks at the next
        evaluation is still the mean over all ranks' steps."""
        if not self.dist.active:
            return self.running
        return distributed.sum_(self.dist, self.running.clone()) / self.dist.world_size

    def _validate(self) -> Evaluation:
        """Validation scores of the whole validation set; under torchrun each rank scores every
        ``world_size``-th slice and the per-slice results are gathered back in order."""
        tc = self.config.train
        n = len(self.val_set.images)
        mine = np.arange(self.dist.rank, n, self.dist.world_size)
        wanted = set(self.sample_index)
        part = evaluate(self.model, self.val_set.images[mine] if self.dist.active else self.val_set.images,
                        batch_size=tc.val_batch_size or tc.batch_size, device=self.device,
                        normalize=self.config.data.normalize, loss_fn=self.recon_loss_fn, keep=[j for j, i in enumerate(mine) if i in wanted])
        if not self.dist.active:
            return part
        part.kept = {int(mine[j]): pictures for j, pictures in part.kept.items()}
        return merge_evaluations(distributed.gather(self.dist, (mine, part)), n)


def merge_evaluations(parts: list[tuple[np.ndarray, Evaluation]], n: int) -> Evaluation:
    """One Evaluation of ``n`` slices from parts that each scored the slices at their indices."""
    def per_slice(name):
        if getattr(parts[0][1], name) is None:
            return None
        out = torch.empty(n, dtype=getattr(parts[0][1], name).dtype)
        for index, part in parts:
            out[torch.as_tensor(index)] = getattr(part, name)
        return out

    sizes = [len(index) for index, _ in parts]
    return dataclasses.replace(
        parts[0][1],
        ssim=per_slice("ssim"), psnr=per_slice("psnr"), mse=per_slice("mse"), mae=per_slice("mae"),
        regions={},  # validation scores whole slices only
        recon_loss=sum(p.recon_loss * k for (_, p), k in zip(parts, sizes)) / n,
        commitment_loss=sum(p.commitment_loss * k for (_, p), k in zip(parts, sizes)) / n,
        counts_top=sum(p.counts_top for _, p in parts),
        counts_bottom=sum(p.counts_bottom for _, p in parts),
        images_per_s=sum(p.images_per_s for _, p in parts),
        kept={i: pictures for _, p in parts for i, pictures in p.kept.items()},
    )


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

def train(config: Config, *, resume: str | Path | None = None, overwrite: bool = False) -> dict:
    """Train a VQ-VAE-2 per ``config`` (or continue the run in ``resume``); returns a summary."""
    if resume is not None:
        run_dir = Path(resume).expanduser().absolute()
        last = run_dir / "models" / "last.pt"
        if run_config_path(run_dir) is None or not last.is_file():
            raise UserError(f"{run_dir}: not a run directory to resume (expected config.yaml and "
                            "models/last.pt from an earlier `mrivq train`)")
        ckpt = load_checkpoint(last)
        config = checkpoint_config(ckpt, last)
        config.output.dir = run_dir
    else:
        ckpt = None
    # Under torchrun (WORLD_SIZE > 1) this process joins the group; rank 0 alone writes.
    dist_ctx = distributed.setup(resolve_device(config.train.device))
    try:
        if ckpt is None:
            claim_run_dir(config, "train", overwrite, remove=dist_ctx.is_main)
            distributed.barrier(dist_ctx)  # every rank checks the folders before rank 0 writes to them
        logger = run_logger(config.log_dir / "training.log") if dist_ctx.is_main else contextlib.nullcontext()
        with recording(config.run_dir, "train"), logger:
            trainer = Trainer(config, dist_ctx)
            if dist_ctx.is_main:
                config_path = config_destination(config)
                atomic_write(config_path, lambda fh: fh.write(config.to_yaml().encode()))
                if config_path.name != "config.yaml":
                    log.info("kept %s (the config that was read, or a file mrivq did not write); "
                             "wrote the resolved config to %s", config.run_dir / "config.yaml", config_path)
            if ckpt is not None:
                trainer.load_state_dict(ckpt, config.model_dir / "last.pt")
                log.info("resumed %s at epoch %d, step %d", config.run_dir, trainer.epoch, trainer.step)
            with stop_on_signals(trainer):
                return trainer.run()
    finally:
        distributed.teardown(dist_ctx)


def write_metrics(path: Path, rows: list[dict], columns: list[str] = METRIC_COLUMNS) -> None:
    """metrics.csv from all rows so far, replaced atomically: a kill never leaves half a row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda fh: fh.write(buf.getvalue().encode()))


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Rows of metrics.csv as dicts of floats (blank cells dropped), optionally up to a step."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        rows = [{k: float(v) for k, v in raw.items() if v not in ("", None)} for raw in csv.DictReader(fh)]
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard is true but TensorBoard is not installed; "
                        "pip install 'mrivq[tensorboard]' or set train.tensorboard: false") from None
    return SummaryWriter(str(log_dir))


def _numpy_rng_state() -> dict:
    _name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_state_from(state: dict):
    return ("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
            state["gauss"])


def _python_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from(state: dict):
    return (state["version"], tuple(state["internal"]), state["gauss"])
