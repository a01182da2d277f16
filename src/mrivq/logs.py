"""Logging for runs: a log file in the run directory plus plain lines on stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from mrivq.errors import UserError
from mrivq.run_dir import record

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def interactive() -> bool:
    """True when stderr is a terminal: show tqdm bars; otherwise plain log lines only."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def run_logger(path: Path):
    """Send the ``mrivq`` loggers to ``path`` (appending) and to stderr for the duration.

    Inside :func:`mrivq.run_dir.recording` the log is listed in the run's manifest.
    """
    path = Path(path)
    record(path)  # listed before it appears: a kill never leaves a log the manifest lacks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("a").close()
    except OSError as exc:
        raise UserError(f"cannot write the log {path}: {exc.strerror}; choose a writable output.dir") from None
    logger = logging.getLogger("mrivq")
    logger.setLevel(logging.INFO)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(file_handler)
    logger.addHandler(stream_handler)
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addHandler(file_handler)
    try:
        yield logger
    finally:
        for handler in (file_handler, stream_handler):
            logger.removeHandler(handler)
        logging.getLogger("py.warnings").removeHandler(file_handler)
        logging.captureWarnings(False)
        file_handler.close()
