"""``mrivq report RUN_DIR``: (re)write the run's self-contained report.html (:mod:`mrivq.reporting.html`)."""

from __future__ import annotations

import argparse

from mrivq.reporting.html import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR")


def main(args) -> int:
    print(f"wrote {write_report(args.run_dir)}")
    return 0
