"""A prior over VQ-VAE-2 codes that codes each grid a row at a time, built for integers.

The pass prior codes a grid in a few passes; the first sees no code of its own grid, and that is
most of what keeps it from the transformer prior, which codes one position at a time in raster
order. Here each grid is coded row by row, each row in two halves: the even columns given every
row above, then the odd columns given the rows above and the two codes beside them. The network
behind it is causal by construction: residual 3x3 convolutions whose taps lie on the row ``d``
above and on a position's own row (the lower row of each kernel is zero), over embeddings of the
three codes of the row above, so the features of row ``i`` depend on the codes of rows above ``i``
only. A whole row's features then come from one evaluation of that row, and the two codes beside
an odd column reach it through an embedding each (added before the head) and a table of log-odds
each (added to the logits), as the pass prior's ``neighbour_codes`` do. On the phantom's default
model its nets cost 9 % fewer bits than the pass prior's for a slice coded alone
(``benchmarks/row_prior.py``; docs/compression.md).

A grid decodes in two steps a row (96 for a 256x128 slice), each over every slice decoded
together; its integer copy (:mod:`mrivq.compression.portable.rows`) computes a row's features from
the activations of the rows above it that it keeps. Like the volume prior it codes a slice given the
codes of two slices of its volume (``references``): their codes at the same place add a learnt
embedding to every position's input and a table of log-odds to its logits.

Shapes: top codes ``(B, h, w)``, bottom codes ``(B, 2h, 2w)``, int64 in ``[0, n_embed)``;
logits ``(B, n_embed, rows, cols)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mrivq.nn.pass_prior import DILATIONS, TopFeatures, _bag, draw, near_rows, referenced_sum

#: The codes of the row above a position that its first layer embeds, (row, col) offsets.
ABOVE = ((-1, -1), (-1, 0), (-1, 1))
#: The codes beside an odd column, known when it is coded: left, right.
BESIDE = ((0, -1), (0, 1))
#: Each 3x3 kernel's taps that a row's features may read: the row above (at the dilation) and its own.
CAUSAL = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def halves(cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns coded in each half of a row: the even ones, then the odd ones."""
    return torch.arange(0, cols, 2), torch.arange(1, cols, 2)


class RowNet(nn.Module):
    """Logits of every position of one grid given the rows above it (and, for the odd columns,
    the two codes beside them), all at once (teacher forcing).

    The input at each position is the sum of the embeddings of the three codes of the row above
    (:data:`ABOVE`; an own "none" row beyond the grid), its row's and column's embeddings and,
    when given, the condition; then ``layers`` residual 3x3 convolutions at dilations 1, 2, 4 in
    turn whose lower row of taps is zero (:data:`CAUSAL`), ReLU; at the odd columns the embeddings
    of the codes beside (:data:`BESIDE`); a 1x1 convolution to ``head_channels`` features and a ReLU
    (none at 0), and a 1x1 convolution to the logits, to which the odd columns add their
    neighbours' tables of log-odds.
    """

    def __init__(self, n_embed: int, grid: tuple[int, int], channels: int, layers: int,
                 head_channels: int = 256) -> None:
        super().__init__()
        self.n_embed, self.grid = n_embed, (int(grid[0]), int(grid[1]))
        self.above = nn.Embedding(len(ABOVE) * (n_embed + 1), channels)
        self.row = nn.Embedding(self.grid[0], channels)
        self.col = nn.Embedding(self.grid[1], channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=DILATIONS[i % len(DILATIONS)],
                      dilation=DILATIONS[i % len(DILATIONS)]) for i in range(layers))
        self.register_buffer("causal", CAUSAL.clone(), persistent=False)
        self.beside = nn.Embedding(len(BESIDE) * (n_embed + 1), channels)
        self.beside_follow = nn.Embedding(len(BESIDE) * (n_embed + 1), n_embed)
        nn.init.zeros_(self.beside_follow.weight)
        self.widen = nn.Conv2d(channels, head_channels, 1) if head_channels else None
        self.head = nn.Conv2d(head_channels or channels, n_embed, 1)
        odd = torch.arange(self.grid[1]) % 2 == 1
        self.register_buffer("odd", odd, persistent=False)

    def conv_weight(self, conv: nn.Conv2d) -> torch.Tensor:
        """``conv``'s weight with its lower row of taps zeroed: what it computes, and what the
        integer copy quantises."""
        return conv.weight * self.causal.to(conv.weight.dtype)

    def trunk(self, codes: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, channels, rows, cols)``: the features of every position from the rows above it."""
        known = torch.ones((), dtype=torch.bool, device=codes.device)
        x = _bag(near_rows(codes, known, self.n_embed, ABOVE), self.above.weight).permute(0, 3, 1, 2)
        x = x + (self.row.weight[:, None, :] + self.col.weight[None, :, :]).permute(2, 0, 1)
        if condition is not None:
            x = x + condition
        for conv in self.convs:
            x = x + F.conv2d(F.relu(x), self.conv_weight(conv), conv.bias, padding=conv.padding,
                             dilation=conv.dilation)
        return x

    def beside_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """``(B, 2, rows, cols)``: the rows of the neighbours' tables of the codes beside each position."""
        return near_rows(codes, torch.ones((), dtype=torch.bool, device=codes.device), self.n_embed, BESIDE)

    def forward(self, codes: torch.Tensor, condition: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        x = self.trunk(codes, condition)
        rows = self.beside_rows(codes)
        odd = self.odd.to(x.dtype)
        x = x + _bag(rows, self.beside.weight).permute(0, 3, 1, 2) * odd
        x = F.relu(x)
        if self.widen is not None:
            x = F.relu(self.widen(x))
        logits = self.head(x) + _bag(rows, self.beside_follow.weight).permute(0, 3, 1, 2) * odd
        return logits if bias is None else logits + bias


class RowPrior(nn.Module):
    """``p(top | refs) p(bottom | top, refs)``, each grid coded a row at a time in two halves.

    The sizes are ``prior.rows.*`` in the config (``condition_layers``: ``condition_blocks``).
    ``references`` (as :class:`mrivq.nn.pass_prior.VolumePrior` takes them): ``(codes_top (B, 2, h,
    w), codes_bottom (B, 2, 2h, 2w))``, the slices a slice is coded after, -1 where it has none;
    None: none has (key slices, samples). ``key_every``: the coder's key slices come every
    ``key_every`` slices of a run.

    Example:
        >>> prior = RowPrior(32, (8, 4), channels=16, layers=2, head_channels=32)
        >>> top, bottom = prior.sample(3)
        >>> top.shape, bottom.shape
        (torch.Size([3, 8, 4]), torch.Size([3, 16, 8]))
    """

    kind = "rows"  # its entry in mrivq.compression.priors
    SLOTS = 2  # the slice before, the slice after

    def __init__(self, n_embed: int, top_grid: tuple[int, int], *, channels: int = 64, layers: int = 6,
                 condition_layers: int = 2, condition_shuffle: bool = True, head_channels: int = 256,
                 key_every: int = 8) -> None:
        super().__init__()
        self.sizes = {"channels": channels, "layers": layers, "condition_layers": condition_layers,
                      "condition_shuffle": condition_shuffle, "head_channels": head_channels,
                      "key_every": key_every}
        self.n_embed, self.key_every = n_embed, key_every
        self.top_grid = (int(top_grid[0]), int(top_grid[1]))
        self.bottom_grid = (2 * self.top_grid[0], 2 * self.top_grid[1])
        self.top = RowNet(n_embed, self.top_grid, channels, layers, head_channels)
        self.condition = TopFeatures(n_embed, channels, condition_layers, condition_shuffle)
        self.bottom = RowNet(n_embed, self.bottom_grid, channels, layers, head_channels)
        rows = self.SLOTS * (n_embed + 1)  # one table per level and use, rows slot * (n_embed + 1) + code
        self.seen_top, self.seen_bottom = nn.Embedding(rows, channels), nn.Embedding(rows, channels)
        self.follow_top, self.follow_bottom = nn.Embedding(rows, n_embed), nn.Embedding(rows, n_embed)
        for follow in (self.follow_top, self.follow_bottom):
            nn.init.zeros_(follow.weight)
        self.integer = None  # the integer copy that codes (mrivq.compression.portable.rows), once made or loaded

    def fresh(self) -> RowPrior:
        """A newly initialised prior of the same sizes, drawn without touching the global random state."""
        with torch.random.fork_rng(devices=[]):
            return type(self)(self.n_embed, self.top_grid, **self.sizes)

    def levels(self):
        return (("top", self.top), ("bottom", self.bottom))

    def condition_for(self, level: str, codes_top: torch.Tensor | None, references=None) -> torch.Tensor:
        """What ``level``'s net adds to its inputs: the references' embeddings, and for the bottom
        grid the top grid's features."""
        net = self.top if level == "top" else self.bottom
        seen = referenced_sum(references, level, net.grid, self.n_embed, self.seen_top if level == "top"
                              else self.seen_bottom)
        return seen if level == "top" else seen + self.condition(codes_top)

    def logit_bias(self, level: str, references=None) -> torch.Tensor:
        net = self.top if level == "top" else self.bottom
        return referenced_sum(references, level, net.grid, self.n_embed,
                              self.follow_top if level == "top" else self.follow_bottom)

    def forward(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor,
                references=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, K, h, w)`` and ``(B, K, 2h, 2w)`` of every code given what its row's half
        knows (what the coder uses), from one evaluation of each net."""
        return tuple(net(codes, self.condition_for(level, codes_top, references), self.logit_bias(level, references))
                     for (level, net), codes in zip(self.levels(), (codes_top, codes_bottom)))

    def nll_bits(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor,
                 references=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean bits per code of each level, every position at once (training and evaluation alike)."""
        logits_top, logits_bottom = self(codes_top, codes_bottom, references)
        return (F.cross_entropy(logits_top.float(), codes_top) / math.log(2),
                F.cross_entropy(logits_bottom.float(), codes_bottom) / math.log(2))

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` new code pairs, each grid drawn as it is coded: row by row, each row's even
        columns and then its odd ones (``top_p`` < 1: nucleus sampling); slices drawn alone."""
        grids = []
        for level, net in self.levels():
            device = net.head.weight.device
            codes = torch.zeros(n, *net.grid, dtype=torch.long, device=device)
            condition = self.condition_for(level, grids[0] if grids else None)
            bias = self.logit_bias(level)
            for i in range(net.grid[0]):
                for here in halves(net.grid[1]):
                    logits = net(codes, condition, bias)[:, :, i, here.to(device)]
                    drawn = draw(logits.permute(0, 2, 1).reshape(-1, self.n_embed), temperature, top_p, generator)
                    codes[:, i, here.to(device)] = drawn.reshape(n, -1)
            grids.append(codes)
        return grids[0], grids[1]
