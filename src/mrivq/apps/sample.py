"""``mrivq sample``: new slices from a trained prior.

``sample(prior_path, n, out_dir)`` draws ``n`` top-code grids, then ``n`` bottom-code grids
given them (one position at a time, with the transformers' KV caches), decodes them with the
VQ-VAE stored in the prior checkpoint, and writes::

    OUT_DIR/samples.png            the slices as a grid, displayed as the run's pictures are
    OUT_DIR/sample_{i:03d}.nii.gz  each slice as NIfTI (model image size), in scanner-like units
                                   (the training slices' median normalisation undone) with the
                                   affine of the first training slice
    OUT_DIR/codes.npz              the sampled codes_top (n, h, w) and codes_bottom (n, 2h, 2w)
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mrivq.config import config_from_dict
from mrivq.data.io import nifti_bytes
from mrivq.data.preprocess import clip_to_input_range, denormalize
from mrivq.engine.checkpoint import codebook_fingerprint, load_prior
from mrivq.engine.inference import decode_images
from mrivq.errors import UserError
from mrivq.reporting.plots import save_samples_grid
from mrivq.run_dir import atomic_write


def sample(prior_path: str | Path, n: int, out_dir: str | Path, *, temperature: float = 1.0,
           seed: int = 0, batch_size: int = 16) -> dict:
    """Draw ``n`` new slices and write them to ``out_dir``; returns codes, timings and paths."""
    if n < 1:
        raise UserError("--n must be at least 1")
    if not temperature > 0 or not math.isfinite(temperature):
        raise UserError(f"--temperature must be a positive number, got {temperature}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the samples")
    prior, vqvae, ckpt = load_prior(prior_path)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    tops, bottoms = [], []
    threads = torch.get_num_threads()
    # One token per step makes every operation tiny: on the CPU, intra-op threads only add
    # synchronisation (measured 10-50x slower with 2 threads on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        for lo in range(0, n, batch_size):
            top, bottom = prior.sample(min(batch_size, n - lo), temperature=temperature, generator=generator)
            tops.append(top)
            bottoms.append(bottom)
    finally:
        torch.set_num_threads(threads)
    codes_top, codes_bottom = torch.cat(tops).numpy(), torch.cat(bottoms).numpy()
    sampled = time.perf_counter()
    reference = ckpt["reference"]
    height, width = (int(v) for v in reference["image_size"])
    slices = decode_images(vqvae, codes_top, codes_bottom)[:, :height, :width]
    normalize = config_from_dict(ckpt["vqvae"]["config"]).data.normalize
    slices = clip_to_input_range(slices, normalize)
    elapsed = time.perf_counter() - start
    affine = np.asarray(reference["affine"], dtype=np.float64)
    norm = np.asarray(reference["norm"], dtype=np.float32)
    outputs = [(out_dir / f"sample_{i:03d}.nii.gz",
                nifti_bytes(nib.Nifti1Image(denormalize(s, norm), affine)))
               for i, s in enumerate(slices)]
    buf = io.BytesIO()
    np.savez_compressed(buf, codes_top=codes_top.astype(np.uint16), codes_bottom=codes_bottom.astype(np.uint16),
                        fingerprint=np.array(codebook_fingerprint(vqvae)))
    outputs.append((out_dir / "codes.npz", buf.getvalue()))
    for path, blob in outputs:
        atomic_write(path, lambda fh, blob=blob: fh.write(blob))
    grid = out_dir / "samples.png"
    low, high = (0.0, 1.0) if normalize != "zscore" else (float(slices.min()), float(slices.max()))
    save_samples_grid(slices, grid, low, high,
                      title=f"{n} samples from {Path(prior_path).name} (temperature {temperature:g}, seed {seed})")
    return {"codes_top": codes_top, "codes_bottom": codes_bottom, "grid": str(grid),
            "nifti": [str(p) for p, _ in outputs[:-1]], "seconds": elapsed,
            "samples_per_s": n / elapsed, "code_samples_per_s": n / (sampled - start),
            "device": "cpu, 1 thread for the autoregressive loop"}


def main(args) -> int:
    """``mrivq sample --prior FILE --n N --out DIR [--temperature T] [--seed K]``."""
    result = sample(args.prior, args.n, args.out, temperature=args.temperature, seed=args.seed)
    print(f"wrote {result['grid']} and {len(result['nifti'])} NIfTI slices; "
          f"{result['samples_per_s']:.2f} samples/s on {result['device']}")
    return 0
