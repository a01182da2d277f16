"""What a pass prior's samples are made of: ways of drawing them, scored by ``mrivq sample``'s yardsticks.

``mrivq sample`` draws each grid pass by pass at one nucleus setting (``--top-p``) and scores the
samples by how close each comes to a training slice (best SSIM; a plausible new slice gets about as
close as the VQ-VAE's reconstructions of unseen validation slices do) and how alike they are (the
mean SSIM of every pair). This script draws the same way with one lever changed and prints both
yardsticks beside the unseen slices' figures, writing what ``mrivq sample`` writes (``samples.png``,
``nearest.png``) to ``--out``:

- ``--schedule P,P,...``: a nucleus setting per pass, the top grid's passes then the bottom's
  (a default pass prior: 3 + 2 numbers), so that the passes that lay out the slice can be drawn
  more sharply than those that add detail;
- ``--candidates K``: draw K times as many slices and keep the ones the prior itself finds most
  likely (the fewest bits of both grids): rejection by the prior's own likelihood;
- ``--top-from TRANSFORMER``: the top grid drawn by a transformer prior of the same VQ-VAE (one
  code at a time, ``--top-top-p``), the bottom grid by the pass prior given it: which level the
  samples' layout comes from.

``--bits`` first prints what each grid and pass of the pass prior (and of ``--top-from``'s
transformer, by grid) costs on the test split's slices, each coded alone (float, bits per code).

    python benchmarks/sample_levers.py PRIOR --out /tmp/levers/base
    python benchmarks/sample_levers.py PRIOR --out /tmp/levers/sched --schedule 0.5,0.6,0.7,0.3,0.5
    python benchmarks/sample_levers.py PRIOR --out /tmp/levers/hybrid --top-from TF_PRIOR --top-top-p 0.7

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.apps import sample as sample_app
from mrivq.compression.codec import encode_images
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.engine.checkpoint import checkpoint_config, load_checkpoint, load_prior
from mrivq.nn.pass_prior import PassPrior, draw_in_passes


def draw_passes(prior: PassPrior, n: int, schedule: list[float], temperature: float,
                generator: torch.Generator | None, top: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` code pairs drawn pass by pass, pass k of all the levels' passes at ``schedule[k]``;
    ``top`` given: only the bottom grid is drawn, given it."""
    grids, first = [] if top is None else [top], 0
    for name, net in prior.levels():
        if name != "top" or top is None:
            inputs = prior._inputs(name, grids[0] if grids else None, None)
            grids.append(draw_in_passes(net, n, *inputs, temperature=temperature,
                                        top_p=list(schedule[first:first + net.passes]), generator=generator))
        first += net.passes
    return grids[0], grids[1]


def most_likely(prior: PassPrior, top: torch.Tensor, bottom: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` code pairs of fewest bits under ``prior`` (both grids)."""
    logits_top, logits_bottom = prior(top, bottom)
    bits = (F.cross_entropy(logits_top.float(), top, reduction="none").flatten(1).sum(1)
            + F.cross_entropy(logits_bottom.float(), bottom, reduction="none").flatten(1).sum(1))
    keep = bits.argsort()[:n]
    return top[keep], bottom[keep]


@torch.no_grad()
def print_bits(prior_path: str, transformer_path: str | None) -> None:
    """Bits per code of the test split's slices, each coded alone: by grid and pass, and for a
    transformer prior by grid."""
    prior, vqvae, _ = load_prior(prior_path, device=torch.device("cpu"))
    config = checkpoint_config(load_checkpoint(prior_path)["vqvae"], prior_path)
    test = load_split(data_splits(config.data, config.seed).test, Preprocessing.from_settings(config.data),
                      name="test", cache_dir=None)
    top, bottom = (torch.as_tensor(c).long() for c in encode_images(vqvae, test.images, 16))
    pixels = test.images[0].size
    logits = prior.eval()(top, bottom)
    total = 0.0
    for (name, net), codes, grid_logits in zip(prior.levels(), (top, bottom), logits):
        bits = F.cross_entropy(grid_logits.float(), codes, reduction="none") / np.log(2)
        by_pass = [f"{float(bits[:, net.order == step].mean()):.3f}" for step in range(net.passes)]
        total += float(bits.sum()) / len(codes)
        print(f"pass prior, {name} grid: {float(bits.mean()):.3f} bits per code (by pass: {', '.join(by_pass)})")
    print(f"pass prior: {total / pixels:.4f} bits per pixel (float), {len(top)} test slices")
    if transformer_path:
        transformer = load_prior(transformer_path, device=torch.device("cpu"))[0].eval()
        bits_top, bits_bottom = (float(b) for b in transformer.nll_bits(top, bottom))
        print(f"transformer: top grid {bits_top:.3f}, bottom {bits_bottom:.3f} bits per code, "
              f"{(bits_top * top[0].numel() + bits_bottom * bottom[0].numel()) / pixels:.4f} bits per pixel")


def lever(args) -> callable:
    """The drawing function that replaces the prior's ``sample``."""
    transformer = load_prior(args.top_from, device=torch.device("cpu"))[0] if args.top_from else None

    def sample(prior: PassPrior, n: int, *, temperature: float = 1.0, top_p: float = 1.0, generator=None):
        passes = prior.top.passes + prior.bottom.passes
        schedule = [float(p) for p in args.schedule.split(",")] if args.schedule else [top_p] * passes
        if len(schedule) != passes:
            raise SystemExit(f"--schedule needs {passes} settings (top passes, then bottom), got {len(schedule)}")
        with torch.no_grad():
            drawn = n * args.candidates
            top = None if transformer is None else transformer.top.sample(
                drawn, temperature=temperature, top_p=args.top_top_p, generator=generator)
            codes = draw_passes(prior, drawn, schedule, temperature, generator, top)
            return most_likely(prior, *codes, n) if args.candidates > 1 else codes
    return sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior", help="a pass or volume prior (models/prior_best.pt)")
    parser.add_argument("--out", required=True, help="a new folder for samples.png, nearest.png and the slices")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=sample_app.TOP_P, help="every pass's setting without --schedule")
    parser.add_argument("--schedule", help="comma-separated top-p per pass: the top grid's passes, then the bottom's")
    parser.add_argument("--candidates", type=int, default=1, help="draw this many times n, keep the n most likely")
    parser.add_argument("--top-from", help="a transformer prior of the same VQ-VAE that draws the top grid")
    parser.add_argument("--top-top-p", type=float, default=sample_app.TOP_P, help="its nucleus setting")
    parser.add_argument("--bits", action="store_true", help="first print the bits per code by grid and pass")
    args = parser.parse_args()
    if args.bits:
        print_bits(args.prior, args.top_from)
    print(f"{args.out}: {scored(args.prior, lever(args), Path(args.out), args.n, args.top_p, args.seed)}")


def scored(prior_path: str, drawing, out: Path, n: int, top_p: float, seed: int) -> str:
    """``mrivq sample`` of ``n`` slices into ``out`` with the prior's ``sample`` replaced by
    ``drawing(prior, n, **kw)``; its two yardsticks and the unseen slices', as a line."""
    def loaded(path, device):
        prior, vqvae, ckpt = load_prior(path, device=device)
        if not isinstance(prior, PassPrior):
            raise SystemExit(f"{path}: not a pass or volume prior")
        prior.sample = lambda count, **kw: drawing(prior, count, **kw)
        return prior, vqvae, ckpt

    sample_app.load_prior = loaded
    result = sample_app.sample(prior_path, n, out, top_p=top_p, seed=seed, device="cpu")
    nearest, mutual = np.mean([entry["ssim"] for entry in result["nearest"]]), result["mutual_ssim"]
    return (f"best SSIM to a training slice {nearest:.3f}, between samples {mutual['samples']:.3f} "
            f"(unseen validation slices: {np.mean(result['unseen_nearest_ssim']):.3f}, {mutual['unseen']:.3f})")

if __name__ == "__main__":
    main()
