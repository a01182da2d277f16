"""The codes file (``mrivq encode`` writes it, ``mrivq decode`` reads it): a real bitstream.

Layout (little-endian)::

    b"MRVQ", version (u8)
    sections, each: name length (u8), name (ASCII), payload length (u32), payload
      header   zlib(JSON): coder ("frequencies" or "prior"), slice count, codebook size, grids,
               image size, fit and normalisation, the VQ-VAE's fingerprint (and the prior's),
               a CRC-32 of the codes, and each slice's file name, on-disk shape and data type
      side     zlib: per slice (offset, scale) float32, the affine's top 3x4 rows float32
               (NIfTI stores them as float32), the original (h, w) uint16
      tables   zlib: the per-level code counts, uint32 (2, n_embed) (frequencies coder only)
      stream   the range-coded codes, uint32 words (:mod:`mrivq.compression.entropy`)

Everything decode needs is in the file, and the bits per pixel a report gives are the file's
own size x 8 over the pixels coded.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrivq.compression.entropy import (
    PRIOR_BATCH,
    code_counts,
    decode_with_frequencies,
    decode_with_prior,
    encode_with_frequencies,
    encode_with_prior,
    ideal_bits,
    raw_bits_per_pixel,
)
from mrivq.errors import UserError

MAGIC = b"MRVQ"
VERSION = 2
CODERS = ("frequencies", "prior")
_SECTIONS = ("header", "side", "tables", "stream")


@dataclass
class CodesFile:
    """A codes file in memory. ``norm`` ``(N, 2)`` float32; ``affines`` ``(N, 4, 4)``; ``shapes``
    ``(N, 2)`` each slice's ``(h, w)``; ``counts`` ``(2, n_embed)`` or None; ``stream`` uint32."""

    header: dict
    norm: np.ndarray
    affines: np.ndarray
    shapes: np.ndarray
    stream: np.ndarray
    counts: np.ndarray | None = None
    section_bytes: dict = field(default_factory=dict)  # filled by to_bytes / from_bytes

    @property
    def n(self) -> int:
        return int(self.header["n"])

    def to_bytes(self) -> bytes:
        n = len(self.norm)
        side = (np.asarray(self.norm, dtype="<f4").tobytes()
                + np.asarray(self.affines, dtype=np.float64)[:, :3, :].astype("<f4").tobytes()
                + np.asarray(self.shapes, dtype="<u2").reshape(n, 2).tobytes())
        payloads = {"header": zlib.compress(json.dumps(self.header, separators=(",", ":")).encode(), 9),
                    "side": zlib.compress(side, 9),
                    "stream": np.asarray(self.stream, dtype="<u4").tobytes()}
        if self.counts is not None:
            payloads["tables"] = zlib.compress(np.asarray(self.counts, dtype="<u4").tobytes(), 9)
        out = io.BytesIO()
        out.write(MAGIC + struct.pack("<B", VERSION))
        for name in _SECTIONS:
            if name in payloads:
                out.write(struct.pack("<B", len(name)) + name.encode() + struct.pack("<I", len(payloads[name])))
                out.write(payloads[name])
        self.section_bytes = {name: len(payload) for name, payload in payloads.items()}
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, path: Path | str = "codes file") -> CodesFile:
        def bad(what: str) -> UserError:
            return UserError(f"{path}: {what}; encode the slices again")

        if data[:2] == b"PK":  # a zip: the .npz codes files of mrivq before version 2
            raise UserError(f"{path}: a codes file of an older mrivq (version 1, .npz); encode the slices again")
        if data[:4] != MAGIC:
            raise UserError(f"{path}: not an mrivq codes file (write one with `mrivq encode`)")
        if len(data) < 5 or data[4] != VERSION:
            raise UserError(f"{path}: codes file version {data[4] if len(data) > 4 else '?'} is not supported "
                            f"(this mrivq reads version {VERSION}); encode the slices again")
        payloads, at = {}, 5
        while at < len(data):
            if at + 1 > len(data) or at + 1 + data[at] + 4 > len(data):
                raise bad("truncated codes file")
            name = data[at + 1:at + 1 + data[at]].decode("ascii", "replace")
            (length,) = struct.unpack("<I", data[at + 1 + data[at]:at + 5 + data[at]])
            start = at + 5 + data[at]
            if start + length > len(data):
                raise bad("truncated codes file")
            payloads[name] = data[start:start + length]
            at = start + length
        missing = [name for name in ("header", "side", "stream") if name not in payloads]
        if missing:
            raise bad(f"codes file lacks its {', '.join(missing)}")
        try:
            header = json.loads(zlib.decompress(payloads["header"]))
            side = zlib.decompress(payloads["side"])
            counts = (np.frombuffer(zlib.decompress(payloads["tables"]), dtype="<u4").astype(np.uint32)
                      if "tables" in payloads else None)
        except (zlib.error, json.JSONDecodeError, UnicodeDecodeError):
            raise bad("corrupt codes file") from None
        try:
            n, n_embed = int(header["n"]), int(header["n_embed"])
            coder = header["coder"]
            sources = header["sources"]
        except (KeyError, TypeError, ValueError):
            raise bad("codes file header is incomplete") from None
        if n < 1 or len(side) != n * (8 + 48 + 4) or len(sources) != n or coder not in CODERS:
            raise bad("codes file is inconsistent (slice counts and metadata do not agree)")
        if coder == "frequencies" and (counts is None or counts.size != 2 * n_embed):
            raise bad("codes file lacks its frequency tables")
        norm = np.frombuffer(side[:8 * n], dtype="<f4").reshape(n, 2).astype(np.float32)
        rows = np.frombuffer(side[8 * n:56 * n], dtype="<f4").reshape(n, 3, 4).astype(np.float64)
        affines = np.concatenate([rows, np.tile([[[0.0, 0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
        shapes = np.frombuffer(side[56 * n:], dtype="<u2").reshape(n, 2).astype(np.int64)
        stream = np.frombuffer(payloads["stream"], dtype="<u4").astype(np.uint32)
        return cls(header, norm, affines, shapes, stream, None if counts is None else counts.reshape(2, n_embed),
                   {name: len(payload) for name, payload in payloads.items()})


def codes_crc(codes_top: np.ndarray, codes_bottom: np.ndarray) -> int:
    """CRC-32 of the codes (as uint16): decode checks what it rebuilt against the encoder's."""
    return zlib.crc32(np.asarray(codes_bottom, dtype="<u2").tobytes(),
                      zlib.crc32(np.asarray(codes_top, dtype="<u2").tobytes()))


def read_codes_file(path: str | Path) -> CodesFile:
    """Load and check a codes file written by ``mrivq encode``; one clear :class:`UserError` otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"codes file not found: {path} (write one with `mrivq encode`)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    return CodesFile.from_bytes(data, path)


def pack_codes(codes_top: np.ndarray, codes_bottom: np.ndarray, *, n_embed: int, preprocessing: dict,
               model_fingerprint: str, sources: list[dict], norm: np.ndarray, affines: np.ndarray,
               shapes: np.ndarray, prior=None, prior_fingerprint: str | None = None,
               prior_batch: int = PRIOR_BATCH) -> CodesFile:
    """A codes file for ``codes_top`` ``(N, h, w)`` and ``codes_bottom`` ``(N, 2h, 2w)``: range-coded
    under their frequencies, or under ``prior`` (a :class:`mrivq.nn.CodePrior`) when given.

    ``preprocessing``: ``image_size``, ``fit``, ``normalize``, ``percentiles`` of the model;
    ``sources``: per slice, the output ``name``, the on-disk ``shape`` and ``dtype``; ``norm``,
    ``affines``, ``shapes``: per slice, as :class:`CodesFile` holds them.
    """
    n = len(codes_top)
    header = {"format": "mrivq-codes", "version": VERSION, "n": n, "n_embed": int(n_embed),
              "top_grid": list(codes_top.shape[1:]), **{k: _plain(v) for k, v in preprocessing.items()},
              "model_fingerprint": model_fingerprint, "codes_crc32": codes_crc(codes_top, codes_bottom),
              "sources": sources}
    counts = None
    if prior is None:
        header["coder"] = "frequencies"
        counts = code_counts(codes_top, codes_bottom, n_embed)
        stream = encode_with_frequencies(codes_top, codes_bottom, counts)
    else:
        device = next(prior.parameters()).device
        header.update(coder="prior", prior_fingerprint=prior_fingerprint, prior_batch=prior_batch,
                      prior_device=device.type)
        stream = encode_with_prior(prior, codes_top, codes_bottom, batch_size=prior_batch)
    return CodesFile(header, np.asarray(norm), np.asarray(affines), np.asarray(shapes), stream, counts)


def unpack_codes(codes: CodesFile, prior=None, path: Path | str = "codes file") -> tuple[np.ndarray, np.ndarray]:
    """Decode the stream of ``codes`` (with its prior for a prior-coded file) and check the result
    against the encoder's CRC: ``(codes_top (N, h, w), codes_bottom (N, 2h, 2w))`` int64."""
    header = codes.header
    top_grid = tuple(int(v) for v in header["top_grid"])
    if header["coder"] == "prior":
        if prior is None:
            raise UserError(f"{path} was coded under a prior: give it with --prior (the models/prior_best.pt "
                            "that encoded it)")
        top, bottom = decode_with_prior(prior, codes.stream, codes.n, batch_size=int(header["prior_batch"]))
    else:
        top, bottom = decode_with_frequencies(codes.stream, codes.counts, codes.n, top_grid)
    if codes_crc(top, bottom) != int(header["codes_crc32"]):
        where = (f" (it was prior-coded on {header.get('prior_device')}: decode on the same kind of machine and "
                 "device)" if header["coder"] == "prior" else "")
        raise UserError(f"{path}: the decoded codes do not match the encoder's checksum{where}; "
                        "the file is damaged, or encode the slices again")
    return top, bottom


def pack_checked(codes_top: np.ndarray, codes_bottom: np.ndarray, *, prior=None,
                 **side) -> tuple[CodesFile, bytes, dict]:
    """:func:`pack_codes`, serialised, then decoded again from those bytes through the decoder's own
    path (:func:`unpack_codes`) and compared: ``(the file, its bytes, {"coding_s", "decoding_s"})``.
    A file that would not decode back is a bug here, never a file written."""
    start = time.perf_counter()
    codes = pack_codes(codes_top, codes_bottom, prior=prior, **side)
    blob = codes.to_bytes()
    coded = time.perf_counter()
    top, bottom = unpack_codes(CodesFile.from_bytes(blob), prior)
    if not (np.array_equal(top, codes_top) and np.array_equal(bottom, codes_bottom)):
        raise RuntimeError(f"the {codes.header['coder']} codes stream did not decode back to the codes")
    return codes, blob, {"coding_s": coded - start, "decoding_s": time.perf_counter() - coded}


def bits_report(codes: CodesFile, file_bytes: int, *, input_bytes: int | None = None) -> dict:
    """What a codes file costs: bits per pixel of the whole file, of its stream alone, of
    fixed-width indices (raw) and (frequency coder) the ideal length under the code frequencies; the bytes of each
    section; with ``input_bytes`` (the input files' size) the compression ratio."""
    header, n = codes.header, codes.n
    height, width = header["image_size"]
    pixels = n * height * width
    top_grid = tuple(header["top_grid"])
    bottom_grid = (2 * top_grid[0], 2 * top_grid[1])
    report = {
        "n_slices": n,
        "coder": header["coder"],
        "n_codes": {"top": math.prod(top_grid), "bottom": math.prod(bottom_grid)},
        "bits_per_pixel": {
            "file": file_bytes * 8 / pixels,
            "stream": codes.stream.size * 32 / pixels,
            "raw": raw_bits_per_pixel((height, width), top_grid, bottom_grid, header["n_embed"], header["n_embed"]),
        },
        "file_bytes": int(file_bytes),
        **({"ideal_bits_per_pixel": ideal_bits(codes.counts) / pixels} if codes.counts is not None else {}),
        "section_bytes": dict(codes.section_bytes),
        "pixels": pixels,
    }
    if input_bytes:
        report["input_bytes"] = int(input_bytes)
        report["compression_ratio"] = input_bytes / file_bytes
    return report


def source_entry(path: Path, meta) -> dict:
    """What decode needs to write a slice back like its input: the name, the on-disk shape and type."""
    name = Path(path).name
    return {"name": name if name.lower().endswith(".gz") else name + ".gz", "shape": list(meta.shape),
            "dtype": meta.dtype}


def preprocessing_entry(prep) -> dict:
    """The header's record of a :class:`mrivq.data.preprocess.Preprocessing`."""
    return {"image_size": list(prep.image_size), "fit": prep.fit, "normalize": prep.normalize,
            "percentiles": list(prep.percentiles)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
