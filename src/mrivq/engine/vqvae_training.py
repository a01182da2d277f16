"""What training a VQ-VAE-2 adds to the loop: the model, its optimiser, its loss and its validation.

Loss = reconstruction loss (``train.loss``: MSE, L1 or an SSIM/L1 mix) +
``latent_loss_weight`` x commitment loss. The learning rate warms up linearly for
``warmup_steps`` and then follows a cosine down to ``min_lr_ratio`` x ``lr`` (or stays constant)
over the loop's total steps. Validation scores the whole validation set in float32
(:func:`mrivq.engine.evaluator.evaluate`), sharded between ranks under torchrun.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mrivq import metrics
from mrivq.compression.codec import slices_to_batch
from mrivq.config import Config
from mrivq.data.augment import augment
from mrivq.engine import distributed
from mrivq.engine import step as steps
from mrivq.engine.checkpoint import load_model_state
from mrivq.engine.evaluator import Evaluation, evaluate, merge_evaluations
from mrivq.engine.loop import LoopState, RunningSums
from mrivq.engine.losses import reconstruction_loss
from mrivq.errors import UserError
from mrivq.nn import VQVAE2
from mrivq.runtime import autocast

log = logging.getLogger("mrivq")

COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_recon_loss", "train_commitment_loss", "train_ssim",
    "val_loss", "val_recon_loss", "val_commitment_loss", "val_ssim", "val_psnr",
    "val_top_used", "val_top_perplexity", "val_bottom_used", "val_bottom_perplexity",
    "top_restarts", "bottom_restarts",
    "train_images_per_s", "val_images_per_s", "elapsed_s",
]
TRAIN_SSIM_EVERY = 5
# Training figures summed between evaluations (the order of old checkpoints' sums).
RUNNING = ("loss", "recon_loss", "commitment_loss", "ssim", "ssim_count", "applied", "top_restarts",
           "bottom_restarts")


def vqvae_loss(model: torch.nn.Module, batch: torch.Tensor, *, precision: str, latent_loss_weight: float,
               recon_loss_fn=F.mse_loss) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The VQ-VAE-2's training loss on ``batch`` ``(B, 1, H, W)``, as :func:`mrivq.engine.step.optimisation_step`
    takes it: ``(loss, {"recon_loss", "commitment_loss"}, reconstruction (B, 1, H, W) float32)``.

    The forward pass runs under ``precision``'s autocast; losses are computed in float32.
    """
    with autocast(batch.device, precision):
        out = model(batch)
    reconstruction = out.reconstruction.float()
    recon_loss = recon_loss_fn(reconstruction, batch)
    commitment_loss = out.commitment_loss.float()
    loss = recon_loss + latent_loss_weight * commitment_loss
    return loss, {"recon_loss": recon_loss.detach(), "commitment_loss": commitment_loss.detach()}, \
        reconstruction.detach()


class VQVAETraining:
    """The VQ-VAE-2 task of :class:`mrivq.engine.loop.TrainingLoop`.

    ``train_images`` and ``val_images``: ``(N, H, W)`` float32 model-input slices. ``state``: the
    loop's state, whose ``total_steps`` the learning-rate schedule follows.
    """

    score = "val_ssim"
    score_label = "validation SSIM"
    higher_is_better = True

    def __init__(self, config: Config, train_images: np.ndarray, val_images: np.ndarray, *,
                 dist: distributed.Context, precision: str, compile: bool, state: LoopState,
                 extra_state: dict | None = None):
        tc = config.train
        self.config, self.dist, self.device = config, dist, dist.device
        self.precision, self.compile, self.state = precision, compile, state
        self.train_images, self.val_images = train_images, val_images
        self.extra_state = extra_state or {}  # stored in every checkpoint (splits, ...)
        if len(val_images) < dist.world_size:
            raise UserError(f"{len(val_images)} validation slices for {dist.world_size} "
                            "processes: each needs at least one; run fewer processes or add slices")
        self.n_examples, self.batch_size = len(train_images), tc.batch_size
        self.model = VQVAE2(**config.model.model_dump()).to(self.device).to(memory_format=torch.channels_last)
        # Training steps run through DistributedDataParallel (several processes) and/or
        # torch.compile; evaluation and checkpoints use the plain module (same parameters),
        # so saved weights carry no `module.` or compile prefix.
        self.step_model = self.model
        if dist.active:
            # The quantizer keeps the codebook buffers identical itself (all-reduced statistics,
            # rank 0's restarts broadcast), so DDP need not broadcast buffers every step.
            ddp = torch.nn.parallel.DistributedDataParallel
            no_buffer_sync = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(ddp).parameters
                              else {"broadcast_buffers": False})
            self.step_model = ddp(self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                                  else None, **no_buffer_sync)
        if compile:
            self.step_model = torch.compile(self.step_model)
        self.compiled_once = False
        # On CUDA a step never waits for the GPU: NaN/Inf skips happen on the device (fused Adam's
        # found_inf) and the loop counts them there. On the CPU a tensor's value is at hand
        # anyway, so the plain (foreach) Adam and an exact per-step check serve.
        self.sync_free = steps.sync_free_steps(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = steps.build_optimizer(params, tc, fused=self.sync_free)
        self.scheduler = steps.build_schedule(self.optimizer, tc, state)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.recon_loss_fn = functools.partial(reconstruction_loss, kind=tc.loss, ssim_weight=tc.ssim_weight,
                                               normalize=config.data.normalize,
                                               clamped=tc.clamp_loss and config.data.normalize in metrics.UNIT_RANGE_POLICIES)
        # Evaluation and checkpoints use the weights' average when train.ema_decay asks for one.
        self.average = steps.WeightAverage(self.model, tc.ema_decay) if tc.ema_decay else None
        self.running = RunningSums(RUNNING, self.device)
        k = min(tc.sample_size, len(val_images))
        self.sample_index = np.linspace(0, len(val_images) - 1, k).round().astype(int).tolist()

    # ------------------------------------------------------------------ steps ----------
    def batch(self, indices: np.ndarray) -> torch.Tensor:
        """Training slices ``indices`` as a ``(B, 1, H, W)`` batch on the device, augmented."""
        d = self.config.data
        return augment(slices_to_batch(self.train_images[indices], self.device), flip=d.augment_flip,
                       intensity=d.augment_intensity, crop=d.crop)

    def train_step(self, batch: torch.Tensor) -> torch.Tensor:
        """One optimiser step on ``batch`` ``(B, 1, H, W)``; returns ``applied`` (a () bool tensor):
        False, and nothing applied, when the loss or a gradient is NaN or Inf."""
        self._restart_while_due()
        first_compiled = self.compile and not self.compiled_once
        before = {name: buf.clone() for name, buf in self.model.named_buffers()} if first_compiled else {}
        try:
            result = steps.optimisation_step(self.step_model, self.optimizer, self.scaler,
                                             lambda: vqvae_loss(self.step_model, batch, precision=self.precision,
                                                                latent_loss_weight=self.config.train.latent_loss_weight,
                                                                recon_loss_fn=self.recon_loss_fn),
                                             grad_clip=self.config.train.grad_clip, sync_free=self.sync_free)
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
        self.scheduler.step()  # the schedule follows the step count, skipped steps included
        ok = result.applied
        if self.average is not None and (self.sync_free or ok):
            self.average.update()  # (a step skipped on the GPU left the weights as they were)
        if not self.sync_free and not ok:
            return ok
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        restarts = torch.stack([self.model.quantize_top.n_restarted, self.model.quantize_bottom.n_restarted]).double()
        figures = {"loss": result.loss, "recon_loss": result.terms["recon_loss"],
                   "commitment_loss": result.terms["commitment_loss"], "applied": ok,
                   "top_restarts": restarts[0], "bottom_restarts": restarts[1]}
        if self.running.steps % TRAIN_SSIM_EVERY == 0:
            # Training SSIM on every few batches is enough for the curve and costs ~1 % instead of ~6 %.
            scored = metrics.to_unit_range(result.output, batch, self.config.data.normalize)
            figures.update(ssim=metrics.ssim_per_image(*scored).mean(), ssim_count=ok)
        self.running.add(**{name: torch.where(ok, value.double(), zero) for name, value in figures.items()})
        self.running.steps += 1
        self.running.items += len(batch)
        return ok

    def _restart_while_due(self) -> None:
        """Dead-code restarts (``model.restart_dead_codes``) only in the first ``train.restart_until``
        of the steps: from there on the codebooks settle. Follows the loop's step, so a resumed
        run restarts exactly where the uninterrupted one would."""
        due = (self.config.model.restart_dead_codes
               and self.state.step < self.config.train.restart_until * self.state.total_steps)
        for quantizer in (self.model.quantize_top, self.model.quantize_bottom):
            if quantizer.restart_dead_codes != due:
                quantizer.restart_dead_codes = due
                quantizer.n_restarted.zero_()

    def training_row(self) -> dict:
        sums = self.running.totals(self.dist)
        applied = max(sums["applied"], 1)
        return {"train_loss": sums["loss"] / applied, "train_recon_loss": sums["recon_loss"] / applied,
                "train_commitment_loss": sums["commitment_loss"] / applied,
                "train_ssim": sums["ssim"] / max(sums["ssim_count"], 1),
                "top_restarts": sums["top_restarts"], "bottom_restarts": sums["bottom_restarts"],
                "train_images_per_s": self.running.items * self.dist.world_size / max(self.running.time, 1e-9)}

    # --------------------------------------------------------------- validation ---------
    def validate(self) -> tuple[dict, Evaluation]:
        """Scores of the whole validation set; under torchrun each rank scores every
        ``world_size``-th slice and the per-slice results are gathered back in order."""
        tc = self.config.train
        n = len(self.val_images)
        mine = np.arange(self.dist.rank, n, self.dist.world_size)
        wanted = set(self.sample_index)
        val = evaluate(self.evaluated_model, self.val_images[mine] if self.dist.active else self.val_images,
                       batch_size=tc.val_batch_size or tc.batch_size, device=self.device,
                       normalize=self.config.data.normalize, loss_fn=self.recon_loss_fn,
                       keep=[j for j, i in enumerate(mine) if i in wanted])
        if self.dist.active:
            val.kept = {int(mine[j]): pictures for j, pictures in val.kept.items()}
            val = merge_evaluations(distributed.gather(self.dist, (mine, val)), n)
        scores = val.scalars(tc.latent_loss_weight)
        row = {f"val_{k}": v for k, v in scores.items() if k != "images_per_s"}
        row["val_images_per_s"] = scores["images_per_s"]
        return row, val

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """The model evaluation scores and checkpoints keep: the weights' average, or the live ones."""
        return self.average.model if self.average is not None else self.model

    def describe(self, row: dict, total_steps: int) -> str:
        nan = float("nan")
        return (f"epoch {row['epoch']} step {row['step']}/{total_steps}: "
                f"train loss {row.get('train_loss', nan):.5f} SSIM {row.get('train_ssim', nan):.4f} | "
                f"val loss {row['val_loss']:.5f} SSIM {row['val_ssim']:.4f} PSNR {row['val_psnr']:.2f} dB | "
                f"codes top {row['val_top_used']}/{self.model.quantize_top.n_embed} "
                f"(ppl {row['val_top_perplexity']:.0f}, {row.get('top_restarts', 0):.0f} restarts) "
                f"bottom {row['val_bottom_used']}/{self.model.quantize_bottom.n_embed} "
                f"(ppl {row['val_bottom_perplexity']:.0f}, {row.get('bottom_restarts', 0):.0f} restarts) | "
                f"lr {row.get('lr', nan):.2g}, {row.get('train_images_per_s', nan):.1f} images/s")

    # ------------------------------------------------------------------ state ----------
    def state_dict(self) -> dict:
        d = self.config.data
        live = {"train_model": self.model.state_dict(), "average_steps": self.average.steps} \
            if self.average is not None else {}
        return {
            "model": self.evaluated_model.state_dict(),  # what predict, encode and decode load
            **live,  # the weights training steps, when "model" holds their average
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config.to_dict(),
            "precision": self.precision,  # the training precision; scores are always fp32
            **self.extra_state,
            "running": self.running.state_dict(),
            "normalization": {"policy": d.normalize, "percentiles": list(d.percentiles),
                              "image_size": list(d.image_size)},
        }

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        load_model_state(self.model, ckpt.get("train_model", ckpt["model"]), path)
        if self.average is not None:
            if "train_model" in ckpt:  # "model" holds the average
                load_model_state(self.average.model, ckpt["model"], path)
                steps = ckpt.get("average_steps", 0)
                if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
                    raise UserError(f"{path}: average_steps is {steps!r}, not a step count; "
                                    "not a checkpoint this mrivq wrote")
                self.average.steps = steps
            else:  # a run that kept no average: it starts from the live weights
                self.average.reset()
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.running.load_state_dict(ckpt["running"])
