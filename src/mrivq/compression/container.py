"""The codes file (``mrivq encode`` writes it, ``mrivq decode`` reads it): a real bitstream.

Layout (little-endian)::

    b"MRVQ", version (u8)
    sections, each: name length (u8), name (ASCII), payload length (u32), payload
      header   zlib(JSON): coder ("frequencies" or "prior"; for a prior, the order its integer
               copy codes in: prior_coding), slice count, codebook size, grids, image size, fit
               and normalisation, the VQ-VAE's fingerprint (and the prior's), a CRC-32 of the
               codes, and each slice's file name, on-disk shape and data type (and, for a
               slice read from a 3-D file, that file's name and shape and the slice's index)
      side     zlib: per slice (offset, scale) float32, the affine's top 3x4 rows float32
               (NIfTI stores them as float32), the original (h, w) uint16
      tables   zlib: the per-level code counts, uint32 (2, n_embed) (frequencies coder only)
      stream   the range-coded codes, uint32 words (:mod:`mrivq.compression.entropy` under
               frequencies, :mod:`mrivq.compression.driver` under a prior)
      layer-NAME  per coding layer the header lists (:mod:`mrivq.compression.layers`): the N
               slices' payload lengths (u32), then the payloads

This module is the format only: it reads and writes sections and the header, and checks them
against each other and the limits; which coder runs is :mod:`mrivq.compression.codec`'s. The
bits per pixel a report gives are the file's own size x 8 over the pixels coded.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from mrivq.compression.entropy import ideal_bits, raw_bits_per_pixel
from mrivq.data.dicom import kept_value
from mrivq.data.io import MAX_NIFTI_BYTES
from mrivq.data.preprocess import FIT_POLICIES, NORMALIZE_POLICIES
from mrivq.data.volumes import coding_depths
from mrivq.errors import BadFileError, UserError

MAGIC = b"MRVQ"
VERSION = 2
_SECTIONS = ("header", "side", "tables", "stream")
_LAYER = "layer-"  # a coding layer's section: layer-NAME

#: Limits on what a codes file may ask for, whatever it says: the file is read whole, each
#: compressed section is inflated to at most its allowance, and decoding is bounded by them.
MAX_FILE_BYTES = 1 << 30
MAX_HEADER_BYTES = 64 << 20
MAX_SLICES = 100_000
MAX_CODES = 1 << 25  # codes in one file, both levels (HipMRI's 11,460 training slices: 29 million)
MAX_SLICE_PIXELS = 1 << 24  # a decoded slice's on-disk pixels (4096 x 4096)
MAX_OUTPUT_PIXELS = 1 << 30  # all decoded slices' pixels (4 GiB of float32; HipMRI's 12,660: 0.47 G)
MAX_SCALE = 1e30  # an intensity offset or scale: beyond it, scanner units overflow float32
MAX_SIDE = 32767  # NIfTI-1 stores each dimension as a 16-bit signed integer
MAX_VOLUME_PIXELS = MAX_NIFTI_BYTES // 4  # a volume decode writes whole: what mrivq reads from one file
_SIDE_BYTES = 8 + 48 + 4  # per slice: (offset, scale) f4, affine rows 3x4 f4, (h, w) u2


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
    layers: dict[str, list[bytes]] = field(default_factory=dict)  # per layer the header lists, per slice
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
        for name, parts in self.layers.items():
            payloads[_LAYER + name] = np.array([len(p) for p in parts], dtype="<u4").tobytes() + b"".join(parts)
        out = io.BytesIO()
        out.write(MAGIC + struct.pack("<B", VERSION))
        for name in (*_SECTIONS, *(_LAYER + name for name in self.layers)):
            if name in payloads:
                out.write(struct.pack("<B", len(name)) + name.encode() + struct.pack("<I", len(payloads[name])))
                out.write(payloads[name])
        self.section_bytes = {name: len(payload) for name, payload in payloads.items()}
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, path: Path | str = "codes file") -> CodesFile:
        """Parse and validate a codes file; anything wrong is one :class:`UserError` naming ``path``.

        Every size is checked before it is used: sections must add up to the file, compressed
        sections inflate to at most what the header allows, and the header (a strict schema)
        must agree with the side data, the tables and the stream.
        """
        if data[:2] == b"PK":  # a zip: the .npz codes files of mrivq before version 2
            raise UserError(f"{path}: a codes file of an older mrivq (version 1, .npz); encode the slices again")
        if data[:4] != MAGIC:
            raise UserError(f"{path}: not an mrivq codes file (write one with `mrivq encode`)")
        if len(data) < 5 or data[4] != VERSION:
            raise UserError(f"{path}: codes file version {data[4] if len(data) > 4 else '?'} is not supported "
                            f"(this mrivq reads version {VERSION}); encode the slices again")
        try:
            payloads = _sections(data)
            header = _parse_header(_inflate(payloads["header"], MAX_HEADER_BYTES, "header"))
            n, cells = header.n, math.prod(header.top_grid) * 5  # a top grid and a bottom grid 4x as large
            side = _inflate(payloads["side"], n * _SIDE_BYTES, "side data", exact=True)
            counts = None
            if header.coder == "frequencies":
                if "tables" not in payloads:
                    raise _Invalid("it lacks its frequency tables")
                counts = np.frombuffer(_inflate(payloads["tables"], 2 * 4 * header.n_embed, "frequency tables",
                                                exact=True), dtype="<u4").astype(np.uint32).reshape(2, -1)
            stream = payloads["stream"]
            if len(stream) % 4 or len(stream) > 4 * (n * cells + 64):
                raise _Invalid(f"its stream is {len(stream)} bytes, not whole 32-bit words within the "
                               "codes' size")
            if header.coder == "prior" and header.prior_coding in (None, "sequential"):  # the retired coder's
                raise UserError(f"{path}: coded under a transformer prior in floating point by an mrivq 0.1.0 "
                                "from before 2026-12-04, a coding this version no longer decodes; "
                                "decode it with that version, or encode the slices again")
            if {_LAYER + name for name in header.layers or []} != {name for name in payloads if name.startswith(_LAYER)}:
                raise _Invalid("its coding layers are not the ones its header lists")
            layers = {name: _split_payloads(payloads[_LAYER + name], n, name) for name in header.layers or []}
            codes = cls(header.model_dump(exclude_none=True), *_side_arrays(side, n),
                        np.frombuffer(stream, dtype="<u4").astype(np.uint32), counts, layers,
                        {name: len(payload) for name, payload in payloads.items()})
            _check_consistency(codes)
        except _Invalid as exc:
            raise UserError(f"{path}: damaged or altered codes file: {exc}; encode the slices again") from None
        return codes


class _Invalid(Exception):
    """One thing wrong with a codes file (the caller names the file)."""


def _sections(data: bytes) -> dict[str, bytes]:
    payloads, at = {}, 5
    while at < len(data):
        size = data[at]
        if at + 1 + size + 4 > len(data):
            raise _Invalid("truncated (a section header runs past the end)")
        name = data[at + 1:at + 1 + size].decode("ascii", "replace")
        (length,) = struct.unpack("<I", data[at + 1 + size:at + 5 + size])
        start = at + 5 + size
        if start + length > len(data):
            raise _Invalid(f"truncated (section {name!r} runs past the end)")
        if (name not in _SECTIONS and not name.startswith(_LAYER)) or name in payloads:
            raise _Invalid(f"unknown or repeated section {name!r}")
        payloads[name] = data[start:start + length]
        at = start + length
    missing = [name for name in ("header", "side", "stream") if name not in payloads]
    if missing:
        raise _Invalid(f"it lacks its {', '.join(missing)}")
    return payloads


def _split_payloads(payload: bytes, n: int, layer: str) -> list[bytes]:
    """A layer section's ``n`` per-slice payloads (lengths, then the payloads)."""
    lengths = np.frombuffer(payload[:4 * n], dtype="<u4").astype(np.int64) if len(payload) >= 4 * n else None
    if lengths is None or int(lengths.sum()) != len(payload) - 4 * n:
        raise _Invalid(f"its {layer} layer's slice lengths do not add up to the section")
    ends = 4 * n + np.cumsum(lengths)
    return [payload[end - length:end] for end, length in zip(ends, lengths)]


def _inflate(payload: bytes, limit: int, what: str, *, exact: bool = False) -> bytes:
    """zlib-decompress ``payload`` to at most ``limit`` bytes (``exact``: to exactly ``limit``)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, limit + 1)
    except zlib.error:
        raise _Invalid(f"its {what} is not valid zlib data") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise _Invalid(f"its {what} inflates to more than the {limit} bytes it may hold")
    if not inflater.eof or inflater.unused_data:
        raise _Invalid(f"its {what} is truncated or has trailing bytes")
    if exact and len(out) != limit:
        raise _Invalid(f"its {what} holds {len(out)} bytes, the header's slices need {limit}")
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def _plain_name(name: str) -> str:
    problem = output_name_problem(name)
    if problem:
        raise ValueError(problem)
    return name


class VolumeEntry(_Strict):
    """The 3-D file a slice was taken from (along its third axis): its file name and on-disk
    shape, and the slice's index in it. Decode writes the volume back whole when it decodes every
    slice of it."""

    name: Annotated[str, AfterValidator(_plain_name)]
    shape: list[Annotated[int, Field(ge=1, le=MAX_SIDE)]] = Field(min_length=3, max_length=7)
    index: int = Field(ge=0, lt=MAX_SIDE)


class SourceEntry(_Strict):
    """How one decoded slice is written back: its file name, on-disk shape and data type, and the
    volume it belongs to, if it was read from one."""

    name: Annotated[str, AfterValidator(_plain_name)]
    shape: list[Annotated[int, Field(ge=1, le=MAX_SIDE)]] = Field(min_length=1, max_length=7)
    dtype: str = Field(max_length=32, pattern=r"^[!-~]+$")  # informational: decode writes float32
    volume: VolumeEntry | None = None


def volume_problem(sources) -> str | None:
    """Why the volumes ``sources`` (:class:`SourceEntry`) name cannot be written back whole, or
    None: each volume's slices are its indices 0 .. depth - 1, once each, of its shape, one after
    another in the file (so decode holds one volume at a time), the volume no larger than mrivq
    reads from one file, and no volume named like a slice or like another volume in another case."""
    slices = {source.name.lower() for source in sources}
    members: dict[str, list] = {}
    places: dict[str, list[int]] = {}
    for place, source in enumerate(sources):
        if source.volume is not None:
            members.setdefault(source.volume.name.lower(), []).append(source)
            places.setdefault(source.volume.name.lower(), []).append(place)
    for key, group in members.items():
        volume = group[0].volume
        if key in slices:
            return f"the volume {volume.name} is named like one of the slices"
        if places[key][-1] - places[key][0] != len(group) - 1:
            return f"the slices of volume {volume.name} are not one after another"
        shape = volume.shape
        if math.prod(shape) > MAX_VOLUME_PIXELS:
            return f"volume {volume.name} of shape {shape} is larger than the {MAX_VOLUME_PIXELS} pixels it may hold"
        if any(member.volume.name != volume.name or member.volume.shape != shape for member in group):
            return f"the slices of volume {volume.name} disagree on its name or shape"
        if any(n != 1 for n in shape[3:]) or any(math.prod(member.shape) != shape[0] * shape[1] for member in group):
            return f"the slices of volume {volume.name} do not fit its shape {shape}"
        if sorted(member.volume.index for member in group) != list(range(shape[2])):
            return f"volume {volume.name} does not have each of its {shape[2]} slices once"
    return None


_Pair = tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]
_KeptScalar = Annotated[str, Field(max_length=256)] | int | float
_KeptValue = _KeptScalar | Annotated[list[_KeptScalar], Field(max_length=16)]


class PictureEntry(_Strict):
    """What a file's coding layers built on: the decoder's integer copy (its arithmetic, the ranges
    it was calibrated to, its fingerprint; :mod:`mrivq.compression.portable.decoder`)."""

    arithmetic: Literal["int8-v1"]
    ranges: list[float] = Field(min_length=1, max_length=256)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")


class CodesHeader(_Strict):
    """The header section's schema: types, ranges, and the checks within the header itself."""

    format: Literal["mrivq-codes"]
    version: Literal[VERSION]
    coder: Literal["frequencies", "prior"]
    n: int = Field(ge=1, le=MAX_SLICES)
    n_embed: int = Field(ge=2, le=1 << 16)
    top_grid: _Pair
    image_size: _Pair
    fit: Literal[FIT_POLICIES]
    normalize: Literal[NORMALIZE_POLICIES]
    percentiles: tuple[float, float]
    model_fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")
    codes_crc32: int = Field(ge=0, lt=1 << 32)
    sources: list[SourceEntry]
    prior_fingerprint: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    # The order the prior's integer copy coded in (its kind's: "passes", "raster", ...), one
    # stream per slice. Files of the retired floating-point coder say "sequential" (or nothing)
    # and carry the batch and device it ran with: read only to be refused by name.
    prior_coding: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    prior_batch: int | None = Field(default=None, ge=1, le=1 << 16)
    prior_device: Literal["cpu", "cuda"] | None = None
    # A volume prior's file: the two slices each slice was coded after (-1: none), checked below.
    references: list[tuple[Annotated[int, Field(ge=-1, lt=MAX_SLICES)], Annotated[int, Field(ge=-1, lt=MAX_SLICES)]]] \
        | None = Field(default=None, max_length=MAX_SLICES)
    # The coding layers on top of the codes, in the order they apply (mrivq.compression.layers).
    layers: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]] | None = Field(default=None, max_length=8)
    # The picture those layers built on, where it is the decoder's integer copy (files before it: float64).
    picture: PictureEntry | None = None
    # The two slices each slice's layers were coded after (-1: none), for layers that code volumes.
    layer_references: list[tuple[Annotated[int, Field(ge=-1, lt=MAX_SLICES)],
                                 Annotated[int, Field(ge=-1, lt=MAX_SLICES)]]] | None = \
        Field(default=None, max_length=MAX_SLICES)
    # What of each DICOM series' original header travels with the file (encode --keep-dicom-header):
    # volume name -> the attributes of mrivq.data.dicom.KEPT_ATTRIBUTES it had, each checked below
    # against its representation (mrivq.data.dicom.kept_value).
    dicom: dict[Annotated[str, AfterValidator(_plain_name)], dict[str, _KeptValue]] | None = \
        Field(default=None, max_length=MAX_SLICES)

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.sources) != self.n:
            raise ValueError(f"{len(self.sources)} slice names for {self.n} slices")
        if self.top_grid != tuple(-(-side // 8) for side in self.image_size):
            raise ValueError(f"top grid {list(self.top_grid)} does not belong to image size "
                             f"{list(self.image_size)}")
        if self.n * math.prod(self.top_grid) * 5 > MAX_CODES:
            raise ValueError(f"{self.n} slices of {list(self.image_size)} are more codes than one file may hold "
                             f"({MAX_CODES})")
        names = [source.name.lower() for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("two slices have the same name")
        if (self.coder == "prior") != (self.prior_fingerprint is not None):
            raise ValueError("the prior's fingerprint is given only for a prior-coded file")
        sequential = self.coder == "prior" and self.prior_coding in (None, "sequential")
        given = (self.prior_batch is not None, self.prior_device is not None)
        if given != (sequential, sequential):
            raise ValueError("the prior's batch and device are given only for a sequentially prior-coded file")
        if self.coder != "prior" and self.prior_coding is not None:
            raise ValueError("prior_coding is given only for a prior-coded file")
        if self.references is not None and (self.coder != "prior" or len(self.references) != self.n
                                            or coding_depths(self.references) is None):
            raise ValueError("the slices its slices are coded after are not an order a decoder can follow")
        problem = volume_problem(self.sources)
        if problem:
            raise ValueError(problem)
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError("a coding layer is listed twice")
        if self.picture is not None and not self.layers:
            raise ValueError("it names the picture of coding layers it does not have")
        if self.layer_references is not None and (not self.layers or len(self.layer_references) != self.n
                                                  or coding_depths(self.layer_references) is None):
            raise ValueError("the slices its coding layers are coded after are not an order a decoder can follow")
        if self.dicom is not None:
            volumes = {source.volume.name for source in self.sources if source.volume is not None}
            for name, kept in self.dicom.items():
                wrong = sorted(key for key, value in kept.items() if kept_value(key, value) is None)
                if name not in volumes or wrong:
                    raise ValueError(f"its DICOM header of {name} names " + (f"attributes mrivq never keeps, or "
                                     f"keeps other values of ({', '.join(wrong[:3])})" if wrong else
                                     "no volume of the file"))
        return self


def _parse_header(text: bytes) -> CodesHeader:
    """The header, or :class:`_Invalid` saying in one plain sentence what is wrong with it."""
    try:
        return CodesHeader.model_validate_json(text)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in error["loc"])
        raise _Invalid(f"its header's {where} is not valid ({message[:1].lower() + message[1:]})" if where
                       else f"in its header, {message}") from None
    except RecursionError:
        raise _Invalid("its header is nested too deeply") from None


def _side_arrays(side: bytes, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    norm = np.frombuffer(side[:8 * n], dtype="<f4").reshape(n, 2).astype(np.float32)
    rows = np.frombuffer(side[8 * n:56 * n], dtype="<f4").reshape(n, 3, 4).astype(np.float64)
    affines = np.concatenate([rows, np.tile([[[0.0, 0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1)
    shapes = np.frombuffer(side[56 * n:], dtype="<u2").reshape(n, 2).astype(np.int64)
    return norm, affines, shapes


def _check_consistency(codes: CodesFile) -> None:
    """The side data, tables and sources against each other and the limits."""
    if not (np.isfinite(codes.norm).all() and np.abs(codes.norm).max() < MAX_SCALE):
        raise _Invalid(f"its intensity scales hold NaN, Inf or values beyond {MAX_SCALE:g}")
    if not np.isfinite(codes.affines).all():
        raise _Invalid("its affines hold NaN or Inf")
    header = codes.header
    total = sum(math.prod(source["shape"]) for source in header["sources"])
    if total > MAX_OUTPUT_PIXELS:
        raise _Invalid(f"its slices would decode to {total} pixels, more than the {MAX_OUTPUT_PIXELS} one file "
                       "may hold")
    for shape, source in zip(codes.shapes, header["sources"]):
        pixels = math.prod(source["shape"])
        if shape.min() < 1 or shape.max() > MAX_SIDE or int(shape.prod()) != pixels:
            raise _Invalid(f"slice {source['name']}: shape {shape.tolist()} does not fit its stored "
                           f"shape {source['shape']}")
        if pixels > MAX_SLICE_PIXELS:
            raise _Invalid(f"slice {source['name']}: {pixels} pixels, more than the {MAX_SLICE_PIXELS} "
                           "a slice may have")
    if codes.counts is not None:
        cells = header["n"] * math.prod(header["top_grid"])
        if codes.counts.shape != (2, header["n_embed"]) or codes.counts.sum(axis=1, dtype=np.int64).tolist() != [
                cells, 4 * cells]:
            raise _Invalid("its frequency tables do not count the codes of its slices")


def output_name_problem(name: str) -> str | None:
    """Why ``name`` may not be the name of a slice decode writes into a folder, or None: a file
    name only (no folder part, not hidden, no control characters), ending in .nii.gz."""
    if not name or name in (".", ".."):
        return "an empty name"
    if len(name.encode("utf-8", "replace")) > 255:
        return "a name longer than 255 bytes"
    if "/" in name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return f"the name {name!r} has a folder separator or a control character"
    if name.startswith("."):
        return f"the name {name!r} is hidden (starts with a dot)"
    if not name.lower().endswith(".nii.gz"):
        return f"the name {name!r} does not end in .nii.gz"
    return None


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
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise UserError(f"{path}: larger than the {MAX_FILE_BYTES >> 20} MiB a codes file may be; "
                        "encode the slices in several files")
    return CodesFile.from_bytes(data, path)


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
    if header.get("layers"):  # per voxel of the slices' own grids, what the codes and each layer cost
        voxels = int(sum(math.prod(int(n) for n in shape) for shape in codes.shapes))
        layer_bytes = {name: codes.section_bytes.get(_LAYER + name, 0) for name in header["layers"]}
        report["voxels"] = voxels
        report["bits_per_voxel"] = {"file": file_bytes * 8 / voxels,
                                    "codes": (file_bytes - sum(layer_bytes.values())) * 8 / voxels,
                                    **{name: size * 8 / voxels for name, size in layer_bytes.items()}}
    if input_bytes:
        report["input_bytes"] = int(input_bytes)
        report["compression_ratio"] = input_bytes / file_bytes
    return report


def source_entry(path: Path, meta, volume: int | None = None) -> dict:
    """What decode needs to write a slice back like its input: the name, the on-disk shape and type
    (``volume``: the slice's index along the third axis of the 3-D file ``path``, named
    ``<stem>_slice_<index>`` after it). A slice decode could not write back (a name it refuses, a
    side over 32767, too many pixels) is refused here, so every file encode writes decodes."""
    name = Path(path).name
    name = name if name.lower().endswith(".gz") else name + ".gz"
    problem = output_name_problem(name)
    shape = list(meta.shape)
    if problem is None and (max(shape) > MAX_SIDE or math.prod(shape[:2] if volume is not None else shape)
                            > MAX_SLICE_PIXELS):
        problem = (f"shape {shape} is beyond what a codes file holds (sides up to {MAX_SIDE}, "
                   f"{MAX_SLICE_PIXELS} pixels per slice)")
    if problem is None and not np.isfinite(np.asarray(meta.affine, dtype=np.float32)).all():
        problem = "its affine holds NaN or Inf (a broken header); fix the file's qform/sform"
    if problem:
        raise BadFileError(path, f"cannot be encoded: {problem}")
    entry = {"name": name, "shape": shape, "dtype": np.dtype(meta.dtype).name}
    if volume is None:
        return entry
    entry = {**entry, "name": f"{name[:-len('.nii.gz')]}_slice_{volume}.nii.gz", "shape": shape[:2],
             "volume": {"name": name, "shape": shape, "index": volume}}
    problem = output_name_problem(entry["name"])
    if problem:
        raise BadFileError(path, f"cannot be encoded: its slices' names: {problem}")
    return entry


def check_encodable(sources: list[dict], image_size: tuple[int, int]) -> None:
    """Refuse, before any encoding, a set of slices one codes file cannot hold (so that every
    file encode writes decodes): too many slices, codes or pixels, or names that differ only
    in case (one file on a case-insensitive disk)."""
    n, cells = len(sources), math.prod(-(-side // 8) for side in image_size) * 5
    pixels = sum(math.prod(source["shape"]) for source in sources)
    names = [source["name"].lower() for source in sources]
    if n > MAX_SLICES or n * cells > MAX_CODES or pixels > MAX_OUTPUT_PIXELS:
        raise UserError(f"{n} slices are more than one codes file holds (at most {MAX_SLICES} slices, {MAX_CODES} "
                        f"codes, {MAX_OUTPUT_PIXELS} pixels); encode them in several files")
    if len(set(names)) != n:
        raise UserError("two inputs have names that differ only in case; their decoded slices would overwrite "
                        "each other: give them in separate runs")
    problem = volume_problem([SourceEntry.model_validate(source) for source in sources])
    if problem:
        raise UserError(f"{problem}: their decoded files would overwrite each other; give them in separate runs")


def preprocessing_entry(prep) -> dict:
    """The header's record of a :class:`mrivq.data.preprocess.Preprocessing`."""
    return {"image_size": list(prep.image_size), "fit": prep.fit, "normalize": prep.normalize,
            "percentiles": list(prep.percentiles)}

