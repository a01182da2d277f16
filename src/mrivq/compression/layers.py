"""Coding layers: what a codes file carries on top of the codes, one registry entry each.

A layer stores, per slice, what turns the picture decoded from the codes into a better one: the
stored values within a bound, or exactly. The codes file keeps each layer's payloads in a
section of its own (``layer-<name>``), its header lists the layers in the order they apply;
:class:`mrivq.compression.codec.Codec` writes them (``compress(slices, layers=[name],
layer_options={name: {...}})``) and applies them on ``decompress``. A layer sees the picture in
float64 scanner intensities: decoded by the decoder's integer copy for new files (the same
numbers on every machine), in float64 for files before it (the same to far below a stored unit;
a layer that rounds it must still guard against ties); a layer that codes volumes also sees the
slices it is coded after. It gives back a :class:`Stored` slice: the numbers the input file
held, written back in its own type. A payload is untrusted: ``decode`` bounds what it allocates
and raises ``ValueError`` on a damaged one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stored:
    """A slice as its file stores it: ``values`` ``(h, w)`` before ``scl_slope`` / ``scl_inter``
    (int64 for an integer type, float64 for a float type), the on-disk ``dtype`` and the scaling
    that makes them scanner intensities."""

    values: np.ndarray
    dtype: str
    slope: float = 1.0
    inter: float = 0.0

    def scanner(self) -> np.ndarray:
        """Scanner intensities, float64."""
        return self.values * self.slope + self.inter


class Refused(ValueError):
    """A slice a layer cannot code as asked (the message says why, for the user)."""


@dataclass(frozen=True)
class CodingLayer:
    """One layer: ``name`` (its section: ``layer-<name>``), ``label`` (in messages), ``encode(original:
    Stored, picture (h, w) float64, **options) -> bytes`` and ``decode(payload, picture) -> Stored``.
    ``references``: whether it codes a slice of a volume given others (both functions then take
    ``references``, the :class:`Stored` slices it is coded after as this layer decoded them: two
    of its volume, or none for a key slice; the codec picks them and the file lists them)."""

    name: str
    label: str
    encode: Callable[..., bytes]
    decode: Callable[..., Stored]
    references: bool = False


#: The layers, by name.
LAYERS: dict[str, CodingLayer] = {}


def register(layer: CodingLayer) -> CodingLayer:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", layer.name):  # what a codes file's header accepts
        raise ValueError(f"a coding layer's name is 1-32 lowercase letters, digits or _, not {layer.name!r}")
    LAYERS[layer.name] = layer
    return layer
