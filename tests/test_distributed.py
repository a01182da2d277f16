"""Training under torchrun: 2 CPU processes with gloo against one process on the same global batch."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import comparable, set_args

from mrivq.apps.train import train
from mrivq.config import load_config
from mrivq.engine import distributed
from mrivq.engine import step as step_module
from mrivq.engine.checkpoint import load_checkpoint, model_from_checkpoint
from mrivq.engine.loop import SYNC_EVERY, TrainingLoop
from mrivq.engine.vqvae_training import VQVAETraining
from mrivq.errors import TrainingInterrupted, UserError
from mrivq.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[1]
WORLD = 2

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, overrides: list[str], dump: str, resume: str | None, stop_after: int,
          sync_free: bool) -> None:
    """One torchrun-like process: env as torchrun sets it, then mrivq's own train()."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sync_free:  # CUDA's way of stepping (device-side NaN skips, checks every few steps), on the CPU
        step_module.sync_free_steps = lambda device: True
    original_step, original_run = VQVAETraining.train_step, TrainingLoop.run

    def train_step(self, batch):
        applied = original_step(self, batch)
        if stop_after and self.state.step + 1 == stop_after and self.dist.rank == WORLD - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a signal that reaches only the last rank
        return applied

    def run(self):
        try:
            return original_run(self)
        finally:  # every rank's own weights and codebooks, to compare across ranks
            torch.save(self.task.model.state_dict(), Path(dump) / f"rank{self.dist.rank}.pt")

    VQVAETraining.train_step, TrainingLoop.run = train_step, run
    try:
        train(None if resume else load_config(None, overrides), resume=resume)
    except TrainingInterrupted as exc:
        sys.exit(exc.exit_status)
    except UserError as exc:
        print(f"rank {rank}: {exc}", file=sys.stderr)
        sys.exit(2)


def run_two_processes(overrides, dump: Path, *, resume=None, stop_after=0, sync_free=False) -> list[int]:
    dump.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, overrides, str(dump), resume, stop_after, sync_free))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


@pytest.fixture
def exact_overrides(tiny_overrides):
    # Data initialisation and dead-code restarts sample rank 0's batch only, so the comparison with
    # one process runs without them; everything else (EMA all-reduce, DDP gradients) is exercised.
    return tiny_overrides + ["model.init_from_data=false", "model.restart_dead_codes=false",
                             "train.epochs=2", "train.interval=3"]


def assert_close_states(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), atol=atol, rtol=1e-3), key


def test_two_processes_match_each_other_and_one_process_on_the_global_batch(exact_overrides, tmp_path):
    codes = run_two_processes(exact_overrides + [f"output.dir={tmp_path / 'ddp'}"], tmp_path / "dump")
    assert codes == [0, 0]
    rank0 = torch.load(tmp_path / "dump/rank0.pt")
    rank1 = torch.load(tmp_path / "dump/rank1.pt")
    for key in rank0:  # identical on every rank: weights by DDP, codebooks by the quantizer
        assert torch.equal(rank0[key], rank1[key]), key

    single = load_config(None, exact_overrides + [f"output.dir={tmp_path / 'one'}", "train.batch_size=8"])
    train(single)
    one = load_checkpoint(single.model_dir / "last.pt")
    ddp = load_checkpoint(tmp_path / "ddp/models/last.pt")
    assert ddp["step"] == one["step"] == 6  # 24 training slices, 2 x 4 per step, 2 epochs
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in ddp["model"])
    assert_close_states(ddp["model"], rank0, atol=0)
    assert_close_states(one["model"], ddp["model"], atol=2e-4)

    # Validation metrics are reduced over both ranks' halves of the validation set.
    rows_one = comparable(read_metrics(single.run_dir / "metrics.csv"))
    rows_ddp = comparable(read_metrics(tmp_path / "ddp/metrics.csv"))
    assert [r["step"] for r in rows_ddp] == [r["step"] for r in rows_one]
    for a, b in zip(rows_one, rows_ddp, strict=True):
        assert a["val_ssim"] == pytest.approx(b["val_ssim"], abs=2e-3)
        assert a["val_bottom_used"] == pytest.approx(b["val_bottom_used"], abs=1)

    # And the comparison can fail: one process on half the global batch ends elsewhere.
    half = load_config(None, exact_overrides + [f"output.dir={tmp_path / 'half'}", "train.max_steps=6"])
    train(half)
    other = load_checkpoint(half.model_dir / "last.pt")["model"]
    assert any(not torch.allclose(other[k].float(), ddp["model"][k].float(), atol=2e-4) for k in other)


def test_interrupted_two_process_run_resumes_like_an_uninterrupted_one(tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["train.epochs=2", "train.interval=4"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run_two_processes(overrides + [f"output.dir={straight}"], tmp_path / "d1") == [0, 0]

    # A signal seen by one rank only still stops both after the same step, with last.pt saved.
    codes = run_two_processes(overrides + [f"output.dir={broken}"], tmp_path / "d2", stop_after=2)
    assert codes == [128 + signal.SIGTERM] * 2
    assert load_checkpoint(broken / "models/last.pt")["step"] == 2
    assert run_two_processes([], tmp_path / "d3", resume=str(broken)) == [0, 0]

    a, b = load_checkpoint(straight / "models/last.pt"), load_checkpoint(broken / "models/last.pt")
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert comparable(read_metrics(straight / "metrics.csv")) == comparable(read_metrics(broken / "metrics.csv"))
    # A single process loads what the 2-process run saved, but will not resume it.
    model = model_from_checkpoint(load_checkpoint(broken / "models/best.pt"))
    assert sum(p.numel() for p in model.parameters()) > 0
    with pytest.raises(UserError, match="saved by a run of 2 process"):
        train(None, resume=broken)


def test_a_signal_between_checks_stops_every_rank_at_the_same_later_step(tiny_overrides, tmp_path):
    # On CUDA ranks agree on stopping only every SYNC_EVERY steps or before a save; a signal seen
    # by one rank at step 2 (no check there) stops both at step 3, the epoch's end, both saved.
    assert SYNC_EVERY > 3
    run_dir = tmp_path / "run"
    codes = run_two_processes(tiny_overrides + ["train.epochs=2", "train.interval=5", f"output.dir={run_dir}"],
                              tmp_path / "dump", stop_after=2, sync_free=True)
    assert codes == [128 + signal.SIGTERM] * 2
    assert load_checkpoint(run_dir / "models/last.pt")["step"] == 3
    rank0, rank1 = (torch.load(tmp_path / f"dump/rank{r}.pt") for r in range(2))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_a_data_error_on_rank_0_ends_every_rank_with_exit_2(tiny_overrides, tmp_path):
    codes = run_two_processes(tiny_overrides + [f"data.root={tmp_path / 'missing'}"], tmp_path / "dump")
    assert codes == [2, 2]


def test_torchrun_trains_and_a_single_process_predicts(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
         "-m", "mrivq", "train", *set_args(tiny_overrides + [f"output.dir={run_dir}", "train.epochs=1"])],
        check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "logging/training.log").read_text()
    assert "distributed: 2 processes (gloo), batch 4 per process, 8 per step" in log
    assert log.count("training on ") == 1  # only rank 0 writes the log
    predict = subprocess.run([sys.executable, "-m", "mrivq", "predict", *set_args(tiny_overrides + [
        f"output.dir={run_dir}"])], check=False, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (run_dir / "predict/summary.json").is_file()


def test_shard_splits_an_epoch_like_distributed_sampler():
    order = np.array([5, 3, 0, 4, 1, 2, 6])
    parts = [distributed.shard(order, distributed.Context(rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in parts] == [4, 4]  # padded by wrapping to a multiple of 2
    assert list(parts[0]) == [5, 0, 1, 6] and list(parts[1]) == [3, 4, 2, 5]
    # Batch b of both ranks together is batch b of one process with a twice larger batch.
    assert sorted([*parts[0][:2], *parts[1][:2]]) == sorted(order[:4])
