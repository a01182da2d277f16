"""``report.html``: one self-contained page that shows a run (``mrivq report RUN_DIR``).

It gathers what training and prediction left in the run directory, with every picture
embedded as a base64 PNG so the file can be mailed or archived alone: the config, training
curves, the validation table (metrics.csv), the test metrics, per-structure metrics, the
codec comparison and the rate-distortion picture, sample grids, the five lowest-SSIM test slices with difference maps and
the codebook-usage histograms. Parts not written yet (no ``mrivq predict`` so far) are named
as missing. The page's script only counts the images that decoded, into
``<html data-images-rendered="ok/total">``, so a test in a real browser can check them.

Example::

    >>> write_report("runs/default")
    PosixPath('runs/default/report.html')
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from pathlib import Path

import yaml

from mrivq.errors import UserError
from mrivq.run_dir import atomic_write, read_metrics, run_config_path

REPORT_NAME = "report.html"

# metrics.csv columns shown in the validation table, in this order, when present.
_VALIDATION_COLUMNS = [
    ("epoch", "epoch", "{:.0f}"), ("step", "step", "{:.0f}"), ("lr", "lr", "{:.2e}"),
    ("train_loss", "train loss", "{:.4f}"), ("val_loss", "val loss", "{:.4f}"),
    ("val_recon_loss", "val MSE", "{:.5f}"), ("val_ssim", "val SSIM", "{:.4f}"),
    ("val_psnr", "val PSNR (dB)", "{:.2f}"), ("val_top_used", "top codes used", "{:.0f}"),
    ("val_bottom_used", "bottom codes used", "{:.0f}"), ("val_top_perplexity", "top perplexity", "{:.1f}"),
    ("val_bottom_perplexity", "bottom perplexity", "{:.1f}"),
]
_MAX_VALIDATION_ROWS = 40

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d232b; background: #fff; padding: 0 16px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px;
     border-bottom: 1px solid #d6dbe1; padding-bottom: 4px; }
.meta, .note { color: #5a6572; font-size: 13px; }
.missing { color: #a15c00; font-size: 13px; font-style: italic; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.card { border: 1px solid #d6dbe1; border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.card .value { font-size: 22px; font-weight: 600; } .card .label { font-size: 12px; color: #5a6572; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #d6dbe1; padding: 3px 8px; text-align: right; }
th { background: #f1f4f7; } td:first-child, th:first-child { text-align: left; }
tr.model td { font-weight: 600; background: #eef6ee; }
img { max-width: 100%; border: 1px solid #e3e7eb; margin: 6px 0; display: block; }
figure { margin: 10px 0; } figcaption { font-size: 12px; color: #5a6572; }
pre { background: #f6f8fa; padding: 10px; font-size: 12px; overflow-x: auto; border-radius: 4px; }
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) ok++; }
  document.documentElement.setAttribute('data-images-rendered', ok + '/' + images.length);
});
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from what the run directory holds; returns its path.

    Raises :class:`UserError` when ``run_dir`` is not a run directory (no config.yaml,
    metrics.csv or predict/summary.json). The page is replaced atomically.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise UserError(f"run directory {run_dir} {what}; give the output.dir of a run "
                        "(`mrivq train` writes one)")
    config_path = run_config_path(run_dir)
    config_text = _read_text(config_path) if config_path else None
    rows = read_metrics(run_dir / "metrics.csv")
    summary = _read_json(run_dir / "predict" / "summary.json")
    if config_text is None and not rows and summary is None:
        raise UserError(f"{run_dir} is not an mrivq run directory (no config.yaml, metrics.csv or "
                        "predict/summary.json); give the output.dir of a run")
    sample_dir, visual_dir = _picture_dirs(run_dir, config_text)
    page = _page(run_dir, config_text, rows, summary, sample_dir, visual_dir)
    path = run_dir / REPORT_NAME
    atomic_write(path, lambda fh: fh.write(page.encode("utf-8")))
    return path


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _read_json(path: Path) -> dict | None:
    text = _read_text(path)
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None


def _picture_dirs(run_dir: Path, config_text: str | None) -> tuple[Path, Path]:
    """samples/ and visuals/ of the run (the config may have moved them elsewhere)."""
    output = {}
    if config_text:
        try:
            output = (yaml.safe_load(config_text) or {}).get("output") or {}
        except yaml.YAMLError:
            output = {}
    sample_dir = Path(output["sample_dir"]) if output.get("sample_dir") else run_dir / "samples"
    visual_dir = Path(output["visual_dir"]) if output.get("visual_dir") else run_dir / "visuals"
    return sample_dir, visual_dir


def _image(path: Path, caption: str) -> str:
    try:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return f'<p class="missing">{html.escape(path.name)} not written yet.</p>'
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(value, spec: str = "{:.4f}") -> str:
    if value is None:
        return "–"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return html.escape(str(value))
    if math.isnan(value):
        return "–"
    if value in (float("inf"), float("-inf")):
        return "∞" if value > 0 else "-∞"
    return spec.format(value)


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and i < len(row_classes) else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def _section_cards(summary: dict | None, rows: list[dict]) -> str:
    cards = []
    if summary:
        cards += [("test SSIM", _fmt(summary["ssim"]["mean"])), ("test PSNR", _fmt(summary["psnr"]["mean"], "{:.2f} dB")),
                  ("bits per pixel", _fmt(summary.get("bits_per_pixel"), "{:.3f}"))]
        prostate = ((summary.get("regions") or {}).get("structures") or {}).get("prostate")
        if prostate:
            cards.append(("prostate SSIM", _fmt(prostate["ssim"]["mean"])))
        cards.append(("test slices", str(summary.get("n_images", "–"))))
    if rows:
        best = max((r for r in rows if "val_ssim" in r), key=lambda r: r["val_ssim"], default=None)
        if best:
            cards.append(("best val SSIM", f"{_fmt(best['val_ssim'])} (step {best.get('step', 0):.0f})"))
        cards.append(("steps", _fmt(rows[-1].get("step"), "{:.0f}")))
    if not cards:
        return ""
    inner = "".join(f'<div class="card"><div class="value">{v}</div><div class="label">{html.escape(k)}</div></div>'
                    for k, v in cards)
    return f'<div class="cards">{inner}</div>'


def _section_test(summary: dict | None) -> str:
    if not summary:
        return _missing("No test results yet: run `mrivq predict` to score the test split.")
    rows = []
    for key, label, spec in (("ssim", "SSIM", "{:.4f}"), ("psnr", "PSNR (dB)", "{:.2f}")):
        stats = summary.get(key) or {}
        rows.append([label, *(_fmt(stats.get(s), spec) for s in ("mean", "std", "p5", "min"))])
    extra = (f"MSE {_fmt(summary.get('mse'), '{:.6f}')}, MAE {_fmt(summary.get('mae'), '{:.5f}')} "
             f"over {summary.get('n_images')} slices; checkpoint {html.escape(str(summary.get('checkpoint')))}.")
    precision = summary.get("precision") or {}
    if precision:
        extra += (f" Trained in {html.escape(str(precision.get('training')))}, scored in "
                  f"{html.escape(str(precision.get('scoring')))}.")
    codebook = summary.get("codebook") or {}
    usage = "; ".join(f"{level}: {c.get('used')}/{c.get('size')} codes used, perplexity {_fmt(c.get('perplexity'), '{:.1f}')}"
                      for level, c in codebook.items())
    return (_table(["whole slice", "mean", "std", "p5", "min"], rows)
            + f'<p class="note">{extra}<br>Codebook use: {html.escape(usage)}.<br>'
            f'Protocol: {html.escape(str(summary.get("protocol", "")))}</p>')


def _section_regions(summary: dict | None) -> str:
    if not summary:
        return _missing("No test results yet: run `mrivq predict`.")
    regions = summary.get("regions")
    if not regions:
        return _missing("The test slices have no masks (keras_slices_seg_*), so there are no per-structure metrics.")
    rows = [["whole slice", "all", str(summary.get("n_images")), _fmt(summary["ssim"]["mean"]),
             _fmt(summary["ssim"]["p5"]), _fmt(summary["psnr"]["mean"], "{:.2f}"), _fmt(summary.get("mae"), "{:.5f}")]]
    for name, region in regions["structures"].items():
        rows.append([html.escape(name), ", ".join(str(label) for label in region["labels"]), str(region["n_slices"]),
                     _fmt(region["ssim"]["mean"]), _fmt(region["ssim"]["p5"]),
                     _fmt(region["psnr"]["mean"], "{:.2f}"), _fmt(region["mae"]["mean"], "{:.5f}")])
    return (_table(["structure", "labels", "slices", "SSIM mean", "SSIM p5", "PSNR (dB)", "MAE"], rows)
            + f'<p class="note">{regions.get("n_slices_with_mask")} of {summary.get("n_images")} test slices have a '
            f'mask. {html.escape(str(regions.get("definition", "")))}</p>')


def _section_codecs(summary: dict | None) -> str:
    codecs = (summary or {}).get("codecs")
    if not codecs:
        return _missing("No codec comparison yet: run `mrivq predict`.")
    model = codecs["model"]
    tables = codecs.get("rates") or [{"rate": "raw code indices", "bits_per_pixel": codecs["bits_per_pixel"],
                                      "codecs": codecs["codecs"]}]
    out = []
    for table in tables:
        rows = [[f"VQ-VAE-2 codes (this model), {html.escape(table['rate'])}", _fmt(table["bits_per_pixel"], "{:.3f}"),
                 "", _fmt(model["ssim"]["mean"]), _fmt(model["ssim"]["p5"]), _fmt(model["psnr"]["mean"], "{:.2f}")]]
        for name, scores in table["codecs"].items():
            setting = scores["setting"]
            rows.append([html.escape(name.upper().replace("JPEG2000", "JPEG 2000").replace("_", " ")),
                         _fmt(scores["bits_per_pixel"]["mean"], "{:.3f}"),
                         f"median {html.escape(setting['name'])} {_fmt(setting['median'], '{:.3g}')}",
                         _fmt(scores["ssim"]["mean"]), _fmt(scores["ssim"]["p5"]), _fmt(scores["psnr"]["mean"], "{:.2f}")])
        out.append(_table(["method", "bits per pixel", "setting", "SSIM mean", "SSIM p5", "PSNR (dB)"], rows,
                          ["model"]))
    return "".join(out) + (f'<p class="note">At the rate of the model\'s file: the size of the codes file '
                           "<code>mrivq encode</code> writes (every header and table counted, checked to "
                           "decode), under the prior where predict was given one, else under the code "
                           "frequencies (<code>predict.codec_rates: files</code>: both). "
                           f"{html.escape(str(codecs.get('method', '')))}</p>")


def _section_rate_distortion(summary: dict | None, visual_dir: Path) -> str:
    rate_distortion = (summary or {}).get("rate_distortion")
    if not rate_distortion:
        return _missing("No rate-distortion curves yet: run `mrivq predict`.")
    model = rate_distortion["model"]
    rates = [("raw code indices (log2 of the codebook size per code)", model["bits_per_pixel_raw"]),
             ("codes file, range-coded under the code frequencies", model["bits_per_pixel_entropy_coded"])]
    if "bits_per_pixel_prior_coded" in model:
        rates.append(("codes file, range-coded under the prior", model["bits_per_pixel_prior_coded"]))
    rows = [[html.escape(label), _fmt(rate, "{:.3f}"), _fmt(model["ssim"]), _fmt(model["psnr"], "{:.2f}")]
            for label, rate in rates]
    return (_image(visual_dir / "rate_distortion.png",
                   "SSIM and PSNR against bits per pixel: each codec over its quality settings (a line), "
                   "the model at each of its rates (single markers)")
            + _table(["VQ-VAE-2 codes (this model)", "bits per pixel", "SSIM mean", "PSNR (dB)"], rows)
            + '<p class="note">A codec\'s rate counts every file with its headers; so does a codes file\'s '
              "(names, affines, normalisation and frequency tables included). "
              "Points whose mean PSNR is infinite (a slice kept perfectly) are not drawn.</p>")


def _section_max_error(summary: dict, visual_dir: Path) -> str:
    ladder = summary["max_error"]
    rows = []
    for row in ladder["rows"]:
        if "refused" in row:
            rows.append([_fmt(row["max_error"], "{:g}"), "refused: " + html.escape(row["refused"]), "", "", "", "", ""])
            continue
        ours = row["mrivq"]
        others = ", ".join(f"{html.escape(name)} {rate:.3f}" for name, rate in row["codecs"].items())
        lossy = ", ".join(f"{html.escape(name)} {entry['largest_error']:g} (SSIM {_fmt(entry['ssim'])})"
                          for name, entry in row.get("lossy", {}).items())
        rows.append([_fmt(row["max_error"], "{:g}"), _fmt(ours["bits_per_voxel"], "{:.3f}"),
                     f"{ours['codes']:.3f} / {ours['residual']:.3f}", _fmt(ours["ssim"]),
                     _fmt(ours["psnr"], "{:.2f}") if ours["psnr"] is not None else "exact", others, lossy])
    lossy_note = ladder.get("lossy", {})
    return (_image(visual_dir / "max_error.png", "bits per voxel against the maximum error per voxel")
            + _table(["maximum error", "mrivq bits per voxel", "codes / residual", "SSIM", "PSNR (dB)",
                      "other codecs, bits per voxel", "lossy codecs at this rate: largest error"], rows)
            + f'<p class="note">{html.escape(ladder["method"])}.'
            + (f' Lossy codecs, on {lossy_note.get("slices")} evenly spaced test slices: '
               f'{html.escape(str(lossy_note.get("method", "")))}.' if lossy_note else "") + "</p>")


def _section_validation(rows: list[dict]) -> str:
    if not rows:
        return _missing("No metrics.csv yet: training writes one row per evaluation.")
    columns = [c for c in _VALIDATION_COLUMNS if any(c[0] in r for r in rows)]
    shown = rows[-_MAX_VALIDATION_ROWS:]
    body = [[_fmt(r.get(key), spec) for key, _, spec in columns] for r in shown]
    note = (f'<p class="note">Last {len(shown)} of {len(rows)} evaluations.</p>'
            if len(rows) > len(shown) else "")
    return _table([label for _, label, _ in columns], body) + note


def _epoch_number(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else -1


def _page(run_dir: Path, config_text: str | None, rows: list[dict], summary: dict | None,
          sample_dir: Path, visual_dir: Path) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>mrivq run report: {html.escape(run_dir.name)}</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>mrivq run report: {html.escape(run_dir.name)}</h1>",
        (f'<p class="meta">{html.escape(str(run_dir.resolve()))} · written '
         f'{time.strftime("%Y-%m-%d %H:%M:%S %Z")}</p>'),
        _section_cards(summary, rows),
        "<h2>Test set</h2>", _section_test(summary),
        "<h2>Per-structure metrics (test set)</h2>", _section_regions(summary),
        "<h2>Against standard codecs at the same bits per pixel</h2>", _section_codecs(summary),
        "<h2>Rate–distortion</h2>", _section_rate_distortion(summary, visual_dir),
        *(["<h2>Lossless and bounded-error files</h2>", _section_max_error(summary, visual_dir)]
          if (summary or {}).get("max_error") else []),
        "<h2>Training curves</h2>",
        _image(visual_dir / "losses.png", "training and validation losses"),
        _image(visual_dir / "ssims.png", "training and validation SSIM"),
        "<h2>Validation</h2>", _section_validation(rows),
        "<h2>Lowest-SSIM test slices</h2>",
    ]
    if summary and summary.get("worst_slices"):
        parts.append(_image(sample_dir / "predict_worst.png",
                            "the five lowest-SSIM test slices: input (structures outlined), reconstruction, "
                            "difference (red: reconstruction brighter, blue: darker)"))
        parts.append(_table(["file", "SSIM", "PSNR (dB)"],
                            [[html.escape(Path(w["file"]).name), _fmt(w["ssim"]), _fmt(w["psnr"], "{:.2f}")]
                             for w in summary["worst_slices"]]))
    else:
        parts.append(_missing("Not yet: run `mrivq predict`."))
    parts.append("<h2>Codebook usage (test set)</h2>")
    parts.append(_image(visual_dir / "codebook_usage.png", "uses of each code on the test set, per level")
                 if (visual_dir / "codebook_usage.png").is_file() else _missing("Not yet: run `mrivq predict`."))
    parts.append("<h2>Sample grids</h2>")
    predict_sets = sorted(sample_dir.glob("predict_set_*.png"), key=_epoch_number)
    epochs = sorted(sample_dir.glob("epoch_*.png"), key=_epoch_number)[-3:]
    for path in predict_sets:
        parts.append(_image(path, f"test {path.stem.replace('predict_set_', 'set ')}: inputs over reconstructions"))
    for path in epochs:
        parts.append(_image(path, f"validation, {path.stem.replace('_', ' ')}: inputs over reconstructions"))
    if not predict_sets and not epochs:
        parts.append(_missing("No sample grids yet."))
    parts.append("<h2>Config</h2>")
    parts.append(f"<pre>{html.escape(config_text)}</pre>" if config_text else _missing("No config.yaml."))
    parts.append("</body></html>")
    return "\n".join(parts)
