"""``mrivq encode``: NIfTI slices and volumes -> a codes file (a real bitstream), and what it costs in bits.

Slices are preprocessed as the VQ-VAE was trained (fit to ``data.image_size``, per-slice
normalisation) and encoded in float32 (a 3-D file slice by slice along its third axis, the
slices named ``<stem>_slice_<index>``: a volume prior codes them as a volume, and ``mrivq
decode`` writes them back as one 3-D file); the codes are range-coded under their frequencies, or
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

import argparse
from pathlib import Path

import numpy as np

from mrivq import strict_json
from mrivq.apps import flags
from mrivq.compression.codec import Codec, CodecInput
from mrivq.compression.container import MAGIC
from mrivq.data.scans import scan_inputs
from mrivq.engine.checkpoint import load_codec
from mrivq.errors import UserError
from mrivq.metrics import unit_range_images
from mrivq.reporting.plots import plot_surprise
from mrivq.run_dir import atomic_write, claim_outputs
from mrivq.runtime import resolve_device

SUFFIX = ".mrvq"


def encode(checkpoint: str | Path, inputs, out: str | Path, *, prior: str | Path | None = None,
           device: str = "auto", surprise: str | Path | None = None, overwrite: bool = False,
           max_error: float | None = None, keep_dicom_header: bool = False) -> dict:
    """Encode NIfTI slices and 3-D volumes and DICOM series (files or folders) into the codes file ``out`` (``.mrvq``); returns the bits report.

    ``prior``: a ``mrivq train-prior`` checkpoint of the same VQ-VAE; the codes are then coded
    under it (decode needs it too). ``device``: where the models run (``auto``: CUDA when present).
    ``surprise`` (with ``prior``): a folder for each slice's bits-per-pixel map under the prior,
    ``<name>_bits.nii.gz`` on the slice's own grid, and ``surprise.png``; ``overwrite`` replaces
    maps an earlier command wrote there. ``max_error``: add the residual layer
    (:mod:`mrivq.compression.residual`), so that decode gives every stored value within it (0:
    exactly); the file still decodes to the codes' picture alone (``decode --codes-only``).
    ``keep_dicom_header``: carry each DICOM series' patient, study, frame-of-reference and
    acquisition attributes (:data:`mrivq.data.dicom.KEPT_ATTRIBUTES`) in the file, so that
    ``decode --format dicom`` writes the decoded series into the original study; without it the
    file holds no patient data.
    """
    out = Path(out).expanduser()
    if out.suffix != SUFFIX:
        raise UserError(f"--out {out}: the codes file must end in {SUFFIX}")
    if surprise is not None and prior is None:
        raise UserError("--surprise maps the bits the prior spends: give the prior with --prior")
    if max_error is not None and not (np.isfinite(max_error) and max_error >= 0):
        raise UserError(f"--max-error {max_error}: give the largest error allowed per voxel, in stored units, "
                        "0 or more (0: lossless)")
    _check_replaceable(out)
    device = resolve_device(device)
    codec = load_codec(checkpoint, prior=prior, device=device)
    files = scan_inputs(inputs)
    layered = max_error is not None
    slices = CodecInput.read(files, codec.prep, originals=layered, keep_dicom=keep_dicom_header)
    packed = codec.compress(slices, layers=("residual",) if layered else (),
                            layer_options={"residual": {"max_error": max_error}})
    write_maps = None
    if surprise is not None:
        write_maps = _claim_surprise_maps(Path(surprise).expanduser(), slices,
                                          inputs=[*(f.path for f in files), checkpoint, prior, out],
                                          overwrite=overwrite)
    atomic_write(out, lambda fh: fh.write(packed.blob))
    if write_maps is not None:
        write_maps(codec, packed.codes)
    report = packed.report(input_bytes=sum(f.nbytes for f in files))
    report.update(codes_file=str(out), verified=True, device=device.type)
    if layered:
        report["max_error"] = max_error
    return report


def _claim_surprise_maps(folder: Path, slices: CodecInput, *, inputs: list, overwrite: bool):
    """Claim ``folder``'s map files for this encode (refusing before anything is written), and
    return the function that writes them once the codes file is written."""
    targets = [folder / f"{entry['name'][:-len('.nii.gz')]}_bits.nii.gz" for entry in slices.sources]
    picture = folder / "surprise.png"
    claim_outputs(folder, "encode", [*targets, picture], overwrite=overwrite, inputs=inputs)

    def write(codec: Codec, codes: tuple[np.ndarray, np.ndarray]) -> None:
        maps = codec.surprise(codes, [source["name"] for source in slices.sources])
        for i, target in enumerate(targets):
            blob = slices.as_nifti(i, maps[i], codec.prep.fit)
            atomic_write(target, lambda fh, blob=blob: fh.write(blob), listed=False)
        shown = list(range(min(8, len(maps))))
        plot_surprise(unit_range_images(slices.images[shown], codec.prep.normalize), maps[shown], picture,
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="the VQ-VAE (e.g. runs/default/models/best.pt)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="NIfTI slices or 3-D volumes, DICOM series (folders, DICOMDIR, files), or folders of them")
    parser.add_argument("--out", required=True, metavar="CODES.mrvq")
    parser.add_argument("--prior", metavar="FILE", help="range-code the codes under this trained prior "
                        "(models/prior_best.pt of the same VQ-VAE); decode then needs it too")
    parser.add_argument("--surprise", metavar="DIR", help="with --prior: write each slice's bits-per-pixel map "
                        "under the prior (NIfTI on the slice's grid, <name>_bits.nii.gz) and surprise.png into DIR")
    parser.add_argument("--max-error", type=float, metavar="DELTA",
                        help="also store the residual, so that decode gives every voxel's stored value within "
                             "DELTA (stored units, before scl_slope); 0 is lossless (integer data only)")
    parser.add_argument("--keep-dicom-header", action="store_true",
                        help="carry each DICOM series' patient, study, frame-of-reference and acquisition attributes "
                             "in the file (never private tags), so decode --format dicom writes into the original "
                             "study; off by default: the file then holds no patient data")
    parser.add_argument("--json", action="store_true", help="print the bits report as JSON")
    flags.add_device(parser)
    flags.add_overwrite(parser, "maps an earlier mrivq command wrote in --surprise DIR (never other files)")


def main(args) -> int:
    """Encode, then print the bits report (``--json``: as JSON)."""
    report = encode(args.checkpoint, args.inputs, args.out, prior=args.prior, device=args.device,
                    surprise=args.surprise, overwrite=args.overwrite, max_error=args.max_error,
                    keep_dicom_header=args.keep_dicom_header)
    if args.json:
        print(strict_json.dumps(report, indent=2))
        return 0
    bpp = report["bits_per_pixel"]
    under = "the prior" if report["coder"] == "prior" else "code frequencies"
    speed = (f"range coding {report['n_slices'] / report['coding_s']:.1f} slices/s, decoding the stream "
             f"{report['n_slices'] / report['decoding_s']:.1f} slices/s, on {report['device']}")
    if "max_error" in report:  # per voxel of the slices' own grids: what a lossless codec is measured in
        voxel = report["bits_per_voxel"]
        bound = "exactly (lossless)" if report["max_error"] == 0 else f"within {report['max_error']:g} of the input"
        print(f"wrote {report['codes_file']} ({report['n_slices']} slices, {report['file_bytes']} bytes, checked to "
              f"decode): every voxel decodes {bound}; {voxel['file']:.3f} bits per voxel, the codes "
              f"{voxel['codes']:.3f} (under {under}) and the residual {voxel['residual']:.3f}; compression ratio vs "
              f"the input files {report['compression_ratio']:.1f}:1; {speed}; `mrivq decode --codes-only` gives "
              "the codes' picture alone")
    else:
        print(f"wrote {report['codes_file']} ({report['n_slices']} slices, {report['file_bytes']} bytes, range-coded "
              f"under {under}, checked to decode): {bpp['file']:.4f} bits per pixel (raw indices {bpp['raw']:.4f}); "
              f"compression ratio vs the input files {report['compression_ratio']:.1f}:1; {speed}")
    if "prior_file_bytes" in report:
        print(f"the prior's file would have been {report['prior_file_bytes']} bytes, larger than the frequency-coded "
              f"one: wrote that instead (decode needs no --prior for it); train the prior longer, or on scans like these")
    if args.surprise:
        print(f"wrote the bits-per-pixel maps under the prior to {args.surprise} (<name>_bits.nii.gz, surprise.png)")
    return 0
