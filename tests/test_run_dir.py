"""Run directories: a config that was read and files mrivq did not write are never replaced or removed."""

from __future__ import annotations

import json

from conftest import run_main, set_args
from prior_helpers import prior_overrides, train_tiny_vqvae

from mrivq.config import load_config
from mrivq.engine.checkpoint import load_checkpoint
from mrivq.reporting.html import write_report
from mrivq.run_dir import MANIFEST, read_metrics, run_config_path

SHORT = ["train.epochs=1", "train.max_steps=2", "train.interval=2"]


def strict_json(text: str):
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_overwrite_replaces_the_old_run_and_keeps_every_foreign_file(tiny_overrides, tmp_path):
    run, models, logs = tmp_path / "run", tmp_path / "mymodels", tmp_path / "mylogs"
    sets = tiny_overrides + [f"output.model_dir={models}", f"output.log_dir={logs}"]
    assert run_main(["train", *set_args(sets)]) == 0  # two epochs: samples/epoch_0.png, epoch_1.png
    assert (run / "samples/epoch_1.png").is_file()
    foreign = [run / "notes.txt", logs / "notes.txt", run / "samples/mine.png", run / "visuals/mine.png",
               models / "notes.txt"]
    for path in foreign:
        path.write_text(f"the user's {path.name}")

    assert run_main(["train", *set_args(sets + SHORT), "--overwrite"]) == 0
    for path in foreign:
        assert path.read_text() == f"the user's {path.name}"
    assert not (run / "samples/epoch_1.png").exists()  # the old run's, not written again
    assert [row["step"] for row in read_metrics(run / "metrics.csv")] == [2]
    assert load_checkpoint(models / "last.pt")["step"] == 2

    manifest = strict_json((run / MANIFEST).read_text())
    assert manifest["format"] == "mrivq-manifest" and manifest["version"] == 1
    written = manifest["jobs"]["train"]
    assert {"config.yaml", "metrics.csv", "report.html", "samples/epoch_0.png"} <= set(written)
    assert {str(models / "best.pt"), str(logs / "training.log")} <= set(written)
    assert "samples/epoch_1.png" not in written and MANIFEST not in written
    assert len(written) == len(set(written))


def test_a_report_layout_config_in_the_working_directory_is_left_as_it_was(tiny_overrides, tmp_path,
                                                                          monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    text = ("output:\n  log_dir: ./logs\n  sample_dir: ./samples\n  visual_dir: ./visuals\n"
            "  model_dir: ./models\ntraining:\n  epochs: 1\n  max_steps: 2\n  interval: 2\n")
    (work / "config.yaml").write_text(text)
    sets = [s for s in tiny_overrides if not s.startswith("output.dir=")]
    assert run_main(["train", "--config", "config.yaml", *set_args(sets)]) == 0

    assert (work / "config.yaml").read_text() == text
    assert not (work / "metrics.csv").exists() and not (work / "report.html").exists()
    assert not (work / "config.resolved.yaml").exists() and not (work / MANIFEST).exists()
    assert (work / "runs/default/metrics.csv").is_file() and (work / "models/best.pt").is_file()
    assert load_config(work / "runs/default/config.yaml").model_dir == work / "models"


def test_a_config_read_from_the_run_directory_is_kept_and_the_resolved_one_goes_beside_it(tiny_overrides,
                                                                                         tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    text = "train:\n  max_steps: 2\n  interval: 2\n"
    (run / "config.yaml").write_text(text)
    args = ["train", "--config", str(run / "config.yaml"), *set_args(tiny_overrides + ["train.epochs=1"])]
    assert run_main(args) == 0
    assert run_main(args + ["--overwrite"]) == 0

    assert (run / "config.yaml").read_text() == text
    assert run_config_path(run) == run / "config.resolved.yaml"
    assert load_config(run / "config.resolved.yaml").train.max_steps == 2
    assert "max_steps: 2" in write_report(run).read_text()


def test_overwrite_refuses_a_checkpoint_mrivq_did_not_write(tiny_overrides, tmp_path, capsys):
    run, mine = tmp_path / "run", tmp_path / "mymodels" / "best.pt"
    assert run_main(["train", *set_args(tiny_overrides + SHORT)]) == 0
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own model")
    capsys.readouterr()

    args = ["train", *set_args(tiny_overrides + SHORT + [f"output.model_dir={mine.parent}"]), "--overwrite"]
    assert run_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(mine) in err[0] and "not written by mrivq" in err[0]
    assert mine.read_bytes() == b"the user's own model"
    assert (run / "metrics.csv").is_file() and (run / "models/best.pt").is_file()  # nothing removed


def test_overwrite_refuses_a_run_from_before_manifests(tiny_overrides, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", *set_args(tiny_overrides + SHORT)]
    assert run_main(args) == 0
    (run / MANIFEST).unlink()
    capsys.readouterr()
    assert run_main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest" in err[0]
    assert (run / "metrics.csv").is_file() and (run / "models/best.pt").is_file()


def test_train_prior_overwrite_keeps_the_vqvaes_files_in_a_shared_run_directory(tiny_phantom, tmp_path):
    best = train_tiny_vqvae(tiny_phantom, tmp_path)  # tmp_path/vqvae/models/best.pt
    run = best.parent.parent
    vqvae_files = {path: path.read_bytes() for path in (best, run / "models/last.pt", run / "metrics.csv")}
    args = ["train-prior", "--checkpoint", str(best),
            *set_args(prior_overrides(tiny_phantom, tmp_path, "vqvae", steps=2, interval=2))]
    assert run_main(args) == 0
    assert run_main(args + ["--overwrite"]) == 0

    assert all(path.read_bytes() == data for path, data in vqvae_files.items())
    assert load_checkpoint(run / "models/prior_last.pt")["step"] == 2
    jobs = strict_json((run / MANIFEST).read_text())["jobs"]
    assert "models/best.pt" in jobs["train"] and "models/prior_best.pt" in jobs["train-prior"]
