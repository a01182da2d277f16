"""predict's region metrics and codec comparison, and report.html rendered in a real Chromium.

The Chromium test skips only when no Chromium is installed AND ``MRIVQ_REQUIRE_CHROMIUM`` is
unset; CI (``.ci/run``) installs Debian's ``chromium`` and sets the variable, so there it runs.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import tiny_sets

from mrivq.cli import main
from mrivq.reporting.html import write_report


@pytest.fixture(scope="module")
def predicted_run(tiny_phantom, tmp_path_factory):
    """A tiny model trained for a few steps on the tiny phantom, then scored by predict."""
    from mrivq.apps.predict import predict
    from mrivq.apps.train import train
    from mrivq.config import load_config

    tmp = tmp_path_factory.mktemp("report")
    overrides = tiny_sets(tiny_phantom, tmp) + ["train.epochs=1", "train.max_steps=6", "train.interval=3"]
    config = load_config(None, overrides)
    train(config)
    summary = predict(config)
    return config.run_dir, summary


def test_predict_reports_each_structure_prostate_first(predicted_run):
    run_dir, summary = predicted_run
    regions = summary["regions"]
    assert regions["n_slices_with_mask"] == summary["n_images"]
    assert next(iter(regions["structures"])) == "prostate"
    for name, region in regions["structures"].items():
        assert 0 <= region["n_slices"] <= summary["n_images"]
        if region["n_slices"]:
            assert -1 <= region["ssim"]["mean"] <= 1 and region["mae"]["mean"] >= 0, name
    assert regions["structures"]["foreground"]["n_slices"] == summary["n_images"]
    assert "mask pixels" in summary["protocol"] and "SSIM map" in regions["definition"]
    saved = json.loads((run_dir / "predict" / "summary.json").read_text())
    assert saved["regions"]["structures"].keys() == regions["structures"].keys()
    with open(run_dir / "predict" / "per_slice.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == summary["n_images"]
    assert {"file", "case", "ssim", "psnr", "mse", "mae", "prostate_ssim", "prostate_psnr",
            "prostate_mae", "bladder_mae", "foreground_ssim"} <= set(rows[0])
    # a structure missing from a slice is a blank cell, not a zero that would pass for a score
    assert all(r["foreground_ssim"] != "" for r in rows)


def test_predict_puts_standard_codecs_beside_the_model(predicted_run):
    _, summary = predicted_run
    comparison = summary["codecs"]
    # at the codes file's rate: the raw rate of fixed-width indices is no file's
    assert comparison["bits_per_pixel"] == summary["bits_per_pixel_entropy_coded"]
    assert comparison["model"]["ssim"]["mean"] == summary["ssim"]["mean"]
    assert "jpeg" in comparison["codecs"]
    for scores in comparison["codecs"].values():
        assert 0 < scores["bits_per_pixel"]["mean"]
        assert 0 < scores["ssim"]["mean"] <= 1 and 5 < scores["psnr"]["mean"] < 80
    assert len(summary["worst_slices"]) == 5
    ssims = [w["ssim"] for w in summary["worst_slices"]]
    assert ssims == sorted(ssims) and ssims[0] == pytest.approx(summary["ssim"]["min"])


def test_predict_draws_the_model_among_the_codec_rate_distortion_curves(predicted_run, tmp_path):
    run_dir, summary = predicted_run
    assert (run_dir / "visuals" / "rate_distortion.png").is_file()
    curves = summary["rate_distortion"]
    model = curves["model"]
    assert model["bits_per_pixel_raw"] == summary["bits_per_pixel"]
    assert model["bits_per_pixel_entropy_coded"] == summary["bits_per_pixel_entropy_coded"]
    # the coded rate is a real codes file's: the test split's, written and decoded again
    codes_file = summary["codes_file"]["frequencies"]
    assert model["bits_per_pixel_entropy_coded"] == codes_file["bits_per_pixel"]["file"]
    assert codes_file["bits_per_pixel"]["file"] == codes_file["file_bytes"] * 8 / (summary["n_images"] * 64 * 32)
    # a few-step model uses few codes, so coding them by frequency beats fixed-width indices
    assert 0 < codes_file["bits_per_pixel"]["stream"] < model["bits_per_pixel_raw"]
    # and the codecs are compared at the rate of each of the model's files
    rates = {table["coder"]: table for table in summary["codecs"]["rates"]}
    assert rates.keys() == {"frequencies"}
    assert rates["frequencies"]["bits_per_pixel"] == model["bits_per_pixel_entropy_coded"]
    assert rates["frequencies"]["codecs"] == summary["codecs"]["codecs"]
    assert model["ssim"] == summary["ssim"]["mean"]
    # each codec's curve over its settings, and the AVIF sequence at the codes file's rate
    assert curves["codecs"].keys() == summary["codecs"]["codecs"].keys() >= {"jpeg", "avif_sequence"}
    assert all(len(points) == 8 for name, points in curves["codecs"].items() if name != "avif_sequence")
    sequence = rates["frequencies"]["codecs"]["avif_sequence"]
    assert curves["codecs"]["avif_sequence"] == [{"setting": sequence["setting"]["median"],
                                                 "bits_per_pixel": sequence["bits_per_pixel"]["mean"],
                                                 "ssim": sequence["ssim"]["mean"], "psnr": sequence["psnr"]["mean"]}]
    assert "Rate–distortion" in (run_dir / "report.html").read_text()
    # a summary from before the curves: the section says they are missing
    older = {k: v for k, v in summary.items() if k != "rate_distortion"}
    (tmp_path / "predict").mkdir()
    (tmp_path / "predict" / "summary.json").write_text(json.dumps(older))
    assert "No rate-distortion curves yet" in write_report(tmp_path).read_text()


def test_predict_writes_the_report_and_mrivq_report_rewrites_it(predicted_run, capsys):
    run_dir, _ = predicted_run
    report = run_dir / "report.html"
    assert report.is_file()
    report.unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run_dir)])
    assert exit_info.value.code == 0 and report.is_file()
    page = report.read_text()
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    assert page.count("data:image/png;base64,") >= 7
    for heading in ("Per-structure metrics", "standard codecs", "Rate–distortion", "Training curves", "Validation",
                    "Lowest-SSIM test slices", "Codebook usage", "Sample grids", "Config"):
        assert heading in page


def test_a_training_only_run_gets_a_report_that_names_what_is_missing(predicted_run, tmp_path):
    run_dir, _ = predicted_run
    for name in ("config.yaml", "metrics.csv"):
        shutil.copy(run_dir / name, tmp_path / name)
    page = write_report(tmp_path).read_text()
    assert "run `mrivq predict`" in page and "val SSIM" in page


@pytest.mark.parametrize("make_dir, message", [
    (lambda d: d / "nowhere", "does not exist"),
    (lambda d: d, "not an mrivq run directory"),
])
def test_report_of_a_bad_run_dir_is_one_line_and_exit_2(tmp_path, capsys, make_dir, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(make_dir(tmp_path))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "report.html").exists()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def test_report_renders_with_its_images_in_headless_chromium(predicted_run, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("MRIVQ_REQUIRE_CHROMIUM"):
            pytest.fail("MRIVQ_REQUIRE_CHROMIUM is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium); set MRIVQ_REQUIRE_CHROMIUM=1 to require it")
    run_dir, _ = predicted_run
    url = (run_dir / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,3600"]
    screenshot = run_dir / "report_screenshot.png"
    shot = subprocess.run([browser, *flags, f"--screenshot={screenshot}", url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.is_file() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 50_000  # a blank page compresses to a few kB
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = re.search(r'data-images-rendered="(\d+)/(\d+)"', dom.stdout)
    assert rendered, "the page's load script did not run"
    ok, total = int(rendered.group(1)), int(rendered.group(2))
    assert total >= 7 and ok == total  # every embedded PNG decoded
    assert "prostate" in dom.stdout and "JPEG" in dom.stdout
    print(f"screenshot of report.html: {screenshot}")
