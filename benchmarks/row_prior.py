"""Causal convolutional priors in raster and row order: how close a CNN comes to the transformer.

The pass prior codes a grid in a few passes, each seeing the codes of the passes before it; its
first pass sees no code of its own grid, and that is most of its distance to the transformer
prior, which codes one position at a time in raster order. This benchmark trains convolutional
priors for one grid (float, the prior's optimiser, learning rate and batch size, on the prior's
training copies of a VQ-VAE's codes, every position's loss at every step) in orders a coder could
follow, and prints the validation and test bits per code (the test split's slices each coded alone,
every code given what its order knows), then the bits per pixel of a slice coded alone:

- ``raster``: raster order, one code at a time to decode. Two streams of residual convolutions,
  as in PixelCNN++ (Salimans et al., 2017) but with ReLU layers and dilations 1, 2, 4: one sees
  only the rows above a position (3x3 taps on the row above and its own row of that stream), the
  other also the codes to its left; no blind spot.
- ``rows``: a row at a time, in two halves: the even columns given the rows above, then the odd
  columns given the rows above and the two codes beside them. One stream over the rows above (the
  first stream of ``raster``), so a whole row's features come from one evaluation of that row; the
  two neighbours reach the odd columns through an embedding each (added before the head) and a
  table of log-odds each (added to the logits), as ``prior.*.neighbour_codes`` does.
- ``rows4``: the same in three phases a row: every fourth column (0, 4, ...), then the columns
  between them two apart (given the codes two places away), then the odd columns.

A bottom grid's nets also see the top grid's features (:class:`mrivq.nn.pass_prior.TopFeatures`,
each bottom position its own). Decoding ``rows`` needs two evaluations of a row's head per row of
the grid (96 for a 256x128 slice's two grids, where ``raster`` needs 2,560 steps), each over every
slice being decoded: what the pass prior's coder does in 5.

    python benchmarks/row_prior.py runs/default/models/best.pt [--designs raster rows] [--levels top bottom]
        [--steps 2500] [--threads 1] [--save DIR] [--samples PRIOR OUT]

``--speed`` times instead what decoding ``rows`` would cost in integers (nothing is trained): a
row at a time, each of the trunk's convolutions computed for that row only from every layer's
activations kept so far, then each half-row's head, its coder weights and a range decoder per slice,
with the integer copy's own operations (:mod:`mrivq.compression.portable.passes`: int8 weights
drawn at random, ``torch._int_mm``, the int64 rescaling) on one thread, by batch size. The tables
of the row above, the neighbours' rows and the stream's clamps are left out (a few additions a row).

``--samples PRIOR OUT`` then draws 16 slices with each design's two nets (in its coding order, every
code at top-p 0.8, or ``--top-p``) and scores them as ``mrivq sample`` does, through ``PRIOR`` (a pass or volume
prior of the same VQ-VAE, whose drawing is replaced; ``benchmarks/sample_levers.py``), into
``OUT/DESIGN``. ``--save DIR`` keeps the trained nets (``DIR/DESIGN_LEVEL.pt``); with ``--steps 0``
they are loaded from there instead of trained.

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mrivq.apps.train_prior import _encode_splits
from mrivq.compression.codec import encode_images
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.data.volumes import gap_shares, references
from mrivq.engine.checkpoint import load_vqvae
from mrivq.nn.pass_prior import DILATIONS, TopFeatures, draw, referenced_grids
from mrivq.nn.vqvae2 import code_grid_shapes

DESIGNS = ("raster", "rows", "rows4")
#: Each design's phases within a row: (columns of the phase, offsets of the known neighbours they see).
PHASES = {"rows": [(lambda j: j % 2 == 0, ()), (lambda j: j % 2 == 1, (-1, 1))],
          "rows4": [(lambda j: j % 4 == 0, ()), (lambda j: j % 4 == 2, (-2, 2)), (lambda j: j % 2 == 1, (-1, 1))]}


def shifted(x: torch.Tensor, rows: int = 0, cols: int = 0) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` moved down by ``rows`` and right by ``cols``, zeros coming in."""
    height, width = x.shape[2:]
    return F.pad(x, (cols, 0, rows, 0))[:, :, :height, :width]


class AboveConv(nn.Module):
    """3x3 taps at dilation ``d`` on the row ``d`` above and on a position's own row: a stream whose
    row i depends on the codes of rows above i only stays so."""

    def __init__(self, channels: int, d: int) -> None:
        super().__init__()
        self.d, self.conv = d, nn.Conv2d(channels, channels, (2, 3), dilation=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.d, self.d, self.d, 0)))


class LeftConv(nn.Module):
    """Taps at dilation ``d`` up-left, up, left and here (2x2): a stream whose position depends on
    the codes before it in raster order only stays so."""

    def __init__(self, channels: int, d: int) -> None:
        super().__init__()
        self.d, self.conv = d, nn.Conv2d(channels, channels, (2, 2), dilation=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.d, 0, self.d, 0)))


class GridNet(nn.Module):
    """One grid's prior in one of :data:`DESIGNS`: logits ``(B, K, H, W)`` of every code given what
    its order knows, from the whole grid at once (teacher forcing)."""

    def __init__(self, design: str, n_embed: int, grid: tuple[int, int], channels: int = 64, layers: int = 6,
                 head: int = 256, condition: bool = False, volume: bool = False) -> None:
        super().__init__()
        self.design, self.n_embed = design, n_embed
        self.seen = self.follow = None
        if volume:  # the volume prior's tables of the codes at the same place of the two references
            self.seen = nn.Embedding(2 * (n_embed + 1), channels)
            self.follow = nn.Embedding(2 * (n_embed + 1), n_embed)
            nn.init.zeros_(self.follow.weight)
        self.embed = nn.Embedding(n_embed, channels)
        self.above_first = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))  # on the row above
        self.row = nn.Parameter(torch.zeros(channels, grid[0], 1))
        self.col = nn.Parameter(torch.zeros(channels, 1, grid[1]))
        self.above = nn.ModuleList(AboveConv(channels, DILATIONS[i % len(DILATIONS)]) for i in range(layers))
        if design == "raster":
            self.left_first = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1))
            self.left_code = nn.Conv2d(channels, channels, 1)
            self.left = nn.ModuleList(LeftConv(channels, DILATIONS[i % len(DILATIONS)]) for i in range(layers))
            self.link = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(layers))
        else:
            offsets = sorted({o for _, seen in PHASES[design] for o in seen})
            self.offsets = offsets
            self.side = nn.Embedding(len(offsets) * (n_embed + 1), channels)  # per offset: its codes and none
            self.side_follow = nn.Embedding(len(offsets) * (n_embed + 1), n_embed)
            nn.init.zeros_(self.side_follow.weight)
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, head, 1), nn.ReLU(), nn.Conv2d(head, n_embed, 1))
        self.condition = TopFeatures(n_embed, channels, 2, shuffle=True) if condition else None

    def forward(self, codes: torch.Tensor, top: torch.Tensor | None = None,
                refs: torch.Tensor | None = None) -> torch.Tensor:
        """``refs``: a volume net's reference grids ``(B, 2, H, W)``, -1 where a slice has none."""
        e = self.embed(codes).permute(0, 3, 1, 2)
        start = self.row + self.col + (0 if self.condition is None else self.condition(top))
        bias = 0
        if self.seen is not None:
            rows = torch.where(refs < 0, self.n_embed, refs) + (self.n_embed + 1) * torch.arange(2)[None, :, None, None]
            start = start + self.seen(rows).sum(1).permute(0, 3, 1, 2)
            bias = self.follow(rows).sum(1).permute(0, 3, 1, 2)
        above = shifted(self.above_first(e), rows=1) + start
        if self.design == "raster":
            left = shifted(self.left_first(e), rows=1) + shifted(self.left_code(e), cols=1) + start
            for conv_above, conv_left, link in zip(self.above, self.left, self.link):
                above = above + conv_above(F.relu(above))
                left = left + conv_left(F.relu(left)) + link(F.relu(above))
            return self.head(left) + bias
        for conv in self.above:
            above = above + conv(F.relu(above))
        side, follow = self.beside(codes)
        return self.head(above + side) + follow + bias

    def beside(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings ``(B, C, H, W)`` and log-odds ``(B, K, H, W)`` of the codes beside each
        position that its phase of the row knows."""
        width = codes.shape[2]
        cols = torch.arange(width, device=codes.device)
        side = follow = 0
        for k, offset in enumerate(self.offsets):
            sees = torch.zeros(width, dtype=torch.bool, device=codes.device)
            for columns, seen in PHASES[self.design]:
                if offset in seen:
                    sees |= columns(cols)
            there = cols + offset
            inside = (there >= 0) & (there < width)  # beyond the edge: the offset's "none" row
            rows = torch.where(inside, codes[:, :, there.clamp(0, width - 1)], self.n_embed) + k * (self.n_embed + 1)
            use = sees.to(self.embed.weight.dtype)[None, None, None, :]
            side = side + self.side(rows).permute(0, 3, 1, 2) * use
            follow = follow + self.side_follow(rows).permute(0, 3, 1, 2) * use
        return side, follow


def test_codes(vqvae, config) -> tuple:
    """The test split's top and bottom codes under ``vqvae``, preprocessed as it was trained, and
    the slices' file names."""
    test = load_split(data_splits(config.data, config.seed).test, Preprocessing.from_settings(config.data),
                      name="test", cache_dir=config.data.cache_dir)
    return (*encode_images(vqvae, test.images, 16), [Path(f).name for f in test.files])


def bits_per_code(net: GridNet, level: str, top: torch.Tensor, bottom: torch.Tensor,
                  refs: torch.Tensor | None = None, per_grid: bool = False):
    """Mean bits per code of ``level`` over the grids given (teacher forced, float); ``refs``
    ``(N, 2)``: each grid's references among them (a volume net); ``per_grid``: each grid's mean."""
    net.eval()
    nats = []
    with torch.no_grad():
        for lo in range(0, len(top), 16):
            t, b = top[lo:lo + 16], bottom[lo:lo + 16]
            codes = t if level == "top" else b
            grids = None if refs is None else referenced(refs[lo:lo + 16], top, bottom, level)
            nats.append(F.cross_entropy(net(codes, t if level == "bottom" else None, grids), codes,
                                        reduction="none").flatten(1))
    net.train()
    nats = torch.cat(nats) / math.log(2)
    return nats.mean(1) if per_grid else float(nats.mean())


def referenced(refs: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor, level: str) -> torch.Tensor:
    """``level``'s reference grids ``(B, 2, H, W)`` of the indices ``refs`` ``(B, 2)`` (-1: none)."""
    return referenced_grids(refs, top, bottom)[0 if level == "top" else 1]


@torch.no_grad()
def draw_grid(net: GridNet, n: int, grid: tuple[int, int], top: torch.Tensor | None, top_p: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """``n`` grids drawn in ``net``'s coding order (a row's phases, or one code at a time), each
    step's codes from the whole grid's logits given the codes drawn so far."""
    net.eval()
    codes = torch.zeros(n, *grid, dtype=torch.long)
    cols = torch.arange(grid[1])
    phases = [[j] for j in range(grid[1])] if net.design == "raster" else [
        cols[columns(cols)].tolist() for columns, _ in PHASES[net.design]]
    for i in range(grid[0]):
        for here in phases:
            logits = net(codes, top)[:, :, i, here].permute(0, 2, 1).reshape(-1, net.n_embed)
            codes[:, i, here] = draw(logits, 1.0, top_p, generator).reshape(n, len(here))
    return codes


def decode_speed(grids: list[tuple[int, int]], channels: int = 64, layers: int = 6, head: int = 256,
                 n_embed: int = 64) -> None:
    """Print slices a second of a ``rows`` decode of ``grids`` (the top's and the bottom's), one thread."""
    from mrivq.compression import driver
    from mrivq.compression.portable.fixed_point import coder_table, exp_table, weights_from_logits
    from mrivq.compression.portable.passes import SHIFT, _Conv, activate, int8_matmul

    def conv(inputs: int, outputs: int, kernel: int, dilation: int = 1) -> _Conv:
        return _Conv({"weight": torch.randint(-20, 20, (inputs, outputs), dtype=torch.int8),
                      "multiplier": torch.full((outputs,), 1 << 14, dtype=torch.int64),
                      "bias": torch.zeros(outputs, dtype=torch.int64), "dilation": dilation, "kernel": kernel})

    torch.manual_seed(0)
    torch.set_num_threads(1)
    trunk = [conv(9 * channels, channels, 3, DILATIONS[i % len(DILATIONS)]) for i in range(layers)]
    widen, logits_conv = conv(channels, head, 1), conv(head, n_embed, 1)
    table = coder_table(exp_table())
    categorical, queue = driver.coder()
    model = categorical(perfect=False)
    pad = max(DILATIONS)
    for batch in (4, 8, 16, 32):
        started = time.perf_counter()
        for rows, width in grids:
            # every layer's int8 activations so far, -128 (a zero activation) beyond the edges and below
            acts = [torch.full((batch, rows + 2 * pad, width + 2 * pad, channels), -128, dtype=torch.int8)
                    for _ in range(layers)]
            encoders = [queue.RangeEncoder() for _ in range(batch)]
            for i in range(rows):
                x = torch.zeros(batch, width, channels, dtype=torch.int64)
                for a, cv in zip(acts, trunk):
                    d = cv.dilation
                    a[:, pad + i, pad:pad + width] = activate(x, 1 << 10)
                    taps = torch.cat([a[:, pad + i + di * d, pad + dj * d:pad + dj * d + width]
                                      for di in (-1, 0, 1) for dj in (-1, 0, 1)], -1)
                    acc = int8_matmul(taps.reshape(-1, 9 * channels), cv.weight)
                    x += acc.long().mul_(cv.multiplier).add_(cv.offset).bitwise_right_shift_(SHIFT).reshape(x.shape)
                for half in (slice(0, None, 2), slice(1, None, 2)):
                    h = activate(widen(activate(x[:, half], 1 << 10)[:, :, None, :])[:, :, 0, :], 1 << 10)
                    weights = weights_from_logits(logits_conv(h[:, :, None, :]).reshape(batch, -1, n_embed), table)
                    for b in range(batch):
                        encoders[b].encode(np.zeros(weights.shape[1], dtype=np.int32), model, weights[b])
        print(f"rows decode, batches of {batch}: {batch / (time.perf_counter() - started):.1f} slices a second "
              "on one thread", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the VQ-VAE (models/best.pt)")
    parser.add_argument("--designs", nargs="+", choices=DESIGNS, default=list(DESIGNS))
    parser.add_argument("--levels", nargs="+", choices=("top", "bottom"), default=["top", "bottom"])
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save", help="keep (or, with --steps 0, load) the trained nets in this folder")
    parser.add_argument("--samples", nargs=2, metavar=("PRIOR", "OUT"), help="draw and score 16 slices")
    parser.add_argument("--top-p", type=float, default=0.8, help="the samples' nucleus setting")
    parser.add_argument("--speed", action="store_true", help="time a rows decode in integers instead")
    parser.add_argument("--volume", action="store_true",
                        help="nets that also see two reference slices, as the volume prior's (prior.volume.key_every)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vqvae, config = load_vqvae(args.checkpoint)
    if args.speed:
        decode_speed(list(code_grid_shapes(tuple(config.data.image_size))), n_embed=vqvae.quantize_top.n_embed)
        return
    codes, _, refs = _encode_splits(config, config, vqvae)  # refs: the default volume prior's gaps
    (top, bottom), (val_top, val_bottom) = (tuple(torch.as_tensor(a).long() for a in codes[name])
                                            for name in ("train", "validate"))
    *test_grids, test_names = test_codes(vqvae, config)
    test_top, test_bottom = (torch.as_tensor(a).long() for a in test_grids)
    key_every = config.prior.volume.key_every
    test_refs = val_refs = None
    if args.volume:  # scored in the order encode codes a volume file in; training draws gaps as train-prior
        test_refs = torch.as_tensor(references(test_names, key_every))
        val_refs = torch.as_tensor(np.asarray(refs["validate"]))
        shares = gap_shares(key_every)
        gaps, weights = list(shares), torch.tensor(list(shares.values()))
        gap_tables = {gap: torch.as_tensor(refs["train"][gap]) for gap in gaps if gap}
    pixels = math.prod(config.data.image_size)
    n_embed = vqvae.quantize_top.n_embed
    settings = config.prior
    print(f"{len(top)} training grids, {len(val_top)} validation, {len(test_top)} test slices; {args.steps} steps")
    for design in args.designs:
        bits, nets = {}, {}
        for level in args.levels:
            torch.manual_seed(0)
            grid = tuple((top if level == "top" else bottom).shape[1:])
            net = nets[level] = GridNet(design, n_embed, grid, condition=level == "bottom", volume=args.volume)
            saved = Path(args.save or ".") / f"{design}_{level}.pt"
            if args.steps == 0:
                net.load_state_dict(torch.load(saved))
                bits[level] = bits_per_code(net, level, test_top, test_bottom, test_refs, per_grid=True)
                print(f"{design}, {level} grid, loaded: test {float(bits[level].mean()):.3f} bits per code", flush=True)
                continue
            optimiser = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.lr, total_steps=args.steps,
                                                           pct_start=0.02)
            started = time.perf_counter()
            for step in range(1, args.steps + 1):
                pick = torch.randint(len(top), (settings.batch_size,))
                grids = top[pick] if level == "top" else bottom[pick]
                chosen = None
                if args.volume:
                    gap = [gaps[g] for g in torch.multinomial(weights, len(pick), replacement=True).tolist()]
                    chosen = torch.stack([gap_tables[g][k] if g else torch.tensor([-1, -1])
                                          for g, k in zip(gap, pick.tolist())])
                    chosen = referenced(chosen, top, bottom, level)
                loss = F.cross_entropy(net(grids, top[pick] if level == "bottom" else None, chosen), grids)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                if step % max(1, args.steps // 5) == 0 or step == args.steps:
                    bits[level] = bits_per_code(net, level, test_top, test_bottom, test_refs, per_grid=True)
                    print(f"{design}, {level} grid, step {step}: validation "
                          f"{bits_per_code(net, level, val_top, val_bottom, val_refs):.3f}, test "
                          f"{float(bits[level].mean()):.3f} bits per code; {time.perf_counter() - started:.0f} s",
                          flush=True)
            if args.save and args.steps:
                saved.parent.mkdir(parents=True, exist_ok=True)
                torch.save(net.state_dict(), saved)
        if len(bits) == 2:
            per_slice = (bits["top"] * test_top[0].numel() + bits["bottom"] * test_bottom[0].numel()) / pixels
            if args.volume:
                key = test_refs[:, 0] < 0
                print(f"{design}: {float(per_slice.mean()):.4f} bits per pixel, the test split as a volume file "
                      f"(float; key slices {float(per_slice[key].mean()):.4f}, the others "
                      f"{float(per_slice[~key].mean()):.4f})")
            else:
                print(f"{design}: {float(per_slice.mean()):.4f} bits per pixel, a test slice coded alone (float)")
        if args.samples and len(nets) == 2:
            from sample_levers import scored  # benchmarks/, beside this script

            def drawing(prior, count, *, top_p, generator=None, nets=nets, **_):
                drawn_top = draw_grid(nets["top"], count, tuple(top.shape[1:]), None, top_p, generator)
                return drawn_top, draw_grid(nets["bottom"], count, tuple(bottom.shape[1:]), drawn_top, top_p,
                                            generator)

            prior_path, out = args.samples
            print(f"{design} samples: {scored(prior_path, drawing, Path(out) / design, 16, args.top_p, 0)}", flush=True)


if __name__ == "__main__":
    main()
