"""Training: setup -> loop -> evaluate -> checkpoint, as one straight story.

``train(config)`` trains a VQ-VAE-2 on the configured data and fills the run directory
(see ARCHITECTURE.md): config.yaml, logging/training.log, metrics.csv, samples/epoch_{i}.png,
visuals/{losses,ssims}.png, models/{best,last}.pt and models/model.safetensors.

Loss = reconstruction MSE + ``latent_loss_weight`` x commitment loss. The learning rate
warms up linearly for ``warmup_steps`` and then follows a cosine down to
``min_lr_ratio`` x ``lr`` (or stays constant).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import random
import shutil
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

from . import metrics
from .checkpoint import (
    atomic_write,
    checkpoint_config,
    export_safetensors,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from .config import Config
from .data.cache import load_split
from .data.sources import data_splits
from .errors import TrainingInterrupted, UserError
from .evaluate import evaluate, preprocessing, slices_to_batch
from .logs import interactive, run_logger
from .models import VQVAE2
from .report import plot_curves, save_sample_grid
from .runtime import autocast, resolve_device, resolve_precision, seed_everything, set_threads

log = logging.getLogger("mrivq")

METRIC_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_recon_loss", "train_commitment_loss", "train_ssim",
    "val_loss", "val_recon_loss", "val_commitment_loss", "val_ssim", "val_psnr",
    "val_top_used", "val_top_perplexity", "val_bottom_used", "val_bottom_perplexity",
    "train_images_per_s", "val_images_per_s", "elapsed_s",
]

TRAIN_SSIM_EVERY = 5



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
        log.warning("%s received: finishing the current step, then saving models/last.pt",
                    signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StepResult(NamedTuple):
    """Detached results of one applied optimisation step."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    commitment_loss: torch.Tensor
    reconstruction: torch.Tensor  # (B, 1, H, W) float32


def optimisation_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, batch: torch.Tensor, *, device: torch.device,
                      precision: str, latent_loss_weight: float,
                      grad_clip: float | None) -> StepResult | None:
    """Forward, loss, backward, clip, optimiser step on ``batch`` ``(B, 1, H, W)`` in [0, 1].

    Loss = reconstruction MSE + ``latent_loss_weight`` x commitment loss. Returns None, with
    nothing applied (the forward pass's EMA codebook update is undone too), when the loss is
    NaN or Inf.
    """
    codebooks = {name: buf.clone() for name, buf in model.named_buffers()}
    with autocast(device, precision):
        out = model(batch)
    reconstruction = out.reconstruction.float()
    recon_loss = F.mse_loss(reconstruction, batch)
    commitment_loss = out.commitment_loss.float()
    loss = recon_loss + latent_loss_weight * commitment_loss
    if not torch.isfinite(loss).item():
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(codebooks[name])
        return None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return StepResult(loss.detach(), recon_loss.detach(), commitment_loss.detach(), reconstruction.detach())


class Trainer:
    """Holds what changes while training: model, optimiser, schedule, step, RNG, history."""

    def __init__(self, config: Config):
        self.config = config
        tc = config.train
        set_threads(tc.num_threads)
        self.device = resolve_device(tc.device)
        self.precision = resolve_precision(tc.precision, self.device)
        seed_everything(config.seed)

        splits = data_splits(config.data, config.seed)
        prep = preprocessing(config)
        load = dict(cache_dir=config.data.cache_dir, on_bad_file=config.data.on_bad_file,
                    workers=config.data.workers, progress=interactive())
        self.train_set = load_split(splits.train, prep, name="train", **load)
        self.val_set = load_split(splits.validate, prep, name="validate", **load)

        self.model = VQVAE2(**config.model.model_dump()).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        # Training steps may run through torch.compile; evaluation and checkpoints use the
        # plain module (same parameters), so saved weights carry no compile prefix.
        self.step_model = torch.compile(self.model) if tc.compile else self.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_set.images) / tc.batch_size)
        self.total_steps = tc.epochs * self.steps_per_epoch
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, tc.warmup_steps, tc.schedule,
                                                tc.min_lr_ratio))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.shuffle = torch.Generator().manual_seed(config.seed)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0          # batches of the current epoch already trained
        self.epoch_shuffle_state = self.shuffle.get_state()
        self.best_ssim = -math.inf
        self.nonfinite_in_a_row = 0
        self.compiled_once = False
        self.stop_signal: int | None = None
        self.history: list[dict] = []
        self.elapsed = 0.0
        self._reset_running()
        n_val = len(self.val_set.images)
        k = min(tc.sample_size, n_val)
        self.sample_index = np.linspace(0, n_val - 1, k).round().astype(int).tolist()
        self.writer = None

    # ------------------------------------------------------------------ state ----------
    def _reset_running(self) -> None:
        # Sums over the steps since the last evaluation, kept on the device: no host sync per step.
        self.running = torch.zeros(5, dtype=torch.float64, device=self.device)
        self.running_steps = 0
        self.running_images = 0
        self.running_time = 0.0

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_ssim": self.best_ssim,
            "elapsed_s": self.elapsed,
            "rng": {
                "shuffle_epoch_start": self.epoch_shuffle_state,
                "torch": torch.get_rng_state(),
                "numpy": _numpy_rng_state(),
                "python": _python_rng_state(),
            },
            "running": {"sums": self.running.cpu(), "steps": self.running_steps,
                        "images": self.running_images, "time": self.running_time},
            "normalization": {"policy": self.config.data.normalize,
                              "percentiles": list(self.config.data.percentiles),
                              "image_size": list(self.config.data.image_size)},
        }

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        load_model_state(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.best_ssim = float(ckpt["best_ssim"])
        self.elapsed = float(ckpt["elapsed_s"])
        rng = ckpt["rng"]
        self.epoch_shuffle_state = rng["shuffle_epoch_start"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state_from(rng["numpy"]))
        random.setstate(_python_state_from(rng["python"]))
        running = ckpt["running"]
        self.running = running["sums"].to(self.device)
        self.running_steps, self.running_images = int(running["steps"]), int(running["images"])
        self.running_time = float(running["time"])
        # Rows written after this checkpoint (then lost to a kill) are dropped: they will be redone.
        self.history = read_metrics(self.config.run_dir / "metrics.csv", up_to_step=self.step)
        write_metrics(self.config.run_dir / "metrics.csv", self.history)

    # ------------------------------------------------------------------ loop -----------
    def train_step(self, batch: torch.Tensor) -> bool:
        """One optimiser step on ``batch`` ``(B, 1, H, W)``; False (and nothing applied) when the
        loss is NaN or Inf."""
        tc = self.config.train
        try:
            result = optimisation_step(self.step_model, self.optimizer, self.scaler, batch, device=self.device,
                                       precision=self.precision,
                                       latent_loss_weight=tc.latent_loss_weight,
                                       grad_clip=tc.grad_clip)
        except Exception as exc:  # torch.compile could not build this model here: go on eagerly
            if self.step_model is self.model or self.compiled_once:
                raise
            log.warning("torch.compile failed (%s); training continues without it",
                        str(exc).splitlines()[0][:160])
            self.step_model = self.model
            return self.train_step(batch)
        self.compiled_once = True
        if result is None:
            return False
        self.scheduler.step()
        self.running[:3] += torch.stack([result.loss, result.recon_loss, result.commitment_loss]).double()
        if self.running_steps % TRAIN_SSIM_EVERY == 0:
            # Training SSIM on every few batches is enough for the curve and costs ~1 % instead of ~6 %.
            self.running[3] += metrics.ssim_per_image(result.reconstruction, batch).mean().double()
            self.running[4] += 1
        self.running_steps += 1
        self.running_images += len(batch)
        return True

    def run(self) -> dict:
        cfg, tc = self.config, self.config.train
        log.info("training on %d slices, validating on %d; %d steps per epoch, %d steps in all",
                 len(self.train_set.images), len(self.val_set.images), self.steps_per_epoch,
                 self.total_steps)
        log.info("device %s, precision %s, torch.compile %s, %d threads; model %.2fM parameters",
                 self.device, self.precision, "on" if self.step_model is not self.model else "off",
                 torch.get_num_threads(),
                 sum(p.numel() for p in self.model.parameters()) / 1e6)
        if tc.tensorboard:
            self.writer = _tensorboard_writer(cfg.log_dir / "tensorboard")
        with logging_redirect_tqdm(loggers=[log]):
            self._loop()
        if self.writer:
            self.writer.close()
        best = max(self.history, key=lambda r: r["val_ssim"]) if self.history else {}
        log.info("done: %d steps in %.0f s of training; best validation SSIM %.4f at step %s",
                 self.step, self.elapsed, self.best_ssim, best.get("step"))
        return {"steps": self.step, "best_ssim": self.best_ssim, "best_step": best.get("step"),
                "run_dir": str(cfg.run_dir), "train_seconds": self.elapsed}

    def _loop(self) -> None:
        tc = self.config.train
        images = self.train_set.images
        n = len(images)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not interactive(),
                   dynamic_ncols=True)
        while self.step < self.total_steps:
            self.shuffle.set_state(self.epoch_shuffle_state)
            order = torch.randperm(n, generator=self.shuffle).numpy()
            next_epoch_state = self.shuffle.get_state()
            self.model.train()
            for b in range(self.batch_in_epoch, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                idx = np.sort(order[b * tc.batch_size:(b + 1) * tc.batch_size])
                t0 = time.perf_counter()
                applied = self.train_step(slices_to_batch(images[idx], self.device))
                self.nonfinite_in_a_row = 0 if applied else self.nonfinite_in_a_row + 1
                if self.nonfinite_in_a_row:
                    log.warning("step %d: loss is NaN or Inf; step skipped (%d in a row)",
                                self.step + 1, self.nonfinite_in_a_row)
                    if self.nonfinite_in_a_row >= tc.max_nonfinite_steps:
                        raise UserError(
                            f"training stopped: the loss was NaN or Inf for {self.nonfinite_in_a_row} "
                            f"steps in a row (up to step {self.step + 1}); models/last.pt and best.pt "
                            "hold the last good state; lower train.lr or check the data")
                self.step += 1
                self.batch_in_epoch = b + 1
                if self.device.type == "cuda" and self.step % tc.interval == 0:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                self.running_time += dt
                self.elapsed += dt
                bar.update(1)
                epoch_done = self.batch_in_epoch == self.steps_per_epoch
                if self.nonfinite_in_a_row and self.step < self.total_steps and not self.stop_signal:
                    pass  # nothing new to evaluate or save: last.pt stays the last good step
                elif self.step % tc.interval == 0 or epoch_done or self.step == self.total_steps:
                    self.evaluate_and_save(epoch_end=epoch_done)
                elif self.step % tc.checkpoint_every == 0 or self.stop_signal:
                    self.save_last()
                if self.stop_signal:
                    raise TrainingInterrupted(self.stop_signal, self.step, self.config.run_dir)
            if self.batch_in_epoch == self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                self.epoch_shuffle_state = next_epoch_state
        bar.close()

    # --------------------------------------------------------------- evaluation ---------
    def evaluate_and_save(self, *, epoch_end: bool) -> None:
        cfg, tc = self.config, self.config.train
        val = evaluate(self.model, self.val_set.images, batch_size=tc.val_batch_size or tc.batch_size,
                       device=self.device, precision=self.precision, keep=self.sample_index)
        scores = val.scalars(tc.latent_loss_weight)
        row = {"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0]}
        if self.running_steps:
            sums = self.running.tolist()
            row.update(train_loss=sums[0] / self.running_steps,
                       train_recon_loss=sums[1] / self.running_steps,
                       train_commitment_loss=sums[2] / self.running_steps,
                       train_ssim=sums[3] / max(sums[4], 1),
                       train_images_per_s=self.running_images / max(self.running_time, 1e-9))
        row.update({f"val_{k}": v for k, v in scores.items() if k != "images_per_s"})
        row["val_images_per_s"] = scores["images_per_s"]
        row["elapsed_s"] = self.elapsed
        self.history.append(row)
        self._reset_running()
        write_metrics(cfg.run_dir / "metrics.csv", self.history)
        message = (f"epoch {self.epoch} step {self.step}/{self.total_steps}: "
                   f"train loss {row.get('train_loss', math.nan):.5f} SSIM {row.get('train_ssim', math.nan):.4f} | "
                   f"val loss {row['val_loss']:.5f} SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} dB | "
                   f"codes top {row['val_top_used']}/{self.model.quantize_top.n_embed} "
                   f"(ppl {row['val_top_perplexity']:.0f}) bottom {row['val_bottom_used']}/"
                   f"{self.model.quantize_bottom.n_embed} (ppl {row['val_bottom_perplexity']:.0f}) | "
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

    def save_last(self) -> None:
        save_checkpoint(self.config.model_dir / "last.pt", self.state_dict())


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

def train(config: Config, *, resume: str | Path | None = None, overwrite: bool = False) -> dict:
    """Train a VQ-VAE-2 per ``config`` (or continue the run in ``resume``); returns a summary."""
    if resume is not None:
        run_dir = Path(resume).expanduser().absolute()
        last = run_dir / "models" / "last.pt"
        if not (run_dir / "config.yaml").is_file() or not last.is_file():
            raise UserError(f"{run_dir}: not a run directory to resume (expected config.yaml and "
                            "models/last.pt from an earlier `mrivq train`)")
        ckpt = load_checkpoint(last)
        config = checkpoint_config(ckpt, last)
        config.output.dir = run_dir
    else:
        _claim_run_dir(config, overwrite)
        ckpt = None
    with run_logger(config.log_dir / "training.log"):
        trainer = Trainer(config)
        atomic_write(config.run_dir / "config.yaml", lambda fh: fh.write(config.to_yaml().encode()))
        if ckpt is not None:
            trainer.load_state_dict(ckpt, config.model_dir / "last.pt")
            log.info("resumed %s at epoch %d, step %d", config.run_dir, trainer.epoch, trainer.step)
        with stop_on_signals(trainer):
            return trainer.run()


def _claim_run_dir(config: Config, overwrite: bool) -> None:
    # What a finished or interrupted run leaves; a new run must not silently replace it.
    outputs = (config.run_dir / "metrics.csv", config.model_dir / "last.pt", config.model_dir / "best.pt")
    existing = [path.name for path in outputs if path.exists()]
    if existing and not overwrite:
        raise UserError(f"{config.run_dir} already holds a run ({existing[0]}); continue it with "
                        f"--resume {config.run_dir}, choose another output.dir, or pass --overwrite")
    if existing:
        for folder in (config.model_dir, config.sample_dir, config.visual_dir, config.run_dir / "predict"):
            shutil.rmtree(folder, ignore_errors=True)
        for name in ("metrics.csv", "config.yaml"):
            (config.run_dir / name).unlink(missing_ok=True)
        (config.log_dir / "training.log").unlink(missing_ok=True)


def write_metrics(path: Path, rows: list[dict]) -> None:
    """metrics.csv from all rows so far, replaced atomically: a kill never leaves half a row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
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
    name, keys, pos, has_gauss, gauss = np.random.get_state()
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
