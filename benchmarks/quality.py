"""Quality benchmark: train a recipe on the phantom, score its test split, print JSON figures.

Every recipe change is judged by this (on both precisions): it trains the configured model
(a config file plus ``--set`` overrides) for ``--steps`` steps or ``--max-time``, runs
``mrivq predict`` on the test split, range-codes the test codes, and prints one JSON object:

    ssim, psnr, prostate_ssim, codes used and perplexity per level, bits per pixel raw and
    frequency-coded, JPEG / JPEG 2000 / WebP / AVIF / JPEG XL / HTJ2K (and the AVIF sequence)
    SSIM and bits per pixel at the rate of the model's frequency-coded codes file (before
    2026-12-06: at the raw rate of fixed-width indices),
    training seconds, images/s, precision.

    python benchmarks/quality.py --precision fp32 --steps 360
    python benchmarks/quality.py --precision bf16 --max-time 10m --set train.loss=ssim_l1

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from mrivq.apps.predict import predict
from mrivq.apps.train import train
from mrivq.config import load_config
from mrivq.runtime import resolve_device, resolve_precision


def quality(config_path: str | None, overrides: list[str], *, precision: str, steps: int | None,
            max_time: str | None, out: Path) -> dict:
    sets = [*overrides, f"train.precision={precision}", f"output.dir={out}"]
    if steps:
        sets += [f"train.max_steps={steps}", "train.epochs=100000"]
    if max_time:
        sets += [f"train.max_time={max_time}", "train.epochs=100000"]
    config = load_config(config_path, sets)
    start = time.perf_counter()
    trained = train(config)
    summary = predict(config)
    metrics = [line for line in (config.run_dir / "metrics.csv").read_text().splitlines()[1:] if line]
    prostate = ((summary.get("regions") or {}).get("structures") or {}).get("prostate") or {}
    codecs = summary["codecs"]["codecs"]
    device = resolve_device(config.train.device)
    return {
        "precision": resolve_precision(precision, device),
        "steps": trained["steps"],
        "train_seconds": round(trained["train_seconds"], 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "train_images_per_s": round(trained["steps"] * config.train.batch_size / trained["train_seconds"], 2),
        "best_step": trained["best_step"],
        "val_ssim": round(trained["best_ssim"], 4),
        "ssim": round(summary["ssim"]["mean"], 4),
        "psnr": round(summary["psnr"]["mean"], 2),
        "prostate_ssim": round(prostate.get("ssim", {}).get("mean", math.nan), 4),
        "top_used": summary["codebook"]["top"]["used"],
        "top_perplexity": round(summary["codebook"]["top"]["perplexity"], 1),
        "bottom_used": summary["codebook"]["bottom"]["used"],
        "bottom_perplexity": round(summary["codebook"]["bottom"]["perplexity"], 1),
        "bpp_raw": round(summary["bits_per_pixel"], 4),
        "bpp_frequency_coded": round(summary["bits_per_pixel_entropy_coded"], 4),
        **{f"{codec}_ssim": round(scores["ssim"]["mean"], 4) for codec, scores in codecs.items()},
        **{f"{codec}_bpp": round(scores["bits_per_pixel"]["mean"], 4) for codec, scores in codecs.items()},
        "evaluations": len(metrics),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: the built-in phantom setup)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps (default: the config's epochs)")
    budget.add_argument("--max-time", help="wall-clock training budget, e.g. 600 or 10m")
    parser.add_argument("--out", help="run directory (default: a temporary folder)")
    parser.add_argument("--label", default="", help="a name for this recipe in the JSON")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mrivq-quality-")) / "run"
    figures = quality(args.config, args.overrides, precision=args.precision, steps=args.steps,
                      max_time=args.max_time, out=out)
    print(json.dumps({"label": args.label, "overrides": args.overrides, **figures, "run_dir": str(out)}),
          file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
