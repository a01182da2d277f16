"""The prior commands end to end: ``mrivq encode --prior``, ``decode --prior`` and ``sample`` under each prior.

For a VQ-VAE checkpoint and one or more of its priors, runs each command as a user would (a
fresh process each time, so importing torch and loading the models count) on the test split
of the built-in phantom set (or ``--data DIR``), and prints one JSON object: per prior, the
wall seconds of each command (the fastest of ``--rounds``), slices per second of wall time, the
coder's own rates that ``encode`` prints, and ``sample``'s samples per second (its own figure:
drawing, decoding and writing; ``--n`` slices).

Speeds of different days here differ by up to 2x: compare priors measured in one run.

    python benchmarks/prior_commands.py runs/default/models/best.pt runs/default/models/prior_best.pt \\
        [runs/tf/models/prior_best.pt] [--rounds 2] [--n 16]

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mrivq.config import load_config
from mrivq.data.sources import data_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the VQ-VAE (models/best.pt)")
    parser.add_argument("priors", nargs="+", help="priors of that VQ-VAE (models/prior_best.pt)")
    parser.add_argument("--data", help="a folder of NIfTI slices (default: the phantom's test split)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds; the fastest counts")
    parser.add_argument("--n", type=int, default=16, help="slices each sample command draws")
    args = parser.parse_args()
    data = Path(args.data) if args.data else _phantom_test_split()
    n = sum(1 for f in data.iterdir() if f.name.endswith((".nii", ".nii.gz")))
    results = {"slices": n, "data": str(data)}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        priors = {Path(p).parent.parent.name + "/" + Path(p).name: Path(p) for p in args.priors}
        for name, prior in priors.items():
            results[name] = _commands(args.checkpoint, prior, data, n, work, args.rounds, args.n)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


def _phantom_test_split() -> Path:
    config = load_config(None, [])
    files = data_splits(config.data, config.seed).test
    return Path(files[0]).parent


def _commands(checkpoint: str, prior: Path, data: Path, n: int, work: Path, rounds: int, samples: int) -> dict:
    codes, decoded, drawn = work / "t.mrvq", work / "decoded", work / "samples"
    encode = ["encode", "--checkpoint", checkpoint, "--prior", str(prior), str(data), "--out", str(codes)]
    decode = ["decode", "--checkpoint", checkpoint, "--prior", str(prior), str(codes), "--out", str(decoded)]
    sample = ["sample", "--prior", str(prior), "--n", str(samples), "--out", str(drawn)]
    out = {}
    for label, argv, clean in (("encode", encode, codes), ("decode", decode, decoded), ("sample", sample, drawn)):
        best, printed = None, ""
        for _ in range(rounds):
            if clean.is_dir():
                shutil.rmtree(clean)
            else:
                clean.unlink(missing_ok=True)
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "mrivq", *argv], capture_output=True, text=True, check=True)
            seconds = time.perf_counter() - began
            if best is None or seconds < best:
                best, printed = seconds, done.stdout
        out[label] = {"wall_s": round(best, 2)}
        if label != "sample":
            out[label]["slices_per_s"] = round(n / best, 1)
        for key, pattern in (("coder_slices_per_s", r"range coding ([\d.]+) slices/s"),
                             ("checking_decode_slices_per_s", r"decoding the stream ([\d.]+) slices/s"),
                             ("samples_per_s", r"([\d.]+) samples/s")):
            found = re.search(pattern, printed)
            if found:
                out[label][key] = float(found.group(1))
        if label == "encode":
            out[label]["bytes"] = codes.stat().st_size
    return out


if __name__ == "__main__":
    main()
