"""Does the fast path cost quality? The default phantom run on the fast path and on a plain path.

    python benchmarks/fast_vs_plain_quality.py [--out /tmp/mrivq-quality] [--set KEY=VALUE ...]

Trains the default config twice from the same seed: once as `mrivq train` does (resolved
precision and compile mode, channels-last tensors), once on a plain fp32 eager path
(contiguous tensors, no autocast, no torch.compile). Prints each run's best validation SSIM,
its images/s and the difference. It reports; it never fails on a number.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from mrivq.apps.train import build_loop
from mrivq.config import load_config
from mrivq.engine import evaluator, vqvae_training
from mrivq.logs import run_logger
from mrivq.run_dir import read_metrics


def contiguous_batch(slices, device):
    return torch.from_numpy(slices.astype("float32", copy=True)).unsqueeze(1).to(device)


def run(path: str, out: Path, overrides: list[str]) -> dict:
    run_dir = out / path
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [*overrides, f"output.dir={run_dir}"]
    if path == "plain":
        sets += ["train.precision=fp32", "train.compile=false"]
    config = load_config(None, sets)
    original = vqvae_training.slices_to_batch, evaluator.slices_to_batch
    if path == "plain":
        vqvae_training.slices_to_batch = evaluator.slices_to_batch = contiguous_batch
    try:
        with run_logger(config.log_dir / "training.log"):
            loop = build_loop(config)
            task = loop.task
            if path == "plain":
                task.model.to(memory_format=torch.contiguous_format)
            loop.run()
            summary = {"best_ssim": loop.state.best, "steps": loop.state.step}
            described = f"precision {task.precision}, compile {'on' if task.compile else 'off'}"
    finally:
        vqvae_training.slices_to_batch, evaluator.slices_to_batch = original
    rows = read_metrics(config.run_dir / "metrics.csv")
    speed = [r["train_images_per_s"] for r in rows if "train_images_per_s" in r]
    return {"best_ssim": summary["best_ssim"], "steps": summary["steps"], "described": described,
            "images_per_s": sum(speed) / max(len(speed), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mrivq-quality"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    results = {path: run(path, args.out, args.overrides) for path in ("fast", "plain")}
    for path, r in results.items():
        layout = "channels-last" if path == "fast" else "contiguous"
        print(f"{path:5s} ({r['described']}, {layout}): best validation SSIM {r['best_ssim']:.4f} "
              f"after {r['steps']} steps, {r['images_per_s']:.2f} images/s")
    diff = results["fast"]["best_ssim"] - results["plain"]["best_ssim"]
    print(f"difference (fast - plain): {diff:+.4f}")


if __name__ == "__main__":
    main()
