"""Lossless and bounded-error files: mrivq's residual layer against the codecs a clinic would use.

For the test slices of a run (stored integers), at each maximum error δ (0 is lossless):

- **mrivq**: ``encode --max-error δ`` through the codec (the codes frequency-coded, or under
  ``--prior``), bits per voxel of the whole file and of its two parts (codes, residual), the
  largest error over every voxel (checked), SSIM / PSNR under the project's protocol, and the
  coder's speed (encode and decode, slices per second, the VQ-VAE included), and after the table how
  many slices the encoder coded in four phases at each bound (payload version 5);
- **the lossless and near-lossless codecs** on the stored integers (imagecodecs): JPEG-LS at
  NEAR = δ, and at δ = 0 JPEG XL (lossless, at its strongest effort, 6), JPEG 2000 and HTJ2K (reversible) and PNG;
- **the lossy codecs at mrivq's rate** of each δ, each slice at the best setting whose file fits
  that many bits per voxel: JPEG XL on the 16-bit integers (a distance found by bisection),
  AVIF at 12 bits, monochrome (quality by bisection; values above 4,095 shifted down and back) and WebP at
  8 bits (all it takes), with the largest error and SSIM / PSNR each gives.

With ``--by-scan`` it also splits each bound's file by scan (the slices of one volume, by their
names): each scan's codes (its slices' own streams under a prior; an equal share of a
frequency-coded stream), residual and whole, beside each lossless codec's, in bits per voxel of
that scan (the file's header and tables, shared by every scan, are left out of these rows).

With ``--phantom-floor`` it also prints the phantom's own floor: the entropy of its Rician noise
given the noise-free picture (the generator's images before the noise, a few volumes of the
test slices' size), which no coder of the stored values can beat.

Usage::

    python benchmarks/lossless.py RUN_DIR [--prior PRIOR] [--split test] [--max-slices 60] [--deltas 0 1 2 4]
                                  [--phantom-floor] [--size H W] [--no-lossy] [--repeat N] [--by-scan]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mrivq.compression import codecs, driver, residual
from mrivq.compression.codec import CodecInput
from mrivq.compression.container import CodesFile
from mrivq.compression.layers import Stored
from mrivq.config import load_config
from mrivq.data.sources import data_splits
from mrivq.data.volumes import volume_place
from mrivq.engine.checkpoint import load_codec


def scored(codec, values: list[np.ndarray], slices: CodecInput) -> tuple[float, float]:
    """Mean SSIM and PSNR of slices given as stored values (:meth:`Codec.stored_scores`)."""
    stored = [Stored(v, o.dtype, o.slope, o.inter) for v, o in zip(values, slices.originals)]
    return tuple(float(np.mean(v)) for v in codec.stored_scores(slices, stored))


def by_scan(file: CodesFile, originals: list[np.ndarray], sizes: list[dict[str, int]], delta: int) -> None:
    """Print ``file``'s codes and residual bits and each lossless codec's (``sizes``: bytes per codec,
    one dict per slice), per scan (by slice names)."""
    names = [source["name"] for source in file.header["sources"]]
    if file.header["coder"] == "prior":  # each slice's stream and its length word
        codes = 32.0 * np.array([len(stream) + 1 for stream in driver.split_streams(file.stream, file.n)])
    else:
        codes = np.full(file.n, 32.0 * len(file.stream) / file.n)
    payload = np.array([8.0 * len(p) for p in file.layers["residual"]])
    scans = np.array([(volume_place(name) or (name, 0))[0] for name in names])
    print(f"| δ = {delta}, by scan | slices | voxels per slice | codes | residual | mrivq | lossless codecs |")
    print("|---|---|---|---|---|---|---|")
    for scan in dict.fromkeys(scans):
        rows = np.flatnonzero(scans == scan)
        voxels = sum(originals[i].size for i in rows)
        others = ", ".join(f"{name} {8 * sum(sizes[i][name] for i in rows) / voxels:.3f}" for name in sizes[rows[0]])
        print(f"| {scan} | {len(rows)} | {'x'.join(map(str, originals[rows[0]].shape))} | "
              f"{codes[rows].sum() / voxels:.3f} | {payload[rows].sum() / voxels:.3f} | "
              f"{(codes[rows].sum() + payload[rows].sum()) / voxels:.3f} | {others} |")


def speed(n: int, seconds: list[float]) -> str:
    """Slices per second: one figure, or over repeats the median (least-most)."""
    rates = sorted(n / s for s in seconds)
    if len(rates) == 1:
        return f"{rates[0]:.1f}"
    return f"{float(np.median(rates)):.1f} ({rates[0]:.1f}-{rates[-1]:.1f})"


def phantom_noise_floor(shape: tuple[int, int], volumes: int = 4, n_slices: int = 30) -> tuple[float, float, float]:
    """Bits per voxel of the phantom's Rician noise given the noise-free picture (each voxel's
    differential entropy: the noise sd is several stored units, so rounding to integers adds
    nothing measurable), and the least and greatest noise sd of the volumes."""
    from scipy import stats

    from mrivq.data.phantom import _render_volume

    grid = np.linspace(0, 8, 161)
    unit = np.array([stats.rice(b).entropy() for b in grid])  # nats, sd 1; far above 8 a Gaussian's
    bits, count, sigmas = 0.0, 0, []
    for seed in range(volumes):
        clean, _, sigma = _render_volume((seed, 7), (seed, 7, 0), n_slices, shape, thermal_noise=False)
        snr = clean.astype(np.float64) / sigma
        nats = np.where(snr > grid[-1], 0.5 * np.log(2 * np.pi * np.e), np.interp(snr, grid, unit)) + np.log(sigma)
        bits += float(nats.sum()) / np.log(2)
        count += nats.size
        sigmas.append(sigma)
    return bits / count, min(sigmas), max(sigmas)


def resampled(files: list, size: tuple[int, int], folder: Path) -> list[Path]:
    """Each slice resampled to ``size`` (bilinear), rounded to int16, written into ``folder``."""
    import nibabel as nib
    from scipy import ndimage

    out = []
    for path in files:
        values = np.asarray(nib.load(path).dataobj, dtype=np.float64).squeeze()
        zoomed = ndimage.zoom(values, (size[0] / values.shape[0], size[1] / values.shape[1]), order=1)
        out.append(folder / Path(path).name)
        nib.save(nib.Nifti1Image(np.round(zoomed).astype(np.int16), np.eye(4)), out[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prior", type=Path, help="code the codes under this prior (models/prior_best.pt)")
    parser.add_argument("--split", default="test", choices=("train", "validate", "test"))
    parser.add_argument("--max-slices", type=int, default=60)
    parser.add_argument("--deltas", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="encode and decode each bound this many times: speeds as median (least-most)")
    parser.add_argument("--no-lossy", action="store_true", help="skip the lossy codecs' searches")
    parser.add_argument("--phantom-floor", action="store_true", help="also print the phantom's noise entropy")
    parser.add_argument("--by-scan", action="store_true", help="also split each bound's file by scan")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="resample the slices to H x W first (bilinear, rounded to int16): speed at a given size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.run_dir / "config.yaml")
    codec = load_codec(args.run_dir / "models" / "best.pt", prior=args.prior)
    files = getattr(data_splits(config.data, config.seed), args.split)
    files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.max_slices, len(files))).round().astype(int)]
    if args.size:
        scratch = tempfile.TemporaryDirectory(prefix="mrivq-lossless-")  # removed when the run ends
        files = resampled(files, tuple(args.size), Path(scratch.name))
    slices = CodecInput.read(files, codec.prep, originals=True)
    originals = [o.values for o in slices.originals]
    voxels = sum(x.size for x in originals)
    print(f"{len(files)} {args.split} slices of {args.run_dir} ({voxels} voxels), codes "
          f"{'under ' + str(args.prior) if args.prior else 'frequency-coded'}; torch threads {args.threads}")
    if args.phantom_floor:
        floor, least, most = phantom_noise_floor(tuple(originals[0].shape))
        print(f"the phantom's Rician noise given the noise-free picture: {floor:.3f} bits per voxel "
              f"(noise sd {least:.1f}-{most:.1f} stored units; {len(originals[0])}x{originals[0].shape[1]} slices)")
    print("| δ | coder | bits per voxel | codes / residual | largest error | SSIM | PSNR | encode / decode slices/s |")
    print("|---|---|---|---|---|---|---|---|")
    four: dict[int, int] = {}  # by bound: the slices the encoder coded in four phases
    for delta in args.deltas:
        encode_s, decode_s = [], []
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            packed = codec.compress(slices, layers=("residual",), layer_options={"residual": {"max_error": delta}})
            encode_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            decoded = [stored.values for _, stored in codec.decompress(CodesFile.from_bytes(packed.blob))]
            decode_s.append(time.perf_counter() - start)
        error = max(np.abs(d.astype(np.float64) - x).max() for d, x in zip(decoded, originals))
        assert error <= delta, f"the residual layer's error {error} is above {delta}"
        residual_bits = 8 * sum(len(p) for p in packed.file.layers["residual"])
        four[delta] = sum(len(residual._parse(p, x.shape).phases) == 4
                          for p, x in zip(packed.file.layers["residual"], originals))
        rate = 8 * len(packed.blob) / voxels
        ssim, psnr = scored(codec, decoded, slices)
        print(f"| {delta} | **mrivq** | **{rate:.3f}** | {rate - residual_bits / voxels:.3f} / "
              f"{residual_bits / voxels:.3f} | {error:g} | {ssim:.4f} | {psnr:.2f} | "
              f"{speed(len(files), encode_s)} / {speed(len(files), decode_s)} |")
        sizes = [codecs.lossless_sizes(x, delta) for x in originals]
        totals = {name: sum(each[name] for each in sizes) for name in sizes[0]}
        for name, size in totals.items():
            label = f"{name} NEAR={delta}" if name == "JPEG-LS" and delta else name
            print(f"| {delta} | {label} | {8 * size / voxels:.3f} | | {delta} | | | |")
        if args.by_scan:
            by_scan(packed.file, originals, sizes, delta)
        if args.no_lossy:
            continue
        lossy: dict[str, list[np.ndarray]] = {}
        for x in originals:
            for name, (values, _) in codecs.lossy_at_rate(x, rate).items():
                lossy.setdefault(name, []).append(values)
        for name, values in lossy.items():
            error = max(np.abs(v - x).max() for v, x in zip(values, originals))
            ssim, psnr = scored(codec, values, slices)
            print(f"| {delta} | {name} at mrivq's rate | ≤ {rate:.3f} | | {error:g} | {ssim:.4f} | {psnr:.2f} | |")
    print("slices the residual layer coded in four phases (the rest in three): "
          + ", ".join(f"δ = {delta}: {n} of {len(files)}" for delta, n in four.items()))


if __name__ == "__main__":
    main()
