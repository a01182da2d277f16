"""Config loading: validation names the key, overrides, the report's layout, paths; the models'
defaults are the config's."""

import inspect
from pathlib import Path

import pytest

from mrivq.config import Config, ModelConfig, PriorConfig, load_config
from mrivq.errors import ConfigError
from mrivq.nn import VQVAE2
from mrivq.nn.pass_prior import PassPrior
from mrivq.nn.prior import CodePrior

#: Constructor arguments whose config key has another name (as engine.checkpoint.prior_from_config maps them).
CONFIG_KEY_OF = {"neighbours": "neighbour_codes", "condition_layers": "condition_blocks"}


@pytest.mark.parametrize(("model", "section"), [(VQVAE2, ModelConfig), (CodePrior, PriorConfig),
                                                (PassPrior, PriorConfig)])
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


def test_prior_augmentation_lists_read_one_number_as_a_list_and_zero_as_none():
    assert load_config(None, ["prior.augment_shift=4"]).prior.augment_shift == [4]
    assert load_config(None, ["prior.augment_shift=0"]).prior.augment_shift == []
    assert load_config(None, ["prior.augment_scale=[0.9, 1.1]"]).prior.augment_scale == [0.9, 1.1]
    assert load_config(None, ["prior.augment_scale=[]"]).prior.augment_scale == []
    for bad in ("prior.augment_shift=[4, -2]", "prior.augment_scale=1", "prior.augment_scale=[3]"):
        with pytest.raises(ConfigError, match=r"prior\.augment_s"):
            load_config(None, [bad])


def test_a_stored_prior_config_without_the_newer_keys_loads_as_it_trained():
    """Priors stored before ``prior.architecture`` and ``prior.neighbour_codes`` existed were
    transformers without neighbour codes, whatever today's defaults say (mrivq.compat)."""
    from mrivq.config import config_from_dict

    stored = Config().to_dict()
    for key in ("architecture", "neighbour_codes"):
        del stored["prior"][key]
    loaded = config_from_dict(stored).prior
    assert (loaded.architecture, loaded.neighbour_codes) == ("transformer", False)
    assert "architecture" not in stored["prior"]  # the caller's dict is left as it was
