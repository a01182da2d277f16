"""Run directories: where a run's files go, claiming one, and overwriting only what mrivq wrote.

Every file a job writes through :func:`atomic_write`, and every log it opens,
is listed in ``RUN_DIR/.mrivq-manifest.json`` while :func:`recording` is active::

    {"format": "mrivq-manifest", "version": 1,
     "jobs": {"train": ["config.yaml", "metrics.csv", "/data/models/best.pt", ...],
              "predict": [...], "train-prior": [...]}}

Paths inside the run directory are relative to it, others absolute. ``--overwrite``
(:func:`claim_run_dir`) removes only listed files inside the run directory, and refuses when
a file the new run would write is not listed: a file mrivq did not write is never replaced
or removed, whichever folder ``output.*_dir`` points at.

Example::

    >>> claim_run_dir(config, "train", overwrite=False)
    >>> with recording(config.run_dir, "train"):
    ...     atomic_write(config.run_dir / "metrics.csv", write)   # listed under "train"
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mrivq import strict_json
from mrivq.config import Config
from mrivq.errors import UserError

MANIFEST = ".mrivq-manifest.json"
FORMAT, VERSION = "mrivq-manifest", 1
# The run's resolved config: config.yaml, or config.resolved.yaml when config.yaml is a file
# mrivq did not write (the user's own config, for one).
CONFIG_NAMES = ("config.yaml", "config.resolved.yaml")

# Per job, the files it writes at fixed names as (Config folder property, name). The first
# three show that the run directory already holds a run of that job.
_FIXED_FILES = {
    "train": [("run_dir", "metrics.csv"), ("model_dir", "last.pt"), ("model_dir", "best.pt"),
              ("model_dir", "model.safetensors"), ("log_dir", "training.log"), ("visual_dir", "losses.png"),
              ("visual_dir", "ssims.png"), ("run_dir", "report.html")],
    "train-prior": [("run_dir", "prior_metrics.csv"), ("model_dir", "prior_last.pt"),
                    ("model_dir", "prior_best.pt"), ("log_dir", "prior.log"),
                    ("visual_dir", "prior_losses.png")],
}
# A new training run makes the old model's predictions stale: --overwrite removes them too.
_REPLACES = {"train": ("train", "predict"), "train-prior": ("train-prior",)}


# ---------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------

def _root(run_dir: Path) -> Path:
    return Path(run_dir).expanduser().resolve()


def _absolute(path: Path) -> Path:
    """Absolute path with its folder's symlinks resolved; a link at ``path`` itself is kept."""
    path = Path(path).expanduser().absolute()
    return path.parent.resolve() / path.name


def _entry(root: Path, path: Path) -> str:
    path = _absolute(path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def read_manifest(run_dir: Path) -> dict | None:
    """The manifest of ``run_dir``; None when it has none (a new folder, a run from before manifests)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc}); move it away and remove the old run's "
                        "files yourself, or choose another output.dir") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("jobs"), dict)):
        raise UserError(f"{path}: not an mrivq manifest; move it away and remove the old run's files "
                        "yourself, or choose another output.dir")
    return manifest


def _write_manifest(run_dir: Path, jobs: dict[str, list[str]]) -> None:
    text = strict_json.dumps({"format": FORMAT, "version": VERSION, "jobs": jobs}, indent=1)
    atomic_write(run_dir / MANIFEST, lambda fh: fh.write(text.encode("utf-8")))


def _listed(run_dir: Path, manifest: dict | None) -> set[Path]:
    """Every file ``manifest`` lists, for any job, as absolute paths."""
    root, jobs = _root(run_dir), (manifest or {}).get("jobs", {})
    return {_absolute(root / entry) for entries in jobs.values() for entry in entries}


@dataclass
class _Recording:
    run_dir: Path
    job: str
    seen: set[str]  # entries already listed under job


_active: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("mrivq_recording", default=None)


@contextlib.contextmanager
def recording(run_dir: Path, job: str):
    """List every file written through ``atomic_write`` or opened by ``run_logger`` while active
    in ``run_dir``'s manifest under ``job`` ("train", "predict", "train-prior")."""
    run_dir = _root(run_dir)
    seen = set((read_manifest(run_dir) or {}).get("jobs", {}).get(job, []))
    token = _active.set(_Recording(run_dir, job, seen))
    try:
        yield
    finally:
        _active.reset(token)


def record(path: Path) -> None:
    """Note that ``path`` was written; a no-op outside :func:`recording`."""
    active = _active.get()
    if active is None or Path(path).name == MANIFEST:
        return
    entry = _entry(active.run_dir, path)
    if entry in active.seen:
        return
    active.seen.add(entry)
    # Re-read: another job may have written to the manifest since this one started.
    jobs = (read_manifest(active.run_dir) or {}).get("jobs", {})
    entries = jobs.setdefault(active.job, [])
    if entry not in entries:
        entries.append(entry)
        _write_manifest(active.run_dir, jobs)


def atomic_write(path: Path, write, *, listed: bool = True) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, fsync, then rename.

    A crash or a full disk leaves the previous ``path`` untouched. Inside :func:`recording` the
    path is listed in the run's manifest, unless ``listed=False`` (a cache file, not the run's).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}; check the folder is writable") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if listed:
            record(path)  # listed before it appears: a kill never leaves a run file the manifest lacks
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror}; the previous file is kept") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------
# The run's config file
# ---------------------------------------------------------------------------------------

def run_config_path(run_dir: Path) -> Path | None:
    """The resolved config of the run in ``run_dir`` (config.yaml or config.resolved.yaml), or None."""
    found = [Path(run_dir) / name for name in reversed(CONFIG_NAMES) if (Path(run_dir) / name).is_file()]
    recorded = _listed(run_dir, read_manifest(run_dir)) if found else set()
    mrivq_written = [path for path in found if _absolute(path) in recorded]
    return (mrivq_written or found or [None])[0]


def config_destination(config: Config) -> Path:
    """Where the run's resolved config goes: config.yaml, unless that is the config file that
    was read or a file mrivq did not write; then config.resolved.yaml."""
    recorded = _listed(config.run_dir, read_manifest(config.run_dir))
    for name in CONFIG_NAMES:
        path = config.run_dir / name
        if _absolute(path) != config.source and (not path.exists() or _absolute(path) in recorded):
            return path
    raise UserError(f"{config.run_dir} holds config.yaml and config.resolved.yaml that mrivq did not write; "
                    "move them or choose another output.dir")


# ---------------------------------------------------------------------------------------
# Claiming a run directory
# ---------------------------------------------------------------------------------------

def claim_run_dir(config: Config, job: str, overwrite: bool, *, remove: bool = True) -> None:
    """Make ``config``'s folders ready for a new run of ``job`` ("train" or "train-prior").

    Refuses (:class:`UserError`) when they hold a run of ``job`` and ``overwrite`` is False, when
    a file the run writes at a fixed name exists but is not in the manifest, and when
    ``overwrite`` meets a run from before manifests. With ``overwrite``, removes the files the
    manifest lists for the old run that lie inside the run directory (never the config file
    that was read, never a folder). ``remove=False`` checks only (the other torchrun ranks).
    """
    run_dir = config.run_dir
    outputs = [getattr(config, folder) / name for folder, name in _FIXED_FILES[job]]
    existing = [path for path in outputs[:3] if path.exists()]
    what = "a prior run" if job == "train-prior" else "a run"
    if existing and not overwrite:
        raise UserError(f"{run_dir} already holds {what} ({existing[0].name}); continue it with "
                        f"--resume {run_dir}, choose another output.dir, or pass --overwrite")
    manifest = read_manifest(run_dir)
    if existing and manifest is None:
        raise UserError(f"{run_dir} holds {what} written before mrivq kept a manifest ({MANIFEST}), so "
                        "--overwrite cannot tell its files from yours; remove them yourself or choose "
                        "another output.dir")
    recorded = _listed(run_dir, manifest)
    for path in outputs:
        if path.exists() and _absolute(path) not in recorded:
            raise UserError(f"{path} was not written by mrivq for this run; move it or choose another folder "
                            "(output.dir, output.*_dir)")
    if not (overwrite and manifest and remove):
        return
    root, jobs = _root(run_dir), manifest["jobs"]
    for name in _REPLACES[job]:
        kept = []
        for entry in jobs.get(name, []):
            path = _absolute(root / entry)
            if path.is_relative_to(root) and path != config.source and not path.is_dir():
                path.unlink(missing_ok=True)
            else:
                kept.append(entry)
        jobs[name] = kept
    _write_manifest(root, jobs)


# ---------------------------------------------------------------------------------------
# Output folders of decode and sample
# ---------------------------------------------------------------------------------------

def claim_outputs(folder: Path, job: str, targets: list[Path], *, overwrite: bool, inputs=()) -> None:
    """Check that ``job`` ("decode", "sample") may write ``targets`` (files directly in ``folder``),
    then list them in ``folder``'s manifest, before any is written.

    Refuses (:class:`UserError`) a ``folder`` that is a file, a target that is one of ``inputs``
    (the files the command reads), a target that exists but that mrivq did not write, and,
    without ``overwrite``, one that an earlier mrivq command wrote. Nothing is removed.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; give a folder")
    root = _root(folder)
    protected = {_absolute(Path(path)) for path in inputs if path is not None}
    manifest = read_manifest(root) if root.is_dir() else None
    recorded = _listed(root, manifest)
    for target in targets:
        path = _absolute(target)
        if path.parent != root:
            raise UserError(f"{target} is not directly in --out {folder}")
        if path in protected or any(path.exists() and other.exists() and os.path.samefile(path, other)
                                    for other in protected):
            raise UserError(f"{target} is one of this command's inputs; choose another --out")
        if not (target.exists() or target.is_symlink()):
            continue
        if path not in recorded:
            raise UserError(f"{target} exists and was not written by mrivq; move it or choose another --out")
        if not overwrite:
            raise UserError(f"{target} was written by an earlier mrivq command; pass --overwrite to replace "
                            "it, or choose another --out")
    jobs = (manifest or {}).get("jobs", {})
    entries = jobs.setdefault(job, [])
    known = set(entries)
    entries += [entry for entry in (_entry(root, target) for target in targets) if entry not in known]
    _write_manifest(root, jobs)


# ---------------------------------------------------------------------------------------
# Metrics tables (metrics.csv, prior_metrics.csv)
# ---------------------------------------------------------------------------------------

def write_metrics(path: Path, rows: list[dict], columns: list[str]) -> None:
    """A metrics table from all rows so far, replaced atomically: a kill never leaves half a row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda fh: fh.write(buf.getvalue().encode()))


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """Rows of a metrics table as dicts of floats (blank or non-numeric cells dropped; no file:
    no rows), optionally only those up to ``step`` ``up_to_step``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for raw in csv.DictReader(text.splitlines()):
        row = {}
        for key, value in raw.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                continue
        rows.append(row)
    return [r for r in rows if up_to_step is None or r.get("step", 0) <= up_to_step]
