"""The integer copy of a row prior (:class:`mrivq.nn.row_prior.RowPrior`): its coding weights in
integers, the same on every machine, with the pass prior's arithmetic
(:mod:`mrivq.compression.portable.passes`: int8 weights with one scale per output channel, 8-bit
activations with one scale per layer, exact int32 products, integer rescaling of an int64 stream).

It codes each grid a row at a time (:meth:`IntegerRowPrior.code_batch`): a row's features from
one evaluation of that row, each convolution reading the int8 activations of the rows above it
that the copy keeps for every layer (the lower row of each kernel is zero, so the rows below are
never needed, and the sums are those of the whole grid's convolution, which int32 adds exactly in
any order); then the even columns' logits, their codes, the odd columns' logits given the codes
beside them, their codes. The encoder runs the same steps as the decoder, so both compute the
same integers. Each slice has its own stream, as with every prior.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.compression.portable.fixed_point import (
    LOGIT_UNITS,
    IntegerCopy,
    bounds_problem,
    exp_table,
    table,
    template_problem,
    weights_from_logits,
)
from mrivq.compression.portable.passes import (
    ARITHMETIC,
    BOUNDS,
    SHIFT,
    STREAM_BITS,
    STREAM_LIMIT,
    IntegerVolumePrior,
    _Conv,
    _conv_state,
    _IntegerNet,
    _net_state,
    _traced,
    activate,
    int8_matmul,
    multiplier_of,
)
from mrivq.nn.pass_prior import DILATIONS, _bag, near_rows
from mrivq.nn.row_prior import ABOVE, RowNet, RowPrior, halves

#: The padding of the activations a copy keeps: the widest dilation.
PAD = max(DILATIONS)
#: Limits of a row copy read from a file: the pass copy's, and its own tables'.
ROW_BOUNDS = {**BOUNDS, "above": 1 << 36, "beside": 1 << 36, "beside_follow": 1 << 36}


def coding_steps(grid: tuple[int, int]) -> torch.Tensor:
    """``(rows, cols)`` int64: the step in which each position is coded, ``2 * row + (col odd)``."""
    rows, cols = grid
    return 2 * torch.arange(rows)[:, None] + (torch.arange(cols) % 2)[None, :]


class _IntegerRowNet:
    """The fixed-point :class:`RowNet`: its tables in the stream's unit, its convolutions, the
    multiplier of each ReLU (one per convolution's input, the head's input, the widened features)."""

    def __init__(self, state: dict) -> None:
        self.above, self.row, self.col = state["above"], state["row"], state["col"]  # int64, stream unit
        self.beside, self.beside_follow = state["beside"], state["beside_follow"]  # stream unit, logit units
        self.convs = [_Conv(s) for s in state["convs"]]
        self.activations = [int(m) for m in state["activations"]]
        self.widen = _Conv(state["widen"]) if "widen" in state else None
        self.head = _Conv(state["head"])
        self.n_embed = int(state["n_embed"])
        self.grid = (len(self.row), len(self.col))
        self.order = coding_steps(self.grid).to(self.row.device)  # the shape :meth:`IntegerVolumePrior.condition` reads

    def start(self, codes: torch.Tensor, i: int, condition: torch.Tensor | None) -> torch.Tensor:
        """int64 ``(B, cols, C)``: row ``i``'s stream before the convolutions, from the codes of row ``i - 1``."""
        n = self.n_embed
        above = codes[:, i - 1] if i else torch.full_like(codes[:, 0], n)
        padded = F.pad(above, (1, 1), value=n)
        cols = self.grid[1]
        x = sum(self.above[padded[:, k:k + cols] + k * (n + 1)] for k in range(len(ABOVE)))
        x = x + self.row[i] + self.col
        if condition is not None:
            x = x + condition[:, i]
        return x.clamp_(-STREAM_LIMIT, STREAM_LIMIT)

    def features(self, x: torch.Tensor, i: int, kept: list[torch.Tensor]) -> torch.Tensor:
        """Row ``i``'s stream after the convolutions, from its start ``x`` ``(B, cols, C)``; each
        layer's activations of the row go into ``kept`` (int8 ``(B, rows + 2 PAD, cols + 2 PAD, C)``,
        -128 where nothing is computed yet: the zero activation, as beyond the grid)."""
        cols = self.grid[1]
        for conv, multiplier, acts in zip(self.convs, self.activations, kept):
            d = conv.dilation
            acts[:, PAD + i, PAD:PAD + cols] = activate(x, multiplier)
            # the taps :func:`mrivq.compression.portable.passes._columns` lays out, for row i only
            taps = torch.cat([acts[:, PAD + i + di * d, PAD + dj * d:PAD + dj * d + cols]
                              for di in (-1, 0, 1) for dj in (-1, 0, 1)], -1)
            acc = int8_matmul(taps.reshape(-1, taps.shape[-1]), conv.weight).long()
            x += acc.mul_(conv.multiplier).add_(conv.offset).bitwise_right_shift_(SHIFT).reshape(x.shape)
            x.clamp_(-STREAM_LIMIT, STREAM_LIMIT)
        return x

    def head_input(self, x: torch.Tensor, beside: torch.Tensor | None) -> torch.Tensor:
        """int8 ``(B, P, C')``: the head's input at ``P`` positions of a row from their stream ``x``
        ``(B, P, C)`` and, for the odd columns, their neighbours' rows ``beside`` ``(B, 2, P)``."""
        if beside is not None:
            x = x + self.beside[beside].sum(1)
        a = activate(x, self.activations[len(self.convs)])
        if self.widen is not None:
            a = activate(self.widen(a[:, :, None, :])[:, :, 0, :], self.activations[-1])
        return a

    def logits(self, head_input: torch.Tensor, beside: torch.Tensor | None = None) -> torch.Tensor:
        """int64 ``(B, P, K)`` logits of the head input ``(B, P, C')`` (plus the neighbours' tables of
        log-odds at the rows ``beside`` ``(B, 2, P)``)."""
        batch, positions, channels = head_input.shape
        logits = self.head(head_input.reshape(-1, 1, 1, channels)).reshape(batch, positions, -1)
        if beside is not None:
            logits += self.beside_follow[beside].sum(1)
        return logits


class IntegerRowPrior(IntegerVolumePrior):
    """The coding path of a :class:`RowPrior`: each grid row by row, the even columns and then the
    odd ones, given the codes of the slices a slice is coded after (as :class:`IntegerVolumePrior`)."""

    coding = "rows"
    #: Slices coded together and at most in flight: a row's work is a few dozen small operations
    #: whatever the batch, so larger batches code faster (120 slices coded alone on 2 threads,
    #: 2026-12-08: 35 slices a second in batches of 16, 46-54 in batches of 32 or 64).
    batch: ClassVar[dict[str, int]] = {"encode": 32, "decode": 32}
    in_flight: ClassVar[dict[str, int]] = {"encode": 64, "decode": 64}

    def __init__(self, state: dict) -> None:
        IntegerCopy.__init__(self, state)
        self.top = _IntegerRowNet(state["top"])
        self.bottom = _IntegerRowNet(state["bottom"])
        self.condition_net = _IntegerNet(state["condition"])

    @torch.inference_mode()
    def code_batch(self, lo: int, size: int, code, known=None, references=None) -> tuple[np.ndarray, np.ndarray]:
        """Slices ``lo`` to ``lo + size``, each grid a row at a time, the bottom given the top, encoder
        and decoder alike: ``code(level, weights (P, K), slice, positions)`` codes one slice's ``P``
        flat positions of a row's half and returns their codes."""
        out = {}
        for level, net in (("top", self.top), ("bottom", self.bottom)):
            condition = self.condition(level, out.get("top"), references)
            rows, cols = net.grid
            codes = torch.zeros(size, rows, cols, dtype=torch.long, device=self.device)
            channels = net.above.shape[1]
            kept = [torch.full((size, rows + 2 * PAD, cols + 2 * PAD, channels), -128, dtype=torch.int8,
                               device=self.device) for _ in net.convs]
            parts = [columns.to(self.device) for columns in halves(cols)]
            for i in range(rows):
                x = net.features(net.start(codes, i, condition), i, kept)
                for half, columns in enumerate(parts):
                    beside = None
                    if half:  # the odd columns: the codes beside them, now known
                        beside = _beside_rows(codes[:, i], columns, net.n_embed)
                    here = i * cols + columns
                    logits = net.logits(net.head_input(x[:, columns], beside), beside)
                    # the references' tables of log-odds (every slot "none" where there are none)
                    logits += self.state[f"follow_{level}"][self._rows(level, references, (slice(None), slice(None),
                                                                                        here))].sum(1)
                    weights = weights_from_logits(logits, self.coder_table)
                    where = here.cpu().numpy()
                    symbols = np.stack([code(level, weights[b], lo + b, where) for b in range(size)])
                    codes[:, i, columns] = torch.as_tensor(symbols, dtype=torch.long, device=self.device)
            out[level] = codes.cpu().numpy()
        return out["top"], out["bottom"]


def _beside_rows(row: torch.Tensor, columns: torch.Tensor, n_embed: int) -> torch.Tensor:
    """int64 ``(B, 2, P)``: the rows of the neighbours' tables of the codes left and right of
    ``columns`` in one grid row ``(B, cols)`` (code ``n_embed`` beyond the grid), as
    :meth:`RowNet.beside_rows` gives them."""
    padded = F.pad(row, (1, 1), value=n_embed)
    return torch.stack([padded[:, columns], padded[:, columns + 2] + (n_embed + 1)], 1)


# ---------------------------------------------------------------------------------------
# Making the copy
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def row_copy(prior: RowPrior, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> IntegerRowPrior:
    """The fixed-point copy of ``prior`` (float32, CPU), its activation scales calibrated on the code
    grids ``codes_top`` ``(N, h, w)`` and ``codes_bottom`` ``(N, 2h, 2w)`` (a few dozen training grids,
    as key slices and as slices between the grids before and after them): each ReLU's 8-bit range is
    the largest value it reached."""
    prior = copy.deepcopy(prior).float().cpu().eval()
    codes_top, codes_bottom = codes_top.long().cpu(), codes_bottom.long().cpu()
    records = {}
    _traced(prior.condition, records, "condition", codes_top)
    between = tuple(torch.stack([codes.roll(1, 0), codes.roll(-1, 0)], 1) for codes in (codes_top, codes_bottom))
    for references in (None, between):
        for (level, net), codes in zip(prior.levels(), (codes_top, codes_bottom)):
            _traced_rows(net, records, level, codes, prior.condition_for(level, codes_top, references))
    stream = max(records[name]["stream"] for name in records)
    unit = stream / (1 << STREAM_BITS)  # one stream unit in float
    state = {
        # Bump the version whenever the integer arithmetic changes: a stored copy of another
        # version is then refused by name, never misread.
        "format": "mrivq-integer-row-prior", "version": 1, "arithmetic": ARITHMETIC,
        "n_embed": prior.n_embed, "top_grid": list(prior.top_grid),
        "top": _row_net_state(prior.top, records["top"], unit),
        "bottom": _row_net_state(prior.bottom, records["bottom"], unit),
        "condition": _net_state(prior.condition, records["condition"], unit, head=False),
        "exp_table": exp_table(),
    }
    for level in ("top", "bottom"):
        state[f"seen_{level}"] = table(getattr(prior, f"seen_{level}").weight, unit)
        state[f"follow_{level}"] = table(getattr(prior, f"follow_{level}").weight, 1.0 / LOGIT_UNITS)
    problem = bounds_problem(state, ROW_BOUNDS)
    if problem:
        raise ValueError(f"the integer copy of this prior {problem}: its activations or weights are out of "
                         "the fixed-point ranges; retrain the prior")
    return IntegerRowPrior(state)


def _traced_rows(net: RowNet, records: dict, name: str, codes: torch.Tensor, condition: torch.Tensor) -> None:
    """Run ``net`` and keep, for ``name``, the largest |stream| and the largest input of each ReLU."""
    record = records.setdefault(name, {"stream": 0.0, "relu": []})
    known = torch.ones((), dtype=torch.bool)
    x = _bag(near_rows(codes, known, net.n_embed, ABOVE), net.above.weight).permute(0, 3, 1, 2)
    x = x + (net.row.weight[:, None, :] + net.col.weight[None, :, :]).permute(2, 0, 1) + condition
    relus = []
    for conv in net.convs:
        record["stream"] = max(record["stream"], float(x.abs().max()))
        relus.append(float(x.clamp(min=0).max()))
        x = x + F.conv2d(F.relu(x), net.conv_weight(conv), conv.bias, padding=conv.padding, dilation=conv.dilation)
    x = x + _bag(net.beside_rows(codes), net.beside.weight).permute(0, 3, 1, 2) * net.odd.to(x.dtype)
    record["stream"] = max(record["stream"], float(x.abs().max()))
    relus.append(float(x.clamp(min=0).max()))
    if net.widen is not None:
        relus.append(float(net.widen(F.relu(x)).clamp(min=0).max()))
    record["relu"] = [max(a, b) for a, b in zip(record["relu"], relus)] if record["relu"] else relus


def _row_net_state(net: RowNet, record: dict, unit: float) -> dict:
    """Integer tables, convolutions (their zero taps included) and activation multipliers of one net;
    a ReLU that stayed (nearly) dead in calibration gets the range of a 2**-12 share of the stream's."""
    floor = unit * (1 << STREAM_BITS) / 4096
    relu_scales = [max(top, floor) / 255 for top in record["relu"]]  # float per uint8 step
    causal = []
    for conv in net.convs:  # what the float net computes: its weights times the causal mask
        masked = copy.deepcopy(conv)
        masked.weight.data = net.conv_weight(conv).detach().clone()
        causal.append(masked)
    state = {"n_embed": net.n_embed,
             "activations": torch.tensor([multiplier_of(unit / s) for s in relu_scales], dtype=torch.int64),
             "convs": [_conv_state(conv, relu_scales[i], unit) for i, conv in enumerate(causal)],
             "above": table(net.above.weight, unit), "row": table(net.row.weight, unit),
             "col": table(net.col.weight, unit), "beside": table(net.beside.weight, unit),
             "beside_follow": table(net.beside_follow.weight, 1.0 / LOGIT_UNITS)}
    if net.widen is not None:  # its output in the stream's unit
        state["widen"] = _conv_state(net.widen, relu_scales[-2], unit)
    state["head"] = _conv_state(net.head, relu_scales[-1], 1.0 / LOGIT_UNITS)
    return state


def row_copy_problem(state, prior: RowPrior) -> str | None:
    """What is wrong with ``state`` as the integer copy of ``prior`` (a file's, so untrusted), or None:
    its structure, types, shapes, constants and exponential table those of a copy of a fresh prior of
    ``prior``'s sizes, and its values within the bounds that keep every product inside int64."""
    template = row_copy(prior.fresh(), torch.zeros(1, *prior.top_grid, dtype=torch.long),
                        torch.zeros(1, *prior.bottom_grid, dtype=torch.long)).state
    return template_problem(state, template) or bounds_problem(state, ROW_BOUNDS)


def row_memory(settings, top_grid) -> tuple[str, int]:
    """The int8 activations every layer keeps for ``in_flight`` slices (both grids, padded), and a
    row's stream, columns and logits."""
    cells = sum((rows + 2 * PAD) * (cols + 2 * PAD) for rows, cols in
                (top_grid, (2 * top_grid[0], 2 * top_grid[1])))
    per_slice = cells * settings.channels * settings.layers + 2 * top_grid[1] * (
        settings.channels * 40 + settings.head_channels * 9)
    return "working memory", per_slice * IntegerRowPrior.in_flight["encode"]

