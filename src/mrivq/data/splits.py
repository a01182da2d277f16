"""Find the train / validate / test slices, and keep every patient (case) in one split only.

Three layouts are understood, in this order:

1. explicit folders (``data.train_dir``, ``data.validate_dir``, ``data.test_dir``);
2. a root holding the HipMRI folders ``keras_slices_train``, ``keras_slices_validate``,
   ``keras_slices_test`` (masks in ``keras_slices_seg_*`` beside them);
3. a root that is one flat folder of slices, split by case id with seeded fractions.

Example::

    >>> splits = resolve_splits("/data/hipmri")
    >>> len(splits.train), parse_name(splits.train[0])
    (11460, ('case_004', 0, 0))
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrivq.data.io import list_nifti, nifti_stem
from mrivq.errors import UserError

log = logging.getLogger("mrivq.data")

SPLIT_NAMES = ("train", "validate", "test")
KERAS_PREFIX = "keras_slices_"
KERAS_MASK_PREFIX = "keras_slices_seg_"

# case_004_week_0_slice_12.nii.gz / seg_004_week_0_slice_12.nii.gz; week and slice optional.
_NAME = re.compile(
    r"^(?P<kind>case|seg)_(?P<case>\d+)(?:_week_(?P<week>\d+))?(?:_slice_(?P<slice>\d+))?\.nii(?:\.gz)?$",
    re.IGNORECASE,
)


@dataclass
class Splits:
    """The sorted slice files of each split."""

    train: list[Path]
    validate: list[Path]
    test: list[Path]

    def as_dict(self) -> dict[str, list[Path]]:
        return {"train": self.train, "validate": self.validate, "test": self.test}


def parse_name(path) -> tuple[str, int | None, int | None]:
    """``(case_id, week, slice)`` from a HipMRI file name.

    ``case_004_week_0_slice_12.nii.gz`` → ``("case_004", 0, 12)``; a mask
    ``seg_004_week_0_slice_12.nii.gz`` gives the same case id ``"case_004"``. Any other name
    gives ``(stem, None, None)`` where the stem is the name without ``.nii``/``.nii.gz``.
    """
    name = Path(path).name
    match = _NAME.match(name)
    if match is None:
        return nifti_stem(name), None, None
    week, slice_index = match["week"], match["slice"]
    return (
        f"case_{match['case']}",
        int(week) if week is not None else None,
        int(slice_index) if slice_index is not None else None,
    )


def _is_mask_name(path) -> bool:
    match = _NAME.match(Path(path).name)
    return match is not None and match["kind"].lower() == "seg"


def resolve_splits(
    root=None,
    train_dir=None,
    validate_dir=None,
    test_dir=None,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> Splits:
    """The sorted files of each split; see the module docstring for the layouts.

    Explicit folders win over ``root``. When only some are given, the others come from
    ``root/keras_slices_<split>`` if it exists, else :class:`UserError` names the missing
    key. A flat ``root`` is split by case id: a ``seed``-ed permutation of the sorted case
    ids is cut by ``fractions`` (train, validate, test), every split non-empty when there
    are at least 3 cases. Mask files (``seg_*``) in a flat folder are left out. A case found
    in two splits is reported with :func:`warnings.warn`.
    """
    root = Path(root).expanduser() if root is not None else None
    explicit = dict(zip(SPLIT_NAMES, (train_dir, validate_dir, test_dir)))
    if any(folder is not None for folder in explicit.values()):
        splits = _explicit_splits(root, explicit)
    elif root is None:
        raise UserError(
            "no data given; set data.root (a folder with keras_slices_train/validate/test) or data.train_dir, data.validate_dir and data.test_dir"
        )
    elif not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(
            f"data.root {root} {what}; set data.root to the folder that holds keras_slices_train, keras_slices_validate and keras_slices_test"
        )
    else:
        splits = _root_splits(root, fractions=fractions, seed=seed)
    _warn_shared_cases(splits)
    return splits


def _explicit_splits(root: Path | None, explicit: dict) -> Splits:
    """The given split folders; a missing one is ``root/keras_slices_<split>`` if it exists."""
    folders = {}
    for split, folder in explicit.items():
        if folder is not None:
            folders[split] = Path(folder).expanduser()
        elif root is not None and (root / f"{KERAS_PREFIX}{split}").is_dir():
            folders[split] = root / f"{KERAS_PREFIX}{split}"
        else:
            where = (
                f"and {root} has no {KERAS_PREFIX}{split} folder"
                if root is not None
                else "and data.root is not set"
            )
            raise UserError(
                f"data.{split}_dir is not set {where}; set data.{split}_dir to the {split} slice folder"
            )
    return Splits(**{split: list_nifti(folder) for split, folder in folders.items()})


def _root_splits(root: Path, *, fractions, seed: int) -> Splits:
    """The HipMRI ``keras_slices_*`` folders under ``root`` (all three), else its flat folder of
    slices split by case."""
    keras = {split: root / f"{KERAS_PREFIX}{split}" for split in SPLIT_NAMES}
    present = [split for split, folder in keras.items() if folder.is_dir()]
    if not present:
        return split_by_case(_flat_images(root), fractions=fractions, seed=seed)
    missing = [f"{KERAS_PREFIX}{split}" for split in SPLIT_NAMES if split not in present]
    if missing:
        raise UserError(
            f"data.root {root} has {', '.join(KERAS_PREFIX + s for s in present)} but no {', '.join(missing)}; "
            f"add the missing folder or set data.{SPLIT_NAMES[0]}_dir, data.validate_dir, data.test_dir"
        )
    return Splits(**{split: list_nifti(folder) for split, folder in keras.items()})


def _flat_images(root: Path) -> list[Path]:
    try:
        files = list_nifti(root)
    except UserError:
        raise UserError(
            f"data.root {root} has neither keras_slices_train/validate/test folders nor .nii/.nii.gz slices; "
            "set data.root to the HipMRI folder or to a folder of slices"
        ) from None
    images = [f for f in files if not _is_mask_name(f)]
    if not images:
        raise UserError(
            f"data.root {root} holds only mask files (seg_*); set data.root to a folder with the image slices"
        )
    return images


def split_by_case(files: list[Path], *, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> Splits:
    """Split ``files`` by case id: no case in two splits; deterministic for a ``seed``."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not abs(sum(fractions) - 1.0) < 1e-6:
        raise UserError(
            f"split fractions must be three non-negative numbers (train, validate, test) summing to 1, got {fractions}"
        )
    by_case: dict[str, list[Path]] = {}
    for path in files:
        by_case.setdefault(parse_name(path)[0], []).append(Path(path))
    case_ids = sorted(by_case)
    counts = _split_counts(len(case_ids), fractions)
    order = [case_ids[i] for i in np.random.default_rng(seed).permutation(len(case_ids))]
    bounds = np.cumsum([0, *counts])
    split_files = {}
    for split, start, stop in zip(SPLIT_NAMES, bounds[:-1], bounds[1:]):
        split_files[split] = sorted(p for case in order[start:stop] for p in by_case[case])
    empty = [
        split
        for split, files_ in split_files.items()
        if not files_ and fractions[SPLIT_NAMES.index(split)] > 0
    ]
    if empty:
        log.warning(
            "only %d case(s) to split: split(s) %s are empty", len(case_ids), ", ".join(empty)
        )
    log.info(
        "split %d cases by case id (seed %d): %s",
        len(case_ids),
        seed,
        dict(zip(SPLIT_NAMES, counts)),
    )
    return Splits(**split_files)


def _split_counts(n_cases: int, fractions: tuple[float, float, float]) -> list[int]:
    """Cases per split: largest remainders, then at least one case for each split with a
    positive fraction while cases allow (taken from the largest split)."""
    exact = [n_cases * f for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[
        : n_cases - sum(counts)
    ]:
        counts[i] += 1
    for i in range(3):
        if counts[i] == 0 and fractions[i] > 0:
            donor = max(range(3), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _warn_shared_cases(splits: Splits) -> None:
    cases = {split: {parse_name(p)[0] for p in files} for split, files in splits.as_dict().items()}
    shared = []
    for i, a in enumerate(SPLIT_NAMES):
        for b in SPLIT_NAMES[i + 1 :]:
            both = sorted(cases[a] & cases[b])
            if both:
                listed = ", ".join(both[:10]) + (
                    f" and {len(both) - 10} more" if len(both) > 10 else ""
                )
                shared.append(f"{a}/{b}: {listed}")
    if shared:
        message = "cases found in more than one split (patient-level leakage): " + "; ".join(shared)
        log.warning(message)
        warnings.warn(message, stacklevel=3)


def split_record(splits: Splits) -> dict:
    """What a checkpoint remembers of the splits it was trained on (plain types only).

    ``{split: {"n_slices", "sha256"}}`` for each split, the hash over the sorted file names;
    the training split also keeps its slices (``name:bytes``) and its data set folder, so a
    later test split can be checked for slices or cases it shares with training
    (:func:`shared_with_training`).
    """
    record = {split: {"n_slices": len(files), "sha256": file_list_hash(files)}
              for split, files in splits.as_dict().items()}
    record["train"]["slices"] = sorted(_slice_identity(f) for f in splits.train)
    record["train"]["dataset"] = dataset_folder(splits.train)
    return record


def file_list_hash(files: list) -> str:
    """SHA-256 (hex) of a list of files by name, independent of their order and folders."""
    return hashlib.sha256("\n".join(sorted(Path(f).name for f in files)).encode()).hexdigest()


def dataset_folder(files: list) -> str:
    """The data set a split comes from: the folder holding the HipMRI ``keras_slices_*``
    folders, or the flat folder of slices itself."""
    if not files:
        return ""
    folder = Path(files[0]).expanduser().absolute().parent
    return str(folder.parent if folder.name.startswith(KERAS_PREFIX) else folder)


def shared_with_training(files: list, record: dict) -> tuple[int, int]:
    """What ``files`` share with the training split of ``record`` (:func:`split_record`):
    ``(slices, cases)``.

    A slice is shared when a training slice has its name and size in bytes. A case is shared
    when it has a shared slice, or when ``files`` come from the training data set's own folder
    and a training slice has its case id (other weeks or slices of a training patient).
    Another data set that merely reuses HipMRI's names shares nothing.
    """
    train = record["train"]
    train_slices = set(train["slices"])
    shared = [f for f in files if _slice_identity(f) in train_slices]
    cases = {parse_name(f)[0] for f in shared}
    if dataset_folder(files) == train.get("dataset"):
        train_cases = {parse_name(s.rsplit(":", 1)[0])[0] for s in train_slices}
        cases |= {parse_name(f)[0] for f in files} & train_cases
    return len(shared), len(cases)


def _slice_identity(path) -> str:
    path = Path(path)
    return f"{path.name}:{path.stat().st_size}"


def mask_path(image_path) -> Path | None:
    """The mask beside an image slice, or None if it does not exist.

    ``…/keras_slices_train/case_004_week_0_slice_12.nii.gz`` →
    ``…/keras_slices_seg_train/seg_004_week_0_slice_12.nii.gz``.
    """
    image_path = Path(image_path)
    folder, name = image_path.parent, image_path.name
    if not folder.name.startswith(KERAS_PREFIX) or folder.name.startswith(KERAS_MASK_PREFIX):
        return None
    if not name.lower().startswith("case_"):
        return None
    split = folder.name[len(KERAS_PREFIX) :]
    candidate = folder.parent / f"{KERAS_MASK_PREFIX}{split}" / f"seg_{name[len('case_') :]}"
    return candidate if candidate.is_file() else None
