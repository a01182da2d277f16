"""Checkpoints: atomic saves, weights-only loads, and the models they describe (VQ-VAE-2, prior).

A checkpoint is a dict of tensors and plain containers (numbers, strings, lists, dicts),
so it loads with ``torch.load(weights_only=True)``: a file carrying pickled objects is
refused before any of its code could run.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import reprlib
from pathlib import Path

import numpy as np
import torch

from mrivq.compression.codec import Codec
from mrivq.compression.container import MAX_SCALE, CodesFile
from mrivq.compression.priors import PRIORS, build_prior
from mrivq.config import Config, config_from_dict
from mrivq.data.preprocess import Preprocessing
from mrivq.errors import UserError
from mrivq.nn import VQVAE2
from mrivq.run_dir import atomic_write

FORMAT = "mrivq-vqvae2"
FORMAT_VERSION = 1
PRIOR_KIND = "code-prior"  # a prior checkpoint's ``kind``
#: What a prior's integer copy needs to code the slices it has in flight (its kind's
#: ``working_memory``) may be at most this much: a checkpoint cannot ask for more.
MAX_PRIOR_CACHE_BYTES = 4 << 30


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write a checkpoint dict atomically; ``payload`` holds tensors and plain containers."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with ``weights_only=True``; clear :class:`UserError` for bad files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (train first with `mrivq train`, "
                        "or pass --checkpoint FILE)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise UserError(f"{path}: refused to load: the file carries pickled objects that could run "
                        f"code ({first[:160]}); only mrivq checkpoints are accepted") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a damaged pickle stream fails in many ways, all "corrupt"
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt: {detail})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not an mrivq checkpoint")
    return ckpt


def checkpoint_config(ckpt: dict, path: str | Path = "checkpoint") -> Config:
    stored = ckpt.get("config")
    if not isinstance(stored, dict):
        raise UserError(f"{path}: its stored config is missing or not a mapping; not an mrivq checkpoint")
    try:
        return config_from_dict(stored)
    except UserError as exc:
        raise UserError(f"{path}: its stored config is invalid ({exc})") from None


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> VQVAE2:
    """Build the VQ-VAE-2 described by a checkpoint's config and load its weights (the config
    checked against the weights' shapes before the model is built)."""
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        kind = " (it is a prior's: give the VQ-VAE's models/best.pt)" if isinstance(ckpt, dict) and ckpt.get(
            "kind") else ""
        raise UserError(f"{path}: holds no VQ-VAE weights{kind}")
    config = checkpoint_config(ckpt, path)
    return build_checked(lambda: VQVAE2(**config.model.model_dump()), ckpt["model"], path, "VQ-VAE")


def build_checked(build, state, path: str | Path, what: str) -> torch.nn.Module:
    """``build()`` loaded with ``state``, once ``state`` is known to be tensors of exactly the
    names and shapes ``build()`` makes: the model is first built on the meta device (no memory),
    so a stored config that asks for a huge model is refused before anything is allocated."""
    if not (isinstance(state, dict) and all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                            and value.layout == torch.strided for key, value in state.items())):
        raise UserError(f"{path}: its {what} weights are not a mapping of names to tensors; not an mrivq checkpoint")
    try:
        with _shapes_only():
            expected = {name: tuple(t.shape) for name, t in build().state_dict().items()}
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: its stored {what} config cannot build a model ({exc})") from None
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        differs = sorted(set(found) ^ set(expected)) or [n for n in sorted(found) if found[n] != expected[n]]
        name = differs[0]
        shown = {key: list(shape) if shape is not None else "none" for key, shape in
                 (("file", found.get(name)), ("config", expected.get(name)))}
        raise UserError(f"{path}: its {what} weights do not fit the model config stored with them ({name}: "
                        f"{shown['file']} in the file, {shown['config']} from the config); not a checkpoint "
                        "mrivq wrote, or damaged")
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise UserError(f"{path}: its {what} weights hold NaN or Inf; the file is damaged")
    model = build()
    load_model_state(model, state, path)
    return model


#: The initialisers models call (``torch.nn.init``), skipped when only shapes are wanted.
_INITIALISERS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def _shapes_only():
    """Modules built on the meta device (no memory) with their initialisers skipped: only the
    shapes are wanted, and the first ``normal_`` on the meta device imports ``torch._dynamo``
    (a second of every command that loads a checkpoint)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    for name in _INITIALISERS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, initialiser in saved.items():
            setattr(torch.nn.init, name, initialiser)


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path = "checkpoint") -> None:
    if not isinstance(state, dict):
        raise UserError(f"{path}: its weights are a {type(state).__name__}, not a mapping of tensors; "
                        "not an mrivq checkpoint")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: weights do not fit the model config ({detail}); "
                        "use the config the checkpoint was trained with") from None


def export_safetensors(model: torch.nn.Module, config: Config, path: Path) -> None:
    """Model weights as safetensors, with the config as JSON in the metadata, for sharing."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(state, metadata={"format": FORMAT, "config": json.dumps(config.to_dict())})
    atomic_write(path, lambda fh: fh.write(blob))


def run_config(config: Config, trained: Config, checkpoint: Path) -> tuple[Config, list[str]]:
    """The config a command (predict, train-prior) runs a trained model with.

    Data settings and the seed are the checkpoint's own, so the splits are the ones the model
    was trained with; a ``data.*`` key or ``seed`` given explicitly (in ``--config`` or
    ``--set``) wins. Outputs go to the checkpoint's run directory unless an ``output.*`` key
    is given. Returns that config and a description of each explicit setting that differs
    from training (``"seed=1 (trained with 0)"``), for the log.
    """
    explicit = {key: getattr(config.data, key) for key in config.data.model_fields_set}
    differs = [f"data.{key}={value} (trained with {getattr(trained.data, key)})"
               for key, value in explicit.items() if value != getattr(trained.data, key)]
    # Where caches are written is the user's choice, never the checkpoint's (a file someone sent).
    explicit["cache_dir"] = config.data.cache_dir
    seed = config.seed if "seed" in config.model_fields_set else trained.seed
    if seed != trained.seed:
        differs.append(f"seed={seed} (trained with {trained.seed})")
    output = config.output if config.output.model_fields_set else _checkpoint_output(trained, checkpoint)
    merged = config.model_copy(update={"data": trained.data.model_copy(update=explicit), "seed": seed,
                                       "output": output})
    return merged, differs


def _checkpoint_output(trained: Config, checkpoint: Path):
    """The output section of the run a checkpoint belongs to (``RUN_DIR/models/NAME.pt``): found
    from where the file is, never from the folders its config names (a file someone sent must
    not choose where mrivq writes)."""
    folder = Path(checkpoint).expanduser().absolute().parent
    if folder.name == "models":
        return trained.output.model_copy(update={"dir": folder.parent, "log_dir": None, "sample_dir": None,
                                                 "visual_dir": None, "model_dir": folder})
    raise UserError(f"{checkpoint} is not in a run directory's models/ folder; say where the outputs go "
                    "with --set output.dir=FOLDER")


def load_vqvae(path: str | Path, device: torch.device | str = "cpu") -> tuple[VQVAE2, Config]:
    """The VQ-VAE-2 of a training checkpoint (eval mode, on ``device``, channels-last as training and
    evaluation run it) and the config it was trained with."""
    path = Path(path).expanduser()
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") == PRIOR_KIND:
        raise UserError(f"{path} is a prior checkpoint; give the VQ-VAE's checkpoint "
                        "(e.g. runs/default/models/best.pt)")
    model = model_from_checkpoint(ckpt, path).to(device).to(memory_format=torch.channels_last).eval()
    return model, checkpoint_config(ckpt, path)


def load_prior(path: str | Path, expect_fingerprint: str | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.nn.Module, VQVAE2, dict]:
    """The prior and its VQ-VAE (eval mode, on ``device``) and the raw checkpoint of ``mrivq train-prior``.

    ``expect_fingerprint``: the :func:`~mrivq.compression.codec.model_fingerprint` of the VQ-VAE the prior must belong to.
    Everything the commands read from the checkpoint is checked first: its shape against the
    VQ-VAE it holds, its weights against its config, the reference slice ``sample`` writes with.
    """
    path = Path(path).expanduser()
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != PRIOR_KIND:
        raise UserError(f"{path} is not a prior checkpoint; train one with `mrivq train-prior` "
                        "and give its models/prior_best.pt")
    if expect_fingerprint is not None and ckpt.get("fingerprint") != expect_fingerprint:
        raise UserError(f"{path} was trained on another VQ-VAE's codes (or by an older mrivq); give "
                        "the prior trained with this checkpoint, or train one with `mrivq train-prior`")
    if not isinstance(ckpt.get("vqvae"), dict):
        raise UserError(f"{path}: holds no VQ-VAE; not a prior checkpoint mrivq wrote")
    vq_config = checkpoint_config(ckpt["vqvae"], path)
    config = checkpoint_config(ckpt, path)
    n_embed, top_grid = _prior_shape(ckpt, vq_config, config, path)
    prior = build_checked(lambda: build_prior(config.prior, n_embed, top_grid), ckpt.get("prior"), path, "prior")
    # the integer copy that codes (priors saved before such copies existed have none: they sample only)
    if "integer" in ckpt:
        kind = PRIORS[config.prior.kind]
        problem = kind.copy_problem(ckpt["integer"], prior)
        if problem:
            raise UserError(f"{path}: its integer coding copy {problem}; not a prior checkpoint mrivq wrote, "
                            "or damaged")
        prior.integer = kind.load_copy(ckpt["integer"]).to(device)
    vqvae = model_from_checkpoint(ckpt["vqvae"], path)
    return prior.to(device).eval(), vqvae.to(device).eval(), ckpt


def _prior_shape(ckpt: dict, vq_config: Config, config: Config, path: Path) -> tuple[int, tuple[int, int]]:
    """The prior's codebook size and top grid, which must be those of the VQ-VAE it holds; and
    the memory its integer copy takes when coding, within a bound."""
    height, width = vq_config.data.image_size
    expected = {"n_embed": vq_config.model.n_embed, "top_grid": [-(-height // 8), -(-width // 8)]}
    if ckpt.get("prior_shape") != expected:
        raise UserError(f"{path}: its prior_shape {reprlib.repr(ckpt.get('prior_shape'))} is not its VQ-VAE's "
                        f"{expected}; not a prior checkpoint mrivq wrote, or damaged")
    what, size = PRIORS[config.prior.kind].working_memory(config.prior.settings, expected["top_grid"])
    if size > MAX_PRIOR_CACHE_BYTES:
        raise UserError(f"{path}: its prior would need {size / 2**30:.1f} GiB of {what} to code (at most "
                        f"{MAX_PRIOR_CACHE_BYTES >> 30} GiB); not a prior mrivq trains")
    return expected["n_embed"], tuple(expected["top_grid"])


def prior_reference(ckpt: dict, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The reference slice of a prior checkpoint (``load_prior``'s): the affine ``(4, 4)`` and the
    intensity scale ``(2,)`` that ``sample`` writes its slices with, checked."""
    reference = ckpt.get("reference")
    ok = isinstance(reference, dict) and isinstance(reference.get("image_size"), (list, tuple)) and all(
        torch.is_tensor(reference.get(key)) and reference[key].is_floating_point()
        and reference[key].layout == torch.strided for key in ("affine", "norm"))
    if ok:
        affine, norm = reference["affine"].detach().double().numpy(), reference["norm"].detach().double().numpy()
        vq_config = checkpoint_config(ckpt["vqvae"], path)
        ok = (list(reference["image_size"]) == list(vq_config.data.image_size) and norm.shape == (2,)
              and affine.shape == (4, 4) and np.isfinite(affine).all() and np.isfinite(norm).all()
              and np.abs(norm).max() < MAX_SCALE)
    if ok:
        return affine, norm.astype(np.float32)
    raise UserError(f"{path}: its reference slice (image size, affine, intensity scale) is missing or "
                    "invalid; not a prior checkpoint mrivq wrote, or damaged")


def load_codec(checkpoint: str | Path, *, prior: str | Path | None = None, device: torch.device | str = "cpu",
               codes_file: CodesFile | None = None, codes_path: Path | str = "codes file") -> Codec:
    """The :class:`~mrivq.compression.codec.Codec` of a VQ-VAE checkpoint and (optionally) a prior of it.

    To decode ``codes_file``, it is checked against the model first, and its prior too.
    """
    model, trained = load_vqvae(checkpoint, device)
    codec = Codec(model, Preprocessing.from_settings(trained.data))
    if codes_file is not None:
        codec.check_model(codes_file, codes_path)
    if prior is not None and (codes_file is None or codes_file.header["coder"] == "prior"):
        codec.prior, _, _ = load_prior(prior, expect_fingerprint=codec.fingerprint, device=device)
        codec.prior_name = str(prior)
    if codes_file is not None:
        codec.check_prior(codes_file, codes_path)
    return codec
