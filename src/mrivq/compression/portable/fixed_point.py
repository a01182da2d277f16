"""The fixed-point toolkit every integer copy uses (a range decoder must rebuild the encoder's
frequencies exactly, which floating point does not promise across machines):

- **Logits to weights**: logits in ``1 / LOGIT_UNITS`` nat; the table :func:`exp_table` (stored
  in each copy) turns each gap to the largest logit into an integer weight, handed to the coder
  as float64 (exact), which normalises them itself the same way on every machine.
- **Checks of a copy read from a file**: structure, types and shapes against a template made
  from a fresh prior of the same sizes (:func:`template_problem`); tables within named limits by
  their least and greatest values (:func:`bounds_problem`: ``abs`` of int64's least value wraps).
- **Fingerprints** over every tensor and number of a copy's state (:func:`fingerprint_state`).

Each copy's own arithmetic (stream unit, its clamp ``stream_limit``, shifts) is a dict of
constants stored in the copy: its fingerprint covers them, and the template comparison refuses
a copy of other arithmetic.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

LOGIT_UNITS = 64  # logits in units of 1/64 nat
EXP_RANGE = 16  # nats: gaps to the largest logit beyond this get the table's last entry
EXP_BITS = 20  # the most probable code's weight is 2**EXP_BITS


class IntegerCopy:
    """What every integer copy holds: its ``state`` (integer tensors and numbers; the exponential
    table at ``exp_table``), the coder's table, its device and fingerprint. A kind's copy adds
    ``coding`` (its order's name in a codes file), ``batch`` and ``in_flight`` (slices coded
    together and at most at once, ``{"encode": .., "decode": ..}``) and ``code_batch`` (its order,
    run by :mod:`mrivq.compression.driver`). ``volumes``: whether ``code_batch`` codes each slice
    given the slice before it in its volume (its ``previous``)."""

    volumes = False

    def __init__(self, state: dict) -> None:
        self.state = state
        self.exp_table = state["exp_table"]  # int64 (EXP_RANGE * LOGIT_UNITS + 1,)
        self.coder_table = coder_table(self.exp_table)
        self.device = self.exp_table.device

    def to(self, device):
        """The copy on ``device`` (the same integers there)."""
        return type(self)(map_tensors(self.state, lambda t: t.to(device)))

    def fingerprint(self) -> str:
        return fingerprint_state(self.state)


def exp_table() -> torch.Tensor:
    """int64 ``(EXP_RANGE * LOGIT_UNITS + 1,)``: the weight of a logit ``d`` units below the largest."""
    return torch.tensor([max(1, round((1 << EXP_BITS) * math.exp(-d / LOGIT_UNITS)))
                         for d in range(EXP_RANGE * LOGIT_UNITS + 1)], dtype=torch.int64)


def coder_table(table: torch.Tensor) -> np.ndarray:
    """The exponential table as the float64 numbers the range coder takes: exact, as every entry and
    every sum of them is an integer below 2**53. Made outside torch: no torch float result."""
    return table.cpu().numpy().astype(np.float64)


def weights_from_logits(logits: torch.Tensor, table: np.ndarray) -> np.ndarray:
    """int64 logits ``(..., K)`` in 1/LOGIT_UNITS nat -> integer weights ``(..., K)`` as float64,
    ``table[largest logit - logit]`` (:func:`coder_table`). ``logits`` is overwritten."""
    gap = logits.sub_(logits.amax(dim=-1, keepdim=True)).neg_().clamp_(max=len(table) - 1)
    return np.take(table, gap.cpu().numpy())


def table(weight: torch.Tensor, unit: float) -> torch.Tensor:
    """A float table (an embedding) as int64 in ``unit``."""
    return torch.round(weight.detach().double() / unit).long()


def patches(x: torch.Tensor, kernel: int, *, dilation: int = 1, pad: int = 0, value: int = 0) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, H', W', kernel * kernel * C)``: each output position's
    ``kernel x kernel`` neighbourhood at ``dilation``, taps outermost, ``value`` beyond the edges."""
    padded = F.pad(x, (0, 0, pad, pad, pad, pad), value=value)
    height = padded.shape[1] - dilation * (kernel - 1)
    width = padded.shape[2] - dilation * (kernel - 1)
    taps = [padded[:, i * dilation:i * dilation + height, j * dilation:j * dilation + width]
            for i in range(kernel) for j in range(kernel)]
    return torch.cat(taps, dim=-1)


def beyond(values: torch.Tensor, limit: int) -> bool:
    """Whether any of ``values`` lies outside ``[-limit, limit]``, by the least and greatest value."""
    return values.numel() > 0 and (int(values.min()) < -limit or int(values.max()) > limit)


def bounds_problem(state, limits: dict[str, int], where: str = "") -> str | None:
    """The first tensor of a copy's ``state`` whose values pass its entry in ``limits`` (by the
    tensor's own key), named; None when every one is within."""
    if isinstance(state, dict):
        return next(filter(None, (bounds_problem(v, limits, f"{where}/{k}") for k, v in state.items())), None)
    if isinstance(state, list):
        return next(filter(None, (bounds_problem(v, limits, f"{where}[{i}]") for i, v in enumerate(state))), None)
    limit = limits.get(where.rsplit("/", 1)[-1])
    if isinstance(state, torch.Tensor) and limit is not None and beyond(state, limit):
        return f"has values beyond {limit} at {where}"
    return None


def template_problem(state, template: dict) -> str | None:
    """What of a file's copy ``state`` differs from ``template`` (a copy made from a fresh prior of the
    same sizes) in structure, types, shapes or constants, or whose exponential table is not the one
    :func:`exp_table` makes; None otherwise."""
    problem = compare(state, template)
    if problem is None and not torch.equal(state["exp_table"], template["exp_table"]):
        problem = "has another exponential table"
    return problem


def compare(value, template, where: str = "") -> str | None:
    """The first place where ``value`` differs from ``template`` in structure, a tensor's type or
    shape, or a plain value; None."""
    if isinstance(template, dict):
        if not isinstance(value, dict) or set(value) != set(template):
            return f"has other entries at {where or 'its top'}"
        return next(filter(None, (compare(value[k], template[k], f"{where}/{k}") for k in template)), None)
    if isinstance(template, list):
        if not isinstance(value, list) or len(value) != len(template):
            return f"has another number of entries at {where}"
        return next(filter(None, (compare(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, template)))),
                    None)
    if isinstance(template, torch.Tensor):
        if not (isinstance(value, torch.Tensor) and value.dtype == template.dtype and value.shape == template.shape
                and value.layout == torch.strided):
            return f"has a tensor of another type or shape at {where}"
        return None
    if type(value) is not type(template) or value != template:
        return f"has {value!r:.40} where {template!r:.40} belongs at {where}"
    return None


def fingerprint_state(state) -> str:
    """sha256 over every tensor (dtype, shape, bytes) and number of a copy's state, in key order."""
    digest = hashlib.sha256()

    def feed(value, key=""):
        digest.update(key.encode())
        if isinstance(value, dict):
            for k in sorted(value):
                feed(value[k], f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                feed(item, f"{key}[{i}]")
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    feed(state)
    return digest.hexdigest()[:16]


def map_tensors(value, fn):
    """``value`` (nested dicts and lists) with ``fn`` applied to every tensor."""
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    return fn(value) if isinstance(value, torch.Tensor) else value
