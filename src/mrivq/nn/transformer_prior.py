"""Autoregressive priors over VQ-VAE-2 codes: one over the top grid, one over the bottom grid given the top.

VQ-VAE-2 (Razavi et al. 2019) fits a PixelSNAIL to the top codes and a conditional
PixelCNN to the bottom codes. Here each level is a decoder-only causal transformer over the
code grid in raster order (row by row): like PixelSNAIL, every position attends to the whole
past, not to a fixed receptive field, and a learned row + column embedding tells it where
it is in 2-D. Unlike a PixelCNN, sampling needs no full forward pass per position: each
attention layer keeps the keys and values of the positions already sampled (a KV cache),
so generating position ``t`` costs one token's worth of work plus attention over ``t`` cached
entries.

The bottom grid is 4x longer than the top (2048 positions for 256x128 slices), and full
attention over it costs ``O(L^2)``; its attention can be limited to a window of the last few
code rows (``prior.transformer.bottom_window_rows``), computed chunk by chunk in ``O(L x window)``. The
global layout still reaches every bottom position through the top-code condition, as in
VQ-VAE-2, whose bottom prior has a local receptive field too.

Besides attention, each position is handed the codes of its nearest causal neighbours on the
grid directly (``NEIGHBOURS``: left, two left, the three above, two above; a learned "outside"
code beyond the edges), each through its own embedding and summed into the input. Attention
with absolute row + column embeddings can find the code above by itself, but slowly: with the
neighbours given, the prior learns the grid's local structure in far fewer steps (validation
NLL on the phantom at step 500: 3.33 bits per code with them, 3.58 without).

Conditioning of the bottom prior on the top codes: the whole top grid is known when the
bottom is generated, so it is embedded and passed through non-causal residual convolutions,
upsampled to the bottom grid (x2) and added to the bottom tokens' inputs position by
position.

Shapes: top codes ``(B, h, w)``, bottom codes ``(B, 2h, 2w)``, int64 in ``[0, n_embed)``;
logits ``(B, n_embed, rows, cols)``. Grid shapes come from the VQ-VAE's codes, never from
constants here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mrivq.nn.layers import ResBlock
from mrivq.nn.pass_prior import draw


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention over ``(B, T, d_model)``; causal in training, cached in sampling."""

    def __init__(self, d_model: int, n_head: int, window: int | None = None) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.window = window  # attend to the last `window` positions (itself included); None: all

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                position: int = 0) -> torch.Tensor:
        """``x`` ``(B, T, C)`` -> ``(B, T, C)``.

        With ``cache = (keys, values)``, each ``(B, n_head, L, C / n_head)``, ``x`` holds the
        tokens at ``position, ..., position + T - 1`` (any chunk after the positions already
        cached); their keys and values are stored there and each attends to the cached keys up to
        itself (within the window), exactly as in the full pass.
        """
        batch, length, channels = x.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2)
                   for t in self.qkv(x).split(channels, dim=2))
        if cache is not None:
            keys, values = cache
            end = position + length
            keys[:, :, position:end] = k
            values[:, :, position:end] = v
            # The oldest key the chunk's first query may see; each query sees keys up to itself.
            start = 0 if self.window is None else max(0, position + 1 - self.window)
            mask = None
            if length > 1:  # SDPA's is_causal aligns top-left: wrong for a chunk after position 0
                query_at = torch.arange(position, end, device=x.device)[:, None]
                key_at = torch.arange(start, end, device=x.device)[None, :]
                mask = key_at <= query_at
                if self.window is not None:
                    mask &= key_at > query_at - self.window
            y = F.scaled_dot_product_attention(q, keys[:, :, start:end], values[:, :, start:end], attn_mask=mask)
        elif self.window is None or self.window >= length:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = _sliding_window_attention(q, k, v, self.window)
        return self.proj(y.transpose(1, 2).reshape(batch, length, channels))


def _sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of each position to the last ``window`` positions (itself included).

    ``q, k, v``: ``(B, H, L, D)``. The sequence is cut into chunks of ``window``; each chunk's
    queries see the keys of the chunk before and their own, masked to the window, so the cost
    is ``O(L * window)`` instead of ``O(L^2)``.
    """
    batch, heads, length, dim = q.shape
    pad = -length % window
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    n = (length + pad) // window
    q, k, v = (t.reshape(batch, heads, n, window, dim) for t in (q, k, v))
    # Each chunk's keys and values next to those of the chunk before it (zeros before the first).
    k = torch.cat([F.pad(k, (0, 0, 0, 0, 1, 0))[:, :, :-1], k], dim=3)  # (B, H, n, 2W, D)
    v = torch.cat([F.pad(v, (0, 0, 0, 0, 1, 0))[:, :, :-1], v], dim=3)
    query = torch.arange(window, device=q.device)[:, None]
    key = torch.arange(2 * window, device=q.device)[None, :]
    mask = (key > query) & (key <= query + window)  # key within (query - window, query]
    mask = mask.expand(n, window, 2 * window).clone()
    mask[0, :, :window] = False  # nothing before the first chunk
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.reshape(batch, heads, n * window, dim)[:, :, :length]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``; ``(B, T, C)``."""

    def __init__(self, d_model: int, n_head: int, dropout: float, window: int | None = None) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        # Dropout on the residual branches only: dropout of the attention weights keeps the CPU
        # off its fused attention kernels and its masks were a fifth of a step's time.
        self.attn = CausalSelfAttention(d_model, n_head, window)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache=None, position: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), cache, position))
        return x + self.mlp(self.ln_mlp(x))


#: ``(row, column)`` offsets of the codes each position is given directly, all before it in
#: raster order: left, two left, above left, above, above right, two above.
NEIGHBOURS = ((0, -1), (0, -2), (-1, -1), (-1, 0), (-1, 1), (-2, 0))


def neighbour_index(grid: tuple[int, int]) -> torch.Tensor:
    """``(rows x cols, len(NEIGHBOURS))`` raster indices of each position's neighbours; -1 where a
    neighbour lies outside the grid. On the CPU even while a model is built on the meta device
    (as :func:`mrivq.nn.pass_prior.pass_map`)."""
    rows, cols = grid
    r = torch.arange(rows, device="cpu")[:, None, None]
    c = torch.arange(cols, device="cpu")[None, :, None]
    dr = torch.tensor([o[0] for o in NEIGHBOURS], device="cpu")
    dc = torch.tensor([o[1] for o in NEIGHBOURS], device="cpu")
    nr, nc = r + dr, c + dc  # (rows, cols, n)
    inside = (nr >= 0) & (nr < rows) & (nc >= 0) & (nc < cols)
    return torch.where(inside, nr * cols + nc, -1).reshape(rows * cols, len(NEIGHBOURS))


class CodeTransformer(nn.Module):
    """Causal transformer over one ``(rows, cols)`` grid of codes in raster order.

    The input at position ``t`` is the embedding of code ``t - 1`` (a learned start token at
    ``t = 0``) plus, with ``neighbours``, the embeddings of the codes at ``NEIGHBOURS`` around
    ``t`` plus the row and column embeddings of ``t`` plus, when given, the condition at ``t``;
    the output at ``t`` is the logits of code ``t``.
    """

    def __init__(self, n_embed: int, grid: tuple[int, int], d_model: int, n_head: int,
                 n_layer: int, dropout: float, window_rows: int | None = None, neighbours: bool = True) -> None:
        super().__init__()
        self.n_embed = n_embed
        self.grid = (int(grid[0]), int(grid[1]))
        self.length = self.grid[0] * self.grid[1]
        self.n_head, self.d_model = n_head, d_model
        self.token = nn.Embedding(n_embed + 1, d_model)  # index n_embed: the start token
        self.neighbour = None
        if neighbours:
            # One table for all offsets: row o * (n_embed + 1) + code; code n_embed is "outside".
            self.neighbour = nn.Embedding(len(NEIGHBOURS) * (n_embed + 1), d_model)
            self.register_buffer("neighbour_at", neighbour_index(self.grid), persistent=False)
            self.register_buffer("neighbour_row", torch.arange(len(NEIGHBOURS), device="cpu") * (n_embed + 1),
                                 persistent=False)
        self.row = nn.Embedding(self.grid[0], d_model)
        self.col = nn.Embedding(self.grid[1], d_model)
        self.drop = nn.Dropout(dropout)
        self.window = None if window_rows is None else window_rows * self.grid[1]
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout, self.window) for _ in range(n_layer))
        self.ln_out = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_embed)
        self.apply(_init_weights)

    def positions(self) -> torch.Tensor:
        """``(L, d_model)`` row + column embeddings in raster order."""
        rows = self.row.weight[:, None, :].expand(*self.grid, -1)
        cols = self.col.weight[None, :, :].expand(*self.grid, -1)
        return (rows + cols).reshape(self.length, -1)

    def inputs(self, flat: torch.Tensor, position: int, length: int) -> torch.Tensor:
        """Token (+ neighbour) + position embeddings ``(B, length, d_model)`` of positions
        ``position .. position + length - 1``, from ``flat`` ``(B, L)``, which must hold every
        code before the last of them (later entries are not read)."""
        span = slice(position, position + length)
        before = torch.arange(position - 1, position + length - 1, device=flat.device)  # -1: the start
        x = self.token(self._codes_at(flat, before)) + self.positions()[span]
        if self.neighbour is not None:
            codes = self._codes_at(flat, self.neighbour_at[span])  # (B, length, n)
            x = x + self.neighbour(codes + self.neighbour_row).sum(dim=2)
        return x

    def _codes_at(self, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``flat[:, index]``, with ``n_embed`` (the start / outside code) where ``index`` is -1."""
        return torch.where(index >= 0, flat[:, index.clamp(min=0)], self.n_embed)

    def forward(self, codes: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits: ``codes`` ``(B, rows, cols)`` -> ``(B, n_embed, rows, cols)``.

        ``condition``: ``(B, d_model, rows, cols)`` or None.
        """
        batch = codes.shape[0]
        x = self.inputs(codes.reshape(batch, self.length), 0, self.length)
        if condition is not None:
            x = x + condition.flatten(2).transpose(1, 2)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_out(x))  # (B, L, K)
        return logits.transpose(1, 2).reshape(batch, self.n_embed, *self.grid)

    def new_cache(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Empty key/value caches for ``n`` grids, one ``(keys, values)`` pair per layer."""
        device = self.head.weight.device
        shape = (n, self.n_head, self.length, self.d_model // self.n_head)
        return [(torch.zeros(shape, device=device), torch.zeros(shape, device=device)) for _ in self.blocks]

    def cached_logits(self, codes: torch.Tensor, position: int, cache: list,
                      condition: torch.Tensor | None = None, length: int = 1) -> torch.Tensor:
        """Logits of positions ``position .. position + length - 1`` through the KV cache.

        ``codes`` ``(n, rows x cols)``: the grids in raster order, known at least up to the
        position before the last of those (later entries are not read); every position before
        ``position`` must be in ``cache`` already. ``condition``: ``(n, d_model, rows, cols)`` or
        None. Returns ``(n, length, n_embed)`` float32, equal (to rounding) to :meth:`forward`'s
        at those positions.
        """
        x = self.inputs(codes, position, length)
        if condition is not None:
            x = x + condition.flatten(2).transpose(1, 2)[:, position:position + length]
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, layer_cache, position)
        return self.head(self.ln_out(x)).float()

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, top_p: float = 1.0, condition: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` grids ``(n, rows, cols)`` int64, one position at a time with a KV cache.

        ``top_p`` < 1: nucleus sampling, each code drawn from the most probable codes that
        together hold at least ``top_p`` of the probability (at least the most probable one).
        """
        cache = self.new_cache(n)
        out = torch.zeros(n, self.length, dtype=torch.long, device=self.head.weight.device)
        for t in range(self.length):
            logits = self.cached_logits(out, t, cache, condition)[:, 0]
            out[:, t] = draw(logits, temperature, top_p, generator)
        return out.reshape(n, *self.grid)


class TopCondition(nn.Module):
    """Top codes ``(B, h, w)`` -> conditioning features ``(B, d_model, 2h, 2w)`` for the bottom prior."""

    def __init__(self, n_embed: int, d_model: int, n_blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_embed, d_model)
        self.blocks = nn.Sequential(*[ResBlock(d_model, d_model) for _ in range(n_blocks)])
        self.up = nn.ConvTranspose2d(d_model, d_model, 4, stride=2, padding=1)

    def forward(self, codes_top: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes_top).permute(0, 3, 1, 2)
        return self.up(self.blocks(x))


class TransformerPrior(nn.Module):
    """The VQ-VAE-2 prior: ``p(top) p(bottom | top)``.

    Args:
        n_embed: codes per level (the VQ-VAE's ``n_embed``).
        top_grid: ``(h, w)`` of the top codes; the bottom grid is ``(2h, 2w)``.
        d_model, n_head, n_layer_top, n_layer_bottom, condition_blocks, dropout: sizes
            (``prior.transformer.*`` in the config, whose defaults they share).
        bottom_window_rows: the bottom prior's attention sees this many code rows back
            (``rows x cols`` positions); None: the whole past. The top grid always sees it all.
        neighbours: give each position the codes at ``NEIGHBOURS`` directly (both levels);
            False: the prior of earlier mrivq versions, whose checkpoints still load.

    Example:
        >>> prior = TransformerPrior(32, (8, 4), d_model=16, n_head=2, n_layer_top=1, n_layer_bottom=1)
        >>> top, bottom = prior.sample(3)
        >>> top.shape, bottom.shape
        (torch.Size([3, 8, 4]), torch.Size([3, 16, 8]))
    """

    def __init__(self, n_embed: int, top_grid: tuple[int, int], *, d_model: int = 128, n_head: int = 4,
                 n_layer_top: int = 4, n_layer_bottom: int = 3, condition_blocks: int = 2,
                 dropout: float = 0.0, bottom_window_rows: int | None = 2, neighbours: bool = True) -> None:
        super().__init__()
        self.sizes = {"d_model": d_model, "n_head": n_head, "n_layer_top": n_layer_top, "n_layer_bottom": n_layer_bottom,
                      "condition_blocks": condition_blocks, "dropout": dropout,
                      "bottom_window_rows": bottom_window_rows, "neighbours": neighbours}
        self.n_embed = n_embed
        self.top_grid = (int(top_grid[0]), int(top_grid[1]))
        self.bottom_grid = (2 * self.top_grid[0], 2 * self.top_grid[1])
        self.top = CodeTransformer(n_embed, self.top_grid, d_model, n_head, n_layer_top, dropout,
                                   neighbours=neighbours)
        self.condition = TopCondition(n_embed, d_model, condition_blocks)
        self.bottom = CodeTransformer(n_embed, self.bottom_grid, d_model, n_head, n_layer_bottom, dropout,
                                      window_rows=bottom_window_rows, neighbours=neighbours)
        # the integer copy that codes (mrivq.compression.portable.transformer), once made or loaded; None in
        # priors saved before such copies existed, which cannot code (they still sample)
        self.integer = None

    kind = "transformer"  # its entry in mrivq.compression.priors

    def fresh(self) -> TransformerPrior:
        """A newly initialised prior of the same sizes (what its integer copy is checked against),
        drawn without touching the global random state."""
        with torch.random.fork_rng(devices=[]):
            return type(self)(self.n_embed, self.top_grid, **self.sizes)

    def forward(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced logits ``(B, K, h, w)`` and ``(B, K, 2h, 2w)``."""
        return self.top(codes_top), self.bottom(codes_bottom, self.condition(codes_top))

    def nll_bits(self, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean negative log-likelihood in bits per code of each level (two scalars)."""
        logits_top, logits_bottom = self(codes_top, codes_bottom)
        return (F.cross_entropy(logits_top.float(), codes_top) / math.log(2),
                F.cross_entropy(logits_bottom.float(), codes_bottom) / math.log(2))

    @torch.no_grad()
    def sample(self, n: int, *, temperature: float = 1.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` new code pairs: ``(n, h, w)`` and ``(n, 2h, 2w)`` int64 in ``[0, n_embed)``
        (``temperature`` and ``top_p`` as in :meth:`CodeTransformer.sample`, at both levels)."""
        top = self.top.sample(n, temperature=temperature, top_p=top_p, generator=generator)
        bottom = self.bottom.sample(n, temperature=temperature, top_p=top_p, condition=self.condition(top),
                                    generator=generator)
        return top, bottom


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
