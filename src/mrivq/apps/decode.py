"""``mrivq decode``: a codes file -> NIfTI slices in scanner intensities, named after their inputs.

Example::

    >>> written = decode("runs/default/models/best.pt", "test_codes.npz", "decoded/")
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib

from mrivq.compression.container import read_codes
from mrivq.data.io import nifti_bytes
from mrivq.data.preprocess import clip_to_input_range, denormalize, unfit
from mrivq.engine.checkpoint import codebook_fingerprint, load_vqvae
from mrivq.engine.inference import decode_images
from mrivq.errors import UserError
from mrivq.run_dir import atomic_write


def decode(checkpoint: str | Path, codes_path: str | Path, out_dir: str | Path, *,
           batch_size: int = 16) -> list[Path]:
    """Write every slice of a codes file as NIfTI in ``out_dir``, named after its input.

    Intensities are scanner units (the stored normalisation undone), the array has the input
    file's shape and the image its affine. Returns the written paths.
    """
    codes_path = Path(codes_path).expanduser()
    data = read_codes(codes_path)
    model, _ = load_vqvae(checkpoint)
    if int(data["n_embed"]) != model.quantize_top.n_embed or str(data["fingerprint"]) != codebook_fingerprint(model):
        raise UserError(f"{codes_path} was encoded with another model (codebook fingerprint "
                        f"{data['fingerprint']}, this checkpoint's {codebook_fingerprint(model)}); "
                        "decode with the checkpoint that encoded it")
    slices = decode_images(model, data["codes_top"], data["codes_bottom"], batch_size)
    image_size = tuple(int(v) for v in data["image_size"])
    slices = slices[:, :image_size[0], :image_size[1]]
    slices = clip_to_input_range(slices, str(data["normalize"]))
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the decoded slices")
    outputs = []  # everything is built before the first file is written
    for i, source in enumerate(data["sources"]):
        shape = tuple(int(v) for v in data["shapes"][i])
        if math.prod(shape) != math.prod(source.get("shape", [])):
            raise UserError(f"{codes_path}: slice {source.get('name')} has inconsistent shapes; "
                            "encode the slices again")
        scanner = denormalize(unfit(slices[i], shape, str(data["fit"])), data["norm"][i])
        image = nib.Nifti1Image(scanner.reshape(source["shape"]), data["affines"][i])
        outputs.append((out_dir / Path(source["name"]).name, nifti_bytes(image)))
    for path, blob in outputs:
        atomic_write(path, lambda fh, blob=blob: fh.write(blob))
    return [path for path, _ in outputs]


def main(args) -> int:
    """``mrivq decode --checkpoint FILE CODES.npz --out DIR``."""
    written = decode(args.checkpoint, args.codes, args.out)
    print(f"wrote {len(written)} slices to {args.out}")
    return 0
