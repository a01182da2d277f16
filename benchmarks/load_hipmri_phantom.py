"""Time loading the HipMRI-size phantom set (11,460 / 660 / 540 slices) cold and warm.

    python benchmarks/load_hipmri_phantom.py [DATA_DIR] [--workers N]

Generates the set into DATA_DIR first if it is not there (a minute or two), then decodes all
three splits into a fresh cache (cold) and loads them again from that cache (warm). Prints
seconds and peak resident memory (this process, and the largest child process, which
includes the generator's workers). Reports only. `mrivq bench` prints the same figures.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from mrivq.apps.bench import load_times
from mrivq.data.phantom import synthesize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", default=str(Path(tempfile.gettempdir()) / "mrivq-hipmri-phantom"))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    root = Path(args.data_dir)
    if not root.is_dir():
        start = time.perf_counter()
        synthesize(root, hipmri_counts=True, progress=True)
        print(f"synthesised the HipMRI-size phantom in {time.perf_counter() - start:.1f} s")
    cold, warm, n = load_times(root, args.workers)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{n} slices: cold {cold:.1f} s, warm {warm:.2f} s; "
          f"peak RSS {self_mb:.0f} MB (largest child process {child_mb:.0f} MB)")


if __name__ == "__main__":
    main()
