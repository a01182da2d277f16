"""The codes file (``mrivq encode`` writes it, ``mrivq decode`` reads it).

One ``.npz`` holds the top and bottom code indices together with everything decode needs to
write each slice back as NIfTI in scanner intensities with its original affine, shape and file
name: the normalisation parameters, the fit policy, the shapes, the affines and a fingerprint
of the codebooks (so codes are never decoded by a model they were not made with).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from mrivq import strict_json
from mrivq.data.preprocess import Preprocessing
from mrivq.errors import UserError
from mrivq.nn.vqvae2 import code_grid_shapes
from mrivq.run_dir import atomic_write

FORMAT = "mrivq-codes"
FORMAT_VERSION = 1
_ARRAYS = ("codes_top", "codes_bottom", "norm", "affines", "shapes")


def write_codes(path: Path, *, codes_top: np.ndarray, codes_bottom: np.ndarray, n_embed: int, fingerprint: str,
                prep: Preprocessing, norm: np.ndarray, affines: np.ndarray, shapes: list, sources: list[dict],
                report: dict) -> None:
    """Write a codes file atomically. ``codes_*``: ``(N, h, w)``, ``(N, 2h, 2w)``; ``norm``: ``(N, 2)``;
    ``affines``: ``(N, 4, 4)``; ``shapes``: each slice's ``(h, w)``; ``sources``: per slice, the
    output ``name``, the on-disk ``shape`` and ``dtype``; ``report``: the bits report."""
    arrays = {
        "format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION),
        "codes_top": codes_top.astype(np.uint16), "codes_bottom": codes_bottom.astype(np.uint16),
        "n_embed": np.array(n_embed), "fingerprint": np.array(fingerprint),
        "image_size": np.array(prep.image_size), "fit": np.array(prep.fit),
        "normalize": np.array(prep.normalize), "percentiles": np.array(prep.percentiles),
        "norm": np.asarray(norm).astype(np.float32), "affines": np.asarray(affines).astype(np.float64),
        "shapes": np.array(shapes, dtype=np.int64), "sources": np.array(json.dumps(sources)),
        "report": np.array(strict_json.dumps(report)),
    }
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))


def read_codes(path: str | Path) -> dict:
    """Load and check a codes file written by :func:`encode`; a clear :class:`UserError` otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"codes file not found: {path} (write one with `mrivq encode`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{path}: not a readable codes file (truncated or corrupt: "
                        f"{str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__}); "
                        "encode the slices again") from None
    if str(data.get("format", "")) != FORMAT:
        raise UserError(f"{path}: not an mrivq codes file (write one with `mrivq encode`)")
    if int(data.get("format_version", -1)) != FORMAT_VERSION:
        raise UserError(f"{path}: codes file version {data.get('format_version')} is not supported "
                        f"(this mrivq reads version {FORMAT_VERSION}); encode the slices again")
    missing = [key for key in (*_ARRAYS, "n_embed", "fingerprint", "image_size", "fit", "normalize",
                               "sources") if key not in data]
    if missing:
        raise UserError(f"{path}: codes file lacks {', '.join(missing)}; encode the slices again")
    try:
        sources = json.loads(str(data["sources"]))
    except json.JSONDecodeError:
        raise UserError(f"{path}: codes file has unreadable source names; encode the slices again") from None
    n = len(data["codes_top"])
    top_shape, bottom_shape = code_grid_shapes(tuple(int(v) for v in data["image_size"]))
    consistent = (data["codes_top"].shape == (n, *top_shape)
                  and data["codes_bottom"].shape == (n, *bottom_shape)
                  and data["norm"].shape == (n, 2) and data["affines"].shape == (n, 4, 4)
                  and data["shapes"].shape == (n, 2) and len(sources) == n and n > 0)
    if not consistent:
        raise UserError(f"{path}: codes file is inconsistent (code grids, metadata and slice counts do "
                        "not agree); encode the slices again")
    n_embed = int(data["n_embed"])
    if max(int(data["codes_top"].max()), int(data["codes_bottom"].max())) >= n_embed:
        raise UserError(f"{path}: codes file holds code indices >= its codebook size {n_embed}; "
                        "encode the slices again")
    data["sources"] = sources
    return data
