"""Which slices the data settings point at: real HipMRI folders, or the built-in phantom set.

``data`` below is the ``data`` section of a config (anything with its attributes).

With no ``data.root`` and no split folders, mrivq uses a phantom dataset generated once
into the cache (``<cache_dir>/phantom/...``) and reused by every later run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mrivq.data.cache import default_cache_dir
from mrivq.data.splits import Splits, resolve_splits

log = logging.getLogger("mrivq.data")

PHANTOM_VERSION = 3


PHANTOM_SEED = 0  # fixed, so that runs with different training seeds share one data set


def phantom_set(cache_dir: Path | None, cases: int | None) -> Path:
    """Folder of a phantom set in the cache, generated on first use: ``cases`` case volumes, or
    with ``cases=None`` HipMRI's own counts (11,460 / 660 / 540 slices, for benchmarks)."""
    from mrivq.data.phantom import synthesize

    name = (f"hipmri-v{PHANTOM_VERSION}-seed{PHANTOM_SEED}" if cases is None
            else f"v{PHANTOM_VERSION}-cases{cases}-seed{PHANTOM_SEED}")
    root = Path(cache_dir or default_cache_dir()) / "phantom" / name
    if not root.is_dir():
        log.info("generating the built-in phantom set (%s) into %s",
                 "HipMRI's counts" if cases is None else f"{cases} cases", root)
        root.parent.mkdir(parents=True, exist_ok=True)
        if cases is None:
            synthesize(root, hipmri_counts=True, seed=PHANTOM_SEED, montage=False)
        else:
            synthesize(root, cases=cases, seed=PHANTOM_SEED, montage=True)
    return root


def phantom_root(data) -> Path:
    """Folder of the default phantom set for these data settings, generated on first use."""
    return phantom_set(data.cache_dir, data.phantom_cases)


def data_splits(data, seed: int) -> Splits:
    """The train/validate/test file lists of the data settings (the phantom when none is given)."""
    root = phantom_root(data) if data.uses_phantom else data.root
    return resolve_splits(root, data.train_dir, data.validate_dir, data.test_dir,
                          fractions=tuple(data.split_fractions), seed=seed)
