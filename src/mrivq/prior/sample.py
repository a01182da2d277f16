"""New slices from a trained prior (``mrivq sample``), and range coding of codes under the prior.

``sample(prior_path, n, out_dir)`` draws ``n`` top-code grids, then ``n`` bottom-code grids
given them (one position at a time, with the transformers' KV caches), decodes them with the
VQ-VAE stored in the prior checkpoint, and writes::

    OUT_DIR/samples.png            the slices as a grid, displayed as report.py displays slices
    OUT_DIR/sample_{i:03d}.nii.gz  each slice as NIfTI (model image size), in scanner-like units
                                   (the training slices' median normalisation undone) with the
                                   affine of the first training slice
    OUT_DIR/codes.npz              the sampled codes_top (n, h, w) and codes_bottom (n, 2h, 2w)
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import torch

from ..checkpoint import atomic_write, load_checkpoint, model_from_checkpoint
from ..codes import PRIOR_KIND, codebook_fingerprint, decode_images, range_code
from ..config import config_from_dict
from ..data.preprocess import denormalize
from ..errors import UserError
from ..models import VQVAE2
from ..report import display, save_figure
from .model import CodePrior
from .train import prior_from_config

log = logging.getLogger("mrivq")


def load_prior(path: str | Path, expect_fingerprint: str | None = None) -> tuple[CodePrior, VQVAE2, dict]:
    """The prior (eval mode), its VQ-VAE and the raw checkpoint of ``mrivq train-prior``."""
    path = Path(path).expanduser()
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != PRIOR_KIND:
        raise UserError(f"{path} is not a prior checkpoint; train one with `mrivq train-prior` "
                        "and give its models/prior_best.pt")
    if expect_fingerprint is not None and ckpt.get("fingerprint") != expect_fingerprint:
        raise UserError(f"{path} was trained on another VQ-VAE's codes; give the prior trained "
                        "with this checkpoint")
    config = config_from_dict(ckpt["config"])
    shape = ckpt["prior_shape"]
    prior = prior_from_config(config, int(shape["n_embed"]), tuple(shape["top_grid"]))
    try:
        prior.load_state_dict(ckpt["prior"])
    except RuntimeError:
        raise UserError(f"{path}: the prior's weights do not fit its stored config") from None
    vqvae = model_from_checkpoint(ckpt["vqvae"], path)
    return prior.eval(), vqvae.eval(), ckpt


@torch.inference_mode()
def prior_coded_bits(prior: CodePrior, codes_top: np.ndarray, codes_bottom: np.ndarray,
                     batch_size: int = 16) -> dict:
    """Range-code both levels under the prior's conditional probabilities; real stream bits per level.

    The probabilities of every position come from one teacher-forced pass. A decoder would
    recompute them position by position, through the cached path that sampling uses; that
    path differs from this one in floating-point rounding, so a decoder needs the encoder's
    exact computation (same path, same device) to stay in step. The figure is the size of
    this stream, not yet a round trip through such a decoder.
    """
    bits = {"top": 0, "bottom": 0}
    for lo in range(0, len(codes_top), batch_size):
        top = torch.as_tensor(np.asarray(codes_top[lo:lo + batch_size], dtype=np.int64))
        bottom = torch.as_tensor(np.asarray(codes_bottom[lo:lo + batch_size], dtype=np.int64))
        for level, logits, codes in zip(("top", "bottom"), prior(top, bottom), (top, bottom)):
            probs = torch.softmax(logits.double(), dim=1).permute(0, 2, 3, 1).reshape(-1, prior.n_embed)
            bits[level] += int(range_code(codes.numpy(), probs.numpy()).size * 32)
    return bits


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
    if normalize != "zscore":
        slices = np.clip(slices, 0.0, 1.0)
    elapsed = time.perf_counter() - start
    affine = np.asarray(reference["affine"], dtype=np.float64)
    norm = np.asarray(reference["norm"], dtype=np.float32)
    outputs = [(out_dir / f"sample_{i:03d}.nii.gz",
                gzip.compress(nib.Nifti1Image(denormalize(s, norm), affine).to_bytes(), mtime=0))
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


def save_samples_grid(slices: np.ndarray, path: Path, low: float = 0.0, high: float = 1.0,
                      title: str | None = None, columns: int = 4) -> None:
    """Slices ``(N, H, W)`` as a grid of up to ``columns`` per row, each displayed as report.py does."""
    n = len(slices)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    h, w = display(slices[0]).shape
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.0, 1.6 * cols * w / h), 1.8 * rows + 0.4),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k < n:
            ax.imshow(display(slices[k]), cmap="gray", vmin=low, vmax=high)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
