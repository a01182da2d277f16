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
from pydantic_core import PydanticCustomError

from mrivq.compat import (
    PRIOR_MOVED,
    current_keys,
    moved_keys,
    new_name,
    stored_config,
    stored_default,
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
#: data.train_crop auto's window side.
AUTO_CROP = 128


class DataConfig(_Section):
    """Where the slices come from and how each is read, fitted and normalised.

    All of root, train_dir, validate_dir and test_dir null: the built-in synthetic phantom set,
    generated once into the cache folder.
    """

    root: Path | None = Field(
        default=None,
        description="Folder holding keras_slices_train, keras_slices_validate and "
                    "keras_slices_test (HipMRI's layout), or one flat folder of NIfTI slices "
                    "split by case (data.split_fractions); null: the built-in phantom set.")
    train_dir: Path | None = Field(
        default=None, description="Folder of the training slices; the three split folders override root.")
    validate_dir: Path | None = Field(default=None, description="Folder of the validation slices.")
    test_dir: Path | None = Field(default=None, description="Folder of the test slices.")
    image_size: tuple[int, int] = Field(
        default=(256, 128),
        description=f"Rows and columns every slice is fitted to; sides 8 to {MAX_IMAGE_SIDE} pixels.")
    fit: Literal["pad_crop", "resize"] = Field(
        default="pad_crop",
        description="How a slice is fitted to image_size: pad_crop pads with the background or "
                    "crops, centred; resize is bilinear.")
    normalize: Literal["minmax", "percentile", "zscore"] = Field(
        default="minmax",
        description="Intensity normalisation per slice: minmax to [0, 1]; percentile clips to "
                    "data.percentiles, then [0, 1]; zscore (scored after mapping each slice's own "
                    "min..max to [0, 1]).")
    percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5),
        description="Low and high percentile of the clip range of normalize: percentile "
                    "(0 <= low < high <= 100).")
    on_bad_file: Literal["error", "skip"] = Field(
        default="error",
        description="A slice that cannot be read: error lists every bad file and stops; skip skips "
                    "them and lists them.")
    split_fractions: tuple[float, float, float] = Field(
        default=(0.8, 0.1, 0.1),
        description="Train, validate and test fractions, split by case, when root is one flat "
                    "folder; non-negative, summing to 1.")
    cache_dir: Path | None = Field(
        default=None,
        description="Cache of decoded slices (and of the phantom set); null: $MRIVQ_CACHE_DIR or "
                    "~/.cache/mrivq.")
    workers: int | None = Field(
        default=None, ge=1, description="Processes decoding slices; null: one per CPU core.")
    phantom_cases: int = Field(
        default=16, ge=3, le=1024,
        description="Case volumes (of 60 slices) in the built-in phantom set.")
    augment_flip: Literal["none", "horizontal", "both"] = Field(
        default="none",
        description="Training batches only (never validation or test): each slice flipped with "
                    "probability 1/2. horizontal: left-right as the pictures show a slice (along "
                    "its first axis, HipMRI's right-to-left: the patient's sides swapped); both: "
                    "that and, independently, up-down (front to back).")
    augment_intensity: float = Field(
        default=0.0, ge=0, lt=1,
        description="Training batches only: each slice multiplied by a factor uniform in "
                    "[1 - augment_intensity, 1 + augment_intensity]; 0: off.")
    train_crop: tuple[int, int] | Literal["auto"] | None = Field(
        default="auto",
        description="Training steps only: each step trains on an [h, w] window (sides multiples "
                    "of 8, at most image_size) cut at a random place from its slices, so a step "
                    "costs (h x w)/(H x W) of a whole slice's and the same time buys that many more "
                    "steps; validation and test see whole slices. auto: 128 x 128 windows, a side "
                    "of the image shorter than 128 taken whole ([128, 128] of HipMRI's 256 x 128 "
                    "slices: docs/benchmarks.md). null: whole slices. A "
                    "stored config without it loads as null.")

    @field_validator("image_size")
    @classmethod
    def _size_positive(cls, v):
        if min(v) < 8 or max(v) > MAX_IMAGE_SIDE:
            raise ValueError(f"both sides must be 8 to {MAX_IMAGE_SIDE} pixels")
        return v

    @field_validator("train_crop")
    @classmethod
    def _crop_multiple_of_8(cls, v):
        if v not in (None, "auto") and (min(v) < 8 or v[0] % 8 or v[1] % 8):
            raise ValueError("both sides must be multiples of 8 (the top codes' stride), at least 8")
        return v

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.train_crop not in (None, "auto") and (self.train_crop[0] > self.image_size[0]
                                                      or self.train_crop[1] > self.image_size[1]):
            raise ValueError(f"train_crop {list(self.train_crop)} is larger than image_size "
                             f"{list(self.image_size)}")
        return self

    @property
    def crop(self) -> tuple[int, int] | None:
        """The training window train_crop asks for (``auto`` resolved), or None for whole slices."""
        if self.train_crop != "auto":
            return self.train_crop
        window = (min(AUTO_CROP, self.image_size[0]), min(AUTO_CROP, self.image_size[1]))
        return None if window == tuple(self.image_size) else window

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
                "n_embed": 512, "decay": 0.99, "block": "relu", "lookup": "euclidean", "restart_from": "random"}


class ModelConfig(_Section):
    """The VQ-VAE-2: the keyword arguments of ``mrivq.nn.VQVAE2``, both codebooks alike."""

    # Applied when the config is read and not stored: the stored config holds its values.
    preset: Literal["report"] | None = Field(
        default=None, exclude=True,
        description="report: the report's network ("
                    + ", ".join(f"{key} {value}" for key, value in REPORT_MODEL.items())
                    + ") for every model key the config does not set.")
    in_channel: int = Field(default=1, ge=1, le=64, description="Image channels (1 for MRI slices).")
    channel: int = Field(default=128, ge=1, le=4096, description="Width of the encoders and decoders.")
    n_res_block: int = Field(
        default=2, ge=0, le=64, description="Residual blocks in every encoder and decoder.")
    n_res_channel: int = Field(
        default=32, ge=1, le=4096, description="Hidden channels of each residual block.")
    embed_dim: int = Field(default=64, ge=1, le=4096, description="Length of a code vector, both levels.")
    n_embed: int = Field(
        default=64, ge=2, le=65536,
        description="Codes per codebook (one codebook per level). 64 since 2026-12-07 (512, the "
                    "report's, before): a volume file 39 % smaller at about the same SSIM on the "
                    "phantom (docs/benchmarks.md).")
    decay: float = Field(default=0.99, gt=0, lt=1, description="EMA decay of the codebooks.")
    eps: float = Field(default=1e-5, gt=0, description="Laplace smoothing of the EMA cluster sizes.")
    init_from_data: bool = Field(
        default=True,
        description="Initialise the codebooks from the first training batch's encoder outputs; "
                    "false: standard normal vectors.")
    restart_dead_codes: bool = Field(
        default=True,
        description="Re-seed codes whose EMA usage falls below dead_code_threshold from encoder "
                    "outputs of the current batch.")
    dead_code_threshold: float = Field(
        default=1.0, ge=0,
        description="EMA cluster size (vectors per batch) below which a code counts as dead; 0 "
                    "never restarts.")
    restart_from: Literal["random", "worst"] = Field(
        default="worst",
        description="A dead code restarts at a random encoder output (random, the default before "
                    "2026-12-07) or at the ones farthest from their nearest code (worst): on four "
                    "seeds of the phantom's default run every volume file smaller (0.159 against "
                    "0.162 bits per pixel on average) at the same test SSIM (docs/benchmarks.md). "
                    + stored_default("model", "restart_from"))
    kmeans_iters: int = Field(
        default=0, ge=0, le=100,
        description="Lloyd iterations refining the data initialisation on the first batch. "
                    + stored_default("model", "kmeans_iters"))
    lookup: Literal["euclidean", "cosine"] = Field(
        default="cosine",
        description="Code lookup: cosine looks codes up by direction (unit-length vectors and "
                    "codes; keeps the top level alive); euclidean is the report's. "
                    + stored_default("model", "lookup"))
    block: Literal["relu", "norm"] = Field(
        default="relu",
        description="Residual block: relu (the report's: ReLU, 3x3 conv, ReLU, 1x1 conv) or norm "
                    "(GroupNorm, SiLU, two 3x3 convs, identity at the start); hidden width "
                    "n_res_channel. report, its old name, reads as relu. " + stored_default("model", "block"))
    bottom_dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="Training only: the fraction of training slices decoded from their top codes "
                    "alone (bottom codes zeroed), so the top level must carry the layout a prior "
                    "then draws. " + stored_default("model", "bottom_dropout"))

    @field_validator("block", mode="before")
    @classmethod
    def _old_block_name(cls, value):
        return new_name("model", "block", value)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        if isinstance(data, dict) and data.get("preset") == "report":
            return {**REPORT_MODEL, **data}  # keys given in the config win
        return data


class Optimisation(_Section):
    """The optimisation settings the VQ-VAE (``train``) and the prior (``prior``) share: the
    optimiser and its learning-rate schedule (:func:`mrivq.engine.step.build_optimizer`,
    :func:`~mrivq.engine.step.build_schedule`). Each section sets its own values."""

    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        default="auto",
        description="Peak learning rate, or auto: by the run's length in steps (2e-3 up to 4,000 "
                    "steps, 5e-4 from 13,000, log-linear between; under max_time the length "
                    "fitted to the budget).")
    optimizer: Literal["adam", "adamw"] = Field(default="adam", description="The optimiser.")
    weight_decay: float = Field(default=0.0, ge=0, description="The optimiser's weight decay.")
    betas: tuple[float, float] = Field(
        default=(0.9, 0.999), description="The optimiser's moment decay rates.")
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine",
        description="Learning rate after the warm-up: a cosine down to lr x min_lr_ratio, or "
                    "constant.")
    warmup_steps: int = Field(
        default=50, ge=0, description="Steps of linear learning-rate warm-up.")
    min_lr_ratio: float = Field(
        default=0.05, ge=0, le=1, description="The cosine ends at lr x min_lr_ratio.")
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Largest gradient norm; null: no clipping.")


class TrainConfig(Optimisation):
    """Training the VQ-VAE-2 (``mrivq train``): its length, recipe, evaluation and machine."""

    epochs: int = Field(
        default=20, ge=1,
        description="Passes over the training split (the default phantom run: 14,400 steps of "
                    "128 x 128 windows, data.train_crop auto).")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimiser steps; null: epochs decide.")
    # One slice per step: in a fixed budget, more (noisier) updates beat bigger batches
    # (measured: docs/benchmarks.md, "Choosing the default recipe").
    batch_size: int = Field(
        default=1, ge=1,
        description="Slices per step (the report's 10 learns less in the same time).")
    # Where the VQ-VAE's optimisation differs from the prior's (measured on four seeds:
    # docs/benchmarks.md, "Choosing the default recipe"):
    warmup_steps: int = Field(
        default=480, ge=0,
        description="Steps of linear learning-rate warm-up (480: two thirds of the default run's "
                    "first epoch; with 50, one seed in four restarted dead top codes for longer "
                    "and trailed the AVIF sequence at its own file's rate).")
    latent_loss_weight: float = Field(
        default=0.25, ge=0, description="Weight of the commitment loss.")
    loss: Literal["mse", "l1", "ssim_l1"] = Field(
        default="mse",
        description="Reconstruction loss: mse (the report's), l1, or ssim_l1 = ssim_weight x "
                    "(1 - SSIM) + (1 - ssim_weight) x L1, on [0, 1] in fp32 (SSIM with the "
                    "scoring protocol's window).")
    ssim_weight: float = Field(
        default=0.84, ge=0, le=1, description="The SSIM share of loss: ssim_l1.")
    ema_decay: float | None = Field(
        default=None, ge=0, lt=1,
        description="Evaluate and save an exponential moving average of the weights (and the "
                    "codebooks) with this decay per step, e.g. 0.999 (about the last 1,000 steps); "
                    "training steps the live weights. null: the live weights, as the report. "
                    + stored_default("train", "ema_decay"))
    clamp_loss: bool = Field(
        default=False,
        description="The reconstruction loss charges the reconstruction as it is scored and "
                    "decoded: clamped to the intensity range (gradients still pull a pixel "
                    "outside it back in where its target lies inside), so black below black costs "
                    "nothing. Aimed at real scans' black backgrounds, where a drift of the output's "
                    "offset dips the validation SSIM while the PSNR rises; measured: mixed there, "
                    "-0.002 test SSIM on the phantom (docs/benchmarks.md). false: the raw output, "
                    "as the report. Under data.normalize zscore (no fixed range) the loss stays "
                    "raw. " + stored_default("train", "clamp_loss"))
    restart_until: float = Field(
        default=1.0, gt=0, le=1,
        description="Dead codes are restarted (model.restart_dead_codes) during this fraction of "
                    "the training steps and not after, so that the codebooks settle for the rest "
                    "of the run; 1: to the end. " + stored_default("train", "restart_until"))
    max_time: float | None = Field(
        default=None, gt=0,
        description="Wall-clock budget of the training loop in seconds (\"90s\", \"10m\", \"2h\" "
                    "read too): after the warm-up (at least 20 steps, at most 50) the steps are timed "
                    "(evaluations included) and the schedule is fitted to the budget, then refitted "
                    "after every evaluation; epochs no longer cap the run.")

    _seconds = field_validator("max_time", mode="before")(lambda cls, value: _seconds(value))
    interval: int = Field(
        default=720, ge=1,
        description="Evaluate on the validation split every N steps (and at each epoch end, "
                    "unless max_time is set).")
    checkpoint_every: int = Field(
        default=250, ge=1, description="Write models/last.pt every N steps (and at each evaluation).")
    max_nonfinite_steps: int = Field(
        default=10, ge=1,
        description="Stop after this many NaN/Inf losses or gradients in a row (such steps are "
                    "skipped).")
    sample_size: int = Field(
        default=8, ge=1, description="Validation slices in samples/epoch_{i}.png.")
    val_batch_size: int | None = Field(
        default=16, ge=1, description="Slices per validation forward pass; null: batch_size.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where training runs; auto: CUDA when present, else the CPU.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Training precision; auto: bf16 on CUDA and on CPUs with native bf16, else "
                    "fp32. Validation and every score run in fp32.")
    compile: Literal["auto"] | bool = Field(
        default="auto",
        description="torch.compile the training step; auto: on CUDA, not on the CPU (slower in a "
                    "measured CPU run); eager if compiling fails.")
    num_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch; null: torch's default.")
    tensorboard: bool = Field(
        default=False,
        description="Also log to logging/tensorboard (pip install 'mrivq[tensorboard]').")


class PredictConfig(_Section):
    """Scoring a trained model on the test split (``mrivq predict``)."""

    batch_size: int = Field(default=10, ge=1, description="Test slices per forward pass.")
    sample_sets: int = Field(
        default=3, ge=0, description="Number of samples/predict_set_{i}.png grids.")
    sample_size: int = Field(default=10, ge=1, description="Slices per grid.")
    checkpoint: Path | None = Field(
        default=None, description="The model to score; null: output.dir/models/best.pt.")
    codec_rates: Literal["written", "files"] = Field(
        default="written",
        description="Where the standard codecs are compared with the model: written, at the rate of the "
                    "file `mrivq encode` writes with the models given (prior-coded with --prior, else "
                    "frequency-coded); files, at the rate of each codes file predict codes (frequency-coded "
                    "and, with --prior, prior-coded: twice the codec work). The rate-distortion curves "
                    "show every rate either way.")


#: Every prior kind's ``condition_blocks`` field.
_CONDITION_BLOCKS = {"default": 2, "ge": 0, "le": 64,
                     "description": "Residual blocks over the top codes that condition the bottom prior."}


class PassPriorSettings(_Section):
    """The pass prior (prior.kind: passes): residual convolutions over each grid."""

    channels: int = Field(
        default=64, ge=8, le=1024, description="Width of the convolutions.")
    layers: int = Field(
        default=6, ge=1, le=32,
        description="Residual 3x3 convolutions per grid (dilations 1, 2, 4 in turn).")
    passes_top: int = Field(
        default=3, ge=1, le=5,
        description="Passes over the top grid (5: dyadic over 4x4 tiles; 3: a quarter, a "
                    "quarter, then the checkerboard's other half: 0.7 % more bits, 12 % faster "
                    "coding than 5, measured in docs/compression.md).")
    passes_bottom: int = Field(
        default=2, ge=1, le=5, description="Passes over the bottom grid (2: a checkerboard).")
    condition_blocks: int = Field(**_CONDITION_BLOCKS)
    condition_shuffle: bool = Field(
        default=True,
        description="The top codes give each of the four bottom positions under them features of "
                    "its own (a 1x1 convolution and depth to space: 1 % fewer bits for a slice coded alone); false: "
                    "the same features repeated. " + stored_default("passes", "condition_shuffle"))
    head_channels: int = Field(
        default=256, ge=0, le=1024,
        description="A 1x1 convolution to this many features and a ReLU before each net's logits, "
                    "at the coded positions only (0: the logits straight from the convolutions' "
                    "channels; measured in docs/compression.md). " + stored_default("passes", "head_channels"))
    neighbour_codes: bool = Field(
        default=False,
        description="Each position is also handed the codes of its eight nearest neighbours known "
                    "before its pass, each offset through its own embedding and its own table of "
                    "log-odds added to the logits: 1 % fewer bits for a slice coded alone, coding "
                    "about 20 % slower, a prior file 3x as large (docs/compression.md). "
                    + stored_default("passes", "neighbour_codes"))
    top_masks: float = Field(
        default=0.5, ge=0, le=0.9,
        description="Share of the top net's training grids that predict the unknown codes of a random "
                    "mask (of a slice drawn alone) rather than a coding pass's; above 0, samples draw "
                    "the top grid in 8 steps, the most confident codes first, rather than in its coding "
                    "passes (whose first sees no code): 0.5 draws cleaner slices (SSIM to the nearest "
                    "training slice 0.543 against 0.511 on the phantom) for a file 0.2 % (phantom) to "
                    "1 % (real scans) larger (docs/compression.md). " + stored_default("passes", "top_masks"))


class VolumePriorSettings(PassPriorSettings):
    """The volume prior (prior.kind: volume): a pass prior that codes each slice given the codes
    of two slices of its volume, one on either side (HipMRI's case_NNN_week_W_slice_S names)."""

    key_every: int = Field(
        default=8, ge=1, le=1024,
        description="Every this many consecutive slices of a volume (and its last) a key slice is "
                    "coded alone; the slices between are coded given two coded ones, halving the "
                    "gaps (1: every slice alone). Decoding one slice decodes at most "
                    "2 log2(key_every) others.")


class RowPriorSettings(_Section):
    """The row prior (prior.kind: rows): causal convolutions coding each grid a row at a time."""

    channels: int = Field(default=64, ge=8, le=1024, description="Width of the convolutions.")
    layers: int = Field(
        default=6, ge=1, le=32,
        description="Residual 3x3 convolutions per grid (dilations 1, 2, 4 in turn), each reading the "
                    "row its dilation above and its own row only.")
    condition_blocks: int = Field(**_CONDITION_BLOCKS)
    condition_shuffle: bool = Field(
        default=True,
        description="The top codes give each of the four bottom positions under them features of "
                    "its own (a 1x1 convolution and depth to space); false: the same features repeated.")
    head_channels: int = Field(
        default=256, ge=0, le=1024,
        description="A 1x1 convolution to this many features and a ReLU before each net's logits "
                    "(0: the logits straight from the convolutions' channels).")
    key_every: int = Field(
        default=8, ge=1, le=1024,
        description="As prior.volume.key_every: every this many consecutive slices of a volume (and "
                    "its last) a key slice is coded alone, the slices between given two coded ones.")


class TransformerPriorSettings(_Section):
    """The transformer prior (prior.kind: transformer): causal transformers over each grid."""

    d_model: int = Field(
        default=128, ge=8, le=4096, description="Width of both transformers.")
    n_head: int = Field(
        default=4, ge=1, le=64, description="Attention heads; must divide d_model.")
    n_layer_top: int = Field(
        default=4, ge=1, le=64,
        description="Blocks of the top-code prior (full causal attention).")
    n_layer_bottom: int = Field(
        default=3, ge=1, le=64, description="Blocks of the bottom-code prior.")
    bottom_window_rows: int | None = Field(
        default=2, ge=1, le=4096,
        description="The bottom prior's attention sees this many code rows back; null: the whole "
                    "past.")
    condition_blocks: int = Field(**_CONDITION_BLOCKS)
    neighbour_codes: bool = Field(
        default=True,
        description="Each position is also given the codes left, two left, above-left, above, "
                    "above-right and two above it (mrivq.nn.transformer_prior.NEIGHBOURS); "
                    "false: attention alone finds them. " + stored_default("prior", "neighbour_codes"))
    dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="Dropout on the residual branches; worth 0.1 for long runs on small data.")

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        return self


class PriorCopies(_Section):
    """The training copies: more training codes from moved, zoomed and mirrored training slices."""

    flip: Literal["none", "horizontal"] = Field(
        default="horizontal",
        description="horizontal: the training codes also include those of every training slice "
                    "and each shifted or zoomed copy mirrored left-right as the pictures show a "
                    "slice (the patient's sides swapped: a mirrored pelvis is still a plausible "
                    "pelvis); none: not.")
    shift: list[int] = Field(
        default=[4, 8],
        description="The training codes also include those of every training slice moved by "
                    "each of these whole pixels up, down, left and right (edges repeated); "
                    "encoded once and cached, validation never. [] or 0: none.")
    scale: list[float] = Field(
        default=[0.92, 1.08],
        description="And of every training slice zoomed by each of these factors about the "
                    "centre (in [0.5, 2], not 1). [] or 0: none.")

    @field_validator("shift", "scale", mode="before")
    @classmethod
    def _one_or_more(cls, value):
        """One number reads as a list of one; 0 (or none) as no copies."""
        if value is None or value == 0:
            return []
        return [value] if isinstance(value, (int, float)) else value

    @field_validator("shift")
    @classmethod
    def _shifts_positive(cls, value):
        if any(shift < 1 for shift in value):
            raise ValueError("shifts are whole pixels, at least 1 (0 or [] for none)")
        return value

    @field_validator("scale")
    @classmethod
    def _scales_near_one(cls, value):
        if any(not 0.5 <= scale <= 2 or scale == 1 for scale in value):
            raise ValueError("zoom factors must lie in [0.5, 2] and not be 1 ([] for none)")
        return value


#: The settings section of each prior kind: ``prior.kind: NAME`` selects the kind, ``prior.NAME``
#: holds its settings, validated by the class. More kinds: :func:`register_prior_section`.
PRIOR_SECTIONS: dict[str, type[BaseModel]] = {"passes": PassPriorSettings, "volume": VolumePriorSettings,
                                              "transformer": TransformerPriorSettings, "rows": RowPriorSettings}

#: The kinds PriorConfig declares a section for; registered kinds' sections are checked by
#: PriorConfig._registered_sections.
_BUILT_IN_KINDS = tuple(PRIOR_SECTIONS)


def register_prior_section(name: str, settings: type[BaseModel]) -> None:
    """Register a prior kind at run time: ``prior.kind: name`` selects it and ``prior.<name>``
    holds its settings, validated by ``settings`` (unknown keys in it are errors naming the key).
    Registering a name again replaces its class; tests may also ``monkeypatch.setitem`` the
    registry :data:`PRIOR_SECTIONS`."""
    if not (isinstance(settings, type) and issubclass(settings, BaseModel)):
        raise TypeError(f"prior section {name!r}: expected a pydantic model class, got {settings!r}")
    if name in _BUILT_IN_KINDS and settings is not PRIOR_SECTIONS[name] or (
            name not in _BUILT_IN_KINDS and (not name.isidentifier() or name in PriorConfig.model_fields)):
        raise ValueError(f"{name!r} cannot name a prior kind: it is a prior key already, or not a "
                         "plain name")
    PRIOR_SECTIONS[name] = settings


def _nested(name: str, settings: type[BaseModel]):
    """The section ``prior.<name>``, its defaults those of ``settings``; its description names the
    flat keys it replaces."""
    old = [f"prior.{old}" for old, moved in PRIOR_MOVED.items() if any(m.startswith(f"{name}.") for m in moved)]
    were = f" (were {', '.join(old)})" if old else ""
    return Field(default_factory=settings, description=f"{settings.__doc__.splitlines()[0]}{were}.")


class PriorConfig(Optimisation):
    """The autoregressive prior over codes (``mrivq train-prior``); grid shapes come from the VQ-VAE.

    A prior over the top codes and one over the bottom codes given the top. `prior.kind` chooses
    the kind and `prior.<kind>` holds its sizes (`prior.passes`, `prior.volume`, `prior.transformer`);
    `prior.copies` the training copies. The defaults are sized for a CPU (the volume prior: about
    15 minutes on 2 cores with bf16; the transformer about 30); on a GPU try the transformer with
    transformer.d_model 256, 8 + 8 layers, transformer.bottom_window_rows null, batch_size 32 and
    several thousand steps.

    Earlier the prior's keys were flat (prior.architecture, prior.channels, prior.d_model,
    prior.condition_blocks, prior.augment_shift, ...); those names still load, each with one
    line on stderr naming its new key (stored configs silently).
    """

    kind: str = Field(
        default="volume",
        description="Which prior (was prior.architecture). volume: a pass prior that codes each "
                    "slice of a volume given slices on either side of it (sizes and key_every in "
                    "prior.volume; slices named case_NNN_week_W_slice_S and the slices of 3-D "
                    "inputs are volumes, other names single slices, coded as key slices). "
                    "passes: residual convolutions predicting each grid in a few interleaved "
                    "passes, every slice alone (sizes in prior.passes): 4 % smaller files of "
                    "single slices, 10-15 % faster coding. "
                    "transformer: causal transformers coding one code at a time in raster order "
                    "(sizes in prior.transformer): files about a fifth smaller, coding an order "
                    "of magnitude slower. rows: causal convolutions coding each grid a row at a "
                    "time, even columns then odd ones, slices of volumes as the volume prior does "
                    "(sizes in prior.rows). All code through an integer copy, so their files "
                    "decode bit for bit on any machine, thread count or device. A kind "
                    "registered at run time (mrivq.compression.priors.register) takes its "
                    "settings from prior.<kind>. " + stored_default("prior", "architecture"))
    passes: PassPriorSettings = _nested("passes", PassPriorSettings)
    volume: VolumePriorSettings = _nested("volume", VolumePriorSettings)
    transformer: TransformerPriorSettings = _nested("transformer", TransformerPriorSettings)
    rows: RowPriorSettings = _nested("rows", RowPriorSettings)
    copies: PriorCopies = _nested("copies", PriorCopies)
    steps: int = Field(default=2500, ge=1, description="Optimiser steps.")
    # Where the prior's optimisation differs from the VQ-VAE's (measured at these values):
    lr: float = Field(
        default=2e-3, gt=0,
        description="Peak learning rate (a number: the prior's short runs were measured at 2e-3).")
    optimizer: Literal["adam", "adamw"] = Field(default="adamw", description="The optimiser.")
    weight_decay: float = Field(default=0.01, ge=0, description="The optimiser's weight decay.")
    max_time: float | None = Field(
        default=None, gt=0,
        description="Wall-clock budget of the prior in seconds (\"90s\", \"10m\", \"2h\" read "
                    "too), as train.max_time: instead of prior.steps, as many steps as fit, the "
                    "schedule fitted to them. Reading the slices and encoding the training codes "
                    "(with their augmented copies) come out of it too.")
    batch_size: int = Field(default=8, ge=1, description="Code grids per step.")
    interval: int = Field(default=250, ge=1, description="Validation NLL every N steps.")
    checkpoint_every: int = Field(
        default=100, ge=1,
        description="Write models/prior_last.pt every N steps (and at each evaluation).")

    # Sections of kinds registered at run time are extra keys, each validated by its class.
    model_config = ConfigDict(extra="allow")

    _seconds = field_validator("max_time", mode="before")(lambda cls, value: _seconds(value))

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value):
        if value not in PRIOR_SECTIONS:
            raise ValueError(f"unknown prior kind {value!r}; known kinds: {', '.join(PRIOR_SECTIONS)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _registered_sections(cls, data):
        """``prior.<name>`` of a kind registered at run time, validated by its class (the selected
        kind's with its defaults when not given); any other key not declared is an error."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        kind = data.get("kind")
        if isinstance(kind, str) and kind not in cls.model_fields and kind in PRIOR_SECTIONS:
            data.setdefault(kind, {})
        errors = []
        for key in [key for key in data if key not in cls.model_fields]:
            settings = PRIOR_SECTIONS.get(key)
            if settings is None:
                errors.append({"type": "extra_forbidden", "loc": (key,), "input": data[key]})
                continue
            try:
                data[key] = _registered(settings, data[key])
            except ValidationError as exc:  # the same errors, at prior.<key>.<what>
                errors += [{"type": PydanticCustomError(error["type"], error["msg"]),
                            "loc": (key, *error["loc"]), "input": error["input"]} for error in exc.errors()]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data

    @property
    def settings(self) -> BaseModel:
        """The settings of the selected kind: ``prior.passes``, ``prior.transformer``, or the
        ``prior.<kind>`` of a registered kind (its class's defaults when the config has none)."""
        if self.kind in _BUILT_IN_KINDS:
            return getattr(self, self.kind)
        given = (self.__pydantic_extra__ or {}).get(self.kind)
        return given if given is not None else PRIOR_SECTIONS[self.kind]()


def _registered(settings: type[BaseModel], value) -> BaseModel:
    """A registered kind's section validated by its class; a key it does not declare is an error
    even where the class would ignore it."""
    if isinstance(value, settings):
        return value
    if isinstance(value, dict) and settings.model_config.get("extra") not in ("allow", "forbid"):
        unknown = [{"type": "extra_forbidden", "loc": (key,), "input": item}
                   for key, item in value.items() if key not in settings.model_fields]
        if unknown:
            raise ValidationError.from_exception_data(settings.__name__, unknown)
    return settings.model_validate(value)


class OutputConfig(_Section):
    """Where a run writes: the run directory and its four folders."""

    dir: Path = Field(
        default=Path("runs/default"),
        description="The run directory (config, metrics, report, manifest); the four folders "
                    "below are its children unless set. A report-layout config without dir: "
                    "their common parent, or runs/default if that is the working directory.")
    log_dir: Path | None = Field(default=None, description="Logs; null: output.dir/logging.")
    sample_dir: Path | None = Field(default=None, description="Sample grids; null: output.dir/samples.")
    visual_dir: Path | None = Field(default=None, description="Plots; null: output.dir/visuals.")
    model_dir: Path | None = Field(default=None, description="Checkpoints; null: output.dir/models.")


def _section(section: type[_Section]):
    """A section of :class:`Config`, its defaults by default, described by its docstring's first line."""
    return Field(default_factory=section, description=section.__doc__.splitlines()[0])


class Config(_Section):
    """A whole mrivq config: the seed and one section each for data, model, train, predict, prior
    and output."""

    seed: int = Field(
        default=0,
        description="Seeds Python, NumPy and torch; also the seed of a flat folder's split.")
    data: DataConfig = _section(DataConfig)
    model: ModelConfig = _section(ModelConfig)
    train: TrainConfig = _section(TrainConfig)
    predict: PredictConfig = _section(PredictConfig)
    prior: PriorConfig = _section(PriorConfig)
    output: OutputConfig = _section(OutputConfig)
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
        try:
            raw = moved_keys(raw)  # old key names, each with a deprecation line (mrivq.compat)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for item in overrides:
        apply_override(raw, item)
    config = validate(raw, source=str(path) if path else "defaults")
    config._source = path.resolve() if path is not None else None
    return config


def apply_override(raw: dict, item: str) -> None:
    """Apply one ``section.key=value`` override in place; the value is parsed as YAML.

    A key under an old name sets today's key(s), with a deprecation line (:mod:`mrivq.compat`).
    """
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    for dotted in current_keys(key.strip()):
        parts = dotted.split(".")
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = copy.deepcopy(value)


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
    not today's default (:func:`mrivq.compat.stored_config`).
    """
    return validate(stored_config(raw) if isinstance(raw, dict) else raw, source="stored config")
