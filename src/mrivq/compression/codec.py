"""The VQ-VAE-2 as a codec: slices in, the bytes of a codes file out, and back.

In the spirit of CompressAI's ``compress`` / ``decompress``. A :class:`Codec` holds the VQ-VAE
(the analysis and synthesis transforms), the preprocessing it was trained with and, optionally,
a prior (the entropy model). Everything a file needs besides its stream is the codec's business:

* the side information (each slice's normalisation, affine, on-disk shape, type and name:
  a :class:`CodecInput`), so decoded slices are written back like their inputs;
* the fingerprints that tie a file to its VQ-VAE (:func:`model_fingerprint`) and to the integer
  copy of its prior, checked before a stream is decoded;
* which coder runs: the codes' frequencies (:mod:`mrivq.compression.entropy`), or the prior's
  integer copy in its own order (:mod:`mrivq.compression.driver`), the same weights on any
  machine, thread count or device. The file's format is :mod:`mrivq.compression.container`'s.

Example::

    >>> codec = Codec(model, prep, prior)
    >>> packed = codec.compress(CodecInput.read(files, prep))
    >>> for i, scanner in codec.decompress(CodesFile.from_bytes(packed.blob)): ...

The apps (``encode``, ``decode``, ``predict``) only load the models (``engine.checkpoint.load_codec``)
and write what the codec returns.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mrivq import metrics
from mrivq.compression import driver, residual  # noqa: F401 -- residual registers its coding layer
from mrivq.compression.container import (
    VERSION,
    CodesFile,
    bits_report,
    check_encodable,
    codes_crc,
    preprocessing_entry,
    source_entry,
)
from mrivq.compression.entropy import (
    bits_per_pixel_map,
    code_count_table,
    decode_with_frequencies,
    encode_with_frequencies,
)
from mrivq.compression.layers import LAYERS, SliceRefused, Stored, code_slices
from mrivq.compression.portable.decoder import FORMAT as PICTURE_COPY
from mrivq.compression.portable.decoder import IntegerDecoder, calibrate, has_copy
from mrivq.compression.priors import kind_of
from mrivq.data.dicom import kept_attributes
from mrivq.data.io import nifti_bytes, nifti_image, read_slice
from mrivq.data.preprocess import (
    Preprocessing,
    clip_to_input_range,
    denormalize,
    fit_to_shape,
    preprocess_slice,
    unfit,
)
from mrivq.data.scans import as_scan
from mrivq.data.volumes import references
from mrivq.errors import UserError
from mrivq.nn import VQVAE2

#: A prior-coded file is written only where it is smaller than the frequency-coded one (a prior
#: trained too briefly, or on other scans, can cost more); the suite's tiny priors switch it off
#: to exercise their coders (tests/conftest.py).
SMALLEST_FILE = True

#: The most pixels one batch of slices may hold (16 slices of 256 x 128): larger slices go in
#: smaller batches, so memory does not grow with a model's image size.
MAX_BATCH_PIXELS = 16 * 256 * 128
#: A file's integer decoder copy is calibrated on this many of its slices (evenly spaced); the
#: others' values beyond those ranges saturate, the same way on every machine.
CALIBRATION_SLICES = 4
#: Coding layers that code volumes start afresh every this many slices of a run (a key slice).
LAYER_KEY_EVERY = 8
#: The header entries coding layers add: their names, their picture, the slices they are coded after.
LAYER_ENTRIES = ("layers", "picture", "layer_references")


def _batch(size: tuple[int, ...], batch_size: int) -> int:
    return max(1, min(batch_size, MAX_BATCH_PIXELS // max(1, int(np.prod(size)))))


def slices_to_batch(slices: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, H, W)`` float32 array -> ``(B, 1, H, W)`` channels-last tensor on ``device``: the one
    batch format of encoding, training and evaluation, so they see the same codes."""
    # A copy: the cached slices are a read-only memory map, and the batch must not alias it.
    batch = torch.from_numpy(np.array(slices, dtype=np.float32, copy=True)).unsqueeze(1)
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def encode_images(model: VQVAE2, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``images`` ``(N, H, W)`` float32 in model input range (an array, or anything
    with ``len()`` that slices into such arrays, as :class:`mrivq.data.augment.TransformedSlices`).

    Batches go in as :func:`slices_to_batch` makes them (channels-last), as in evaluation, so a
    model in the same memory format gives the same codes here as :func:`mrivq.engine.evaluator.evaluate`.
    Returns ``(codes_top, codes_bottom)``: int64 ``(N, h, w)`` and ``(N, 2h, 2w)``.
    """
    model.eval()
    device = next(model.parameters()).device
    tops, bottoms = [], []
    batch_size = _batch(np.shape(images[:1])[1:], batch_size)
    for lo in range(0, len(images), batch_size):
        top, bottom = model.encode(slices_to_batch(images[lo:lo + batch_size], device))
        tops.append(top.cpu().numpy())
        bottoms.append(bottom.cpu().numpy())
    return np.concatenate(tops), np.concatenate(bottoms)


@torch.inference_mode()
def decode_images(model: VQVAE2, codes_top: np.ndarray, codes_bottom: np.ndarray,
                  batch_size: int = 32) -> np.ndarray:
    """Slices from codes: ``(N, h, w)`` and ``(N, 2h, 2w)`` int -> ``(N, 8h, 8w)`` float32 (unclamped;
    float64 from a float64 model)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    batch_size = _batch(tuple(8 * side for side in np.shape(codes_top)[1:]), batch_size)
    for lo in range(0, len(codes_top), batch_size):
        top = torch.as_tensor(np.asarray(codes_top[lo:lo + batch_size], dtype=np.int64), device=device)
        bottom = torch.as_tensor(np.asarray(codes_bottom[lo:lo + batch_size], dtype=np.int64), device=device)
        decoded = model.decode_codes(top, bottom)[:, 0]
        out.append((decoded if decoded.dtype == torch.float64 else decoded.float()).cpu().numpy())
    return np.concatenate(out)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short hash of a model's whole state (every parameter and buffer, by name): codes mean
    something only under the very model that made them, and a prior only over its codes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class CodecInput:
    """Preprocessed slices and what a codes file keeps to write each back like its input.

    ``images`` ``(N, H, W)`` float32 model input; ``norm`` ``(N, 2)`` the normalisation;
    ``affines`` ``(N, 4, 4)``; ``shapes`` ``(N, 2)`` the 2-D shape before fitting; ``sources``
    per slice the output ``name``, on-disk ``shape`` and ``dtype``.
    """

    images: np.ndarray
    norm: np.ndarray
    affines: np.ndarray
    shapes: np.ndarray
    sources: list[dict]
    originals: list[Stored] | None = None  # the slices as their files store them, for coding layers
    dicom: dict[str, dict] | None = None  # volume name -> the DICOM attributes kept with the file

    @classmethod
    def read(cls, files: list, prep: Preprocessing, *, originals: bool = False,
             keep_dicom: bool = False) -> CodecInput:
        """Read and preprocess scans (:func:`mrivq.data.scans.scan_inputs`' NIfTI files and DICOM
        series, or NIfTI paths): a volume slice by slice along its third axis,
        :func:`mrivq.compression.container.source_entry` names them; refuses, before any work,
        what one codes file cannot hold. ``originals``: keep the stored numbers too (what coding
        layers need; memory grows with them). ``keep_dicom``: keep each DICOM series' attributes
        of :data:`mrivq.data.dicom.KEPT_ATTRIBUTES` (patient, study, frame of reference, acquisition)
        for the file's header; by default a codes file carries none of them."""
        images, norm, affines, shapes, sources, kept, dicom = [], [], [], [], [], [], {}
        for scan in map(as_scan, files):
            if keep_dicom and scan.dicom is not None:
                dicom[scan.name] = kept_attributes(scan.dicom)
            stack, meta, is_volume, slice_affines = scan.read()
            for index, raw in enumerate(stack):
                x, params = preprocess_slice(raw, prep)
                images.append(x)
                norm.append(params)
                affines.append(slice_affines[index])
                shapes.append(raw.shape)
                sources.append(source_entry(Path(scan.name), meta, index if is_volume else None))
            if originals:
                stored, dtype, slopes, inters = scan.read_stored()
                kept += [Stored(values, dtype, float(slope), float(inter))
                         for values, slope, inter in zip(stored, slopes, inters)]
        check_encodable(sources, prep.image_size)
        return cls(np.stack(images), np.stack(norm), np.stack(affines), np.array(shapes), sources,
                   kept if originals else None, dicom or None)

    @classmethod
    def of_split(cls, split) -> CodecInput:
        """A loaded split's slices (:class:`mrivq.data.cache.SliceSet`, already preprocessed): the
        files are read again only for their affines and on-disk shapes."""
        metas = [read_slice(f)[1] for f in split.files]
        return cls(split.images, np.asarray(split.norm), np.stack([meta.affine for meta in metas]),
                   np.array(split.original_shapes),
                   [source_entry(Path(f), meta) for f, meta in zip(split.files, metas)])

    def subset(self, indices) -> CodecInput:
        """These slices alone (indices into this input), with all that is kept of them."""
        chosen = [int(i) for i in indices]
        return CodecInput(self.images[chosen], np.asarray(self.norm)[chosen], np.asarray(self.affines)[chosen],
                          np.asarray(self.shapes)[chosen], [self.sources[i] for i in chosen],
                          None if self.originals is None else [self.originals[i] for i in chosen], self.dicom)

    def as_nifti(self, i: int, array: np.ndarray, fit: str) -> bytes:
        """A model-grid ``(H, W)`` array of slice ``i`` (a surprise map) as the bytes of a NIfTI on
        the slice's own grid: its on-disk shape and affine."""
        grid = unfit(array, tuple(self.shapes[i]), fit).reshape(self.sources[i]["shape"])
        return nifti_bytes(nifti_image(grid, self.affines[i]))


@dataclass
class Compressed:
    """A compressed set of slices: the codes file, its bytes (checked to decode back to ``codes``),
    the codes, and the seconds range coding and the check's decoding took. ``prior_bytes``: the
    size the prior-coded file would have had, where the frequency-coded one was smaller and was
    written instead."""

    file: CodesFile
    blob: bytes
    codes: tuple[np.ndarray, np.ndarray]
    coding_s: float
    decoding_s: float
    prior_bytes: int | None = None
    pictures: list[np.ndarray] | None = None  # the float64 pictures the coding layers built on
    decoded: list[Stored] | None = None  # what the coding layers decode each slice to (checked on encode)

    def report(self, input_bytes: int | None = None) -> dict:
        """The file's bits report (:func:`mrivq.compression.container.bits_report`) with the timings
        (and ``prior_file_bytes`` where the prior's file lost to the frequency-coded one)."""
        report = {**bits_report(self.file, len(self.blob), input_bytes=input_bytes),
                  "coding_s": self.coding_s, "decoding_s": self.decoding_s}
        if self.prior_bytes is not None:
            report["prior_file_bytes"] = self.prior_bytes
        return report


def layer_references(header: dict, layers) -> np.ndarray | None:
    """The two slices each slice's coding layers are coded after (``(N, 2)``, -1: none), where one of
    ``layers`` codes volumes and the file has runs of consecutive slices (names as HipMRI's, or of
    3-D volumes): :func:`mrivq.data.volumes.references`, a key slice every :data:`LAYER_KEY_EVERY`."""
    if not any(LAYERS[name].references for name in layers):
        return None
    refs = references([source["name"] for source in header["sources"]], LAYER_KEY_EVERY)
    return refs if (refs >= 0).any() else None


class _ReferenceWalk:
    """The order a file's coding layers are decoded in (they are encoded by
    :func:`mrivq.compression.layers.code_slices`), and what is kept meanwhile: each slice
    after the slices it is coded after (``refs`` ``(N, 2)``, -1: none; None: every slice alone),
    the ``wanted`` ones in file order otherwise; each slice's decoded layers kept only until the
    last slice coded after it is done, and pictures read ahead only as far as a reference is."""

    def __init__(self, refs: np.ndarray | None, n: int, wanted: np.ndarray) -> None:
        self.refs, self.wanted = refs, set(wanted.tolist())
        self.needed = wanted if refs is None else driver.needed(refs, wanted, n)
        self.waiting = Counter(int(j) for i in self.needed for j in refs[i] if j >= 0) if refs is not None else Counter()
        self.kept: dict[str, dict[int, Stored]] = defaultdict(dict)
        self.ahead: dict[int, np.ndarray] = {}

    def order(self) -> Iterator[int]:
        """The needed slices, each after its references (a depth-first walk, without recursion: a
        file's references may chain every slice)."""
        seen: set[int] = set()
        for start in self.needed.tolist():
            stack = [(start, False)]
            while stack:
                i, expanded = stack.pop()
                if expanded:
                    yield i
                elif i not in seen:
                    seen.add(i)
                    stack.append((i, True))
                    refs = () if self.refs is None else self.refs[i][::-1]
                    stack += [(int(j), False) for j in refs if j >= 0 and int(j) not in seen]

    def picture(self, i: int, pictures: Iterator[tuple[int, np.ndarray]]) -> np.ndarray:
        """Slice ``i``'s picture from ``pictures`` (the needed slices' in file order), reading ahead to it."""
        while i not in self.ahead:
            j, picture = next(pictures)
            self.ahead[j] = picture
        return self.ahead.pop(i)

    def given(self, layer: str, i: int) -> dict:
        """The keyword arguments of ``layer``'s encode or decode of slice ``i``: its references, as decoded."""
        if self.refs is None or not LAYERS[layer].references:
            return {}
        return {"references": tuple(self.kept[layer][int(j)] for j in self.refs[i] if j >= 0)}

    def keep(self, layer: str, i: int, stored: Stored) -> None:
        if self.waiting[i]:
            self.kept[layer][i] = stored

    def done(self, i: int) -> None:
        for j in (() if self.refs is None else self.refs[i]):
            if j >= 0:
                self.waiting[int(j)] -= 1
                if not self.waiting[int(j)]:
                    for kept in self.kept.values():
                        kept.pop(int(j), None)


class Codec:
    """Slices <-> the bytes of a codes file, under one VQ-VAE and (optionally) one prior."""

    def __init__(self, model: VQVAE2, prep: Preprocessing, prior: torch.nn.Module | None = None, *,
                 batch_size: int = 16, prior_name: str = "the prior"):
        self.model, self.prep, self.prior, self.batch_size = model, prep, prior, batch_size
        self.prior_name = prior_name  # what an error about the prior calls it (its file)
        self.fingerprint = model_fingerprint(model)

    @property
    def n_embed(self) -> int:
        return self.model.quantize_top.n_embed

    # -- compress ---------------------------------------------------------------------------------

    def compress(self, slices: CodecInput, layers: tuple[str, ...] = (),
                 layer_options: dict[str, dict] | None = None) -> Compressed:
        """Encode the slices to codes, then :meth:`compress_codes` them."""
        return self.compress_codes(encode_images(self.model, slices.images, self.batch_size), slices, layers=layers,
                                   layer_options=layer_options)

    def compress_codes(self, codes: tuple[np.ndarray, np.ndarray], slices: CodecInput, *,
                       under_prior: bool = True, layers: tuple[str, ...] = (),
                       layer_options: dict[str, dict] | None = None,
                       pictures: list[np.ndarray] | None = None) -> Compressed:
        """A codes file of ``codes`` (of ``slices``), range-coded under the prior's integer copy when
        the codec has a prior and ``under_prior`` and that file is the smaller
        (:data:`SMALLEST_FILE`), else under the codes' frequencies; decoded again through the
        decoder's own path before returning (a file that would not decode back is a bug here,
        never a file written). ``layers``: coding layers (:mod:`mrivq.compression.layers`) on top
        of the codes, in the order they apply; ``layer_options``: keyword arguments of each one's
        ``encode`` (``{"residual": {"max_error": 2}}``); ``pictures``: the float64 pictures an
        earlier call returned (``Compressed.pictures``), so another bound does not decode again."""
        top, bottom = codes
        start = time.perf_counter()
        header = {"format": "mrivq-codes", "version": VERSION, "n": len(top), "n_embed": self.n_embed,
                  "top_grid": list(top.shape[1:]), **preprocessing_entry(self.prep),
                  "model_fingerprint": self.fingerprint, "codes_crc32": codes_crc(top, bottom),
                  "sources": slices.sources}
        if slices.dicom:
            header["dicom"] = slices.dicom
        counts = code_count_table(top, bottom, self.n_embed)
        files = [CodesFile({**header, "coder": "frequencies"}, np.asarray(slices.norm), np.asarray(slices.affines),
                           np.asarray(slices.shapes), encode_with_frequencies(top, bottom, counts), counts)]
        if self.prior is not None and under_prior:
            copy = self.coding_copy()
            header.update(coder="prior", prior_fingerprint=copy.fingerprint(), prior_coding=copy.coding)
            refs = None
            if getattr(copy, "volumes", False):  # each slice after its neighbours in its volume
                refs = references([source["name"] for source in slices.sources], self.prior.key_every)
                header["references"] = refs.tolist()
            files.insert(0, CodesFile(header, np.asarray(slices.norm), np.asarray(slices.affines),
                                      np.asarray(slices.shapes), driver.encode(copy, top, bottom, references=refs)))
        if layers:  # the same payloads on both files
            pictures, decoded = self._add_layers(files[0], codes, slices, layers, layer_options or {}, pictures)
            for other in files[1:]:  # the layers' header entries too (their picture, their references)
                other.header.update({key: files[0].header[key] for key in LAYER_ENTRIES if key in files[0].header})
                other.layers = files[0].layers
        blobs = [file.to_bytes() for file in files]
        file, blob = min(zip(files, blobs), key=lambda pair: len(pair[1])) if SMALLEST_FILE else (files[0], blobs[0])
        header = file.header
        coded = time.perf_counter()
        again = self._decode_stream(CodesFile.from_bytes(blob))
        if not (np.array_equal(again[0], top) and np.array_equal(again[1], bottom)):
            raise RuntimeError(f"the {header['coder']} codes stream did not decode back to the codes")
        fallback = len(blobs[0]) if file is not files[0] else None
        return Compressed(file, blob, codes, coded - start, time.perf_counter() - coded, fallback,
                          pictures if layers else None, decoded if layers else None)

    def with_layers(self, packed: Compressed, slices: CodecInput, layers: tuple[str, ...],
                    layer_options: dict[str, dict] | None = None) -> Compressed:
        """``packed``'s codes file (the same codes stream, already checked to decode) with other
        coding layers on top: another bound of the residual without coding the codes again. The
        pictures are those ``packed`` kept (a :meth:`compress_codes` with layers), or decoded here."""
        start = time.perf_counter()
        header = {key: value for key, value in packed.file.header.items() if key not in ("layers", "layer_references")}
        old = packed.file
        file = CodesFile(header, old.norm, old.affines, old.shapes, old.stream, old.counts)
        pictures, decoded = self._add_layers(file, packed.codes, slices, layers, layer_options or {}, packed.pictures)
        blob = file.to_bytes()
        return Compressed(file, blob, packed.codes, time.perf_counter() - start, 0.0, None, pictures, decoded)

    def _add_layers(self, file: CodesFile, codes, slices: CodecInput, layers: tuple[str, ...],
                    options: dict[str, dict], pictures: list[np.ndarray] | None) -> tuple[list, list[Stored]]:
        """Each layer's payload of each slice, given the picture the layers before it leave (and, for
        a layer that codes volumes, the slices :func:`layer_references` has it coded after, as they
        decode); a slice a layer cannot code (:class:`mrivq.compression.layers.Refused`) is refused
        in one line. Returns the pictures of the codes (``pictures``, or decoded here) and what the
        last layer decodes each slice to."""
        unknown = [name for name in layers if name not in LAYERS]
        if unknown or slices.originals is None:
            raise UserError(f"coding layer {unknown[0]!r} is not one of {sorted(LAYERS)}" if unknown
                            else "coding layers need the slices as read (CodecInput.read(..., originals=True))")
        file.header["layers"], file.layers = list(layers), {name: [b""] * file.n for name in layers}
        if pictures is None and has_copy(self.model):  # new files build on the decoder's integer copy
            every = np.linspace(0, len(codes[0]) - 1, min(CALIBRATION_SLICES, len(codes[0]))).round().astype(int)
            ranges = calibrate(self.model, *(torch.as_tensor(c[every]) for c in codes))
            file.header["picture"] = {"arithmetic": PICTURE_COPY, "ranges": ranges,
                                      "fingerprint": self._picture_copy(ranges).fingerprint}
        if pictures is None:
            pictures = [picture for _, picture in self._decoded(file, *codes, exact=True)]
        refs = layer_references(file.header, layers)
        if refs is not None:
            file.header["layer_references"] = refs.tolist()
        try:
            payloads, decoded = code_slices([LAYERS[name] for name in layers], options, slices.originals, pictures,
                                            refs, desc=", ".join(layers))
        except SliceRefused as e:
            raise UserError(f"{file.header['sources'][e.index]['name']}: {e.label} cannot code it: {e.reason}") from None
        for name, column in zip(layers, zip(*payloads)):
            file.layers[name] = list(column)
        return pictures, decoded

    def stored_scores(self, slices: CodecInput, stored: list[Stored]) -> tuple[np.ndarray, np.ndarray]:
        """Per-slice SSIM and PSNR (dB; inf for an exact slice) of ``stored`` slices (what a coding
        layer rebuilds) against ``slices``' images, each normalised as its input was and fitted to
        the model's grid: the SSIM protocol, as evaluation scores a reconstruction."""
        pictures = []
        for values, (offset, spread) in zip(stored, slices.norm):
            normalised = (values.scanner() - float(offset)) / float(spread)
            pictures.append(fit_to_shape(clip_to_input_range(normalised, self.prep.normalize), self.prep.image_size,
                                         self.prep.fit))
        rec = torch.from_numpy(np.stack(pictures).astype(np.float32)).unsqueeze(1)
        target = torch.from_numpy(np.asarray(slices.images, dtype=np.float32)).unsqueeze(1)
        return metrics.ssim_per_image(rec, target).numpy(), metrics.psnr_per_image(rec, target).numpy()

    def coding_copy(self):
        """The integer copy of the codec's prior, which codes; a prior saved before such copies
        existed has none, and is refused in one line."""
        if self.prior.integer is None:
            raise UserError(f"{self.prior_name} was saved by an earlier mrivq without the integer copy that "
                            "codes (it still samples); train the prior again with `mrivq train-prior`")
        return self.prior.integer

    def surprise(self, codes: tuple[np.ndarray, np.ndarray], names: list[str] | None = None) -> np.ndarray:
        """Bits per pixel ``(N, H, W)`` on the model grid: each code's -log2 p under the prior, given
        the codes coded before it, spread over the code's pixels (they add up to the stream);
        ``names``: the slices' names, by which a volume prior finds the slices each is coded after."""
        if self.prior is None:
            raise UserError("surprise maps show the bits a prior spends: give the prior with --prior")
        copy = self.coding_copy()
        volumes = getattr(copy, "volumes", False) and names is not None
        refs = references(names, self.prior.key_every) if volumes else None
        return bits_per_pixel_map(*driver.surprise_bits(copy, *codes, references=refs))

    # -- decompress -------------------------------------------------------------------------------

    def check_model(self, file: CodesFile, path: Path | str = "codes file") -> None:
        """Refuse a file encoded with another VQ-VAE, or whose preprocessing is not the model's."""
        header = file.header
        if header["n_embed"] != self.n_embed or header["model_fingerprint"] != self.fingerprint:
            raise UserError(f"{path} was encoded with another model (fingerprint {header['model_fingerprint']}, "
                            f"this checkpoint's {self.fingerprint}); decode with the checkpoint that encoded it")
        stored = (tuple(header["image_size"]), header["fit"], header["normalize"])
        if stored != (tuple(self.prep.image_size), self.prep.fit, self.prep.normalize):
            raise UserError(f"{path}: damaged or altered codes file: its image size and preprocessing {stored} are "
                            "not the ones its model was trained with; encode the slices again")

    def check_prior(self, file: CodesFile, path: Path | str = "codes file") -> None:
        """Refuse a prior-coded file whose prior is not this codec's."""
        header = file.header
        if header["coder"] == "prior" and self.prior is not None and (
                self.coding_copy().fingerprint() != header["prior_fingerprint"]):
            raise UserError(f"{path} was coded under another prior (fingerprint {header['prior_fingerprint']}); "
                            "give the prior that encoded it with --prior")

    def decompress_codes(self, file: CodesFile, path: Path | str = "codes file", *,
                         only=None) -> tuple[np.ndarray, np.ndarray]:
        """The file's codes, checked against its model, its prior and the encoder's checksum
        (``only``: see :meth:`_decode_stream`)."""
        self.check_model(file, path)
        self.check_prior(file, path)
        refs = file.header.get("layer_references")
        if only is not None and refs is not None:  # and the slices their layers are coded after
            only = driver.needed(np.asarray(refs, dtype=np.int64), only, file.n)
        return self._decode_stream(file, path, only=only)

    def _decode_stream(self, file: CodesFile, path: Path | str = "codes file", *,
                       only=None) -> tuple[np.ndarray, np.ndarray]:
        """The codes of the file's stream, under the coder its header names, checked against the
        encoder's checksum: ``(codes_top (N, h, w), codes_bottom (N, 2h, 2w))`` int64. ``only``
        (slice indices): a prior-coded file decodes just those slices and the slices they are coded
        after (the others' codes are -1); the checksum, over every code, is then not checked."""
        header = file.header
        try:
            if header["coder"] == "frequencies":
                top, bottom = decode_with_frequencies(file.stream, file.counts, file.n, tuple(header["top_grid"]))
            elif self.prior is None:
                raise UserError(f"{path} was coded under a prior: give it with --prior (the models/prior_best.pt "
                                "that encoded it)")
            elif header["prior_coding"] != (copy := self.coding_copy()).coding:
                raise UserError(f"{path} was coded in {header['prior_coding']} order, and --prior is "
                                f"{kind_of(self.prior).label}, which codes in {copy.coding} order; give the prior "
                                "that encoded it")
            else:
                refs = header.get("references") if getattr(copy, "volumes", False) else None
                top, bottom = driver.decode(copy, file.stream, file.n, references=refs, wanted=only)
        except (AssertionError, ValueError):  # the range decoder meets data its model cannot have coded
            raise UserError(f"{path}: damaged codes file: its stream does not decode; encode the slices again") from None
        if (top >= 0).all() and codes_crc(top, bottom) != int(header["codes_crc32"]):
            raise UserError(f"{path}: the decoded codes do not match the encoder's checksum; the file is damaged, "
                            "or encode the slices again")
        return top, bottom

    def decompress(self, file: CodesFile, path: Path | str = "codes file", *,
                   codes: tuple[np.ndarray, np.ndarray] | None = None, only=None,
                   codes_only: bool = False) -> Iterator[tuple[int, np.ndarray | Stored]]:
        """Each slice of the file in file order, ``(i, slice)``: scanner intensities (the stored
        normalisation undone, float32) in the input file's on-disk shape, or, where the file has
        coding layers, the :class:`Stored` values they rebuild. A batch is decoded at a time, so
        memory does not grow with the file; ``codes``: those :meth:`decompress_codes` gave;
        ``only``: these slices (indices) alone; ``codes_only``: the picture of the codes alone,
        the layers left unread."""
        top, bottom = codes if codes is not None else self.decompress_codes(file, path, only=only)
        layers = [] if codes_only else file.header.get("layers", [])
        for name in layers:
            if name not in LAYERS:
                raise UserError(f"{path} carries the coding layer {name!r}, which this mrivq does not know; "
                                "decode it with the mrivq that wrote it (or give --codes-only)")
        shape = lambda i: file.header["sources"][i]["shape"]
        if not layers:
            for i, picture in self._decoded(file, top, bottom, only, path=path):
                yield i, picture.reshape(shape(i))
            return
        refs = file.header.get("layer_references")
        wanted = np.arange(file.n) if only is None else np.unique(np.asarray(only, dtype=np.int64))
        walk = _ReferenceWalk(None if refs is None else np.asarray(refs, dtype=np.int64), file.n, wanted)
        pictures = self._decoded(file, top, bottom, walk.needed, exact=True, path=path)
        ready, at = {}, 0
        for i in walk.order():
            picture = walk.picture(i, pictures)
            for name in layers:
                given = walk.given(name, i)
                try:
                    stored = LAYERS[name].decode(file.layers[name][i], picture, **given)
                except ValueError as e:
                    raise UserError(f"{path}: slice {file.header['sources'][i]['name']}'s {name} layer does not "
                                    f"decode ({e}); the file is damaged, or encode the slices again") from None
                walk.keep(name, i, stored)
                picture = stored.scanner()
            walk.done(i)
            if i in walk.wanted:  # in file order: a slice waits for the wanted ones before it
                ready[i] = Stored(stored.values.reshape(shape(i)), stored.dtype, stored.slope, stored.inter)
                while at < len(wanted) and int(wanted[at]) in ready:
                    yield int(wanted[at]), ready.pop(int(wanted[at]))
                    at += 1

    def _decoded(self, file: CodesFile, top: np.ndarray, bottom: np.ndarray, only=None, *,
                 exact: bool = False, path: Path | str = "codes file") -> Iterator[tuple[int, np.ndarray]]:
        """Each slice (of ``only``, indices in file order, when given) decoded from the codes,
        ``(i, (h, w) scanner intensities)``, a batch at a time. ``exact``: the picture coding layers
        build on (:meth:`_exact_decoder`), else float32."""
        header = file.header
        height, width = header["image_size"]
        chosen = np.arange(file.n) if only is None else np.sort(np.asarray(only, dtype=np.int64))
        decode = self._exact_decoder(header, path) if exact else \
            (lambda t, b: decode_images(self.model, t, b, self.batch_size))
        for lo in range(0, len(chosen), self.batch_size):
            batch = chosen[lo:lo + self.batch_size]
            slices = clip_to_input_range(decode(top[batch], bottom[batch])[:, :height, :width], header["normalize"])
            for i, decoded in zip(batch.tolist(), slices):
                if exact:
                    offset, scale = (float(v) for v in file.norm[i])
                    yield i, unfit(decoded, tuple(file.shapes[i]), header["fit"], np.float64) * scale + offset
                else:
                    yield i, denormalize(unfit(decoded, tuple(file.shapes[i]), header["fit"]), file.norm[i])

    def _exact_decoder(self, header: dict, path: Path | str):
        """codes ``(N, h, w)``, ``(N, 2h, 2w)`` -> float64 pictures ``(N, 8h, 8w)``, as the file's
        coding layers were built on: the decoder's integer copy its header names (``picture``: the
        same integers on every machine), or, for files written before the copy (and models without
        one), the model in float64 (machines then differ by float64 ulps, which the layers guard)."""
        if not header.get("picture"):
            model = self._float64_model()
            return lambda t, b: decode_images(model, t, b, self.batch_size)
        integer = self._picture_copy(header["picture"]["ranges"], path)
        if integer.fingerprint != header["picture"]["fingerprint"]:
            raise UserError(f"{path}: its picture was decoded by another integer copy of the decoder than this model "
                            "makes; decode it with the model (and mrivq) that encoded it")
        # one slice at a time: 1.6x as fast as 4 (the caches then hold its stream)
        return lambda t, b: np.concatenate([integer.pictures(torch.as_tensor(t[i:i + 1]), torch.as_tensor(b[i:i + 1]))
                                            for i in range(len(t))])

    def _picture_copy(self, ranges: list[float], path: Path | str = "codes file") -> IntegerDecoder:
        """The decoder's integer copy under ``ranges`` (made once per set of ranges)."""
        key = tuple(float(r) for r in ranges)
        if getattr(self, "_copies", {}).get(key) is None:
            try:
                self._copies = {key: IntegerDecoder(self.model, list(key))}
            except ValueError as e:
                raise UserError(f"{path}: {e}; the file is damaged, or encode the slices again") from None
        return self._copies[key]

    def _float64_model(self) -> VQVAE2:
        if getattr(self, "_model64", None) is None:
            self._model64 = copy.deepcopy(self.model).double().eval()
        return self._model64
