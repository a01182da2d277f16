"""End to end through the CLI: synth, train, predict; and bad input as one line, exit 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import comparable, run_main, set_args

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = [
    "config.yaml", "logging/training.log", "metrics.csv", "samples/epoch_0.png", "samples/epoch_1.png",
    "visuals/losses.png", "visuals/ssims.png", "models/best.pt", "models/last.pt",
    "models/model.safetensors", "logging/predict.log", "samples/predict_set_0.png",
    "samples/predict_set_1.png", "predict/summary.json", "predict/per_slice.csv",
    "samples/predict_worst.png", "visuals/codebook_usage.png", "visuals/rate_distortion.png", "report.html",
]


def mrivq(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrivq", *args], check=False, capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_synth_train_predict_writes_the_whole_run_directory(tmp_path):
    data = tmp_path / "phantom"
    synth = mrivq("synth", str(data), "--cases", "4", "--slices", "5", "--seed", "3")
    assert synth.returncode == 0, synth.stderr
    assert len(list((data / "keras_slices_train").glob("case_*.nii.gz"))) >= 5
    run = tmp_path / "run"
    overrides = [f"data.root={data}", "data.image_size=[64,32]", "data.fit=resize",
                 f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=2", "train.batch_size=5",
                 "train.interval=2", "train.sample_size=3", "predict.sample_size=3", "predict.sample_sets=2",
                 f"output.dir={run}", "model.channel=8", "model.n_res_channel=4", "model.embed_dim=8",
                 "model.n_embed=16"]
    train = mrivq("train", *set_args(overrides))
    assert train.returncode == 0, train.stderr
    predict = mrivq("predict", *set_args(overrides))
    assert predict.returncode == 0, predict.stderr
    missing = [f for f in RUN_FILES if not (run / f).is_file()]
    assert not missing
    summary = json.loads((run / "predict/summary.json").read_text())
    for key in ("n_images", "ssim", "psnr", "mse", "codebook", "bits_per_pixel", "checkpoint", "protocol"):
        assert key in summary
    assert summary["n_images"] == len(list((data / "keras_slices_test").glob("*.nii.gz")))
    assert set(summary["ssim"]) == {"mean", "std", "p5", "min"}
    assert 0 < summary["ssim"]["min"] <= summary["ssim"]["p5"] <= summary["ssim"]["mean"] <= 1
    assert 5 < summary["psnr"]["mean"] < 80
    assert 1 <= summary["codebook"]["top"]["used"] <= summary["codebook"]["top"]["size"] == 16
    assert summary["bits_per_pixel"] == pytest.approx((8 * 4 + 16 * 8) * 4 / (64 * 32))
    with open(run / "predict/per_slice.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["n_images"]
    assert {"file", "case", "ssim", "psnr", "mse", "mae", "prostate_ssim"} <= set(rows[0])
    assert rows[0]["case"].startswith("case_")


def test_best_checkpoint_holds_the_best_validation_ssim(tiny_overrides):
    from mrivq.apps.train import train
    from mrivq.config import load_config
    from mrivq.engine.checkpoint import load_checkpoint
    from mrivq.run_dir import read_metrics

    config = load_config(None, tiny_overrides + ["train.lr=0.02", "train.interval=2"])
    train(config)
    rows = read_metrics(config.run_dir / "metrics.csv")
    assert len(rows) >= 3
    best_row = max(rows, key=lambda r: r["val_ssim"])
    best = load_checkpoint(config.model_dir / "best.pt")
    last = load_checkpoint(config.model_dir / "last.pt")
    assert best["step"] == best_row["step"]
    assert best["best_ssim"] == pytest.approx(best_row["val_ssim"])
    assert last["step"] == rows[-1]["step"]


def test_same_seed_gives_identical_metrics(tiny_overrides, tmp_path):
    from mrivq.apps.train import train
    from mrivq.config import load_config
    from mrivq.run_dir import read_metrics

    runs = []
    for name in ("a", "b"):
        config = load_config(None, tiny_overrides + [f"output.dir={tmp_path / name}", "train.epochs=1"])
        train(config)
        rows = read_metrics(config.run_dir / "metrics.csv")
        runs.append(comparable(rows))
    assert runs[0] == runs[1]


def test_second_train_into_a_run_directory_is_refused(tiny_overrides, capsys):
    args = ["train", *set_args(tiny_overrides + ["train.epochs=1", "train.max_steps=1"])]
    assert run_main(args) == 0
    capsys.readouterr()
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    assert run_main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--set", "data.root=/nonexistent/hipmri"], "/nonexistent/hipmri"),
    (["--set", "train.epocs=3"], "train.epocs"),
    (["--set", "train.batch_size=ten"], "train.batch_size"),
    (["--set", "data.image_size=[4,4]"], "data.image_size"),
    (["--config", "/nonexistent/config.yaml"], "config file not found"),
])
def test_bad_input_is_one_line_and_exit_2(extra, message, tmp_path):
    result = mrivq("train", "--set", f"output.dir={tmp_path / 'run'}", *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "models").exists()
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_predict_without_a_checkpoint_is_one_line_and_exit_2(tmp_path):
    result = mrivq("predict", "--set", f"output.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "checkpoint not found" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "predict").exists()


def test_report_entry_points_work_from_the_repo_root(tmp_path):
    result = subprocess.run([sys.executable, "predict.py", "--config", str(tmp_path / "missing.yaml")],
                            check=False, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "config file not found" in result.stderr
    result = subprocess.run([sys.executable, "train.py", "--help"], check=False, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "--config" in result.stdout
