"""``mrivq sample``: new slices from a trained prior.

``sample(prior_path, n, out_dir)`` draws ``n`` top-code grids, then ``n`` bottom-code grids
given them (one position at a time, with the transformers' KV caches), decodes them with the
VQ-VAE stored in the prior checkpoint, and writes::

    OUT_DIR/samples.png            the slices (the first 64) as a grid, displayed as the run's pictures are
    OUT_DIR/sample_{i:03d}.nii.gz  each slice as NIfTI (model image size), in scanner-like units
                                   (the training slices' median normalisation undone) with the
                                   affine of the first training slice
    OUT_DIR/codes.npz              the sampled codes_top (n, h, w) and codes_bottom (n, 2h, 2w)
    OUT_DIR/nearest.png, .csv      each shown sample over its most similar training slice (SSIM); the
                                   picture's title gives the same score of reconstructed unseen
                                   validation slices, the level a plausible new slice reaches
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mrivq import metrics
from mrivq.apps import flags
from mrivq.compression.codec import decode_images, encode_images, model_fingerprint
from mrivq.compression.priors import kind_of
from mrivq.data.cache import load_split
from mrivq.data.io import nifti_bytes, nifti_image
from mrivq.data.preprocess import Preprocessing, clip_to_input_range, denormalize
from mrivq.data.sources import data_splits
from mrivq.engine.checkpoint import (
    checkpoint_config,
    load_prior,
    prior_reference,
)
from mrivq.engine.losses import differentiable_ssim
from mrivq.errors import UserError
from mrivq.nn.pass_prior import NonFiniteProbabilities
from mrivq.reporting.plots import save_samples_grid
from mrivq.run_dir import atomic_write, claim_outputs
from mrivq.runtime import resolve_device, torch_threads

SHORTLIST = 32  # training slices scored with SSIM per sample, of those that correlate best
SHOWN = 64  # samples in samples.png and scored against the training slices (the first ones drawn)
PAIR_CHUNK = 128  # pairs of slices scored at once (memory: ~2 MiB of SSIM maps a pair of 256 x 128)
TOP_P = 0.8  # nucleus sampling's share of the probability unless told otherwise


def sample(prior_path: str | Path, n: int, out_dir: str | Path, *, temperature: float = 1.0,
           top_p: float = TOP_P, seed: int = 0, batch_size: int = 16, device: str = "auto", nearest: bool = True,
           overwrite: bool = False) -> dict:
    """Draw ``n`` new slices and write them to ``out_dir``; returns codes, timings and paths.

    ``temperature`` and ``top_p`` (nucleus sampling) shape each code's distribution, as in
    :meth:`mrivq.nn.transformer_prior.CodeTransformer.sample`.

    ``nearest``: also find each sample's most similar training slice (SSIM) and write
    ``nearest.png`` (samples over them) and ``nearest.csv``, so memorisation is visible; skipped,
    with a note, when the training slices are not on this machine.

    Everything is checked before the first file is written; slices are written a batch at a
    time as they are drawn, so an interrupted run keeps what it drew. ``overwrite``: replace
    the files of an earlier ``mrivq sample`` in ``out_dir`` (never other files).
    """
    if n < 1:
        raise UserError("--n must be at least 1")
    if not 0.01 <= temperature <= 100:
        raise UserError(f"--temperature must be between 0.01 and 100, got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    out_dir = Path(out_dir).expanduser()
    device = resolve_device(device)
    prior, vqvae, ckpt = load_prior(prior_path, device=device)
    config, vq_config = checkpoint_config(ckpt, prior_path), checkpoint_config(ckpt["vqvae"], prior_path)
    affine, norm = prior_reference(ckpt, prior_path)
    # Caches go where this user keeps them, never where the checkpoint's config says.
    config = config.model_copy(update={"data": config.data.model_copy(update={"cache_dir": None})})
    references = _reference_slices(config, vq_config) if nearest else None
    names = [f"sample_{i:0{max(3, len(str(n - 1)))}d}.nii.gz" for i in range(n)]
    extra = ["codes.npz", "samples.png"] + (["nearest.png", "nearest.csv"] if references else [])
    claim_outputs(out_dir, "sample", [out_dir / name for name in names + extra], overwrite=overwrite,
                  inputs=[prior_path])
    try:
        drawn = _draw(prior, vqvae, (affine, norm), vq_config, n, out_dir, names, temperature=temperature, top_p=top_p,
                      generator=torch.Generator(device=device).manual_seed(seed), batch_size=batch_size)
    except NonFiniteProbabilities as exc:
        raise UserError(f"{prior_path}: {exc}; train the prior again") from None
    codes_top, codes_bottom, shown = drawn["codes_top"], drawn["codes_bottom"], drawn["shown"]
    buf = io.BytesIO()
    np.savez_compressed(buf, codes_top=codes_top, codes_bottom=codes_bottom,
                        fingerprint=np.array(model_fingerprint(vqvae)))
    atomic_write(out_dir / "codes.npz", lambda fh: fh.write(buf.getvalue()), listed=False)
    grid = out_dir / "samples.png"
    normalize = vq_config.data.normalize
    low, high = (0.0, 1.0) if normalize != "zscore" else (float(shown.min()), float(shown.max()))
    which = f"{n} samples" if n <= SHOWN else f"the first {SHOWN} of {n} samples"
    save_samples_grid(shown, grid, low, high, title=f"{which} from {Path(prior_path).name} "
                      f"(temperature {temperature:g}, top-p {top_p:g}, seed {seed})")
    result = {"codes_top": codes_top, "codes_bottom": codes_bottom, "grid": str(grid),
              "nifti": [str(out_dir / name) for name in names], "seconds": drawn["seconds"],
              "samples_per_s": n / drawn["seconds"], "code_samples_per_s": n / drawn["code_seconds"],
              "device": f"{device.type}" + (", 1 thread for the autoregressive loop"
                                            if device.type == "cpu" and not kind_of(prior).threads_draw else "")}
    if references:
        result.update(_nearest_training_slices(shown, references, vq_config, out_dir, vqvae, names))
    return result


def _draw(prior, vqvae, reference: tuple[np.ndarray, np.ndarray], vq_config, n: int, out_dir: Path,
          names: list[str], *, temperature: float, top_p: float, generator: torch.Generator, batch_size: int) -> dict:
    """Draw ``n`` slices a batch at a time, writing each batch's NIfTI files as it is decoded;
    after the first batch of a long job, say how long the whole will take."""
    height, width = vq_config.data.image_size
    affine, norm = reference
    normalize = vq_config.data.normalize
    tops, bottoms, shown, code_seconds = [], [], [], 0.0
    start = time.perf_counter()
    # A prior that draws one token per step (the transformer) makes every operation tiny: on the
    # CPU, intra-op threads only add synchronisation (measured 10-50x slower with 2 threads on a
    # busy 2-core machine). A pass prior draws whole passes: it keeps the threads.
    drawing_threads = torch.get_num_threads() if kind_of(prior).threads_draw else 1
    batches = range(0, n, batch_size)
    for lo in tqdm(batches, desc="sample", unit="batch", disable=None, leave=False):
        began = time.perf_counter()
        with torch_threads(drawing_threads):
            top, bottom = prior.sample(min(batch_size, n - lo), temperature=temperature, top_p=top_p,
                                       generator=generator)
        top, bottom = top.cpu().numpy(), bottom.cpu().numpy()
        code_seconds += time.perf_counter() - began
        slices = clip_to_input_range(decode_images(vqvae, top, bottom)[:, :height, :width], normalize)
        for name, decoded in zip(names[lo:], slices):
            blob = nifti_bytes(nifti_image(denormalize(decoded, norm), affine))
            atomic_write(out_dir / name, lambda fh, blob=blob: fh.write(blob), listed=False)
        tops.append(top.astype(np.uint16))
        bottoms.append(bottom.astype(np.uint16))
        shown += list(slices[:max(0, SHOWN - len(shown))])
        if lo == 0 and n > batch_size:
            rate = len(top) / (time.perf_counter() - start)
            tqdm.write(f"mrivq sample: {n} slices will take about {_duration(n / rate)} at {rate:.2f} "
                       f"slices/s; each is written as it is drawn (an interrupted run keeps them)",
                       file=sys.stderr)
    return {"codes_top": np.concatenate(tops), "codes_bottom": np.concatenate(bottoms), "shown": np.stack(shown),
            "seconds": time.perf_counter() - start, "code_seconds": code_seconds}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _reference_slices(config, vq_config):
    """The training (and validation) slices of the prior's run, for ``nearest``; None, with a
    note on stderr, when they are not on this machine."""
    try:
        splits = data_splits(config.data, config.seed)
    except UserError as exc:
        print(f"mrivq sample: not comparing samples with the training slices: {exc}", file=sys.stderr)
        return None

    def split(paths, name):
        return load_split(paths, Preprocessing.from_settings(vq_config.data), cache_dir=config.data.cache_dir,
                          on_bad_file="skip", workers=config.data.workers, name=name)
    try:
        return split(splits.train, "train"), (split(splits.validate, "validate") if splits.validate else None)
    except UserError as exc:
        print(f"mrivq sample: not comparing samples with the training slices: {exc}", file=sys.stderr)
        return None


def _nearest_training_slices(slices: np.ndarray, references, vq_config, out_dir: Path, vqvae,
                             names: list[str]) -> dict:
    """Each sample's most similar training slice by SSIM (on [0, 1], among the ``SHORTLIST``
    that correlate best): ``nearest.png`` and ``nearest.csv``. As a yardstick, the same score of
    the VQ-VAE's reconstructions of as many unseen validation slices (evenly spaced through the
    split): a sample as close to the training set as they are is as plausible as a new slice."""
    train, val = references
    normalize = vq_config.data.normalize
    best_index, best_ssim = _most_similar(slices, train.images, normalize)
    reference, variety = [], {"samples": _mutual_ssim(slices, normalize)}
    if val is not None:
        pick = np.unique(np.linspace(0, len(val.images) - 1, min(len(slices), len(val.images))).round().astype(int))
        unseen = decode_images(vqvae, *encode_images(vqvae, val.images[pick]))[:, :slices.shape[1], :slices.shape[2]]
        unseen = clip_to_input_range(unseen, normalize)
        reference = _most_similar(unseen, train.images, normalize)[1]
        variety["unseen"] = _mutual_ssim(unseen, normalize)
    # Rows of four samples, each row followed by the four training slices most similar to them.
    n, blank = len(slices), (4 - len(slices) % 4) % 4
    pictures = [metrics.unit_range_images(images, normalize) for images in (slices, train.images[best_index])]
    pictures = [np.concatenate([p, np.zeros((blank, *p.shape[1:]), p.dtype)]) for p in pictures]
    captions = [[f"sample {i}" for i in range(n)] + [""] * blank,
                [f"nearest: SSIM {s:.3f}" for s in best_ssim] + [""] * blank]
    order = [(half, i) for lo in range(0, n + blank, 4) for half in (0, 1) for i in range(lo, lo + 4)]
    title = "rows of samples, each followed by the training slices most similar to them (SSIM)"
    if reference:
        title += (f"\nreconstructed unseen validation slices score {min(reference):.3f} to {max(reference):.3f}"
                  f" (mean {np.mean(reference):.3f}) against the same training slices")
    save_samples_grid(np.stack([pictures[h][i] for h, i in order]), out_dir / "nearest.png",
                      labels=[captions[h][i] for h, i in order], title=title)
    rows = "sample,training_slice,ssim\n" + "".join(
        f"{name},{Path(train.files[j]).name},{s:.6f}\n" for name, j, s in zip(names, best_index, best_ssim))
    atomic_write(out_dir / "nearest.csv", lambda fh: fh.write(rows.encode()), listed=False)
    return {"nearest": [{"training_slice": train.files[j], "ssim": s} for j, s in zip(best_index, best_ssim)],
            "nearest_grid": str(out_dir / "nearest.png"), "unseen_nearest_ssim": reference,
            "mutual_ssim": variety}


def _mutual_ssim(slices: np.ndarray, normalize: str) -> float | None:
    """The mean SSIM (on [0, 1]) between every two of ``slices``: how alike they are; None for
    fewer than two."""
    if len(slices) < 2:
        return None
    images = _unit_batch(slices, normalize).clamp(0, 1)
    first, second = torch.triu_indices(len(images), len(images), offset=1)
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():  # PAIR_CHUNK pairs at a time: 64 slices make 2,016 pairs
        for lo in tqdm(range(0, len(first), PAIR_CHUNK), desc="sample: SSIM between samples", unit="chunk",
                       disable=None, leave=False):
            pairs = slice(lo, lo + PAIR_CHUNK)
            total += differentiable_ssim(images[first[pairs]], images[second[pairs]]).double().sum()
    return float(total / len(first))


def _most_similar(slices: np.ndarray, train_images, normalize: str) -> tuple[list[int], list[float]]:
    """For each of ``slices`` ``(n, H, W)``, the index of the most similar of ``train_images`` by
    SSIM on [0, 1] and that SSIM. Shortlists by correlation at a quarter of the resolution (one
    matrix product per chunk, fast for HipMRI's 11,460 slices too), then scores the ``SHORTLIST``
    best with the protocol's SSIM."""
    samples = _unit_batch(slices, normalize)

    def thumbnails(x: torch.Tensor) -> torch.Tensor:
        small = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
        small = small - small.mean(1, keepdim=True)
        return small / small.norm(dim=1, keepdim=True).clamp_min(1e-8)

    shortlist = min(SHORTLIST, len(train_images))
    with torch.inference_mode():
        query, correlations = thumbnails(samples), []
        for lo in range(0, len(train_images), 512):  # the cached slices are a memory map: a chunk at a time
            chunk = _unit_batch(train_images[lo:lo + 512], normalize)
            correlations.append(query @ thumbnails(chunk).T)
        candidates = torch.cat(correlations, dim=1).topk(shortlist, dim=1).indices  # (n, shortlist)
        best_ssim, best_index = [], []
        for sample, chosen in tqdm(list(zip(samples, candidates.tolist())), desc="sample: nearest training slices",
                                   unit="sample", disable=None, leave=False):
            chosen = sorted(chosen)
            target = _unit_batch(train_images[chosen], normalize)
            scores = differentiable_ssim(sample.expand_as(target).clamp(0, 1), target)
            best_index.append(chosen[int(scores.argmax())])
            best_ssim.append(float(scores.max()))
    return best_index, best_ssim


def _unit_batch(slices, normalize: str) -> torch.Tensor:
    """Slices ``(n, H, W)`` (an array or a slice of the cached memory map) on the scoring range
    [0, 1], as a float32 ``(n, 1, H, W)`` tensor."""
    return torch.from_numpy(np.asarray(metrics.unit_range_images(np.array(slices, dtype=np.float32), normalize),
                                       dtype=np.float32))[:, None]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior", required=True, metavar="FILE", help="models/prior_best.pt of `mrivq train-prior`")
    parser.add_argument("--n", type=int, default=16, help="number of slices (default 16)")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=TOP_P, metavar="P",
                        help="nucleus sampling: draw each code from the most probable codes that hold P of the "
                             "probability (default %(default)s; 1: from all codes)")
    parser.add_argument("--seed", type=int, default=0)
    flags.add_device(parser)
    flags.add_overwrite(parser)


def main(args) -> int:
    """Sample, then say how the samples compare with the training slices."""
    result = sample(args.prior, args.n, args.out, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    device=args.device, overwrite=args.overwrite)
    print(f"wrote {result['grid']} and {len(result['nifti'])} NIfTI slices; "
          f"{result['samples_per_s']:.2f} samples/s on {result['device']}")
    if "nearest" in result:
        ssim = [item["ssim"] for item in result["nearest"]]
        print(f"wrote {result['nearest_grid']}: SSIM of each sample to its most similar training slice "
              f"{min(ssim):.3f} to {max(ssim):.3f} (mean {sum(ssim) / len(ssim):.3f}; near 1 would mean memorised)")
        if result["unseen_nearest_ssim"]:
            ref = result["unseen_nearest_ssim"]
            print(f"  the VQ-VAE's reconstructions of {len(ref)} unseen validation slices score {min(ref):.3f} to "
                  f"{max(ref):.3f} (mean {sum(ref) / len(ref):.3f}) against the same training slices: "
                  "samples as plausible as real new slices would score about as much")
        variety = result["mutual_ssim"]
        if variety["samples"] is not None:
            print(f"  the samples resemble each other at SSIM {variety['samples']:.3f} on average"
                  + (f" (those validation slices: {variety['unseen']:.3f}); higher: less varied" if "unseen" in variety
                     else ""))
    return 0
