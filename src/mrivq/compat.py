"""Files of earlier mrivq versions: what each lacks, and what it meant. The one place that knows.

The rest of mrivq reads today's formats only; what older files still load goes through here:

* **stored configs** (a checkpoint's or run directory's): keys added since take the value
  the file was trained with, not today's default (:data:`STORED_DEFAULTS`);
* **old names of values**: ``model.block: report`` is today's ``relu`` (:data:`RENAMED`);
* **old names of keys**: the prior section's flat keys (``prior.channels``, ``prior.d_model``,
  ``prior.augment_shift``, ...) are today's nested ones (``prior.passes.channels``, ...;
  :data:`PRIOR_MOVED`), in stored configs silently, in the user's with a deprecation line
  on stderr;
* **a resumed run's running sums** saved before the applied-steps count existed
  (:func:`running_sums`).

Refused in one line naming what to do: codes files of version 1 (``.npz``,
:mod:`mrivq.compression.container`), and checkpoints of runs without the loop's position in
the epoch (:mod:`mrivq.engine.loop`), which no version since can resume.
"""

from __future__ import annotations

import copy
import sys

from mrivq.errors import ConfigError

#: Per section, keys added after configs were first stored, with the value those configs meant.
#: The prior's are keys of its old flat shape and apply to stored configs of that shape only
#: (a stored prior section with ``kind`` or a nested section is today's, read as is).
STORED_DEFAULTS = {
    "model": {"block": "relu", "lookup": "euclidean", "restart_from": "random", "kmeans_iters": 0,
              "bottom_dropout": 0.0},
    "data": {"train_crop": None},
    "train": {"clamp_loss": False, "ema_decay": None, "restart_until": 1.0},
    "prior": {"neighbour_codes": False, "architecture": "transformer"},
}

#: Keys added to the nested prior section's kinds after such configs were first stored, with the
#: value those configs meant (a stored nested prior section lacking one gets it).
STORED_PRIOR_KINDS = {kind: {"condition_shuffle": False, "head_channels": 0, "neighbour_codes": False,
                             "top_masks": 0.0} for kind in ("passes", "volume")}

#: Per section and key, old names of values and today's names.
RENAMED = {"model": {"block": {"report": "relu"}}}

#: The prior section's flat keys (before it was nested by what each key configures) and today's
#: key(s) of each, below ``prior``; ``condition_blocks`` sized both architectures, so it sets both.
PRIOR_MOVED: dict[str, tuple[str, ...]] = {
    "architecture": ("kind",),
    **{key: (f"passes.{key}",) for key in ("channels", "layers", "passes_top", "passes_bottom")},
    **{key: (f"transformer.{key}",) for key in ("d_model", "n_head", "n_layer_top", "n_layer_bottom",
                                                 "bottom_window_rows", "neighbour_codes", "dropout")},
    "condition_blocks": ("passes.condition_blocks", "transformer.condition_blocks"),
    "augment_flip": ("copies.flip",),
    "augment_shift": ("copies.shift",),
    "augment_scale": ("copies.scale",),
}

#: Keys only today's nested prior section has: a stored prior section with any is read as is.
_NESTED_PRIOR = {"kind", "passes", "volume", "transformer", "rows", "copies"}


def stored_config(raw: dict) -> dict:
    """A config dict as stored by any mrivq version -> today's keys (the caller's dict unchanged)."""
    out = dict(raw)
    for section, defaults in STORED_DEFAULTS.items():
        given = out.get(section, {})
        if not isinstance(given, dict) or (section == "prior" and _NESTED_PRIOR & given.keys()):
            continue
        out[section] = {**defaults, **given}
    out = moved_keys(out, deprecated=False)
    prior = out.get("prior")
    if isinstance(prior, dict):
        kinds = {kind: {**defaults, **prior.get(kind, {})} for kind, defaults in STORED_PRIOR_KINDS.items()
                 if isinstance(prior.get(kind, {}), dict)}
        out["prior"] = {**prior, **kinds}
    return out


def moved_keys(raw: dict, *, deprecated: bool = True) -> dict:
    """A config dict with the old flat prior keys at today's nested keys (the caller's dict
    unchanged); with ``deprecated``, one line on stderr for each old key given (a user's config,
    not a stored one). An old key and its new key both given are a :class:`ConfigError`."""
    prior = raw.get("prior")
    if not isinstance(prior, dict) or not PRIOR_MOVED.keys() & prior.keys():
        return raw
    prior = copy.deepcopy(prior)
    for old, new in PRIOR_MOVED.items():
        if old not in prior:
            continue
        value = prior.pop(old)
        for key in new:
            node, *path, leaf = prior, *key.split(".")
            for part in path:
                if node.get(part) is None:
                    node[part] = {}
                if not isinstance(node[part], dict):
                    raise ConfigError(f"config key 'prior.{part}': expected a section of keys, got "
                                      f"{node[part]!r} (prior.{old} is now prior.{key})")
                node = node[part]
            if leaf in node:
                raise ConfigError(f"prior.{old} and prior.{key} both given: prior.{old} is the old name "
                                  f"of prior.{key}; keep one")
            node[leaf] = value
        if deprecated:
            deprecation(f"prior.{old}", [f"prior.{key}" for key in new])
    return {**raw, "prior": prior}


def current_keys(key: str) -> tuple[str, ...]:
    """Today's dotted key(s) of a dotted key (a ``--set`` override's), with a deprecation line
    when it is an old name; other keys as given."""
    section, _, name = key.partition(".")
    if section != "prior" or name not in PRIOR_MOVED:
        return (key,)
    new = tuple(f"prior.{moved}" for moved in PRIOR_MOVED[name])
    deprecation(key, new)
    return new


def deprecation(old: str, new) -> None:
    """The one line on stderr that says a key given under its old name has a new one."""
    print(f"mrivq: {old} is now {' and '.join(new)} (the old name still loads)", file=sys.stderr)


def new_name(section: str, key: str, value):
    """Today's name of a value given under an old one (``report`` -> ``relu``); others as given."""
    names = RENAMED.get(section, {}).get(key, {})
    return names.get(value, value) if isinstance(value, str) else value


def _as_written(value) -> str:
    """A value as a config file writes it (false, null, 0.0, relu)."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def stored_default(section: str, key: str) -> str:
    """The sentence a key's description carries: what an older stored config gets."""
    if section in STORED_PRIOR_KINDS:  # a prior kind's section
        return f"A stored config without it loads as {_as_written(STORED_PRIOR_KINDS[section][key])}."
    if section == "prior":  # the old flat shape's keys (STORED_DEFAULTS)
        return (f"A stored config of the old flat shape without prior.{key} loads as "
                f"{_as_written(STORED_DEFAULTS[section][key])}.")
    return f"A stored config without it loads as {_as_written(STORED_DEFAULTS[section][key])}."


def running_sums(sums, steps: int, size: int):
    """Running sums (a float tensor) of a resumed run, grown to ``size`` entries: sums saved before
    the applied-steps count (the VQ-VAE's sixth entry) existed had every step applied."""
    out = sums.double().new_zeros(max(size, len(sums)))
    out[:len(sums)] = sums.double()
    if len(sums) == 5 and size == 6:
        out[5] = float(steps)
    return out
