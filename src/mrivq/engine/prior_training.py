"""What fitting a prior adds to the loop: the prior, its optimiser, and its validation NLL.

The prior (of any kind in :mod:`mrivq.compression.priors`) is fitted to a VQ-VAE's codes by maximum likelihood:
the loss is the mean number of bits per code over both levels, weighted by how many codes each
level has. Training steps run under ``train.precision``'s autocast (bf16 where the CPU has it);
validation, like every use of a trained prior (sampling, coding), runs in float32. The learning
rate warms up for ``prior.warmup_steps`` and follows a cosine to ``prior.min_lr_ratio`` x
``prior.lr`` at ``prior.steps``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mrivq.compression.priors import build_prior, make_copy
from mrivq.config import Config
from mrivq.data.volumes import gap_shares
from mrivq.engine import step as steps
from mrivq.engine.checkpoint import PRIOR_KIND
from mrivq.engine.loop import LoopState, RunningSums
from mrivq.errors import UserError
from mrivq.nn.pass_prior import referenced_grids
from mrivq.runtime import autocast, resolve_precision

COLUMNS = [
    "step", "epoch", "lr", "train_nll_top", "train_nll_bottom", "train_nll", "val_nll_top",
    "val_nll_bottom", "val_nll", "uniform_bits", "val_bits_per_pixel", "train_codes_per_s", "elapsed_s",
]


class PriorTraining:
    """The code-prior task of :class:`mrivq.engine.loop.TrainingLoop`.

    ``codes``: ``{"train": (top, bottom), "validate": (top, bottom)}`` integer arrays
    ``(N, h, w)`` and ``(N, 2h, 2w)``. ``vqvae``: ``{"model": state_dict, "config": dict}`` of the
    VQ-VAE the codes came from; ``reference``: affine, median (offset, scale) and image size of
    the training slices, for writing samples as NIfTI. All three go into every checkpoint, so a
    prior checkpoint is all ``mrivq sample`` needs. ``references`` (for a volume prior, which codes
    a slice given slices on either side of it): ``{"train": {gap: (N, 2)}, "validate": (N, 2)}``,
    indices among the split's grids (-1: none); for training, each gap's neighbours on either side
    (:func:`mrivq.data.volumes.neighbours`), of which each step draws one gap per grid with the
    share of slices a file codes at that gap (:func:`mrivq.data.volumes.gap_shares`; gap 0: a key
    slice, no references); for validation, the references ``mrivq encode`` would code with.
    """

    score = "val_nll"
    score_label = "validation NLL"
    higher_is_better = False
    sync_free = False

    def __init__(self, config: Config, codes: dict, *, n_embed: int, vqvae: dict, fingerprint: str,
                 reference: dict, device: torch.device, state: LoopState, references: dict | None = None):
        pc = config.prior
        self.config, self.device, self.state = config, device, state
        # Kept as int32 (half of int64: the training codes with their mirrored and shifted
        # copies are six grids per slice); batches are made int64 on their way to the device.
        self.train_top, self.train_bottom = (torch.as_tensor(a, dtype=torch.int32) for a in codes["train"])
        self.val_top, self.val_bottom = (torch.as_tensor(a, dtype=torch.int32) for a in codes["validate"])
        self.n_examples = len(self.train_top)
        self.batch_size = min(pc.batch_size, self.n_examples)
        self.n_embed = n_embed
        self.top_grid = tuple(self.train_top.shape[1:])
        self.model = build_prior(config.prior, n_embed, self.top_grid).to(device)
        self.key_every = getattr(self.model, "key_every", None)  # a volume prior's
        self.references = None
        if self.key_every is not None:
            shares = gap_shares(self.key_every)
            self.gaps, self.gap_shares = torch.tensor(list(shares)), torch.tensor(list(shares.values()))
            self.references = {"train": {gap: torch.as_tensor(references["train"][gap], dtype=torch.long)
                                         for gap in shares if gap},
                               "validate": torch.as_tensor(np.asarray(references["validate"]), dtype=torch.long)}
        self.optimizer = steps.build_optimizer(self.model.parameters(), pc)
        self.scheduler = steps.build_schedule(self.optimizer, pc, state)
        self.precision = resolve_precision(config.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.vqvae, self.fingerprint, self.reference = vqvae, fingerprint, reference
        self.running = RunningSums(("nll_top", "nll_bottom"), device)  # bits per code

    # ------------------------------------------------------------------ steps ----------
    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """The grids ``indices`` and (a volume prior) the grids each is coded after, a gap drawn per grid."""
        index = torch.from_numpy(indices)
        refs = None
        if self.references is not None:
            gap = self.gaps[torch.multinomial(self.gap_shares, len(index), replacement=True)]
            refs = torch.full((len(index), 2), -1, dtype=torch.long)
            for value, table in self.references["train"].items():
                refs = torch.where((gap == value)[:, None], table[index], refs)
        return (self.train_top[index].to(self.device).long(), self.train_bottom[index].to(self.device).long(),
                self._referenced(refs, self.train_top, self.train_bottom))

    def _nll_bits(self, top: torch.Tensor, bottom: torch.Tensor, refs: tuple | None):
        """The prior's bits per code of each level (given the referenced grids, for a volume prior)."""
        return self.model.nll_bits(top, bottom) if refs is None else self.model.nll_bits(top, bottom, refs)

    def _referenced(self, refs: torch.Tensor | None, top: torch.Tensor, bottom: torch.Tensor) -> tuple | None:
        """The grids ``refs`` ``(B, 2)`` of ``top`` and ``bottom`` on the device (:func:`referenced_grids`)."""
        return None if refs is None else tuple(grids.to(self.device) for grids in referenced_grids(refs, top, bottom))

    def _mean_bits(self, nll_top: torch.Tensor, nll_bottom: torch.Tensor) -> torch.Tensor:
        """Mean bits per code over both levels, weighted by how many codes each has."""
        n_top, n_bottom = self.val_top[0].numel(), self.val_bottom[0].numel()
        return (nll_top * n_top + nll_bottom * n_bottom) / (n_top + n_bottom)

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        top, bottom, refs = batch

        def forward():
            with autocast(self.device, self.precision):
                nll_top, nll_bottom = self._nll_bits(top, bottom, refs)
            return self._mean_bits(nll_top, nll_bottom), {"top": nll_top.detach(), "bottom": nll_bottom.detach()}, None

        result = steps.optimisation_step(self.model, self.optimizer, self.scaler, forward,
                                         grad_clip=self.config.prior.grad_clip)
        self.scheduler.step()
        if not result.applied:
            return result.applied
        self.running.add(nll_top=result.terms["top"], nll_bottom=result.terms["bottom"])
        self.running.steps += 1
        self.running.items += len(top) * (top[0].numel() + bottom[0].numel())
        return result.applied

    def training_row(self) -> dict:
        top, bottom = (total / self.running.steps for total in self.running.totals().values())
        return {"train_nll_top": top, "train_nll_bottom": bottom, "train_nll": self._mean_bits(top, bottom),
                "train_codes_per_s": self.running.items / max(self.running.time, 1e-9)}

    # --------------------------------------------------------------- validation ---------
    @torch.inference_mode()
    def validate(self) -> tuple[dict, None]:
        """Mean bits per code of the validation codes, per level and over both."""
        was_training = self.model.training
        self.model.eval()
        sums, n, size = [0.0, 0.0], len(self.val_top), self.config.prior.batch_size
        for lo in range(0, n, size):
            top = self.val_top[lo:lo + size].to(self.device).long()
            bottom = self.val_bottom[lo:lo + size].to(self.device).long()
            refs = None if self.references is None else self._referenced(
                self.references["validate"][lo:lo + size], self.val_top, self.val_bottom)
            nll_top, nll_bottom = self._nll_bits(top, bottom, refs)
            sums[0] += float(nll_top) * len(top)
            sums[1] += float(nll_bottom) * len(top)
        self.model.train(was_training)
        val_top, val_bottom = sums[0] / n, sums[1] / n
        height, width = self.reference["image_size"]
        n_top, n_bottom = self.val_top[0].numel(), self.val_bottom[0].numel()
        return {"val_nll_top": val_top, "val_nll_bottom": val_bottom, "val_nll": self._mean_bits(val_top, val_bottom),
                "uniform_bits": math.log2(self.n_embed),
                "val_bits_per_pixel": (val_top * n_top + val_bottom * n_bottom) / (height * width)}, None

    def describe(self, row: dict, total_steps: int) -> str:
        return (f"prior step {row['step']}/{total_steps}: train NLL {row.get('train_nll', math.nan):.3f} | "
                f"validation NLL top {row['val_nll_top']:.3f}, bottom {row['val_nll_bottom']:.3f}, all "
                f"{row['val_nll']:.3f} bits per code (uniform {row['uniform_bits']:.3f}); "
                f"{row['val_bits_per_pixel']:.3f} bits per pixel | {row.get('train_codes_per_s', math.nan):.0f} codes/s")

    # ------------------------------------------------------------------ state ----------
    def state_dict(self) -> dict:
        copy = make_copy(self.model, self.train_top, self.train_bottom)  # the integer copy that codes
        return {
            "integer": copy.state,
            "integer_fingerprint": copy.fingerprint(),
            "kind": PRIOR_KIND,
            "prior": self.model.state_dict(),
            "prior_shape": {"n_embed": self.n_embed, "top_grid": list(self.top_grid)},
            "config": self.config.to_dict(),
            "vqvae": self.vqvae,
            "fingerprint": self.fingerprint,
            "reference": self.reference,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "running": self.running.state_dict(),
        }

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        try:
            self.model.load_state_dict(ckpt["prior"])
        except RuntimeError:
            raise UserError(f"{path}: the prior's weights do not fit its config; start a new run") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.running.load_state_dict(ckpt["running"])
