"""The flags several commands share, each defined here once; a command's ``add_arguments(parser)``
adds its own flags and calls these."""

from __future__ import annotations

import argparse

#: Where ``--device`` may run the models (``auto``: CUDA when present).
DEVICES = ("auto", "cpu", "cuda")


def add_config(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (repeatable, into ``args.overrides``): the
    arguments of :func:`mrivq.config.load_config`."""
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: the built-in phantom setup)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")


def add_device(parser: argparse.ArgumentParser, *, default: str | None = "auto",
               help: str = "where the models run (default auto: CUDA when present)") -> None:
    """``--device``, one of :data:`DEVICES`."""
    parser.add_argument("--device", default=default, choices=DEVICES, help=help)


def add_overwrite(parser: argparse.ArgumentParser,
                  what: str = "files an earlier mrivq command wrote in --out (never other files)") -> None:
    """``--overwrite``: replace ``what`` (what the command wrote before, never a user's file)
    instead of refusing."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what}")
