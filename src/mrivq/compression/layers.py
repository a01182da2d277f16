"""Coding layers: what a codes file carries on top of the codes, one registry entry each.

A layer stores, per slice, what turns the slice decoded from the codes (scanner intensities on
its own grid) into a better one: a residual under a bound, or the exact intensities. The codes
file keeps each layer's payloads in a section of its own (``layer-<name>``), its header lists
the layers in the order they apply; :class:`mrivq.compression.codec.Codec` writes them
(``compress(slices, layers=[name])``) and applies them on ``decompress``. A payload is
untrusted: ``decode`` bounds what it allocates and raises ``ValueError`` on a damaged one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CodingLayer:
    """One layer: ``name`` (its section: ``layer-<name>``), ``label`` (in messages), ``encode(original
    (H, W) float, decoded (H, W) float32) -> bytes`` and ``decode(payload, decoded) -> (H, W)``."""

    name: str
    label: str
    encode: Callable[[np.ndarray, np.ndarray], bytes]
    decode: Callable[[bytes, np.ndarray], np.ndarray]


#: The layers, by name.
LAYERS: dict[str, CodingLayer] = {}


def register(layer: CodingLayer) -> CodingLayer:
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", layer.name):  # what a codes file's header accepts
        raise ValueError(f"a coding layer's name is 1-32 lowercase letters, digits or _, not {layer.name!r}")
    LAYERS[layer.name] = layer
    return layer
