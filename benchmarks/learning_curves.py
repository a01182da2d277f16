"""Learning curves: what a training budget buys, beside JPEG, JPEG 2000 and WebP at the model's rates.

For each budget (minutes of wall clock for the training loops, on this machine's cores), this
trains the configured VQ-VAE-2 with ``train.max_time``, and where ``--prior-at`` asks for it a
code prior on a share of the same budget (``prior.max_time``); then ``mrivq predict`` scores the
test split and the codecs at each of the model's decodable rates (the frequency-coded codes file
and, with a prior, the prior-coded one). Every budget is one JSON line in ``OUT/curves.jsonl``
(a budget already there is not run again, so an interrupted run continues); ``OUT/curves.md``
is the table and ``OUT/curves.png`` the picture (test SSIM and PSNR against minutes, the codecs
at the model's frequency-coded rate as dashed lines, prior-coded points and their codecs as
markers)::

    python benchmarks/learning_curves.py runs/curves/phantom --minutes 1 3 10 30 --prior-at 30
    python benchmarks/real_scans.py /tmp/real_scans
    python benchmarks/learning_curves.py runs/curves/real --minutes 1 3 10 30 --prior-at 30 \\
        --set data.root=/tmp/real_scans --set data.fit=resize --set "data.image_size=[256,256]"

``--tables-only OUT`` redraws the table and picture from ``curves.jsonl``. Figures are
measurements, never assertions: nothing here fails CI. The budget is wall clock of the training
loops (evaluations included) and, for the prior, of reading the slices and encoding its
training codes too (reading the VQ-VAE's data is not counted), so run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from mrivq.apps.predict import predict
from mrivq.apps.train import train
from mrivq.apps.train_prior import train_prior
from mrivq.compression.codecs import CODECS, SEQUENCE_CODEC, SEQUENCE_LABEL
from mrivq.config import load_config
from mrivq.runtime import resolve_device, resolve_precision

CODEC_NAMES = {**{name: codec.label for name, codec in CODECS.items()}, SEQUENCE_CODEC: SEQUENCE_LABEL}


def cpu_kind() -> str:
    """``AVX-512 BF16`` or ``AVX2-only`` (the two kinds this project's machines come in), else the platform."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2-only" if "avx2" in flags else platform.machine()


def rate_rows(summary: dict) -> dict:
    """``{coder: {bpp, model ssim/psnr, codec ssim/psnr/bpp ...}}`` for the decodable rates of a predict summary."""
    model = summary["codecs"]["model"]
    rows = {}
    for table in summary["codecs"]["rates"]:
        if table["coder"] == "raw":
            continue  # raw indices: no decoder reads them at that rate
        row = {"bpp": round(table["bits_per_pixel"], 4), "ssim": round(model["ssim"]["mean"], 4),
               "psnr": round(model["psnr"]["mean"], 2)}
        for codec, scores in table["codecs"].items():
            row[f"{codec}_ssim"] = round(scores["ssim"]["mean"], 4)
            row[f"{codec}_psnr"] = round(scores["psnr"]["mean"], 2)
            row[f"{codec}_bpp"] = round(scores["bits_per_pixel"]["mean"], 4)
        rows[table["coder"]] = row
    return rows


def run_budget(minutes: float, overrides: list[str], out: Path, *, prior_share: float | None) -> dict:
    """Train (and with ``prior_share`` a prior) for ``minutes`` in all, predict; the budget's figures."""
    run_dir = out / f"{minutes:g}min"
    seconds = minutes * 60
    vq_seconds = seconds * (1 - prior_share) if prior_share else seconds
    sets = [*overrides, f"output.dir={run_dir}", f"train.max_time={vq_seconds}", "train.epochs=1000000"]
    config = load_config(None, sets)
    trained = train(config, overwrite=True)
    prior_file, prior_figures = None, {}
    if prior_share:
        prior_config = load_config(None, [*sets, f"prior.max_time={seconds - vq_seconds}"])
        fitted = train_prior(prior_config, run_dir / "models" / "best.pt", overwrite=True)
        prior_file = run_dir / "models" / "prior_best.pt"
        prior_figures = {"prior_steps": fitted["steps"], "prior_val_nll": round(fitted["best_val_nll"], 3)}
    # both files' rates: the table and plot below put the codecs beside each
    summary = predict(load_config(None, [*sets, "predict.codec_rates=files"]), prior=prior_file)
    prostate = ((summary.get("regions") or {}).get("structures") or {}).get("prostate") or {}
    return {
        "minutes": minutes, "overrides": overrides, "vq_seconds": round(vq_seconds, 1),
        "steps": trained["steps"], "train_seconds": round(trained["train_seconds"], 1),
        "best_val_ssim": round(trained["best_ssim"], 4),
        "ssim": round(summary["ssim"]["mean"], 4), "psnr": round(summary["psnr"]["mean"], 2),
        "prostate_ssim": round(prostate.get("ssim", {}).get("mean", math.nan), 4),
        "n_test": summary["n_images"],
        "top_used": summary["codebook"]["top"]["used"], "bottom_used": summary["codebook"]["bottom"]["used"],
        "rates": rate_rows(summary), **prior_figures,
        "precision": resolve_precision(config.train.precision, resolve_device(config.train.device)),
        "threads": torch.get_num_threads(), "cpu": cpu_kind(), "run_dir": str(run_dir),
    }


def read_results(out: Path) -> list[dict]:
    path = out / "curves.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(results: list[dict]) -> str:
    """Markdown: one row per budget and decodable rate, the model beside each codec (SSIM / PSNR)."""
    codecs = [c for c in CODEC_NAMES if any(f"{c}_ssim" in r for res in results for r in res["rates"].values())]
    head = ["minutes", "steps", "codes file", "bpp", "model", *(CODEC_NAMES[c] for c in codecs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in sorted(results, key=lambda r: r["minutes"]):
        for coder, row in res["rates"].items():
            steps = f"{res['steps']}" + (f" + prior {res['prior_steps']}" if coder == "prior" else "")
            cells = [f"{res['minutes']:g}", steps, "prior-coded" if coder == "prior" else "frequency-coded",
                     f"{row['bpp']:.3f}", f"**{row['ssim']:.3f}** / {row['psnr']:.1f}",
                     *(f"{row[f'{c}_ssim']:.3f} / {row[f'{c}_psnr']:.1f}" for c in codecs)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def picture(results: list[dict], path: Path, title: str) -> None:
    """SSIM and PSNR against minutes (log scale): the model, and each codec at the model's rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["minutes"])
    minutes = [r["minutes"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"jpeg": "tab:orange", "jpeg2000": "tab:green", "webp": "tab:red", "avif": "tab:purple",
               "jpegxl": "tab:brown", "htj2k": "tab:olive"}
    for ax, metric, label in ((axes[0], "ssim", "test SSIM"), (axes[1], "psnr", "test PSNR (dB)")):
        ax.plot(minutes, [r[metric] for r in results], "o-", color="tab:blue", lw=2, label="mrivq")
        for codec, colour in colours.items():
            freq = [r["rates"].get("frequencies", {}).get(f"{codec}_{metric}") for r in results]
            if any(v is not None for v in freq):
                ax.plot(minutes, freq, "--", color=colour, label=f"{CODEC_NAMES[codec]} at the frequency-coded rate")
            prior = [(r["minutes"], r["rates"]["prior"].get(f"{codec}_{metric}")) for r in results
                     if "prior" in r["rates"]]
            if prior:
                ax.plot(*zip(*prior), "v", color=colour, ms=8, label=f"{CODEC_NAMES[codec]} at the prior-coded rate")
        ax.set_xscale("log")
        ax.set_xticks(minutes, [f"{m:g}" for m in minutes])
        ax.set_xlabel(f"training budget, minutes ({results[0]['cpu']}, {results[0]['threads']} threads)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for r in results:
        if "prior" in r["rates"]:
            axes[0].annotate(f"{r['rates']['prior']['bpp']:.2f} bpp prior-coded", (r["minutes"], r["ssim"]),
                             textcoords="offset points", xytext=(-110, 8), fontsize=8)
        axes[0].annotate(f"{r['rates']['frequencies']['bpp']:.2f}", (r["minutes"], r["ssim"]),
                         textcoords="offset points", xytext=(4, -12), fontsize=8, color="tab:blue")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # the legend below both plots, clear of every point
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(out: Path, title: str) -> None:
    results = read_results(out)
    if not results:
        raise SystemExit(f"{out}: no curves.jsonl yet")
    (out / "curves.md").write_text(f"# {title}\n\n" + table(results))
    picture(results, out / "curves.png", title)
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the runs, curves.jsonl, curves.md and curves.png")
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 3, 10, 30])
    parser.add_argument("--prior-at", type=float, nargs="*", default=[],
                        help="budgets (minutes) that also train a prior, on --prior-share of the budget")
    parser.add_argument("--prior-share", type=float, default=1 / 3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--title", default="", help="the picture's title (default: the folder's name)")
    parser.add_argument("--tables-only", action="store_true", help="redraw curves.md and curves.png only")
    args = parser.parse_args()
    title = args.title or f"mrivq learning curves: {args.out.name}"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.tables_only:
        done = {r["minutes"] for r in read_results(args.out)}
        for minutes in args.minutes:
            if minutes in done:
                continue
            start = time.perf_counter()
            figures = run_budget(minutes, args.overrides, args.out,
                                 prior_share=args.prior_share if minutes in args.prior_at else None)
            figures["wall_seconds"] = round(time.perf_counter() - start, 1)
            with open(args.out / "curves.jsonl", "a") as f:
                f.write(json.dumps(figures) + "\n")
            print(json.dumps(figures), flush=True)
    write_tables(args.out, title)


if __name__ == "__main__":
    main()
