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
    ``keep_codes`` returns every slice's codes too (the same as ``model.encode`` gives).
    ``keep`` lists slice indices whose input and reconstruction are returned for pictures.
    ``masks`` ``(N, H, W)`` integer labels (all zero for a slice without a mask) add the
    region metrics of :data:`mrivq.data.hipmri.STRUCTURES`.
    """
    was_training = model.training
    model.eval()
    quant_top, quant_bottom = model.quantize_top, model.quantize_bottom
    counts_top = torch.zeros(quant_top.n_embed, dtype=torch.long, device=device)
    counts_bottom = torch.zeros(quant_bottom.n_embed, dtype=torch.long, device=device)
    ssim, psnr, mse, mae = [], [], [], []
    regions = {name: {"ssim": [], "psnr": [], "mae": []} for name in STRUCTURES} if masks is not None else {}
    recon_sum = torch.zeros((), device=device, dtype=torch.float64)
    commit_sum = torch.zeros((), device=device, dtype=torch.float64)
    keep_set, kept = set(keep), {}
    codes_top, codes_bottom = [], []
    code_shapes = None
    n = len(images)
    start = time.perf_counter()
    for lo in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
        x = slices_to_batch(images[lo:lo + batch_size], device)
        out = model(x)
        rec = out.reconstruction.float()
        recon_sum += (loss_fn or F.mse_loss)(rec, x).double() * len(x)
        commit_sum += out.commitment_loss.double() * len(x)
        counts_top += metrics.code_counts(out.codes_top, quant_top.n_embed)
        counts_bottom += metrics.code_counts(out.codes_bottom, quant_bottom.n_embed)
        code_shapes = (tuple(out.codes_top.shape[1:]), tuple(out.codes_bottom.shape[1:]))
        if keep_codes:
            codes_top.append(out.codes_top.cpu().numpy())
            codes_bottom.append(out.codes_bottom.cpu().numpy())
        rec01, x01 = metrics.to_unit_range(rec, x, normalize)
        ssim.append(metrics.ssim_per_image(rec01, x01))
        psnr.append(metrics.psnr_per_image(rec01, x01))
        mse.append(metrics.mse_per_image(rec01, x01))
        mae.append(metrics.mae_per_image(rec01, x01))
        if masks is not None:
            batch_masks = torch.from_numpy(np.asarray(masks[lo:lo + len(x)], dtype=np.int64))
            for name, values in metrics.region_metrics(rec01, x01, batch_masks, STRUCTURES).items():
                for key, v in values.items():
                    regions[name][key].append(v)
        for i in range(lo, lo + len(x)):
            if i in keep_set:
                kept[i] = (x01[i - lo, 0].cpu().numpy(), rec01[i - lo, 0].clamp(0, 1).cpu().numpy())
    result = Evaluation(
        ssim=torch.cat(ssim).cpu(), psnr=torch.cat(psnr).cpu(), mse=torch.cat(mse).cpu(),
        recon_loss=float(recon_sum) / n, commitment_loss=float(commit_sum) / n,
        counts_top=counts_top.cpu(), counts_bottom=counts_bottom.cpu(),
        images_per_s=n / (time.perf_counter() - start), code_shapes=code_shapes, kept=kept,
        codes=(np.concatenate(codes_top), np.concatenate(codes_bottom)) if keep_codes else None,
        mae=torch.cat(mae).cpu(),
        regions={name: {k: torch.cat(v).cpu() for k, v in values.items()} for name, values in regions.items()},
    )
    model.train(was_training)
    return result


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
