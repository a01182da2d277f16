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
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mrivq.apps import flags
from mrivq.compression.container import read_codes_file
from mrivq.compression.layers import Stored
from mrivq.data.io import as_stored, nifti_bytes, nifti_image
from mrivq.engine.checkpoint import load_codec
from mrivq.errors import UserError
from mrivq.run_dir import atomic_write, claim_outputs
from mrivq.runtime import resolve_device


def decode(checkpoint: str | Path, codes_path: str | Path, out_dir: str | Path, *, prior: str | Path | None = None,
           device: str = "auto", overwrite: bool = False, slices: list[str] | None = None,
           codes_only: bool = False) -> list[Path]:
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
    (float32), as a file without the layer gives. Returns the written paths.
    """
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
    outputs = _outputs(sources, range(len(names)) if only is None else only)
    targets = list(dict.fromkeys(out_dir / name for name in outputs.values()))
    decoded = codec.decompress_codes(codes, codes_path, only=only)
    claim_outputs(out_dir, "decode", targets, overwrite=overwrite, inputs=[codes_path, checkpoint, prior])
    stream = tqdm(codec.decompress(codes, codes_path, codes=decoded, only=only, codes_only=codes_only),
                  total=len(outputs), desc="decode",
                  unit="slice", disable=None, leave=False)
    # Each file is compressed and written on a second thread while the next batch is decoded
    # (zlib and the file system release the GIL); at most a batch waits, so memory stays bounded
    # (and a volume's slices, until its last is decoded).
    writer, pending, volumes = ThreadPoolExecutor(1), deque(), {}
    try:
        for i, scanner in stream:
            if outputs[i] == names[i]:
                pending.append(writer.submit(_write_nifti, out_dir / names[i], scanner, codes.affines[i]))
            else:  # a slice of a volume written whole
                volume = sources[i]["volume"]
                parts = volumes.setdefault(volume["name"], {})
                parts[volume["index"]] = (scanner, codes.affines[i])
                if len(parts) == volume["shape"][2]:
                    pending.append(writer.submit(_write_nifti, out_dir / volume["name"],
                                                 _stacked([parts[k][0] for k in range(len(parts))], volume["shape"]),
                                                 parts[0][1]))
                    del volumes[volume["name"]]
            while len(pending) > codec.batch_size or (pending and pending[0].done()):
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:  # on an error or Ctrl-C, the files not yet started are dropped; none is left half-written
        writer.shutdown(wait=True, cancel_futures=True)
    return targets


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
    """A volume's decoded slices as the array (or :class:`Stored` values) of its on-disk ``shape``."""
    if isinstance(slices[0], Stored):
        first = slices[0]
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
    flags.add_device(parser)
    flags.add_overwrite(parser)


def main(args) -> int:
    written = decode(args.checkpoint, args.codes, args.out, prior=args.prior, device=args.device,
                     overwrite=args.overwrite, slices=args.slices, codes_only=args.codes_only)
    print(f"wrote {len(written)} NIfTI file{'' if len(written) == 1 else 's'} to {args.out}")
    return 0
