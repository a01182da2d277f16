"""predict scores the split the model was trained with, and writes into the model's own run."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import PINNED_PRECISION, TINY_MODEL, run_main, set_args

from mrivq.data.splits import file_list_hash, split_by_case
from mrivq.engine.checkpoint import load_checkpoint


def reject_nan(token: str):
    raise ValueError(f"not strict JSON: {token}")


@pytest.fixture(scope="module")
def flat_run(tiny_phantom, tmp_path_factory):
    """A tiny model trained on a flat folder of slices split by case with seed 1."""
    work = tmp_path_factory.mktemp("flat")
    flat = work / "slices"
    flat.mkdir()
    for path in tiny_phantom.glob("keras_slices_*/case_*.nii.gz"):
        shutil.copy(path, flat / path.name)
    overrides = [f"data.root={flat}", "data.image_size=[64,32]", f"data.cache_dir={work / 'cache'}",
                 "data.workers=1", "seed=1", "train.epochs=1", "train.batch_size=4", "train.interval=4",
                 "train.warmup_steps=2", "train.sample_size=2", "predict.sample_sets=1", "predict.sample_size=2",
                 "train.num_threads=1", f"output.dir={work / 'run'}", *PINNED_PRECISION,
                 *(f"model.{k}={v}" for k, v in TINY_MODEL.items())]
    assert run_main(["train", *set_args(overrides)]) == 0
    return work, flat


def test_predict_with_only_a_checkpoint_uses_its_data_seed_and_run_directory(flat_run, tmp_path, monkeypatch):
    work, flat = flat_run
    monkeypatch.chdir(tmp_path)  # the default output.dir (runs/default) would be here
    best = work / "run" / "models" / "best.pt"
    assert run_main(["predict", "--checkpoint", str(best), "--set", "predict.sample_sets=1"]) == 0
    assert not (tmp_path / "runs").exists()
    text = (work / "run" / "predict" / "summary.json").read_text()
    summary = json.loads(text, parse_constant=reject_nan)
    expected_test = split_by_case(sorted(flat.glob("*.nii.gz")), seed=1).test
    assert summary["n_images"] == len(expected_test)
    assert summary["data"]["seed"] == 1
    assert summary["data"]["test_split_sha256"] == load_checkpoint(best)["splits"]["test"]["sha256"]
    assert summary["data"]["test_split_sha256"] == file_list_hash(expected_test)
    assert summary["precision"] == {"training": "fp32", "scoring": "fp32"}


def test_predict_refuses_a_test_split_holding_training_cases(flat_run, capsys):
    work, flat = flat_run
    files = sorted(flat.glob("*.nii.gz"))
    trained_on = {f.name for f in split_by_case(files, seed=1).train}
    seed = next(s for s in range(2, 50) if {f.name for f in split_by_case(files, seed=s).test} <= trained_on)
    before = sorted(p.name for p in (work / "run" / "predict").glob("*")) if (work / "run" / "predict").exists() else []
    code = run_main(["predict", "--checkpoint", str(work / "run" / "models" / "best.pt"), "--set", f"seed={seed}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "shares" in err[0] and "training split" in err[0]
    n_test = len(split_by_case(files, seed=seed).test)
    assert f"shares {n_test} slice(s) and 1 case(s)" in err[0]
    after = sorted(p.name for p in (work / "run" / "predict").glob("*")) if (work / "run" / "predict").exists() else []
    assert after == before  # nothing written


def test_train_prior_with_only_a_checkpoint_encodes_the_vqvae_training_split(flat_run, tmp_path, monkeypatch):
    work, flat = flat_run
    monkeypatch.chdir(tmp_path)
    best = work / "run" / "models" / "best.pt"
    prior = ["prior.kind=transformer", "prior.transformer.d_model=16", "prior.transformer.n_head=2",
             "prior.transformer.n_layer_top=1", "prior.transformer.n_layer_bottom=1",
             "prior.transformer.condition_blocks=1", "prior.batch_size=4", "prior.steps=2", "prior.interval=2",
             "prior.warmup_steps=1"]
    assert run_main(["train-prior", "--checkpoint", str(best), *set_args(prior)]) == 0
    n_train = len(split_by_case(sorted(flat.glob("*.nii.gz")), seed=1).train)
    log = (work / "run" / "logging" / "prior.log").read_text()
    assert f"encoded the train split: {n_train} slices" in log
    assert (work / "run" / "models" / "prior_best.pt").is_file() and not (tmp_path / "runs").exists()
