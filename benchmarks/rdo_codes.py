"""Codes chosen for their cost: rate-distortion-optimised bottom codes under a prior's integer copy.

The encoder may write any code at a bottom position, not only the nearest to the encoder's vector:
here each bottom code is chosen, in the order the prior codes (pass by pass, the slices of a volume
wave by wave after the slices they are coded after), to minimise the extra distance of its vector
``d_k - d_nearest`` (the quantiser's own squared distance) plus ``weight`` x its bits under the
prior given the codes already chosen; the top codes stay the nearest. Prints one row per weight:
the codes file's rate (the file ``mrivq encode --prior`` would write, headers included), the test
SSIM / PSNR of what it decodes to, and the share of bottom codes changed; with ``--max-error``
also the lossless / bounded file's rate (codes and residual layer) at each bound.

    python benchmarks/rdo_codes.py RUN_DIR PRIOR --weights 0 0.003 0.01 0.03 [--max-error 0 2]

Figures are measurements, never assertions: nothing here fails CI. (A weight of 0 gives the
nearest codes, the file of today.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from mrivq.compression import driver
from mrivq.compression.codec import CodecInput, decode_images, encode_images, slices_to_batch
from mrivq.config import load_config
from mrivq.data.sources import data_splits
from mrivq.data.volumes import references
from mrivq.engine.checkpoint import load_codec
from mrivq.metrics.image import psnr_per_image, ssim_per_image


@torch.inference_mode()
def excess_distances(model, images: np.ndarray, top: np.ndarray, batch: int = 16) -> np.ndarray:
    """float32 ``(N, P, K)``: each bottom position's squared distance to every code less its
    distance to the nearest, as the bottom quantiser measures it (given the nearest top codes)."""
    quantizer, out = model.quantize_bottom, []
    for lo in range(0, len(images), batch):
        features = model.enc_b(model._pad(slices_to_batch(images[lo:lo + batch], torch.device("cpu"))))
        above = model.dec_t(model.quantize_top.embed_codes(torch.as_tensor(top[lo:lo + batch])))
        z = quantizer._unit(model.quantize_conv_b(torch.cat([above, features], dim=1)).float())
        flat = z.permute(0, 2, 3, 1).reshape(len(z), -1, z.shape[1])
        distances = quantizer.embed.pow(2).sum(1) - 2 * flat @ quantizer.embed.t()
        out.append((distances - distances.min(-1, keepdim=True).values).numpy())
    return np.concatenate(out)


def chosen_codes(copy, top: np.ndarray, excess: np.ndarray, weight: float, refs) -> tuple[np.ndarray, np.ndarray]:
    """The top codes and the bottom codes of least ``excess + weight x bits``, chosen in coding order."""
    flat_top = top.reshape(len(top), -1)

    def code(level, weights, i, where):
        if level == "top":
            return flat_top[i, where]
        bits = -np.log2(weights / weights.sum(1, keepdims=True))
        return np.argmin(excess[i, where] + weight * bits, axis=1)

    with torch.inference_mode():
        return driver.run(copy, len(top), code, None, references=refs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("prior", type=Path, help="a prior checkpoint of the run's VQ-VAE")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03])
    parser.add_argument("--max-error", type=int, nargs="*", default=[], metavar="DELTA")
    args = parser.parse_args()
    config = load_config(args.run_dir / "config.yaml")
    codec = load_codec(args.run_dir / "models" / "best.pt", prior=args.prior)
    slices = CodecInput.read(data_splits(config.data, config.seed).test, codec.prep, originals=True)
    images = np.asarray(slices.images, dtype=np.float32)
    pixels, voxels = images.size, sum(o.values.size for o in slices.originals)
    top, bottom = encode_images(codec.model, images)
    excess = excess_distances(codec.model, images, top)
    copy = codec.coding_copy()
    refs = None
    if getattr(copy, "volumes", False):
        refs = references([source["name"] for source in slices.sources], codec.prior.key_every)
    target = torch.from_numpy(images).unsqueeze(1)
    print(f"{len(images)} test slices of {args.run_dir}, codes under {args.prior}")
    print("| weight | codes file bpp | SSIM | PSNR | bottom codes changed |"
          + "".join(f" δ = {d}: bits per voxel |" for d in args.max_error))
    print("|---|---|---|---|---|" + "---|" * len(args.max_error))
    for weight in args.weights:
        codes = chosen_codes(copy, top, excess, weight, refs) if weight > 0 else (top, bottom)
        packed = codec.compress_codes(codes, slices)
        decoded = torch.from_numpy(decode_images(codec.model, *codes)).unsqueeze(1)
        row = (f"| {weight:g} | {8 * len(packed.blob) / pixels:.4f} | {float(ssim_per_image(decoded, target).mean()):.4f}"
               f" | {float(psnr_per_image(decoded.clamp(0, 1), target).mean()):.2f}"
               f" | {float((codes[1] != bottom).mean()):.3f} |")
        pictures = None
        for delta in args.max_error:
            bounded = codec.compress_codes(codes, slices, layers=("residual",), pictures=pictures,
                                           layer_options={"residual": {"max_error": delta}})
            pictures = bounded.pictures
            row += f" {8 * len(bounded.blob) / voxels:.4f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
