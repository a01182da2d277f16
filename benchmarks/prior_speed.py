"""Speed of the code prior at the configured sizes (untrained weights; speed does not depend on them).

Prints one JSON object per figure: training step time, and sampling samples/s with the KV
cache against a naive sampler that reruns the full forward pass at every position (measured
on the top grid only, where it is affordable, and reported per position).

    python benchmarks/prior_speed.py [--set prior.transformer.d_model=128 ...] [--image-size 256 128] [--n 8]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mrivq.compression.priors import build_prior
from mrivq.config import load_config
from mrivq.nn import code_grid_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--image-size", type=int, nargs=2, default=[256, 128])
    parser.add_argument("--n", type=int, default=8, help="samples drawn at once")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    config = load_config(None, args.overrides)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    top_grid, bottom_grid = code_grid_shapes(tuple(args.image_size))
    n_embed = config.model.n_embed
    prior = build_prior(config.prior, n_embed, top_grid)

    top = torch.randint(0, n_embed, (config.prior.batch_size, *top_grid))
    bottom = torch.randint(0, n_embed, (config.prior.batch_size, *bottom_grid))
    optimizer = torch.optim.AdamW(prior.parameters())
    times = []
    for _ in range(3):
        start = time.perf_counter()
        nll_top, nll_bottom = prior.nll_bits(top, bottom)
        (nll_top + nll_bottom).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    report("train step", min(times), "s")

    prior.eval()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    prior.sample(args.n, generator=generator)
    report("sampling, KV cache", args.n / (time.perf_counter() - start), "samples/s")

    # Naive: a full teacher-forced pass over the grid for each of the first positions.
    positions = 32
    codes = torch.zeros(args.n, *top_grid, dtype=torch.long)
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(positions):
            prior.top(codes)
        naive = (time.perf_counter() - start) / positions
        start = time.perf_counter()
        prior.top.sample(args.n, generator=generator)
        cached = (time.perf_counter() - start) / (top_grid[0] * top_grid[1])
    report("top grid, per position, full forward", naive * 1e3, "ms")
    report("top grid, per position, KV cache", cached * 1e3, "ms")


def report(figure: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit}), flush=True)


if __name__ == "__main__":
    main()
