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
  above it and its place under it (one n_embed-wide row per top code and place);
- ``ffn``: ``own`` with a position-wise feed-forward step (1x1 convolutions to twice the
  channels and back) after each 3x3 convolution, as in a transformer block (1.9 times the work);
- ``head``: ``own`` with a 1x1 convolution to four times the channels and a ReLU before the logits
  (``prior.*.head_channels``, the priors' default since 2026-12-06; the designs above have none,
  those below have it);
- ``nbr``: ``head`` plus each position's known neighbours' codes, an embedding per offset;
- ``nbrfollow``: and a table of log-odds per offset (``prior.*.neighbour_codes``);
  ``nbrfollow3``: the same over 3 passes (a quarter, a quarter, the checkerboard's other half);
- ``cheap3``: 3 passes, the convolutions once per grid with every code unknown, then per pass
  only the neighbours (embeddings, a 1x1 layer, their tables): more passes for little work;
  ``cheap2`` the same over the checkerboard, ``cheap5`` over 5 dyadic passes, with the
  embeddings also of the codes two places away;
- ``cond4`` / ``cond8``: ``head`` with 4 / 8 residual convolutions over the top codes instead of
  ``prior.*.condition_blocks`` (2): more of the layout for the first pass, which sees nothing else;
- ``blocks`` / ``blocks96``: 4 passes, one place of every 2x2 block each, the net run at the top
  grid's size (64 / 96 channels);
- ``causal``: a diagnostic, not a coder: raster order under masked convolutions (one code at a
  time to decode), the same size: what the context of a sequential prior is worth.

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
from mrivq.nn.pass_prior import DILATIONS, PassNet, TopFeatures, _bag, near_rows

DESIGNS = ("repeated", "own", "wide", "table", "ffn", "head", "nbr", "nbrfollow", "nbrfollow3", "cheap2", "cheap3",
           "cheap5", "cond4", "cond8", "blocks", "blocks96", "causal")


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


class BlockNet(nn.Module):
    """The bottom grid in four passes, one position of every 2x2 block a pass ((0, 0), (1, 1),
    (0, 1), (1, 0) in turn), computed at the top grid's size: each block's four codes (known or
    "unknown") are embedded by place and summed, the top grid's features added, then the residual
    convolutions, the head and the logits of the pass's place (repeated over the block, so that
    the caller reads them at the pass's positions)."""

    PASS_OF_PLACE = (0, 2, 3, 1)  # place 2 * (r % 2) + (c % 2)

    def __init__(self, n_embed, grid, channels, layers, head_channels):
        super().__init__()
        self.n_embed, self.passes = n_embed, 4
        rows, cols = grid[0] // 2, grid[1] // 2
        self.code = nn.Embedding(4 * (n_embed + 1), channels)
        self.step = nn.Embedding(4, channels)
        self.row, self.col = nn.Embedding(rows, channels), nn.Embedding(cols, channels)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=d, dilation=d)
                                   for d in (DILATIONS[i % len(DILATIONS)] for i in range(layers)))
        self.widen = nn.Conv2d(channels, head_channels, 1)
        self.head = nn.Conv2d(head_channels, n_embed, 1)
        place = 2 * (torch.arange(grid[0]) % 2)[:, None] + (torch.arange(grid[1]) % 2)[None, :]
        self.register_buffer("order", torch.tensor(self.PASS_OF_PLACE)[place], persistent=False)

    def forward(self, codes, step, condition, bias=None):
        batch, rows, cols = codes.shape
        blocks = codes.view(batch, rows // 2, 2, cols // 2, 2).permute(0, 1, 3, 2, 4).reshape(batch, rows // 2, cols // 2, 4)
        places = torch.arange(4)
        known = torch.tensor(self.PASS_OF_PLACE)[None, :] < step[:, None]  # (B, 4)
        index = torch.where(known[:, None, None, :], blocks, self.n_embed) + places * (self.n_embed + 1)
        x = self.code(index).sum(3) + self.step(step)[:, None, None, :]
        x = (x + self.row.weight[None, :, None, :] + self.col.weight[None, None, :, :]).permute(0, 3, 1, 2)
        x = x + condition
        for conv in self.convs:
            x = x + conv(F.relu(x))
        logits = self.head(F.relu(self.widen(F.relu(x))))
        return logits.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


class CheapNet(PassNet):
    """A :class:`PassNet` with ``neighbour_codes`` whose convolutions run once per grid, with every
    code unknown (the first pass's view); each pass then adds only its known neighbours'
    embeddings and its step's, a residual 1x1 layer, the head and the neighbours' log-odds: more
    passes for the price of their heads."""

    #: With ``ring``, the embeddings also of the codes two places away (the 5x5 window's ring),
    #: which a 5-pass schedule's early passes need.
    RING = tuple((dr, dc) for dr in range(-2, 3) for dc in range(-2, 3) if max(abs(dr), abs(dc)) == 2)

    def __init__(self, *args, head_channels, ring: bool = False):
        super().__init__(*args, head_channels=head_channels, neighbour_codes=True)
        channels = self.code.embedding_dim
        self.mix = nn.Conv2d(channels, channels, 1)
        self.ring = nn.Embedding(len(self.RING) * (self.n_embed + 1), channels) if ring else None

    def features(self, codes, step, condition=None):
        x = super().features(codes, torch.zeros_like(step), condition)  # the trunk: step 0's view
        near = _bag(self.near_rows(codes, step), self.near.weight)
        if self.ring is not None:
            known = self.order[None] < step[:, None, None]
            near = near + _bag(near_rows(codes, known, self.n_embed, self.RING), self.ring.weight)
        x = x + near.permute(0, 3, 1, 2) + self.step(step)[:, :, None, None]
        return F.relu(x + self.mix(F.relu(x)))


class CausalNet(PassNet):
    """A diagnostic, not a coder: the bottom grid in raster order (one pass a code), masked 3x3
    convolutions (PixelCNN's type A first, then B) over the codes' embeddings and the top
    features, then the head: what raster context buys a net of the pass net's size."""

    def __init__(self, *args, head_channels):
        super().__init__(*args, head_channels=head_channels)
        self.register_buffer("order", torch.zeros(self.grid, dtype=torch.long), persistent=False)
        self.passes = 1
        masks = []
        for i, conv in enumerate(self.convs):
            mask = torch.ones(3, 3)
            mask[1, 2 if i else 1:] = 0
            mask[2:] = 0
            masks.append(mask)
        self.register_buffer("masks", torch.stack(masks), persistent=False)

    def features(self, codes, step, condition=None):
        x = self.code(codes) + self.row.weight[None, :, None, :] + self.col.weight[None, None, :, :]
        x = x.permute(0, 3, 1, 2)
        first = True
        for conv, mask in zip(self.convs, self.masks):
            h = F.conv2d(F.relu(x) if not first else x, conv.weight * mask, conv.bias, padding=conv.dilation,
                         dilation=conv.dilation)
            x = (h + condition) if first else x + h
            first = False
        return F.relu(x)


class TopGridFeatures(TopFeatures):
    """:class:`TopFeatures` left at the top grid's size."""

    def upsample(self, x):
        return x


class BottomNet(nn.Module):
    """``p(bottom | top)`` of one design, as :class:`mrivq.nn.pass_prior.PassPrior` builds it."""

    def __init__(self, design: str, n_embed: int, grid: tuple[int, int], settings: PassPriorSettings) -> None:
        super().__init__()
        channels = 96 if design in ("wide", "blocks96") else settings.channels
        passes = int(design[-1]) if design.startswith(("nbrfollow", "cheap")) and design[-1].isdigit() else settings.passes_bottom
        args = (n_embed, grid, channels, settings.layers, passes)
        head = 4 * channels  # the priors' prior.*.head_channels (256 = 4 x 64 channels by default)
        self.table = None
        if design.startswith("blocks"):
            self.net = BlockNet(n_embed, grid, channels, settings.layers, head)
            self.condition = TopGridFeatures(n_embed, channels, settings.condition_blocks)
            return
        if design == "ffn":
            self.net = FeedForwardNet(*args, hidden=2 * channels)
        elif design == "causal":
            self.net = CausalNet(*args, head_channels=head)
        elif design.startswith("cheap"):
            self.net = CheapNet(*args, head_channels=head, ring=design == "cheap5")
        else:
            self.net = PassNet(*args, head_channels=0 if design in ("repeated", "own", "wide", "table") else head,
                               neighbour_codes=design.startswith("nbr"))
        if design == "nbr":  # the neighbours' embeddings only: their tables stay at zero
            self.net.near_follow.weight.requires_grad_(False)
        blocks = int(design[4:]) if design.startswith("cond") else settings.condition_blocks
        self.condition = TopFeatures(n_embed, channels, blocks, shuffle=design not in ("repeated", "wide", "table"))
        if design == "table":
            self.table = nn.Embedding(4 * n_embed, n_embed)
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


def training_codes(checkpoint: str, threads: int | None = None) -> tuple:
    """The VQ-VAE, its config and ``{"train": (top, bottom), "validate": ...}``: int64 code grids
    with the prior's training copies (encoded, or from the codes cache); ``threads`` for torch."""
    if threads:
        torch.set_num_threads(threads)
    vqvae, config = load_vqvae(checkpoint)
    codes, _, _ = _encode_splits(config, config, vqvae)
    return vqvae, config, {name: tuple(torch.as_tensor(a).long() for a in codes[name]) for name in ("train", "validate")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the VQ-VAE (models/best.pt)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vqvae, config, codes = training_codes(args.checkpoint, args.threads)
    (top, bottom), (val_top, val_bottom) = codes["train"], codes["validate"]
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
