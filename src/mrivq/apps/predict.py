"""``mrivq predict``: score a trained model on the test split and write the predict outputs.

The story: the checkpoint and the config it trained with -> the test split (refused if it
shares slices with training) -> one float32 evaluation of every slice (with masks: region
scores; with codes kept: the entropy-coded rate) -> sample grids, the worst slices, codebook
use -> standard codecs at the model's rate and their rate-distortion curves -> summary.json,
per_slice.csv and report.html.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mrivq import metrics, strict_json
from mrivq.apps import flags
from mrivq.compression.codec import (
    Codec,
    CodecInput,
    Compressed,
    model_fingerprint,
    slices_to_batch,
)
from mrivq.compression.codecs import (
    CODEC_PROTOCOL,
    CODECS,
    LOSSLESS_PROTOCOL,
    LOSSY_AT_RATE_PROTOCOL,
    SEQUENCE_CODEC,
    SEQUENCE_LABEL,
    available_codecs,
    compare_codecs,
    compare_sequences,
    lossless_sizes,
    lossy_at_rate,
    parallel_map,
    rate_distortion,
    sequence_available,
)
from mrivq.compression.entropy import raw_bits_per_pixel
from mrivq.compression.layers import Stored
from mrivq.config import Config, load_config
from mrivq.data.cache import load_split
from mrivq.data.hipmri import STRUCTURES, load_masks
from mrivq.data.io import nifti_stem
from mrivq.data.preprocess import Preprocessing
from mrivq.data.sources import data_splits
from mrivq.data.splits import file_list_hash, parse_name, shared_with_training
from mrivq.data.volumes import volume_runs
from mrivq.engine.checkpoint import (
    checkpoint_config,
    load_checkpoint,
    load_prior,
    model_from_checkpoint,
    run_config,
)
from mrivq.engine.evaluator import Evaluation, evaluate
from mrivq.errors import UserError
from mrivq.logs import interactive, run_logger
from mrivq.reporting.html import write_report
from mrivq.reporting.plots import (
    plot_codebook_usage,
    plot_error_ladder,
    plot_rate_distortion,
    plot_surprise,
    save_difference_grid,
    save_sample_grid,
)
from mrivq.run_dir import atomic_write, recording
from mrivq.runtime import resolve_device, set_threads

log = logging.getLogger("mrivq")

SURPRISE_METHOD = (
    "-log2 of the prior's probability of each code given the codes before it (teacher-forced), spread "
    "evenly over the pixels the code covers (8 x 8 top, 4 x 4 bottom) and added; resampled to the "
    "slice's own grid as the reconstructions are")
RD_SLICES = 40  # test slices behind the codecs' rate-distortion curves
RATE_NAMES = {"raw": "raw code indices", "frequencies": "codes file, frequency-coded",
              "prior": "codes file, prior-coded"}
FILE_RATES = ("frequencies", "prior")  # the rates of files mrivq writes; encode writes the last one it has


def predict(config: Config, checkpoint: str | Path | None = None, prior: str | Path | None = None,
            max_errors: list[float] | None = None) -> dict:
    """Score a trained model on the test split and write the predict outputs of its run dir.

    The test split is the one the model was trained with: data settings and seed come from
    the checkpoint unless given explicitly (see :func:`mrivq.engine.checkpoint.run_config`), and a
    test split that shares slices or cases with the model's training split is refused.
    Outputs go to the checkpoint's run directory unless ``output.*`` is given. Scores are
    computed in float32 whatever precision trained the model. Writes logging/predict.log, samples/predict_set_{i}.png, samples/predict_worst.png,
    visuals/codebook_usage.png, visuals/rate_distortion.png, predict/summary.json,
    predict/per_slice.csv and updates report.html; returns the summary dict. Where the test
    slices have masks, the summary and the CSV hold SSIM, PSNR and MAE inside each structure of
    :data:`mrivq.data.hipmri.STRUCTURES`; the summary's ``codecs`` scores standard codecs at the
    model's bits per pixel, and ``rate_distortion`` puts the model (raw and entropy-coded
    rate) beside each codec's curve over its quality settings; ``max_errors``: :func:`_error_ladder`.
    """
    ckpt_path = Path(checkpoint or config.predict.checkpoint or config.model_dir / "best.pt").expanduser()
    ckpt = load_checkpoint(ckpt_path)
    trained = checkpoint_config(ckpt, ckpt_path)
    config, differs = run_config(config, trained, ckpt_path)
    set_threads(config.train.num_threads)
    device = resolve_device(config.train.device)
    splits = data_splits(config.data, config.seed)
    _refuse_training_slices(splits.test, ckpt, ckpt_path)
    with recording(config.run_dir, "predict"), run_logger(config.log_dir / "predict.log"):
        model, code_prior = _load_models(ckpt, ckpt_path, prior, device)
        training_precision = str(ckpt.get("precision", "unknown"))
        _log_setup(ckpt, ckpt_path, differs, device, training_precision)
        test, prep, masks, has_mask = _test_slices(config, splits.test)
        sets = _sample_sets(len(test.images), config)
        # Compute: every test slice scored once, in float32, and the pictures of it.
        result = evaluate(model, test.images, batch_size=config.predict.batch_size, device=device,
                          normalize=config.data.normalize, keep=sorted({i for s in sets for i in s}),
                          progress=interactive(), desc="predict",
                          masks=masks if has_mask.any() else None, keep_codes=True)
        worst = _save_pictures(config, model, test, result, masks, sets, device)
        # Rates: the model's, and standard codecs at them and over their quality settings.
        codec = Codec(model, prep, code_prior, prior_name=str(prior))
        slices = CodecInput.of_split(test)
        rates, files, packed = _model_rates(codec, result, slices, config.data.image_size, trained.model.n_embed)
        unit_images = metrics.unit_range_images(test.images, config.data.normalize)
        surprise = None
        if code_prior is not None:
            shown = sets[0] if sets else list(range(min(8, len(test.images))))  # predict.sample_sets may be 0
            surprise = _write_surprise(codec, result.codes, slices, test.files, unit_images, shown,
                                       config.run_dir / "predict" / "surprise", config.visual_dir / "surprise.png")
        comparison = _compare_codecs(unit_images, compared_rates(rates, config.predict.codec_rates),
                                     [Path(f).name for f in test.files])
        data = {"seed": config.seed, "normalize": config.data.normalize,
                "test_split_sha256": file_list_hash(splits.test), "settings_given_explicitly": differs}
        summary = summarize(result, rates, files, comparison, has_mask=has_mask, worst=worst, surprise=surprise,
                            checkpoint=ckpt_path, training_precision=training_precision, data=data,
                            skipped_files=[f for f, _ in test.skipped])
        if max_errors:
            summary["max_error"] = _error_ladder(codec, packed, test.files, max_errors, config.visual_dir)
        summary_path = _write_outputs(config, summary, rates, test.files, result)
        _log_results(summary, files, trained.model.n_embed)
        log.info("wrote %s", summary_path)
        log.info("wrote %s", write_report(config.run_dir))
    return summary


class CodecComparison(NamedTuple):
    """Standard codecs beside the model: their scores at each of the model's rates (by rate name),
    and their rate-distortion curves over ``curve_slices`` test slices."""

    tables: dict
    curves: dict
    curve_slices: int


def summarize(result: Evaluation, rates: dict, files: dict, comparison: CodecComparison, *, has_mask: np.ndarray,
              worst: list[dict], surprise: dict | None, checkpoint: Path, training_precision: str, data: dict,
              skipped_files: list[str]) -> dict:
    """predict/summary.json from what predict computed (no I/O): the scores, codebook use and rates
    of the model, the codecs beside it, and what it was run on.

    ``rates``: bits per pixel by rate name (``raw``, ``frequencies``, ``prior``); ``files``: the
    codes files' bits reports by coder; ``has_mask`` ``(N,)`` bool; ``worst``: the lowest-SSIM
    slices; ``surprise``: the prior's bits-per-pixel maps (None without a prior); ``data``: the
    seed, the normalisation, the test split's hash and the settings given explicitly.
    """
    ssim, psnr = metrics.summary_stats(result.ssim), metrics.summary_stats(result.psnr)
    prior_coded = {"bits_per_pixel_prior_coded": rates["prior"]} if "prior" in rates else {}
    return {
        "n_images": len(result.ssim),
        "ssim": ssim,
        "psnr": psnr,
        "mse": float(result.mse.double().mean()),
        "mae": float(result.mae.double().mean()),
        "codebook": result.usage(),
        "bits_per_pixel": rates["raw"],
        "bits_per_pixel_entropy_coded": rates["frequencies"],
        **prior_coded,
        "codes_file": files,
        "checkpoint": str(checkpoint),
        "protocol": metrics.SSIM_PROTOCOL,
        "precision": {"training": training_precision, "scoring": metrics.SCORING_PRECISION},
        "data": data,
        "images_per_s": result.images_per_s,
        "skipped_files": skipped_files,
        "regions": _region_summary(result, has_mask),
        "codecs": _codec_summary(result, rates, comparison.tables),
        "rate_distortion": {
            "model": {"bits_per_pixel_raw": rates["raw"], "bits_per_pixel_entropy_coded": rates["frequencies"],
                      **prior_coded, "ssim": ssim["mean"], "psnr": psnr["mean"]},
            "codecs": comparison.curves,
            "codec_slices": comparison.curve_slices,
        },
        "worst_slices": worst,
        **({"surprise": surprise} if surprise else {}),
    }


def _load_models(ckpt: dict, ckpt_path: Path, prior: str | Path | None, device: torch.device):
    """The VQ-VAE of ``ckpt`` on ``device`` in channels-last, and the prior at ``prior`` (or None)."""
    model = model_from_checkpoint(ckpt, ckpt_path).to(device).to(memory_format=torch.channels_last)
    code_prior = None
    if prior is not None:  # its codes file is coded on the CPU, as `mrivq encode --device cpu` does
        code_prior, _, _ = load_prior(prior, expect_fingerprint=model_fingerprint(model))
    return model, code_prior


def _log_setup(ckpt: dict, ckpt_path: Path, differs: list[str], device: torch.device, training_precision: str) -> None:
    """The checkpoint, the settings given explicitly, the device and both precisions."""
    log.info("checkpoint %s (step %s, validation SSIM %.4f)", ckpt_path, ckpt.get("step"),
             float(ckpt.get("best_ssim", float("nan"))))
    for setting in differs:
        log.warning("predict uses %s, given explicitly", setting)
    log.info("device %s; the model trained in %s, scores computed in %s", device, training_precision,
             metrics.SCORING_PRECISION)


def _test_slices(config: Config, files: list):
    """The test slices (preprocessed as the model was trained), the preprocessing, and the masks
    ``(N, H, W)`` with which slices have one ``(N,)``."""
    prep = Preprocessing.from_settings(config.data)
    test = load_split(files, prep, cache_dir=config.data.cache_dir,
                      on_bad_file=config.data.on_bad_file, workers=config.data.workers,
                      progress=interactive(), name="test")
    masks, has_mask = load_masks(test.files, test.original_shapes, prep)
    log.info("masks found for %d of %d test slices", int(has_mask.sum()), len(test.images))
    return test, prep, masks, has_mask


def _sample_sets(n: int, config: Config) -> list[list[int]]:
    """``predict.sample_sets`` seeded draws of ``predict.sample_size`` of the ``n`` test slices."""
    rng = np.random.default_rng(config.seed)
    per_set = min(config.predict.sample_size, n)
    return [sorted(rng.choice(n, size=per_set, replace=False).tolist()) for _ in range(config.predict.sample_sets)]


def _save_pictures(config: Config, model: torch.nn.Module, test, result: Evaluation, masks: np.ndarray,
                   sets: list[list[int]], device: torch.device) -> list[dict]:
    """samples/predict_set_{k}.png, samples/predict_worst.png and visuals/codebook_usage.png;
    returns the worst slices (see :func:`_save_worst_slices`)."""
    for k, chosen in enumerate(sets):
        save_sample_grid(np.stack([result.kept[i][0] for i in chosen]),
                         np.stack([result.kept[i][1] for i in chosen]),
                         config.sample_dir / f"predict_set_{k}.png",
                         title=f"test set {k}: inputs (top) and reconstructions (bottom)",
                         labels=[f"SSIM {float(result.ssim[i]):.3f}" for i in chosen])
    worst = _save_worst_slices(model, test, result, masks, device, config.data.normalize,
                               config.sample_dir / "predict_worst.png")
    plot_codebook_usage(result.counts_top, result.counts_bottom, config.visual_dir / "codebook_usage.png")
    return worst


def _model_rates(codec: Codec, result: Evaluation, slices: CodecInput, image_size,
                 n_embed: int) -> tuple[dict, dict, Compressed]:
    """The model's bits per pixel by rate name, the codes files' bits reports by coder, and the file
    `mrivq encode` would write (the last coder's: under the prior where that is smaller).

    ``raw``: fixed-width code indices. ``frequencies`` (and ``prior``, when the codec has one): the
    real rates, the size of the codes file `mrivq encode` would write for the test split, coded
    under the code frequencies (under the prior)."""
    top_shape, bottom_shape = result.code_shapes
    raw = raw_bits_per_pixel(tuple(image_size), top_shape, bottom_shape, n_embed, n_embed)
    files = _codes_files(codec, result.codes, slices)
    reports = {coder: packed.report() for coder, packed in files.items()}
    return {"raw": raw, **{coder: f["bits_per_pixel"]["file"] for coder, f in reports.items()}}, reports, \
        list(files.values())[-1]


def compared_rates(rates: dict, codec_rates: str) -> dict:
    """The model's rates (by name) the codecs are compared at, by ``predict.codec_rates``: ``written``,
    the rate of the file `mrivq encode` writes (the prior-coded one where there is a prior); ``files``,
    every codes file's. Never the raw rate of fixed-width indices, which no file has."""
    files = [name for name in FILE_RATES if name in rates]
    return {name: rates[name] for name in (files if codec_rates == "files" else files[-1:])}


def _compare_codecs(unit_images: np.ndarray, rates: dict, names: list[str]) -> CodecComparison:
    """Standard codecs on the test slices ``(N, H, W)`` on [0, 1]: at each of ``rates`` (by name),
    each slice on its own and each run of consecutive slices (by their ``names``) as an AVIF image
    sequence of the same total size; and over their quality settings on up to RD_SLICES slices."""
    n = len(unit_images)
    tables = {}
    runs = volume_runs(names)
    known = {}  # every file the searches wrote: the search at the next rate starts between them
    for rate_name, rate in rates.items():
        log.info("compressing the %d test slices with %s at %.3f bits per pixel (the model's %s rate)", n,
                 ", ".join(available_codecs()), rate, RATE_NAMES[rate_name])
        tables[rate_name] = compare_codecs(unit_images, rate, known=known)
        if sequence_available():
            log.info("and as AVIF image sequences of their %d runs of consecutive slices at the same total size",
                     len(runs))
            tables[rate_name].update(compare_sequences([unit_images[run] for run in runs],
                                                       rate * unit_images[0].size * n / 8, known=known))
    # The curves are a picture: up to RD_SLICES test slices, evenly spaced, keep it cheap
    # (every point scores its slices with SSIM, ~1.5 s per 120 slices on 2 CPU cores).
    rd_slices = np.linspace(0, n - 1, min(n, RD_SLICES)).round().astype(int)
    log.info("rate-distortion curves: %d test slices at each quality setting of each codec", len(rd_slices))
    curves = rate_distortion(unit_images[rd_slices])
    sequence = sorted((scores[SEQUENCE_CODEC] for scores in tables.values() if SEQUENCE_CODEC in scores),
                      key=lambda entry: entry["bits_per_pixel"]["mean"])
    if sequence:  # the AVIF sequence at the model's file rates, every test slice: its points on the picture
        curves[SEQUENCE_CODEC] = [{"setting": entry["setting"]["median"], "bits_per_pixel": entry["bits_per_pixel"]["mean"],
                                   "ssim": entry["ssim"]["mean"], "psnr": entry["psnr"]["mean"]} for entry in sequence]
    return CodecComparison(tables, curves, len(rd_slices))


def _error_ladder(codec: Codec, coded: Compressed, files: list, max_errors: list[float], visual_dir: Path) -> dict:
    """The summary's ``max_error``: the residual layer's files of the test slices at each maximum
    error (0: lossless), on top of ``coded`` (the codes file of the test split, as `mrivq encode`
    codes it), beside the lossless and near-lossless codecs on the same stored values, each
    decoded and checked voxel by voxel and scored under the SSIM protocol; drawn in
    visual_dir/max_error.png."""
    slices = CodecInput.read([Path(f) for f in files], codec.prep, originals=True)
    voxels = sum(stored.values.size for stored in slices.originals)
    lossy = np.linspace(0, len(files) - 1, min(len(files), RD_SLICES)).round().astype(int)
    lossy_files: dict = {}  # every file the lossy codecs' searches wrote, by slice: the next bound starts from them
    rows, first = [], None
    for delta in max_errors:
        log.info("the residual layer at maximum error %g on the %d test slices (%d voxels), and the lossless "
                 "codecs beside it", delta, len(files), voxels)
        options = {"residual": {"max_error": delta}}
        try:  # the codes are coded once; each bound adds its residual to the same stream
            packed = codec.with_layers(first or coded, slices, ("residual",), options)
        except UserError as e:
            log.warning("maximum error %g: %s", delta, e)
            rows.append({"max_error": delta, "refused": str(e)})
            continue
        first = first or packed
        rows.append(_ladder_row(codec, packed, slices, delta, voxels))
        rows[-1]["lossy"] = _lossy_at_rate(codec, slices.subset(lossy), rows[-1]["mrivq"]["bits_per_voxel"],
                                           [lossy_files.setdefault(int(i), {}) for i in lossy])
    plot_error_ladder(rows, visual_dir / "max_error.png")
    return {"method": LOSSLESS_PROTOCOL, "voxels": voxels, "rows": rows,
            "lossy": {"method": LOSSY_AT_RATE_PROTOCOL, "slices": len(lossy)}}


def _lossy_at_rate(codec: Codec, slices: CodecInput, bits_per_voxel: float, known: list[dict]) -> dict:
    """The lossy codecs of :func:`mrivq.compression.codecs.lossy_at_rate` on ``slices`` at the residual
    layer's rate: each one's bits per voxel, largest error over every voxel, SSIM and PSNR."""
    if not known:
        return {}
    first = lossy_at_rate(slices.originals[0].values, bits_per_voxel, known[0])  # the others start from it
    coded = [first, *parallel_map(lambda k: lossy_at_rate(slices.originals[k].values, bits_per_voxel, known[k],
                                                          like=known[0]), range(1, len(known)), desc="lossy codecs")]
    voxels = sum(stored.values.size for stored in slices.originals)
    out = {}
    for name in first:
        stored = [Stored(files[name][0], o.dtype, o.slope, o.inter) for files, o in zip(coded, slices.originals)]
        out[name] = {"bits_per_voxel": 8 * sum(files[name][1] for files in coded) / voxels,
                     **_fidelity(codec, slices, stored)}
    return out


def _ladder_row(codec: Codec, packed, slices: CodecInput, delta: float, voxels: int) -> dict:
    """One maximum error's row: the file's bits per voxel and its parts, its largest error over
    every voxel (checked against ``delta``), SSIM and PSNR, and the standard codecs' bits per voxel."""
    values = [stored.values for stored in slices.originals]
    fidelity = _fidelity(codec, slices, packed.decoded)
    if fidelity["largest_error"] > delta:
        raise RuntimeError(f"the residual layer decoded {fidelity['largest_error']} from the input, above {delta}")
    residual_bytes = sum(len(payload) for payload in packed.file.layers["residual"])
    standard = {}
    if delta == int(delta):
        sizes = parallel_map(lambda v: lossless_sizes(v, int(delta)), values, desc="lossless codecs")
        standard = {name: 8 * sum(s[name] for s in sizes) / voxels for name in sizes[0] if all(name in s for s in sizes)}
    return {"max_error": delta, "coder": packed.file.header["coder"],
            "mrivq": {"bits_per_voxel": 8 * len(packed.blob) / voxels,
                      "codes": 8 * (len(packed.blob) - residual_bytes) / voxels,
                      "residual": 8 * residual_bytes / voxels, **fidelity},
            "codecs": standard}


def _fidelity(codec: Codec, slices: CodecInput, stored: list[Stored]) -> dict:
    """``stored`` slices against ``slices``' stored values: the largest error over every voxel, the
    mean SSIM and PSNR (PSNR None where every slice is exact, and SSIM then 1 without scoring)."""
    error = float(np.max([np.abs(s.values - o.values).max() for s, o in zip(stored, slices.originals)]))  # NaN stays
    if error == 0:  # every slice exact: nothing to score
        return {"largest_error": 0.0, "ssim": 1.0, "psnr": None}
    ssim, psnr = (float(np.mean(v)) for v in codec.stored_scores(slices, stored))
    return {"largest_error": error, "ssim": ssim, "psnr": psnr if math.isfinite(psnr) else None}


def _write_outputs(config: Config, summary: dict, rates: dict, test_files: list[str], result: Evaluation) -> Path:
    """visuals/rate_distortion.png, predict/per_slice.csv and predict/summary.json; returns the
    summary's path."""
    model, curves = summary["rate_distortion"]["model"], summary["rate_distortion"]["codecs"]
    plot_rate_distortion(curves, [
        {"label": f"VQ-VAE-2, {RATE_NAMES[name]}", "bits_per_pixel": rate, "ssim": model["ssim"], "psnr": model["psnr"]}
        for name, rate in rates.items()
    ], config.visual_dir / "rate_distortion.png",
        {name: CODECS[name].label if name in CODECS else SEQUENCE_LABEL for name in curves})
    out_dir = config.run_dir / "predict"
    rows = _per_slice_csv(test_files, result)
    atomic_write(out_dir / "per_slice.csv", lambda fh: fh.write(rows.encode()))
    atomic_write(out_dir / "summary.json", lambda fh: fh.write(strict_json.dumps(summary, indent=2).encode()))
    return out_dir / "summary.json"


def _log_results(summary: dict, files: dict, n_embed: int) -> None:
    """The summary in the log: scores, codebook use, the codes files, regions, codecs."""
    ssim, psnr, codebook = summary["ssim"], summary["psnr"], summary["codebook"]
    log.info("test: %d slices, SSIM %.4f ± %.4f (p5 %.4f, min %.4f), PSNR %.2f dB, %.1f images/s",
             summary["n_images"], ssim["mean"], ssim["std"], ssim["p5"], ssim["min"], psnr["mean"],
             summary["images_per_s"])
    log.info("codebook use: top %d/%d (perplexity %.1f), bottom %d/%d (perplexity %.1f); "
             "%.3f bits per pixel", codebook["top"]["used"], n_embed, codebook["top"]["perplexity"],
             codebook["bottom"]["used"], n_embed, codebook["bottom"]["perplexity"], summary["bits_per_pixel"])
    for coder, report in files.items():
        log.info("codes file of the test split, range-coded under %s: %d bytes, %.3f bits per pixel "
                 "(checked to decode)", "the prior" if coder == "prior" else "the code frequencies",
                 report["file_bytes"], report["bits_per_pixel"]["file"])
    for name, region in (summary["regions"] or {}).get("structures", {}).items():
        log.info("%-10s (%3d slices): SSIM %.4f, PSNR %.2f dB, MAE %.4f", name, region["n_slices"],
                 region["ssim"]["mean"], region["psnr"]["mean"], region["mae"]["mean"])
    for table in summary["codecs"]["rates"]:
        for codec, scores in table["codecs"].items():
            log.info("%-9s at %.3f bpp (the model's %s rate): SSIM %.4f, PSNR %.2f dB (model: SSIM %.4f, "
                     "PSNR %.2f dB)", codec, scores["bits_per_pixel"]["mean"], table["rate"],
                     scores["ssim"]["mean"], scores["psnr"]["mean"], ssim["mean"], psnr["mean"])


def _write_surprise(codec: Codec, codes: tuple[np.ndarray, np.ndarray], slices: CodecInput, files: list,
                    images: np.ndarray, shown: list[int], folder: Path, picture: Path) -> dict:
    """``predict --prior``: each test slice's bits-per-pixel map under the prior as a NIfTI on the
    slice's own grid and affine (``FOLDER/<name>_bits.nii.gz``), and the slices ``shown`` with
    their maps as a picture."""
    maps = codec.surprise(codes, [source["name"] for source in slices.sources])
    for i, path in enumerate(files):
        blob = slices.as_nifti(i, maps[i], codec.prep.fit)
        atomic_write(folder / f"{nifti_stem(path)}_bits.nii.gz", lambda fh, blob=blob: fh.write(blob))
    plot_surprise(images[shown], maps[shown], picture, [f"{maps[i].mean():.3f} bpp" for i in shown])
    log.info("bits-per-pixel maps under the prior: %s (one NIfTI per test slice), %s", folder, picture)
    return {"bits_per_pixel_mean": float(maps.mean()), "maps": str(folder), "picture": str(picture),
            "method": SURPRISE_METHOD}


def _codes_files(codec: Codec, codes: tuple[np.ndarray, np.ndarray], slices: CodecInput) -> dict[str, Compressed]:
    """The codes file of these test codes, coded under the code frequencies and (when the codec has
    a prior) under the prior, each decoded again to check it; by coder."""
    coders = ("frequencies", "prior") if codec.prior is not None else ("frequencies",)
    return {coder: codec.compress_codes(codes, slices, under_prior=coder == "prior") for coder in coders}


def _refuse_training_slices(test_files: list, ckpt: dict, ckpt_path: Path) -> None:
    """A test split that shares slices or cases with the model's training split scores nothing
    honest: refuse it in one line."""
    if "splits" not in ckpt:
        log.warning("%s records no training split (written by an older mrivq): cannot check that "
                    "the test slices were not trained on", ckpt_path)
        return
    slices, cases = shared_with_training(test_files, ckpt["splits"])
    if slices or cases:
        raise UserError(f"the test split shares {slices} slice(s) and {cases} case(s) with the training "
                        f"split of {ckpt_path}; predict with the data and seed it was trained with "
                        "(drop the data.* and seed settings) or give test slices of other cases")


def _region_summary(result: Evaluation, has_mask: np.ndarray) -> dict | None:
    """Per-structure stats over the slices that contain the structure; None without masks."""
    if not result.regions:
        return None
    structures = {}
    for name, values in result.regions.items():
        present = torch.isfinite(values["mae"])
        structures[name] = {"labels": list(STRUCTURES[name]), "n_slices": int(present.sum()),
                            **{key: metrics.summary_stats(v[present]) for key, v in values.items()}}
    return {"n_slices_with_mask": int(has_mask.sum()), "definition": metrics.REGION_PROTOCOL,
            "structures": structures}


def _codec_summary(result: Evaluation, rates: dict, tables: dict) -> dict:
    """Standard codecs beside the model at the rates they were compared at (``predict.codec_rates``);
    ``bits_per_pixel`` and ``codecs`` repeat the first table (where summaries before predict compared
    at file rates only had the raw rate's)."""
    def table(scores: dict) -> dict:
        return {codec: {k: v for k, v in s.items() if k != "per_slice"} for codec, s in scores.items()}

    first = next(iter(tables))
    return {
        "bits_per_pixel": rates[first],
        "method": CODEC_PROTOCOL,
        "model": {"bits_per_pixel": rates[first], "ssim": metrics.summary_stats(result.ssim),
                  "psnr": metrics.summary_stats(result.psnr)},
        "codecs": table(tables[first]),
        "rates": [{"rate": RATE_NAMES[name], "coder": name, "bits_per_pixel": rates[name], "codecs": table(scores)}
                  for name, scores in tables.items()],
    }


def _per_slice_csv(files: list[str], result: Evaluation) -> str:
    """per_slice.csv: whole-slice metrics, then ``<structure>_{ssim,psnr,mae}`` (blank if absent)."""
    def cell(value: torch.Tensor, digits: int) -> str:
        value = float(value)
        return "" if math.isnan(value) else f"{value:.{digits}f}"

    rows = io.StringIO()
    writer = csv.writer(rows)
    region_columns = [(name, key) for name in result.regions for key in ("ssim", "psnr", "mae")]
    writer.writerow(["file", "case", "ssim", "psnr", "mse", "mae",
                     *(f"{name}_{key}" for name, key in region_columns)])
    digits = {"ssim": 6, "psnr": 4, "mae": 6}
    for i, file in enumerate(files):
        writer.writerow([file, parse_name(file)[0], cell(result.ssim[i], 6), cell(result.psnr[i], 4),
                         f"{float(result.mse[i]):.8f}", cell(result.mae[i], 6),
                         *(cell(result.regions[name][key][i], digits[key]) for name, key in region_columns)])
    return rows.getvalue()


@torch.inference_mode()
def _save_worst_slices(model: torch.nn.Module, test, result: Evaluation, masks: np.ndarray,
                       device: torch.device, normalize: str, path: Path, count: int = 5) -> list[dict]:
    """samples/predict_worst.png: the ``count`` lowest-SSIM slices with difference maps."""
    order = torch.argsort(torch.nan_to_num(result.ssim, nan=-1.0))[:count].tolist()
    x = slices_to_batch(test.images[order], device)
    model.eval()
    rec, x = metrics.to_unit_range(model(x).reconstruction, x, normalize)
    inputs, recs = x[:, 0].cpu().numpy(), rec[:, 0].clamp(0, 1).cpu().numpy()
    names = [Path(test.files[i]).name for i in order]
    save_difference_grid(inputs, recs, path, masks=masks[order] if masks is not None else None,
                         title="five lowest-SSIM test slices: input, reconstruction, "
                               "difference (reconstruction - input)",
                         labels=[f"{name}\nSSIM {float(result.ssim[i]):.3f}" for name, i in zip(names, order)])
    return [{"file": test.files[i], "ssim": float(result.ssim[i]), "psnr": float(result.psnr[i])}
            for i in order]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_config(parser)
    parser.add_argument("--checkpoint", metavar="FILE", help="checkpoint to load (default: output.dir/models/best.pt)")
    parser.add_argument("--prior", metavar="FILE", help="also code the test codes under this prior "
                        "(models/prior_best.pt of the same model) and compare codecs at that rate")
    parser.add_argument("--max-error", nargs="*", type=float, metavar="DELTA",
                        help="also the lossless and bounded-error files (encode --max-error) at each DELTA "
                             "(default 0 1 2 4) beside JPEG-LS, JPEG XL, JPEG 2000, HTJ2K and PNG")


def main(args) -> int:
    max_errors = None if args.max_error is None else (args.max_error or [0, 1, 2, 4])
    if max_errors and not all(math.isfinite(d) and d >= 0 for d in max_errors):
        raise UserError(f"--max-error {' '.join(map(str, args.max_error))}: give maximum errors of 0 or more")
    predict(load_config(args.config, args.overrides), checkpoint=args.checkpoint, prior=args.prior,
            max_errors=max_errors)
    return 0
