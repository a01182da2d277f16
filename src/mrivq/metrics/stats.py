"""Summary statistics of per-slice scores: the one helper every summary uses."""

from __future__ import annotations

import math

import torch


def summary_stats(values) -> dict:
    """``{mean, std, p5, min}`` of per-slice values (a tensor or array) that exist.

    NaN marks a missing value (a structure absent from a slice) and is left out; an infinite
    one (the PSNR of a perfect slice) counts, so a mean it makes infinite stays infinite (and
    is written to JSON as null). All NaN when no value exists.
    """
    v = torch.as_tensor(values).double().reshape(-1)
    present = v[~torch.isnan(v)]
    if not len(present):
        return {"mean": math.nan, "std": math.nan, "p5": math.nan, "min": math.nan}
    return {"mean": float(present.mean()), "std": float(present.std(unbiased=False)),
            "p5": float(torch.quantile(present, 0.05)), "min": float(present.min())}
