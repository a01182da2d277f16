"""The training loop: schedule, resume from last.pt, codebooks untouched by validation."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import comparable

from mrivq.apps.train import build_loop, train
from mrivq.config import load_config
from mrivq.engine.checkpoint import load_checkpoint, model_from_checkpoint
from mrivq.engine.evaluator import evaluate
from mrivq.engine.step import WeightAverage, lr_factor
from mrivq.engine.vqvae_training import VQVAETraining
from mrivq.run_dir import read_metrics
from mrivq.runtime import resolve_compile


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    factors = [lr_factor(s, total_steps=110, warmup_steps=10, schedule="cosine", min_ratio=0.1)
               for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)
    assert lr_factor(110, 110, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(50, 110, 10, "constant", 0.1) == 1.0


def test_validation_leaves_the_codebooks_unchanged(tiny_overrides):
    config = load_config(None, tiny_overrides)
    loop = build_loop(config)
    loop.task.model.train()
    loop.task.train_step(torch.rand(4, 1, 64, 32))
    before = {k: v.clone() for k, v in loop.task.model.state_dict().items()}
    loop.evaluate_and_save(epoch_end=False)
    after = loop.task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loop.task.model.training


@pytest.mark.parametrize("extra", [[], ["train.ema_decay=0.9"], ["train.restart_until=0.5"]],
                         ids=["live", "average", "restarts-stop"])
def test_resumed_run_ends_with_the_same_weights_and_metrics(tiny_overrides, tmp_path, monkeypatch, extra):
    overrides = tiny_overrides + ["train.interval=3", "train.checkpoint_every=2"] + extra
    straight = load_config(None, overrides + [f"output.dir={tmp_path / 'straight'}"])
    train(straight)

    broken = load_config(None, overrides + [f"output.dir={tmp_path / 'broken'}"])
    original_step = VQVAETraining.train_step

    def crash_at_step_7(self, batch):
        if self.state.step == 7:
            raise KeyboardInterrupt
        return original_step(self, batch)

    monkeypatch.setattr(VQVAETraining, "train_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(broken)
    assert load_checkpoint(broken.model_dir / "last.pt")["step"] == 6
    monkeypatch.setattr(VQVAETraining, "train_step", original_step)
    train(broken, resume=broken.run_dir)

    a = load_checkpoint(straight.model_dir / "last.pt")
    b = load_checkpoint(broken.model_dir / "last.pt")
    assert a["step"] == b["step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    averaged = "train.ema_decay=0.9" in extra
    assert ("train_model" in a) == averaged
    if averaged:  # the live weights and the average both resume
        assert all(torch.equal(a["train_model"][k], b["train_model"][k]) for k in a["train_model"])

    assert comparable(read_metrics(straight.run_dir / "metrics.csv")) == \
        comparable(read_metrics(broken.run_dir / "metrics.csv"))


@pytest.mark.parametrize("until, restart, restarting_steps", [(0.5, True, 3), (1.0, True, 6), (0.5, False, 0)])
def test_dead_codes_restart_only_in_the_first_restart_until_of_the_steps(tiny_overrides, until, restart,
                                                                          restarting_steps):
    # A bar no code clears: every code is dead at every step while restarts are due.
    config = load_config(None, tiny_overrides + [f"train.restart_until={until}", "model.dead_code_threshold=1e9",
                                                 f"model.restart_dead_codes={restart}"])
    task = build_loop(config).task
    task.state.total_steps = 6
    task.model.train()
    restarted = []
    for _ in range(6):
        assert task.train_step(torch.rand(2, 1, 64, 32))
        task.state.step += 1
        restarted.append([int(q.n_restarted) for q in (task.model.quantize_top, task.model.quantize_bottom)])
    n_embed = config.model.n_embed
    assert restarted == [[n_embed, n_embed]] * restarting_steps + [[0, 0]] * (6 - restarting_steps)
    assert task.running.totals(task.dist)["top_restarts"] == restarting_steps * n_embed


def test_the_weight_average_follows_the_live_weights_with_its_decay():
    live = torch.nn.Linear(2, 1)
    live.register_buffer("flag", torch.tensor(0))
    average = WeightAverage(live, decay=0.9, steps=100)  # past the warm-up: weight 0.1 a step
    before = live.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
        live.flag.fill_(3)
    average.update()
    assert torch.allclose(average.model.weight, before + 0.1)
    assert int(average.model.flag) == 3  # integer buffers are copied, not averaged
    early = WeightAverage(live, decay=0.999)  # the first steps weigh 10 / (steps + 10)
    with torch.no_grad():
        live.weight.add_(1.0)
    early.update()
    assert torch.allclose(early.model.weight, live.weight - 1.0 + 10 / 11)


def test_with_a_weight_average_validation_scores_it_and_the_checkpoints_keep_it(tiny_overrides):
    config = load_config(None, tiny_overrides + ["train.ema_decay=0.95"])
    train(config)
    best = load_checkpoint(config.model_dir / "best.pt")
    assert set(best["train_model"]) == set(best["model"])
    assert not all(torch.equal(best["train_model"][k], best["model"][k]) for k in best["model"])
    from safetensors.torch import load_file
    shared = load_file(config.model_dir / "model.safetensors")
    assert all(torch.equal(shared[k], best["model"][k]) for k in shared)  # the average is what is shared
    rows = read_metrics(config.run_dir / "metrics.csv")
    model = model_from_checkpoint(best, "best.pt")
    loop = build_loop(config)
    scored = evaluate(model, loop.task.val_images, batch_size=4, device=torch.device("cpu"), normalize="minmax")
    assert max(r["val_ssim"] for r in rows) == pytest.approx(float(scored.ssim.mean()), abs=1e-6)


def test_compiled_training_steps_match_eager_ones(tiny_overrides):
    batch = torch.rand(4, 1, 64, 32).contiguous(memory_format=torch.channels_last)
    weights = []
    for compiled in (False, True):
        trainer = build_loop(load_config(None, tiny_overrides + [f"train.compile={compiled}"])).task
        assert (trainer.step_model is not trainer.model) == compiled
        for _ in range(3):
            assert trainer.train_step(batch)
        weights.append(trainer.model.state_dict())
    eager, compiled = weights
    assert set(eager) == set(compiled)  # no compile prefix in what checkpoints save
    for key in eager:
        assert torch.allclose(eager[key].float(), compiled[key].float(), atol=1e-4, rtol=1e-3), key


def test_compile_auto_is_off_on_the_cpu_and_on_on_cuda():
    assert resolve_compile("auto", torch.device("cpu")) is False
    assert resolve_compile("auto", torch.device("cuda")) is True
    assert resolve_compile(True, torch.device("cpu")) is True
    assert resolve_compile(False, torch.device("cuda")) is False
