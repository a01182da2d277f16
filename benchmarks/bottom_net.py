"""The pass prior's bottom net alone: what a design change buys, in bits per bottom code.

Trains only the bottom grid's net of a pass prior (float, the prior's optimiser and learning
rate, batches of 8 grids, one pass per grid as ``mrivq train-prior`` does) on a VQ-VAE's
training codes (with the prior's training copies, read from the codes cache where
``mrivq train-prior`` left them), and prints the validation bits per bottom code, overall and
per pass, every quarter of the steps, for each design:

- ``repeated``: the top grid's features repeated over the 2x2 bottom positions under each;
- ``own``: each bottom position its own features (``prior.passes.condition_shuffle``);
- ``wide``: ``repeated`` with 96 channels instead of 64 (2.25 times the convolutions' work);
- ``table``: ``repeated`` plus a learnt table of log-odds of each bottom code given the top code
  above it and its place under it (one 512-wide row per top code and place);
- ``ffn``: ``own`` with a position-wise feed-forward step (1x1 convolutions to twice the
  channels and back) after each 3x3 convolution, as in a transformer block (1.9 times the work);
- ``head``: ``own`` with a 1x1 convolution to four times the channels and a ReLU before the logits
  (``prior.*.head_channels``, the priors' default since 2026-12-06; the other designs have none).

    python benchmarks/bottom_net.py runs/default/models/best.pt [--steps 1000] [--designs own wide]

Figures are measurements, never assertions: nothing here fails CI. Designs run one after
another; give ``--threads 1`` and run two at once to use both cores of a 2-core machine.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from mrivq.apps.train_prior import _encode_splits
from mrivq.config import PassPriorSettings
from mrivq.engine.checkpoint import load_vqvae
from mrivq.nn.pass_prior import PassNet, TopFeatures

DESIGNS = ("repeated", "own", "wide", "table", "ffn", "head")


class FeedForwardNet(PassNet):
    """A :class:`PassNet` whose residual layers each add, after the 3x3 convolution, a position-wise
    feed-forward step (1x1 convolutions ``channels -> hidden -> channels``, ReLU between), as a
    transformer block's."""

    def __init__(self, *args, hidden: int) -> None:
        super().__init__(*args)
        channels = self.convs[0].in_channels
        self.ffn = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))
                                 for _ in self.convs)

    def features(self, codes, step, condition=None):
        x = self.inputs(codes, step)
        if condition is not None:
            x = x + condition
        for conv, ffn in zip(self.convs, self.ffn):
            x = x + conv(F.relu(x))
            x = x + ffn(F.relu(x))
        return F.relu(x)


class BottomNet(nn.Module):
    """``p(bottom | top)`` of one design, as :class:`mrivq.nn.pass_prior.PassPrior` builds it."""

    def __init__(self, design: str, n_embed: int, grid: tuple[int, int], settings: PassPriorSettings) -> None:
        super().__init__()
        channels = 96 if design == "wide" else settings.channels
        args = (n_embed, grid, channels, settings.layers, settings.passes_bottom)
        if design == "ffn":
            self.net = FeedForwardNet(*args, hidden=2 * channels)
        else:  # "head": the priors' prior.*.head_channels (256 = 4 x 64 channels by default)
            self.net = PassNet(*args, head_channels=4 * channels if design == "head" else 0)
        self.condition = TopFeatures(n_embed, channels, settings.condition_blocks,
                                     shuffle=design in ("own", "ffn", "head"))
        self.table = nn.Embedding(4 * n_embed, n_embed) if design == "table" else None
        if self.table is not None:
            nn.init.zeros_(self.table.weight)
        self.n_embed = n_embed

    def forward(self, top: torch.Tensor, bottom: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        bias = None
        if self.table is not None:
            above = top.repeat_interleave(2, 1).repeat_interleave(2, 2)
            rows, cols = bottom.shape[1:]
            place = 2 * (torch.arange(rows) % 2)[:, None] + (torch.arange(cols) % 2)[None, :]
            bias = self.table(place[None] * self.n_embed + above).permute(0, 3, 1, 2)
        return self.net(bottom, step, self.condition(top), bias)


def validation_bits(model: BottomNet, top: torch.Tensor, bottom: torch.Tensor) -> tuple[float, list[float]]:
    """Bits per bottom code over the validation grids, and per pass."""
    model.eval()
    order = model.net.order
    with torch.no_grad():
        nats = []
        for lo in range(0, len(top), 32):
            t, b = top[lo:lo + 32], bottom[lo:lo + 32]
            logits = None
            for step in range(model.net.passes):
                out = model(t, b, torch.full((len(t),), step))
                logits = out if logits is None else torch.where((order == step)[None, None], out, logits)
            nats.append(F.cross_entropy(logits, b, reduction="none"))
    model.train()
    nats = torch.cat(nats) / math.log(2)
    return float(nats.mean()), [float(nats[:, order == step].mean()) for step in range(model.net.passes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the VQ-VAE (models/best.pt)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vqvae, config = load_vqvae(args.checkpoint)
    codes, _, _ = _encode_splits(config, config, vqvae)
    (top, bottom), (val_top, val_bottom) = ((torch.as_tensor(a).long() for a in codes[name])
                                            for name in ("train", "validate"))
    print(f"{len(top)} training and {len(val_top)} validation grids; {args.steps} steps per design")
    settings, n_embed = config.prior.passes, vqvae.quantize_top.n_embed
    for design in args.designs:
        torch.manual_seed(args.seed)
        model = BottomNet(design, n_embed, tuple(bottom.shape[1:]), settings)
        optimiser = torch.optim.AdamW(model.parameters(), lr=config.prior.lr, weight_decay=config.prior.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.prior.lr, total_steps=args.steps,
                                                       pct_start=0.05)
        counts = torch.bincount(model.net.order.flatten(), minlength=model.net.passes).float()
        started = time.perf_counter()
        for step in range(1, args.steps + 1):
            pick = torch.randint(len(top), (8,))
            passes = torch.multinomial(counts, 8, replacement=True)
            here = (model.net.order[None] == passes[:, None, None]).float()
            nats = F.cross_entropy(model(top[pick], bottom[pick], passes), bottom[pick], reduction="none")
            loss = (nats * here).sum() / here.sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % max(1, args.steps // 4) == 0 or step == args.steps:
                bits, per_pass = validation_bits(model, val_top, val_bottom)
                print(f"{design} step {step}: {bits:.3f} bits per bottom code (passes "
                      f"{', '.join(f'{b:.3f}' for b in per_pass)}); {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
