"""The integer copy of a pass prior (:class:`mrivq.nn.pass_prior.PassPrior`): its coding weights in
integers, the same on every machine (:mod:`mrivq.compression.portable.fixed_point`):

- Weights are int8 with one scale per output channel; activations after each ReLU are 8-bit
  (uint8, shifted to int8 for the product), with one scale per layer calibrated on training
  codes; products accumulate in int32 (``torch._int_mm``: exact, order-free).
- The residual stream is int32 in one fixed unit; every rescaling is an integer multiply and a
  right shift (``multiplier / 2**SHIFT`` approximates the float ratio, rounding down).
- Logits come out in units of ``1 / LOGIT_UNITS`` nat, and the toolkit's exponential table
  turns them into the coder's integer weights.

Everything the copy holds is integer tensors, made from the float prior and a calibration
batch by :func:`pass_copy` (deterministic: the same float prior and batch give the same
copy), and fingerprinted by :meth:`IntegerPassPrior.fingerprint`. The copy codes each grid pass
by pass (:meth:`IntegerPassPrior.code_batch`, the order :mod:`mrivq.compression.driver` runs).
"""

from __future__ import annotations

import copy
import functools
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
from mrivq.nn.pass_prior import PassPrior, TopFeatures, VolumePrior, near_rows

SHIFT = 24  # rescaling: (value * multiplier) >> SHIFT, in int64
STREAM_BITS = 20  # the residual stream's largest calibrated magnitude is 2**STREAM_BITS units
STREAM_LIMIT = 1 << 42  # the residual stream's clamp, in its units (only a damaged copy comes near it)
#: The constants of the arithmetic, stored in every copy (so its fingerprint covers them).
ARITHMETIC = {"shift": SHIFT, "stream_bits": STREAM_BITS, "stream_limit": STREAM_LIMIT,
              "logit_units": LOGIT_UNITS, "exp_range": EXP_RANGE, "exp_bits": EXP_BITS}


def multiplier_of(ratio: float) -> int:
    """The int64 multiplier ``m`` with ``m / 2**SHIFT`` closest to ``ratio`` (made once, stored)."""
    return round(ratio * (1 << SHIFT))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) int8 @ b (K, N) int8`` -> int32, exact on every machine: through
    ``torch._int_mm`` where it is exact (:func:`int_mm_is_exact`), else (CPUs without VNNI) in
    floating point, where every product and partial sum is an integer small enough to be exact."""
    if a.device.type == "cpu" and not int_mm_is_exact("cpu"):
        return _float_matmul(a, b)
    return _int_mm(a, b)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm``, padding M past 16 and K, N to multiples of 8 (its CUDA kernel needs
    them; zeros change no sum)."""
    m, k = a.shape
    n = b.shape[1]
    pad_m = max(17 - m, 0) + (-(m + max(17 - m, 0)) % 8)
    pad_k, pad_n = -k % 8, -n % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        b = F.pad(b, (0, pad_n, 0, pad_k))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


@functools.cache
def int_mm_is_exact(device: str) -> bool:
    """Whether ``torch._int_mm`` sums int8 products exactly on ``device`` (a type: ``cpu``,
    ``cuda``). oneDNN's kernel for CPUs without VNNI adds pairs of products in 16 bits and
    saturates (all 127 over 576 terms gave 73,440, not 9,290,304), so every extreme pairing is
    tried once over a long sum."""
    for x, y in ((127, 127), (-128, -128), (-128, 127), (127, -128)):
        try:
            product = _int_mm(torch.full((17, 1024), x, dtype=torch.int8, device=device),
                              torch.full((1024, 8), y, dtype=torch.int8, device=device))
        except (RuntimeError, NotImplementedError):
            return False
        if not bool((product == x * y * 1024).all()):
            return False
    return True


def _float_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`int8_matmul` on the CPU in float32 (K up to 1024: every partial sum is an integer of
    at most 2**24, which float32 holds exactly, whatever the order of the sums) or float64 (K up
    to 2**39). The result is rounded to the nearest integer outside torch, so even a last-bit
    error of the floating-point library could not change it."""
    dtype = torch.float32 if a.shape[1] <= 1024 else torch.float64
    product = (a.to(dtype) @ b.to(dtype)).numpy()
    return torch.from_numpy(np.rint(product).astype(np.int32))


def _columns(a: torch.Tensor, dilation: int) -> torch.Tensor:
    """int8 activations ``(B, H, W, C)`` (shifted by -128) -> ``(B * H * W, 9 * C)``: each 3x3
    neighbourhood, -128 (the shifted zero the float convolution pads with) beyond the edges."""
    return patches(a, 3, dilation=dilation, pad=dilation, value=-128).reshape(-1, 9 * a.shape[-1])


class _Conv:
    """One convolution of the copy: int8 weights ``(9C or C, N)``, the -128 shift's correction, and
    per output channel the multiplier into the output's unit and the bias in that unit."""

    def __init__(self, state: dict) -> None:
        self.weight = state["weight"]  # int8 (K, N)
        self.multiplier = state["multiplier"]  # int64 (N,)
        self.dilation = int(state["dilation"])
        self.kernel = int(state["kernel"])
        # round((acc + correction) * multiplier / 2**SHIFT) + bias in one addition before the shift
        # (the same integers): the -128 shift's correction, the rounding half and the bias.
        correction = 128 * self.weight.long().sum(dim=0)
        self.offset = correction * self.multiplier + (1 << (SHIFT - 1)) + (state["bias"] << SHIFT)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        """int8 activations ``(B, H, W, C)`` -> int64 ``(B, H, W, N)`` in the output's unit."""
        batch, height, width, channels = a.shape
        columns = _columns(a, self.dilation) if self.kernel == 3 else a.reshape(-1, channels)
        acc = int8_matmul(columns, self.weight).long().mul_(self.multiplier).add_(self.offset)
        return acc.bitwise_right_shift_(SHIFT).reshape(batch, height, width, -1)


def activate(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """ReLU of the stream ``x`` (int64), requantised to 8 bits by ``multiplier`` and shifted by -128
    to int8 (the product's correction adds ``128 * sum(weights)`` back): ``round(x * m / 2**SHIFT)``
    clamped to [0, 255], minus 128, with the -128 folded in before the shift. ``x`` is first
    clamped to where the result saturates anyway, so the product stays near 2**32."""
    top = ((255 << SHIFT) // max(multiplier, 1)) + 1
    scaled = x.clamp(-1, top).mul_(multiplier).add_((1 << (SHIFT - 1)) - (128 << SHIFT)).bitwise_right_shift_(SHIFT)
    return scaled.clamp_(-128, 127).to(torch.int8)


class _IntegerNet:
    """The fixed-point :class:`PassNet` (its ``widen``, where it has one, a 1x1 convolution into
    the stream's unit and a ReLU before the head), or :class:`TopFeatures` (without tables of steps;
    its head, where it has one, the 1x1 convolution to each bottom position's features)."""

    def __init__(self, state: dict) -> None:
        self.tables = {k: state[k] for k in ("code", "step", "row", "col") if k in state}  # int64, stream unit
        self.order = state.get("order")
        self.passes = int(state.get("passes", 0))
        self.convs = [_Conv(s) for s in state["convs"]]
        self.activations = [int(m) for m in state["activations"]]  # multipliers, one per ReLU
        self.widen = _Conv(state["widen"]) if "widen" in state else None  # before the head (its ReLU the last)
        self.head = _Conv(state["head"]) if "head" in state else None
        self.n_embed = int(state["n_embed"])
        self.near, self.near_follow = state.get("near"), state.get("near_follow")  # neighbour_codes

    def stream(self, codes: torch.Tensor, step: int | None, condition: torch.Tensor | None,
               near: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the last convolution, int64 ``(B, H, W, C)`` (channels last);
        ``near``: the neighbours' table rows (:meth:`near_rows`) of a net with them."""
        if step is None:  # TopFeatures: every code known
            x = self.tables["code"][codes]
        else:
            known = self.order < step
            x = self.tables["code"][torch.where(known[None], codes, self.n_embed)] + self.tables["step"][step]
            x += self.tables["row"][:, None, :] + self.tables["col"][None, :, :]
            for rows in () if near is None else near.unbind(1):
                x += self.near[rows]
        if condition is not None:
            x += condition
        x.clamp_(-STREAM_LIMIT, STREAM_LIMIT)
        for conv, multiplier in zip(self.convs, self.activations):
            x += conv(activate(x, multiplier))
            x.clamp_(-STREAM_LIMIT, STREAM_LIMIT)
        return x

    def head_input(self, codes: torch.Tensor, step: int, condition: torch.Tensor | None,
                   near: torch.Tensor | None = None) -> torch.Tensor:
        """int8 ``(B, P, C)``: the head's input at the ``P`` positions of pass ``step`` (raster order)."""
        x = self.stream(codes, step, condition, near)
        here = (self.order == step).flatten()
        a = activate(x.reshape(len(x), -1, x.shape[-1])[:, here], self.activations[len(self.convs)])
        if self.widen is not None:
            a = activate(self.widen(a[:, :, None, :])[:, :, 0, :], self.activations[-1])
        return a

    def near_rows(self, codes: torch.Tensor, step: int) -> torch.Tensor | None:
        """``(B, len(NEAR), H, W)``: the neighbour tables' rows of the codes known before pass
        ``step`` (:func:`mrivq.nn.pass_prior.near_rows`; the stream's and the logits' alike), or
        None for a net without them."""
        if self.near is None:
            return None
        return near_rows(codes, (self.order < step)[None], self.n_embed)

    def logits(self, head_input: torch.Tensor, near: torch.Tensor | None = None) -> torch.Tensor:
        """int64 ``(P, n_embed)`` logits, in units of 1/LOGIT_UNITS nat, of one grid's ``(P, C)`` head
        input (plus the rows ``near`` ``(len(NEAR), P)`` of the neighbours' tables of log-odds)."""
        logits = self.head(head_input[:, None, None, :]).reshape(len(head_input), -1)
        if near is not None and near.shape[1]:
            # offsets whose row is the same at every position (their code unknown to the whole
            # pass, as the first pass's are) add one summed row: 2-4x fewer additions of P x K
            same = near.amin(1) == near.amax(1)
            logits += self.near_follow[near[same, 0]].sum(0)
            for rows in near[~same]:
                logits += self.near_follow.index_select(0, rows)
        return logits


class IntegerPassPrior(IntegerCopy):
    """The coding path of a :class:`PassPrior` in integers: the coder's weights of every code of a
    pass, the same on any machine, thread count, batch and device."""

    coding = "passes"  # the order it codes in, as a codes file's header names it
    #: Slices coded together (any batch decodes): 4 ran 1.5x as fast as 16 on 2 cores, whose
    #: caches then hold the residual stream (benchmarks/portable_prior.py); and at most in flight.
    batch: ClassVar[dict[str, int]] = {"encode": 4, "decode": 4}
    in_flight: ClassVar[dict[str, int]] = {"encode": 16, "decode": 16}

    def __init__(self, state: dict) -> None:
        super().__init__(state)
        self.top = _IntegerNet(state["top"])
        self.bottom = _IntegerNet(state["bottom"])
        self.condition_net = _IntegerNet(state["condition"])

    def to(self, device) -> IntegerPassPrior:
        """The copy on ``device``, or on the CPU where ``device`` cannot multiply int8 matrices
        exactly (the results are the same everywhere, so only the speed differs)."""
        if torch.device(device).type != "cpu" and not int_mm_is_exact(torch.device(device).type):
            device = "cpu"
        return super().to(device)

    def condition(self, level: str, codes_top: np.ndarray | None, references) -> torch.Tensor | None:
        """int64 ``(B, rows, cols, C)`` or None: what ``level``'s net adds to its inputs (the top
        grid's features over the bottom grid; ``references``: for a volume copy)."""
        if level == "top":
            return None
        net = self.condition_net
        x = net.stream(torch.as_tensor(codes_top, device=self.device), None, None)
        if net.head is None:
            return x.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        # four features per top position, channel c's at 4c + 2i + j for bottom position (i, j)
        # (PyTorch's pixel_shuffle), laid out over the bottom grid, channels last
        x = net.head(activate(x, net.activations[-1]))
        batch, rows, cols, _ = x.shape
        return x.reshape(batch, rows, cols, -1, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(batch, 2 * rows, 2 * cols, -1)

    def logits(self, level: str, net: _IntegerNet, head_input: torch.Tensor, references, i: int,
               here: torch.Tensor, near: torch.Tensor | None = None) -> torch.Tensor:
        """int64 ``(P, K)``: the logits of the positions ``here`` of the batch's slice ``i``, from its
        ``(P, C)`` head input and its neighbours' rows ``near`` (and, for a volume copy, the codes
        of the slices it references)."""
        return net.logits(head_input, near)

    @torch.inference_mode()
    def code_batch(self, lo: int, size: int, code, known=None, references=None) -> tuple[np.ndarray, np.ndarray]:
        """Slices ``lo`` to ``lo + size``, each grid pass by pass, the bottom given the top:
        ``code(level, weights (P, K), slice, positions)`` codes one slice's ``P`` flat positions of a
        pass and returns their codes (``known`` is not needed: a pass reads only the codes of the
        passes before it; ``references``: the codes of the slices it references, for a volume copy). The
        weights are integers from 1 to ``2**EXP_BITS``; the network runs on the whole batch, the
        head one grid at a time (its logits then stay in the caches)."""
        out = {}
        for level, net in (("top", self.top), ("bottom", self.bottom)):
            condition = self.condition(level, out.get("top"), references)
            codes = torch.zeros(size, net.order.numel(), dtype=torch.long, device=self.device)
            for step in range(net.passes):
                here = (net.order.flatten() == step).nonzero()[:, 0]
                where = here.cpu().numpy()
                grid = codes.view(size, *net.order.shape)
                near = net.near_rows(grid, step)
                head_inputs = net.head_input(grid, step, condition, near)
                near = None if near is None else near.flatten(2)[:, :, here]
                symbols = np.stack([code(level, weights_from_logits(
                    self.logits(level, net, head_input, references, i, here, None if near is None else near[i]),
                    self.coder_table), lo + i, where) for i, head_input in enumerate(head_inputs)])
                codes[:, here] = torch.as_tensor(symbols, dtype=torch.long, device=self.device)
            out[level] = codes.view(size, *net.order.shape).cpu().numpy()
        return out["top"], out["bottom"]


class IntegerVolumePrior(IntegerPassPrior):
    """The coding path of a :class:`VolumePrior`: each net also adds the table rows of the codes
    at the same place of the slices it is coded after (``references`` of :meth:`code_batch`: flat
    codes ``(B, 2, P)``, -1 where a slice has none, as :func:`mrivq.compression.driver.run` gives
    them), and its logits those codes' rows of the ``follow`` tables."""

    coding = "volume"
    volumes = True

    def _rows(self, level: str, references, at) -> torch.Tensor:
        """The table rows ``(B, 2, P)`` of the references' codes at ``at`` (or ``(1, 2, 1)``: none)."""
        n_embed = self.top.n_embed
        slot = (n_embed + 1) * torch.arange(VolumePrior.SLOTS, device=self.device)[None, :, None]
        if references is None:
            return slot + n_embed
        codes = torch.as_tensor(references[0 if level == "top" else 1], device=self.device)[at]
        return torch.where(codes < 0, n_embed, codes) + slot

    def condition(self, level: str, codes_top: np.ndarray | None, references) -> torch.Tensor:
        own = super().condition(level, codes_top, references)
        shape = (self.top if level == "top" else self.bottom).order.shape
        seen = self.state[f"seen_{level}"][self._rows(level, references, slice(None))].sum(1)  # (B, P or 1, C)
        seen = seen.expand(len(seen), shape.numel(), -1).reshape(len(seen), *shape, -1)
        return seen if own is None else own + seen

    def logits(self, level: str, net: _IntegerNet, head_input: torch.Tensor, references, i: int,
               here: torch.Tensor, near: torch.Tensor | None = None) -> torch.Tensor:
        rows = self._rows(level, references, (slice(i, i + 1), slice(None), here))[0]  # (2, P or 1)
        logits, follow = net.logits(head_input, near), self.state[f"follow_{level}"]
        for slot_rows in rows:  # index_select: 1.6-2x as fast as indexing here
            logits += follow.index_select(0, slot_rows)
        return logits


# ---------------------------------------------------------------------------------------
# Making the copy
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def pass_copy(prior: PassPrior, codes_top: torch.Tensor, codes_bottom: torch.Tensor) -> IntegerPassPrior:
    """The fixed-point copy of ``prior`` (float32, CPU), its activation scales calibrated on the
    code grids ``codes_top`` ``(N, h, w)`` and ``codes_bottom`` ``(N, 2h, 2w)`` (a few dozen
    training grids): each ReLU's 8-bit range is the largest value it reached over every pass."""
    prior = copy.deepcopy(prior).float().cpu().eval()
    codes_top, codes_bottom = codes_top.long().cpu(), codes_bottom.long().cpu()
    volume = isinstance(prior, VolumePrior)
    records = {}
    _traced(prior.condition, records, "condition", codes_top)
    # A volume prior is calibrated on key slices and on slices between two others (here the grids
    # before and after each in the batch: consecutive training slices are neighbours).
    between = tuple(torch.stack([codes.roll(1, 0), codes.roll(-1, 0)], 1) for codes in (codes_top, codes_bottom))
    for references in (None, between)[:1 + volume]:
        for level, net, codes in (("top", prior.top, codes_top), ("bottom", prior.bottom, codes_bottom)):
            condition = prior.condition_for(level, codes_top, references)
            for step in range(net.passes):
                _traced(net, records, level, codes, torch.full((len(codes),), step), condition)
    stream = max(records[name]["stream"] for name in records)
    unit = stream / (1 << STREAM_BITS)  # one stream unit in float
    state = {
        # Bump the version whenever the integer arithmetic changes: a stored copy of another
        # version is then refused by name, never misread.
        "format": "mrivq-integer-pass-prior", "version": 1, "arithmetic": ARITHMETIC,
        "n_embed": prior.n_embed, "top_grid": list(prior.top_grid),
        "top": _net_state(prior.top, records["top"], unit, head=True),
        "bottom": _net_state(prior.bottom, records["bottom"], unit, head=True),
        "condition": _net_state(prior.condition, records["condition"], unit, head=False),
        "exp_table": exp_table(),
    }
    if volume:
        state["format"] = "mrivq-integer-volume-prior"
        for level in ("top", "bottom"):
            state[f"seen_{level}"] = table(getattr(prior, f"seen_{level}").weight, unit)
            state[f"follow_{level}"] = table(getattr(prior, f"follow_{level}").weight, 1.0 / LOGIT_UNITS)
    problem = bounds_problem(state, BOUNDS)
    if problem:
        raise ValueError(f"the integer copy of this prior {problem}: its activations or weights are out of "
                         "the fixed-point ranges; retrain the prior")
    return (IntegerVolumePrior if volume else IntegerPassPrior)(state)


def _traced(net, records: dict, name: str, *args) -> torch.Tensor:
    """Run ``net`` and keep, for ``name``, the largest |stream| and the largest input of each ReLU."""
    record = records.setdefault(name, {"stream": 0.0, "relu": []})
    if isinstance(net, TopFeatures):
        x = net.code(args[0]).permute(0, 3, 1, 2)
    else:
        codes, step, condition = args
        x = net.inputs(codes, step)
        if condition is not None:
            x = x + condition
    relus = []
    for conv in net.convs:
        record["stream"] = max(record["stream"], float(x.abs().max()))
        relus.append(float(x.clamp(min=0).max()))
        x = x + conv(F.relu(x))
    record["stream"] = max(record["stream"], float(x.abs().max()))
    if isinstance(net, TopFeatures):
        if net.out is not None:
            relus.append(float(x.clamp(min=0).max()))
        out = net.upsample(x)
    else:
        relus.append(float(x.clamp(min=0).max()))
        x = F.relu(x)
        if net.widen is not None:
            x = net.widen(x)
            relus.append(float(x.clamp(min=0).max()))
            x = F.relu(x)
        out = net.head(x)
    record["relu"] = [max(a, b) for a, b in zip(record["relu"], relus)] if record["relu"] else relus
    return out


def _net_state(net, record: dict, unit: float, *, head: bool) -> dict:
    """Integer tables, convolutions and activation multipliers of one net. A ReLU that stayed
    (nearly) dead in calibration gets the range of a 2**-12 share of the stream's, so its
    multiplier stays bounded (its outputs are 0 either way)."""
    floor = unit * (1 << STREAM_BITS) / 4096
    relu_scales = [max(top, floor) / 255 for top in record["relu"]]  # float per uint8 step
    state = {"n_embed": net.code.num_embeddings - (0 if isinstance(net, TopFeatures) else 1),
             "activations": torch.tensor([multiplier_of(unit / s) for s in relu_scales], dtype=torch.int64),
             "convs": [_conv_state(conv, relu_scales[i], unit) for i, conv in enumerate(net.convs)]}
    state["code"] = table(net.code.weight, unit)
    if isinstance(net, TopFeatures) and net.out is not None:  # features in the stream's unit
        state["head"] = _conv_state(net.out, relu_scales[-1], unit)
    if head:
        state["step"] = table(net.step.weight[net.pass_row], unit)  # a net that learnt masks: each pass's share
        state["row"] = table(net.row.weight, unit)
        state["col"] = table(net.col.weight, unit)
        state["order"] = net.order.clone()
        state["passes"] = net.passes
        if net.widen is not None:  # its output in the stream's unit
            state["widen"] = _conv_state(net.widen, relu_scales[-2], unit)
        if net.near is not None:  # neighbour_codes
            state["near"] = table(net.near.weight, unit)
            state["near_follow"] = table(net.near_follow.weight, 1.0 / LOGIT_UNITS)
        state["head"] = _conv_state(net.head, relu_scales[-1], 1.0 / LOGIT_UNITS)
    return state


def _conv_state(conv: torch.nn.Conv2d, input_scale: float, output_unit: float) -> dict:
    """int8 weights laid out as :func:`_columns` (tap-major, then input channel), per output
    channel scale; multipliers from the int32 product's unit to ``output_unit``."""
    w = conv.weight.detach().double()  # (N, C, k, k)
    n, c, k, _ = w.shape
    scale = w.abs().amax(dim=(1, 2, 3)).clamp(min=1e-12) / 127  # (N,)
    q = torch.round(w / scale[:, None, None, None]).clamp(-127, 127)
    layout = q.permute(2, 3, 1, 0).reshape(k * k * c, n)  # (taps, C) x N
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(n, dtype=torch.float64)
    return {"weight": layout.to(torch.int8), "kernel": k, "dilation": int(conv.dilation[0]),
            "multiplier": torch.tensor([multiplier_of(input_scale * float(s) / output_unit) for s in scale],
                                       dtype=torch.int64),
            "bias": torch.round(bias / output_unit).long()}




# ---------------------------------------------------------------------------------------
# Checking a copy read from a file
# ---------------------------------------------------------------------------------------

#: Limits of a copy read from a file, by the key of each tensor: with the stream clamped to
#: STREAM_LIMIT, at most 1024 channels (a product below 2**29) and the bias shifted up by SHIFT
#: bits, every product and sum stays inside int64.
BOUNDS = {"multiplier": 1 << 34, "activations": 1 << 30, "bias": 1 << 30, "code": 1 << 36, "step": 1 << 36,
          "row": 1 << 36, "col": 1 << 36, "seen_top": 1 << 35, "seen_bottom": 1 << 35,
          "follow_top": 1 << 36, "follow_bottom": 1 << 36, "near": 1 << 36, "near_follow": 1 << 36}


def pass_copy_problem(state, prior: PassPrior) -> str | None:
    """What is wrong with ``state`` as the integer copy of ``prior`` (a file's, so untrusted), or
    None: its structure, types, shapes, constants, pass orders and exponential table those of a
    copy of a fresh prior of ``prior``'s sizes (never the file's weights), and its values within
    the bounds that keep every product inside int64."""
    template = pass_copy(prior.fresh(), torch.zeros(1, *prior.top_grid, dtype=torch.long),
                         torch.zeros(1, *prior.bottom_grid, dtype=torch.long)).state
    problem = template_problem(state, template) or bounds_problem(state, BOUNDS)
    if problem:
        return problem
    for level in ("top", "bottom"):
        if not torch.equal(state[level]["order"], template[level]["order"]):
            return f"has another pass order for the {level} grid"
    return None
