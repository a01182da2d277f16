"""Scans in, scans out: reconstruct slices, volumes or DICOM series so they overlay the original.

``mrivq reconstruct --checkpoint FILE INPUT... --out DIR`` reads each input (a 2-D slice,
possibly with singleton axes, or a 3-D volume taken slice by slice along its third axis),
normalises every slice as training did, runs it through the model at its own size (the model
pads to a multiple of 8 inside and crops back, so nothing is fitted or lost), maps the
reconstruction back to scanner units with the slice's own normalisation, and reassembles
the input's array. It writes, for ``NAME.nii.gz``:

- ``DIR/NAME_recon.nii.gz``: the reconstruction, with the input's affine, header (data type,
  units, orientation codes), shape and intensity scale;
- ``DIR/NAME_diff.nii.gz``: reconstruction minus input, in the same units and geometry.

A DICOM series is read as the volume ``series_<Series Number>.nii.gz``. With ``--format dicom``
each slice is written instead as an MR image of two derived DICOM series,
``NAME_recon_slice_<k>.dcm`` and ``NAME_diff_slice_<k>.dcm``: in the original's study and frame
of reference when the input is DICOM (only the attributes :data:`mrivq.data.dicom.KEPT_ATTRIBUTES`
lists are carried over, never private tags), else in a new study.

All inputs are read and checked before anything is written; every file is written atomically.

Example::

    >>> reconstruct("runs/default/models/best.pt", ["case_004_week_0.nii.gz"], "recon/")
    [{'input': 'case_004_week_0.nii.gz', 'reconstruction': 'recon/case_004_week_0_recon.nii.gz', ...}]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from mrivq.apps import flags
from mrivq.data.dicom import DerivedSeries, instance_bytes, kept_attributes
from mrivq.data.io import as_stored, nifti_bytes, nifti_image, nifti_stem
from mrivq.data.preprocess import clip_to_input_range, denormalize, normalize
from mrivq.data.scans import scan_inputs
from mrivq.engine.checkpoint import checkpoint_config, load_checkpoint, model_from_checkpoint
from mrivq.errors import UserError
from mrivq.run_dir import atomic_write, claim_outputs
from mrivq.runtime import resolve_device

log = logging.getLogger("mrivq")

BATCH_SIZE = 16  # slices per forward pass unless told otherwise


@torch.inference_mode()
def _reconstruct_slices(model: torch.nn.Module, slices: np.ndarray, *, normalize_policy: str,
                        percentiles: tuple[float, float], device: torch.device,
                        batch_size: int) -> np.ndarray:
    """Raw ``(S, H, W)`` slices -> reconstructions ``(S, H, W)`` in the same scanner units.

    The model runs in float32 (as ``mrivq encode`` and every score do), so a reconstruction
    does not depend on the machine's bfloat16 support."""
    normalised, params = zip(*(normalize(s, normalize_policy, percentiles) for s in slices))
    normalised, params = np.stack(normalised), np.stack(params)
    out = np.empty_like(normalised)
    for lo in range(0, len(normalised), batch_size):
        x = torch.from_numpy(normalised[lo:lo + batch_size]).unsqueeze(1).to(device)
        rec = model(x).reconstruction.float()[:, 0].cpu().numpy()
        out[lo:lo + batch_size] = clip_to_input_range(rec, normalize_policy)
    return denormalize(out, params)


def _nifti_bytes(data: np.ndarray, meta, name: str, description: str) -> bytes:
    """The input's header and affine with new data; same data type (integer types get a slope). A
    DICOM series' volume gets a new float32 header."""
    if not isinstance(meta.header, nib.Nifti1Header):  # a DICOM series (NIfTI-2's header is a subclass)
        image = nifti_image(data.astype(np.float32), meta.affine)
        image.header["descrip"] = description.encode()[:79]
        return nifti_bytes(image, gz=name.lower().endswith(".gz"))
    header = meta.header.copy()
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data.astype(np.float32), meta.affine, header=header)
    image.header.set_data_dtype(meta.header.get_data_dtype())
    image.header["descrip"] = description.encode()[:79]
    return nifti_bytes(image, gz=name.lower().endswith(".gz"))


def _outputs(name: str, out_dir: Path, slices: int | None = None) -> dict[str, list[Path]]:
    """The reconstruction and difference files of an input named ``name``, with its suffix (.nii or
    .nii.gz); ``slices``: as that many DICOM files each."""
    stem = nifti_stem(name)
    if slices is not None:
        return {kind: [out_dir / f"{stem}_{short}_slice_{k}.dcm" for k in range(slices)]
                for kind, short in (("reconstruction", "recon"), ("difference", "diff"))}
    suffix = name[len(stem):] or ".nii.gz"
    return {"reconstruction": [out_dir / f"{stem}_recon{suffix}"], "difference": [out_dir / f"{stem}_diff{suffix}"]}


def _dicom_series(scan, kind: str, number: int, study: str | None) -> DerivedSeries:
    kept = kept_attributes(scan.dicom) if scan.dicom is not None else {}
    what = "reconstruction" if kind == "reconstruction" else "reconstruction minus input"
    return DerivedSeries.new(kept=kept, description=f"mrivq {kind} of {nifti_stem(scan.name)}",
                             derivation=f"mrivq: VQ-VAE-2 {what} of {nifti_stem(scan.name)}", lossy=True, ratio=None,
                             number=number, study_uid=study)


def reconstruct(checkpoint: str | Path, inputs: list[str | Path], out_dir: str | Path, *,
                device: str = "auto", batch_size: int = BATCH_SIZE, overwrite: bool = False,
                format: str = "nifti") -> list[dict]:
    """Reconstruct NIfTI slices or volumes or DICOM series with a trained model; see the module docstring.

    ``overwrite``: replace the outputs of an earlier run in ``out_dir`` (never other files).
    ``format``: ``"nifti"``, or ``"dicom"`` (each slice a file of a derived DICOM series).

    Returns one dict per input: ``input``, ``reconstruction``, ``difference`` (paths),
    ``slices`` and ``mae`` (mean absolute difference in the input's units).
    """
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if format not in ("nifti", "dicom"):
        raise UserError(f"--format {format}: give nifti or dicom")
    scans = scan_inputs(inputs)
    out_dir = Path(out_dir).expanduser()
    ckpt_path = Path(checkpoint).expanduser()
    ckpt = load_checkpoint(ckpt_path)
    trained = checkpoint_config(ckpt, ckpt_path)
    loaded = [(scan, *scan.read()) for scan in scans]  # every input checked before any write
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; use --device auto or cpu")
    torch_device = resolve_device(device)
    model = model_from_checkpoint(ckpt, ckpt_path).to(torch_device).eval()
    dicom = format == "dicom"
    outputs = [_outputs(scan.name, out_dir, len(slices) if dicom else None) for scan, slices, *_ in loaded]
    targets = [target for each in outputs for paths in each.values() for target in paths]
    claim_outputs(out_dir, "reconstruct", targets, overwrite=overwrite, inputs=[ckpt_path, *(s.path for s in scans)])
    written, study = [], None
    for (scan, slices, meta, is_volume, affines), paths in zip(loaded, outputs):
        recon = _reconstruct_slices(model, slices, normalize_policy=trained.data.normalize,
                                    percentiles=tuple(trained.data.percentiles), device=torch_device,
                                    batch_size=batch_size)
        for number, (kind, data) in enumerate((("reconstruction", recon), ("difference", recon - slices))):
            if dicom:
                series = _dicom_series(scan, kind, 2000 + 2 * len(written) + number, study)
                study = series.study_uid
                integer = np.dtype(meta.dtype).kind in "ui"
                for k, target in enumerate(paths[kind]):
                    blob = instance_bytes(data[k], affines[k], series, k, integer=integer, signed=True)
                    atomic_write(target, lambda fh, blob=blob: fh.write(blob), listed=False)
                continue
            blob = _nifti_bytes(as_stored(data, meta.shape, is_volume), meta, paths[kind][0].name,
                                f"mrivq {kind} of {scan.name}")
            atomic_write(paths[kind][0], lambda fh, blob=blob: fh.write(blob), listed=False)
        mae = float(np.abs(recon - slices).mean())
        log.info("%s: %d slice(s) -> %s (mean |difference| %.4g)", scan.path, len(slices),
                 paths["reconstruction"][0], mae)
        written.append({"input": str(scan.path), **{k: str(v[0]).replace("_slice_0.dcm", "_slice_*.dcm")
                                                    for k, v in paths.items()},
                        "slices": len(slices), "mae": mae})
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="the model (e.g. runs/default/models/best.pt)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="NIfTI slices or 3-D volumes, DICOM series (folders, DICOMDIR, files), or folders of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for NAME_recon.nii.gz and NAME_diff.nii.gz")
    parser.add_argument("--format", choices=("nifti", "dicom"), default="nifti",
                        help="nifti (default), or dicom: NAME_recon_slice_<k>.dcm and NAME_diff_slice_<k>.dcm, two "
                             "derived series (in the original study for a DICOM input)")
    flags.add_device(parser)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="slices per forward pass (default %(default)s)")
    flags.add_overwrite(parser)


def main(args) -> int:
    for item in reconstruct(args.checkpoint, args.inputs, args.out, device=args.device, batch_size=args.batch_size,
                            overwrite=args.overwrite, format=args.format):
        print(f"{item['input']}: {item['reconstruction']}, {item['difference']}")
    return 0
