"""Config loading: validation names the key, overrides, the report's layout, paths; the models'
defaults are the config's."""

import inspect
from pathlib import Path

import pytest
import yaml
from prior_helpers import flat_prior
from pydantic import BaseModel, Field

from mrivq.config import (
    PRIOR_SECTIONS,
    Config,
    ModelConfig,
    PassPriorSettings,
    TransformerPriorSettings,
    VolumePriorSettings,
    config_from_dict,
    load_config,
    register_prior_section,
)
from mrivq.errors import ConfigError
from mrivq.nn import VQVAE2
from mrivq.nn.pass_prior import PassPrior
from mrivq.nn.transformer_prior import TransformerPrior

#: Constructor arguments whose config key has another name (as compression.priors maps them).
CONFIG_KEY_OF = {"neighbours": "neighbour_codes", "condition_layers": "condition_blocks"}


@pytest.mark.parametrize(("model", "section"), [(VQVAE2, ModelConfig), (TransformerPrior, TransformerPriorSettings),
                                                (PassPrior, PassPriorSettings)])
def test_every_model_constructor_default_is_the_config_default(model, section):
    defaults = {name: parameter.default for name, parameter in inspect.signature(model).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    assert defaults  # the sizes have defaults, so there is something to compare
    for name, default in defaults.items():
        key = CONFIG_KEY_OF.get(name, name)
        assert key in section.model_fields, f"{model.__name__}({name}=...) has no {section.__name__} key"
        expected = section.model_fields[key].default
        assert default == expected, f"{model.__name__}({name}={default!r}) but the config's {key} is {expected!r}"


def test_set_overrides_parse_values_as_yaml():
    c = load_config(None, ["train.lr=1e-3", "data.image_size=[64, 32]", "train.grad_clip=null"])
    assert c.train.lr == 1e-3
    assert c.data.image_size == (64, 32)
    assert c.train.grad_clip is None


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("train.lr=fast", "train.lr"),
    ("data.fit=stretch", "data.fit"),
    ("model.channel=-3", "model.channel"),
    ("nosuchsection.x=1", "nosuchsection"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_typo_in_a_file_names_file_and_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.epoch"):
        load_config(cfg)


def test_invalid_yaml_is_one_clear_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg)


def test_home_and_relative_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(None, ["data.root=~/hipmri", "output.dir=runs/a"])
    assert c.data.root == Path.home() / "hipmri"
    assert c.output.dir == tmp_path / "runs/a"
    assert c.log_dir == tmp_path / "runs/a/logging"


def test_report_layout_is_translated(tmp_path):
    cfg = tmp_path / "report.yaml"
    cfg.write_text(
        "seed: 7\n"
        "input:\n  train_dir: ~/d/keras_slices_train\n  validate_dir: ~/d/keras_slices_validate\n"
        "  test_dir: ~/d/keras_slices_test\n  load_model_dir: out/models\n"
        "output:\n  log_dir: out/logging\n  sample_dir: out/samples\n  visual_dir: out/visuals\n"
        "  model_dir: out/models\n"
        "training:\n  epochs: 20\n  batch_size: 10\n  lr: 0.00003\n  latent_loss_weight: 0.25\n"
        "  sample_size: 8\n  interval: 100\n"
        "predict:\n  batch_size: 10\n  sample_size: 8\n  samples: 3\n")
    c = load_config(cfg)
    assert c.seed == 7
    assert c.data.train_dir == Path.home() / "d/keras_slices_train"
    assert c.train.epochs == 20 and c.train.lr == 3e-5 and c.train.interval == 100
    assert c.predict.sample_sets == 3 and c.predict.sample_size == 8
    assert c.predict.checkpoint.name == "best.pt" and c.predict.checkpoint.parent.name == "models"
    assert c.model_dir.name == "models" and c.output.dir == c.model_dir.parent


def test_prior_copies_lists_read_one_number_as_a_list_and_zero_as_none():
    assert load_config(None, ["prior.copies.shift=4"]).prior.copies.shift == [4]
    assert load_config(None, ["prior.copies.shift=0"]).prior.copies.shift == []
    assert load_config(None, ["prior.copies.scale=[0.9, 1.1]"]).prior.copies.scale == [0.9, 1.1]
    assert load_config(None, ["prior.copies.scale=[]"]).prior.copies.scale == []
    for bad in ("prior.copies.shift=[4, -2]", "prior.copies.scale=1", "prior.copies.scale=[3]"):
        with pytest.raises(ConfigError, match=r"prior\.copies\.s"):
            load_config(None, [bad])


#: An old flat prior section (as mrivq stored and users wrote it before the section was nested)
#: and where each of its values is now.
OLD_PRIOR = {"architecture": "transformer", "channels": 32, "layers": 3, "passes_top": 5, "passes_bottom": 1,
             "d_model": 64, "n_head": 2, "n_layer_top": 2, "n_layer_bottom": 1, "bottom_window_rows": None,
             "condition_blocks": 1, "neighbour_codes": False, "dropout": 0.1, "augment_flip": "none",
             "augment_shift": [2], "augment_scale": [], "steps": 7}
NEW_PRIOR = {"kind": "transformer",
             "passes": {"channels": 32, "layers": 3, "passes_top": 5, "passes_bottom": 1, "condition_blocks": 1},
             "transformer": {"d_model": 64, "n_head": 2, "n_layer_top": 2, "n_layer_bottom": 1,
                             "bottom_window_rows": None, "condition_blocks": 1, "neighbour_codes": False,
                             "dropout": 0.1},
             "copies": {"flip": "none", "shift": [2], "scale": []}, "steps": 7}


def _nested(prior) -> dict:
    """The keys NEW_PRIOR holds (not the pass prior's newer condition_shuffle: see the tests)."""
    out = {key: value for key, value in prior.model_dump().items() if key in NEW_PRIOR}
    out["passes"] = {key: value for key, value in out["passes"].items() if key in NEW_PRIOR["passes"]}
    return out


def test_an_old_flat_prior_section_in_a_user_config_loads_nested_with_a_deprecation_line(tmp_path, capsys):
    cfg = tmp_path / "old.yaml"
    cfg.write_text(yaml.safe_dump({"prior": OLD_PRIOR}))
    loaded = load_config(cfg).prior
    assert _nested(loaded) == NEW_PRIOR
    assert loaded.passes.condition_shuffle  # a user's config: today's default
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(OLD_PRIOR) - 1  # one per old key (steps kept its name)
    assert "mrivq: prior.channels is now prior.passes.channels (the old name still loads)" in lines
    assert ("mrivq: prior.condition_blocks is now prior.passes.condition_blocks and "
            "prior.transformer.condition_blocks (the old name still loads)") in lines
    assert "mrivq: prior.architecture is now prior.kind (the old name still loads)" in lines

    # --set overrides too, over today's keys in the file; both names in one file are an error
    cfg.write_text(yaml.safe_dump({"prior": NEW_PRIOR}))
    loaded = load_config(cfg, ["prior.architecture=passes", "prior.augment_shift=3", "prior.condition_blocks=4"])
    assert (loaded.prior.kind, loaded.prior.copies.shift) == ("passes", [3])
    assert loaded.prior.passes.condition_blocks == loaded.prior.transformer.condition_blocks == 4
    assert capsys.readouterr().err.splitlines() == [
        "mrivq: prior.architecture is now prior.kind (the old name still loads)",
        "mrivq: prior.augment_shift is now prior.copies.shift (the old name still loads)",
        ("mrivq: prior.condition_blocks is now prior.passes.condition_blocks and prior.transformer.condition_blocks "
         "(the old name still loads)")]
    cfg.write_text(yaml.safe_dump({"prior": {**NEW_PRIOR, "d_model": 32}}))
    with pytest.raises(ConfigError, match=r"prior\.d_model and prior\.transformer\.d_model"):
        load_config(cfg)


def test_an_old_flat_prior_section_in_a_stored_config_loads_nested_silently(capsys):
    stored = {**Config().to_dict(), "prior": dict(OLD_PRIOR)}
    assert _nested(config_from_dict(stored).prior) == NEW_PRIOR
    assert not config_from_dict(stored).prior.passes.condition_shuffle  # stored: what it trained with
    assert config_from_dict(stored).prior.volume.head_channels == 0
    assert not config_from_dict(stored).prior.volume.neighbour_codes
    assert stored["prior"] == OLD_PRIOR  # the caller's dict is left as it was
    assert capsys.readouterr().err == ""
    today = load_config(None, ["prior.kind=transformer", "prior.transformer.d_model=64"])
    assert config_from_dict(today.to_dict()) == today  # today's shape is read as is
    old = load_config(None, ["prior.kind=transformer", "prior.transformer.d_model=64",
                             "prior.passes.condition_shuffle=false", "prior.volume.condition_shuffle=false",
                             "prior.passes.head_channels=0", "prior.volume.head_channels=0",
                             "prior.passes.neighbour_codes=false", "prior.volume.neighbour_codes=false",
                             "prior.passes.top_masks=0", "prior.volume.top_masks=0"])
    assert config_from_dict({**today.to_dict(), "prior": flat_prior(today.to_dict()["prior"])}) == old


def test_a_stored_prior_config_without_the_newer_keys_loads_as_it_trained():
    """Priors stored before ``prior.architecture`` and ``prior.neighbour_codes`` existed were
    transformers without neighbour codes, whatever today's defaults say (mrivq.compat); a stored
    config of today's nested shape is read as is."""
    stored = Config().to_dict()
    stored["prior"] = flat_prior(stored["prior"])
    for key in ("architecture", "neighbour_codes"):
        del stored["prior"][key]
    loaded = config_from_dict(stored).prior
    assert (loaded.kind, loaded.transformer.neighbour_codes) == ("transformer", False)
    assert "architecture" not in stored["prior"]  # the caller's dict is left as it was
    nested = Config().to_dict()
    del nested["prior"]["transformer"]["neighbour_codes"]
    loaded = config_from_dict(nested).prior
    assert (loaded.kind, loaded.transformer.neighbour_codes) == ("volume", True)
    # pass and volume priors stored before each bottom position had features of its own, and
    # before their nets could be handed their neighbours' codes
    for kind in ("passes", "volume"):
        del nested["prior"][kind]["condition_shuffle"], nested["prior"][kind]["neighbour_codes"]
        del nested["prior"][kind]["top_masks"]  # and before their top nets learnt random masks
    loaded = config_from_dict(nested).prior
    assert (loaded.passes.condition_shuffle, loaded.volume.condition_shuffle) == (False, False)
    assert (loaded.passes.neighbour_codes, loaded.volume.neighbour_codes) == (False, False)
    assert (loaded.passes.top_masks, loaded.volume.top_masks) == (0, 0)
    assert Config().prior.volume.top_masks == 0.5

    assert Config().prior.passes.condition_shuffle and Config().prior.volume.condition_shuffle


def test_the_settings_are_the_selected_kinds_section():
    assert load_config(None, []).prior.settings == VolumePriorSettings()  # the default kind, volume
    assert load_config(None, ["prior.kind=passes"]).prior.settings == PassPriorSettings()
    prior = load_config(None, ["prior.kind=transformer", "prior.transformer.n_head=8"]).prior
    assert prior.settings is prior.transformer and prior.settings.n_head == 8


class LinearSettings(BaseModel):  # a plain model: it would ignore unknown keys, the config does not
    width: int = Field(default=3, ge=1)


def test_a_registered_prior_kind_has_its_own_section_validated_by_its_class(monkeypatch, tmp_path):
    monkeypatch.setitem(PRIOR_SECTIONS, "linear", None)  # undone after the test
    register_prior_section("linear", LinearSettings)
    assert load_config(None, ["prior.kind=linear"]).prior.settings == LinearSettings()
    config = load_config(None, ["prior.kind=linear", "prior.linear.width=7"])
    assert config.prior.settings == LinearSettings(width=7)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config.to_yaml())
    assert load_config(cfg).prior == config.prior and config_from_dict(config.to_dict()) == config
    for bad, key in (("prior.linear.widht=2", r"unknown config key 'prior\.linear\.widht'"),
                     ("prior.linear.width=0", r"'prior\.linear\.width'"),
                     ("prior.lineer.width=2", r"unknown config key 'prior\.lineer'")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["prior.kind=linear", bad])
    for name in ("steps", "copies", "passes"):  # a prior key, or a built-in kind with another class
        with pytest.raises(ValueError, match=name):
            register_prior_section(name, LinearSettings)


def test_an_unknown_prior_kind_names_prior_kind_and_the_known_kinds():
    with pytest.raises(ConfigError, match=r"'prior\.kind'.*'pixelcnn'.*passes, volume, transformer"):
        load_config(None, ["prior.kind=pixelcnn"])
    with pytest.raises(ConfigError, match=r"'prior\.kind'"):
        load_config(None, ["prior.architecture=pixelcnn"])
