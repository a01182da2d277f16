"""How steadily a VQ-VAE run trained: each evaluation's SSIM and codebook use, from its metrics.

For each run directory (``mrivq train`` or ``benchmarks/learning_curves.py`` writes them), reads
``metrics.csv`` and ``config.yaml`` and prints one table row per validation: step, SSIM, how far
it lies below the best SSIM so far, codes used and perplexity per level, codes restarted since
the last evaluation; then two verdicts:

- **dips**: after the first fifth of the steps, the largest fall of a validation SSIM below the
  best before it (held when at most ``--max-dip``, 0.02 by default);
- **codebooks**: the fewest codes each level used at any validation, against half its codes
  (held when every level used at least half at every validation).

Each row also gives the validation PSNR and its change since the evaluation before: a dip whose
PSNR rose is an SSIM-only dip (on real scans, the output's offset over a black background:
docs/benchmarks.md), one whose PSNR fell too is the weights' own.

    python benchmarks/stability.py runs/curves/real/10min [more run dirs ...] [--json]

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import yaml


def read_run(run: Path) -> tuple[list[dict], int]:
    """The run's validation rows of ``metrics.csv`` (numbers) and its codebook size."""
    with (run / "metrics.csv").open(newline="") as fh:
        rows = [{key: float(value) if value not in ("", None) else math.nan for key, value in row.items()}
                for row in csv.DictReader(fh)]
    config = yaml.safe_load((run / "config.yaml").read_text())
    return [row for row in rows if not math.isnan(row.get("val_ssim", math.nan))], int(config["model"]["n_embed"])


def summary(rows: list[dict], n_embed: int, max_dip: float = 0.02) -> dict:
    """The table and the two verdicts of one run (see the module docstring)."""
    last = max(row["step"] for row in rows)
    best, table, dips, ssim_only = -math.inf, [], [], 0
    psnr_before = math.nan
    for row in rows:
        dip = max(0.0, best - row["val_ssim"]) if best > -math.inf else 0.0
        psnr_change = row.get("val_psnr", math.nan) - psnr_before
        if row["step"] > last / 5:
            dips.append(dip)
            ssim_only += dip > max_dip and psnr_change > 0
        best = max(best, row["val_ssim"])
        psnr_before = row.get("val_psnr", math.nan)
        table.append({"step": int(row["step"]), "val_ssim": round(row["val_ssim"], 4), "below_best": round(dip, 4),
                      "val_psnr": round(row.get("val_psnr", math.nan), 2), "psnr_change": None if math.isnan(psnr_change) else round(psnr_change, 2),
                      **{f"{level}_used": int(row[f"val_{level}_used"]) for level in ("top", "bottom")},
                      **{f"{level}_perplexity": round(row[f"val_{level}_perplexity"], 1) for level in ("top", "bottom")},
                      **{f"{level}_restarts": int(row.get(f"{level}_restarts", 0) or 0) for level in ("top", "bottom")}})
    fewest = {level: min(row[f"{level}_used"] for row in table) for level in ("top", "bottom")}
    largest = max(dips, default=0.0)
    return {"evaluations": table, "largest_dip_after_first_fifth": round(largest, 4),
            "dips_held": largest <= max_dip, "dips_with_psnr_up": ssim_only,
            "dips_over_limit": sum(dip > max_dip for dip in dips), "fewest_codes_used": fewest, "n_embed": n_embed,
            "codebooks_held": all(count >= n_embed / 2 for count in fewest.values()),
            "final_val_ssim": table[-1]["val_ssim"], "best_val_ssim": round(best, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.csv and config.yaml)")
    parser.add_argument("--max-dip", type=float, default=0.02, help="the dip verdict's limit (default 0.02)")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of tables")
    args = parser.parse_args()
    for run in args.runs:
        result = {"run": str(run), **summary(*read_run(run), max_dip=args.max_dip)}
        if args.json:
            print(json.dumps(result))
            continue
        print(f"\n{run}")
        print("| step | val SSIM | below best | PSNR (change) | top used / perplexity | bottom used / perplexity "
              "| restarts top / bottom |")
        print("|---|---|---|---|---|---|---|")
        for row in result["evaluations"]:
            print(f"| {row['step']} | {row['val_ssim']:.4f} | {row['below_best']:.4f} | {row['val_psnr']:.2f} "
                  f"{'' if row['psnr_change'] is None else '(' + format(row['psnr_change'], '+.2f') + ')'} | {row['top_used']} / "
                  f"{row['top_perplexity']} | {row['bottom_used']} / {row['bottom_perplexity']} | "
                  f"{row['top_restarts']} / {row['bottom_restarts']} |")
        print(f"largest dip after the first fifth: {result['largest_dip_after_first_fifth']:.4f} "
              f"({'held' if result['dips_held'] else 'NOT held'}, limit {args.max_dip}; "
              f"{result['dips_with_psnr_up']} of {result['dips_over_limit']} dips over it with the PSNR up); "
              f"fewest codes used: "
              f"top {result['fewest_codes_used']['top']}, bottom {result['fewest_codes_used']['bottom']} of "
              f"{result['n_embed']} ({'held' if result['codebooks_held'] else 'NOT held'}: half is "
              f"{result['n_embed'] / 2:g}); final / best val SSIM {result['final_val_ssim']:.4f} / "
              f"{result['best_val_ssim']:.4f}")


if __name__ == "__main__":
    main()
