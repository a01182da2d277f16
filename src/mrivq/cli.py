"""``mrivq <command>``: argument parsing only; each command is a module in :mod:`mrivq.apps` that adds its
flags (``add_arguments(parser)``) and runs (``main(args)``).

Exit status: 0 on success, 2 for a usage, config or input error (one line on stderr, no
traceback), 130/143 when interrupted, 1 for anything unexpected (a bug: traceback kept).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys

from mrivq.errors import TrainingInterrupted, UserError

#: Each command: the module of :mod:`mrivq.apps` whose ``add_arguments(parser)`` defines its
#: flags and whose ``main(args)`` runs it, and its line in ``mrivq --help``. A command imports
#: only its own module (what it needs of torch and the rest comes with it).
COMMANDS = {
    "train": ("train", "train a VQ-VAE-2 (default: on the built-in phantom set)"),
    "predict": ("predict", "score a trained model on the test split"),
    "bench": ("bench", "training/prediction throughput and loading time (reports only)"),
    "synth": ("synth", "write a synthetic HipMRI-layout pelvis phantom dataset"),
    "reconstruct": ("reconstruct", "NIfTI slices or volumes -> reconstructions and difference maps (NIfTI)"),
    "report": ("report", "(re)write RUN_DIR/report.html, a self-contained page of the run"),
    "encode": ("encode", "slices or volumes (NIfTI files or folders) to a codes file; prints bits per pixel"),
    "decode": ("decode", "a codes file back to NIfTI slices in scanner intensities"),
    "train-prior": ("train_prior", "fit the autoregressive prior over a VQ-VAE's codes"),
    "sample": ("sample", "new slices from a trained prior: a PNG grid and NIfTI files"),
}


def app(command: str):
    """The module of :mod:`mrivq.apps` that runs ``command``."""
    return importlib.import_module(f"mrivq.apps.{COMMANDS[command][0]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only`` (a command), the flags of that command alone, so
    running one command does not import the others."""
    parser = argparse.ArgumentParser(prog="mrivq", description="Hierarchical VQ-VAE-2 for MRI slices.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        sub = commands.add_parser(name, help=summary)
        if only is None or name == only:
            app(name).add_arguments(sub)
    return parser


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the command is the first word (mrivq itself has no options but --help)
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    return app(args.command).main(args)


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
    if argv is None:
        # The process ends here: its last garbage collection would walk every object torch and the
        # models made (measured 0.35-0.5 s of every command); frozen, they are left to the exit.
        gc.freeze()
    sys.exit(code)
