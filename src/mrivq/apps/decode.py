"""``mrivq decode``: a codes file -> NIfTI slices in scanner intensities, named after their inputs.

Example::

    >>> written = decode("runs/default/models/best.pt", "test.mrvq", "decoded/")
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import torch

from mrivq.compression.container import read_codes_file, unpack_codes
from mrivq.data.io import nifti_bytes
from mrivq.data.preprocess import clip_to_input_range, denormalize, unfit
from mrivq.engine.checkpoint import load_prior, load_vqvae, model_fingerprint
from mrivq.engine.inference import decode_images
from mrivq.errors import UserError
from mrivq.run_dir import atomic_write
from mrivq.runtime import resolve_device


def decode(checkpoint: str | Path, codes_path: str | Path, out_dir: str | Path, *, prior: str | Path | None = None,
           batch_size: int = 16, device: str = "auto") -> list[Path]:
    """Write every slice of a codes file as NIfTI in ``out_dir``, named after its input.

    The stream is decoded (under ``prior`` for a prior-coded file: the ``models/prior_best.pt``
    that encoded it) and checked against the encoder's checksum; intensities are scanner units
    (the stored normalisation undone), the array has the input file's shape and the image its
    affine. Returns the written paths.
    """
    codes_path = Path(codes_path).expanduser()
    codes = read_codes_file(codes_path)
    header = codes.header
    device = resolve_device(device)
    model, _ = load_vqvae(checkpoint, device)
    fingerprint = model_fingerprint(model)
    if int(header["n_embed"]) != model.quantize_top.n_embed or header["model_fingerprint"] != fingerprint:
        raise UserError(f"{codes_path} was encoded with another model (fingerprint {header['model_fingerprint']}, "
                        f"this checkpoint's {fingerprint}); decode with the checkpoint that encoded it")
    code_prior = None
    if header["coder"] == "prior" and prior is not None:
        # The prior runs where it ran when encoding: the same arithmetic gives the same probabilities.
        prior_device = header.get("prior_device", "cpu")
        if prior_device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{codes_path} was prior-coded on CUDA; decode it on a machine with a GPU")
        code_prior, _, _ = load_prior(prior, expect_fingerprint=fingerprint, device=prior_device)
        if model_fingerprint(code_prior) != header["prior_fingerprint"]:
            raise UserError(f"{codes_path} was coded under another prior (fingerprint {header['prior_fingerprint']}); "
                            "give the prior that encoded it with --prior")
    codes_top, codes_bottom = unpack_codes(codes, code_prior, codes_path)
    slices = decode_images(model, codes_top, codes_bottom, batch_size)
    height, width = (int(v) for v in header["image_size"])
    slices = clip_to_input_range(slices[:, :height, :width], header["normalize"])
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the decoded slices")
    outputs = []  # everything is built before the first file is written
    for i, source in enumerate(header["sources"]):
        shape = tuple(int(v) for v in codes.shapes[i])
        if math.prod(shape) != math.prod(source.get("shape", [])):
            raise UserError(f"{codes_path}: slice {source.get('name')} has inconsistent shapes; "
                            "encode the slices again")
        scanner = denormalize(unfit(slices[i], shape, header["fit"]), codes.norm[i])
        image = nib.Nifti1Image(scanner.reshape(source["shape"]), codes.affines[i])
        outputs.append((out_dir / Path(source["name"]).name, nifti_bytes(image)))
    for path, blob in outputs:
        atomic_write(path, lambda fh, blob=blob: fh.write(blob))
    return [path for path, _ in outputs]


def main(args) -> int:
    """``mrivq decode --checkpoint FILE CODES.mrvq --out DIR [--prior FILE] [--device D]``."""
    written = decode(args.checkpoint, args.codes, args.out, prior=args.prior, device=args.device)
    print(f"wrote {len(written)} slices to {args.out}")
    return 0
