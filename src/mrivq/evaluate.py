"""Run a model over a set of slices and score it; ``predict`` writes the test-set outputs.

Evaluation is always in eval mode under ``torch.inference_mode``: it never changes the
codebooks (the report's code let validation batches train them).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
from .checkpoint import atomic_write, checkpoint_config, load_checkpoint, model_from_checkpoint
from .config import Config
from .data.cache import load_split
from .data.preprocess import Preprocessing
from .data.sources import data_splits
from .data.splits import parse_name
from .logs import interactive, run_logger
from .report import save_sample_grid
from .runtime import autocast, resolve_device, resolve_precision, set_threads

log = logging.getLogger("mrivq")


@dataclass
class Evaluation:
    """Scores of a model over N slices (per-image tensors on the CPU)."""

    ssim: torch.Tensor
    psnr: torch.Tensor
    mse: torch.Tensor
    recon_loss: float
    commitment_loss: float
    counts_top: torch.Tensor
    counts_bottom: torch.Tensor
    images_per_s: float
    code_shapes: tuple[tuple[int, int], tuple[int, int]]
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def usage(self) -> dict:
        out = {}
        for level, counts in (("top", self.counts_top), ("bottom", self.counts_bottom)):
            used, perplexity = metrics.codebook_usage(counts)
            out[level] = {"size": int(counts.numel()), "used": used, "perplexity": perplexity}
        return out

    def scalars(self, latent_loss_weight: float) -> dict:
        usage = self.usage()
        return {
            "loss": self.recon_loss + latent_loss_weight * self.commitment_loss,
            "recon_loss": self.recon_loss,
            "commitment_loss": self.commitment_loss,
            "ssim": float(self.ssim.mean()),
            "psnr": float(self.psnr.mean()),
            "top_used": usage["top"]["used"],
            "top_perplexity": usage["top"]["perplexity"],
            "bottom_used": usage["bottom"]["used"],
            "bottom_perplexity": usage["bottom"]["perplexity"],
            "images_per_s": self.images_per_s,
        }


def slices_to_batch(slices: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W)`` float32 array -> ``(B, 1, H, W)`` channels-last tensor on ``device``."""
    # A copy: the cached slices are a read-only memory map, and the batch must not alias it.
    batch = torch.from_numpy(np.array(slices, dtype=np.float32, copy=True)).unsqueeze(1)
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: np.ndarray, *, batch_size: int, device: torch.device,
             precision: str, keep: list[int] | tuple[int, ...] = (), progress: bool = False,
             desc: str = "evaluate") -> Evaluation:
    """Reconstruct ``images`` ``(N, H, W)`` in [0, 1] and score every slice.

    ``keep`` lists slice indices whose input and reconstruction are returned for pictures.
    """
    was_training = model.training
    model.eval()
    quant_top, quant_bottom = model.quantize_top, model.quantize_bottom
    counts_top = torch.zeros(quant_top.n_embed, dtype=torch.long, device=device)
    counts_bottom = torch.zeros(quant_bottom.n_embed, dtype=torch.long, device=device)
    ssim, psnr, mse = [], [], []
    recon_sum = torch.zeros((), device=device, dtype=torch.float64)
    commit_sum = torch.zeros((), device=device, dtype=torch.float64)
    keep_set, kept = set(keep), {}
    code_shapes = None
    n = len(images)
    start = time.perf_counter()
    for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        x = slices_to_batch(images[lo:lo + batch_size], device)
        with autocast(device, precision):
            out = model(x)
        rec = out.reconstruction.float()
        recon_sum += F.mse_loss(rec, x, reduction="sum").double() / x[0].numel()
        commit_sum += out.commitment_loss.double() * len(x)
        counts_top += metrics.code_counts(out.codes_top, quant_top.n_embed)
        counts_bottom += metrics.code_counts(out.codes_bottom, quant_bottom.n_embed)
        code_shapes = (tuple(out.codes_top.shape[1:]), tuple(out.codes_bottom.shape[1:]))
        ssim.append(metrics.ssim_per_image(rec, x))
        psnr.append(metrics.psnr_per_image(rec, x))
        mse.append(metrics.mse_per_image(rec, x))
        for i in range(lo, lo + len(x)):
            if i in keep_set:
                kept[i] = (x[i - lo, 0].float().cpu().numpy(), rec[i - lo, 0].clamp(0, 1).cpu().numpy())
    result = Evaluation(
        ssim=torch.cat(ssim).cpu(), psnr=torch.cat(psnr).cpu(), mse=torch.cat(mse).cpu(),
        recon_loss=float(recon_sum) / n, commitment_loss=float(commit_sum) / n,
        counts_top=counts_top.cpu(), counts_bottom=counts_bottom.cpu(),
        images_per_s=n / (time.perf_counter() - start), code_shapes=code_shapes, kept=kept,
    )
    model.train(was_training)
    return result


def _stats(values: torch.Tensor) -> dict:
    v = values.double()
    finite = v[torch.isfinite(v)]
    return {
        "mean": float(finite.mean()) if len(finite) else math.nan,
        "std": float(finite.std(unbiased=False)) if len(finite) else math.nan,
        "p5": float(torch.quantile(finite, 0.05)) if len(finite) else math.nan,
        "min": float(finite.min()) if len(finite) else math.nan,
    }


def preprocessing(config: Config) -> Preprocessing:
    d = config.data
    return Preprocessing(image_size=tuple(d.image_size), fit=d.fit, normalize=d.normalize,
                         percentiles=tuple(d.percentiles))


def predict(config: Config, checkpoint: str | Path | None = None) -> dict:
    """Score a trained model on the test split and write the predict outputs of the run dir.

    Writes logging/predict.log, samples/predict_set_{i}.png, predict/summary.json and
    predict/per_slice.csv; returns the summary dict.
    """
    ckpt_path = Path(checkpoint or config.predict.checkpoint or config.model_dir / "best.pt").expanduser()
    ckpt = load_checkpoint(ckpt_path)
    trained = checkpoint_config(ckpt, ckpt_path)
    with run_logger(config.log_dir / "predict.log"):
        set_threads(config.train.num_threads)
        device = resolve_device(config.train.device)
        precision = resolve_precision(config.train.precision, device)
        model = model_from_checkpoint(ckpt, ckpt_path).to(device).to(memory_format=torch.channels_last)
        if trained.data.normalize != config.data.normalize or trained.data.image_size != config.data.image_size:
            log.warning("predict uses data settings (normalize=%s, image_size=%s) that differ from "
                        "training's (%s, %s)", config.data.normalize, list(config.data.image_size),
                        trained.data.normalize, list(trained.data.image_size))
        log.info("checkpoint %s (step %s, validation SSIM %.4f)", ckpt_path, ckpt.get("step"),
                 float(ckpt.get("best_ssim", float("nan"))))
        log.info("device %s, precision %s", device, precision)
        splits = data_splits(config.data, config.seed)
        test = load_split(splits.test, preprocessing(config), cache_dir=config.data.cache_dir,
                          on_bad_file=config.data.on_bad_file, workers=config.data.workers,
                          progress=interactive(), name="test")
        n = len(test.images)
        rng = np.random.default_rng(config.seed)
        per_set = min(config.predict.sample_size, n)
        sets = [sorted(rng.choice(n, size=per_set, replace=False).tolist())
                for _ in range(config.predict.sample_sets)]
        result = evaluate(model, test.images, batch_size=config.predict.batch_size, device=device,
                          precision=precision, keep=sorted({i for s in sets for i in s}),
                          progress=interactive(), desc="predict")
        for k, chosen in enumerate(sets):
            save_sample_grid(np.stack([result.kept[i][0] for i in chosen]),
                             np.stack([result.kept[i][1] for i in chosen]),
                             config.sample_dir / f"predict_set_{k}.png",
                             title=f"test set {k}: inputs (top) and reconstructions (bottom)",
                             labels=[f"SSIM {float(result.ssim[i]):.3f}" for i in chosen])
        model_cfg = trained.model
        top_shape, bottom_shape = result.code_shapes
        summary = {
            "n_images": n,
            "ssim": _stats(result.ssim),
            "psnr": _stats(result.psnr),
            "mse": float(result.mse.double().mean()),
            "codebook": result.usage(),
            "bits_per_pixel": metrics.raw_bits_per_pixel(
                tuple(config.data.image_size), top_shape, bottom_shape, model_cfg.n_embed, model_cfg.n_embed),
            "checkpoint": str(ckpt_path),
            "protocol": metrics.SSIM_PROTOCOL,
            "images_per_s": result.images_per_s,
            "skipped_files": [f for f, _ in test.skipped],
        }
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["file", "case", "ssim", "psnr", "mse"])
        for i, file in enumerate(test.files):
            writer.writerow([file, parse_name(file)[0], f"{float(result.ssim[i]):.6f}",
                             f"{float(result.psnr[i]):.4f}", f"{float(result.mse[i]):.8f}"])
        out_dir = config.run_dir / "predict"
        atomic_write(out_dir / "per_slice.csv", lambda fh: fh.write(rows.getvalue().encode()))
        atomic_write(out_dir / "summary.json",
                     lambda fh: fh.write(json.dumps(summary, indent=2).encode()))
        log.info("test: %d slices, SSIM %.4f ± %.4f (p5 %.4f, min %.4f), PSNR %.2f dB, %.1f images/s",
                 n, summary["ssim"]["mean"], summary["ssim"]["std"], summary["ssim"]["p5"],
                 summary["ssim"]["min"], summary["psnr"]["mean"], result.images_per_s)
        log.info("codebook use: top %d/%d (perplexity %.1f), bottom %d/%d (perplexity %.1f); "
                 "%.3f bits per pixel", summary["codebook"]["top"]["used"], model_cfg.n_embed,
                 summary["codebook"]["top"]["perplexity"], summary["codebook"]["bottom"]["used"],
                 model_cfg.n_embed, summary["codebook"]["bottom"]["perplexity"], summary["bits_per_pixel"])
        log.info("wrote %s", out_dir / "summary.json")
    return summary

