"""``mrivq synth``: write the synthetic HipMRI-layout pelvis phantom (:mod:`mrivq.data.phantom`)."""

from __future__ import annotations

import sys

from mrivq.data.phantom import synthesize
from mrivq.errors import UserError


def main(args) -> int:
    """``mrivq synth OUT_DIR [--cases N] [--seed K] [--slices S] [--hipmri-counts]``."""
    if args.cases < 3 and not args.hipmri_counts:
        raise UserError("--cases must be at least 3 (one case per split)")
    summary = synthesize(args.out_dir, cases=args.cases, seed=args.seed, slices_per_volume=args.slices,
                         hipmri_counts=args.hipmri_counts, progress=sys.stderr.isatty())
    parts = [f"{k}: {v}" for k, v in summary.items() if k not in ("out_dir", "montage")]
    print(f"wrote {summary.get('out_dir')} ({'; '.join(parts)})")
    return 0
