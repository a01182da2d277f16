"""Typed configuration: YAML loading, ``--set a.b=value`` overrides, validation.

The config is validated once here, at the boundary; the rest of mrivq trusts it.
Unknown keys and wrong types are :class:`~mrivq.errors.ConfigError` naming the key.

Two layouts load:

* mrivq's own: sections ``data``, ``model``, ``train``, ``predict``, ``output`` and ``seed``;
* the report's: ``input.{train_dir,validate_dir,test_dir,load_model_dir}``,
  ``output.{log_dir,sample_dir,visual_dir,model_dir}``,
  ``training.{epochs,batch_size,lr,latent_loss_weight,sample_size,interval}``,
  ``predict.{batch_size,sample_size,samples}`` — translated to mrivq's layout first. Without
  ``output.dir`` the run directory is the four folders' common parent, unless that is the
  working directory (or they have none): then the default ``runs/default``.

Paths: ``~`` is expanded and relative paths are taken from the current working
directory, the folder the command is run from (as in the report's instructions).
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mrivq.errors import ConfigError


def _seconds(value):
    """A duration for a ``max_time`` key: ``"10m"`` -> 600.0; ``"90s"``, ``"2h"``; numbers pass through."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = value.strip() if isinstance(value, str) else ""
    if text and text[-1] in units:
        try:
            return float(text[:-1]) * units[text[-1]]
        except ValueError:
            pass
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: The largest side of data.image_size: a model's input, so a checkpoint someone sends cannot
#: ask for slices of any size.
MAX_IMAGE_SIDE = 1024


class DataConfig(_Section):
    root: Path | None = None
    train_dir: Path | None = None
    validate_dir: Path | None = None
    test_dir: Path | None = None
    image_size: tuple[int, int] = (256, 128)
    fit: Literal["pad_crop", "resize"] = "pad_crop"
    normalize: Literal["minmax", "percentile", "zscore"] = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    on_bad_file: Literal["error", "skip"] = "error"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    cache_dir: Path | None = None
    workers: int | None = Field(default=None, ge=1)
    phantom_cases: int = Field(default=16, ge=3, le=1024)
    # Training-only augmentation (never validation or test), drawn per slice: flips with
    # probability 1/2 (horizontal = left-right as the pictures show a slice: along its first
    # axis, HipMRI's right-to-left; both = that and, independently, up-down: front to back)
    # and an intensity factor uniform in [1 - augment_intensity, 1 + augment_intensity].
    augment_flip: Literal["none", "horizontal", "both"] = "none"
    augment_intensity: float = Field(default=0.0, ge=0, lt=1)
    # Training-only: each step trains on an [h, w] window cut at a random place from its slices
    # (sides multiples of 8, at most data.image_size), so a step costs h*w/(H*W) of a whole
    # slice's and a time budget buys that many more steps; validation and test see whole slices.
    train_crop: tuple[int, int] | None = None

    @field_validator("image_size")
    @classmethod
    def _size_positive(cls, v):
        if min(v) < 8 or max(v) > MAX_IMAGE_SIDE:
            raise ValueError(f"both sides must be 8 to {MAX_IMAGE_SIDE} pixels")
        return v

    @field_validator("train_crop")
    @classmethod
    def _crop_multiple_of_8(cls, v):
        if v is not None and (min(v) < 8 or v[0] % 8 or v[1] % 8):
            raise ValueError("both sides must be multiples of 8 (the top codes' stride), at least 8")
        return v

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.train_crop is not None and (self.train_crop[0] > self.image_size[0]
                                            or self.train_crop[1] > self.image_size[1]):
            raise ValueError(f"train_crop {list(self.train_crop)} is larger than image_size "
                             f"{list(self.image_size)}")
        return self

    @field_validator("percentiles")
    @classmethod
    def _percentiles_ordered(cls, v):
        lo, hi = v
        if not 0 <= lo < hi <= 100:
            raise ValueError("expected [low, high] with 0 <= low < high <= 100")
        return v

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum(cls, v):
        if min(v) < 0 or abs(sum(v) - 1) > 1e-6:
            raise ValueError("expected three non-negative fractions summing to 1")
        return v

    @property
    def uses_phantom(self) -> bool:
        return self.root is None and not (self.train_dir or self.validate_dir or self.test_dir)


#: The report's network; ``model.preset: report`` fills these for keys the config leaves out.
REPORT_MODEL = {"channel": 128, "n_res_block": 2, "n_res_channel": 32, "embed_dim": 64,
                "n_embed": 512, "decay": 0.99, "block": "report", "lookup": "euclidean"}
# Model keys added after checkpoints were first written, with the value those checkpoints used.
STORED_MODEL_DEFAULTS = {"block": "report", "lookup": "euclidean", "restart_from": "random",
                         "kmeans_iters": 0, "bottom_dropout": 0.0}


class ModelConfig(_Section):
    # Applied when the config is read and not stored: the stored config holds its values.
    preset: Literal["report"] | None = Field(default=None, exclude=True)
    in_channel: int = Field(default=1, ge=1, le=64)
    channel: int = Field(default=128, ge=1, le=4096)
    n_res_block: int = Field(default=2, ge=0, le=64)
    n_res_channel: int = Field(default=32, ge=1, le=4096)
    embed_dim: int = Field(default=64, ge=1, le=4096)
    n_embed: int = Field(default=512, ge=2, le=65536)
    decay: float = Field(default=0.99, gt=0, lt=1)
    eps: float = Field(default=1e-5, gt=0)
    init_from_data: bool = True
    restart_dead_codes: bool = True
    dead_code_threshold: float = Field(default=1.0, ge=0)
    # Dead codes restart from random encoder outputs, or from the worst-served ones.
    restart_from: Literal["random", "worst"] = "random"
    kmeans_iters: int = Field(default=0, ge=0, le=100)  # Lloyd steps refining the data init
    # Code lookup: euclidean (the report's) or cosine (unit-length vectors and codes).
    lookup: Literal["euclidean", "cosine"] = "cosine"
    # Residual block: report (ReLU, 3x3, 1x1 conv) | norm (GroupNorm, SiLU, two 3x3 convs).
    block: Literal["report", "norm"] = "report"
    # Training only: the fraction of training slices decoded from their top codes alone (bottom
    # codes zeroed), so the top level must carry the layout a prior then draws.
    bottom_dropout: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") == "report":
            return {**REPORT_MODEL, **data}  # keys given in the config win
        return data


class TrainConfig(_Section):
    epochs: int = Field(default=5, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    # One slice per step: in a fixed budget, more (noisier) updates beat bigger batches
    # (measured: README "Choosing the default recipe").
    batch_size: int = Field(default=1, ge=1)
    # Peak learning rate, or auto: by the run's length in steps (2e-3 up to 4,000 steps, 5e-4
    # from 13,000, log-linear between; under max_time the length fitted to the budget).
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    latent_loss_weight: float = Field(default=0.25, ge=0)
    # Reconstruction loss: mse (the report's), l1, or ssim_l1 = ssim_weight x (1 - SSIM) +
    # (1 - ssim_weight) x L1, SSIM on the scoring range with the protocol's window (fp32).
    loss: Literal["mse", "l1", "ssim_l1"] = "mse"
    ssim_weight: float = Field(default=0.84, ge=0, le=1)
    # Wall-clock budget in seconds ("90s", "10m", "2h" read too): the schedule is fitted to it.
    max_time: float | None = Field(default=None, gt=0)

    _seconds = field_validator("max_time", mode="before")(lambda cls, value: _seconds(value))
    interval: int = Field(default=720, ge=1)
    checkpoint_every: int = Field(default=250, ge=1)
    max_nonfinite_steps: int = Field(default=10, ge=1)
    sample_size: int = Field(default=8, ge=1)
    val_batch_size: int | None = Field(default=16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: Literal["auto"] | bool = "auto"
    num_threads: int | None = Field(default=None, ge=1)
    tensorboard: bool = False


class PredictConfig(_Section):
    batch_size: int = Field(default=10, ge=1)
    sample_sets: int = Field(default=3, ge=0)
    sample_size: int = Field(default=10, ge=1)
    checkpoint: Path | None = None


class PriorConfig(_Section):
    """The autoregressive prior over codes (``mrivq train-prior``); grid shapes come from the VQ-VAE."""

    # transformer: codes one at a time in raster order (a causal transformer); its files decode
    # only on the kind of machine and device that coded them. passes: residual convolutions that
    # predict each grid in a few interleaved passes, coded through an integer copy (files decode
    # bit for bit anywhere, many times faster).
    architecture: Literal["transformer", "passes"] = "transformer"
    channels: int = Field(default=64, ge=8, le=1024)  # passes: width of the convolutions
    layers: int = Field(default=6, ge=1, le=32)  # passes: residual 3x3 convolutions per grid
    passes_top: int = Field(default=5, ge=1, le=5)  # passes: 1-5 (5: dyadic over 4x4 tiles)
    passes_bottom: int = Field(default=2, ge=1, le=5)  # passes: 2 is a checkerboard
    d_model: int = Field(default=128, ge=8, le=4096)
    n_head: int = Field(default=4, ge=1, le=64)
    n_layer_top: int = Field(default=4, ge=1, le=64)
    n_layer_bottom: int = Field(default=3, ge=1, le=64)
    bottom_window_rows: int | None = Field(default=2, ge=1, le=4096)
    condition_blocks: int = Field(default=2, ge=0, le=64)
    # Each position is also given the codes left, two left, above-left, above, above-right and
    # two above it (mrivq.nn.prior.NEIGHBOURS); false: attention alone finds them.
    neighbour_codes: bool = True
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # The training codes also include those of every training slice moved by each augment_shift
    # pixels up, down, left and right and zoomed by each augment_scale about the centre, and,
    # with augment_flip "horizontal", of it and each of those mirrored left-right (the patient's
    # sides swapped: a mirrored pelvis is still a plausible pelvis); encoded once and cached.
    # Directions as the pictures show a slice. Validation never.
    augment_flip: Literal["none", "horizontal"] = "horizontal"
    augment_shift: list[int] = [4, 8]
    augment_scale: list[float] = [0.92, 1.08]
    steps: int = Field(default=2500, ge=1)
    # Wall-clock budget of the prior ("90s", "10m", "2h" read too), as train.max_time: instead of
    # prior.steps, as many steps as fit, the schedule fitted to them. Reading the slices and
    # encoding the training codes (with their augmented copies) come out of it too.
    max_time: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    interval: int = Field(default=250, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)

    _seconds = field_validator("max_time", mode="before")(lambda cls, value: _seconds(value))

    @field_validator("augment_shift", "augment_scale", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        """One number reads as a list of one; 0 (or none) as no copies."""
        if value is None or value == 0:
            return []
        return [value] if isinstance(value, (int, float)) else value

    @field_validator("augment_shift")
    @classmethod
    def _shifts_positive(cls, value):
        if any(shift < 1 for shift in value):
            raise ValueError("shifts are whole pixels, at least 1 (0 or [] for none)")
        return value

    @field_validator("augment_scale")
    @classmethod
    def _scales_near_one(cls, value):
        if any(not 0.5 <= scale <= 2 or scale == 1 for scale in value):
            raise ValueError("zoom factors must lie in [0.5, 2] and not be 1 ([] for none)")
        return value

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        return self


class OutputConfig(_Section):
    dir: Path = Path("runs/default")
    log_dir: Path | None = None
    sample_dir: Path | None = None
    visual_dir: Path | None = None
    model_dir: Path | None = None


class Config(_Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The resolved path of the YAML file this config was read from; None for defaults."""
        return self._source

    @model_validator(mode="after")
    def _resolve_paths(self):
        for section in (self.data, self.predict, self.output):
            for name, value in section:
                if isinstance(value, Path):
                    object.__setattr__(section, name, _resolve(value))
        return self

    # -- run directory layout (the report's four folders are children of output.dir) --
    @property
    def run_dir(self) -> Path:
        return self.output.dir

    @property
    def log_dir(self) -> Path:
        return self.output.log_dir or self.output.dir / "logging"

    @property
    def sample_dir(self) -> Path:
        return self.output.sample_dir or self.output.dir / "samples"

    @property
    def visual_dir(self) -> Path:
        return self.output.visual_dir or self.output.dir / "visuals"

    @property
    def model_dir(self) -> Path:
        return self.output.model_dir or self.output.dir / "models"

    def to_dict(self) -> dict:
        """Plain, YAML/JSON-friendly dict (paths as strings, tuples as lists)."""
        return _yaml_ready(self.model_dump())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _resolve(path: Path) -> Path:
    return Path(path).expanduser().absolute()


def _yaml_ready(obj):
    if isinstance(obj, dict):
        return {k: _yaml_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_yaml_ready(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

_REPORT_SECTIONS = {"input", "training"}


def from_report_layout(raw: dict) -> dict:
    """Translate a config in the report's layout (input/output/training/predict) to mrivq's.

    Without ``output.dir``, the run directory (config.yaml, metrics.csv, report.html) is the
    common parent of ``output.{log,sample,visual,model}_dir``; when that is the working
    directory, or the folders have no common parent, it stays the default ``runs/default``.
    """
    raw = copy.deepcopy(raw)
    out: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("input", "training", "output", "predict")}
    data = out.setdefault("data", {})
    inp = raw.get("input") or {}
    for key in ("train_dir", "validate_dir", "test_dir"):
        if key in inp:
            data[key] = inp.pop(key)
    predict = dict(raw.get("predict") or {})
    if "load_model_dir" in inp:
        model_dir = inp.pop("load_model_dir")
        predict.setdefault("checkpoint", str(Path(str(model_dir)) / "best.pt"))
    if inp:
        raise ConfigError(f"unknown config key input.{next(iter(inp))} (the report's layout has "
                          "input.train_dir, validate_dir, test_dir, load_model_dir)")
    if "samples" in predict:
        predict["sample_sets"] = predict.pop("samples")
    if predict:
        out["predict"] = predict
    if raw.get("training"):
        out["train"] = dict(raw["training"])
    output = dict(raw.get("output") or {})
    if output:
        subdirs = [Path(str(output[k])).expanduser() for k in ("log_dir", "sample_dir", "visual_dir", "model_dir")
                   if output.get(k)]
        parents = {p.parent.absolute() for p in subdirs}
        common = parents.pop() if len(parents) == 1 else None
        if "dir" not in output and common and common.resolve() != Path.cwd().resolve():
            # The report's folders sat side by side; their common parent is the run directory,
            # unless it is the working directory, which must not fill with run files.
            output["dir"] = str(common)
        out["output"] = output
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply ``--set`` overrides, validate.

    The returned config's ``source`` is the file's resolved path, so a run never writes over it.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (give an existing YAML file to --config)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}; fix the file's syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (data, model, train, ...), "
                              f"got a {type(raw).__name__}")
        if _REPORT_SECTIONS & raw.keys():
            raw = from_report_layout(raw)
    for item in overrides:
        apply_override(raw, item)
    config = validate(raw, source=str(path) if path else "defaults")
    config._source = path.resolve() if path is not None else None
    return config


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def validate(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown config key {key!r}; check the spelling "
                              "(see config/example_config.yaml for every key)") from None
        given = err.get("input")
        given_text = "" if isinstance(given, dict) else f" (got {reprlib.repr(given)})"
        raise ConfigError(f"{source}: config key {key!r}: {err['msg']}{given_text}") from None


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config from the plain dict stored in a run directory or checkpoint.

    Keys added since the config was stored take the value that reproduces what was trained,
    not today's default (:data:`STORED_MODEL_DEFAULTS`): a model section without ``block`` was
    the report's ``ResBlock``, one without ``lookup`` looked codes up by euclidean distance.
    """
    model = raw.get("model") or {}
    if isinstance(model, dict):
        raw = {**raw, "model": {**STORED_MODEL_DEFAULTS, **model}}
    return validate(raw, source="stored config")
