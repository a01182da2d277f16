"""The AVIF image sequence of the test split at several rates: the rate it needs to match a model.

Each run of consecutive test slices (by HipMRI's names) is one AVIF image sequence (AV1 with
inter prediction, as `mrivq predict` compares it), at the best quality whose files fit each rate;
prints one row per rate (bits per pixel achieved, SSIM and PSNR under the project's protocol) and,
with ``--match S``, the rate at which the sequence scores SSIM ``S`` (interpolated linearly in
log rate between the two rates around it): a model scoring ``S`` beats the sequence at its own
rate only if its file is smaller than that.

    python benchmarks/sequence_rates.py --rates 0.10 0.15 0.20 0.26 --match 0.9599 [--set data.root=...]

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from mrivq.compression.codecs import compare_sequences, sequence_available
from mrivq.config import load_config
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.data.volumes import volume_runs
from mrivq.metrics.image import unit_range_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.10, 0.15, 0.20, 0.26], metavar="BPP")
    parser.add_argument("--match", type=float, metavar="SSIM", help="print the rate the sequence needs for this SSIM")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="data settings of the test split (default: the built-in phantom set)")
    args = parser.parse_args()
    if not sequence_available():
        raise SystemExit("this imagecodecs cannot write AVIF image sequences")
    config = load_config(None, args.overrides)
    test = load_split(data_splits(config.data, config.seed).test, Preprocessing.from_settings(config.data),
                      name="test", cache_dir=config.data.cache_dir)
    images = unit_range_images(np.asarray(test.images, dtype=np.float32), config.data.normalize)
    runs = volume_runs([Path(f).name for f in test.files])
    print(f"{len(images)} test slices of {images.shape[1]}x{images.shape[2]} in {len(runs)} runs")
    print("| asked bpp | AVIF sequence bpp | SSIM | PSNR |")
    print("|---|---|---|---|")
    known, points = {}, []
    for rate in sorted(args.rates):
        entry = compare_sequences([images[run] for run in runs], rate * images.size / 8, known=known)
        entry = entry["avif_sequence"]
        bpp, ssim = 8 * entry["bytes"]["total"] / images.size, entry["ssim"]["mean"]
        points.append((bpp, ssim))
        print(f"| {rate:.3f} | {bpp:.4f} | {ssim:.4f} | {entry['psnr']['mean']:.2f} |", flush=True)
    if args.match is not None:
        print(matched(points, args.match))


def matched(points: list[tuple[float, float]], target: float) -> str:
    """Where the sequence's SSIM crosses ``target`` among ``points`` (bpp, SSIM), in words."""
    for (low_bpp, low), (high_bpp, high) in itertools.pairwise(points):
        if low <= target <= high and high > low:
            share = (target - low) / (high - low)
            bpp = float(np.exp(np.log(low_bpp) + share * (np.log(high_bpp) - np.log(low_bpp))))
            return f"the AVIF sequence scores SSIM {target:.4f} at about {bpp:.3f} bits per pixel"
    return f"SSIM {target:.4f} lies outside the rates measured ({points[0][1]:.4f}-{points[-1][1]:.4f})"


if __name__ == "__main__":
    main()
