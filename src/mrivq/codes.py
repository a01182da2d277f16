"""Slices to discrete codes and back (``mrivq encode`` / ``mrivq decode``), and what they cost in bits.

``encode`` reads NIfTI slices, preprocesses them as the VQ-VAE was trained (fit to
``data.image_size``, per-slice normalisation), and stores the top and bottom code indices in
one ``.npz`` file together with everything ``decode`` needs to write each slice back as
NIfTI in scanner intensities with its original affine, shape and file name: the
normalisation parameters, the fit policy, the shapes, the affines and a fingerprint of the
codebooks (so codes are never decoded by a model they were not made with).

Bits: *raw* is ``log2(n_embed)`` per code; *entropy-coded* is the length of a real range-coded
bitstream (``constriction``) of each level's codes under that level's code frequencies over
the encoded set, checked to decode back losslessly; with a trained prior, also under the
prior's conditional probabilities (see :mod:`mrivq.prior`). The compression ratio compares
the input ``.nii.gz`` files with the coded codes plus the side information decode needs.

Example::

    >>> report = encode("runs/default/models/best.pt", ["keras_slices_test"], "test_codes.npz")
    >>> report["bits_per_pixel"]["raw"], report["bits_per_pixel"]["entropy_coded"]
    (0.3515625, 0.21...)
    >>> written = decode("runs/default/models/best.pt", "test_codes.npz", "decoded/")
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from . import metrics, strict_json
from .checkpoint import atomic_write, checkpoint_config, load_checkpoint, model_from_checkpoint
from .config import Config
from .data.io import nifti_inputs, read_slice
from .data.preprocess import denormalize, fit_to_shape, preprocess_slice
from .errors import UserError
from .evaluate import preprocessing
from .models import VQVAE2

log = logging.getLogger("mrivq")

FORMAT = "mrivq-codes"
FORMAT_VERSION = 1
PRIOR_KIND = "code-prior"
_ARRAYS = ("codes_top", "codes_bottom", "norm", "affines", "shapes")
#: Side information per slice that decode needs besides the codes, in bytes: (offset, scale)
#: as float32, the affine's top 3x4 rows as float32, the original (h, w) as uint16.
SIDE_BYTES_PER_SLICE = 2 * 4 + 12 * 4 + 2 * 2


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

def load_vqvae(path: str | Path) -> tuple[VQVAE2, Config]:
    """The VQ-VAE-2 of a training checkpoint (eval mode, CPU) and the config it was trained with."""
    path = Path(path).expanduser()
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == PRIOR_KIND:
        raise UserError(f"{path} is a prior checkpoint; give the VQ-VAE's checkpoint "
                        "(e.g. runs/default/models/best.pt)")
    model = model_from_checkpoint(ckpt, path).eval()
    return model, checkpoint_config(ckpt, path)


def codebook_fingerprint(model: VQVAE2) -> str:
    """Short hash of both codebooks: codes only mean something under the codebooks that made them."""
    digest = hashlib.sha256()
    for quantizer in (model.quantize_top, model.quantize_bottom):
        digest.update(quantizer.embed.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.inference_mode()
def encode_images(model: VQVAE2, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Codes of ``images`` ``(N, H, W)`` float32 in model input range.

    Returns ``(codes_top, codes_bottom)``: int64 ``(N, h, w)`` and ``(N, 2h, 2w)``.
    """
    model.eval()
    device = next(model.parameters()).device
    tops, bottoms = [], []
    for lo in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[lo:lo + batch_size], dtype=np.float32)).unsqueeze(1)
        top, bottom = model.encode(x.to(device))
        tops.append(top.cpu().numpy())
        bottoms.append(bottom.cpu().numpy())
    return np.concatenate(tops), np.concatenate(bottoms)


@torch.inference_mode()
def decode_images(model: VQVAE2, codes_top: np.ndarray, codes_bottom: np.ndarray,
                  batch_size: int = 32) -> np.ndarray:
    """Slices from codes: ``(N, h, w)`` and ``(N, 2h, 2w)`` int -> ``(N, 8h, 8w)`` float32 (unclamped)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(codes_top), batch_size):
        top = torch.as_tensor(np.asarray(codes_top[lo:lo + batch_size], dtype=np.int64), device=device)
        bottom = torch.as_tensor(np.asarray(codes_bottom[lo:lo + batch_size], dtype=np.int64), device=device)
        out.append(model.decode_codes(top, bottom)[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def code_grid_shapes(image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top and bottom code grids of a VQ-VAE-2 for ``image_size`` ``(H, W)``."""
    top = (math.ceil(image_size[0] / 8), math.ceil(image_size[1] / 8))
    return top, (2 * top[0], 2 * top[1])


# ---------------------------------------------------------------------------------------
# Entropy coding
# ---------------------------------------------------------------------------------------

def range_code(symbols: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Range-code ``symbols`` (any shape, ints in ``[0, K)``) and return the bitstream (uint32 words).

    ``probabilities`` is ``(K,)`` for one distribution shared by all symbols, or
    ``(len(symbols), K)`` for one per symbol (in ``symbols.ravel()`` order). The stream is
    decoded again and compared: a mismatch is a bug, not a user error.
    """
    import constriction

    categorical = constriction.stream.model.Categorical
    flat = np.ascontiguousarray(symbols, dtype=np.int32).ravel()
    probs = np.ascontiguousarray(probabilities, dtype=np.float64)
    encoder = constriction.stream.queue.RangeEncoder()
    if probs.ndim == 1:
        encoder.encode(flat, categorical(probs, perfect=False))
    else:
        encoder.encode(flat, categorical(perfect=False), probs)
    words = encoder.get_compressed()
    decoder = constriction.stream.queue.RangeDecoder(words)
    if probs.ndim == 1:
        decoded = decoder.decode(categorical(probs, perfect=False), len(flat))
    else:
        decoded = decoder.decode(categorical(perfect=False), probs)
    if not np.array_equal(decoded, flat):
        raise RuntimeError("range coding did not round-trip")
    return words


def frequency_coded_bits(codes: np.ndarray, n_embed: int) -> dict:
    """Range-code one level's codes under their own frequencies over the set.

    Returns ``bits`` (the real bitstream length), ``entropy_bits`` (the ideal
    ``-sum log2 p``) and ``table_bytes`` (the frequency table a decoder needs: uint32 counts).
    """
    counts = np.bincount(codes.ravel(), minlength=n_embed).astype(np.float64)
    probs = counts / counts.sum()
    words = range_code(codes, probs)
    used = probs[probs > 0]
    return {"bits": int(words.size * 32),
            "entropy_bits": float(-(counts[counts > 0] * np.log2(used)).sum()),
            "table_bytes": int(n_embed * 4)}


def bits_report(codes_top: np.ndarray, codes_bottom: np.ndarray, n_embed: int,
                image_size: tuple[int, int], input_bytes: int | None = None,
                prior_bits: dict | None = None) -> dict:
    """Bits per pixel (raw, entropy-coded, ideal) of a set of code grids, and compression ratios.

    ``codes_*`` are ``(N, h, w)`` and ``(N, 2h, 2w)``; pixels are ``N x H x W`` of
    ``image_size``. ``input_bytes``: the input files' total size, for the ratios.
    ``prior_bits``: ``{"top": bits, "bottom": bits}`` of range coding under a prior.
    """
    n = len(codes_top)
    pixels = n * image_size[0] * image_size[1]
    raw = metrics.raw_bits_per_pixel(tuple(image_size), codes_top.shape[1:], codes_bottom.shape[1:],
                                     n_embed, n_embed)
    levels = {"top": frequency_coded_bits(codes_top, n_embed),
              "bottom": frequency_coded_bits(codes_bottom, n_embed)}
    coded_bits = sum(level["bits"] for level in levels.values())
    tables = sum(level["table_bytes"] for level in levels.values())
    coded_bytes = math.ceil(coded_bits / 8) + tables + n * SIDE_BYTES_PER_SLICE
    report = {
        "n_slices": n,
        "n_codes": {"top": int(codes_top[0].size), "bottom": int(codes_bottom[0].size)},
        "bits_per_pixel": {
            "raw": raw,
            "entropy_coded": coded_bits / pixels,
            "entropy_ideal": sum(level["entropy_bits"] for level in levels.values()) / pixels,
        },
        "bits_per_code": {name: level["bits"] / codes.size
                          for (name, level), codes in zip(levels.items(), (codes_top, codes_bottom))},
        "coded_bytes": coded_bytes,
        "coder": "range coding (constriction) under per-level code frequencies; the frequency "
                 "tables and per-slice side information are counted in coded_bytes",
    }
    if prior_bits is not None:
        bits = prior_bits["top"] + prior_bits["bottom"]
        report["bits_per_pixel"]["prior_coded"] = bits / pixels
        report["prior_coded_bytes"] = math.ceil(bits / 8) + n * SIDE_BYTES_PER_SLICE
    if input_bytes:
        report["input_bytes"] = int(input_bytes)
        report["compression_ratio"] = input_bytes / coded_bytes
        if prior_bits is not None:
            report["compression_ratio_prior"] = input_bytes / report["prior_coded_bytes"]
    return report


# ---------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------

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
    prep = preprocessing(trained)
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
        from .prior.sample import load_prior, prior_coded_bits

        code_prior, _, _ = load_prior(prior, expect_fingerprint=codebook_fingerprint(model))
        prior_bits = prior_coded_bits(code_prior, codes_top, codes_bottom, batch_size=batch_size)
    input_bytes = sum(f.stat().st_size for f in files)
    report = bits_report(codes_top, codes_bottom, n_embed, prep.image_size, input_bytes, prior_bits)
    arrays = {
        "format": np.array(FORMAT), "format_version": np.array(FORMAT_VERSION),
        "codes_top": codes_top.astype(np.uint16), "codes_bottom": codes_bottom.astype(np.uint16),
        "n_embed": np.array(n_embed), "fingerprint": np.array(codebook_fingerprint(model)),
        "image_size": np.array(prep.image_size), "fit": np.array(prep.fit),
        "normalize": np.array(prep.normalize), "percentiles": np.array(prep.percentiles),
        "norm": np.stack(norm).astype(np.float32), "affines": np.stack(affines).astype(np.float64),
        "shapes": np.array(shapes, dtype=np.int64), "sources": np.array(json.dumps(disk)),
        "report": np.array(strict_json.dumps(report)),
    }
    atomic_write(out, lambda fh: np.savez_compressed(fh, **arrays))
    report["codes_file"] = str(out)
    report["codes_file_bytes"] = out.stat().st_size
    return report


def read_codes(path: str | Path) -> dict:
    """Load and check a codes file written by :func:`encode`; a clear :class:`UserError` otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"codes file not found: {path} (write one with `mrivq encode`)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise UserError(f"{path}: not a readable codes file (truncated or corrupt: "
                        f"{str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__}); "
                        "encode the slices again") from None
    if str(data.get("format", "")) != FORMAT:
        raise UserError(f"{path}: not an mrivq codes file (write one with `mrivq encode`)")
    if int(data.get("format_version", -1)) != FORMAT_VERSION:
        raise UserError(f"{path}: codes file version {data.get('format_version')} is not supported "
                        f"(this mrivq reads version {FORMAT_VERSION}); encode the slices again")
    missing = [key for key in (*_ARRAYS, "n_embed", "fingerprint", "image_size", "fit", "normalize",
                               "sources") if key not in data]
    if missing:
        raise UserError(f"{path}: codes file lacks {', '.join(missing)}; encode the slices again")
    try:
        sources = json.loads(str(data["sources"]))
    except json.JSONDecodeError:
        raise UserError(f"{path}: codes file has unreadable source names; encode the slices again") from None
    n = len(data["codes_top"])
    top_shape, bottom_shape = code_grid_shapes(tuple(int(v) for v in data["image_size"]))
    consistent = (data["codes_top"].shape == (n, *top_shape)
                  and data["codes_bottom"].shape == (n, *bottom_shape)
                  and data["norm"].shape == (n, 2) and data["affines"].shape == (n, 4, 4)
                  and data["shapes"].shape == (n, 2) and len(sources) == n and n > 0)
    if not consistent:
        raise UserError(f"{path}: codes file is inconsistent (code grids, metadata and slice counts do "
                        "not agree); encode the slices again")
    n_embed = int(data["n_embed"])
    if max(int(data["codes_top"].max()), int(data["codes_bottom"].max())) >= n_embed:
        raise UserError(f"{path}: codes file holds code indices >= its codebook size {n_embed}; "
                        "encode the slices again")
    data["sources"] = sources
    return data


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
    if str(data["normalize"]) != "zscore":
        slices = np.clip(slices, 0.0, 1.0)  # the model's input range; the SSIM protocol clamps alike
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
        outputs.append((out_dir / Path(source["name"]).name, _gzip(image.to_bytes())))
    for path, blob in outputs:
        atomic_write(path, lambda fh, blob=blob: fh.write(blob))
    return [path for path, _ in outputs]


def _gzip(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw, compresslevel=6, mtime=0)


def unfit(fitted: np.ndarray, original_shape: tuple[int, int], policy: str) -> np.ndarray:
    """Undo :func:`mrivq.data.preprocess.fit_to_shape`: ``(H, W)`` back to the slice's own ``(h, w)``.

    ``pad_crop``: what was padded is cropped away; what was cropped is padded back with the
    slice's background (its minimum), since those pixels were never seen. ``resize``: bilinear
    back to ``(h, w)``.
    """
    fitted = np.asarray(fitted, dtype=np.float32)
    if fitted.shape == tuple(original_shape):
        return fitted
    if policy == "resize":
        return fit_to_shape(fitted, original_shape, "resize")
    crops, pads = [], []
    for have, want in zip(original_shape, fitted.shape):  # have: original, want: fitted
        if have >= want:  # the original was cropped: put the fitted part back in the middle
            start = (have - want) // 2
            crops.append(slice(None))
            pads.append((start, have - want - start))
        else:  # the original was padded: cut the padding off
            before = (want - have) // 2
            crops.append(slice(before, before + have))
            pads.append((0, 0))
    out = fitted[tuple(crops)]
    return np.pad(out, pads, mode="constant", constant_values=fitted.min()).astype(np.float32)
