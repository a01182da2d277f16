"""``mrivq report RUN_DIR``: (re)write the run's self-contained report.html (:mod:`mrivq.reporting.html`)."""

from __future__ import annotations

from mrivq.reporting.html import write_report


def main(args) -> int:
    print(f"wrote {write_report(args.run_dir)}")
    return 0
