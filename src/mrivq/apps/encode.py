"""``mrivq encode``: NIfTI slices -> a codes file, and what the codes cost in bits.

Slices are preprocessed as the VQ-VAE was trained (fit to ``data.image_size``, per-slice
normalisation) and encoded in float32; the file (:mod:`mrivq.compression.container`) keeps
what decode needs. The bits report (:func:`mrivq.compression.entropy.bits_report`) gives the
raw and range-coded rates, with ``--prior`` also the rate under the prior, and compression
ratios against the input files.

Example::

    >>> report = encode("runs/default/models/best.pt", ["keras_slices_test"], "test_codes.npz")
    >>> report["bits_per_pixel"]["raw"], report["bits_per_pixel"]["entropy_coded"]
    (0.3515625, 0.21...)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrivq import strict_json
from mrivq.compression.container import write_codes
from mrivq.compression.entropy import bits_report, prior_coded_bits
from mrivq.data.io import nifti_inputs, read_slice
from mrivq.data.preprocess import Preprocessing, preprocess_slice
from mrivq.engine.checkpoint import codebook_fingerprint, load_prior, load_vqvae
from mrivq.engine.inference import encode_images
from mrivq.errors import UserError


def _output_name(path: Path) -> str:
    name = path.name
    return name if name.lower().endswith(".gz") else name + ".gz"


def encode(checkpoint: str | Path, inputs, out: str | Path, *, batch_size: int = 16,
           prior: str | Path | None = None) -> dict:
    """Encode NIfTI slices (files or folders) into a codes file ``out`` (``.npz``); returns the bits report.

    With ``prior`` (a ``mrivq train-prior`` checkpoint made from the same VQ-VAE) the report
    also gives the bits of range coding under the prior.
    """
    out = Path(out).expanduser()
    if out.suffix != ".npz":
        raise UserError(f"--out {out}: the codes file must end in .npz")
    model, trained = load_vqvae(checkpoint)
    prep = Preprocessing.from_settings(trained.data)
    files = nifti_inputs(inputs)
    slices, norm, affines, shapes, disk = [], [], [], [], []
    for path in files:
        raw, meta = read_slice(path)
        x, params = preprocess_slice(raw, prep)
        slices.append(x)
        norm.append(params)
        affines.append(meta.affine)
        shapes.append(raw.shape)
        disk.append({"name": _output_name(path), "shape": list(meta.shape), "dtype": meta.dtype})
    codes_top, codes_bottom = encode_images(model, np.stack(slices), batch_size)
    n_embed = model.quantize_top.n_embed
    prior_bits = None
    if prior is not None:
        code_prior, _, _ = load_prior(prior, expect_fingerprint=codebook_fingerprint(model))
        prior_bits = prior_coded_bits(code_prior, codes_top, codes_bottom, batch_size=batch_size)
    input_bytes = sum(f.stat().st_size for f in files)
    report = bits_report(codes_top, codes_bottom, n_embed, prep.image_size, input_bytes, prior_bits)
    write_codes(out, codes_top=codes_top, codes_bottom=codes_bottom, n_embed=n_embed,
                fingerprint=codebook_fingerprint(model), prep=prep, norm=np.stack(norm), affines=np.stack(affines),
                shapes=shapes, sources=disk, report=report)
    report["codes_file"] = str(out)
    report["codes_file_bytes"] = out.stat().st_size
    return report


def main(args) -> int:
    """``mrivq encode --checkpoint FILE INPUT... --out CODES.npz [--prior FILE] [--json]``."""
    report = encode(args.checkpoint, args.inputs, args.out, prior=args.prior)
    if args.json:
        print(strict_json.dumps(report, indent=2))
        return 0
    bpp = report["bits_per_pixel"]
    line = (f"wrote {report['codes_file']} ({report['n_slices']} slices): bits per pixel raw "
            f"{bpp['raw']:.4f}, range-coded under code frequencies {bpp['entropy_coded']:.4f}")
    if "prior_coded" in bpp:
        line += f", range-coded under the prior {bpp['prior_coded']:.4f}"
    line += f"; compression ratio vs the input files {report['compression_ratio']:.1f}:1"
    if "compression_ratio_prior" in report:
        line += f" ({report['compression_ratio_prior']:.1f}:1 under the prior)"
    print(line)
    return 0
