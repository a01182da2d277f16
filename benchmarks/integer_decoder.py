"""What an integer copy of the VQ-VAE's decoder costs and gains, by simulation (the copy coding
layers use since 2026-12-06 is :mod:`mrivq.compression.portable.decoder`; this measures the
choices behind it: which layers need more than 8 bits).

The residual layer (``encode --max-error``) predicts from the picture of the decoder's integer
copy; before it, from the picture decoded in float64, which is the same on every machine to far
below a stored unit but slow. This prints, for the test slices of a run:

- **bits**: the residual layer's lossless rate (bits per voxel of its payloads) on the float64
  picture and on the picture of the decoder with its weights rounded to ``--weight-bits`` (per
  output channel, symmetric) and every convolution's input to ``--activation-bits`` (one range
  per layer, from these slices' own float64 decode: a calibration a stored copy would make once
  on training slices), simulated in float64;
- **speed**: the decoder's matrix products for one slice of ``--size`` (each convolution as an
  im2col product; the transposed ones as four 2x2 products) as int8 with exact sums
  (``torch._int_mm`` where exact), float32 and float64.

Usage::

    python benchmarks/integer_decoder.py RUN_DIR [--max-slices 60] [--weight-bits 8] [--activation-bits 8]
                                         [--size 256 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from mrivq.compression import residual
from mrivq.compression.codec import CodecInput
from mrivq.compression.portable.passes import int8_matmul
from mrivq.config import load_config
from mrivq.data.sources import data_splits
from mrivq.data.volumes import volume_place
from mrivq.engine.checkpoint import load_codec


def rounded_decoder(model: torch.nn.Module, weight_bits: int) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """A copy of the float64 model whose decoding convolutions have their weights rounded to
    ``weight_bits`` (per output channel); returns it and those convolutions."""
    model = copy.deepcopy(model)
    convs = [model.upsample_t] + [m for m in model.dec.modules()
                                  if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    for conv in convs:
        weight = conv.weight.data
        out_dim = 1 if isinstance(conv, torch.nn.ConvTranspose2d) else 0
        scale = weight.abs().amax(dim=[d for d in range(4) if d != out_dim], keepdim=True) / (2 ** (weight_bits - 1) - 1)
        conv.weight.data = torch.round(weight / scale.clamp(min=1e-30)) * scale
    return model, convs


def calibrated(convs: list[torch.nn.Module], ranges: dict) -> list:
    """Forward hooks recording the largest magnitude of each convolution's input in ``ranges``."""
    def record(module, inputs):
        ranges[module] = max(ranges.get(module, 0.0), float(inputs[0].abs().max()))

    return [conv.register_forward_pre_hook(record) for conv in convs]


def rounded_inputs(convs: list[torch.nn.Module], bits: int, ranges: dict) -> list:
    """Forward hooks rounding each convolution's input to ``bits`` over its calibrated range
    (unsigned where the input is never negative, as after a ReLU)."""
    def rounded(module, inputs):
        x, top = inputs[0], max(ranges[module], 1e-30)
        signed = float(x.min()) < 0
        levels = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        return (torch.round(x / (top / levels)).clamp(-levels if signed else 0, levels) * (top / levels),)

    return [conv.register_forward_pre_hook(rounded) for conv in convs]


def residual_bits(originals, pictures) -> float:
    payload = sum(len(residual.encode(o, p, max_error=0)) for o, p in zip(originals, pictures))
    return 8 * payload / sum(o.values.size for o in originals)


def product_times(size: tuple[int, int], channel: int, res_channel: int, embed: int, blocks: int) -> dict:
    """Milliseconds of the decoder's matrix products for one slice, per arithmetic."""
    h, w = size[0] // 4, size[1] // 4
    shapes = [(h * w, 4 * embed, embed),  # upsample_t (four 2x2 products)
              (h * w, 9 * 2 * embed, channel)]  # the first 3x3 convolution
    shapes += [(h * w, 9 * channel, res_channel), (h * w, res_channel, channel)] * blocks
    shapes += [(4 * h * w, 4 * channel, channel // 2), (16 * h * w, 4 * (channel // 2), 1)]
    out = {}
    for label in ("int8", "float32", "float64"):
        total = 0.0
        for m, k, n in shapes:
            a = torch.randint(-128, 127, (m, k), dtype=torch.int8)
            b = torch.randint(-128, 127, (k, n), dtype=torch.int8)
            if label == "int8":
                run = lambda a=a, b=b: int8_matmul(a, b)
            else:
                dtype = torch.float32 if label == "float32" else torch.float64
                af, bf = a.to(dtype), b.to(dtype)
                run = lambda af=af, bf=bf: af @ bf
            run()
            start = time.perf_counter()
            for _ in range(5):
                run()
            total += (time.perf_counter() - start) / 5
        out[label] = 1000 * total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--max-slices", type=int, default=60)
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--activation-bits", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.run_dir / "config.yaml")
    codec = load_codec(args.run_dir / "models" / "best.pt")
    files = sorted(data_splits(config.data, config.seed).test, key=lambda f: volume_place(str(f)) or (str(f), 0))
    slices = CodecInput.read(files[:args.max_slices], codec.prep, originals=True)
    packed = codec.compress(slices)
    exact = [p for _, p in codec._decoded(packed.file, *packed.codes, exact=True)]
    model, convs = rounded_decoder(codec._float64_model(), args.weight_bits)
    ranges: dict = {}
    codec._model64 = model  # the codec's float64 decode now runs the rounded copy
    for hooked in (lambda: calibrated(convs, ranges), lambda: rounded_inputs(convs, args.activation_bits, ranges)):
        hooks = hooked()  # first calibrate on the float64 inputs, then round
        pictures = [p for _, p in codec._decoded(packed.file, *packed.codes, exact=True)]
        for hook in hooks:
            hook.remove()
    off = np.mean([np.abs(p - e).mean() / max(float(o.values.max() - o.values.min()), 1.0)
                   for p, e, o in zip(pictures, exact, slices.originals)])
    print(f"{len(exact)} test slices of {args.run_dir}: residual bits per voxel at δ = 0 on the float64 picture "
          f"{residual_bits(slices.originals, exact):.4f}, on the w{args.weight_bits}a{args.activation_bits} "
          f"integer decoder's {residual_bits(slices.originals, pictures):.4f} (mean |difference| {off:.2e} of the range)")
    model_config = config.model
    times = product_times(tuple(args.size), model_config.channel, model_config.n_res_channel, model_config.embed_dim,
                          model_config.n_res_block)
    print(f"the decoder's matrix products for one {args.size[0]}x{args.size[1]} slice, {args.threads} threads: "
          + ", ".join(f"{label} {ms:.1f} ms" for label, ms in times.items()))


if __name__ == "__main__":
    main()
