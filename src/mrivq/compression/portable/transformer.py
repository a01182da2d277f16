"""The integer copy of a transformer prior (:class:`mrivq.nn.transformer_prior.TransformerPrior`): its
raster-order coding weights in integers, the same on every machine
(:mod:`mrivq.compression.portable.fixed_point`).

The pass prior (:mod:`mrivq.compression.portable.passes`) is built for integers; the transformer is not: it
has layer norms, a GELU and softmax attention. Its copy keeps every value an integer in a fixed
unit and computes each of them with exact operations only, so that any machine, thread count,
batch, device or order of summation gives the same integers:

- **Products** are computed as float64 matrix products of integers (activations and weights of
  at most 15 bits, sums of at most ``2**45``): every product and partial sum is an integer that
  float64 holds exactly, in any order and with or without fused multiply-adds, and the result
  is read back to int64 with half a unit of margin (:func:`exact_matmul`). A last-bit error in
  any floating-point operation cannot change it.
- **Rescaling** is an int64 multiply, an added offset (bias and rounding) and a right shift; the
  copy's state bounds every one of them (:func:`integer_transformer_problem` checks a file's).
- **Layer norm**: integer mean, integer variance, an integer square root; the norm's gain and
  shift are folded into the linear layer after it.
- **GELU**: a table over the 14-bit input, made once with the copy and stored in it.
- **Attention**: scores rescaled to 1/ATT_UNITS nat, weights from a table of ``exp``, the
  weighted sum of the values divided by the weights' sum in integers.
- **Logits** in 1/LOGIT_UNITS nat become the coder's integer weights through the toolkit's
  exponential table, as the pass prior's do.

Because every position's integers are the same however the work is cut, the encoder runs each
level teacher-forced in chunks of positions (fast), and the decoder position by position with
a key/value cache: both get the same weights.

Units are calibrated on training codes when the copy is made (:func:`transformer_copy`):
each quantised value's largest magnitude there maps to the top of its integer range.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.compression.portable.fixed_point import (
    EXP_BITS,
    EXP_RANGE,
    LOGIT_UNITS,
    IntegerCopy,
    bounds_problem,
    exp_table,
    patches,
    table,
    template_problem,
    weights_from_logits,
)
from mrivq.nn.transformer_prior import CodeTransformer, TransformerPrior

ACT_LIMIT = (1 << 15) - 1  # every product's inputs (activations and weights) are within this
HIDDEN_LIMIT = (1 << 13) - 1  # the GELU's input: its table has 2 * HIDDEN_LIMIT + 1 entries
NORM_BITS = 11  # a layer norm's output in units of 2**-11 (up to +-16, clamped to ACT_LIMIT)
STREAM_BITS = 20  # the residual stream's largest calibrated magnitude is 2**STREAM_BITS units
STREAM_LIMIT = 1 << 24  # the residual stream's clamp, in its units (only a damaged copy comes near it)
MAX_SHIFT = 40  # rescaling: (value * multiplier + offset) >> shift, shift <= MAX_SHIFT
ATT_UNITS = 256  # attention scores in units of 1/256 nat
ATT_BITS = 14  # attention weights: round(2**ATT_BITS * exp(-d / ATT_UNITS)), 0 past ATT_RANGE nats
ATT_RANGE = 16
MAX_EPS = 1 << 40  # a layer norm's epsilon in squared stream units (with the variance inside int64)
MAX_SUM = 1 << 45  # every float64 product's partial sums stay below this (exact, with margin)
_OFFSET = 1 << 46
ARITHMETIC = {"act_limit": ACT_LIMIT, "hidden_limit": HIDDEN_LIMIT, "norm_bits": NORM_BITS,
              "stream_bits": STREAM_BITS, "stream_limit": STREAM_LIMIT, "max_shift": MAX_SHIFT,
              "att_units": ATT_UNITS, "att_bits": ATT_BITS, "att_range": ATT_RANGE,
              "logit_units": LOGIT_UNITS, "exp_range": EXP_RANGE, "exp_bits": EXP_BITS}
#: Calibrated ranges are widened this much: codes other than the calibration grids reach further.
HEADROOM = 2.0
CHUNK = 128  # positions per teacher-forced chunk (the scores of a chunk are (B, H, CHUNK, keys))


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of integer-valued float64 tensors, as int64, exactly on every machine.

    Every product and partial sum is an integer below MAX_SUM (the copy's bounds make sure),
    which float64 holds exactly whatever the order of the sums; the result is read back with
    ``floor(x + 1/2)``, offset so the conversion truncates a positive number: even results moved
    by a few ulps by some floating-point library round to the same integer."""
    return _to_int64(a @ b)


def _to_int64(x: torch.Tensor) -> torch.Tensor:
    return (x + (0.5 + _OFFSET)).long() - _OFFSET


def _rescale(acc: torch.Tensor, multiplier, offset, shift: int) -> torch.Tensor:
    """``(acc * multiplier + offset) >> shift`` in int64 (``offset`` holds the bias and the half)."""
    return acc.mul(multiplier).add_(offset).bitwise_right_shift_(shift)


def _isqrt(v: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(v))`` of int64 ``v >= 0``: a float estimate, corrected in integers."""
    r = torch.sqrt(v.double()).long()  # within one of the root for v < 2**53, even a few ulps off
    r -= (r * r > v).long()
    return r + ((r + 1) * (r + 1) <= v).long()


def _floor_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


class _Linear:
    """A linear layer of the copy: float64 weights holding integers of at most 15 bits ``(K, N)``,
    and per output channel the multiplier and offset (bias and rounding) into the output's
    unit, with one shift."""

    def __init__(self, state: dict) -> None:
        self.weight = state["weight"].double()
        self.multiplier, self.offset, self.shift = state["multiplier"], state["offset"], int(state["shift"])

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """int64 ``(..., K)`` within ACT_LIMIT -> int64 ``(..., N)`` in the output's unit."""
        return _rescale(exact_matmul(a.double(), self.weight), self.multiplier, self.offset, self.shift)


def _normalise(x: torch.Tensor, eps: int) -> torch.Tensor:
    """The integer layer norm of the stream ``x`` int64 ``(..., C)``: ``(x - mean) / sqrt(var + eps)``
    in units of 2**-NORM_BITS (rounded, clamped to ACT_LIMIT); ``eps`` in squared stream units."""
    channels = x.shape[-1]
    centred = x - torch.div(x.sum(dim=-1, keepdim=True), channels, rounding_mode="floor")
    var = torch.div((centred * centred).sum(dim=-1, keepdim=True), channels, rounding_mode="floor") + eps
    std = _isqrt(var).clamp_(min=1)
    return _floor_div(centred * (2 << NORM_BITS) + std, 2 * std).clamp_(-ACT_LIMIT, ACT_LIMIT)


class _Block:
    """One transformer block of the copy (pre-norm attention and GELU MLP, residual)."""

    def __init__(self, state: dict, n_head: int, window: int | None) -> None:
        self.qkv, self.proj = _Linear(state["qkv"]), _Linear(state["proj"])
        self.fc1, self.fc2 = _Linear(state["fc1"]), _Linear(state["fc2"])
        self.eps_attn, self.eps_mlp = int(state["eps_attn"]), int(state["eps_mlp"])
        # q.k into 1/ATT_UNITS nat: a multiplier per head (1, H, 1, 1) and one shift
        self.score, self.score_shift = state["score"], int(state["score_shift"])
        self.gelu = state["gelu"].long()  # (2 * HIDDEN_LIMIT + 1,)
        self.att_table = state["att_table"]  # int64 (ATT_RANGE * ATT_UNITS + 1,), last entry 0
        self.n_head, self.window = n_head, window

    def __call__(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], position: int) -> torch.Tensor:
        """Stream ``x`` int64 ``(B, T, C)`` of positions ``position ..`` -> the stream after the block."""
        batch, length, channels = x.shape
        heads = self.n_head
        q, k, v = (t.clamp(-ACT_LIMIT, ACT_LIMIT).view(batch, length, heads, -1).transpose(1, 2)
                   for t in self.qkv(_normalise(x, self.eps_attn)).split(channels, dim=2))
        keys, values = cache
        end = position + length
        if keys.shape[2] < end:  # a ring of the window's positions, filled one at a time
            if length != 1:
                raise ValueError("a ring cache takes one position at a time")
            slot = position % keys.shape[2]
            keys[:, :, slot] = k[:, :, 0].double()
            values[:, :, :, slot] = v[:, :, 0].double()
            keys, values = keys[:, :, :end], values[..., :end]
            start, end = 0, min(end, keys.shape[2])
        else:
            keys[:, :, position:end] = k.double()
            values[..., position:end] = v.transpose(-1, -2).double()
            start = 0 if self.window is None else max(0, position + 1 - self.window)
        scores = exact_matmul(q.double(), keys[:, :, start:end].transpose(-1, -2))
        scores = _rescale(scores, self.score, 1 << (self.score_shift - 1), self.score_shift)
        if length > 1:  # one query sees every key from start; a chunk's queries see only keys up to their own
            query_at = torch.arange(position, end, device=x.device)[:, None]
            key_at = torch.arange(start, end, device=x.device)[None, :]
            visible = key_at <= query_at
            if self.window is not None:
                visible &= key_at > query_at - self.window
            scores = scores.masked_fill(~visible, torch.iinfo(torch.int64).min // 2)
        gap = (scores.amax(dim=-1, keepdim=True) - scores).clamp_(max=len(self.att_table) - 1)
        weights = self.att_table[gap]  # the largest gets 2**ATT_BITS, the masked 0
        total = weights.sum(dim=-1, keepdim=True)
        mixed = exact_matmul(values[..., start:end], weights.double().transpose(-1, -2)).transpose(-1, -2)
        out = _floor_div(2 * mixed + total, 2 * total).transpose(1, 2).reshape(batch, length, channels)
        x = (x + self.proj(out)).clamp_(-STREAM_LIMIT, STREAM_LIMIT)
        hidden = self.fc1(_normalise(x, self.eps_mlp)).clamp_(-HIDDEN_LIMIT, HIDDEN_LIMIT)
        return (x + self.fc2(self.gelu[hidden + HIDDEN_LIMIT])).clamp_(-STREAM_LIMIT, STREAM_LIMIT)


class _Transformer:
    """The copy of one :class:`CodeTransformer`: :meth:`logits` of a chunk of positions."""

    def __init__(self, state: dict) -> None:
        self.n_embed = int(state["n_embed"])
        self.grid = tuple(int(v) for v in state["grid"])
        self.length = self.grid[0] * self.grid[1]
        self.n_head = int(state["n_head"])
        window = state["window"]  # a window as long as the grid (or longer) sees it all
        self.window = None if window is None or int(window) >= self.length else int(window)
        self.token, self.position = state["token"], state["position"]  # int64 tables, stream unit
        self.neighbour = state.get("neighbour")
        self.neighbour_at = state.get("neighbour_at")
        self.blocks = [_Block(s, self.n_head, self.window) for s in state["blocks"]]
        self.eps_out = int(state["eps_out"])
        self.head = _Linear(state["head"])

    def new_cache(self, n: int, *, one_at_a_time: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """float64 key/value caches of ``n`` grids, one ``(keys, values)`` pair per block: keys
        ``(n, H, slots, head size)``, values transposed, ``(n, H, head size, slots)`` (a query's
        weighted sum then reads them in order). For ``one_at_a_time`` (positions one by one)
        under windowed attention, the slots are only the window's: a ring (the order of the keys
        changes no sum, so the integers are the same)."""
        channels = self.token.shape[1]
        slots = self.window if one_at_a_time and self.window is not None else self.length
        shape = (n, self.n_head, slots, channels // self.n_head)
        device = self.token.device
        return [(torch.zeros(shape, dtype=torch.float64, device=device),
                 torch.zeros(shape, dtype=torch.float64, device=device).transpose(-1, -2).contiguous())
                for _ in self.blocks]

    def logits(self, codes: torch.Tensor, position: int, length: int, cache: list,
               condition: torch.Tensor | None) -> torch.Tensor:
        """int64 ``(B, length, n_embed)`` logits in 1/LOGIT_UNITS nat of positions ``position ..``,
        from ``codes`` ``(B, L)`` (known up to the position before the last of them; every earlier
        position already in ``cache``); ``condition`` int64 ``(B, L, C)`` or None."""
        span = slice(position, position + length)
        before = torch.arange(position - 1, position + length - 1, device=codes.device)
        x = self.token[_codes_at(codes, before, self.n_embed)] + self.position[span]
        if self.neighbour is not None:
            rows = torch.arange(self.neighbour_at.shape[1], device=codes.device) * (self.n_embed + 1)
            x = x + self.neighbour[_codes_at(codes, self.neighbour_at[span], self.n_embed) + rows].sum(dim=2)
        if condition is not None:
            x = x + condition[:, span]
        x = x.clamp_(-STREAM_LIMIT, STREAM_LIMIT)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, layer_cache, position)
        return self.head(_normalise(x, self.eps_out))


def _codes_at(flat: torch.Tensor, index: torch.Tensor, n_embed: int) -> torch.Tensor:
    return torch.where(index >= 0, flat[:, index.clamp(min=0)], n_embed)


class _Condition:
    """The copy of :class:`mrivq.nn.transformer_prior.TopCondition`: top codes -> int64 ``(B, 4hw, C)`` in the
    stream unit, raster order over the bottom grid."""

    def __init__(self, state: dict) -> None:
        self.embed = state["embed"]  # int64 (n_embed, C), the condition's own unit
        self.blocks = [(_Linear(b["conv3"]), _Linear(b["conv1"]), b["relu_in"], b["relu_mid"])
                       for b in state["blocks"]]
        self.up_in = state["up_in"]
        self.up = _Linear(state["up"])

    def __call__(self, codes_top: torch.Tensor) -> torch.Tensor:
        x = self.embed[codes_top].clamp_(-STREAM_LIMIT, STREAM_LIMIT)  # (B, h, w, C)
        for conv3, conv1, relu_in, relu_mid in self.blocks:
            hidden = _quantise(conv3(patches(_quantise(x.clamp(min=0), relu_in), 3, pad=1)).clamp_(min=0), relu_mid)
            x = (x + conv1(hidden)).clamp_(-STREAM_LIMIT, STREAM_LIMIT)
        up = self.up(patches(_upsampled(_quantise(x, self.up_in)), 4, pad=2))  # (B, 2h, 2w, C)
        return up.clamp_(-STREAM_LIMIT, STREAM_LIMIT).flatten(1, 2)


def _quantise(x: torch.Tensor, requantiser: torch.Tensor) -> torch.Tensor:
    """int64 ``x`` rescaled by ``(multiplier, offset, shift)`` into a product's input, clamped to ACT_LIMIT."""
    multiplier, offset, shift = (int(v) for v in requantiser)
    return _rescale(x, multiplier, offset, shift).clamp_(-ACT_LIMIT, ACT_LIMIT)


def _upsampled(x: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, C)`` with a zero between neighbours ``(B, 2h - 1, 2w - 1, C)``: a stride-2
    transposed convolution is a convolution of this with the flipped kernel."""
    batch, height, width, channels = x.shape
    out = x.new_zeros(batch, 2 * height - 1, 2 * width - 1, channels)
    out[:, ::2, ::2] = x
    return out


class IntegerTransformerPrior(IntegerCopy):
    """The coding path of a :class:`TransformerPrior` in integers: logits of every position, the
    same on any machine, thread count, batch and device, teacher-forced or one position at a time."""

    coding = "raster"  # the order it codes in, as a codes file's header names it
    #: Slices coded together: the encoder, teacher-forced chunk by chunk, is fastest with few; the
    #: decoder, one position at a time, spreads each step's fixed cost over more. At most in flight:
    #: the decoder's key/value caches hold the top grid and only the window of the bottom.
    batch: ClassVar[dict[str, int]] = {"encode": 4, "decode": 16}
    in_flight: ClassVar[dict[str, int]] = {"encode": 16, "decode": 32}

    def __init__(self, state: dict) -> None:
        super().__init__(state)
        self.top = _Transformer(state["top"])
        self.bottom = _Transformer(state["bottom"])
        self.condition = _Condition(state["condition"])

    @torch.inference_mode()
    def code_batch(self, lo: int, size: int, code, known: dict[str, np.ndarray] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Slices ``lo`` to ``lo + size``, each grid in raster order, the bottom given the top:
        ``code(level, weights (P, K), slice, positions)`` codes one slice's ``P`` flat positions and
        returns their codes. With the codes ``known`` (``{level: (N, L)}``: the encoder), CHUNK
        positions at a time, teacher-forced; else one position at a time (the same integers)."""
        chunk = 1 if known is None else CHUNK
        out = {}
        for level in ("top", "bottom"):
            net = getattr(self, level)
            condition = self.condition(torch.as_tensor(out["top"], device=self.device)) if level == "bottom" else None
            codes = torch.zeros(size, net.length, dtype=torch.long, device=self.device)
            if known is not None:
                codes[:] = torch.as_tensor(known[level][lo:lo + size], dtype=torch.long, device=self.device)
            cache = net.new_cache(size, one_at_a_time=known is None)
            for position in range(0, net.length, chunk):
                length = min(chunk, net.length - position)
                where = np.arange(position, position + length)
                weights = weights_from_logits(net.logits(codes, position, length, cache, condition), self.coder_table)
                symbols = np.stack([code(level, w, lo + i, where) for i, w in enumerate(weights)])
                codes[:, position:position + length] = torch.as_tensor(symbols, dtype=torch.long, device=self.device)
            out[level] = codes.reshape(size, *net.grid).cpu().numpy()
        return out["top"], out["bottom"]


# ---------------------------------------------------------------------------------------
# Making the copy
# ---------------------------------------------------------------------------------------

def _shift_for(largest_output: float, most: int = MAX_SHIFT) -> int:
    """The largest shift (at most ``most``) whose rescaling of an output of magnitude up to
    ``largest_output`` (in output units) stays below 2**61."""
    shift = min(most, 61 - math.ceil(math.log2(largest_output + 2)))
    if shift < 1:
        raise ValueError(f"has a rescaling whose output could reach {largest_output:.3g} units")
    return shift


def _linear_state(weight: torch.Tensor, bias: torch.Tensor | None, input_unit: float, output_units: torch.Tensor,
                  ) -> dict:
    """A :class:`_Linear` of float ``weight`` ``(N, K)``, ``bias`` ``(N,)``, whose input is in
    ``input_unit`` and output channel ``j`` in ``output_units[j]``: 15-bit weights, one scale per
    output channel; the shift is the largest that keeps any input's rescaling inside int64."""
    w = weight.detach().double()
    scale = w.abs().amax(dim=1).clamp(min=1e-30) / ACT_LIMIT
    q = torch.round(w / scale[:, None]).clamp(-ACT_LIMIT, ACT_LIMIT)
    bias = torch.zeros(len(w), dtype=torch.float64) if bias is None else bias.detach().double()
    units = output_units.double().expand(len(w))
    ratio = input_unit * scale / units
    bias_units = torch.round(bias / units)
    largest = float((q.abs().sum(dim=1) * ACT_LIMIT * ratio + bias_units.abs()).max())
    shift = _shift_for(largest)
    return {"weight": q.t().contiguous().to(torch.int32), "shift": torch.tensor(shift),
            "multiplier": torch.round(ratio * 2.0**shift).long(),
            "offset": bias_units.long() * (1 << shift) + (1 << (shift - 1))}


def _fold_norm(norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear(norm(x))`` as one linear layer of the normalised ``x``: the gain into the weight,
    the shift into the bias."""
    weight = linear.weight.detach().double() * norm.weight.detach().double()[None, :]
    bias = linear.bias.detach().double() + linear.weight.detach().double() @ norm.bias.detach().double()
    return weight, bias


def _unit(largest: float, limit: int) -> float:
    """The float value of one integer unit that maps ``HEADROOM * largest`` to ``limit`` (never zero)."""
    return HEADROOM * max(largest, 1e-6) / limit


class _Recorder:
    """Largest magnitudes seen while running the float prior on calibration codes."""

    def __init__(self) -> None:
        self.peaks: dict[str, torch.Tensor | float] = {}

    def see(self, name: str, value: torch.Tensor, dim: int | None = None) -> None:
        if dim is None:
            peak = float(value.detach().abs().max())
            self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
        else:  # per channel along ``dim``
            peak = value.detach().abs().transpose(0, dim).flatten(1).amax(dim=1).double()
            self.peaks[name] = torch.maximum(self.peaks[name], peak) if name in self.peaks else peak


def _trace_transformer(net: CodeTransformer, codes: torch.Tensor, condition: torch.Tensor | None,
                       rec: _Recorder, name: str) -> None:
    batch = codes.shape[0]
    x = net.inputs(codes.reshape(batch, net.length), 0, net.length)
    if condition is not None:
        x = x + condition.flatten(2).transpose(1, 2)
    rec.see("stream", x)
    for i, block in enumerate(net.blocks):
        attn = block.attn
        qkv = attn.qkv(block.ln_attn(x))
        rec.see(f"{name}.{i}.qkv", qkv, dim=2)
        x = x + attn(block.ln_attn(x))
        rec.see("stream", x)
        hidden = block.mlp[0](block.ln_mlp(x))
        rec.see(f"{name}.{i}.hidden", hidden)
        rec.see(f"{name}.{i}.gelu", block.mlp[1](hidden))
        x = x + block.mlp[2](block.mlp[1](hidden))
        rec.see("stream", x)


def _trace_condition(cond, codes_top: torch.Tensor, rec: _Recorder) -> torch.Tensor:
    x = cond.embed(codes_top).permute(0, 3, 1, 2)
    rec.see("condition", x)
    for i, block in enumerate(cond.blocks):
        relu, conv3, _, conv1 = block.conv
        rec.see(f"condition.{i}.in", relu(x))
        mid = F.relu(conv3(relu(x)))
        rec.see(f"condition.{i}.mid", mid)
        x = x + conv1(mid)
        rec.see("condition", x)
    rec.see("condition.up_in", x)
    out = cond.up(x)
    rec.see("stream", out)
    return out


@torch.no_grad()
def transformer_copy(prior: TransformerPrior, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> IntegerTransformerPrior:
    """The fixed-point copy of ``prior``, its units calibrated on the code grids ``codes_top``
    ``(N, h, w)`` and ``codes_bottom`` ``(N, 2h, 2w)`` (a few dozen training grids): the same prior
    and grids give the same copy (on one machine: the calibration runs in float32 on the CPU; the
    copy is made once, when the prior is saved, and travels with it)."""
    prior = copy.deepcopy(prior).float().cpu().eval()
    codes_top, codes_bottom = codes_top.long().cpu(), codes_bottom.long().cpu()
    rec = _Recorder()
    condition = _trace_condition(prior.condition, codes_top, rec)
    _trace_transformer(prior.top, codes_top, None, rec, "top")
    _trace_transformer(prior.bottom, codes_bottom, condition, rec, "bottom")
    unit = rec.peaks["stream"] / (1 << STREAM_BITS)
    state = {
        # Bump the version whenever the integer arithmetic changes: a stored copy of another
        # version is then refused by name, never misread.
        "format": "mrivq-integer-transformer-prior", "version": 1, "arithmetic": ARITHMETIC,
        "n_embed": prior.n_embed, "top_grid": list(prior.top_grid),
        "top": _transformer_state(prior.top, rec, "top", unit),
        "bottom": _transformer_state(prior.bottom, rec, "bottom", unit),
        "condition": _condition_state(prior.condition, rec, unit),
        "exp_table": exp_table(),
    }
    problem = _state_bounds_problem(state)
    if problem:
        raise ValueError(f"the integer copy of this prior {problem}; retrain the prior")
    return IntegerTransformerPrior(state)


def _transformer_state(net: CodeTransformer, rec: _Recorder, name: str, unit: float) -> dict:
    state = {"n_embed": net.n_embed, "grid": list(net.grid), "n_head": net.n_head, "window": net.window,
             "token": table(net.token.weight, unit), "position": table(net.positions(), unit),
             "blocks": [_block_state(block, rec, f"{name}.{i}", unit, net.n_head) for i, block in enumerate(net.blocks)],
             "eps_out": _eps(net.ln_out, unit)}
    if net.neighbour is not None:
        state["neighbour"] = table(net.neighbour.weight, unit)
        state["neighbour_at"] = net.neighbour_at.clone()
    weight, bias = _fold_norm(net.ln_out, net.head)
    state["head"] = _linear_state(weight, bias, 2.0 ** -NORM_BITS, torch.tensor(1.0 / LOGIT_UNITS))
    return state


def _eps(norm: torch.nn.LayerNorm, unit: float) -> torch.Tensor:
    """The norm's epsilon in squared stream units (a tensor: its value is the copy's, not its form)."""
    return torch.tensor(min(max(1, round(norm.eps / unit**2)), MAX_EPS))


def _block_state(block, rec: _Recorder, name: str, unit: float, n_head: int) -> dict:
    channels = block.attn.proj.weight.shape[0]
    qkv_units = HEADROOM * rec.peaks[f"{name}.qkv"].clamp(min=1e-6) / ACT_LIMIT  # per output channel
    # one unit per part (q, k, v) and head: the part's largest channel sets it
    part_units = qkv_units.view(3, n_head, -1).amax(dim=2, keepdim=True).expand(3, n_head, channels // n_head)
    part_units = part_units.reshape(-1)
    weight, bias = _fold_norm(block.ln_attn, block.attn.qkv)
    v_units = part_units[2 * channels:]
    hidden_unit = _unit(rec.peaks[f"{name}.hidden"], HIDDEN_LIMIT)
    gelu_unit = _unit(rec.peaks[f"{name}.gelu"], ACT_LIMIT)
    # the scores of head h: q.k * unit_q(h) * unit_k(h) / sqrt(head size), in 1/ATT_UNITS nat
    head_size = channels // n_head
    q_units, k_units = part_units[:channels:head_size], part_units[channels:2 * channels:head_size]
    score_ratio = q_units * k_units / math.sqrt(head_size) * ATT_UNITS
    score_shift = _shift_for(float(score_ratio.max()) * head_size * ACT_LIMIT**2)
    score = torch.round(score_ratio * 2.0**score_shift).long()[None, :, None, None]
    fc1_weight, fc1_bias = _fold_norm(block.ln_mlp, block.mlp[0])
    # proj takes the attention's output in the units of v (one per channel): fold them into its weight
    proj_weight = block.attn.proj.weight.detach().double() * v_units[None, :] / float(v_units.max())
    inputs = torch.arange(-HIDDEN_LIMIT, HIDDEN_LIMIT + 1, dtype=torch.float64) * hidden_unit
    return {
        "qkv": _linear_state(weight, bias, 2.0 ** -NORM_BITS, part_units),
        "proj": _linear_state(proj_weight, block.attn.proj.bias, float(v_units.max()), torch.tensor(unit)),
        "fc1": _linear_state(fc1_weight, fc1_bias, 2.0 ** -NORM_BITS, torch.tensor(hidden_unit)),
        "fc2": _linear_state(block.mlp[2].weight, block.mlp[2].bias, gelu_unit, torch.tensor(unit)),
        "gelu": torch.round(F.gelu(inputs) / gelu_unit).clamp(-ACT_LIMIT, ACT_LIMIT).to(torch.int32),
        "score": score, "score_shift": torch.tensor(score_shift),
        "att_table": torch.tensor([round((1 << ATT_BITS) * math.exp(-d / ATT_UNITS)) for d in range(ATT_RANGE * ATT_UNITS)]
                                  + [0], dtype=torch.int64),
        "eps_attn": _eps(block.ln_attn, unit), "eps_mlp": _eps(block.ln_mlp, unit),
    }


def _requantiser(from_unit: float, to_unit: float) -> torch.Tensor:
    """``(multiplier, offset, shift)`` int64 taking a stream value (within STREAM_LIMIT) in
    ``from_unit`` to ``to_unit``, rounded."""
    ratio = from_unit / to_unit
    shift = _shift_for(STREAM_LIMIT * ratio)
    return torch.tensor([round(ratio * 2.0**shift), 1 << (shift - 1), shift], dtype=torch.int64)


def _condition_state(cond, rec: _Recorder, unit: float) -> dict:
    own = rec.peaks["condition"] / (1 << STREAM_BITS)
    blocks = []
    for i, block in enumerate(cond.blocks):
        _, conv3, _, conv1 = block.conv
        # a (nearly) dead ReLU keeps a range of at least 2**-10 of the stream's: bounded rescaling
        relu_in = _unit(max(rec.peaks[f"condition.{i}.in"], own * 1024), ACT_LIMIT)
        relu_mid = _unit(max(rec.peaks[f"condition.{i}.mid"], own * 1024), ACT_LIMIT)
        blocks.append({
            "relu_in": _requantiser(own, relu_in),
            "conv3": _linear_state(_taps_first(conv3.weight), conv3.bias, relu_in, torch.tensor(own)),
            "relu_mid": _requantiser(own, relu_mid),
            "conv1": _linear_state(conv1.weight[:, :, 0, 0], conv1.bias, relu_mid, torch.tensor(own)),
        })
    up_in = _unit(rec.peaks["condition.up_in"], ACT_LIMIT)
    # a transposed convolution = a convolution of the zero-interleaved input with the flipped kernel
    flipped = cond.up.weight.detach().flip(2, 3).transpose(0, 1)  # (out, in, 4, 4)
    return {"embed": table(cond.embed.weight, own), "blocks": blocks, "up_in": _requantiser(own, up_in),
            "up": _linear_state(_taps_first(flipped), cond.up.bias, up_in, torch.tensor(unit))}


def _taps_first(weight: torch.Tensor) -> torch.Tensor:
    """A convolution's weight ``(N, C, k, k)`` as ``(N, k * k * C)`` in :func:`~mrivq.compression.portable.fixed_point.patches`'s order."""
    return weight.detach().permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


# ---------------------------------------------------------------------------------------
# Checking a copy
# ---------------------------------------------------------------------------------------

#: Limits of the tables and weights of a copy read from a file, by key (the toolkit's scheme);
#: what products and rescalings could reach is computed from them in :func:`_state_bounds_problem`.
BOUNDS = {"weight": ACT_LIMIT, "gelu": ACT_LIMIT, "token": 1 << 36, "position": 1 << 36, "neighbour": 1 << 36,
          "embed": 1 << 36}


def _state_bounds_problem(state: dict) -> str | None:
    """What could overflow, for any input within the clamps: each table within :data:`BOUNDS`, each
    product's partial sums below MAX_SUM, each rescaling inside int64, each epsilon in range."""
    problem = bounds_problem(state, BOUNDS)
    if problem:
        return problem
    for where, linear in _linears(state):
        acc = linear["weight"].long().abs().sum(dim=0) * ACT_LIMIT  # (N,) the largest |sum| any input gives
        if not 1 <= int(linear["shift"]) <= MAX_SHIFT or int(acc.max()) >= MAX_SUM:
            return f"has a shift out of range or a product that could reach 2**45 at {where}"
        if _leaves_int64(acc, linear["multiplier"], linear["offset"]):
            return f"has a rescaling that could leave int64 at {where}"
    for where, requantiser in _requantisers(state):
        shift = int(requantiser[2])
        if not 1 <= shift <= MAX_SHIFT or _leaves_int64(torch.tensor([STREAM_LIMIT]), requantiser[:1], requantiser[1:2]):
            return f"has a rescaling that could leave int64 at {where}"
    for level in ("top", "bottom"):
        net = state[level]
        channels = net["token"].shape[1]
        length = net["grid"][0] * net["grid"][1]
        keys = length if net["window"] is None else min(net["window"], length)
        if channels > 4096 or keys * (1 << ATT_BITS) * ACT_LIMIT >= MAX_SUM:
            return f"has too many channels or attended positions for its arithmetic at {level}"
        for i, block in enumerate(net["blocks"]):
            head_size = channels // net["n_head"]
            if not 1 <= int(block["score_shift"]) <= MAX_SHIFT or (block["score"] < 0).any() or _leaves_int64(
                    torch.tensor([head_size * ACT_LIMIT**2]), block["score"].flatten(), torch.zeros(1, dtype=torch.long)):
                return f"has an attention scale out of range at {level}.blocks[{i}]"
            if not all(1 <= int(block[k]) <= MAX_EPS for k in ("eps_attn", "eps_mlp")):
                return f"has a layer norm epsilon out of range at {level}.blocks[{i}]"
        if not 1 <= int(net["eps_out"]) <= MAX_EPS:
            return f"has a layer norm epsilon out of range at {level}"
    return None


def _leaves_int64(largest_input: torch.Tensor, multiplier: torch.Tensor, offset: torch.Tensor) -> bool:
    """Whether ``largest_input * |multiplier| + |offset|`` could reach 2**62 (in Python integers)."""
    return any(int(a) * abs(int(m)) + abs(int(o)) >= 1 << 62
               for a, m, o in zip(largest_input.expand(len(multiplier)), multiplier, offset))


def _linears(state: dict):
    for level in ("top", "bottom"):
        for i, block in enumerate(state[level]["blocks"]):
            for key in ("qkv", "proj", "fc1", "fc2"):
                yield f"{level}.blocks[{i}].{key}", block[key]
        yield f"{level}.head", state[level]["head"]
    for i, block in enumerate(state["condition"]["blocks"]):
        yield f"condition.blocks[{i}].conv3", block["conv3"]
        yield f"condition.blocks[{i}].conv1", block["conv1"]
    yield "condition.up", state["condition"]["up"]


def _requantisers(state: dict):
    for i, block in enumerate(state["condition"]["blocks"]):
        yield f"condition.blocks[{i}].relu_in", block["relu_in"]
        yield f"condition.blocks[{i}].relu_mid", block["relu_mid"]
    yield "condition.up_in", state["condition"]["up_in"]


def transformer_copy_problem(state, prior: TransformerPrior) -> str | None:
    """What is wrong with ``state`` as the integer copy of ``prior`` (a file's, so untrusted), or
    None: structure, types, shapes, constants and tables those of a copy of a fresh prior of
    ``prior``'s sizes (never the file's weights), and every product and rescaling within int64
    for any input."""
    try:
        template = transformer_copy(prior.fresh(), torch.zeros(1, *prior.top_grid, dtype=torch.long),
                                    torch.zeros(1, *prior.bottom_grid, dtype=torch.long)).state
    except ValueError as exc:  # sizes whose arithmetic cannot be bounded
        return str(exc).removeprefix("the integer copy of this prior ")
    problem = template_problem(state, template)
    if problem:
        return problem
    for level in ("top", "bottom"):
        if "neighbour_at" in template[level] and not torch.equal(state[level]["neighbour_at"],
                                                                 template[level]["neighbour_at"]):
            return f"has other neighbour positions for the {level} grid"
        for i, block in enumerate(state[level]["blocks"]):
            if not torch.equal(block["att_table"], template[level]["blocks"][i]["att_table"]):
                return f"has another attention table at {level}.blocks[{i}]"
    return _state_bounds_problem(state)
