"""A prior's portable coder: its rate against the float prior's, and its speed by thread count.

For a prior checkpoint with an integer copy (a pass prior, or a transformer prior saved by
this mrivq) and the test split of its VQ-VAE's data settings, prints one JSON object:

- ``float_bits_per_pixel``: the float prior's teacher-forced NLL over the test codes (each
  code given the codes coded before it), what an ideal coder would spend under it;
- ``integer_bits_per_pixel``: the length of the range-coded stream under the integer copy (one
  stream per slice, each with its length word), and ``ratio`` of the two;
- for 1 and 2 threads, encoding and decoding slices per second of the coder alone (codes in,
  words out and back; the VQ-VAE and file I/O are not counted; the fastest of ``--rounds``),
  each decode checked, and once more decoding in batches of 7.

A volume prior codes each test slice given slices on either side of it in its volume (by the
slices' names), a key slice every ``key_every`` (its own setting); ``--key-every 1 16 ...`` adds the
integer rate at other intervals (``key_every_<K>_bits_per_pixel``; 1: every slice alone), and
``key_slices_bits_per_pixel`` / ``other_slices_bits_per_pixel`` split the stream at its own,
``by_gap`` by the slices between a slice and each of its references (0: key slices).

    python benchmarks/portable_prior.py runs/default/models/prior_best.pt [--rounds 3] [--set data.root=...]

Figures are measurements, never assertions: nothing here fails CI.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mrivq.compression import driver
from mrivq.compression.codec import encode_images
from mrivq.config import load_config
from mrivq.data.cache import load_split
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.data.volumes import references, volume_place
from mrivq.engine.checkpoint import load_prior
from mrivq.nn.pass_prior import referenced_grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prior", help="a prior checkpoint with an integer copy (models/prior_best.pt)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the fastest counts")
    parser.add_argument("--key-every", type=int, nargs="*", default=[], metavar="K",
                        help="a volume prior: the rate with a key slice every K slices too")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="data settings of the test split (default: the built-in phantom set)")
    args = parser.parse_args()
    prior, vqvae, _ = load_prior(args.prior)
    if prior.integer is None:
        raise SystemExit(f"{args.prior} has no integer copy (a transformer prior of an earlier mrivq)")
    encode, decode = driver.encode, driver.decode
    config = load_config(None, args.overrides)
    test = load_split(data_splits(config.data, config.seed).test, Preprocessing.from_settings(config.data),
                      name="test", cache_dir=config.data.cache_dir)
    top, bottom = encode_images(vqvae, test.images, 16)
    n, pixels = len(top), test.images[0].size
    names = [Path(f).name for f in test.files]
    volumes = getattr(prior.integer, "volumes", False)
    refs = references(names, prior.key_every) if volumes else None
    float_bits = 0.0
    with torch.inference_mode():
        for lo in range(0, n, 16):
            t, b = (torch.as_tensor(a[lo:lo + 16]).long() for a in (top, bottom))
            extra = []
            if volumes:
                extra = [referenced_grids(refs[lo:lo + 16], torch.as_tensor(top), torch.as_tensor(bottom))]
            nll_top, nll_bottom = prior.nll_bits(t, b, *extra)
            float_bits += len(t) * (float(nll_top) * t[0].numel() + float(nll_bottom) * b[0].numel())
    out = {"slices": n, "float_bits_per_pixel": float_bits / (n * pixels)}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        words, out[f"threads_{threads}"] = _timed(lambda: encode(prior.integer, top, bottom, references=refs),
                                                  lambda w: decode(prior.integer, w, n, references=refs),
                                                  top, bottom, args.rounds)
    if volumes:
        lengths = words[:n].astype(np.int64) * 32 + 32  # each slice's stream and its length word
        out["key_every"] = prior.key_every
        key = refs[:, 0] < 0
        out["key_slices_bits_per_pixel"] = float(lengths[key].mean() / pixels)
        out["other_slices_bits_per_pixel"] = float(lengths[~key].mean() / pixels) if (~key).any() else None
        place = np.array([(volume_place(name) or (None, 0))[1] for name in names])
        gaps = np.where(key, 0, np.abs(place[refs[:, 1]] - place[refs[:, 0]]) // 2)
        out["by_gap"] = {int(g): {"slices": int((gaps == g).sum()),
                                  "bits_per_pixel": float(lengths[gaps == g].mean() / pixels)}
                         for g in np.unique(gaps)}
        for k in args.key_every:
            size = encode(prior.integer, top, bottom, references=references(names, k)).size
            out[f"key_every_{k}_bits_per_pixel"] = size * 32 / (n * pixels)
    other_batch = decode(prior.integer, words, n, batch_size=7, references=refs)  # any batch decodes
    if not (np.array_equal(other_batch[0], top) and np.array_equal(other_batch[1], bottom)):
        raise SystemExit("the stream did not decode back to the codes in batches of 7")
    out["integer_bits_per_pixel"] = words.size * 32 / (n * pixels)
    out["ratio"] = out["integer_bits_per_pixel"] / out["float_bits_per_pixel"]
    print(json.dumps(out, indent=1))




def _timed(encode, decode, top, bottom, rounds: int) -> tuple[np.ndarray, dict]:
    """The stream, and encoding and decoding slices per second, the fastest of ``rounds`` (the
    machine's other work only slows a round); every decode is checked."""
    encode_s = decode_s = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        words = encode()
        coded = time.perf_counter()
        decoded = decode(words)
        encode_s, decode_s = min(encode_s, coded - start), min(decode_s, time.perf_counter() - coded)
        if not (np.array_equal(decoded[0], top) and np.array_equal(decoded[1], bottom)):
            raise SystemExit("the stream did not decode back to the codes")
    return words, {"encode_slices_per_s": round(len(top) / encode_s, 1),
                   "decode_slices_per_s": round(len(top) / decode_s, 1)}


if __name__ == "__main__":
    main()
