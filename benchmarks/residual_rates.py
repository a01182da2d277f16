"""What lossless and bounded-error files could cost on top of the codes: a measurement for #37.

For each test slice of a run (stored intensities, integers) this decodes the slice from its codes
(the picture ``mrivq decode`` writes), takes the residual ``r = x - round(decoded)``, and prints
bits per pixel of:

- the standard lossless codecs on the slice itself (JPEG XL at its strongest effort, JPEG-LS,
  JPEG 2000 and HTJ2K reversible, PNG; imagecodecs);
- the same codecs on the residual (offset to unsigned), i.e. "codes + a standard codec";
- empirical conditional entropies of the residual under simple context models, each slice's own
  statistics (an ideal adaptive coder's rate, tables not charged): no context; the decoded
  picture's local contrast; that and the causal neighbours' residuals (a raster coder); a
  two-pass checkerboard (the second half sees all four neighbours of the first);
- the near-lossless ladder: the residual quantised with step 2δ+1 (every voxel within δ), the
  same entropies and JPEG-LS NEAR=δ on the slice;
- how far the decoded picture moves between float32 batch sizes and float64 (what rounding the
  prediction to integers must survive to decode the same on any machine).

Usage::

    python benchmarks/residual_rates.py RUN_DIR [--split test] [--max-slices 60] [--deltas 0 1 2 4]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import imagecodecs
import numpy as np
import torch

from mrivq.compression import codecs
from mrivq.compression.codec import Codec, CodecInput
from mrivq.config import load_config
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.engine.checkpoint import load_checkpoint, model_from_checkpoint


def entropy_bits(symbols: np.ndarray, contexts: np.ndarray | None = None) -> float:
    """Total bits of ``symbols`` under their empirical distribution (given each ``context``)."""
    symbols = symbols.ravel().astype(np.int64)
    if contexts is None:
        contexts = np.zeros_like(symbols)
    contexts = contexts.ravel().astype(np.int64)
    pairs = (contexts << 32) + (symbols - symbols.min())
    _, joint = np.unique(pairs, return_counts=True)
    _, ctx = np.unique(contexts, return_counts=True)
    return float(-(joint * np.log2(joint)).sum() + (ctx * np.log2(ctx)).sum())


def bins(values: np.ndarray, edges) -> np.ndarray:
    return np.digitize(values, edges)


def activity(picture: np.ndarray) -> np.ndarray:
    """Local contrast of the decoded picture: the largest absolute difference to a 4-neighbour."""
    p = np.pad(picture.astype(np.float64), 1, mode="edge")
    centre = p[1:-1, 1:-1]
    return np.maximum.reduce([np.abs(centre - p[:-2, 1:-1]), np.abs(centre - p[2:, 1:-1]),
                              np.abs(centre - p[1:-1, :-2]), np.abs(centre - p[1:-1, 2:])])


def model_bits(q: np.ndarray, picture: np.ndarray, scale: float) -> dict:
    """Ideal bits of the quantised residual ``q`` under each context model."""
    log_edges = scale * np.array([0.5, 1, 2, 4, 8, 16, 32, 64])
    act = bins(activity(picture), log_edges)
    padded = np.pad(q, 1)
    a = np.abs(padded.astype(np.float64))
    # raster: the causal neighbours' sizes (W, N, NW, NE), and a prediction from W, N, NW
    # (the median edge detector)
    west, north, nw = padded[1:-1, :-2], padded[:-2, 1:-1], padded[:-2, :-2]
    causal = (a[1:-1, :-2] + a[:-2, 1:-1] + 0.5 * (a[:-2, :-2] + a[:-2, 2:])) / 3
    lo, hi = np.minimum(west, north), np.maximum(west, north)
    med = np.where(nw >= hi, lo, np.where(nw <= lo, hi, west + north - nw))
    cedges = np.array([0.25, 0.5, 1, 2, 4, 8, 16, 32, 64])
    raster_ctx = act * 16 + bins(causal, cedges)
    # checkerboard: first half given the picture; second half given its four decoded neighbours
    black = (np.indices(q.shape).sum(0) % 2) == 0
    four = (a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1]) / 4
    mean4 = (padded[1:-1, :-2] + padded[1:-1, 2:] + padded[:-2, 1:-1] + padded[2:, 1:-1]).astype(np.float64) / 4
    second_ctx = act * 16 + bins(four, cedges)
    second_res = q - np.round(mean4).astype(np.int64)
    return {
        "alone": entropy_bits(q),
        "picture": entropy_bits(q, act),
        "raster": entropy_bits(q, raster_ctx),
        "raster, MED": entropy_bits(q - med, raster_ctx),
        "checkerboard": entropy_bits(q[black], act[black]) + entropy_bits(second_res[~black], second_ctx[~black]),
    }


def lossless_codecs(image: np.ndarray) -> dict:
    """Bytes of ``image`` (non-negative integers) under each lossless codec."""
    u16 = np.ascontiguousarray(image.astype(np.uint16))
    return {
        "JPEG XL": len(imagecodecs.jpegxl_encode(u16, lossless=True, effort=codecs.JPEGXL_LOSSLESS_EFFORT)),
        "JPEG-LS": len(imagecodecs.jpegls_encode(u16, level=0)),
        "JPEG 2000": len(imagecodecs.jpeg2k_encode(u16, level=0, reversible=True)),
        "HTJ2K": len(imagecodecs.htj2k_encode(u16, level=0, reversible=True)),
        "PNG": len(imagecodecs.png_encode(u16, level=9)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="test", choices=("train", "validate", "test"))
    parser.add_argument("--max-slices", type=int, default=60)
    parser.add_argument("--deltas", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.run_dir / "config.yaml")
    ckpt_path = args.run_dir / "models" / "best.pt"
    model = model_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path).eval()
    prep = Preprocessing.from_settings(config.data)
    files = getattr(data_splits(config.data, config.seed), args.split)
    files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.max_slices, len(files))).round().astype(int)]
    slices = CodecInput.read(files, prep, originals=True)
    codec = Codec(model, prep, batch_size=16)
    compressed = codec.compress(slices)
    code_bits = len(compressed.blob) * 8
    start = time.perf_counter()
    decoded = dict(codec.decompress(compressed.file, codes=compressed.codes))
    decode_s = time.perf_counter() - start

    pixels = 0
    totals: dict[str, float] = {}
    not_integer = 0
    for i, original in enumerate(slices.originals):
        x = original.values.astype(np.float64)  # stored numbers (before scl_slope)
        if not np.array_equal(x, np.round(x)):
            not_integer += 1
            continue
        x = x.astype(np.int64)
        picture = decoded[i].reshape(x.shape).astype(np.float64)
        pred = np.round(picture).astype(np.int64)
        r = x - pred
        scale = max(1.0, float(np.percentile(x, 99.5)) / 256)  # contexts in units of the slice's range
        pixels += x.size
        for name, size in lossless_codecs(x - x.min()).items():
            totals[f"slice: {name}"] = totals.get(f"slice: {name}", 0) + 8 * size
        for name, size in lossless_codecs(r - r.min()).items():
            totals[f"residual: {name}"] = totals.get(f"residual: {name}", 0) + 8 * size
        for delta in args.deltas:
            step = 2 * delta + 1
            q = np.sign(r) * ((np.abs(r) + delta) // step)
            assert np.abs(r - q * step).max() <= delta
            for name, bits in model_bits(q, picture, scale).items():
                totals[f"δ={delta}: residual entropy, {name}"] = totals.get(f"δ={delta}: residual entropy, {name}", 0) + bits
            if delta:
                size = len(imagecodecs.jpegls_encode(np.ascontiguousarray((x - x.min()).astype(np.uint16)), level=delta))
                totals[f"δ={delta}: JPEG-LS NEAR={delta}"] = totals.get(f"δ={delta}: JPEG-LS NEAR={delta}", 0) + 8 * size

    print(f"{len(slices.originals) - not_integer} slices of integers ({not_integer} others skipped), "
          f"{pixels} pixels; codes file {code_bits / pixels:.3f} bpp (frequency-coded); "
          f"decoding the pictures {decode_s:.1f} s ({len(decoded) / decode_s:.1f} slices/s)")
    print("| what | bits per pixel | with the codes |")
    print("|---|---|---|")
    for name, bits in totals.items():
        extra = f"{(bits + code_bits) / pixels:.3f}" if name.startswith(("residual", "δ=")) and "JPEG-LS NEAR" not in name else ""
        print(f"| {name} | {bits / pixels:.3f} | {extra} |")

    # how far the picture moves between float32 batch sizes, and from float64
    top, bottom = (torch.as_tensor(c[:8]) for c in compressed.codes)
    with torch.inference_mode():
        one = torch.cat([model.decode_codes(top[j:j + 1], bottom[j:j + 1]) for j in range(len(top))]).float()
        batch = model.decode_codes(top, bottom).float()
        double = model.double().decode_codes(top, bottom).float()
    model.float()
    print(f"decoded picture (model space, [0, 1]): float32 batch 1 vs batch {len(top)}: max |diff| "
          f"{float((one - batch).abs().max()):.2e}; float32 vs float64: {float((batch - double).abs().max()):.2e}")


if __name__ == "__main__":
    main()
