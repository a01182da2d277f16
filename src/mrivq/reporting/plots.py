"""Pictures of a run: sample grids, difference maps, codebook use, training curves and
rate-distortion curves.

The self-contained HTML report that gathers them is :mod:`mrivq.reporting.html`.

Everything is drawn with matplotlib's Agg backend and written atomically, so a plot
interrupted half-way never replaces a good one.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from mrivq.metrics.codebook import codebook_usage
from mrivq.run_dir import atomic_write


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported at the first picture rather than with
    this module: every ``mrivq`` command imports it (through its app), most draw nothing, and
    pyplot costs a third of a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
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
    fig, axes = _pyplot().subplots(2, n, figsize=(max(2.0, 1.6 * n * w / h), 3.6), squeeze=False)
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
    save_figure(fig, path)


def plot_series(rows: list[dict], curves: list[tuple[str, str, str]], *, title: str, ylabel: str,
                 path: Path, log_scale: bool = False) -> None:
    """One figure of metric columns against step; ``curves`` are (column, label, line style)."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
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
    save_figure(fig, path)


def plot_curves(rows: list[dict], visual_dir: Path) -> None:
    """visuals/losses.png and visuals/ssims.png: training and validation curves against step."""
    plot_series(rows, [("train_loss", "train loss", "-"), ("val_loss", "validation loss", "o-"),
                        ("train_recon_loss", "train reconstruction MSE", "--"),
                        ("val_recon_loss", "validation reconstruction MSE", "s--")],
                 title="Loss", ylabel="loss", path=Path(visual_dir) / "losses.png", log_scale=True)
    plot_series(rows, [("train_ssim", "train SSIM", "-"), ("val_ssim", "validation SSIM", "o-")],
                 title="SSIM (per slice, data range 1)", ylabel="SSIM",
                 path=Path(visual_dir) / "ssims.png")


# Outline colours of the HipMRI labels: bone, bladder, rectum, prostate (as in the phantom montage).
STRUCTURE_COLOURS = {2: "#ffd23f", 3: "#3fa7ff", 4: "#b04aff", 5: "#ff4a4a"}


def save_difference_grid(inputs: np.ndarray, reconstructions: np.ndarray, path: Path, *,
                         masks: np.ndarray | None = None, title: str | None = None,
                         labels: list[str] | None = None) -> None:
    """Inputs, reconstructions and signed differences (reconstruction - input) in three rows.

    Arrays ``(N, H, W)``, images in [0, 1]; ``masks`` ``(N, H, W)`` labels outline the
    structures (HipMRI labels 2-5) on the inputs. The difference row shares one symmetric
    colour scale, so red (too bright) and blue (too dark) read the same in every column.
    """
    n = len(inputs)
    h, w = display(inputs[0]).shape
    diffs = np.clip(reconstructions, 0, 1) - inputs
    limit = max(float(np.abs(diffs).max()), 1e-3)
    fig, axes = _pyplot().subplots(3, n, figsize=(max(3.0, 1.9 * n * w / h + 1.0), 5.6), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(display(np.clip(inputs[i], 0, 1)), cmap="gray", vmin=0, vmax=1)
        if masks is not None:
            for label, colour in STRUCTURE_COLOURS.items():
                if (masks[i] == label).any():
                    axes[0, i].contour(display(masks[i] == label).astype(float), levels=[0.5],
                                       linewidths=0.6, colors=[colour])
        axes[1, i].imshow(display(np.clip(reconstructions[i], 0, 1)), cmap="gray", vmin=0, vmax=1)
        shown = axes[2, i].imshow(display(diffs[i]), cmap="RdBu_r", vmin=-limit, vmax=limit)
        for row in range(3):
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        if labels:
            axes[2, i].set_xlabel(labels[i], fontsize=6)
    for row, name in enumerate(("input", "reconstruction", "difference")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    # The colour bar gets its own axes, so the difference row keeps the size of the others.
    bottom_row = axes[2, 0].get_position()
    colour_axes = fig.add_axes((0.92, bottom_row.y0, 0.015, bottom_row.height))
    fig.colorbar(shown, cax=colour_axes).set_label("reconstruction - input", fontsize=7)
    save_figure(fig, path)


def plot_codebook_usage(counts_top, counts_bottom, path: Path) -> None:
    """visuals/codebook_usage.png: how often each code is used, per level, most used first."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.2))
    for ax, level, counts in zip(axes, ("top", "bottom"), (counts_top, counts_bottom)):
        used, perplexity = codebook_usage(torch.as_tensor(np.asarray(counts)))
        counts = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
        ax.bar(np.arange(len(counts)), np.maximum(counts, 0.5), width=1.0, color="#3a6ea5")
        ax.set_yscale("log")
        ax.set_xlabel("code (sorted by use)")
        ax.set_ylabel("uses on the test set")
        ax.set_title(f"{level}: {used}/{len(counts)} codes used, perplexity {perplexity:.1f}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def plot_error_ladder(rows: list[dict], path: Path) -> None:
    """visuals/max_error.png: bits per voxel against the maximum error per voxel, the residual
    layer's files (and their codes part) against JPEG-LS at NEAR = the error, the lossless codecs
    at 0, and the lossy codecs at each file's rate at the largest error they make there (a log
    scale past 1). ``rows`` are predict's ``max_error`` rows."""
    fig, ax = _pyplot().subplots(figsize=(9.0, 4.2))
    rows = [row for row in rows if "mrivq" in row]
    deltas = [row["max_error"] for row in rows]
    ax.plot(deltas, [row["mrivq"]["bits_per_voxel"] for row in rows], "D-", color="C5", markersize=8,
            markeredgecolor="black", label="mrivq: codes + residual (one file)", zorder=5)
    ax.plot(deltas, [row["mrivq"]["codes"] for row in rows], ":", color="C5", label="mrivq: the codes part")
    near = [(row["max_error"], row["codecs"]["JPEG-LS"]) for row in rows if "JPEG-LS" in row.get("codecs", {})]
    if near:
        ax.plot(*zip(*near), "o-", color="C0", label="JPEG-LS (NEAR = maximum error)")
    exact = next((row for row in rows if row["max_error"] == 0), None)
    markers = iter("s^vP*")
    for name, rate in (exact or {}).get("codecs", {}).items():
        if name != "JPEG-LS":
            ax.plot(0, rate, next(markers, "x"), markersize=8, linestyle="none", label=f"{name} lossless")
    lossy: dict[str, list] = {}  # the lossy codecs at each file's rate: the largest error they make there
    for row in rows:
        for name, entry in row.get("lossy", {}).items():
            lossy.setdefault(name, []).append((entry["largest_error"], entry["bits_per_voxel"]))
    for (name, points), marker in zip(lossy.items(), "<>h"):
        ax.plot(*zip(*points), marker + "--", markersize=6, linewidth=0.8, label=f"{name} at mrivq's rate (lossy)")
    if lossy:  # errors of tens of units beside bounds of a few: a log scale past 1
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xticks(deltas + ([] if not lossy else [10, 100]))
    ax.set_xticklabels([f"{d:g}" for d in deltas] + ([] if not lossy else ["10", "100"]))
    ax.set_xlabel("maximum error per voxel (stored units; 0 = lossless)")
    ax.set_ylabel("bits per voxel (files, headers included)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the points
    fig.tight_layout()
    save_figure(fig, path)


def plot_rate_distortion(curves: dict, model_points: list[dict], path: Path, labels: dict | None = None) -> None:
    """visuals/rate_distortion.png: SSIM and PSNR against bits per pixel, side by side.

    ``curves`` is :func:`mrivq.compression.codecs.rate_distortion`'s ``{codec: [{bits_per_pixel, ssim,
    psnr, ...}]}``, drawn as lines with markers; ``model_points`` are ``{label,
    bits_per_pixel, ssim, psnr}`` drawn as large single markers (e.g. the model's raw and
    entropy-coded rates); ``labels`` names the codecs in the legend (default: their keys).
    Points with a non-finite value (PSNR of a perfect slice) are left out of the panel they
    would break.
    """
    from matplotlib import ticker

    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    model_markers = ("D", "*", "P", "X")
    for ax, key, ylabel in zip(axes, ("ssim", "psnr"), ("SSIM (mean per slice)", "PSNR (dB, mean per slice)")):
        for name, points in curves.items():
            shown = [(p["bits_per_pixel"], p[key]) for p in points if _finite(p["bits_per_pixel"], p[key])]
            if shown:
                ax.plot(*zip(*shown), "o-", markersize=4, linewidth=1.2, label=(labels or {}).get(name, name))
        for i, point in enumerate(model_points):
            if _finite(point["bits_per_pixel"], point[key]):
                ax.plot(point["bits_per_pixel"], point[key], model_markers[i % len(model_markers)],
                        markersize=12, markeredgecolor="black", color=f"C{5 + i}", linestyle="none",
                        label=point["label"], zorder=5)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("bits per pixel (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    # One legend below both panels, so it never hides a point.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("Rate-distortion on the test set: codecs over their quality settings, the model's codes as points",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path)


def plot_surprise(slices: np.ndarray, maps: np.ndarray, path: Path, labels: list[str] | None = None) -> None:
    """Slices ``(N, H, W)`` in [0, 1] (top row) over the same slices with their bits-per-pixel
    maps ``(N, H, W)`` laid over them (bottom row), on one colour scale with a colour bar."""
    n = len(slices)
    h, w = display(slices[0]).shape
    top = float(np.percentile(maps, 99.5)) if maps.size else 1.0
    fig, axes = _pyplot().subplots(2, n, figsize=(max(3.0, 1.6 * n * w / h + 1.2), 3.8), squeeze=False)
    shown = None
    for i in range(n):
        axes[0, i].imshow(display(np.clip(slices[i], 0, 1)), cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(display(np.clip(slices[i], 0, 1)), cmap="gray", vmin=0, vmax=1)
        shown = axes[1, i].imshow(display(maps[i]), cmap="inferno", vmin=0, vmax=max(top, 1e-6), alpha=0.75)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
        if labels:
            axes[0, i].set_title(labels[i], fontsize=7)
    fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.03, pad=0.02, label="bits per pixel")
    fig.suptitle("Where the prior-coded file spends its bits: slices (top), bits per pixel over them (bottom)",
                 fontsize=9)
    save_figure(fig, path)


def _finite(*values) -> bool:
    return all(v is not None and np.isfinite(v) for v in values)


def save_samples_grid(slices: np.ndarray, path: Path, low: float = 0.0, high: float = 1.0,
                      title: str | None = None, columns: int = 4, labels: list[str] | None = None) -> None:
    """Slices ``(N, H, W)`` as a grid of up to ``columns`` per row, each displayed as :func:`display` does
    (``labels``: one caption per slice)."""
    n = len(slices)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    h, w = display(slices[0]).shape
    fig, axes = _pyplot().subplots(rows, cols, figsize=(max(2.0, 1.6 * cols * w / h), 1.8 * rows + 0.4),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k < n:
            ax.imshow(display(slices[k]), cmap="gray", vmin=low, vmax=high)
            if labels:
                ax.set_xlabel(labels[k], fontsize=7)
        else:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
