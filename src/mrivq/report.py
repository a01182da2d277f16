"""Pictures of a run: sample grids (inputs over reconstructions) and training curves.

Everything is drawn with matplotlib's Agg backend and written atomically, so a plot
interrupted half-way never replaces a good one.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .checkpoint import atomic_write


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write(Path(path), lambda fh: fh.write(buf.getvalue()))


def display(slice2d: np.ndarray) -> np.ndarray:
    """A slice as a radiologist views it. HipMRI arrays are (256 right-to-left, 128 anterior-to-
    posterior) in nibabel's order, so the transpose puts anterior up and the patient's right on
    the viewer's left."""
    return np.asarray(slice2d).T


def save_sample_grid(inputs: np.ndarray, reconstructions: np.ndarray, path: Path,
                     title: str | None = None, labels: list[str] | None = None) -> None:
    """Inputs (top row) over reconstructions (bottom row). Arrays ``(N, H, W)`` in [0, 1]."""
    n = len(inputs)
    h, w = display(inputs[0]).shape
    fig, axes = plt.subplots(2, n, figsize=(max(2.0, 1.6 * n * w / h), 3.6), squeeze=False)
    for i in range(n):
        for row, arr in enumerate((inputs, reconstructions)):
            ax = axes[row, i]
            ax.imshow(display(np.clip(arr[i], 0, 1)), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        if labels:
            axes[1, i].set_xlabel(labels[i], fontsize=7)
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstruction")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _plot_curves(rows: list[dict], curves: list[tuple[str, str, str]], *, title: str, ylabel: str,
                 path: Path, log_scale: bool = False) -> None:
    """One figure of metric columns against step; ``curves`` are (column, label, line style)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in curves:
        points = [(r["step"], float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if points:
            ax.plot(*zip(*points), style, label=label)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_curves(rows: list[dict], visual_dir: Path) -> None:
    """visuals/losses.png and visuals/ssims.png: training and validation curves against step."""
    _plot_curves(rows, [("train_loss", "train loss", "-"), ("val_loss", "validation loss", "o-"),
                        ("train_recon_loss", "train reconstruction MSE", "--"),
                        ("val_recon_loss", "validation reconstruction MSE", "s--")],
                 title="Loss", ylabel="loss", path=Path(visual_dir) / "losses.png", log_scale=True)
    _plot_curves(rows, [("train_ssim", "train SSIM", "-"), ("val_ssim", "validation SSIM", "o-")],
                 title="SSIM (per slice, data range 1)", ylabel="SSIM",
                 path=Path(visual_dir) / "ssims.png")
