"""The prior kinds: one entry each, everything mrivq does with a kind of prior in one place.

A prior over a VQ-VAE's codes is ``p(top) p(bottom | top)``. A kind (:class:`PriorKind`) names
its config section (``prior.<name>``, selected by ``prior.kind``), builds its float network
(:mod:`mrivq.nn`: trained, sampled), makes, checks and loads the integer copy that codes
(:mod:`mrivq.compression.portable`), and bounds the memory that copy needs. The copy's
``code_batch`` is its coding order, which :mod:`mrivq.compression.driver` runs. Adding a kind is
one :func:`register` call (``tests/test_registry.py`` registers one), as a standard codec is one
entry of :data:`mrivq.compression.codecs.CODECS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel

from mrivq.compression.portable.passes import (
    IntegerPassPrior,
    IntegerVolumePrior,
    pass_copy,
    pass_copy_problem,
)
from mrivq.compression.portable.rows import IntegerRowPrior, row_copy, row_copy_problem, row_memory
from mrivq.compression.portable.transformer import (
    IntegerTransformerPrior,
    transformer_copy,
    transformer_copy_problem,
)
from mrivq.config import (
    PassPriorSettings,
    PriorConfig,
    RowPriorSettings,
    TransformerPriorSettings,
    VolumePriorSettings,
    register_prior_section,
)
from mrivq.nn.pass_prior import NEAR, PassPrior, VolumePrior
from mrivq.nn.row_prior import RowPrior
from mrivq.nn.transformer_prior import TransformerPrior


@dataclass(frozen=True)
class PriorKind:
    """One kind of prior.

    ``build(settings, n_embed, top_grid)``: the float network (``nll_bits``, ``sample``, ``fresh``);
    ``make_copy(prior, codes_top, codes_bottom)``: its integer copy, calibrated on training grids
    (``calibration_grids`` of them: the first ones, or ``spread`` over the training set);
    ``copy_problem(state, prior)``: what is wrong with a stored copy, or None;
    ``load_copy(state)``: a checked copy (``coding``, ``batch``, ``in_flight``, ``device``, ``to``,
    ``code_batch``, ``fingerprint``, ``state``); ``working_memory(settings, top_grid)``: what
    coding ``in_flight`` slices needs at most, ``(what, bytes)``; ``threads_draw``: whether
    sampling uses several CPU threads (a prior that draws one code at a time does not). A copy
    whose ``volumes`` is true codes each slice after the one before it in its volume
    (``code_batch(..., previous=...)``), its float prior's ``key_every`` slices a chain.
    """

    name: str
    label: str
    settings: type[BaseModel]
    build: Callable
    make_copy: Callable
    copy_problem: Callable
    load_copy: Callable
    working_memory: Callable
    calibration_grids: int = 32
    spread: bool = False
    threads_draw: bool = True


#: The kinds, by ``prior.kind``.
PRIORS: dict[str, PriorKind] = {}


def register(kind: PriorKind) -> PriorKind:
    """Add ``kind`` (and its config section ``prior.<name>``); returns it."""
    register_prior_section(kind.name, kind.settings)
    PRIORS[kind.name] = kind
    return kind


def build_prior(config: PriorConfig, n_embed: int, top_grid: tuple[int, int]) -> torch.nn.Module:
    """The float prior ``config.kind`` describes, over ``n_embed`` codes and a ``top_grid`` top grid."""
    kind = PRIORS[config.kind]
    prior = kind.build(config.settings, n_embed, tuple(top_grid))
    prior.kind = kind.name
    return prior


def kind_of(prior: torch.nn.Module) -> PriorKind:
    """The entry of a prior :func:`build_prior` made."""
    return PRIORS[prior.kind]


def make_copy(prior: torch.nn.Module, codes_top: torch.Tensor, codes_bottom: torch.Tensor):
    """The integer copy of ``prior``, calibrated on its kind's choice of the training grids
    ``codes_top`` ``(N, h, w)`` and ``codes_bottom`` ``(N, 2h, 2w)``."""
    kind = kind_of(prior)
    count = min(kind.calibration_grids, len(codes_top))
    grids = torch.linspace(0, len(codes_top) - 1, count).long() if kind.spread else slice(0, count)
    return kind.make_copy(prior, codes_top[grids], codes_bottom[grids])


def _pass_memory(settings: PassPriorSettings, top_grid) -> tuple[str, int]:
    """The int64 stream, the int8 columns and the products of ``in_flight`` slices, the wider
    head's int64 outputs and int8 activations (``head_channels``), and the neighbours' int64 table
    rows (``neighbour_codes``)."""
    per_position = settings.channels * 40 + settings.head_channels * 9 + 8 * len(NEAR) * settings.neighbour_codes
    return "working memory", 4 * math.prod(top_grid) * per_position * IntegerPassPrior.in_flight["encode"]


def _transformer_memory(settings: TransformerPriorSettings, top_grid) -> tuple[str, int]:
    """float64 keys and values: the encoder's for the top and the 4x longer bottom grid; the
    decoder's for the top and the bottom's window only."""
    cells = math.prod(top_grid)
    rows = settings.bottom_window_rows
    window = 4 * cells if rows is None else min(4 * cells, rows * 2 * top_grid[1])
    flight = IntegerTransformerPrior.in_flight
    return "key/value caches", 2 * 8 * settings.d_model * max(
        (settings.n_layer_top + 4 * settings.n_layer_bottom) * cells * flight["encode"],
        (settings.n_layer_top * cells + settings.n_layer_bottom * window) * flight["decode"])


def _pass_sizes(settings: PassPriorSettings) -> dict:
    """A pass or volume prior's keyword arguments from its section (``condition_blocks`` is the
    nets' ``condition_layers``)."""
    sizes = settings.model_dump()
    sizes["condition_layers"] = sizes.pop("condition_blocks")
    return sizes


for _name, _label, _settings, _net, _copy in (
        ("passes", "a pass prior", PassPriorSettings, PassPrior, IntegerPassPrior),
        ("volume", "a volume prior", VolumePriorSettings, VolumePrior, IntegerVolumePrior)):
    register(PriorKind(
        name=_name, label=_label, settings=_settings,
        build=lambda s, n_embed, top_grid, net=_net: net(n_embed, top_grid, **_pass_sizes(s)),
        make_copy=pass_copy, copy_problem=pass_copy_problem, load_copy=_copy,
        working_memory=_pass_memory, calibration_grids=32))
del _name, _label, _settings, _net, _copy

register(PriorKind(
    name="transformer", label="a transformer prior", settings=TransformerPriorSettings,
    build=lambda s, n_embed, top_grid: TransformerPrior(
        n_embed, top_grid, d_model=s.d_model, n_head=s.n_head, n_layer_top=s.n_layer_top,
        n_layer_bottom=s.n_layer_bottom, condition_blocks=s.condition_blocks, dropout=s.dropout,
        bottom_window_rows=s.bottom_window_rows, neighbours=s.neighbour_codes),
    make_copy=transformer_copy, copy_problem=transformer_copy_problem, load_copy=IntegerTransformerPrior,
    working_memory=_transformer_memory, calibration_grids=16, spread=True, threads_draw=False))

register(PriorKind(
    name="rows", label="a row prior", settings=RowPriorSettings,
    build=lambda s, n_embed, top_grid: RowPrior(n_embed, top_grid, **_pass_sizes(s)),
    make_copy=row_copy, copy_problem=row_copy_problem, load_copy=IntegerRowPrior,
    working_memory=row_memory, calibration_grids=32))
