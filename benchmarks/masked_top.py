"""A top net trained on random masks too, and its top grids drawn in many small steps: a lead for #35's samples.

A pass prior draws its top grid in its coding passes; the first pass (a quarter of the grid)
sees no code at all, so each slice's layout is a quarter of independent draws, and the samples
lose their anatomy there (``benchmarks/sample_levers.py``). This trains a top net of the pass
prior's sizes that is told which codes are known by an explicit mask (with one of ``BUCKETS``
embeddings for the known fraction instead of the pass's), on the coding passes' masks and, a
``--share`` of the time, on random masks (a fraction cos(pi r / 2) unknown, r uniform: MaskGIT's
schedule, Chang et al. 2022). It prints the net's validation bits per top code in the coding
passes (``--share 0``: the coding passes alone, the baseline), then draws 16 slices: top grids in
``--draw-steps`` steps (each step draws every unknown code and keeps the most confident ones,
with Gumbel noise falling to zero; 0: in the coding passes), bottom grids by a pass or volume
prior's bottom net given them, scored with ``mrivq sample``'s yardsticks::

    python benchmarks/masked_top.py runs/default/models/best.pt PRIOR --share 0.25 --draw-steps 8 12 --out /tmp/mt

``PRIOR`` is a pass or volume prior of the same VQ-VAE (its bottom grid draws; a volume prior's
as for a key slice). Training uses the prior's training copies of the codes (encoded, or read from
the cache ``mrivq train-prior`` left). Figures are measurements, never assertions: nothing here
fails CI.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bottom_net import training_codes
from sample_levers import draw_passes, scored
from torch import nn

from mrivq.apps import sample as sample_app
from mrivq.nn.pass_prior import PassNet, draw

BUCKETS = 8  # embeddings of the known fraction, in eighths


class MaskedNet(PassNet):
    """A :class:`PassNet` over the top grid whose input marks the known codes by a mask ``(B, rows,
    cols)`` bool, with the known fraction's embedding where a pass net has the pass's."""

    def __init__(self, n_embed: int, grid: tuple[int, int], channels: int, layers: int, passes: int,
                 head_channels: int) -> None:
        super().__init__(n_embed, grid, channels, layers, passes, head_channels)
        self.step = nn.Embedding(BUCKETS, channels)

    def masked_logits(self, codes: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_embed, rows, cols)`` given the codes where ``known``."""
        bucket = (known.flatten(1).float().mean(1) * BUCKETS).long().clamp(max=BUCKETS - 1)
        x = self.code(torch.where(known, codes, self.n_embed)) + self.step(bucket)[:, None, None, :]
        x = (x + self.row.weight[None, :, None, :] + self.col.weight[None, None, :, :]).permute(0, 3, 1, 2)
        for conv in self.convs:
            x = x + conv(F.relu(x))
        x = F.relu(x)
        return self.logits_of(x.flatten(2)).view(len(x), -1, *x.shape[2:])


def training_masks(net: MaskedNet, n: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(known, predicted)`` masks ``(n, rows, cols)``: a coding pass's (drawn by its share of the
    grid), or with probability ``share`` a random one."""
    counts = torch.bincount(net.order.flatten(), minlength=net.passes).float()
    step = torch.multinomial(counts, n, replacement=True)
    known, predicted = net.order[None] < step[:, None, None], net.order[None] == step[:, None, None]
    unknown = torch.rand(n, *net.grid) < torch.cos(torch.rand(n) * math.pi / 2)[:, None, None]
    random = (torch.rand(n) < share)[:, None, None]
    return torch.where(random, ~unknown, known), torch.where(random, unknown, predicted)


@torch.no_grad()
def coding_bits(net: MaskedNet, codes: torch.Tensor) -> tuple[float, list[float]]:
    """Bits per code of ``codes`` in the coding passes, and per pass."""
    net.eval()
    nats = []
    for lo in range(0, len(codes), 40):
        grids, logits = codes[lo:lo + 40], None
        for step in range(net.passes):
            out = net.masked_logits(grids, (net.order < step)[None].expand(len(grids), -1, -1))
            logits = out if logits is None else torch.where((net.order == step)[None, None], out, logits)
        nats.append(F.cross_entropy(logits, grids, reduction="none"))
    net.train()
    bits = torch.cat(nats) / math.log(2)
    return float(bits.mean()), [float(bits[:, net.order == step].mean()) for step in range(net.passes)]


@torch.no_grad()
def draw_top(net: MaskedNet, n: int, steps: int, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` top grids: in the coding passes (``steps`` 0), or in ``steps`` steps, each drawing
    every unknown code and keeping the most confident (log-probability plus Gumbel noise of weight
    4.5 falling to 0) until cos(pi t / 2 steps) of the grid is left unknown."""
    codes = torch.zeros(n, *net.grid, dtype=torch.long)
    if steps == 0:
        for step in range(net.passes):
            here = net.order == step
            logits = net.masked_logits(codes, (net.order < step)[None].expand(n, -1, -1)).permute(0, 2, 3, 1)[:, here]
            codes[:, here] = draw(logits.reshape(-1, net.n_embed), 1.0, top_p, generator).reshape(n, -1)
        return codes
    known, size = torch.zeros(n, *net.grid, dtype=torch.bool), codes[0].numel()
    for t in range(1, steps + 1):
        logits = net.masked_logits(codes, known).permute(0, 2, 3, 1).reshape(-1, net.n_embed)
        drawn = draw(logits, 1.0, top_p, generator).reshape(n, *net.grid)
        confidence = torch.log_softmax(logits, 1).gather(1, drawn.reshape(-1, 1)).reshape(n, *net.grid)
        uniform = torch.rand(n, *net.grid, generator=generator).clamp(1e-9, 1 - 1e-9)
        confidence = confidence - 4.5 * (1 - t / steps) * torch.log(-torch.log(uniform))
        confidence = torch.where(known, -math.inf, confidence)
        keep = int((~known[0]).sum()) - math.floor(size * math.cos(math.pi / 2 * t / steps))
        chosen = torch.zeros(n, size, dtype=torch.bool)
        chosen.scatter_(1, confidence.flatten(1).topk(keep, dim=1).indices, True)
        chosen = chosen.reshape(n, *net.grid)
        codes, known = torch.where(chosen, drawn, codes), known | chosen
    return codes


def train(args, top: torch.Tensor, val_top: torch.Tensor, config, n_embed: int) -> MaskedNet:
    settings = config.prior.passes
    torch.manual_seed(args.seed)
    net = MaskedNet(n_embed, tuple(top.shape[1:]), settings.channels, settings.layers, settings.passes_top,
                    settings.head_channels)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.prior.lr, weight_decay=config.prior.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.prior.lr, total_steps=args.steps, pct_start=0.05)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        grids = top[torch.randint(len(top), (args.batch,))]
        known, predicted = training_masks(net, args.batch, args.share)
        nats = F.cross_entropy(net.masked_logits(grids, known), grids, reduction="none")
        loss = (nats * predicted).sum() / predicted.sum().clamp(min=1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % max(1, args.steps // 4) == 0:
            bits, by_pass = coding_bits(net, val_top)
            print(f"share {args.share:g}, step {step}: {bits:.3f} bits per top code in the coding passes "
                  f"({', '.join(f'{b:.3f}' for b in by_pass)}); {time.perf_counter() - started:.0f} s", flush=True)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="the VQ-VAE (models/best.pt)")
    parser.add_argument("prior", help="a pass or volume prior of that VQ-VAE, whose bottom net draws")
    parser.add_argument("--out", required=True, help="a new folder; each drawing's samples in a subfolder")
    parser.add_argument("--share", type=float, default=0.25, help="share of random masks in training (0: passes only)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--draw-steps", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--top-p", type=float, nargs="+", default=[sample_app.TOP_P])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vqvae, config, codes = training_codes(args.checkpoint, args.threads)
    net = train(args, codes["train"][0], codes["validate"][0], config, vqvae.quantize_top.n_embed)
    for steps in args.draw_steps:
        for top_p in args.top_p:
            def drawing(prior, n, *, temperature=1.0, top_p=top_p, generator=None, steps=steps):
                with torch.no_grad():
                    grids = draw_top(net, n, steps, top_p, generator)
                    passes = prior.top.passes + prior.bottom.passes
                    return draw_passes(prior, n, [top_p] * passes, 1.0, generator, top=grids)

            out = Path(args.out) / f"steps{steps}_p{top_p:g}"
            print(f"top drawn in {f'{steps} steps' if steps else 'its coding passes'} at top-p {top_p:g}: "
                  f"{scored(args.prior, drawing, out, 16, top_p, args.seed)}; {out}/samples.png", flush=True)

if __name__ == "__main__":
    main()
