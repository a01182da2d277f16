"""Training throughput of N torchrun processes against one, on the default phantom.

    python benchmarks/ddp_throughput.py [--steps 40] [--out /tmp/mrivq-ddp-bench]

Runs `mrivq train` for a few steps (the default model) three ways, with the machine's cores
shared out as threads: one process at batch 10; two processes at batch 5 each (the same
global batch of 10); two processes at batch 10 each (global batch 20). Prints the training
images/s that each run logged in metrics.csv (all ranks' images over rank 0's step time).
It reports; it never fails on a number.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(nproc: int, batch: int, steps: int, out: Path) -> tuple[float, float]:
    run_dir = out / f"n{nproc}-b{batch}"
    shutil.rmtree(run_dir, ignore_errors=True)
    threads = max(1, (os.cpu_count() or 2) // nproc)
    sets = [f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.interval={steps}",
            f"train.num_threads={threads}", f"output.dir={run_dir}"]
    sets = [arg for s in sets for arg in ("--set", s)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "mrivq", "train", *sets]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mrivq", "train", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(run_dir / "metrics.csv", newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    return float(last["train_images_per_s"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mrivq-ddp-bench"))
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.steps} steps of the default model per run")
    for nproc, batch in ((1, 10), (2, 5), (2, 10)):
        images_per_s, wall = run(nproc, batch, args.steps, args.out)
        print(f"{nproc} process(es) x batch {batch:2d} (global {nproc * batch:2d}): "
              f"{images_per_s:6.2f} images/s in training steps, {wall:5.0f} s wall in all")


if __name__ == "__main__":
    main()
