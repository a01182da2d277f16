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

import argparse
import fnmatch
import math
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mrivq import __version__
from mrivq.apps import flags
from mrivq.compression.container import read_codes_file
from mrivq.compression.layers import Stored
from mrivq.data.io import as_stored, nifti_bytes, nifti_image
from mrivq.data.volumes import volume_place
from mrivq.engine.checkpoint import load_codec
from mrivq.errors import UserError
from mrivq.run_dir import atomic_write, claim_outputs
from mrivq.runtime import resolve_device


def decode(checkpoint: str | Path, codes_path: str | Path, out_dir: str | Path, *, prior: str | Path | None = None,
           device: str = "auto", overwrite: bool = False, slices: list[str] | None = None,
           codes_only: bool = False, format: str = "nifti", dicom_syntax: str = "explicit") -> list[Path]:
    """Write every slice of a codes file as NIfTI in ``out_dir``, named after its input.

    The stream is decoded (under ``prior`` for a prior-coded file: the ``models/prior_best.pt``
    that encoded it) and checked against the encoder's checksum; intensities are scanner units
    (the stored normalisation undone), the array has the input file's shape and the image its
    affine. Slices encoded from a 3-D file are written back as that volume, one file, when all of
    them are decoded. ``overwrite``: replace files an earlier decode wrote there. ``slices``: only
    the slices whose names match one of these shell patterns (``case_004_week_0_slice_1*``; a
    volume's slices are ``<stem>_slice_<index>``), each written on its own unless they are a whole
    volume; a volume-coded file then decodes just those and the slices they are coded after.
    A file with the residual layer (``encode --max-error``) gives the stored values within its
    bound, written in the input's own type and scaling; ``codes_only``: the codes' picture alone
    (float32), as a file without the layer gives. ``format``: ``"nifti"``, or ``"dicom"``: each
    slice an MR image of a derived DICOM series (:class:`DicomOutputs`), in ``dicom_syntax``
    (``explicit``: Explicit VR Little Endian; ``jpeg-ls``: JPEG-LS lossless). Returns the written paths.
    """
    if format not in ("nifti", "dicom"):
        raise UserError(f"--format {format}: give nifti or dicom")
    codes_path = Path(codes_path).expanduser()
    codes = read_codes_file(codes_path)
    codec = load_codec(checkpoint, prior=prior, device=resolve_device(device), codes_file=codes, codes_path=codes_path)
    out_dir = Path(out_dir).expanduser()
    sources = codes.header["sources"]
    names = [source["name"] for source in sources]
    only = None
    if slices:
        only = [i for i, name in enumerate(names) if any(fnmatch.fnmatchcase(name, pattern) for pattern in slices)]
        if not only:
            raise UserError(f"--slices {' '.join(slices)}: no slice of {codes_path} has a matching name (its first: "
                            f"{names[0]}); give a pattern like 'case_004_week_0_slice_1*'")
    chosen = range(len(names)) if only is None else only
    dicom = DicomOutputs(codes, codec.fingerprint, codes_path.stat().st_size, chosen, codes_only=codes_only,
                          syntax=dicom_syntax) if format == "dicom" else None
    outputs = _outputs(sources, chosen) if dicom is None else dicom.names
    targets = list(dict.fromkeys(out_dir / name for name in outputs.values()))
    decoded = codec.decompress_codes(codes, codes_path, only=only)
    claim_outputs(out_dir, "decode", targets, overwrite=overwrite, inputs=[codes_path, checkpoint, prior])
    stream = tqdm(codec.decompress(codes, codes_path, codes=decoded, only=only, codes_only=codes_only),
                  total=len(outputs), desc="decode",
                  unit="slice", disable=None, leave=False)
    earlier = {target for target in targets if target.exists() or target.is_symlink()}
    try:
        _write_all(stream, codes, out_dir, outputs, dicom, codec.batch_size)
    except BaseException:  # a slice's coding layer found damaged midway: no partial set of slices is left
        for target in targets:
            if target not in earlier and target.exists():
                target.unlink()
        raise
    return targets


def _write_all(stream, codes, out_dir: Path, outputs: dict[int, str], dicom, batch_size: int) -> None:
    """Write each ``(i, slice)`` of ``stream`` into ``outputs[i]``: a DICOM instance (``dicom``), a
    NIfTI slice, or, once its last slice is decoded, a NIfTI volume."""
    sources = codes.header["sources"]
    # Each file is compressed and written on a second thread while the next batch is decoded
    # (zlib and the file system release the GIL); at most a batch waits, so memory stays bounded
    # (and a volume's slices, until its last is decoded).
    writer, pending, volumes = ThreadPoolExecutor(1), deque(), {}
    try:
        for i, scanner in stream:
            if dicom is not None:
                pending.append(writer.submit(dicom.write, out_dir / outputs[i], i, scanner, codes.affines[i]))
            elif outputs[i] == sources[i]["name"]:
                pending.append(writer.submit(_write_nifti, out_dir / outputs[i], scanner, codes.affines[i]))
            else:  # a slice of a volume written whole
                volume = sources[i]["volume"]
                parts = volumes.setdefault(volume["name"], {})
                parts[volume["index"]] = (scanner, codes.affines[i])
                if len(parts) == volume["shape"][2]:
                    pending.append(writer.submit(_write_nifti, out_dir / volume["name"],
                                                 _stacked([parts[k][0] for k in range(len(parts))], volume["shape"]),
                                                 parts[0][1]))
                    del volumes[volume["name"]]
            while len(pending) > batch_size or (pending and pending[0].done()):
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:  # on an error or Ctrl-C, the files not yet started are dropped; none is left half-written
        writer.shutdown(wait=True, cancel_futures=True)


class DicomOutputs:
    """How a codes file's slices are written as DICOM: each slice ``<name>.dcm`` (its name without
    ``.nii.gz``), the slices of one volume (a 3-D input, a DICOM series, or HipMRI-named slices of
    one case-week) one derived series, all of them in one study: the original's where the file
    kept its DICOM header (``encode --keep-dicom-header``), else a new one for an anonymous patient."""

    def __init__(self, codes, fingerprint: str, file_bytes: int, chosen, *, codes_only: bool, syntax: str):
        from mrivq.compression.residual import max_error_of
        from mrivq.data.dicom import SYNTAXES, DerivedSeries

        if syntax not in SYNTAXES:
            raise UserError(f"--dicom-syntax {syntax}: give one of {', '.join(SYNTAXES)}")
        sources, kept = codes.header["sources"], codes.header.get("dicom", {})
        self.syntax, self.sources = syntax, sources
        bounds = [max_error_of(p) for p in codes.layers.get("residual", [])] if not codes_only else []
        bound = max(bounds) if bounds else None
        raw = sum(math.prod(s["shape"]) * np.dtype(s["dtype"]).itemsize for s in sources)
        derivation = f"mrivq {__version__}: decoded from VQ-VAE-2 codes (model {fingerprint})"
        if bound is not None:
            derivation += " and a residual " + ("coded losslessly" if bound == 0 else
                                                f"within {bound:g} of every stored value")
        study = None
        self.names, self.series, self.place = {}, {}, {}
        for i in chosen:
            self.place[i] = _volume_of(sources[i])
            volume = self.place[i][0]
            self.names[i] = f"{sources[i]['name'].removesuffix('.gz').removesuffix('.nii')}.dcm"
            if volume not in self.series:
                original = kept.get(f"{volume}.nii.gz", {})
                number = original.get("SeriesNumber", len(self.series) + 1)
                self.series[volume] = DerivedSeries.new(
                    kept=original, description=f"mrivq {volume}"[:64], derivation=derivation,
                    lossy=bound != 0, ratio=raw / max(file_bytes, 1), number=1000 + int(number), study_uid=study)
                study = self.series[volume].study_uid

    def write(self, path: Path, i: int, scanner, affine) -> None:
        """Slice ``i`` (the :class:`Stored` values a coding layer rebuilt, or scanner values) as ``path``."""
        from mrivq.data.dicom import instance_bytes

        if isinstance(scanner, Stored):  # the stored values, exactly where they fit 16 bits
            values, dtype, slope, inter = scanner.values, np.dtype(scanner.dtype), scanner.slope, scanner.inter
            integer = dtype.kind in "ui" or bool(np.array_equal(np.rint(values), values))
        else:
            values, dtype, slope, inter = scanner, np.dtype(self.sources[i]["dtype"]), 1.0, 0.0
            integer = dtype.kind in "ui"
        volume, index = self.place[i]
        blob = instance_bytes(_plane(values), affine, self.series[volume], index, integer=integer, slope=slope,
                              inter=inter, signed=dtype.kind == "i", syntax=self.syntax)
        atomic_write(path, lambda fh: fh.write(blob), listed=False)


def _volume_of(source: dict) -> tuple[str, int]:
    """The volume a slice belongs to and its index there: its 3-D file's, its HipMRI name's, or its own."""
    if "volume" in source:
        return source["volume"]["name"].removesuffix(".gz").removesuffix(".nii"), source["volume"]["index"]
    place = volume_place(source["name"])
    if place is not None:
        return place
    return source["name"].removesuffix(".gz").removesuffix(".nii"), 0


def _plane(values: np.ndarray) -> np.ndarray:
    """A slice in its on-disk shape (singleton axes included) as a 2-D image."""
    kept = [n for n in values.shape if n != 1]
    return values.reshape(kept if len(kept) == 2 else (values.shape[0], -1))


def _outputs(sources: list[dict], chosen) -> dict[int, str]:
    """``{slice index: the file it is written into}`` for the ``chosen`` slices: a slice of a
    volume whose slices are all chosen goes into the volume's file, every other into its own."""
    chosen = list(chosen)
    counts = Counter(sources[i]["volume"]["name"] for i in chosen if "volume" in sources[i])

    def target(source: dict) -> str:
        volume = source.get("volume")
        whole = volume is not None and counts[volume["name"]] == volume["shape"][2]
        return volume["name"] if whole else source["name"]
    return {i: target(sources[i]) for i in chosen}


def _stacked(slices: list, shape) -> np.ndarray | Stored:
    """A volume's decoded slices as the array (or :class:`Stored` values) of its on-disk ``shape``.
    Slices stored under different scalings (a DICOM series may rescale each image) become one
    float64 volume of their scanner values, which NIfTI's one slope per file can hold."""
    if isinstance(slices[0], Stored):
        first = slices[0]
        if any((s.slope, s.inter) != (first.slope, first.inter) for s in slices):
            return Stored(as_stored(np.stack([s.scanner() for s in slices]), shape, True), "float64", 1.0, 0.0)
        return Stored(as_stored(np.stack([s.values for s in slices]), shape, True), first.dtype, first.slope,
                      first.inter)
    return as_stored(np.stack(slices), shape, True)


def _write_nifti(path: Path, scanner: np.ndarray | Stored, affine) -> None:
    if isinstance(scanner, Stored):  # the stored values in the input's type, under its scaling
        image = nifti_image(scanner.values.astype(scanner.dtype), affine)
        if (scanner.slope, scanner.inter) != (1.0, 0.0):
            image.header.set_slope_inter(scanner.slope, scanner.inter)
    else:
        image = nifti_image(scanner, affine)
    blob = nifti_bytes(image)
    atomic_write(path, lambda fh: fh.write(blob), listed=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE", help="the VQ-VAE that encoded the codes")
    parser.add_argument("codes", metavar="CODES.mrvq")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--prior", metavar="FILE", help="the prior a prior-coded file was encoded with")
    parser.add_argument("--slices", nargs="+", metavar="PATTERN",
                        help="only the slices whose names match these shell patterns (quote them), e.g. "
                             "'case_004_week_0_slice_1*'; a volume-coded file decodes just what they need")
    parser.add_argument("--codes-only", action="store_true",
                        help="for a file with the residual layer (encode --max-error): write the codes' picture "
                             "alone, as float32 (faster), not the stored values within the bound")
    parser.add_argument("--format", choices=("nifti", "dicom"), default="nifti",
                        help="nifti (default): files like the inputs; dicom: each slice an MR image of a derived "
                             "series (<name>.dcm), in the original study when encode kept the DICOM header")
    parser.add_argument("--dicom-syntax", choices=("explicit", "jpeg-ls"), default="explicit",
                        help="with --format dicom: explicit (Explicit VR Little Endian, default) or jpeg-ls "
                             "(JPEG-LS lossless)")
    flags.add_device(parser)
    flags.add_overwrite(parser)


def main(args) -> int:
    written = decode(args.checkpoint, args.codes, args.out, prior=args.prior, device=args.device,
                     overwrite=args.overwrite, slices=args.slices, codes_only=args.codes_only, format=args.format,
                     dicom_syntax=args.dicom_syntax)
    kind = "DICOM" if args.format == "dicom" else "NIfTI"
    print(f"wrote {len(written)} {kind} file{'' if len(written) == 1 else 's'} to {args.out}")
    return 0
