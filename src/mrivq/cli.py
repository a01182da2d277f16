"""``mrivq <command>``: argument parsing only; each command calls ``main(args)`` of its module in :mod:`mrivq.apps`.

Exit status: 0 on success, 2 for a usage, config or input error (one line on stderr, no
traceback), 130/143 when interrupted, 1 for anything unexpected (a bug: traceback kept).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mrivq.errors import TrainingInterrupted, UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (default: the built-in phantom setup)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the models run (default auto: CUDA when present)")


def _add_overwrite_outputs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace files an earlier mrivq command wrote in --out (never other files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrivq", description="Hierarchical VQ-VAE-2 for MRI slices.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a VQ-VAE-2 (default: on the built-in phantom set)")
    _add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from models/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in output.dir (only the files mrivq wrote for it) instead of refusing")

    p = sub.add_parser("predict", help="score a trained model on the test split")
    _add_config_args(p)
    p.add_argument("--checkpoint", metavar="FILE", help="checkpoint to load (default: output.dir/models/best.pt)")
    p.add_argument("--prior", metavar="FILE", help="also code the test codes under this prior "
                   "(models/prior_best.pt of the same model) and compare codecs at that rate")

    p = sub.add_parser("bench", help="training/prediction throughput and loading time (reports only)")
    _add_config_args(p)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--image-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per figure (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--no-load", action="store_true",
                   help="skip timing the HipMRI-size phantom load (generated once, ~1-2 min)")
    p.add_argument("--json", action="store_true", help='one JSON object per line: {"figure", "value", "unit"}')

    p = sub.add_parser("synth", help="write a synthetic HipMRI-layout pelvis phantom dataset")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--cases", type=int, default=16, help="number of case volumes (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slices", type=int, default=60, help="slices per volume (default 60)")
    p.add_argument("--hipmri-counts", action="store_true",
                   help="reproduce HipMRI's 11,460 / 660 / 540 slices (ignores --cases)")

    p = sub.add_parser("reconstruct", help="NIfTI slices or volumes -> reconstructions and difference maps (NIfTI)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="the model (e.g. runs/default/models/best.pt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI slices or 3-D volumes, or folders of them")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for NAME_recon.nii.gz and NAME_diff.nii.gz")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass (default 16)")
    _add_overwrite_outputs_arg(p)

    p = sub.add_parser("report", help="(re)write RUN_DIR/report.html, a self-contained page of the run")
    p.add_argument("run_dir", metavar="RUN_DIR")

    p = sub.add_parser("encode", help="slices (NIfTI files or folders) to a codes file; prints bits per pixel")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="the VQ-VAE (e.g. runs/default/models/best.pt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="NIfTI slices or folders of them")
    p.add_argument("--out", required=True, metavar="CODES.mrvq")
    p.add_argument("--prior", metavar="FILE", help="range-code the codes under this trained prior "
                   "(models/prior_best.pt of the same VQ-VAE); decode then needs it too")
    p.add_argument("--surprise", metavar="DIR", help="with --prior: write each slice's bits-per-pixel map "
                   "under the prior (NIfTI on the slice's grid, <name>_bits.nii.gz) and surprise.png into DIR")
    p.add_argument("--json", action="store_true", help="print the bits report as JSON")
    _add_device_arg(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace maps an earlier mrivq command wrote in --surprise DIR (never other files)")

    p = sub.add_parser("decode", help="a codes file back to NIfTI slices in scanner intensities")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="the VQ-VAE that encoded the codes")
    p.add_argument("codes", metavar="CODES.mrvq")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--prior", metavar="FILE", help="the prior a prior-coded file was encoded with")
    _add_device_arg(p)
    _add_overwrite_outputs_arg(p)

    p = sub.add_parser("train-prior", help="fit the autoregressive prior over a VQ-VAE's codes")
    _add_config_args(p)
    p.add_argument("--checkpoint", metavar="FILE", help="the VQ-VAE (e.g. runs/default/models/best.pt)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the prior run in RUN_DIR from models/prior_last.pt")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where the VQ-VAE and the prior run (default: train.device, auto)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a prior run already in output.dir (only the files mrivq wrote for it)")

    p = sub.add_parser("sample", help="new slices from a trained prior: a PNG grid and NIfTI files")
    p.add_argument("--prior", required=True, metavar="FILE", help="models/prior_best.pt of `mrivq train-prior`")
    p.add_argument("--n", type=int, default=16, help="number of slices (default 16)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.8, metavar="P",
                   help="nucleus sampling: draw each code from the most probable codes that hold P of the "
                        "probability (default 0.8; 1: from all codes)")
    p.add_argument("--seed", type=int, default=0)
    _add_device_arg(p)
    _add_overwrite_outputs_arg(p)
    return parser


#: The module of :mod:`mrivq.apps` whose ``main(args)`` runs each command.
COMMANDS = {"train": "train", "predict": "predict", "bench": "bench", "synth": "synth",
            "reconstruct": "reconstruct", "report": "report", "encode": "encode", "decode": "decode",
            "train-prior": "train_prior", "sample": "sample"}


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    app = importlib.import_module(f"mrivq.apps.{COMMANDS[args.command]}")
    return app.main(args)


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """An error message as one line of at most ``limit`` characters, whatever a file put in it."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except UserError as exc:
        print(f"mrivq: error: {one_line(exc)}", file=sys.stderr)
        code = 2
    except OSError as exc:  # a folder or file the system refuses (permissions, a full disk)
        print(f"mrivq: error: {one_line(exc)}", file=sys.stderr)
        code = 2
    except (MemoryError, RuntimeError) as exc:  # a last guard: inputs are checked so that this is rare
        if not isinstance(exc, MemoryError) and "can't allocate memory" not in str(exc):
            raise
        print("mrivq: error: out of memory; the input is larger than this machine can hold", file=sys.stderr)
        code = 2
    except TrainingInterrupted as exc:
        print(f"mrivq: interrupted: {exc}", file=sys.stderr)
        code = exc.exit_status
    except KeyboardInterrupt:
        print("mrivq: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
