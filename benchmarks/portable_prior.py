"""The pass prior's coder: its rate against the float prior's, and its speed by thread count.

For a pass prior checkpoint (``mrivq train-prior --set prior.architecture=passes``) and the
test split of its VQ-VAE's data settings, prints one JSON object:

- ``float_bits_per_pixel``: the float prior's teacher-forced NLL over the test codes (each
  code given the passes before its own), what an ideal coder would spend under it;
- ``integer_bits_per_pixel``: the length of the range-coded stream under the integer copy (one
  stream per slice, each with its length word), and ``ratio`` of the two;
- for 1 and 2 threads, encoding and decoding slices per second of the coder alone (codes in,
  words out and back; the VQ-VAE and file I/O are not counted; the fastest of 3 rounds), each
  decode checked, and once more decoding in batches of 7.

    python benchmarks/portable_prior.py runs/default/models/prior_best.pt [--set data.root=...]

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mrivq.compression.codec import encode_images
from mrivq.compression.entropy import decode_in_passes, encode_in_passes
from mrivq.config import load_config
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.engine.checkpoint import load_prior
from mrivq.nn.pass_prior import PassPrior

ROUNDS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prior", help="a pass prior checkpoint (models/prior_best.pt)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="data settings of the test split (default: the built-in phantom set)")
    args = parser.parse_args()
    prior, vqvae, _ = load_prior(args.prior)
    if not isinstance(prior, PassPrior):
        raise SystemExit(f"{args.prior} is a transformer prior; this measures pass priors")
    config = load_config(None, args.overrides)
    test = load_split(data_splits(config.data, config.seed).test, Preprocessing.from_settings(config.data),
                      name="test", cache_dir=config.data.cache_dir)
    top, bottom = encode_images(vqvae, test.images, 16)
    n, pixels = len(top), test.images[0].size
    float_bits = 0.0
    with torch.inference_mode():
        for lo in range(0, n, 16):
            t, b = (torch.as_tensor(a[lo:lo + 16]).long() for a in (top, bottom))
            nll_top, nll_bottom = prior.nll_bits(t, b)
            float_bits += len(t) * (float(nll_top) * t[0].numel() + float(nll_bottom) * b[0].numel())
    out = {"slices": n, "float_bits_per_pixel": float_bits / (n * pixels)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        encode_s = decode_s = float("inf")
        for _ in range(ROUNDS):  # the fastest round: the machine's other work only slows a round
            start = time.perf_counter()
            words = encode_in_passes(prior.integer, top, bottom)
            coded = time.perf_counter()
            decoded = decode_in_passes(prior.integer, words, n)
            encode_s, decode_s = min(encode_s, coded - start), min(decode_s, time.perf_counter() - coded)
            if not (np.array_equal(decoded[0], top) and np.array_equal(decoded[1], bottom)):
                raise SystemExit("the stream did not decode back to the codes")
        out[f"threads_{threads}"] = {"encode_slices_per_s": round(n / encode_s, 1),
                                     "decode_slices_per_s": round(n / decode_s, 1)}
    other_batch = decode_in_passes(prior.integer, words, n, batch_size=7)  # any batch decodes
    if not (np.array_equal(other_batch[0], top) and np.array_equal(other_batch[1], bottom)):
        raise SystemExit("the stream did not decode back to the codes in batches of 7")
    out["integer_bits_per_pixel"] = words.size * 32 / (n * pixels)
    out["ratio"] = out["integer_bits_per_pixel"] / out["float_bits_per_pixel"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
