"""The report's entry point: ``python train.py --config FILE`` (same as ``mrivq train``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from mrivq.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
