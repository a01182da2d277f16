"""`mrivq bench`: figures with the names scripts rely on, as JSON lines."""

import json
import subprocess
import sys
from pathlib import Path

from mrivq.apps.bench import load_times

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_prints_one_figure_object_per_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mrivq", "bench", "--json", "--no-load", "--batch-size", "2",
         "--image-size", "64", "32", "--steps", "2", "--warmup", "1", "--set", "model.channel=16",
         "--set", "model.n_res_channel=8", "--set", "model.embed_dim=8", "--set", "model.n_embed=32",
         "--set", f"data.cache_dir={tmp_path}"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = {f["figure"]: f for f in map(json.loads, result.stdout.strip().splitlines())}
    for name in ("train_images_per_s", "train_images_per_s_fp32_eager", "predict_images_per_s",
                 "predict_images_per_s_fp32_eager", "peak_rss_mb"):
        assert figures[name]["value"] > 0 and set(figures[name]) == {"figure", "value", "unit"}
    ratio = figures["train_images_per_s"]["value"] / figures["train_images_per_s_fp32_eager"]["value"]
    assert abs(figures["train_speedup"]["value"] - ratio) < 1e-2 * ratio
    assert "load_cold_s" not in figures  # --no-load


def test_load_times_reads_every_split_cold_then_warm(tiny_phantom):
    cold, warm, n = load_times(tiny_phantom, workers=1)
    assert n == len(list(tiny_phantom.glob("keras_slices_[tv]*/case_*.nii.gz")))
    assert cold > 0 and warm > 0
