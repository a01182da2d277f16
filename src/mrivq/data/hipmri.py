"""HipMRI's anatomy: the mask labels, the structures scored, and masks fitted like their slices.

HipMRI keeps one mask per slice in ``keras_slices_seg_<split>`` (found with
:func:`mrivq.data.splits.mask_path`), labelled as in :data:`LABELS`
(0 background, 1 body, 2 bone, 3 bladder, 4 rectum, 5 prostate); the phantom writes the same.
A mask is fitted to ``data.image_size`` exactly as its slice is (``pad_crop``: the same crop
and a background pad; ``resize``: nearest neighbour, so labels stay labels).

Example::

    >>> masks, present = load_masks(test.files, test.original_shapes, Preprocessing.from_settings(config.data))
    >>> masks.shape, masks.dtype, present.sum()
    ((120, 256, 128), dtype('uint8'), 120)
"""

from __future__ import annotations

import logging

import numpy as np

from mrivq.data.io import read_slice
from mrivq.data.preprocess import Preprocessing, fit_to_shape
from mrivq.data.splits import mask_path
from mrivq.errors import BadFileError

log = logging.getLogger("mrivq")

#: HipMRI mask labels (the phantom writes the same).
LABELS = {0: "background", 1: "body", 2: "bone", 3: "bladder", 4: "rectum", 5: "prostate"}

_LABEL_OF = {name: label for label, name in LABELS.items()}

# Structures scored, prostate first (the organ the study is about); "foreground" is every
# labelled pixel (labels 1-5), i.e. the whole body without the dark background.
STRUCTURES: dict[str, tuple[int, ...]] = {
    "prostate": (_LABEL_OF["prostate"],),
    "rectum": (_LABEL_OF["rectum"],),
    "bladder": (_LABEL_OF["bladder"],),
    "bone": (_LABEL_OF["bone"],),
    "body": (_LABEL_OF["body"],),
    "foreground": tuple(label for label in sorted(LABELS) if label != 0),
}


def fit_mask(mask: np.ndarray, size: tuple[int, int], policy: str) -> np.ndarray:
    """Fit a ``(h, w)`` label mask to ``size`` like :func:`fit_to_shape` fits its slice -> uint8."""
    mask = np.asarray(mask)
    if mask.shape == tuple(size):
        return mask.astype(np.uint8)
    if policy == "resize":
        # Nearest neighbour at the same half-pixel centres the bilinear resize uses.
        rows = np.minimum(((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int), mask.shape[0] - 1)
        cols = np.minimum(((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int), mask.shape[1] - 1)
        return mask[np.ix_(rows, cols)].astype(np.uint8)
    # pad_crop pads with the minimum, which is the background label 0 in any mask holding it.
    return np.rint(fit_to_shape(mask.astype(np.float32), size, policy)).astype(np.uint8)


def load_masks(files: list[str], original_shapes: list[tuple[int, int]],
               prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The mask of each slice in ``files`` (whose ``(h, w)`` before fitting are
    ``original_shapes``), fitted to ``prep.image_size``.

    Returns ``masks`` ``(N, H, W)`` uint8 (zeros where there is none) and ``present`` ``(N,)``
    bool. A mask that is missing, unreadable or not the shape of its slice is left out (a
    warning names it); region metrics are then blank for that slice.
    """
    height, width = prep.image_size
    masks = np.zeros((len(files), height, width), dtype=np.uint8)
    present = np.zeros(len(files), dtype=bool)
    problems = []
    for i, file in enumerate(files):
        path = mask_path(file)
        if path is None:
            continue
        try:
            mask, _ = read_slice(path)
        except BadFileError as exc:
            problems.append(str(exc))
            continue
        if mask.shape != tuple(original_shapes[i]):
            problems.append(f"{path}: mask {mask.shape} is not the shape of its slice "
                            f"{tuple(original_shapes[i])}")
            continue
        masks[i] = fit_mask(mask, (height, width), prep.fit)
        present[i] = True
    if problems:
        log.warning("%d mask(s) left out of the region metrics: %s", len(problems),
                    "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    return masks, present
