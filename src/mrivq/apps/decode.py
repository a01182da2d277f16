"""``mrivq decode``: a codes file -> NIfTI slices in scanner intensities, named after their inputs.

A codes file may come from someone else, so everything in it is checked before anything is
written (:meth:`mrivq.compression.container.CodesFile.from_bytes`, then against the model):
decode writes only the plain file names the file lists, directly in ``--out``, never over a
file mrivq did not write there, and over its own earlier outputs only with ``--overwrite``.
Slices are decoded and written a batch at a time, so memory does not grow with the file.

Example::

    >>> written = decode("runs/default/models/best.pt", "test.mrvq", "decoded/")
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from mrivq.compression.container import CodesFile, read_codes_file, unpack_codes
from mrivq.config import Config
from mrivq.data.io import nifti_bytes, nifti_image
from mrivq.data.preprocess import clip_to_input_range, denormalize, unfit
from mrivq.engine.checkpoint import coding_fingerprint, load_prior, load_vqvae, model_fingerprint
from mrivq.engine.inference import decode_images
from mrivq.errors import UserError
from mrivq.nn import VQVAE2
from mrivq.run_dir import atomic_write, claim_outputs
from mrivq.runtime import resolve_device


def decode(checkpoint: str | Path, codes_path: str | Path, out_dir: str | Path, *, prior: str | Path | None = None,
           batch_size: int = 16, device: str = "auto", overwrite: bool = False) -> list[Path]:
    """Write every slice of a codes file as NIfTI in ``out_dir``, named after its input.

    The stream is decoded (under ``prior`` for a prior-coded file: the ``models/prior_best.pt``
    that encoded it) and checked against the encoder's checksum; intensities are scanner units
    (the stored normalisation undone), the array has the input file's shape and the image its
    affine. ``overwrite``: replace slices an earlier decode wrote there. Returns the written paths.
    """
    codes_path = Path(codes_path).expanduser()
    codes = read_codes_file(codes_path)
    header = codes.header
    device = resolve_device(device)
    model, trained = load_vqvae(checkpoint, device)
    fingerprint = _check_model(codes, model, trained, codes_path)
    out_dir = Path(out_dir).expanduser()
    targets = [out_dir / source["name"] for source in header["sources"]]
    code_prior = None
    if header["coder"] == "prior" and prior is not None:
        # A pass prior's integer copy gives the same probabilities on any device; a transformer
        # prior runs where it ran when encoding, so that the same arithmetic gives them.
        prior_device = device if header.get("prior_coding") == "passes" else header.get("prior_device", "cpu")
        if prior_device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{codes_path} was prior-coded on CUDA; decode it on a machine with a GPU")
        code_prior, _, _ = load_prior(prior, expect_fingerprint=fingerprint, device=prior_device)
        if coding_fingerprint(code_prior) != header["prior_fingerprint"]:
            raise UserError(f"{codes_path} was coded under another prior (fingerprint {header['prior_fingerprint']}); "
                            "give the prior that encoded it with --prior")
    codes_top, codes_bottom = unpack_codes(codes, code_prior, codes_path)
    claim_outputs(out_dir, "decode", targets, overwrite=overwrite, inputs=[codes_path, checkpoint, prior])
    height, width = header["image_size"]
    for lo in tqdm(range(0, codes.n, batch_size), desc="decode", unit="batch", disable=None, leave=False):
        slices = decode_images(model, codes_top[lo:lo + batch_size], codes_bottom[lo:lo + batch_size], batch_size)
        slices = clip_to_input_range(slices[:, :height, :width], header["normalize"])
        for i, decoded in enumerate(slices, start=lo):
            shape = header["sources"][i]["shape"]
            scanner = denormalize(unfit(decoded, tuple(codes.shapes[i]), header["fit"]), codes.norm[i])
            blob = nifti_bytes(nifti_image(scanner.reshape(shape), codes.affines[i]))
            atomic_write(targets[i], lambda fh, blob=blob: fh.write(blob), listed=False)
    return targets


def _check_model(codes: CodesFile, model: VQVAE2, trained: Config, path: Path) -> str:
    """The codes file against the VQ-VAE that is to decode it; returns the model's fingerprint."""
    header = codes.header
    fingerprint = model_fingerprint(model)
    if header["n_embed"] != model.quantize_top.n_embed or header["model_fingerprint"] != fingerprint:
        raise UserError(f"{path} was encoded with another model (fingerprint {header['model_fingerprint']}, "
                        f"this checkpoint's {fingerprint}); decode with the checkpoint that encoded it")
    data = trained.data
    stored = (tuple(header["image_size"]), header["fit"], header["normalize"])
    if stored != (tuple(data.image_size), data.fit, data.normalize):
        raise UserError(f"{path}: damaged or altered codes file: its image size and preprocessing {stored} are "
                        "not the ones its model was trained with; encode the slices again")
    return fingerprint


def main(args) -> int:
    """``mrivq decode --checkpoint FILE CODES.mrvq --out DIR [--prior FILE] [--device D] [--overwrite]``."""
    written = decode(args.checkpoint, args.codes, args.out, prior=args.prior, device=args.device,
                     overwrite=args.overwrite)
    print(f"wrote {len(written)} slices to {args.out}")
    return 0
