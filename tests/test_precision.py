"""Precision: ``auto`` per machine, bf16 training on any CPU, and scores always in fp32.

bf16 is emulated (and slow) on CPUs without AVX-512 BF16, so the bf16 runs here are tiny:
every developer sees what CI on the other kind of machine would see.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_sets

from mrivq import runtime
from mrivq.apps.predict import predict
from mrivq.apps.train import train
from mrivq.config import load_config
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.engine.checkpoint import load_checkpoint, model_from_checkpoint
from mrivq.engine.evaluator import evaluate
from mrivq.run_dir import read_metrics


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_the_cpu_is_bf16_only_with_native_bf16(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: native_bf16)
    assert runtime.resolve_precision("auto", torch.device("cpu")) == expected
    assert runtime.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert runtime.resolve_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.fixture(scope="module")
def bf16_run(tiny_phantom, tmp_path_factory):
    """Four bf16 steps of a tiny model on the tiny phantom (emulated bf16 is slow: keep it tiny)."""
    tmp = tmp_path_factory.mktemp("bf16")
    overrides = tiny_sets(tiny_phantom, tmp) + [
        "train.epochs=1", "train.max_steps=4", "train.interval=2", "train.warmup_steps=1",
        "train.sample_size=2", "predict.sample_sets=1", "predict.sample_size=2", "train.precision=bf16"]
    config = load_config(None, overrides)
    train(config)
    return config


def test_bf16_training_records_its_precision_and_validates_in_fp32(bf16_run):
    config = bf16_run
    best = load_checkpoint(config.model_dir / "best.pt")
    assert best["precision"] == "bf16"
    model = model_from_checkpoint(best).to(memory_format=torch.channels_last)
    val = load_split(data_splits(config.data, config.seed).validate, Preprocessing.from_settings(config.data),
                     cache_dir=config.data.cache_dir, workers=1)
    fp32 = evaluate(model, val.images, batch_size=config.train.batch_size, device=torch.device("cpu"),
                    normalize=config.data.normalize)
    row = next(r for r in read_metrics(config.run_dir / "metrics.csv") if r["step"] == best["step"])
    # metrics.csv holds the float32 scores of the saved weights, not bf16 ones
    assert row["val_ssim"] == pytest.approx(float(fp32.ssim.mean()), abs=1e-6)
    assert row["val_top_used"] == fp32.usage()["top"]["used"]
    assert "validation scored in fp32" in (config.log_dir / "training.log").read_text()


def test_predict_of_a_bf16_model_states_both_precisions(bf16_run):
    summary = predict(bf16_run)
    assert summary["precision"] == {"training": "bf16", "scoring": "fp32"}
    written = json.loads((bf16_run.run_dir / "predict" / "summary.json").read_text())
    assert written["precision"] == summary["precision"]
    assert np.isfinite(summary["ssim"]["mean"])
    assert "the model trained in bf16, scores computed in fp32" in \
        (bf16_run.log_dir / "predict.log").read_text()
