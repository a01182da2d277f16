"""The report's entry point: ``python predict.py --config FILE`` (same as ``mrivq predict``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from mrivq.cli import main

if __name__ == "__main__":
    main(["predict", *sys.argv[1:]])
