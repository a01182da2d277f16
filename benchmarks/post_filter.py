"""Fidelity bought after the codes: a post-filter, or the decoder trained again on fixed codes.

The codes, and so every codes file and its rate, stay as they are; only the picture they
decode to changes. Three designs, each trained for ``--minutes`` on the run's training split
(16 random 96x96 windows a step, MSE against the slice, fp32) and scored on its test split (SSIM
/ PSNR under the project's protocol):

- ``filter1``: five 3x3 convolutions of 32 channels at full resolution after the decoder,
  adding a correction to the decoded slice (the last layer starts at zero, so step 0 is the
  decoded slice);
- ``filter3``: the same, also handed the decoded slices before and after it in its volume
  (HipMRI's names; the slice itself where there is none): what a decoder that has decoded a
  scan's neighbouring slices could use at no cost in rate;
- ``decoder``: no new layers, the VQ-VAE's own decoder (and the top codes' upsampling) trained
  further on the fixed codes, everything else frozen.

    python benchmarks/post_filter.py RUN_DIR --designs filter1 filter3 decoder --minutes 3

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mrivq.compression.codec import CodecInput, decode_images, encode_images
from mrivq.config import load_config
from mrivq.data.sources import data_splits
from mrivq.data.volumes import neighbours
from mrivq.engine.checkpoint import load_codec
from mrivq.metrics.image import psnr_per_image, ssim_per_image

CROP, BATCH = 96, 16


class Split:
    """A split's slices, their codes, what the codes decode to, and each slice's neighbours."""

    def __init__(self, model, files: list, prep) -> None:
        self.images = np.asarray(CodecInput.read(files, prep).images, dtype=np.float32)
        self.top, self.bottom = encode_images(model, self.images)
        self.decoded = decode_images(model, self.top, self.bottom).reshape(self.images.shape)
        around = neighbours([str(f) for f in files], 1)
        index = np.arange(len(files))
        self.before = np.where(around[:, 0] >= 0, around[:, 0], index)
        self.after = np.where(around[:, 1] >= 0, around[:, 1], index)

    def inputs(self, with_neighbours: bool) -> np.ndarray:
        """``(N, C, H, W)``: the decoded slice, or the slices before, itself and after."""
        if with_neighbours:
            return np.stack([self.decoded[self.before], self.decoded, self.decoded[self.after]], 1)
        return self.decoded[:, None]


def filter_net(channels_in: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(channels_in, 32, 3, padding=1), nn.ReLU()]
    for _ in range(4):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(32, 1, 3, padding=1))
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


def crops(rng: np.random.Generator, *arrays: np.ndarray) -> list[torch.Tensor]:
    """The same ``BATCH`` random ``CROP`` x ``CROP`` windows of each ``(N, ..., H, W)`` array."""
    n, height, width = len(arrays[0]), arrays[0].shape[-2], arrays[0].shape[-1]
    picks = list(zip(rng.integers(0, n, BATCH), rng.integers(0, height - CROP + 1, BATCH),
                     rng.integers(0, width - CROP + 1, BATCH)))
    return [torch.from_numpy(np.stack([a[i, ..., y:y + CROP, x:x + CROP] for i, y, x in picks])) for a in arrays]


def score(pictures: np.ndarray, images: np.ndarray) -> tuple[float, float]:
    rec, target = torch.from_numpy(pictures).unsqueeze(1).clamp(0, 1), torch.from_numpy(images).unsqueeze(1)
    return float(ssim_per_image(rec, target).mean()), float(psnr_per_image(rec, target).mean())


def train_filter(train: Split, test: Split, with_neighbours: bool, seconds: float, seed: int) -> tuple[int, np.ndarray]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    inputs = train.inputs(with_neighbours)
    net = filter_net(inputs.shape[1])
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    centre = inputs.shape[1] // 2
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, target = crops(rng, inputs, train.images[:, None])
        loss = torch.nn.functional.mse_loss(x[:, centre:centre + 1] + net(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    net.eval()
    test_inputs = torch.from_numpy(test.inputs(with_neighbours))
    with torch.no_grad():
        out = [(x[:, centre] + net(x)[:, 0]).numpy() for x in test_inputs.split(8)]
    return steps, np.concatenate(out)


def train_decoder(model, train: Split, test: Split, seconds: float, seed: int) -> tuple[int, np.ndarray]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    trained = [*model.dec.parameters(), *model.upsample_t.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(trained, lr=1e-4)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chosen = rng.integers(0, len(train.images), BATCH)
        decoded = model.decode_codes(torch.from_numpy(train.top[chosen]), torch.from_numpy(train.bottom[chosen]),
                                     output_size=train.images.shape[-2:])
        loss = torch.nn.functional.mse_loss(decoded.float(), torch.from_numpy(train.images[chosen]).unsqueeze(1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        steps += 1
    model.eval()
    return steps, decode_images(model, test.top, test.bottom).reshape(test.images.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--designs", nargs="+", choices=["filter1", "filter3", "decoder"],
                        default=["filter1", "filter3", "decoder"])
    parser.add_argument("--minutes", type=float, default=3.0, help="training time of each design")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.run_dir / "config.yaml")
    codec = load_codec(args.run_dir / "models" / "best.pt")
    splits = data_splits(config.data, config.seed)
    with torch.no_grad():
        train, test = (Split(codec.model, files, codec.prep) for files in (splits.train, splits.test))
    print(f"{args.run_dir}: {len(train.images)} training and {len(test.images)} test slices, "
          f"{args.minutes:g} minutes a design, {args.threads} threads")
    print("| design | steps | test SSIM | PSNR |")
    print("|---|---|---|---|")
    print("| the codes' picture | 0 | {:.4f} | {:.2f} |".format(*score(test.decoded, test.images)), flush=True)
    for design in args.designs:
        seconds = 60 * args.minutes
        if design == "decoder":
            steps, pictures = train_decoder(codec.model, train, test, seconds, args.seed)
        else:
            steps, pictures = train_filter(train, test, design == "filter3", seconds, args.seed)
        print("| {} | {} | {:.4f} | {:.2f} |".format(design, steps, *score(pictures, test.images)), flush=True)


if __name__ == "__main__":
    main()
