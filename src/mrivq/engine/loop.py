"""The training loop both trainers use: epochs of shuffled batches -> step -> evaluate -> checkpoint.

What is trained is a *task* (:class:`mrivq.engine.vqvae_training.VQVAETraining`,
:class:`mrivq.engine.prior_training.PriorTraining`): it owns the model, the optimiser and the
data, and answers :class:`Task`'s few calls. The loop owns what every run shares:

- :class:`LoopState`: step, epoch, position in the epoch, best score, RNG states, time;
  with its own ``state_dict``;
- the batch order (a seeded shuffle per epoch, split between ranks under torchrun);
- the NaN policy's counting (``train.max_nonfinite_steps`` in a row stop the run), signals
  (SIGINT/SIGTERM: finish the step, save, stop), the wall-clock budget (``train.max_time``);
- evaluation every ``interval`` steps and at each epoch's end, the metrics table, the best and
  last checkpoints; then the ``hooks`` the command passed in (plots, report, sample grids).

A resumed run continues with the same batches, RNG draws and metrics rows as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mrivq import compat
from mrivq.engine import distributed
from mrivq.engine.checkpoint import save_checkpoint
from mrivq.errors import TrainingInterrupted, UserError
from mrivq.logs import interactive
from mrivq.run_dir import read_metrics, write_metrics
from mrivq.runtime import capture_rng, restore_rng

log = logging.getLogger("mrivq")

SYNC_EVERY = 10  # sync-free (CUDA) steps: read NaN/Inf counts and agree on a stop signal this often
#: train.max_time: steps timed before the first fit: the warm-up, but at least the first of these and
#: at most the second. Under torchrun the fit is all that ends a budgeted run, so a long warm-up (the
#: VQ-VAE's 480 steps) must not hold it back; every budgeted run measured so far warmed up over 50.
BUDGET_FIT_AFTER = (20, 50)
UNTIMED = 2**62  # train.max_time: total_steps until the first fit


class RunningSums:
    """Named sums of training figures since the last evaluation, kept on the device (no host
    sync per step), with the steps, examples and seconds they cover."""

    def __init__(self, names: tuple[str, ...], device: torch.device | str = "cpu"):
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.steps = 0
        self.items = 0
        self.time = 0.0

    def add(self, **values: torch.Tensor) -> None:
        """Add each () tensor to the sum of its name (one device operation for all of them)."""
        index = [self.names.index(name) for name in values]
        self.sums[index] += torch.stack(list(values.values())).double()

    def totals(self, dist: distributed.Context | None = None) -> dict[str, float]:
        """The sums by name; under torchrun averaged over ranks (every rank must call it then)."""
        sums = self.mean_over_ranks(dist) if dist is not None else self.sums
        return dict(zip(self.names, sums.tolist()))

    def reset(self) -> None:
        self.sums.zero_()
        self.steps, self.items, self.time = 0, 0, 0.0

    def state_dict(self, sums: torch.Tensor | None = None) -> dict:
        return {"sums": (self.sums if sums is None else sums).cpu(), "steps": self.steps,
                "images": self.items, "time": self.time}

    def mean_over_ranks(self, dist: distributed.Context) -> torch.Tensor:
        """The sums averaged over ranks (one all-reduce under torchrun; every rank must call it).

        On resume every rank starts from this average, so the average over ranks at the next
        evaluation is still the mean over all ranks' steps."""
        if not dist.active:
            return self.sums
        return distributed.sum_(dist, self.sums.clone()) / dist.world_size

    def load_state_dict(self, state: dict) -> None:
        self.sums = compat.running_sums(state["sums"], int(state["steps"]), len(self.sums)).to(self.sums.device)
        self.steps, self.items = int(state["steps"]), int(state.get("images", state.get("codes", 0)))
        self.time = float(state["time"])


class Task(Protocol):
    """What the loop trains (see the module docstring)."""

    model: torch.nn.Module
    scheduler: torch.optim.lr_scheduler.LRScheduler
    running: RunningSums
    sync_free: bool  # steps never wait for the device (CUDA): NaN/Inf skips are counted there
    score: str  # the validation row's key that picks the best checkpoint ("val_ssim", "val_nll")
    score_label: str  # how the log names it ("validation SSIM")
    higher_is_better: bool
    n_examples: int  # training examples in one epoch (all ranks together)
    batch_size: int  # per process

    def batch(self, indices: np.ndarray): ...  # the training batch of these examples
    def train_step(self, batch) -> torch.Tensor: ...  # () bool: applied (not NaN/Inf)
    def training_row(self) -> dict: ...  # means of the running sums (over ranks), by column
    def validate(self) -> tuple[dict, object]: ...  # (validation row by column, details for hooks)
    def describe(self, row: dict, total_steps: int) -> str: ...  # the log line of an evaluation
    def state_dict(self) -> dict: ...  # model, optimiser, schedule, running sums (no collectives)
    def load_state_dict(self, ckpt: dict, path: Path) -> None: ...


@dataclass
class LoopSettings:
    """How long and how often (from ``train.*`` or ``prior.*``), and where results go."""

    total_steps: int  # UNTIMED: fitted to max_time once steps are timed
    interval: int  # evaluate every this many steps (and at each epoch's end)
    checkpoint_every: int  # save the last checkpoint this often between evaluations
    run_dir: Path
    model_dir: Path
    metrics_name: str = "metrics.csv"
    columns: list[str] = field(default_factory=list)
    best_name: str = "best.pt"
    last_name: str = "last.pt"
    resume_command: str = "mrivq train --resume"
    seed: int = 0
    max_time: float | None = None  # seconds of wall clock for the whole loop, evaluations included
    max_time_key: str = "train.max_time"  # the setting max_time came from, for the log
    max_steps: int | None = None  # caps a budget-fitted length
    warmup_steps: int = 0
    max_nonfinite_steps: int = 10**9
    evaluate_at_epoch_end: bool = True


#: ``hook(loop, row, details, improved, epoch_end)``, called on rank 0 after each evaluation
#: (the metrics table and checkpoints written); ``details`` is the task's validation details.
Hook = Callable[["TrainingLoop", dict, object, bool, bool], None]


@dataclass
class LoopState:
    """Where the loop is: everything besides the task's own state that a resume needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch already trained
    best: float = -math.inf  # best validation score so far (+inf when lower is better)
    total_steps: int = 0
    elapsed: float = 0.0  # seconds spent in training steps
    wall_before: float = 0.0  # wall-clock seconds of the loop before this process resumed it
    epoch_shuffle: torch.Tensor | None = None  # the shuffle generator's state at the epoch's start

    def state_dict(self, score: str) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                f"best_{score.removeprefix('val_')}": self.best, "total_steps": self.total_steps,
                "elapsed_s": self.elapsed}

    def load_state_dict(self, ckpt: dict, score: str) -> None:
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.best = float(ckpt[f"best_{score.removeprefix('val_')}"])
        self.elapsed = float(ckpt["elapsed_s"])
        self.wall_before = float(ckpt.get("wall_s", self.elapsed))
        self.epoch_shuffle = ckpt["rng"]["shuffle_epoch_start"]


class TrainingLoop:
    """Runs a :class:`Task` for ``settings.total_steps`` steps; see the module docstring."""

    def __init__(self, task: Task, settings: LoopSettings, dist: distributed.Context | None = None,
                 hooks: list[Hook] = (), state: LoopState | None = None):
        self.task, self.settings, self.hooks = task, settings, list(hooks)
        self.dist = dist or distributed.Context()
        self.state = state or LoopState()
        self.state.total_steps = settings.total_steps
        self.state.best = -math.inf if task.higher_is_better else math.inf  # a resume loads its own
        self.steps_per_epoch = steps_per_epoch(task.n_examples, task.batch_size, self.dist.world_size)
        self.shuffle = torch.Generator().manual_seed(settings.seed)
        if self.state.epoch_shuffle is None:
            self.state.epoch_shuffle = self.shuffle.get_state()
        self.fit_after = min(max(settings.warmup_steps, BUDGET_FIT_AFTER[0]), BUDGET_FIT_AFTER[1])
        self.history: list[dict] = []
        self.stop_signal: int | None = None
        self.nonfinite_in_a_row = 0
        # Sync-free mode: NaN/Inf steps in a row now, and the longest such run since the last check.
        device = self.dist.device
        self.nonfinite_run = torch.zeros((), dtype=torch.long, device=device)
        self.nonfinite_worst = torch.zeros((), dtype=torch.long, device=device)
        self.clock = time.perf_counter  # the budget's clock (tests replace it)
        self.loop_start = self.clock()

    # ------------------------------------------------------------------ state ----------
    def state_dict(self) -> dict:
        """The checkpoint: the task's state, the loop's, the RNG states; every rank calls it."""
        return {**self.task.state_dict(), **self.state.state_dict(self.task.score),
                "world_size": self.dist.world_size, "wall_s": self.wall_clock(),
                "rng": {"shuffle_epoch_start": self.state.epoch_shuffle, **capture_rng()}}

    def load_state_dict(self, ckpt: dict, path: Path) -> None:
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != self.dist.world_size:
            # Steps per epoch, the shards and the schedule all depend on the number of processes.
            how = ("mrivq train --resume" if saved_world == 1
                   else f"torchrun --nproc_per_node {saved_world} -m mrivq train --resume (on one node)")
            raise UserError(f"{path} was saved by a run of {saved_world} process(es), this is "
                            f"{self.dist.world_size}; resume it with `{how}`, or start a new run")
        if "batch_in_epoch" not in ckpt:
            raise UserError(f"{path} was saved by an older mrivq whose runs cannot be resumed by this one; "
                            "start a new run")
        total = self.state.total_steps
        self.task.load_state_dict(ckpt, path)
        self.state.load_state_dict(ckpt, self.task.score)
        # The total is the settings' own, except a budget's length as it was fitted.
        self.state.total_steps = int(ckpt.get("total_steps", total)) if self.settings.max_time else total
        restore_rng(ckpt["rng"])
        # Rows written after this checkpoint (then lost to a kill) are dropped: they will be redone.
        metrics = self.settings.run_dir / self.settings.metrics_name
        self.history = read_metrics(metrics, up_to_step=self.state.step)
        if self.dist.is_main:
            write_metrics(metrics, self.history, self.settings.columns)

    def wall_clock(self) -> float:
        """Wall-clock seconds of the loop so far (evaluations included), over resumes."""
        return self.state.wall_before + self.clock() - self.loop_start

    # ------------------------------------------------------------------ loop -----------
    def run(self) -> list[dict]:
        """Train to the end (or raise :class:`TrainingInterrupted` on a signal); returns the rows
        of the metrics table."""
        with logging_redirect_tqdm(loggers=[log]):
            self._loop()
        distributed.barrier(self.dist)
        return self.history

    def _loop(self) -> None:
        state, task = self.state, self.task
        self.loop_start = self.clock()
        bar = tqdm(total=None if state.total_steps == UNTIMED else state.total_steps, initial=state.step,
                   desc="train", disable=not (interactive() and self.dist.is_main), dynamic_ncols=True)
        while state.step < state.total_steps:
            self.shuffle.set_state(state.epoch_shuffle)
            order = distributed.shard(torch.randperm(task.n_examples, generator=self.shuffle).numpy(), self.dist)
            next_epoch_shuffle = self.shuffle.get_state()
            # A finished epoch rolls over below, rather than looping without stepping.
            state.batch_in_epoch = min(state.batch_in_epoch, self.steps_per_epoch)
            task.model.train()
            for b in range(state.batch_in_epoch, self.steps_per_epoch):  # empty if the epoch is done
                if state.step >= state.total_steps:
                    break
                self._step(b, order[b * task.batch_size:(b + 1) * task.batch_size], bar)
            if state.batch_in_epoch == self.steps_per_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
                state.epoch_shuffle = next_epoch_shuffle
        bar.close()

    def _step(self, b: int, examples: np.ndarray, bar) -> None:
        """Train batch ``b`` of the epoch (these examples), then do what falls due at its step: count
        NaN/Inf steps, keep to the time budget, evaluate or save, stop on a signal."""
        s, state, task = self.settings, self.state, self.task
        t0 = time.perf_counter()
        applied = task.train_step(task.batch(np.sort(examples)))
        state.step += 1
        state.batch_in_epoch = b + 1
        epoch_done = state.batch_in_epoch == self.steps_per_epoch
        at_interval, at_checkpoint = state.step % s.interval == 0, state.step % s.checkpoint_every == 0
        # Per-step checks read the verdict now; sync-free ones every SYNC_EVERY steps and before any save.
        check = (not task.sync_free or at_interval or at_checkpoint or epoch_done
                 or state.step == state.total_steps or state.step % SYNC_EVERY == 0)
        self._count_nonfinite(applied, check)
        if self.dist.device.type == "cuda" and at_interval:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        task.running.time += dt
        state.elapsed += dt
        bar.update(1)
        if state.step == self.fit_after:
            self._fit_to_budget(bar)
        elif s.max_time and not self.dist.active and self.wall_clock() >= s.max_time:
            state.total_steps = state.step  # out of time: evaluate, save and end now
        last = state.step == state.total_steps  # the budget may have made this step the last
        stopping = self._stop_agreed(check)
        if self.nonfinite_in_a_row and not last and not stopping:
            return  # nothing new to evaluate or save: last.pt stays the last good step
        if at_interval or last or (epoch_done and s.evaluate_at_epoch_end):
            self.evaluate_and_save(epoch_end=epoch_done)
            self._fit_to_budget(bar)  # evaluations take time too: refit
        elif at_checkpoint or stopping:
            self.save_last()
        if stopping:
            raise TrainingInterrupted(self.stop_signal, state.step, s.run_dir,
                                      checkpoint=s.model_dir / s.last_name, command=s.resume_command)

    def _stop_agreed(self, check: bool) -> bool:
        """Whether to stop after this step: a signal arrived (one snapshot: the handler may fire
        any time). Under torchrun a signal may reach the ranks at different steps: stop only on
        an agreed value, checked where every rank checks, so all make the same collective calls."""
        if not self.dist.active:
            return self.stop_signal is not None
        stopping = check and distributed.any_rank(self.dist, self.stop_signal is not None)
        if stopping and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return stopping

    def _count_nonfinite(self, applied: torch.Tensor, check: bool) -> None:
        """Count NaN/Inf steps in a row; stop the run after ``max_nonfinite_steps`` of them."""
        state = self.state
        if self.task.sync_free:  # counted on the device, read when ``check``
            self.nonfinite_run = torch.where(applied, 0, self.nonfinite_run + 1)
            self.nonfinite_worst = torch.maximum(self.nonfinite_worst, self.nonfinite_run)
            if not check:
                return
            run, worst = (int(v) for v in torch.stack([self.nonfinite_run, self.nonfinite_worst]).tolist())
            self.nonfinite_worst.zero_()
            self.nonfinite_in_a_row, longest = run, worst
            if worst:
                log.warning("up to step %d: %d NaN/Inf steps in a row skipped", state.step, worst)
        else:
            self.nonfinite_in_a_row = 0 if bool(applied) else self.nonfinite_in_a_row + 1
            longest = self.nonfinite_in_a_row
            if longest:
                log.warning("step %d: loss or gradient is NaN or Inf; step skipped (%d in a row)", state.step,
                            longest)
        if longest >= self.settings.max_nonfinite_steps:
            raise UserError(
                f"training stopped: the loss or a gradient was NaN or Inf for {longest} steps in a row (up to step "
                f"{state.step}); models/{self.settings.last_name} and {self.settings.best_name} hold the last good "
                "state; lower the learning rate or check the data")

    def _fit_to_budget(self, bar) -> None:
        """``max_time``: fit total_steps (and so the schedule) to the time left, at the rate so
        far, evaluations included. Every rank calls this at the same steps and takes rank 0's."""
        s, state = self.settings, self.state
        if not s.max_time or state.step < self.fit_after or state.step >= state.total_steps:
            return
        wall = self.wall_clock()
        per_step = wall / state.step
        total = state.step + max(0, int((s.max_time - wall) / per_step))
        total = min(total, s.max_steps or total)
        if self.dist.active:
            mine = torch.tensor([total if self.dist.is_main else 0], dtype=torch.float64, device=self.dist.device)
            total = int(distributed.sum_(self.dist, mine).item())
        if state.step == self.fit_after:
            log.info("%s %.0f s: %d steps in all at %.3f s per step so far (evaluations "
                     "included); the schedule follows", s.max_time_key, s.max_time, total, per_step)
        state.total_steps = max(total, state.step)
        bar.total = state.total_steps
        bar.refresh()

    # --------------------------------------------------------------- evaluation ---------
    def evaluate_and_save(self, *, epoch_end: bool = False) -> dict:
        """Validate, append a row to the metrics table, save the best and last checkpoints, then
        call the hooks; every rank calls this (validation is sharded under torchrun)."""
        s, state, task = self.settings, self.state, self.task
        scores, details = task.validate()
        row = {"epoch": state.epoch, "step": state.step, "lr": task.scheduler.get_last_lr()[0]}
        if task.running.steps:
            row.update(task.training_row())
        row.update(scores)
        row["elapsed_s"] = state.elapsed
        self.history.append(row)
        task.running.reset()
        value = row[task.score]
        improved = value > state.best if task.higher_is_better else value < state.best
        if not self.dist.is_main:  # every rank has the same row (and best); rank 0 writes
            if improved:
                state.best = value
            self.save_last()
            return row
        write_metrics(s.run_dir / s.metrics_name, self.history, s.columns)
        log.info(task.describe(row, state.total_steps))
        if improved:
            state.best = value
            save_checkpoint(s.model_dir / s.best_name, self.state_dict())
            log.info("new best %s %.4f: saved %s", task.score_label, value, s.model_dir / s.best_name)
        self.save_last()
        for hook in self.hooks:
            hook(self, row, details, improved, epoch_end or state.step == state.total_steps)
        return row

    def save_last(self) -> None:
        """Rank 0 writes the last checkpoint; every rank must call this (the state may reduce over ranks)."""
        state = self.state_dict()
        state["running"] = self.task.running.state_dict(sums=self.task.running.mean_over_ranks(self.dist))
        if self.dist.is_main:
            save_checkpoint(self.settings.model_dir / self.settings.last_name, state)


def steps_per_epoch(n_examples: int, batch_size: int, world_size: int = 1) -> int:
    """Steps in one epoch: each rank takes ``ceil(n_examples / world_size)`` examples in batches
    of ``batch_size``, the last one possibly smaller."""
    return math.ceil(math.ceil(n_examples / world_size) / batch_size)


@contextlib.contextmanager
def stop_on_signals(loop: TrainingLoop):
    """SIGINT/SIGTERM ask the loop to stop after its current step; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if loop.stop_signal is not None:
            raise KeyboardInterrupt
        loop.stop_signal = signum
        log.warning("%s received: finishing the current step, then saving the last checkpoint",
                    signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
