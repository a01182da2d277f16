"""Where a training step's time goes: torch.profiler over a few steps of the report's model.

    python benchmarks/profile_step.py [--steps 3] [--batch-size 10] [--precision auto] [--rows 12]

Prints the operators with the most self time (CPU, or CUDA on a GPU) as a share of the total,
for the step training uses (mrivq.engine.step.optimisation_step, channels-last, resolved precision).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mrivq.apps.bench import phantom_batch
from mrivq.config import load_config
from mrivq.engine.step import optimisation_step
from mrivq.engine.vqvae_training import vqvae_loss
from mrivq.nn import VQVAE2
from mrivq.runtime import resolve_device, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()

    config = load_config(None, [])
    device = resolve_device("auto")
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    model = VQVAE2(**config.model.model_dump()).to(device).to(memory_format=torch.channels_last)
    batch = phantom_batch(args.batch_size, (256, 128)).to(device).contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        optimisation_step(model, optimizer, scaler,
                          lambda: vqvae_loss(model, batch, precision=precision, latent_loss_weight=0.25),
                          grad_clip=1.0, sync_free=device.type == "cuda")

    step()  # warm-up: allocations, oneDNN/cuDNN algorithm choice
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    use_cuda = device.type == "cuda"
    events = prof.key_averages()
    key = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    print(f"device {device}, precision {precision}, batch {args.batch_size}x1x256x128, {args.steps} steps; "
          f"self {'CUDA' if use_cuda else 'CPU'} time {total / 1e6 / args.steps:.3f} s per step")
    for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:args.rows]:
        print(f"{getattr(e, key) / total:6.1%}  {e.key}")


if __name__ == "__main__":
    main()
