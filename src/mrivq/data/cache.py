"""Decode a split once into one array on disk, then memory-map it on every later run.

A split's slices are read (``data.io``), preprocessed (``data.preprocess``) and written as
``images.npy`` ``(N, H, W)`` float32 plus ``norm.npy`` ``(N, 2)`` (offset, scale) and a JSON
manifest, under ``cache_dir/slices/<key>``. The key hashes the sorted file list with each
file's size and mtime (ns), the preprocessing settings and :data:`FORMAT_VERSION`; any
change gives a new key and so a rebuild. A build happens in a temporary folder that is
renamed into place only when complete (manifest written last), so a failed or interrupted
build never leaves a cache that a later run would trust.

Example::

    >>> slices = load_split(splits.train, Preprocessing(), name="train", progress=True)
    >>> slices.images.shape, slices.norm.shape
    ((11460, 256, 128), (11460, 2))
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mrivq import strict_json
from mrivq.data.io import read_slice
from mrivq.data.preprocess import Preprocessing, preprocess_slice
from mrivq.errors import BadFileError, UserError

log = logging.getLogger("mrivq.data")

FORMAT_VERSION = 1
ON_BAD_FILE = ("error", "skip")
IMAGES, NORM, MANIFEST = "images.npy", "norm.npy", "manifest.json"
_PARTIAL_IMAGES = "images.partial.npy"
_MAX_LISTED = 20  # bad files named in one error message; all of them go to the log
_STALE_BUILD_S = 24 * 3600


@dataclass
class SliceSet:
    """One split, decoded: row ``i`` of ``images`` and ``norm`` comes from ``files[i]``.

    ``images`` is ``(N, H, W)`` float32, normalised, memory-mapped read-only;
    ``norm`` is ``(N, 2)`` float32 ``(offset, scale)`` with ``raw ≈ image * scale + offset``;
    ``original_shapes`` is each slice's ``(h, w)`` after squeezing, before fitting;
    ``skipped`` lists ``(file, problem)`` for files left out with ``on_bad_file="skip"``.
    """

    images: np.ndarray
    norm: np.ndarray
    files: list[str]
    original_shapes: list[tuple[int, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    key: str = ""  # the cache entry's name: changes with the files and the preprocessing

    def __len__(self) -> int:
        return len(self.files)


def default_cache_dir() -> Path:
    """``$MRIVQ_CACHE_DIR`` if set, else ``~/.cache/mrivq``."""
    env = os.environ.get("MRIVQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mrivq"


def load_split(
    files,
    prep: Preprocessing,
    *,
    cache_dir=None,
    on_bad_file: str = "error",
    workers: int | None = None,
    progress: bool = False,
    name: str = "split",
) -> SliceSet:
    """The decoded, preprocessed slices of ``files``, from the cache or built into it.

    ``files`` are NIfTI slice paths (any order; rows follow the sorted absolute paths).
    ``on_bad_file="error"`` raises one :class:`UserError` listing every bad file of the split;
    ``"skip"`` leaves them out and records them in :attr:`SliceSet.skipped`. ``workers``
    processes decode in parallel (default ``os.cpu_count()``; 1 decodes in this process).
    ``name`` labels the split in messages and the progress bar.
    """
    if on_bad_file not in ON_BAD_FILE:
        raise ValueError(
            f"on_bad_file must be one of {', '.join(ON_BAD_FILE)}, got {on_bad_file!r}"
        )
    paths = sorted({os.path.abspath(os.path.expanduser(str(f))) for f in files})
    if not paths:
        raise UserError(f"split '{name}' has no files; check the data folders in the config")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(paths, prep)
    entry = cache_root / "slices" / key

    slice_set = _open_entry(entry, key, prep)
    if slice_set is None:
        slice_set = _build_and_open(entry, key, paths, prep, on_bad_file=on_bad_file, workers=workers,
                                    progress=progress, name=name)
    else:
        log.debug("split '%s': %d slices from cache %s", name, len(slice_set), entry)

    slice_set.key = key
    if slice_set.skipped:
        if on_bad_file == "error":
            raise _bad_files_error(slice_set.skipped, name)
        _log_skipped(slice_set.skipped, name)
    return slice_set


def cache_key(paths: list[str], prep: Preprocessing) -> str:
    """Hex digest naming the cache entry of these sorted absolute ``paths`` under ``prep``."""
    digest = hashlib.sha256()
    settings = {"format": FORMAT_VERSION, "prep": asdict(prep)}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        try:
            stat = os.stat(path)
            signature = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            signature = "missing"
        digest.update(f"\n{path}\0{signature}".encode())
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------- reading an entry


def _open_entry(entry: Path, key: str, prep: Preprocessing) -> SliceSet | None:
    """The SliceSet stored in ``entry``, or None if it is absent or cannot be trusted."""
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        if entry.exists():
            log.warning("ignoring incomplete cache entry %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        images = np.load(entry / IMAGES, mmap_mode="r")
        norm = np.load(entry / NORM)
        files = manifest["files"]
        expected = (len(files), *prep.image_size)
        trusted = (
            manifest["format"] == FORMAT_VERSION
            and manifest["key"] == key
            and images.dtype == np.float32
            and images.shape == expected
            and norm.shape == (len(files), 2)
        )
    except (OSError, ValueError, KeyError, TypeError):
        trusted = False
    if not trusted:
        log.warning("ignoring unreadable cache entry %s; rebuilding it", entry)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return SliceSet(
        images=images,
        norm=norm,
        files=files,
        original_shapes=[tuple(s) for s in manifest["original_shapes"]],
        skipped=[tuple(s) for s in manifest["skipped"]],
    )


# ---------------------------------------------------------------------------- building an entry


def _build_and_open(entry: Path, key: str, paths: list[str], prep: Preprocessing, *, on_bad_file, workers,
                    progress, name) -> SliceSet:
    """Build ``entry`` (see :func:`_build_entry`), open it and log how long decoding took."""
    started = time.perf_counter()
    _build_entry(entry, key, paths, prep, on_bad_file=on_bad_file, workers=workers, progress=progress, name=name)
    slice_set = _open_entry(entry, key, prep)
    if slice_set is None:
        raise RuntimeError(f"cache entry {entry} was built but cannot be opened")
    log.info("decoded split '%s': %d slices in %.1f s into %s", name, len(slice_set),
             time.perf_counter() - started, entry)
    return slice_set


def _build_entry(entry: Path, key: str, paths: list[str], prep: Preprocessing, *, on_bad_file, workers,
                 progress, name) -> None:
    """Decode ``paths`` into a temporary folder and rename it to ``entry`` once complete.

    With ``on_bad_file="error"`` and any bad file nothing is kept: the error lists them all.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(entry.parent)
    building = entry.parent / f".build-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    building.mkdir()
    try:
        partial = building / _PARTIAL_IMAGES
        norm, shapes, problems = _decode_into(partial, paths, prep, workers, progress, name)
        if problems and on_bad_file == "error":
            raise _bad_files_error([(paths[i], p) for i, p in sorted(problems.items())], name)
        good = [i for i in range(len(paths)) if i not in problems]
        if not good:
            listed = "; ".join(
                f"{Path(paths[i]).name}: {p}" for i, p in sorted(problems.items())[:_MAX_LISTED]
            )
            raise UserError(
                f"all {len(paths)} files of split '{name}' are bad ({listed}); check the data folder"
            )
        if problems:
            _keep_rows(partial, building / IMAGES, good)
            partial.unlink()
        else:
            partial.rename(building / IMAGES)
        np.save(building / NORM, norm[good])
        manifest = {
            "format": FORMAT_VERSION,
            "key": key,
            "preprocessing": asdict(prep),
            "files": [paths[i] for i in good],
            "original_shapes": [list(shapes[i]) for i in good],
            "skipped": [[paths[i], problems[i]] for i in sorted(problems)],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json(building / MANIFEST, manifest)  # last: a folder without it is never trusted
        _move_into_place(building, entry)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)


def _decode_into(partial: Path, paths: list[str], prep: Preprocessing, workers, progress, name):
    """Decode every file of ``paths`` into row ``i`` of a new ``(N, H, W)`` float32 ``.npy`` at
    ``partial``; returns ``(norm (N, 2), shapes [(h, w)], problems {row: problem})``."""
    np.lib.format.open_memmap(
        partial, mode="w+", dtype=np.float32, shape=(len(paths), *prep.image_size)
    ).flush()
    norm = np.zeros((len(paths), 2), dtype=np.float32)
    shapes: list[tuple[int, int] | None] = [None] * len(paths)
    problems: dict[int, str] = {}
    for rows, row_norm, row_shapes, row_problems in _decode_all(
        partial, paths, prep, workers, progress, name
    ):
        norm[rows] = row_norm
        for row, shape in zip(rows, row_shapes):
            shapes[row] = shape
        problems.update(row_problems)
    return norm, shapes, problems


def _decode_all(partial: Path, paths: list[str], prep: Preprocessing, workers, progress, name):
    """Yield ``(rows, norm, shapes, problems)`` per chunk; images are written into ``partial``."""
    n_workers = max(1, int(workers) if workers is not None else (os.cpu_count() or 1))
    chunk_size = max(1, min(256, math.ceil(len(paths) / (n_workers * 4))))
    chunks = [
        list(range(start, min(start + chunk_size, len(paths))))
        for start in range(0, len(paths), chunk_size)
    ]
    n_workers = min(n_workers, len(chunks))
    bar = tqdm(
        total=len(paths), desc=f"decoding {name}", unit="slice", disable=not progress, leave=False
    )
    try:
        if n_workers == 1:
            for rows in chunks:
                result = _decode_chunk(str(partial), rows, [paths[i] for i in rows], prep)
                bar.update(len(rows))
                yield result
            return
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=_process_context()) as pool:
            futures = [
                pool.submit(_decode_chunk, str(partial), rows, [paths[i] for i in rows], prep)
                for rows in chunks
            ]
            try:
                for future in as_completed(futures):
                    result = future.result()
                    bar.update(len(result[0]))
                    yield result
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()


def _process_context():
    # fork starts workers in milliseconds and never re-runs the user's __main__ script;
    # the workers only use numpy and nibabel, so a parent's threads (torch, CUDA) do not matter.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def _decode_chunk(partial: str, rows: list[int], paths: list[str], prep: Preprocessing):
    """Decode ``paths`` into rows ``rows`` of the memory-mapped ``partial`` array.

    Returns ``(rows, norm (k, 2), shapes, problems {row: problem})``; runs in a worker process.
    """
    images = np.load(partial, mmap_mode="r+")
    norm = np.zeros((len(rows), 2), dtype=np.float32)
    shapes: list[tuple[int, int]] = []
    problems: dict[int, str] = {}
    for k, (row, path) in enumerate(zip(rows, paths)):
        try:
            raw, _ = read_slice(path)
        except BadFileError as e:
            problems[row] = e.problem
            shapes.append((0, 0))
            continue
        images[row], norm[k] = preprocess_slice(raw, prep)
        shapes.append(tuple(int(n) for n in raw.shape))
    images.flush()
    del images
    return rows, norm, shapes, problems


def _keep_rows(source: Path, target: Path, rows: list[int], block: int = 1024) -> None:
    """Copy the given rows of the ``.npy`` at ``source`` into a new ``.npy`` at ``target``."""
    images = np.load(source, mmap_mode="r")
    kept = np.lib.format.open_memmap(
        target, mode="w+", dtype=images.dtype, shape=(len(rows), *images.shape[1:])
    )
    for start in range(0, len(rows), block):
        kept[start : start + block] = images[rows[start : start + block]]
    kept.flush()
    del kept, images


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        f.write(strict_json.dumps(data))
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(building: Path, entry: Path) -> None:
    try:
        os.rename(building, entry)
    except OSError:
        # Another process finished the same entry first; keep theirs if it is complete.
        if not (entry / MANIFEST).is_file():
            raise


def _remove_stale_builds(slices_dir: Path) -> None:
    """Delete build folders left by runs that were killed more than a day ago."""
    now = time.time()
    for leftover in slices_dir.glob(".build-*"):
        try:
            if now - leftover.stat().st_mtime > _STALE_BUILD_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


# ---------------------------------------------------------------------------- bad files


def _bad_files_error(bad: list[tuple[str, str]], name: str) -> UserError:
    """One error naming every bad file (the first ``_MAX_LISTED`` in the message, all in the log)."""
    folders = {str(Path(path).parent) for path, _ in bad}
    where = f" under {folders.pop()}" if len(folders) == 1 else ""
    label = (lambda p: Path(p).name) if where else str
    listed = "; ".join(f"{label(path)}: {problem}" for path, problem in bad[:_MAX_LISTED])
    if len(bad) > _MAX_LISTED:
        listed += f"; and {len(bad) - _MAX_LISTED} more (all listed in the log)"
        for path, problem in bad:
            log.error("bad file in split '%s': %s: %s", name, path, problem)
    noun = "bad file" if len(bad) == 1 else "bad files"
    error = UserError(
        f"{len(bad)} {noun} in split '{name}'{where} (set data.on_bad_file: skip to skip them): {listed}"
    )
    error.bad_files = list(bad)
    return error


def _log_skipped(skipped: list[tuple[str, str]], name: str) -> None:
    log.warning("skipped %d bad file(s) in split '%s' (data.on_bad_file: skip)", len(skipped), name)
    for path, problem in skipped:
        log.info("skipped %s: %s", path, problem)
