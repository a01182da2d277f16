"""How much of a model's codes is noise: the share of codes that change when fresh noise is added.

A code prior can only predict what the image's content determines. Codes that flip when a
new draw of noise, far below the anatomy's contrast, is added to a slice carry the noise, and
every one of them costs the prior bits it cannot save. This benchmark encodes the validation
slices of a trained model as they are, then again with Gaussian noise of each given standard
deviation (in model input units, where the slices span [0, 1]) added, and again mirrored
left-right, and prints one JSON object per figure: the share of top and bottom codes that
differ from the clean slices' codes.

    python benchmarks/code_noise.py runs/default/models/best.pt [--sd 0.0025 0.005 0.01] [--n 60]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mrivq.compression.codec import encode_images
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.engine.checkpoint import load_vqvae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a VQ-VAE checkpoint (models/best.pt of a training run)")
    parser.add_argument("--sd", type=float, nargs="+", default=[0.0025, 0.005, 0.01],
                        help="noise standard deviations, in model input units")
    parser.add_argument("--n", type=int, default=60, help="validation slices to encode")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, config = load_vqvae(args.checkpoint)
    slices = load_split(data_splits(config.data, config.seed).validate, Preprocessing.from_settings(config.data),
                        cache_dir=config.data.cache_dir, name="validate")
    images = np.asarray(slices.images[:args.n], dtype=np.float32)
    top, bottom = encode_images(model, images)
    rng = np.random.default_rng(0)
    for sd in args.sd:
        noisy = np.clip(images + rng.normal(0, sd, images.shape), 0, 1).astype(np.float32)
        noisy_top, noisy_bottom = encode_images(model, noisy)
        report(f"noise sd {sd:g}", top, bottom, noisy_top, noisy_bottom)
    mirrored_top, mirrored_bottom = encode_images(model, images[:, :, ::-1])
    report("mirrored left-right (codes mirrored back)", top, bottom, mirrored_top[:, :, ::-1],
           mirrored_bottom[:, :, ::-1])


def report(what: str, top, bottom, other_top, other_bottom) -> None:
    print(json.dumps({"change": what, "slices": len(top), "top_codes_changed": round(float((top != other_top).mean()), 4),
                      "bottom_codes_changed": round(float((bottom != other_bottom).mean()), 4)}))


if __name__ == "__main__":
    main()
