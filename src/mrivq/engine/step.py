"""One optimisation step, with the one NaN policy every trainer uses, and the learning-rate schedule.

``optimisation_step`` runs a forward pass (a closure that returns the loss), backward, gradient
clipping and the optimiser step. When the loss or any gradient is NaN or Inf nothing is
applied: weights, optimiser state and the buffers the forward pass moved (the VQ-VAE's EMA
codebooks) stay as they were, and the result says ``applied=False``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from mrivq.engine import distributed


class StepResult(NamedTuple):
    """Detached results of one optimisation step."""

    loss: torch.Tensor  # () float32
    terms: dict[str, torch.Tensor]  # the loss's parts, () each, e.g. recon_loss and commitment_loss
    output: object  # what the forward closure gave besides the loss (the VQ-VAE's reconstruction)
    applied: torch.Tensor  # () bool on the device: False when the loss or a gradient was NaN/Inf


#: ``forward() -> (loss, terms, output)``: the loss to minimise (a () tensor with a graph), its
#: detached parts by name, and anything the caller wants back (detached).
ForwardLoss = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor], object]]


def sync_free_steps(device: torch.device) -> bool:
    """Whether training steps avoid waiting for the device (CUDA); see :func:`optimisation_step`."""
    return device.type == "cuda"


def optimisation_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      forward: ForwardLoss, *, grad_clip: float | None, sync_free: bool = False) -> StepResult:
    """``forward()``, backward, clip to ``grad_clip`` (None: no clipping), optimiser step.

    One NaN policy: when the loss or any gradient is NaN or Inf, nothing is applied (weights,
    optimiser state and ``model``'s buffers are left as they were) and ``applied`` is False.

    ``sync_free`` (for CUDA) never waits for the device: the finiteness test stays a device
    tensor, the buffers are restored with ``torch.where`` and the optimiser skips its update
    through ``found_inf``, which needs a fused optimiser (``Adam(fused=True)``), as GradScaler
    uses it. Otherwise the test is read at once, and a bad loss skips the backward pass too.
    Under torchrun every rank reaches the same verdict.
    """
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}

    def restore_buffers(keep: torch.Tensor) -> None:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(torch.where(keep, buf, buffers[name]))

    loss, terms, output = forward()
    result = StepResult(loss.detach(), terms, output, torch.ones((), dtype=torch.bool, device=loss.device))
    # Under torchrun every rank must agree, or one would wait forever in the gradient all-reduce.
    finite = distributed.all_true(torch.isfinite(loss))
    if not sync_free and not finite.item():
        restore_buffers(finite)
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
    restore_buffers(finite)
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


#: ``train.lr: auto``: the peak learning rate by the run's length in steps, (steps, peak) at the
#: short and the long end, log-linear between. Measured at batch 1 on real scans and the phantom
#: (docs/benchmarks.md): 2e-3 suits up to about 4,000 steps, and collapses the top codebook over
#: a longer schedule, where 5e-4 keeps every code alive.
AUTO_LR = ((4_000, 2e-3), (13_000, 5e-4))


def auto_peak_lr(total_steps: int) -> float:
    """The peak learning rate ``train.lr: auto`` gives a run of ``total_steps`` steps.

    Example::

        >>> auto_peak_lr(3600), auto_peak_lr(13000), round(auto_peak_lr(8000), 6)
        (0.002, 0.0005, 0.000878)
    """
    (short, high), (long, low) = AUTO_LR
    if total_steps <= short:
        return high
    if total_steps >= long:
        return low
    return high * (low / high) ** (math.log(total_steps / short) / math.log(long / short))


def peak_lr(lr: float | str, total_steps: int) -> float:
    """The peak learning rate of a ``lr`` setting (a number, or ``"auto"``) for ``total_steps``."""
    return auto_peak_lr(total_steps) if lr == "auto" else float(lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up, then cosine
    down to ``min_ratio`` at ``total_steps`` (or ``constant``).

    Example::

        >>> lr_factor(0, 110, 10, "cosine", 0.1), lr_factor(110, 110, 10, "cosine", 0.1)
        (0.1, 0.1)
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params, settings, *, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser of a config section's optimisation settings (``train`` or ``prior``: a
    :class:`mrivq.config.Optimisation`), at the peak learning rate of a run's first step;
    ``fused``: the fused kernel (CUDA, whose ``found_inf`` lets a step skip without a sync)."""
    optimizer = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return optimizer(params, lr=peak_lr(settings.lr, 0), betas=tuple(settings.betas),
                     weight_decay=settings.weight_decay, **({"fused": True} if fused else {}))


def build_schedule(optimizer: torch.optim.Optimizer, settings, state) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``settings`` over a run of ``state.total_steps`` steps, read
    at each step (a time budget fixes it once steps are timed): warm-up, then cosine or constant,
    the peak following the length when ``lr`` is ``auto``."""
    base = peak_lr(settings.lr, 0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, state.total_steps, settings.warmup_steps, settings.schedule,
                                       settings.min_lr_ratio) * (peak_lr(settings.lr, state.total_steps) / base))


class WeightAverage:
    """An exponential moving average of ``model``'s weights and floating buffers (a VQ-VAE's
    codebooks), kept in a copy of the model that evaluation and checkpoints use.

    The average's weight on the newest step is ``max(1 - decay, 10 / (steps + 10))`` (so an early
    average does not sit on the first steps' weights); buffers that are not floating point (flags,
    counts) are copied as they stand. The live model's tensors are paired with the copy's once:
    training changes them in place (the optimiser, the codebooks' updates, a resume's
    ``load_state_dict``).
    """

    def __init__(self, model: torch.nn.Module, decay: float, steps: int = 0) -> None:
        self.live, self.decay, self.steps = model, decay, steps
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        pairs = list(zip([*self.model.parameters(), *self.model.buffers()], [*model.parameters(), *model.buffers()]))
        self._averaged = [mine for mine, _ in pairs if mine.is_floating_point()]
        self._followed = [live.detach() for mine, live in pairs if mine.is_floating_point()]
        self._copied = [(mine, live) for mine, live in pairs if not mine.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the live model's current weights."""
        self.steps += 1
        if self._averaged:
            torch._foreach_lerp_(self._averaged, self._followed, max(1.0 - self.decay, 10.0 / (self.steps + 10)))
        for mine, live in self._copied:
            mine.copy_(live)

    @torch.no_grad()
    def reset(self) -> None:
        """The average set to the live weights (a run resumed from a checkpoint without one)."""
        self.model.load_state_dict(self.live.state_dict())
