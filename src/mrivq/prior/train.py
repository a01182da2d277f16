"""Training the code prior (``mrivq train-prior``): encode the splits -> loop -> evaluate -> checkpoint.

``train_prior(config, checkpoint)`` encodes the configured train and validation splits with
a trained VQ-VAE-2 (preprocessed as that model was trained), fits :class:`CodePrior` to the
codes by maximum likelihood, and writes into ``output.dir``:

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

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint, model_from_checkpoint, run_config, save_checkpoint
from ..codes import PRIOR_KIND, codebook_fingerprint, encode_images, load_vqvae
from ..config import Config, config_from_dict
from ..data.cache import load_split
from ..data.io import read_slice
from ..data.sources import data_splits
from ..errors import TrainingInterrupted, UserError
from ..evaluate import preprocessing
from ..logs import interactive, run_logger
from ..report import plot_series
from ..run_dir import claim_run_dir, recording
from ..runtime import resolve_device, seed_everything, set_threads
from ..train import lr_factor, read_metrics, stop_on_signals, write_metrics
from .model import CodePrior

log = logging.getLogger("mrivq")

METRIC_COLUMNS = [
    "step", "epoch", "lr", "train_nll_top", "train_nll_bottom", "train_nll", "val_nll_top",
    "val_nll_bottom", "val_nll", "uniform_bits", "val_bits_per_pixel", "train_codes_per_s", "elapsed_s",
]
BEST, LAST, METRICS, LOG = "prior_best.pt", "prior_last.pt", "prior_metrics.csv", "prior.log"


class PriorTrainingInterrupted(TrainingInterrupted):
    """SIGINT/SIGTERM stopped ``train-prior`` after a finished step and a saved prior_last.pt."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        super().__init__(signum, step, run_dir)
        self.args = (str(self).replace("models/last.pt", f"models/{LAST}")
                     .replace("mrivq train --resume", "mrivq train-prior --resume"),)


def prior_from_config(config: Config, n_embed: int, top_grid: tuple[int, int]) -> CodePrior:
    p = config.prior
    return CodePrior(n_embed, top_grid, d_model=p.d_model, n_head=p.n_head, n_layer_top=p.n_layer_top,
                     n_layer_bottom=p.n_layer_bottom, condition_blocks=p.condition_blocks,
                     dropout=p.dropout, bottom_window_rows=p.bottom_window_rows)


class PriorTrainer:
    """Holds what changes while fitting the prior: model, optimiser, schedule, step, batch order, RNG.

    ``codes``: ``{"train": (top, bottom), "validate": (top, bottom)}`` int64 arrays
    ``(N, h, w)`` and ``(N, 2h, 2w)``. ``vqvae``: ``{"model": state_dict, "config": dict}`` of the
    VQ-VAE the codes came from; ``reference``: affine, median (offset, scale) and image size of
    the training slices, for writing samples as NIfTI.
    """

    def __init__(self, config: Config, codes: dict, *, n_embed: int, vqvae: dict, fingerprint: str,
                 reference: dict):
        self.config = config
        pc = config.prior
        self.device = resolve_device(config.train.device)
        self.train_top, self.train_bottom = (torch.as_tensor(a, dtype=torch.long) for a in codes["train"])
        self.val_top, self.val_bottom = (torch.as_tensor(a, dtype=torch.long) for a in codes["validate"])
        self.n_embed = n_embed
        self.top_grid = tuple(self.train_top.shape[1:])
        self.model = prior_from_config(config, n_embed, self.top_grid).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=pc.lr, weight_decay=pc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, pc.steps, pc.warmup_steps, "cosine", pc.min_lr_ratio))
        self.vqvae, self.fingerprint, self.reference = vqvae, fingerprint, reference
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.order = torch.randperm(len(self.train_top), generator=self.shuffle)
        self.cursor = 0
        self.epoch = 0
        self.step = 0
        self.best_nll = math.inf
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.stop_signal: int | None = None
        self._reset_running()

    def _reset_running(self) -> None:
        self.running = torch.zeros(2, dtype=torch.float64)
        self.running_steps = 0
        self.running_codes = 0
        self.running_time = 0.0

    # ------------------------------------------------------------------ state ----------
    def state_dict(self) -> dict:
        return {
            "kind": PRIOR_KIND,
            "prior": self.model.state_dict(),
            "prior_shape": {"n_embed": self.n_embed, "top_grid": list(self.top_grid)},
            "config": self.config.to_dict(),
            "vqvae": self.vqvae,
            "fingerprint": self.fingerprint,
            "reference": self.reference,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step, "epoch": self.epoch, "best_nll": self.best_nll, "elapsed_s": self.elapsed,
            "order": self.order, "cursor": self.cursor,
            "rng": {"shuffle": self.shuffle.get_state(), "torch": torch.get_rng_state()},
            "running": {"sums": self.running, "steps": self.running_steps, "codes": self.running_codes,
                        "time": self.running_time},
        }

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(ckpt["prior"])
        except RuntimeError:
            raise UserError(f"{path}: the prior's weights do not fit its config; start a new run") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.best_nll, self.elapsed = float(ckpt["best_nll"]), float(ckpt["elapsed_s"])
        self.order, self.cursor = ckpt["order"], int(ckpt["cursor"])
        self.shuffle.set_state(ckpt["rng"]["shuffle"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        running = ckpt["running"]
        self.running = running["sums"].double()
        self.running_steps, self.running_codes = int(running["steps"]), int(running["codes"])
        self.running_time = float(running["time"])
        # Rows written after this checkpoint (then lost to a kill) are redone.
        self.history = read_metrics(self.config.run_dir / METRICS, up_to_step=self.step)
        write_metrics(self.config.run_dir / METRICS, self.history, METRIC_COLUMNS)

    # ------------------------------------------------------------------ loop -----------
    def next_batch(self) -> torch.Tensor:
        """Indices of the next training batch: through a shuffled epoch, then a new shuffle."""
        batch_size = min(self.config.prior.batch_size, len(self.order))
        if self.cursor + batch_size > len(self.order):
            self.order = torch.randperm(len(self.train_top), generator=self.shuffle)
            self.cursor = 0
            self.epoch += 1
        idx = self.order[self.cursor:self.cursor + batch_size]
        self.cursor += batch_size
        return idx

    def train_step(self) -> None:
        pc = self.config.prior
        idx = self.next_batch()
        top, bottom = self.train_top[idx].to(self.device), self.train_bottom[idx].to(self.device)
        self.model.train()
        nll_top, nll_bottom = self.model.nll_bits(top, bottom)
        # Mean bits per code over both levels, weighted by how many codes each has.
        n_top, n_bottom = top[0].numel(), bottom[0].numel()
        loss = (nll_top * n_top + nll_bottom * n_bottom) / (n_top + n_bottom)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if pc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), pc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.running += torch.stack([nll_top.detach(), nll_bottom.detach()]).double().cpu()
        self.running_steps += 1
        self.running_codes += len(idx) * (n_top + n_bottom)

    def run(self) -> dict:
        pc = self.config.prior
        log.info("prior: %d training and %d validation code grids; top %s, bottom %s, %d codes per level; "
                 "%.2fM parameters; %d steps", len(self.train_top), len(self.val_top),
                 "x".join(map(str, self.top_grid)), "x".join(map(str, self.train_bottom.shape[1:])),
                 self.n_embed, sum(p.numel() for p in self.model.parameters()) / 1e6, pc.steps)
        while self.step < pc.steps:
            t0 = time.perf_counter()
            self.train_step()
            self.step += 1
            dt = time.perf_counter() - t0
            self.running_time += dt
            self.elapsed += dt
            if self.step % pc.interval == 0 or self.step == pc.steps:
                self.evaluate_and_save()
            elif self.step % pc.checkpoint_every == 0 or self.stop_signal:
                self.save(LAST)
            if self.stop_signal:
                raise PriorTrainingInterrupted(self.stop_signal, self.step, self.config.run_dir)
        best = min(self.history, key=lambda r: r["val_nll"]) if self.history else {}
        uniform = math.log2(self.n_embed)
        log.info("done: %d steps in %.0f s; best validation NLL %.3f bits per code (uniform: %.3f) at step %s",
                 self.step, self.elapsed, self.best_nll, uniform, best.get("step"))
        return {"steps": self.step, "best_val_nll": self.best_nll, "uniform_bits": uniform,
                "best_step": best.get("step"), "run_dir": str(self.config.run_dir),
                "best_val_bits_per_pixel": best.get("val_bits_per_pixel")}

    @torch.inference_mode()
    def validation_nll(self) -> tuple[float, float]:
        """Mean bits per code of the validation codes, top and bottom."""
        self.model.eval()
        sums, n = [0.0, 0.0], len(self.val_top)
        for lo in range(0, n, self.config.prior.batch_size):
            top = self.val_top[lo:lo + self.config.prior.batch_size].to(self.device)
            bottom = self.val_bottom[lo:lo + self.config.prior.batch_size].to(self.device)
            nll_top, nll_bottom = self.model.nll_bits(top, bottom)
            sums[0] += float(nll_top) * len(top)
            sums[1] += float(nll_bottom) * len(top)
        return sums[0] / n, sums[1] / n

    def evaluate_and_save(self) -> None:
        cfg = self.config
        val_top, val_bottom = self.validation_nll()
        n_top, n_bottom = self.val_top[0].numel(), self.val_bottom[0].numel()
        val_nll = (val_top * n_top + val_bottom * n_bottom) / (n_top + n_bottom)
        height, width = self.reference["image_size"]
        row = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
               "val_nll_top": val_top, "val_nll_bottom": val_bottom, "val_nll": val_nll,
               "uniform_bits": math.log2(self.n_embed),
               "val_bits_per_pixel": (val_top * n_top + val_bottom * n_bottom) / (height * width),
               "elapsed_s": self.elapsed}
        if self.running_steps:
            train_top, train_bottom = (self.running / self.running_steps).tolist()
            row.update(train_nll_top=train_top, train_nll_bottom=train_bottom,
                       train_nll=(train_top * n_top + train_bottom * n_bottom) / (n_top + n_bottom),
                       train_codes_per_s=self.running_codes / max(self.running_time, 1e-9))
        self.history.append(row)
        self._reset_running()
        write_metrics(cfg.run_dir / METRICS, self.history, METRIC_COLUMNS)
        log.info("prior step %d/%d: train NLL %.3f | validation NLL top %.3f, bottom %.3f, all %.3f bits "
                 "per code (uniform %.3f); %.3f bits per pixel | %.0f codes/s", self.step, cfg.prior.steps,
                 row.get("train_nll", math.nan), val_top, val_bottom, val_nll, row["uniform_bits"],
                 row["val_bits_per_pixel"], row.get("train_codes_per_s", math.nan))
        if val_nll < self.best_nll:
            self.best_nll = val_nll
            self.save(BEST)
        self.save(LAST)
        plot_series(self.history, [("train_nll", "train NLL", "-"), ("val_nll", "validation NLL", "o-"),
                                    ("uniform_bits", "uniform (log2 n_embed)", ":")],
                     title="Prior: negative log-likelihood", ylabel="bits per code",
                     path=cfg.visual_dir / "prior_losses.png")

    def save(self, name: str) -> None:
        save_checkpoint(self.config.model_dir / name, self.state_dict())


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

def train_prior(config: Config, checkpoint: str | Path | None = None, *, resume: str | Path | None = None,
                overwrite: bool = False) -> dict:
    """Fit the code prior to the codes a trained VQ-VAE gives the configured data; returns a summary.

    ``checkpoint``: the VQ-VAE (``models/best.pt`` of a training run). ``resume``: a run
    directory holding ``models/prior_last.pt``; the run continues with its saved config and
    VQ-VAE.
    """
    if resume is not None:
        run_dir = Path(resume).expanduser().absolute()
        last = run_dir / "models" / LAST
        if not last.is_file():
            raise UserError(f"{run_dir}: not a prior run to resume (expected models/{LAST} from an "
                            "earlier `mrivq train-prior`)")
        ckpt = load_checkpoint(last)
        if ckpt.get("kind") != PRIOR_KIND:
            raise UserError(f"{last}: not a prior checkpoint")
        config = config_from_dict(ckpt["config"])
        config.output.dir = run_dir
        vq_config = config_from_dict(ckpt["vqvae"]["config"])
        vqvae = model_from_checkpoint(ckpt["vqvae"], last).eval()
    else:
        if checkpoint is None:
            raise UserError("train-prior needs the VQ-VAE: --checkpoint FILE (e.g. runs/default/models/best.pt)")
        vqvae, vq_config = load_vqvae(checkpoint)
        # The VQ-VAE's own data, seed and run directory, unless given explicitly.
        config, differs = run_config(config, vq_config, Path(checkpoint))
        claim_run_dir(config, "train-prior", overwrite)
        ckpt = None
    with recording(config.run_dir, "train-prior"), run_logger(config.log_dir / LOG):
        set_threads(config.train.num_threads)
        seed_everything(config.seed)
        if ckpt is None:
            for setting in differs:
                log.warning("the prior trains with %s, given explicitly", setting)
        codes, reference = _encode_splits(config, vq_config, vqvae)
        trainer = PriorTrainer(config, codes, n_embed=vqvae.quantize_top.n_embed,
                               vqvae={"model": vqvae.state_dict(), "config": vq_config.to_dict()},
                               fingerprint=codebook_fingerprint(vqvae), reference=reference)
        if ckpt is not None:
            if ckpt.get("fingerprint") != trainer.fingerprint:
                raise UserError(f"{last}: its VQ-VAE does not match its codes; start a new run")
            trainer.load_state_dict(ckpt, last)
            log.info("resumed %s at step %d", config.run_dir, trainer.step)
        with stop_on_signals(trainer):
            return trainer.run()


def _encode_splits(config: Config, vq_config: Config, vqvae) -> tuple[dict, dict]:
    """Codes of the train and validate splits, preprocessed as the VQ-VAE was trained."""
    prep = preprocessing(vq_config)
    splits = data_splits(config.data, config.seed)
    load = {"cache_dir": config.data.cache_dir, "on_bad_file": config.data.on_bad_file,
            "workers": config.data.workers, "progress": interactive()}
    codes = {}
    for name, files in (("train", splits.train), ("validate", splits.validate)):
        slices = load_split(files, prep, name=name, **load)
        t0 = time.perf_counter()
        codes[name] = encode_images(vqvae, slices.images, batch_size=config.prior.batch_size)
        log.info("encoded the %s split: %d slices in %.1f s", name, len(slices), time.perf_counter() - t0)
        if name == "train":
            _, meta = read_slice(slices.files[0])
            reference = {"affine": torch.from_numpy(meta.affine.astype(np.float64)),
                         "norm": torch.from_numpy(np.median(np.asarray(slices.norm), axis=0)),
                         "image_size": list(prep.image_size)}
    return codes, reference

