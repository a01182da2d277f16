"""Files of earlier mrivq versions: what each lacks, and what it meant. The one place that knows.

The rest of mrivq reads today's formats only; what older files still load goes through here:

* **stored configs** (a checkpoint's or run directory's): keys added since take the value
  the file was trained with, not today's default (:data:`STORED_DEFAULTS`);
* **old names of values**: ``model.block: report`` is today's ``relu`` (:data:`RENAMED`);
* **a resumed run's running sums** saved before the applied-steps count existed
  (:func:`running_sums`).

Refused in one line naming what to do: codes files of version 1 (``.npz``,
:mod:`mrivq.compression.container`), and checkpoints of runs without the loop's position in
the epoch (:mod:`mrivq.engine.loop`), which no version since can resume.
"""

from __future__ import annotations

#: Per section, keys added after configs were first stored, with the value those configs meant.
STORED_DEFAULTS = {
    "model": {"block": "relu", "lookup": "euclidean", "restart_from": "random", "kmeans_iters": 0,
              "bottom_dropout": 0.0},
    "prior": {"neighbour_codes": False, "architecture": "transformer"},
}

#: Per section and key, old names of values and today's names.
RENAMED = {"model": {"block": {"report": "relu"}}}


def stored_config(raw: dict) -> dict:
    """A config dict as stored by any mrivq version -> today's keys (the caller's dict unchanged)."""
    out = dict(raw)
    for section, defaults in STORED_DEFAULTS.items():
        if isinstance(out.get(section, {}), dict):
            out[section] = {**defaults, **out.get(section, {})}
    return out


def new_name(section: str, key: str, value):
    """Today's name of a value given under an old one (``report`` -> ``relu``); others as given."""
    names = RENAMED.get(section, {}).get(key, {})
    return names.get(value, value) if isinstance(value, str) else value


def stored_default(section: str, key: str) -> str:
    """The sentence a key's description carries: what an older stored config gets."""
    return f"A stored config without it loads as {STORED_DEFAULTS[section][key]}."


def running_sums(sums, steps: int, size: int):
    """Running sums (a float tensor) of a resumed run, grown to ``size`` entries: sums saved before
    the applied-steps count (the VQ-VAE's sixth entry) existed had every step applied."""
    out = sums.double().new_zeros(max(size, len(sums)))
    out[:len(sums)] = sums.double()
    if len(sums) == 5 and size == 6:
        out[5] = float(steps)
    return out
