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


def phantom_root(data) -> Path:
    """Folder of the default phantom set for these settings, generated on first use."""
    from mrivq.data.phantom import synthesize

    cache = data.cache_dir or default_cache_dir()
    root = cache / "phantom" / f"v{PHANTOM_VERSION}-cases{data.phantom_cases}-seed{PHANTOM_SEED}"
    if not root.is_dir():
        log.info("generating the built-in phantom set (%d cases) into %s", data.phantom_cases, root)
        root.parent.mkdir(parents=True, exist_ok=True)
        synthesize(root, cases=data.phantom_cases, seed=PHANTOM_SEED, montage=True)
    return root


def data_splits(data, seed: int) -> Splits:
    """The train/validate/test file lists of the data settings (the phantom when none is given)."""
    root = phantom_root(data) if data.uses_phantom else data.root
    return resolve_splits(root, data.train_dir, data.validate_dir, data.test_dir,
                          fractions=tuple(data.split_fractions), seed=seed)
