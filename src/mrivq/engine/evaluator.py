"""Run a model over a set of slices and score every slice (validation, predict, benchmarks).

Evaluation is always in eval mode under ``torch.inference_mode``: it never changes the
codebooks (the report's code let validation batches train them).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mrivq import metrics
from mrivq.compression.codec import slices_to_batch
from mrivq.data.hipmri import STRUCTURES


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
    mae: torch.Tensor | None = None
    # (codes_top (N, h, w), codes_bottom (N, 2h, 2w)) int64 arrays, with ``keep_codes``
    codes: tuple[np.ndarray, np.ndarray] | None = None
    # {structure: {"ssim", "psnr", "mae": (N,)}}, NaN where a slice lacks the structure or mask
    regions: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

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


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: np.ndarray, *, batch_size: int, device: torch.device,
             normalize: str, keep: list[int] | tuple[int, ...] = (), progress: bool = False,
             desc: str = "evaluate", masks: np.ndarray | None = None, loss_fn=None,
             keep_codes: bool = False) -> Evaluation:
    """Reconstruct ``images`` ``(N, H, W)`` (model input, normalised by ``normalize``) and score
    every slice.

    The model runs in float32 whatever precision trained it, so scores, code counts and codes
    are the same on every machine (and match ``mrivq encode``). The losses are in model space;
    the metrics and the kept pictures are on [0, 1] (see :func:`mrivq.metrics.to_unit_range`).
    ``loss_fn(reconstruction, x)`` is the reconstruction loss training uses (default MSE).
    Besides the scores, on request: ``keep`` lists slice indices whose input and reconstruction
    are returned for pictures; ``masks`` ``(N, H, W)`` integer labels (all zero for a slice
    without a mask) add the region metrics of :data:`mrivq.data.hipmri.STRUCTURES`;
    ``keep_codes`` returns every slice's codes too (the same as ``model.encode`` gives).
    """
    was_training = model.training
    model.eval()
    totals = _Totals(model, device, loss_fn or F.mse_loss)
    scores = _SliceScores()
    regions = _RegionScores(masks) if masks is not None else None
    pictures = _KeptPictures(keep)
    codes = _KeptCodes() if keep_codes else None
    n = len(images)
    start = time.perf_counter()
    for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        x = slices_to_batch(images[lo:lo + batch_size], device)
        out = model(x)
        rec = out.reconstruction.float()
        totals.add(out, rec, x)
        if codes is not None:
            codes.add(out)
        rec01, x01 = metrics.to_unit_range(rec, x, normalize)
        scores.add(rec01, x01)
        if regions is not None:
            regions.add(lo, rec01, x01)
        pictures.add(lo, rec01, x01)
    result = Evaluation(
        **scores.result(), **totals.result(n), images_per_s=n / (time.perf_counter() - start),
        kept=pictures.kept, codes=codes.result() if codes is not None else None,
        regions=regions.result() if regions is not None else {},
    )
    model.train(was_training)
    return result


class _Totals:
    """The mean losses over the slices, each codebook's use and the code grids' shapes."""

    def __init__(self, model: torch.nn.Module, device: torch.device, loss_fn):
        self.loss_fn = loss_fn
        self.n_embed = (model.quantize_top.n_embed, model.quantize_bottom.n_embed)
        self.counts_top = torch.zeros(self.n_embed[0], dtype=torch.long, device=device)
        self.counts_bottom = torch.zeros(self.n_embed[1], dtype=torch.long, device=device)
        self.recon_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.commit_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.code_shapes = None

    def add(self, out, rec: torch.Tensor, x: torch.Tensor) -> None:
        self.recon_sum += self.loss_fn(rec, x).double() * len(x)
        self.commit_sum += out.commitment_loss.double() * len(x)
        self.counts_top += metrics.code_counts(out.codes_top, self.n_embed[0])
        self.counts_bottom += metrics.code_counts(out.codes_bottom, self.n_embed[1])
        self.code_shapes = (tuple(out.codes_top.shape[1:]), tuple(out.codes_bottom.shape[1:]))

    def result(self, n: int) -> dict:
        return {"recon_loss": float(self.recon_sum) / n, "commitment_loss": float(self.commit_sum) / n,
                "counts_top": self.counts_top.cpu(), "counts_bottom": self.counts_bottom.cpu(),
                "code_shapes": self.code_shapes}


class _SliceScores:
    """SSIM, PSNR, MSE and MAE of each slice on [0, 1]."""

    def __init__(self):
        self.scores = {"ssim": [], "psnr": [], "mse": [], "mae": []}

    def add(self, rec01: torch.Tensor, x01: torch.Tensor) -> None:
        self.scores["ssim"].append(metrics.ssim_per_image(rec01, x01))
        self.scores["psnr"].append(metrics.psnr_per_image(rec01, x01))
        self.scores["mse"].append(metrics.mse_per_image(rec01, x01))
        self.scores["mae"].append(metrics.mae_per_image(rec01, x01))

    def result(self) -> dict:
        return {key: torch.cat(values).cpu() for key, values in self.scores.items()}


class _RegionScores:
    """SSIM, PSNR and MAE of each slice inside each structure of its mask (NaN where absent)."""

    def __init__(self, masks: np.ndarray):
        self.masks = masks
        self.scores = {name: {"ssim": [], "psnr": [], "mae": []} for name in STRUCTURES}

    def add(self, lo: int, rec01: torch.Tensor, x01: torch.Tensor) -> None:
        batch_masks = torch.from_numpy(np.asarray(self.masks[lo:lo + len(x01)], dtype=np.int64))
        for name, values in metrics.region_metrics(rec01, x01, batch_masks, STRUCTURES).items():
            for key, v in values.items():
                self.scores[name][key].append(v)

    def result(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {k: torch.cat(v).cpu() for k, v in values.items()} for name, values in self.scores.items()}


class _KeptPictures:
    """The input and the clamped reconstruction, (H, W) on [0, 1], of the slices at ``keep``."""

    def __init__(self, keep):
        self.keep = set(keep)
        self.kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, lo: int, rec01: torch.Tensor, x01: torch.Tensor) -> None:
        for i in range(lo, lo + len(x01)):
            if i in self.keep:
                self.kept[i] = (x01[i - lo, 0].cpu().numpy(), rec01[i - lo, 0].clamp(0, 1).cpu().numpy())


class _KeptCodes:
    """Every slice's codes: ``(codes_top (N, h, w), codes_bottom (N, 2h, 2w))`` int64 arrays."""

    def __init__(self):
        self.top, self.bottom = [], []

    def add(self, out) -> None:
        self.top.append(out.codes_top.cpu().numpy())
        self.bottom.append(out.codes_bottom.cpu().numpy())

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.top), np.concatenate(self.bottom)


def merge_evaluations(parts: list[tuple[np.ndarray, Evaluation]], n: int) -> Evaluation:
    """One Evaluation of ``n`` slices from parts that each scored the slices at their indices."""
    def per_slice(name):
        if getattr(parts[0][1], name) is None:
            return None
        out = torch.empty(n, dtype=getattr(parts[0][1], name).dtype)
        for index, part in parts:
            out[torch.as_tensor(index)] = getattr(part, name)
        return out

    sizes = [len(index) for index, _ in parts]
    return dataclasses.replace(
        parts[0][1],
        ssim=per_slice("ssim"), psnr=per_slice("psnr"), mse=per_slice("mse"), mae=per_slice("mae"),
        regions={},  # validation scores whole slices only
        recon_loss=sum(p.recon_loss * k for (_, p), k in zip(parts, sizes)) / n,
        commitment_loss=sum(p.commitment_loss * k for (_, p), k in zip(parts, sizes)) / n,
        counts_top=sum(p.counts_top for _, p in parts),
        counts_bottom=sum(p.counts_bottom for _, p in parts),
        images_per_s=sum(p.images_per_s for _, p in parts),
        kept={i: pictures for _, p in parts for i, pictures in p.kept.items()},
    )
