"""JSON that every parser accepts: NaN and Infinity become ``null``.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which jq, JavaScript and most
other parsers reject. Every JSON mrivq writes or prints goes through :func:`dumps`: a
missing score (a structure with no slices) or an infinite one (the PSNR of a perfect
reconstruction) reads as ``null``.

Example::

    >>> dumps({"ssim": float("nan"), "psnr": [float("inf"), 31.5]})
    '{"ssim": null, "psnr": [null, 31.5]}'
"""

from __future__ import annotations

import json
import math


def finite_or_none(obj):
    """``obj`` with every non-finite float (in dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(value) for value in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of ``obj`` with NaN/Infinity as null; never emits a non-standard token."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
