"""Training that survives: kills, signals, bad checkpoints, NaN losses, full disks."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import comparable, set_args

from mrivq.apps.train import build_loop, train
from mrivq.config import load_config
from mrivq.engine import checkpoint as checkpoint_module
from mrivq.engine import step as step_module
from mrivq.engine.checkpoint import load_checkpoint, save_checkpoint
from mrivq.engine.step import optimisation_step
from mrivq.engine.vqvae_training import VQVAETraining, vqvae_loss
from mrivq.errors import UserError
from mrivq.nn import VQVAE2
from mrivq.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[1]


def start_mrivq(*args):
    return subprocess.Popen([sys.executable, "-m", "mrivq", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def saved_step(run_dir: Path) -> int:
    """The step of run_dir's models/last.pt, -1 before the first save (written atomically)."""
    last = run_dir / "models/last.pt"
    return int(load_checkpoint(last)["step"]) if last.exists() else -1


def test_run_killed_at_random_points_and_resumed_ends_like_an_uninterrupted_run(tiny_overrides, tmp_path):
    overrides = tiny_overrides + ["train.epochs=4", "train.interval=5", "train.checkpoint_every=2"]
    straight = load_config(None, overrides + [f"output.dir={tmp_path / 'straight'}"])
    train(straight)

    run_dir = tmp_path / "killed"
    fresh = ["train", *set_args(overrides + [f"output.dir={run_dir}"])]
    rng = random.Random(1234)
    kills = 0
    # Kill at random moments, each a little after a randomly chosen step was saved: the run is
    # caught mid-way however fast this machine trains (a wall-clock timer was not: a fast run
    # could finish before its first kill).
    for target in sorted(rng.sample(range(4, 18, 2), 3)):
        resumable = (run_dir / "models/last.pt").exists()
        proc = start_mrivq(*(["train", "--resume", str(run_dir)] if resumable else fresh + ["--overwrite"]))
        deadline = time.monotonic() + 300
        while proc.poll() is None and saved_step(run_dir) < target and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before step {target}: {proc.stderr.read()}"
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    proc = start_mrivq("train", "--resume", str(run_dir))
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()
    assert kills == 3

    a = load_checkpoint(straight.model_dir / "last.pt")
    b = load_checkpoint(run_dir / "models/last.pt")
    assert a["step"] == b["step"] == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert comparable(read_metrics(straight.run_dir / "metrics.csv")) == \
        comparable(read_metrics(run_dir / "metrics.csv"))
    best_a = load_checkpoint(straight.model_dir / "best.pt")
    best_b = load_checkpoint(run_dir / "models/best.pt")
    assert best_a["step"] == best_b["step"]
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])


def test_sigterm_saves_last_checkpoint_and_exits_143_with_how_to_resume(tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_mrivq("train", *set_args(tiny_overrides + ["train.epochs=400", "train.interval=1000",
                                                        "train.checkpoint_every=1000"]))
    deadline = time.time() + 120
    while not (run_dir / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last_line = err.strip().splitlines()[-1]
    assert "SIGTERM" in last_line and f"mrivq train --resume {run_dir}" in last_line
    step = load_checkpoint(run_dir / "models/last.pt")["step"]
    assert f"at step {step}:" in last_line and step > 0


def test_checkpoint_with_a_pickled_payload_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "mrivq-vqvae2", "model": Payload()}, evil)
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(evil)
    result = subprocess.run([sys.executable, "-m", "mrivq", "predict", "--checkpoint", str(evil),
                             "--set", f"output.dir={tmp_path / 'run'}"],
                            check=False, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "refused to load" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_phantom):
    from conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("trained")
    overrides = [f"data.root={tiny_phantom}", "data.image_size=[64,32]", f"data.cache_dir={root / 'cache'}",
                 "train.epochs=1", "train.batch_size=4", f"output.dir={root / 'run'}", "train.num_threads=1"]
    overrides += [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    train(load_config(None, overrides))
    return root / "run", overrides


def predict_with(checkpoint: Path, overrides) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrivq", "predict", "--checkpoint", str(checkpoint),
                           *set_args(overrides)], check=False, capture_output=True, text=True, cwd=REPO)


def test_truncated_checkpoint_is_one_line_and_exit_2(trained_run, tmp_path):
    run_dir, overrides = trained_run
    data = (run_dir / "models/best.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    result = predict_with(cut, overrides + [f"output.dir={tmp_path / 'p'}"])
    assert result.returncode == 2 and "truncated or corrupt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_from_another_model_config_is_one_line_and_exit_2(trained_run, tmp_path):
    run_dir, overrides = trained_run
    ckpt = load_checkpoint(run_dir / "models/best.pt")
    ckpt["config"]["model"]["channel"] = 32
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    result = predict_with(other, overrides + [f"output.dir={tmp_path / 'p'}"])
    assert result.returncode == 2 and "do not fit the model config" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_of_a_folder_that_is_not_a_run_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mrivq", "train", "--resume", str(tmp_path)],
                            check=False, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "not a run directory" in result.stderr


@pytest.mark.parametrize(("key", "value", "message"), [
    ("average_steps", "abc", "not a step count"),
    ("train_model", "evil", "not a mapping of tensors"),
    ("train_model", {"x": torch.zeros(3)}, "do not fit the model config"),
])
def test_resuming_a_weight_average_from_a_crafted_checkpoint_is_one_line_and_exit_2(
        tiny_overrides, tmp_path, key, value, message):
    config = load_config(None, tiny_overrides + ["train.ema_decay=0.9", "train.epochs=1"])
    train(config)
    last = config.model_dir / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt[key] = value
    torch.save(ckpt, last)
    best = (config.model_dir / "best.pt").read_bytes()
    result = subprocess.run([sys.executable, "-m", "mrivq", "train", "--resume", str(config.run_dir)],
                            check=False, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert (config.model_dir / "best.pt").read_bytes() == best


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "models/last.pt"
    save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def full_disk(obj, fh):
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous file is kept"):
        save_checkpoint(path, {"step": 2, "model": {"w": torch.zeros(3)}})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_unwritable_output_folder_is_a_clear_error(tiny_overrides, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "mrivq", "train",
                             *set_args(tiny_overrides + [f"output.dir={blocker / 'run'}"])],
                            check=False, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and str(blocker) in result.stderr


def nan_from(steps):
    original = VQVAETraining.train_step

    def poisoned(self, batch):
        if self.state.step + 1 in steps:
            batch = torch.full_like(batch, float("nan"))
        return original(self, batch)

    return poisoned


@pytest.fixture(params=[False, True], ids=["per-step-check", "sync-free"])
def sync_free(request, monkeypatch):
    """Both ways of skipping NaN steps: checked every step (CPU), or on the device (CUDA's way)."""
    monkeypatch.setattr(step_module, "sync_free_steps", lambda device: request.param)
    return request.param


def test_nan_steps_are_skipped_and_training_goes_on(tiny_overrides, monkeypatch, sync_free):
    monkeypatch.setattr(VQVAETraining, "train_step", nan_from({3, 4}))
    config = load_config(None, tiny_overrides)
    train(config)
    last = load_checkpoint(config.model_dir / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())
    expected = "NaN/Inf steps in a row skipped" if sync_free else "loss or gradient is NaN or Inf; step skipped"
    assert expected in (config.log_dir / "training.log").read_text()
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in read_metrics(config.run_dir / "metrics.csv"))


def test_a_nan_gradient_with_a_finite_loss_is_skipped_and_never_reaches_last_pt(tiny_overrides, sync_free):
    config = load_config(None, tiny_overrides)
    loop = build_loop(config)
    trainer = loop.task
    assert trainer.sync_free is sync_free
    batch = torch.rand(4, 1, 64, 32).contiguous(memory_format=torch.channels_last)
    assert trainer.train_step(batch)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    poisoned = trainer.model.dec.blocks[-1].weight  # one gradient only; the loss stays finite
    hook = poisoned.register_hook(lambda grad: grad * float("nan"))
    applied = trainer.train_step(batch)
    hook.remove()
    assert not applied  # both ways report the skip (sync-free steps as a device tensor)
    for key, value in trainer.model.state_dict().items():  # weights and EMA codebooks as before
        assert torch.equal(value, before[key]), key
    for key, value in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, adam[key]), key
    loop.save_last()
    last = load_checkpoint(config.model_dir / "last.pt")
    for key, value in last["model"].items():
        assert torch.equal(value, before[key]), key
        assert not value.is_floating_point() or torch.isfinite(value).all(), key


def test_nan_in_a_row_stops_with_the_last_good_checkpoints_kept(tiny_overrides, monkeypatch, sync_free):
    config = load_config(None, tiny_overrides + ["train.max_nonfinite_steps=3", "train.checkpoint_every=1",
                                                 "train.interval=2"])
    monkeypatch.setattr(VQVAETraining, "train_step", nan_from(set(range(5, 100))))
    with pytest.raises(UserError, match="NaN or Inf for 3 steps in a row"):
        train(config)
    last = load_checkpoint(config.model_dir / "last.pt")
    best = load_checkpoint(config.model_dir / "best.pt")
    assert last["step"] == 4 and best["step"] <= 4
    for ckpt in (last, best):
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_safetensors_export_holds_the_best_weights_and_the_config(trained_run):
    import json

    from safetensors import safe_open

    run_dir, _ = trained_run
    best = load_checkpoint(run_dir / "models/best.pt")
    with safe_open(str(run_dir / "models/model.safetensors"), framework="pt") as fh:
        config = json.loads(fh.metadata()["config"])
        assert config["model"] == best["config"]["model"]
        assert set(fh.keys()) == set(best["model"])
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(fh.get_tensor(key), best["model"][key])


def test_a_sync_free_nan_step_changes_nothing_and_a_good_one_applies():
    torch.manual_seed(0)
    model = VQVAE2(in_channel=1, channel=8, n_res_block=1, n_res_channel=4, embed_dim=4, n_embed=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    def loss(batch):
        return lambda: vqvae_loss(model, batch, precision="fp32", latent_loss_weight=0.25)

    good = torch.rand(2, 1, 32, 16)
    assert bool(optimisation_step(model, optimizer, scaler, loss(good), grad_clip=1.0, sync_free=True).applied)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}

    result = optimisation_step(model, optimizer, scaler, loss(torch.full_like(good, float("nan"))), grad_clip=1.0,
                               sync_free=True)
    assert not bool(result.applied)
    for key, value in model.state_dict().items():  # weights and EMA codebooks as they were
        assert torch.equal(value, before[key]), key
    for key, value in optimizer.state_dict()["state"][0].items():  # Adam's moments and step too
        assert torch.equal(value, adam[key]), key

    assert bool(optimisation_step(model, optimizer, scaler, loss(good), grad_clip=1.0, sync_free=True).applied)
    assert not torch.equal(model.state_dict()["enc_b.blocks.0.weight"], before["enc_b.blocks.0.weight"])
