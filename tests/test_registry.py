"""A prior kind and a coding layer are one registry entry each: a kind defined and registered inside
this test alone trains, codes and decodes bit for bit through the command line, and a layer
registered here travels in the codes file and applies on decode, with no edit anywhere else."""

from __future__ import annotations

import zlib
from typing import ClassVar

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_main, set_args
from prior_helpers import tiny_data_overrides, train_tiny_vqvae
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mrivq import config as config_module
from mrivq.compression import layers, priors
from mrivq.compression.codec import CodecInput
from mrivq.compression.container import read_codes_file
from mrivq.compression.portable.fixed_point import (
    LOGIT_UNITS,
    bounds_problem,
    coder_table,
    exp_table,
    fingerprint_state,
    map_tensors,
    table,
    template_problem,
    weights_from_logits,
)
from mrivq.data.io import read_slice
from mrivq.engine.checkpoint import load_codec


class PositionSettings(BaseModel):
    """prior.position: a prior that knows only where a code is."""

    model_config = ConfigDict(extra="forbid")
    smoothing: float = Field(default=0.0, ge=0, description="A setting of its own (it travels with the config).")


class PositionPrior(nn.Module):
    """``p(code | its position)`` at each level: one logit table per position, no context."""

    kind = "position"

    def __init__(self, n_embed: int, top_grid: tuple[int, int]) -> None:
        super().__init__()
        self.n_embed, self.top_grid = n_embed, tuple(top_grid)
        self.bottom_grid = (2 * self.top_grid[0], 2 * self.top_grid[1])
        self.top = nn.Parameter(torch.zeros(n_embed, *self.top_grid))
        self.bottom = nn.Parameter(torch.zeros(n_embed, *self.bottom_grid))
        self.integer = None

    def fresh(self) -> PositionPrior:
        return PositionPrior(self.n_embed, self.top_grid)

    def nll_bits(self, codes_top, codes_bottom):
        return tuple(F.cross_entropy(logits[None].expand(len(codes), *logits.shape), codes) / np.log(2)
                     for logits, codes in ((self.top, codes_top), (self.bottom, codes_bottom)))

    @torch.no_grad()
    def sample(self, n, *, temperature=1.0, top_p=1.0, generator=None):
        return tuple(torch.multinomial(torch.softmax(logits.flatten(1).t() / temperature, dim=1), n, replacement=True,
                                       generator=generator).t().reshape(n, *logits.shape[1:])
                     for logits in (self.top, self.bottom))


class IntegerPositionPrior:
    """The integer copy: logits in 1/LOGIT_UNITS nat per position; codes every position of a grid at once."""

    coding = "position"
    batch: ClassVar[dict[str, int]] = {"encode": 2, "decode": 3}
    in_flight: ClassVar[dict[str, int]] = {"encode": 4, "decode": 6}

    def __init__(self, state: dict) -> None:
        self.state = state
        self.coder_table = coder_table(state["exp_table"])
        self.device = state["exp_table"].device

    def to(self, device) -> IntegerPositionPrior:
        return IntegerPositionPrior(map_tensors(self.state, lambda t: t.to(device)))

    def code_batch(self, lo, size, code, known=None):
        out = []
        for level in ("top", "bottom"):
            logits = self.state[level]  # (rows, cols, K)
            weights = weights_from_logits(logits.flatten(0, 1).clone(), self.coder_table)
            where = np.arange(len(weights))
            out.append(np.stack([code(level, weights, lo + i, where) for i in range(size)]).reshape(size, *logits.shape[:2]))
        return out[0], out[1]

    def fingerprint(self) -> str:
        return fingerprint_state(self.state)


def position_copy(prior: PositionPrior, codes_top, codes_bottom) -> IntegerPositionPrior:
    return IntegerPositionPrior({"top": table(prior.top.permute(1, 2, 0), 1 / LOGIT_UNITS),
                                 "bottom": table(prior.bottom.permute(1, 2, 0), 1 / LOGIT_UNITS),
                                 "exp_table": exp_table()})


def position_copy_problem(state, prior: PositionPrior):
    template = position_copy(prior.fresh(), None, None).state
    return template_problem(state, template) or bounds_problem(state, {"top": 1 << 30, "bottom": 1 << 30})


POSITION = priors.PriorKind(
    name="position", label="a position prior", settings=PositionSettings,
    build=lambda settings, n_embed, top_grid: PositionPrior(n_embed, top_grid),
    make_copy=position_copy, copy_problem=position_copy_problem, load_copy=IntegerPositionPrior,
    working_memory=lambda settings, top_grid: ("logit tables", 1 << 20), calibration_grids=4)


@pytest.fixture
def position_kind(monkeypatch):
    """The kind registered for one test only (both registries restored after it)."""
    monkeypatch.setitem(priors.PRIORS, "position", None)
    monkeypatch.setitem(config_module.PRIOR_SECTIONS, "position", PositionSettings)
    return priors.register(POSITION)


def test_a_prior_kind_registered_in_a_test_trains_codes_and_decodes_bit_for_bit(
        position_kind, tiny_phantom, tmp_path, capsys):
    vqvae = train_tiny_vqvae(tiny_phantom, tmp_path)
    sets = tiny_data_overrides(tiny_phantom, tmp_path / "cache") + [
        f"output.dir={tmp_path / 'position'}", "prior.kind=position", "prior.position.smoothing=0.5",
        "prior.steps=6", "prior.interval=3", "prior.batch_size=4", "prior.warmup_steps=1", "prior.copies.shift=0",
        "prior.copies.scale=0"]
    assert run_main(["train-prior", "--checkpoint", str(vqvae), *set_args(sets)]) == 0
    prior = tmp_path / "position" / "models" / "prior_best.pt"
    test_split = tiny_phantom / "keras_slices_test"

    outputs = {}
    for name, extra in (("frequencies", []), ("position", ["--prior", str(prior)])):
        coded = tmp_path / f"{name}.mrvq"
        assert run_main(["encode", "--checkpoint", str(vqvae), str(test_split), "--out", str(coded), *extra]) == 0
        assert run_main(["decode", "--checkpoint", str(vqvae), str(coded), "--out", str(tmp_path / name), *extra]) == 0
        outputs[name] = {path.name: nib.load(path).get_fdata() for path in sorted((tmp_path / name).glob("*.nii.gz"))}
    header = read_codes_file(tmp_path / "position.mrvq").header
    assert header["coder"] == "prior" and header["prior_coding"] == "position"
    # the same codes come back: the decoded slices equal those of the frequency-coded file
    assert outputs["position"].keys() == outputs["frequencies"].keys() and len(outputs["position"]) > 1
    assert all(np.array_equal(outputs["position"][k], outputs["frequencies"][k]) for k in outputs["position"])
    # it samples too, and its stored config names its own section
    assert run_main(["sample", "--prior", str(prior), "--n", "2", "--out", str(tmp_path / "drawn")]) == 0
    stored = torch.load(prior, weights_only=True)["config"]["prior"]
    assert stored["kind"] == "position" and stored["position"] == {"smoothing": 0.5}


def test_a_registered_kinds_damaged_copy_is_refused_by_its_own_check(position_kind, tmp_path):
    prior = priors.build_prior(config_module.PriorConfig(kind="position"), 8, (2, 2))
    copy = priors.make_copy(prior, torch.zeros(4, 2, 2, dtype=torch.long), torch.zeros(4, 4, 4, dtype=torch.long))
    assert position_kind.copy_problem(copy.state, prior) is None
    spoiled = {**copy.state, "top": copy.state["top"].clone().fill_(torch.iinfo(torch.int64).min)}
    assert "beyond" in position_kind.copy_problem(spoiled, prior)


def _exact_encode(original: layers.Stored, picture: np.ndarray) -> bytes:
    """The float32 difference to the original, deflated: decoding adds it back."""
    return zlib.compress((original.scanner().astype(np.float32) - picture.astype(np.float32)).tobytes())


def _exact_decode(payload: bytes, picture: np.ndarray) -> layers.Stored:
    inflater = zlib.decompressobj()
    raw = inflater.decompress(payload, 4 * picture.size + 1)
    if len(raw) != 4 * picture.size or not inflater.eof:
        raise ValueError("not one float32 per pixel")
    return layers.Stored(picture.astype(np.float32) + np.frombuffer(raw, dtype=np.float32).reshape(picture.shape),
                         "float32")


def test_a_coding_layer_registered_in_a_test_travels_in_the_file_and_applies_on_decode(
        monkeypatch, tiny_phantom, tmp_path, capsys):
    monkeypatch.setitem(layers.LAYERS, "exact", None)
    layers.register(layers.CodingLayer("exact", "the float32 residual, deflated", _exact_encode, _exact_decode))
    vqvae = train_tiny_vqvae(tiny_phantom, tmp_path)
    files = sorted((tiny_phantom / "keras_slices_test").glob("*.nii.gz"))[:3]
    codec = load_codec(vqvae)
    packed = codec.compress(CodecInput.read(files, codec.prep, originals=True), layers=("exact",))
    coded = tmp_path / "exact.mrvq"
    coded.write_bytes(packed.blob)
    assert read_codes_file(coded).header["layers"] == ["exact"]
    assert run_main(["decode", "--checkpoint", str(vqvae), str(coded), "--out", str(tmp_path / "out")]) == 0
    for path in files:  # the layer made the decoded slices the originals, to float32's precision
        original = read_slice(path)[0]
        decoded = nib.load(tmp_path / "out" / path.name).get_fdata()
        assert np.abs(decoded.reshape(original.shape) - original).max() <= 1e-6 * np.abs(original).max()
    # without the layer registered, the file is refused by name, nothing written
    monkeypatch.delitem(layers.LAYERS, "exact")
    capsys.readouterr()
    assert run_main(["decode", "--checkpoint", str(vqvae), str(coded), "--out", str(tmp_path / "again")]) == 2
    assert "coding layer 'exact'" in capsys.readouterr().err and not list((tmp_path / "again").glob("*.nii.gz"))
