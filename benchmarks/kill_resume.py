"""How much training a kill at a random moment loses, for a given checkpoint_every.

    python benchmarks/kill_resume.py [--kills 8] [--checkpoint-every 50] [--steps 400]

Trains a small model on a small phantom in a subprocess attached to a pseudo-terminal (so
the progress bar reports the step reached), SIGKILLs it at random moments, reads the step
saved in models/last.pt, and resumes; prints the steps lost at each kill and the largest.
Reports only; nothing here fails on a number.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import random
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from mrivq.data.phantom import synthesize
from mrivq.engine.checkpoint import load_checkpoint

STEP = re.compile(rb"(\d+)/(\d+) \[")


def run_until(args: list[str], seconds: float) -> tuple[int | None, int]:
    """Run ``mrivq`` on a pty for ``seconds`` (or to the end); return (exit code, last step seen)."""
    master, slave = pty.openpty()
    # A real terminal has a size; tqdm draws nothing on a 0-column one.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "mrivq", *args], stdout=slave, stderr=slave)
    os.close(slave)
    seen, buf, deadline = 0, b"", time.time() + seconds
    while proc.poll() is None and time.time() < deadline:
        ready, _, _ = select.select([master], [], [], 0.05)
        if ready:
            try:
                buf = (buf + os.read(master, 65536))[-4096:]
            except OSError:
                break
            steps = STEP.findall(buf)
            if steps:
                seen = int(steps[-1][0])
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    os.close(master)
    return (None if code == -signal.SIGKILL else code), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "data", cases=6, slices_per_volume=60, shape=(64, 32), montage=False)
        run = tmp / "run"
        sets = [f"data.root={tmp / 'data'}", "data.image_size=[64,32]", f"data.cache_dir={tmp / 'cache'}",
                "model.channel=16", "model.n_res_channel=8", "model.embed_dim=8", "model.n_embed=32",
                "train.batch_size=2", "train.epochs=1000", f"train.max_steps={args.steps}",
                f"train.checkpoint_every={args.checkpoint_every}", f"output.dir={run}"]
        command = ["train", *[a for s in sets for a in ("--set", s)]]
        lost = []
        while len(lost) < args.kills:
            resume = (run / "models/last.pt").exists()
            code, seen = run_until(["train", "--resume", str(run)] if resume else command,
                                   rng.uniform(3.0, 12.0))
            if code is not None:  # finished before the kill: start again
                if code != 0:
                    raise SystemExit(f"training failed with exit status {code}")
                for f in (run / "models").glob("*.pt"):
                    f.unlink()
                (run / "metrics.csv").unlink()
                continue
            saved = load_checkpoint(run / "models/last.pt")["step"] if (run / "models/last.pt").exists() else 0
            lost.append(max(0, seen - saved))
            print(f"killed at step {seen}; last.pt holds step {saved}; lost {lost[-1]} steps")
        print(f"checkpoint_every={args.checkpoint_every}: most steps lost {max(lost)}, "
              f"mean {sum(lost) / len(lost):.1f} over {len(lost)} kills")


if __name__ == "__main__":
    main()
