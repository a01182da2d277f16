"""``mrivq synth``: write the synthetic HipMRI-layout pelvis phantom (:mod:`mrivq.data.phantom`)."""

from __future__ import annotations

import argparse
import sys

from mrivq.data.phantom import synthesize
from mrivq.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--cases", type=int, default=16, help="number of case volumes (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slices", type=int, default=60, help="slices per volume (default 60)")
    parser.add_argument("--hipmri-counts", action="store_true",
                        help="reproduce HipMRI's 11,460 / 660 / 540 slices (ignores --cases)")


def main(args) -> int:
    if args.cases < 3 and not args.hipmri_counts:
        raise UserError("--cases must be at least 3 (one case per split)")
    summary = synthesize(args.out_dir, cases=args.cases, seed=args.seed, slices_per_volume=args.slices,
                         hipmri_counts=args.hipmri_counts, progress=sys.stderr.isatty())
    parts = [f"{k}: {v}" for k, v in summary.items() if k not in ("out_dir", "montage")]
    print(f"wrote {summary.get('out_dir')} ({'; '.join(parts)})")
    return 0
