"""``mrivq encode``: NIfTI slices -> a codes file (a real bitstream), and what it costs in bits.

Slices are preprocessed as the VQ-VAE was trained (fit to ``data.image_size``, per-slice
normalisation) and encoded in float32; the codes are range-coded under their frequencies, or
with ``--prior`` under a trained prior, into one file (:mod:`mrivq.compression.container`) that
holds everything ``mrivq decode`` needs. The stream is decoded again before the file is
written, through the decoder's own path, so a file that would not decode is never written.
Bits per pixel and compression ratios are the file's own size.

Example::

    >>> report = encode("runs/default/models/best.pt", ["keras_slices_test"], "test.mrvq")
    >>> report["bits_per_pixel"]["file"], report["bits_per_pixel"]["raw"]
    (0.66..., 0.703125)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrivq import strict_json
from mrivq.compression.container import (
    MAGIC,
    bits_report,
    check_encodable,
    pack_checked,
    preprocessing_entry,
    source_entry,
)
from mrivq.compression.entropy import bits_per_pixel_map, surprise_bits
from mrivq.data.io import nifti_bytes, nifti_image, nifti_inputs, read_slice
from mrivq.data.preprocess import Preprocessing, preprocess_slice, unfit
from mrivq.engine.checkpoint import coding_fingerprint, load_prior, load_vqvae, model_fingerprint
from mrivq.engine.inference import encode_images
from mrivq.errors import UserError
from mrivq.metrics import unit_range_images
from mrivq.nn.prior import NonFiniteProbabilities
from mrivq.reporting.plots import plot_surprise
from mrivq.run_dir import atomic_write, claim_outputs
from mrivq.runtime import resolve_device

SUFFIX = ".mrvq"


def encode(checkpoint: str | Path, inputs, out: str | Path, *, batch_size: int = 16,
           prior: str | Path | None = None, device: str = "auto", surprise: str | Path | None = None,
           overwrite: bool = False) -> dict:
    """Encode NIfTI slices (files or folders) into the codes file ``out`` (``.mrvq``); returns the bits report.

    ``prior``: a ``mrivq train-prior`` checkpoint of the same VQ-VAE; the codes are then coded
    under it (decode needs it too). ``device``: where the models run (``auto``: CUDA when present).
    ``surprise`` (with ``prior``): a folder for each slice's bits-per-pixel map under the prior,
    ``<name>_bits.nii.gz`` on the slice's own grid, and ``surprise.png``; ``overwrite`` replaces
    maps an earlier command wrote there.
    """
    out = Path(out).expanduser()
    if out.suffix != SUFFIX:
        raise UserError(f"--out {out}: the codes file must end in {SUFFIX}")
    if surprise is not None and prior is None:
        raise UserError("--surprise maps the bits the prior spends: give the prior with --prior")
    _check_replaceable(out)
    device = resolve_device(device)
    model, trained = load_vqvae(checkpoint, device)
    fingerprint = model_fingerprint(model)
    code_prior = None
    if prior is not None:
        code_prior, _, _ = load_prior(prior, expect_fingerprint=fingerprint, device=device)
    prep = Preprocessing.from_settings(trained.data)
    files = nifti_inputs(inputs)
    slices, norm, affines, shapes, sources = [], [], [], [], []
    for path in files:
        raw, meta = read_slice(path)
        x, params = preprocess_slice(raw, prep)
        slices.append(x)
        norm.append(params)
        affines.append(meta.affine)
        shapes.append(raw.shape)
        sources.append(source_entry(path, meta))
    check_encodable(sources, prep.image_size)
    codes_top, codes_bottom = encode_images(model, np.stack(slices), batch_size)
    try:
        codes, blob, timing = pack_checked(
            codes_top, codes_bottom, n_embed=model.quantize_top.n_embed, preprocessing=preprocessing_entry(prep),
            model_fingerprint=fingerprint, sources=sources, norm=np.stack(norm), affines=np.stack(affines),
            shapes=np.array(shapes), prior=code_prior,
            prior_fingerprint=None if prior is None else coding_fingerprint(code_prior))
    except NonFiniteProbabilities as exc:
        raise UserError(f"{prior}: {exc}; train the prior again") from None
    maps = None
    if surprise is not None:
        maps = _surprise_maps(code_prior, codes_top, codes_bottom, Path(surprise).expanduser(), sources,
                              inputs=[*files, checkpoint, prior, out], overwrite=overwrite)
    atomic_write(out, lambda fh: fh.write(blob))
    if maps is not None:
        maps(np.stack(slices), shapes, affines, prep)
    report = bits_report(codes, len(blob), input_bytes=sum(f.stat().st_size for f in files))
    report.update(codes_file=str(out), verified=True, device=device.type, **timing)
    return report


def _surprise_maps(prior, codes_top: np.ndarray, codes_bottom: np.ndarray, folder: Path, sources: list[dict], *,
                   inputs: list, overwrite: bool):
    """Claim ``folder``'s map files for this encode (refusing before anything is written), and
    return the function that writes them once the codes file is written."""
    targets = [folder / f"{entry['name'][:-len('.nii.gz')]}_bits.nii.gz" for entry in sources]
    picture = folder / "surprise.png"
    claim_outputs(folder, "encode", [*targets, picture], overwrite=overwrite, inputs=inputs)

    def write(slices: np.ndarray, shapes: list, affines: list, prep: Preprocessing) -> None:
        maps = bits_per_pixel_map(*surprise_bits(prior, codes_top, codes_bottom))
        for i, target in enumerate(targets):  # on the slice's own grid, in its on-disk shape
            grid = unfit(maps[i], tuple(shapes[i]), prep.fit).reshape(sources[i]["shape"])
            blob = nifti_bytes(nifti_image(grid, affines[i]))
            atomic_write(target, lambda fh, blob=blob: fh.write(blob), listed=False)
        shown = list(range(min(8, len(maps))))
        plot_surprise(unit_range_images(slices[shown], prep.normalize), maps[shown], picture,
                      [f"{maps[i].mean():.3f} bpp" for i in shown])
    return write


def _check_replaceable(out: Path) -> None:
    """Refuse an ``--out`` that exists and is not a codes file: encode replaces only its own kind."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the codes file's name")
    if out.exists() or out.is_symlink():
        magic = b""
        if out.is_file() and not out.is_symlink():  # never open a FIFO or a device
            with out.open("rb") as fh:
                magic = fh.read(len(MAGIC))
        if magic != MAGIC:
            raise UserError(f"--out {out} exists and is not an mrivq codes file; move it or choose another name")


def main(args) -> int:
    """``mrivq encode --checkpoint FILE INPUT... --out CODES.mrvq [--prior FILE] [--json] [--device D]``."""
    report = encode(args.checkpoint, args.inputs, args.out, prior=args.prior, device=args.device,
                    surprise=args.surprise, overwrite=args.overwrite)
    if args.json:
        print(strict_json.dumps(report, indent=2))
        return 0
    bpp = report["bits_per_pixel"]
    under = "the prior" if report["coder"] == "prior" else "code frequencies"
    print(f"wrote {report['codes_file']} ({report['n_slices']} slices, {report['file_bytes']} bytes, range-coded "
          f"under {under}, checked to decode): {bpp['file']:.4f} bits per pixel (raw indices {bpp['raw']:.4f}); "
          f"compression ratio vs the input files {report['compression_ratio']:.1f}:1; "
          f"range coding {report['n_slices'] / report['coding_s']:.1f} slices/s, decoding the stream "
          f"{report['n_slices'] / report['decoding_s']:.1f} slices/s, on {report['device']}")
    if args.surprise:
        print(f"wrote the bits-per-pixel maps under the prior to {args.surprise} (<name>_bits.nii.gz, surprise.png)")
    return 0
