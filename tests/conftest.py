"""Shared fixtures: one tiny phantom dataset per test session, tiny model configs."""

from __future__ import annotations

import pytest


def set_args(overrides: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]`` for the CLI."""
    return [arg for override in overrides for arg in ("--set", override)]


def run_main(args: list[str]) -> int:
    """``mrivq ARGS`` in this process; its exit status (cli.main always exits)."""
    from mrivq.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


def comparable(rows: list[dict]) -> list[dict]:
    """metrics.csv rows without the timing columns, which differ from run to run."""
    return [{k: v for k, v in r.items() if "per_s" not in k and k != "elapsed_s"} for r in rows]


# Tests that compare numbers train in fp32 on every machine: ``precision: auto`` picks bf16 on
# CPUs with AVX-512 BF16 and fp32 elsewhere, and bf16 results differ between the two kinds.
# The bf16 and auto paths have tests of their own (tests/test_precision.py).
PINNED_PRECISION = ["train.precision=fp32"]

TINY_MODEL = {"channel": 16, "n_res_block": 1, "n_res_channel": 8, "embed_dim": 8, "n_embed": 32}


@pytest.fixture(autouse=True, scope="session")
def prior_files_even_when_larger():
    """The tiny priors of the suite often predict worse than the codes' frequencies; encode would
    then write the frequency-coded file. Tests of the prior coders want their files all the same
    (tests/test_volume_prior.py checks the rule itself)."""
    from mrivq.compression import codec

    with pytest.MonkeyPatch.context() as patch:  # before any fixture of a wider scope writes a file
        patch.setattr(codec, "SMALLEST_FILE", False)
        yield


@pytest.fixture(scope="module")
def work(tiny_phantom, tmp_path_factory):
    """A tiny VQ-VAE trained once per test module: ``{"root": its folder, "vqvae": models/best.pt}``."""
    from prior_helpers import train_tiny_vqvae

    root = tmp_path_factory.mktemp("prior")
    return {"root": root, "vqvae": train_tiny_vqvae(tiny_phantom, root)}


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP contention (10-50x here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """A HipMRI-layout phantom of 64x32 slices: 6 cases of 6 slices each."""
    from mrivq.data.phantom import synthesize

    root = tmp_path_factory.mktemp("phantom") / "hipmri"
    synthesize(root, cases=6, seed=0, slices_per_volume=6, shape=(64, 32), montage=False)
    return root


def tiny_sets(phantom, tmp) -> list[str]:
    """``--set`` overrides for a few-step fp32 training run of a tiny model on ``phantom``,
    writing into ``tmp`` (later overrides in the same list win)."""
    sets = [f"data.root={phantom}", "data.image_size=[64,32]", f"data.cache_dir={tmp / 'cache'}",
            "data.workers=1", "train.epochs=2", "train.batch_size=4", "train.interval=4",
            "train.warmup_steps=2", "train.sample_size=3", "predict.sample_sets=2",
            "predict.sample_size=3", f"output.dir={tmp / 'run'}", "train.num_threads=1",
            *PINNED_PRECISION]
    return sets + [f"model.{k}={v}" for k, v in TINY_MODEL.items()]


@pytest.fixture
def tiny_overrides(tiny_phantom, tmp_path):
    """``--set`` overrides for a few-step training run of a tiny model on the tiny phantom."""
    return tiny_sets(tiny_phantom, tmp_path)
