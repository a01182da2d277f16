"""A pass prior's top net trained alone, with random masks or without, and its top grids drawn in steps or passes.

A pass prior draws its top grid in its coding passes; the first pass (a quarter of the grid)
sees no code at all, so each slice's layout is a quarter of independent draws, and the samples
lose their anatomy there (``benchmarks/sample_levers.py``). ``prior.<kind>.top_masks`` trains the
top net on random masks too and draws it in steps (:func:`mrivq.nn.pass_prior.draw_in_steps`).
This trains that top net alone (no bottom net, no slices beside it), of the prior's sizes or
``--channels`` / ``--layers`` of its own, with ``top_masks`` = ``--share`` (0: the coding passes
alone, the baseline), prints its validation bits per top code in the coding passes, then draws
16 slices: top grids in ``--draw-steps`` steps (0: in the coding passes), bottom grids by a pass
or volume prior's bottom net given them, scored with ``mrivq sample``'s yardsticks::

    python benchmarks/masked_top.py runs/default/models/best.pt PRIOR --share 0.5 --draw-steps 0 8 --out /tmp/mt

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
from mrivq.nn.pass_prior import PassNet, _all_passes, _one_pass_bits, draw_in_passes, draw_in_steps


@torch.no_grad()
def coding_bits(net: PassNet, codes: torch.Tensor) -> tuple[float, list[float]]:
    """Bits per code of ``codes`` in the coding passes, and per pass."""
    net.eval()
    nats = [F.cross_entropy(_all_passes(net, codes[lo:lo + 40], None).float(), codes[lo:lo + 40], reduction="none")
            for lo in range(0, len(codes), 40)]
    net.train()
    bits = torch.cat(nats) / math.log(2)
    return float(bits.mean()), [float(bits[:, net.order == step].mean()) for step in range(net.passes)]


class AttentionTop(PassNet):
    """A :class:`PassNet` whose residual convolutions are ``layers`` transformer blocks over the
    whole grid (bidirectional attention, pre-norm; float only: mrivq has no integer copy of it):
    does a net that sees every known code at once draw better layouts?"""

    def __init__(self, n_embed: int, grid: tuple[int, int], channels: int, layers: int, passes: int,
                 head_channels: int, masks: float) -> None:
        super().__init__(n_embed, grid, channels, 0, passes, head_channels, masks=masks)
        block = nn.TransformerEncoderLayer(channels, max(1, channels // 32), 4 * channels, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(channels)

    def features(self, codes: torch.Tensor, step, condition: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inputs(codes, step)
        if condition is not None:
            x = x + condition
        b, c, h, w = x.shape
        x = self.norm(self.blocks(x.flatten(2).transpose(1, 2)))
        return x.transpose(1, 2).reshape(b, c, h, w)


def train(args, top: torch.Tensor, val_top: torch.Tensor, config, n_embed: int) -> PassNet:
    settings = config.prior.passes
    torch.manual_seed(args.seed)
    kind = AttentionTop if args.attention else PassNet
    net = kind(n_embed, tuple(top.shape[1:]), args.channels or settings.channels, args.layers or settings.layers,
               settings.passes_top, settings.head_channels, masks=args.share)
    print(f"{kind.__name__}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters", flush=True)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.prior.lr, weight_decay=config.prior.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.prior.lr, total_steps=args.steps, pct_start=0.05)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = _one_pass_bits(net, top[torch.randint(len(top), (args.batch,))], None)
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
    parser.add_argument("--channels", type=int, default=0, help="the net's width (0: the prior's)")
    parser.add_argument("--layers", type=int, default=0, help="its residual convolutions (0: the prior's)")
    parser.add_argument("--attention", action="store_true",
                        help="transformer blocks (--layers of them) instead of convolutions (float only)")
    parser.add_argument("--draw-steps", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--top-p", type=float, nargs="+", default=[sample_app.TOP_P])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.share == 0 and any(args.draw_steps):
        parser.error("a net trained on the coding passes alone (--share 0) draws in them only (--draw-steps 0)")
    vqvae, config, codes = training_codes(args.checkpoint, args.threads)
    net = train(args, codes["train"][0], codes["validate"][0], config, vqvae.quantize_top.n_embed)
    for steps in args.draw_steps:
        for top_p in args.top_p:
            def drawing(prior, n, *, temperature=1.0, top_p=top_p, generator=None, steps=steps):
                with torch.no_grad():
                    kw = {"temperature": 1.0, "top_p": top_p, "generator": generator}
                    grids = (draw_in_steps(net, n, None, None, steps=steps, **kw) if steps
                             else draw_in_passes(net, n, None, None, **kw))
                    passes = prior.top.passes + prior.bottom.passes
                    return draw_passes(prior, n, [top_p] * passes, 1.0, generator, top=grids)

            out = Path(args.out) / f"steps{steps}_p{top_p:g}"
            print(f"top drawn in {f'{steps} steps' if steps else 'its coding passes'} at top-p {top_p:g}: "
                  f"{scored(args.prior, drawing, out, 16, top_p, args.seed)}; {out}/samples.png", flush=True)

if __name__ == "__main__":
    main()
