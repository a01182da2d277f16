"""A prior over VQ-VAE-2 codes that codes each grid in a few parallel passes, built for integers.

A raster-order prior needs one network evaluation per code: 2,560 of them for a 256x128
slice, so coding is slow and serial. Here each grid is split into a few interleaved sets of
positions (:func:`pass_map`), coded one set after another; every code of a set is predicted at
once, from the codes of the sets before it (and, at the bottom level, from the whole top grid).
The sets refine dyadically over 4x4 tiles of the grid (as in checkerboard context models, He
et al. 2021, and multi-pass schedules such as M2T, Mentzer et al. 2023): one corner of every
4x4 tile first, then its centre, then the two remaining even corners, then the odd-odd
positions, then the other half (a checkerboard). With fewer passes the first sets merge: two
passes are the checkerboard.

The network is a plain stack of residual 3x3 convolutions and ReLUs over embeddings, with no
normalisation, attention or other non-linearity: everything a fixed-point copy
(:mod:`mrivq.compression.portable.passes`) can compute exactly in integers, so the probabilities that
drive the range coder are the same bit for bit on any machine.

Shapes: top codes ``(B, h, w)``, bottom codes ``(B, 2h, 2w)``, int64 in ``[0, n_embed)``;
logits ``(B, n_embed, rows, cols)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: The order of the positions of a 4x4 tile, ``DYADIC[r % 4][c % 4]``: 0 first, 4 last.
DYADIC = ((0, 4, 2, 4), (4, 3, 4, 3), (2, 4, 1, 4), (4, 3, 4, 3))
MAX_PASSES = 5
DILATIONS = (1, 2, 4)  # of the residual convolutions, in turn: a wide view in few layers
#: The neighbours whose codes a net with ``neighbour_codes`` is handed at each position, (row, col)
#: offsets: the four direct ones, then the four diagonal ones.
NEAR = ((0, -1), (0, 1), (-1, 0), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1))
#: A net that also learnt random masks (``masks``) marks how much of its grid is known by one of
#: this many embeddings (the known share, in eighths), where a pass net marks the pass.
MASK_BUCKETS = 8
#: The steps in which a net that learnt random masks draws its grid, the most confident codes
#: first, and the weight of the Gumbel noise on that confidence at the first step (falling to 0).
DRAW_STEPS, DRAW_NOISE = 8, 4.5


def pass_map(grid: tuple[int, int], passes: int) -> torch.Tensor:
    """``(rows, cols)`` int64: the pass (``0 .. passes - 1``) in which each position is coded.

    Example::

        >>> pass_map((4, 4), 2).tolist()
        [[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]
    """
    if not 1 <= passes <= MAX_PASSES:
        raise ValueError(f"passes must be 1 to {MAX_PASSES}, not {passes}")
    rows, cols = grid
    # on the CPU even while a model is built on the meta device (where indexing runs through
    # torch's Python decompositions, whose first use imports torch._dynamo: a second)
    tile = torch.tensor(DYADIC, device="cpu")
    order = tile[torch.arange(rows, device="cpu")[:, None] % 4, torch.arange(cols, device="cpu")[None, :] % 4]
    return (order - (MAX_PASSES - passes)).clamp(min=0)


def near_rows(codes: torch.Tensor, known: torch.Tensor, n_embed: int, offsets=NEAR) -> torch.Tensor:
    """``(B, len(offsets), rows, cols)`` int64: the row of a neighbour table for each position's
    neighbour at each of the (row, col) ``offsets`` (:data:`NEAR`), ``offset * (n_embed + 1) + code``
    where that code is ``known`` (a bool grid, broadcast over ``codes`` ``(B, rows, cols)``),
    ``code = n_embed`` where it is not or lies outside the grid. Integer indexing only: the float
    prior and its integer copy use it alike."""
    reach = max(max(abs(dr), abs(dc)) for dr, dc in offsets)
    codes = F.pad(torch.where(known, codes, n_embed), (reach,) * 4, value=n_embed)
    rows, cols = codes.shape[1] - 2 * reach, codes.shape[2] - 2 * reach
    return torch.stack([codes[:, reach + dr:reach + dr + rows, reach + dc:reach + dc + cols] + i * (n_embed + 1)
                        for i, (dr, dc) in enumerate(offsets)], 1)


class PassNet(nn.Module):
    """Logits of every position of one grid given the codes of the passes before one pass.

    The input at each position is the embedding of its code where it is known (an "unknown"
    embedding elsewhere), plus the embedding of the pass being predicted, its row and column
    embeddings and, when given, the condition; then residual 3x3 convolutions, ReLU, and a 1x1
    convolution to the logits; with ``head_channels``, first a 1x1 convolution to that many
    features and a ReLU (logits of more shapes than ``channels`` features span, at the pass's
    positions only).

    With ``neighbour_codes``, each position is also handed the codes of its eight nearest
    neighbours (:data:`NEAR`) that are known before the pass: each offset's own embedding added to
    the input, and each offset's own table of log-odds added to the logits (a neighbour's code
    says much of this one's, and an n_embed-way map of a code onto itself is what a few dozen channels
    cannot hold; the volume prior's ``follow`` tables do the same across slices).

    With ``masks`` > 0 the net also learns, that share of its training steps, to predict the
    unknown codes of a random mask (MaskGIT's schedule, Chang et al. 2022), so that it can draw
    its grid in many small steps (:func:`draw_in_steps`) rather than in its coding passes, whose
    first sees no code at all. Its input then marks the known share of the grid
    (:data:`MASK_BUCKETS`) instead of the pass; for coding, each pass's share is one fixed row, so
    its integer copy is that of a pass net. Wherever a method takes ``step`` (the pass of each
    grid, ``(B,)``), such a net also takes a pair from :meth:`masked`.
    """

    def __init__(self, n_embed: int, grid: tuple[int, int], channels: int, layers: int, passes: int,
                 head_channels: int = 0, neighbour_codes: bool = False, masks: float = 0.0) -> None:
        super().__init__()
        self.n_embed, self.grid, self.passes = n_embed, (int(grid[0]), int(grid[1])), passes
        self.masks = float(masks)
        self.code = nn.Embedding(n_embed + 1, channels)  # index n_embed: unknown
        self.step = nn.Embedding(MASK_BUCKETS if self.masks else passes, channels)
        self.row = nn.Embedding(self.grid[0], channels)
        self.col = nn.Embedding(self.grid[1], channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in
            (DILATIONS[i % len(DILATIONS)] for i in range(layers)))
        self.widen = nn.Conv2d(channels, head_channels, 1) if head_channels else None
        self.head = nn.Conv2d(head_channels or channels, n_embed, 1)
        self.near = self.near_follow = None
        if neighbour_codes:
            self.near = nn.Embedding(len(NEAR) * (n_embed + 1), channels)
            self.near_follow = nn.Embedding(len(NEAR) * (n_embed + 1), n_embed)
            nn.init.zeros_(self.near_follow.weight)
        self.register_buffer("order", pass_map(self.grid, passes), persistent=False)
        rows = torch.arange(passes, device="cpu")  # each pass's row of ``step``: its own, or its known share's
        if self.masks:
            rows = self.masked(self.order[None] < rows[:, None, None])[1]
        self.register_buffer("pass_row", rows, persistent=False)

    def masked(self, known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the methods take as ``step`` for the codes ``known`` ``(B, rows, cols)`` bool of a
        net that learnt masks: the mask and the row of ``step`` of its known share."""
        share = known.flatten(1).sum(1) * MASK_BUCKETS // known[0].numel()
        return known, share.clamp(max=MASK_BUCKETS - 1)

    def seen(self, step) -> tuple[torch.Tensor, torch.Tensor]:
        """``(known (B, rows, cols) bool, rows of step (B,))`` of ``step``: passes ``(B,)`` (the codes
        of the passes before each), or a pair from :meth:`masked`, returned as it is."""
        if isinstance(step, tuple):
            return step
        return self.order[None] < step[:, None, None], self.pass_row[step]

    def near_rows(self, codes: torch.Tensor, step) -> torch.Tensor | None:
        """:func:`near_rows` of the codes known before pass ``step`` ``(B,)``, or None without
        ``neighbour_codes``."""
        if self.near is None:
            return None
        return near_rows(codes, self.seen(step)[0], self.n_embed)

    def inputs(self, codes: torch.Tensor, step) -> torch.Tensor:
        """``(B, channels, rows, cols)``: embeddings of the codes known before pass ``step`` ``(B,)``."""
        known, row = self.seen(step)
        x = self.code(torch.where(known, codes, self.n_embed)) + self.step(row)[:, None, None, :]
        x = x + self.row.weight[None, :, None, :] + self.col.weight[None, None, :, :]
        near = self.near_rows(codes, step)
        if near is not None:
            x = x + _bag(near, self.near.weight)
        return x.permute(0, 3, 1, 2)

    def near_bias(self, codes: torch.Tensor, step, here: torch.Tensor | None = None):
        """What the neighbours' tables of log-odds add to the logits: ``(B, n_embed, rows, cols)``,
        or ``(B, n_embed, P)`` at the positions ``here`` (a flat bool mask); None without them."""
        near = self.near_rows(codes, step)
        if near is None:
            return None
        near = near.flatten(2) if here is None else near.flatten(2)[:, :, here]
        bias = _bag(near, self.near_follow.weight).transpose(1, 2)
        return bias if here is not None else bias.reshape(len(codes), -1, *codes.shape[1:])

    def features(self, codes: torch.Tensor, step, condition: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, channels, rows, cols)``: what the head (or its ``widen``) reads."""
        x = self.inputs(codes, step)
        if condition is not None:
            x = x + condition
        for conv in self.convs:
            x = x + conv(F.relu(x))
        return F.relu(x)

    def forward(self, codes: torch.Tensor, step, condition: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, n_embed, rows, cols)`` (plus ``bias`` of that shape, when given)."""
        x = self.features(codes, step, condition)
        logits = self.logits_of(x.flatten(2)).view(len(x), -1, *x.shape[2:])
        for term in (bias, self.near_bias(codes, step)):
            logits = logits if term is None else logits + term
        return logits

    def logits_at(self, codes: torch.Tensor, step, condition: torch.Tensor | None,
                  here: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, P, n_embed)``: the logits at the ``P`` positions ``here`` (a flat bool mask) only."""
        logits = self.logits_of(self.features(codes, step, condition).flatten(2)[:, :, here])
        for term in (None if bias is None else bias.flatten(2)[:, :, here], self.near_bias(codes, step, here)):
            logits = logits if term is None else logits + term
        return logits.transpose(1, 2)

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_embed, N)`` of features ``(B, channels, N)``: the ``widen`` and its ReLU
        where there is one, then the head (both 1x1 convolutions)."""
        if self.widen is not None:
            x = F.relu(F.conv1d(x, self.widen.weight[..., 0], self.widen.bias))
        return F.conv1d(x, self.head.weight[..., 0], self.head.bias)


def _bag(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The sum over dimension 1 of ``weight``'s rows at ``rows`` ``(B, n, *rest)``: ``(B, *rest, D)``."""
    moved = rows.movedim(1, -1)
    return F.embedding_bag(moved.reshape(-1, rows.shape[1]), weight, mode="sum").view(*moved.shape[:-1], -1)


class TopFeatures(nn.Module):
    """Top codes ``(B, h, w)`` -> features ``(B, channels, 2h, 2w)`` for the bottom grid: an
    embedding and residual 3x3 convolutions at the top grid's size; then, with ``shuffle``, a 1x1
    convolution to four features per top position, one for each of its 2x2 bottom positions
    (depth to space, as sub-pixel convolution does), else each feature repeated over the four.

    The four features of their own cost a 1x1 convolution at a quarter of the bottom grid's
    positions, and save 1 % of the bits of a slice coded alone (nothing measurable where a
    volume prior's slices lean on their neighbours; docs/compression.md).
    """

    def __init__(self, n_embed: int, channels: int, layers: int, shuffle: bool = False) -> None:
        super().__init__()
        self.code = nn.Embedding(n_embed, channels)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers))
        self.out = nn.Conv2d(channels, 4 * channels, 1) if shuffle else None

    def forward(self, codes_top: torch.Tensor) -> torch.Tensor:
        x = self.code(codes_top).permute(0, 3, 1, 2)
        for conv in self.convs:
            x = x + conv(F.relu(x))
        return self.upsample(x)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """The top-grid features ``(B, channels, h, w)`` over the bottom grid ``(B, channels, 2h, 2w)``."""
        if self.out is not None:
            return F.pixel_shuffle(self.out(F.relu(x)), 2)
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


class PassPrior(nn.Module):
    """``p(top) p(bottom | top)``, each grid coded in ``passes_*`` parallel passes.

    The sizes are ``prior.passes.*`` in the config (``condition_layers``: ``condition_blocks``),
    whose defaults they share. ``top_masks``: the top net's :class:`PassNet` ``masks``.

    Example:
        >>> prior = PassPrior(32, (8, 4), channels=16, layers=2)
        >>> top, bottom = prior.sample(3)
        >>> top.shape, bottom.shape
        (torch.Size([3, 8, 4]), torch.Size([3, 16, 8]))
    """

    def __init__(self, n_embed: int, top_grid: tuple[int, int], *, channels: int = 64, layers: int = 6,
                 condition_layers: int = 2, passes_top: int = 3, passes_bottom: int = 2,
                 condition_shuffle: bool = True, head_channels: int = 256, neighbour_codes: bool = False,
                 top_masks: float = 0.5) -> None:
        super().__init__()
        self.sizes = {"channels": channels, "layers": layers, "condition_layers": condition_layers,
                      "passes_top": passes_top, "passes_bottom": passes_bottom,
                      "condition_shuffle": condition_shuffle, "head_channels": head_channels,
                      "neighbour_codes": neighbour_codes, "top_masks": top_masks}
        self.n_embed = n_embed
        self.top_grid = (int(top_grid[0]), int(top_grid[1]))
        self.bottom_grid = (2 * self.top_grid[0], 2 * self.top_grid[1])
        self.top = PassNet(n_embed, self.top_grid, channels, layers, passes_top, head_channels, neighbour_codes,
                           top_masks)
        self.condition = TopFeatures(n_embed, channels, condition_layers, condition_shuffle)
        self.bottom = PassNet(n_embed, self.bottom_grid, channels, layers, passes_bottom, head_channels,
                              neighbour_codes)
        self.integer = None  # the integer copy that codes (mrivq.compression.portable.passes), once made or loaded

    kind = "passes"  # its entry in mrivq.compression.priors

    def fresh(self) -> PassPrior:
        """A newly initialised prior of the same sizes (what its integer copy is checked against),
        drawn without touching the global random state."""
        with torch.random.fork_rng(devices=[]):
            return type(self)(self.n_embed, self.top_grid, **self.sizes)

    def levels(self):
        return (("top", self.top), ("bottom", self.bottom))

    def condition_for(self, level: str, codes_top: torch.Tensor | None, references=None) -> torch.Tensor | None:
        """What ``level``'s net adds to its inputs ``(B, channels, rows, cols)``: nothing for the
        top grid, the top grid's features for the bottom (``references``: for a volume prior)."""
        return self.condition(codes_top) if level == "bottom" else None

    def logit_bias(self, level: str, references=None) -> torch.Tensor | None:
        """What ``level``'s logits get added ``(B, K, rows, cols)``: nothing here (a volume prior's
        table of the code at the same place of the slice before)."""
        return None

    def _inputs(self, level: str, codes_top: torch.Tensor | None, references) -> tuple:
        return self.condition_for(level, codes_top, references), self.logit_bias(level, references)

    def forward(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor,
                references=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, K, h, w)`` and ``(B, K, 2h, 2w)`` of every code given the codes of the passes
        before its own (what the coder uses): one evaluation of each net per pass."""
        return (_all_passes(self.top, codes_top, *self._inputs("top", codes_top, references)),
                _all_passes(self.bottom, codes_bottom, *self._inputs("bottom", codes_top, references)))

    def nll_bits(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor,
                 references=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean bits per code of each level. Training (``self.training``): each grid predicts the
        codes of one pass drawn with the probability of its share of the grid, an unbiased estimate
        at one evaluation per level (for a top net that learns masks, ``top_masks`` of the time a
        random mask's unknown codes instead, of a slice drawn alone, as samples are); otherwise the
        exact figure over every pass."""
        if not self.training:
            logits_top, logits_bottom = self(codes_top, codes_bottom, references)
            return (F.cross_entropy(logits_top.float(), codes_top) / math.log(2),
                    F.cross_entropy(logits_bottom.float(), codes_bottom) / math.log(2))
        return (_one_pass_bits(self.top, codes_top, *self._inputs("top", codes_top, references),
                               alone=self._inputs("top", None, None)),
                _one_pass_bits(self.bottom, codes_bottom, *self._inputs("bottom", codes_top, references)))

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` new code pairs, each grid drawn pass by pass (``top_p`` < 1: nucleus sampling), or
        in :data:`DRAW_STEPS` steps where its net learnt masks (:func:`draw_in_steps`)."""
        grids = []
        for name, net in self.levels():
            inputs = self._inputs(name, grids[0] if grids else None, None)
            drawing = draw_in_steps if net.masks else draw_in_passes
            grids.append(drawing(net, n, *inputs, temperature=temperature, top_p=top_p, generator=generator))
        return grids[0], grids[1]


class VolumePrior(PassPrior):
    """A pass prior over the codes of a slice given those of two slices it is coded after, the
    one before it and the one after it in its volume (:func:`mrivq.data.volumes.references`):
    ``p(top | refs) p(bottom | top, refs)``. Each net also adds, at every position, the embedding
    of the code at the same place of each reference (its own grid's; "none" where a slice has no
    such reference), so its convolutions see their neighbourhoods; and its logits get those
    codes' rows of a learnt table of log-odds (``follow_*``: what a count model of the pairs
    would hold; the nets alone would need many channels to map every code onto itself).

    ``references``: ``(codes_top (B, 2, h, w), codes_bottom (B, 2, 2h, 2w))``, the slice before
    and the slice after, int64 with -1 where a slice has none; None: none has (key slices, and
    sampling). ``key_every``: the coder's key slices come every ``key_every`` slices of a run.

    Example:
        >>> prior = VolumePrior(32, (8, 4), channels=16, layers=2)
        >>> top, bottom = prior.sample(2)
        >>> refs = (torch.stack([top, top], 1), torch.stack([bottom, -torch.ones_like(bottom)], 1))
        >>> prior.nll_bits(top, bottom, refs)[0].shape
        torch.Size([])
    """

    kind = "volume"
    SLOTS = 2  # the slice before, the slice after

    def __init__(self, n_embed: int, top_grid: tuple[int, int], *, key_every: int = 8, **sizes) -> None:
        super().__init__(n_embed, top_grid, **sizes)
        self.key_every = self.sizes["key_every"] = key_every
        channels = self.sizes["channels"]
        # one table per level and use, rows slot * (n_embed + 1) + code; code n_embed: none
        rows = self.SLOTS * (n_embed + 1)
        self.seen_top, self.seen_bottom = nn.Embedding(rows, channels), nn.Embedding(rows, channels)
        self.follow_top, self.follow_bottom = nn.Embedding(rows, n_embed), nn.Embedding(rows, n_embed)
        for follow in (self.follow_top, self.follow_bottom):
            nn.init.zeros_(follow.weight)

    def _referenced(self, level: str, references, table: nn.Embedding) -> torch.Tensor:
        return referenced_sum(references, level, (self.top if level == "top" else self.bottom).grid, self.n_embed,
                              table)

    def logit_bias(self, level: str, references=None) -> torch.Tensor:
        return self._referenced(level, references, self.follow_top if level == "top" else self.follow_bottom)

    def condition_for(self, level: str, codes_top: torch.Tensor | None, references=None) -> torch.Tensor | None:
        seen = self._referenced(level, references, self.seen_top if level == "top" else self.seen_bottom)
        own = super().condition_for(level, codes_top)
        return seen if own is None else own + seen


def referenced_sum(references, level: str, grid: tuple[int, int], n_embed: int, table: nn.Embedding,
                   slots: int = 2) -> torch.Tensor:
    """The sum of ``table``'s rows ``slot * (n_embed + 1) + code`` of the codes of ``level``'s grid
    (``rows, cols``) in the ``slots`` references (``references`` as :class:`VolumePrior` takes them;
    code ``n_embed`` where a slice has none, and for every slot where ``references`` is None):
    ``(B or 1, D, rows, cols)``."""
    slot = (n_embed + 1) * torch.arange(slots, device=table.weight.device)
    if references is None:
        return table.weight[slot + n_embed].sum(0)[None, :, None, None].expand(1, -1, *grid)
    codes = references[0 if level == "top" else 1].reshape(-1, slots, *grid)
    rows = torch.where(codes < 0, n_embed, codes) + slot[None, :, None, None]
    return table(rows).sum(1).permute(0, 3, 1, 2)


def referenced_grids(refs: torch.Tensor, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> tuple:
    """What a :class:`VolumePrior` takes as ``references``: the grids of ``codes_top`` ``(N, h, w)``
    and ``codes_bottom`` ``(N, 2h, 2w)`` at the indices ``refs`` ``(B, 2)``, -1 grids where an index is -1:
    ``((B, 2, h, w), (B, 2, 2h, 2w))`` int64."""
    refs = torch.as_tensor(refs, dtype=torch.long)
    keep = (refs >= 0)[:, :, None, None]
    return tuple(torch.where(keep, grids[refs.clamp(min=0)].long(), -1) for grids in (codes_top, codes_bottom))


#: Nucleus sampling looks first among this many most probable codes of each position, and sorts
#: all of them only where those hold less than ``top_p`` of the probability.
NUCLEUS_CANDIDATES = 64


class NonFiniteProbabilities(ValueError):
    """A prior gave NaN or Inf probabilities: its weights are damaged (finite, but overflowing)."""


def draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One code per row of ``logits`` ``(rows, K)`` (both priors sample through it): softmax at
    ``temperature``, then :func:`_draw`; NaN or Inf anywhere is refused."""
    probs = torch.softmax(logits.float() / temperature, dim=1)
    if not torch.isfinite(probs.sum()):  # a NaN or Inf anywhere (probabilities cannot overflow a sum)
        raise NonFiniteProbabilities("the prior's probabilities hold NaN or Inf (damaged weights)")
    return _draw(probs, top_p, generator)


def _draw(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One code per row of ``probs`` ``(rows, K)``, from the most probable codes that together hold
    at least ``top_p`` of the probability (nucleus sampling; all of them at 1): a uniform draw
    located in the cumulative sums of the candidates, most probable first."""
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device)
    if top_p >= 1:
        cumulative = probs.cumsum(dim=-1)
        return torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]
    ordered, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    limit = top_p * probs.sum(dim=-1, keepdim=True)  # the nucleus's probability
    drawn = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    wide = ordered.sum(dim=-1) < limit[:, 0]  # the nucleus reaches past the candidates
    if wide.any():
        drawn[wide] = _draw_in_order(*probs[wide].sort(dim=-1, descending=True), limit[wide], u[wide])
    drawn[~wide] = _draw_in_order(ordered[~wide], order[~wide], limit[~wide], u[~wide])
    return drawn


def _draw_in_order(ordered: torch.Tensor, order: torch.Tensor, limit: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`_draw` among candidates ``ordered`` (most probable first, codes ``order``): those
    before which less than ``limit`` of the probability lies."""
    ordered = ordered.masked_fill(ordered.cumsum(dim=-1) - ordered >= limit, 0)
    cumulative = ordered.cumsum(dim=-1)
    index = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True).clamp_(max=ordered.shape[-1] - 1)
    return order.gather(-1, index)[:, 0]


def draw_in_passes(net: PassNet, n: int, condition: torch.Tensor | None, bias: torch.Tensor | None, *,
                   temperature: float, top_p, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` grids ``(n, rows, cols)`` drawn as they are coded: pass by pass, every position of a
    pass at once (only those are evaluated); ``top_p``: one setting, or a sequence of one per pass."""
    device = net.head.weight.device
    codes = torch.zeros(n, *net.grid, dtype=torch.long, device=device)
    settings = top_p if isinstance(top_p, (list, tuple)) else [top_p] * net.passes
    for step, setting in zip(range(net.passes), settings, strict=True):
        here = (net.order == step).flatten()
        logits = net.logits_at(codes, torch.full((n,), step, device=device), condition, here, bias)
        drawn = draw(logits.reshape(-1, net.n_embed), temperature, setting, generator).reshape(n, -1)
        codes = codes.flatten(1).index_put((torch.arange(n, device=device)[:, None],
                                            here.nonzero()[:, 0][None]), drawn).reshape(n, *net.grid)
    return codes


def draw_in_steps(net: PassNet, n: int, condition: torch.Tensor | None, bias: torch.Tensor | None, *,
                  temperature: float, top_p: float, generator: torch.Generator | None,
                  steps: int = DRAW_STEPS) -> torch.Tensor:
    """``n`` grids ``(n, rows, cols)`` of a net that learnt masks, drawn in ``steps`` steps: each
    draws every unknown code and keeps the most confident (log-probability plus Gumbel noise of
    weight :data:`DRAW_NOISE` falling to 0) until cos(pi t / 2 steps) of the grid is unknown."""
    device = net.head.weight.device
    codes = torch.zeros(n, *net.grid, dtype=torch.long, device=device)
    known, size = torch.zeros(n, *net.grid, dtype=torch.bool, device=device), codes[0].numel()
    for t in range(1, steps + 1):
        logits = net(codes, net.masked(known), condition, bias).float().permute(0, 2, 3, 1).reshape(-1, net.n_embed)
        drawn = draw(logits, temperature, top_p, generator)
        confidence = torch.log_softmax(logits / temperature, 1).gather(1, drawn[:, None]).reshape(n, -1)
        uniform = torch.rand(n, size, generator=generator, device=device).clamp(1e-9, 1 - 1e-9)
        confidence = confidence - DRAW_NOISE * (1 - t / steps) * torch.log(-torch.log(uniform))
        confidence = confidence.masked_fill(known.flatten(1), -math.inf)
        keep = int((~known[0]).sum()) - math.floor(size * math.cos(math.pi / 2 * t / steps))
        chosen = torch.zeros(n, size, dtype=torch.bool, device=device)
        chosen = chosen.scatter(1, confidence.topk(keep, dim=1).indices, True).reshape(n, *net.grid)
        codes, known = torch.where(chosen, drawn.reshape(n, *net.grid), codes), known | chosen
    return codes


def _all_passes(net: PassNet, codes: torch.Tensor, condition: torch.Tensor | None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Each position's logits from the evaluation of ``net`` for its own pass."""
    out = None
    for step in range(net.passes):
        logits = net(codes, torch.full((len(codes),), step, device=codes.device), condition, bias)
        out = logits if out is None else torch.where((net.order == step)[None, None], logits, out)
    return out


def _one_pass_bits(net: PassNet, codes: torch.Tensor, condition: torch.Tensor | None,
                   bias: torch.Tensor | None = None, alone: tuple | None = None) -> torch.Tensor:
    """Mean bits per code at the positions of one random pass per grid, drawn by the pass's share
    of the grid (so the mean over draws is the mean over every position); for a net that learns
    masks, a ``net.masks`` share of the grids predict the unknown codes of a random mask instead
    (cos(pi r / 2) of the grid unknown, r uniform), given ``alone``'s ``(condition, bias)`` (those
    of a grid with no slice beside it) where it has them."""
    n, device = len(codes), codes.device
    counts = torch.bincount(net.order.flatten(), minlength=net.passes).float()
    step = torch.multinomial(counts, n, replacement=True).to(device)
    here = net.order[None] == step[:, None, None]
    if net.masks:
        share = torch.cos(torch.rand(n, device=device) * math.pi / 2)  # of the grid unknown
        unknown = torch.rand(n, *net.grid, device=device) < share[:, None, None]
        random = (torch.rand(n, device=device) < net.masks)[:, None, None]
        here = torch.where(random, unknown, here)
        step = net.masked(torch.where(random, ~unknown, net.seen(step)[0]))
        condition, bias = (term if term is None or lone is None else torch.where(random[:, None], lone, term)
                           for term, lone in zip((condition, bias), alone or (None, None)))
    logits = net(codes, step, condition, bias)
    nats = F.cross_entropy(logits.float(), codes, reduction="none")  # (B, rows, cols)
    here = here.float()
    return (nats * here).sum() / here.sum().clamp(min=1) / math.log(2)
