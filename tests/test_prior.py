"""The code prior: cached sampling is exact, a tiny prior learns, train-prior resumes, sample writes slices."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PINNED_PRECISION, comparable, run_main
from prior_helpers import (
    flat_prior,
    prior_overrides,
    tiny_data_overrides,
    use_step_clock,
)

from mrivq.apps import train_prior as train_prior_module
from mrivq.apps.predict import compared_rates
from mrivq.apps.train_prior import prior_loop, train_prior
from mrivq.compression.container import read_codes_file
from mrivq.config import load_config
from mrivq.engine.checkpoint import load_checkpoint, load_prior, save_checkpoint
from mrivq.engine.prior_training import PriorTraining
from mrivq.nn.transformer_prior import TransformerPrior
from mrivq.run_dir import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.mark.parametrize("window_rows", [None, 1], ids=["full-attention", "window-of-one-row"])
@pytest.mark.parametrize("chunks", [[1] * 48, [4, 4, 40], [5, 1, 7, 3, 32]], ids=["one-by-one", "fours", "uneven"])
def test_logits_teacher_forced_through_the_cache_equal_the_full_pass(window_rows, chunks):
    torch.manual_seed(0)
    prior = TransformerPrior(32, (4, 3), d_model=16, n_head=2, n_layer_top=2, n_layer_bottom=2,
                      bottom_window_rows=window_rows).eval()  # bottom grid 8x6: a row is 6 positions
    top = torch.randint(0, 32, (2, 4, 3))
    bottom = torch.randint(0, 32, (2, 8, 6))
    with torch.inference_mode():
        _, full = prior(top, bottom)  # (2, 32, 8, 6)
        condition = prior.condition(top)
        flat = bottom.reshape(2, -1)
        cache, pieces, position = prior.bottom.new_cache(2), [], 0
        for size in chunks:
            known = flat.clone()
            known[:, position + size - 1:] = 31  # codes from the chunk's last position on are not read
            pieces.append(prior.bottom.cached_logits(known, position, cache, condition, length=size))
            position += size
    cached = torch.cat(pieces, dim=1)  # (2, 48, 32)
    torch.testing.assert_close(cached, full.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_each_position_sees_earlier_codes_only_and_its_neighbours_beyond_the_window():
    torch.manual_seed(0)
    # Attention window of one row (6 positions): the codes one and two rows above reach a
    # position only through the neighbour inputs.
    prior = TransformerPrior(32, (4, 3), d_model=16, n_head=2, n_layer_top=1, n_layer_bottom=1,
                      bottom_window_rows=1).eval()
    top, bottom = torch.randint(0, 32, (1, 4, 3)), torch.randint(0, 32, (1, 48))
    with torch.inference_mode():
        condition = prior.condition(top)
        before = prior.bottom(bottom.reshape(1, 8, 6), condition)
        for t in (0, 7, 23, 47):
            changed = bottom.clone()
            changed[0, t] = (changed[0, t] + 1) % 32
            after = prior.bottom(changed.reshape(1, 8, 6), condition)
            moved = (after - before).abs().amax(dim=1).flatten()  # (48,) per position
            assert moved[:t + 1].max() == 0  # no position sees its own code or a later one
            for below in (t + 6, t + 12):  # the positions one and two rows below
                if below < 48:
                    assert moved[below] > 0


def test_sliding_window_attention_equals_masked_full_attention():
    from mrivq.nn.transformer_prior import _sliding_window_attention

    q, k, v = (torch.randn(2, 3, 37, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    for window in (1, 5, 8, 36):
        query, key = torch.arange(37)[:, None], torch.arange(37)[None, :]
        mask = (key <= query) & (key > query - window)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(_sliding_window_attention(q, k, v, window), expected)


def test_a_tiny_top_p_samples_each_most_probable_code():
    torch.manual_seed(0)
    prior = TransformerPrior(16, (4, 3), d_model=16, n_head=2, n_layer_top=1, n_layer_bottom=1, condition_blocks=1).eval()
    torch.nn.init.normal_(prior.top.head.weight, std=1.0)  # peaky logits: no near-ties
    top, _ = prior.sample(3, top_p=1e-9, generator=torch.Generator().manual_seed(1))
    again, _ = prior.sample(3, top_p=1e-9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(top, again)  # no randomness left
    with torch.inference_mode():
        assert torch.equal(prior.top(top).argmax(dim=1), top)  # each code the argmax given the ones before


def test_tiny_prior_learns_a_tiny_code_distribution(tmp_path):
    # Four fixed top grids; the bottom grid is the top grid upsampled: 2 bits per slice in all.
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 32, size=(4, 8, 4))
    top = patterns[rng.integers(0, 4, size=48)]
    bottom = top.repeat(2, axis=1).repeat(2, axis=2)
    codes = {"train": (top[:40], bottom[:40]), "validate": (top[40:], bottom[40:])}
    config = load_config(None, [f"output.dir={tmp_path}", "prior.kind=transformer", "prior.transformer.d_model=32",
                                "prior.transformer.n_head=2", "prior.transformer.n_layer_top=1",
                                "prior.transformer.n_layer_bottom=1", "prior.transformer.condition_blocks=1",
                                "prior.steps=120", "prior.interval=40", "prior.batch_size=8",
                                "prior.lr=3e-3", "prior.warmup_steps=5", "prior.transformer.dropout=0",
                                *PINNED_PRECISION])
    loop = prior_loop(config, codes, n_embed=32, vqvae={}, fingerprint="-", reference={"image_size": [64, 32]})
    loop.run()
    uniform = math.log2(32)
    assert loop.history[0]["uniform_bits"] == uniform
    assert loop.state.best < 0.1 * uniform
    rows = read_metrics(tmp_path / "prior_metrics.csv")
    assert [r["step"] for r in rows] == [40, 80, 120]
    assert rows[-1]["val_nll"] < rows[0]["val_nll"]


def test_train_prior_then_sample_writes_valid_slices(work, tiny_phantom, tmp_path, capsys):
    sets = prior_overrides(tiny_phantom, work["root"], "run", steps=6, interval=3)
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 0
    run = work["root"] / "run"
    for name in ("models/prior_best.pt", "models/prior_last.pt", "prior_metrics.csv", "logging/prior.log",
                 "visuals/prior_losses.png"):
        assert (run / name).is_file(), name
    rows = read_metrics(run / "prior_metrics.csv")
    assert [r["step"] for r in rows] == [3, 6] and rows[0]["uniform_bits"] == 5
    capsys.readouterr()
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 2
    assert "already holds a prior run" in capsys.readouterr().err

    out = tmp_path / "samples"
    capsys.readouterr()
    assert run_main(["sample", "--prior", str(run / "models/prior_best.pt"), "--n", "3", "--out", str(out),
                     "--seed", "2", "--temperature", "0.9", "--top-p", "0.8"]) == 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed
    # the yardstick: the same score of the VQ-VAE's reconstructions of 3 unseen validation slices
    ref = re.search(r"reconstructions of 3 unseen validation slices score ([\d.]+) to ([\d.]+)", printed)
    assert ref and 0 < float(ref[1]) <= float(ref[2]) <= 1, printed
    assert re.search(r"resemble each other at SSIM [\d.]+ on average \(those validation slices: [\d.]+\)", printed)
    with np.load(out / "codes.npz") as npz:
        top, bottom = npz["codes_top"], npz["codes_bottom"]
    assert top.shape == (3, 8, 4) and bottom.shape == (3, 16, 8)
    assert top.max() < 32 and bottom.max() < 32
    assert (out / "samples.png").stat().st_size > 1000
    images = [nib.load(out / f"sample_{i:03d}.nii.gz") for i in range(3)]
    assert all(image.shape == (64, 32) for image in images)
    assert all(np.isfinite(np.asarray(image.dataobj)).all() for image in images)
    # each sample beside its most similar training slice, so memorisation would be visible
    rows = (out / "nearest.csv").read_text().splitlines()
    assert rows[0] == "sample,training_slice,ssim" and len(rows) == 4
    assert all(row.split(",")[1].startswith("case_") and -1 <= float(row.split(",")[2]) <= 1 for row in rows[1:])
    assert (out / "nearest.png").stat().st_size > 1000

    # the codes of the splits were kept in the cache: a second prior does not encode again
    again = prior_overrides(tiny_phantom, work["root"], "again", steps=2, interval=2)
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(again)]) == 0
    log = (work["root"] / "again" / "logging" / "prior.log").read_text()
    assert "read the cached codes of the train split" in log and "encoded the train split" not in log
    # the training codes include those of the mirrored and shifted slices (cached too); validation's do not
    moves = ("shifted up 2px", "shifted down 2px", "shifted left 2px", "shifted right 2px", "scaled 0.92x",
             "scaled 1.08x")
    for version in (*moves, "mirrored", *(f"mirrored {move}" for move in moves)):
        assert f"read the cached codes of the train split ({version})" in log
    assert "validate split (" not in log
    n_train = len(list((tiny_phantom / "keras_slices_train").glob("*.nii.gz")))
    assert f"prior: {14 * n_train} training and " in log

    # prior-coded codes files decode exactly, with the prior that coded them and no other
    test_split = tiny_phantom / "keras_slices_test"
    coded = tmp_path / "test.mrvq"
    capsys.readouterr()
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(coded),
                     "--prior", str(run / "models/prior_best.pt"), "--device", "cpu"]) == 0
    assert "range-coded under the prior, checked to decode" in capsys.readouterr().out
    plain = tmp_path / "plain.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(plain)]) == 0
    for codes_file in (coded, plain):
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(codes_file), "--out",
                         str(tmp_path / codes_file.stem), "--prior", str(run / "models/prior_best.pt")]) == 0
    for name in sorted(p.name for p in test_split.glob("*.nii.gz")):  # the same slices either way
        a, b = (np.asarray(nib.load(tmp_path / folder / name).dataobj) for folder in ("test", "plain"))
        assert np.array_equal(a, b), name
    capsys.readouterr()
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "x")]) == 2
    assert "coded under a prior: give it with --prior" in capsys.readouterr().err
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "x"),
                     "--prior", str(work["root"] / "again" / "models/prior_best.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coded under another prior" in err[0]
    assert not (tmp_path / "x").exists()


def test_a_prior_checkpoint_from_before_the_neighbour_inputs_and_integer_copies_still_loads_and_codes(
        work, tiny_phantom, tmp_path, capsys):
    config = load_config(None, prior_overrides(tiny_phantom, work["root"], "older", steps=2, interval=2,
                                               **{"transformer.neighbour_codes": "false"}))
    train_prior(config, work["vqvae"])
    ckpt = load_checkpoint(work["root"] / "older" / "models/prior_best.pt")
    assert not any(name.endswith("neighbour.weight") for name in ckpt["prior"])
    assert load_prior(work["root"] / "older" / "models/prior_best.pt")[0].integer is not None
    # as older versions wrote it: a flat prior section without neighbour_codes, no integer copy
    ckpt["config"]["prior"] = flat_prior(ckpt["config"]["prior"])
    del ckpt["config"]["prior"]["neighbour_codes"]
    older = {k: v for k, v in ckpt.items() if k not in ("format", "format_version", "integer", "integer_fingerprint")}
    save_checkpoint(tmp_path / "older.pt", older)
    prior, _, _ = load_prior(tmp_path / "older.pt")
    assert prior.top.neighbour is None and prior.bottom.neighbour is None and prior.integer is None
    top, bottom = prior.sample(2)
    assert top.shape == (2, 8, 4) and bottom.shape == (2, 16, 8)
    # without an integer copy it cannot code: one line says so, nothing is written
    test_split = tiny_phantom / "keras_slices_test"
    coded = tmp_path / "older.mrvq"
    capsys.readouterr()
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(coded),
                     "--prior", str(tmp_path / "older.pt")]) == 2
    assert "without the integer copy that codes" in capsys.readouterr().err and not coded.exists()
    # a new prior's file is raster-coded by its integer copy: no device or batch fixed
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(tmp_path / "n.mrvq"),
                     "--prior", str(work["root"] / "older" / "models/prior_best.pt")]) == 0
    header = read_codes_file(tmp_path / "n.mrvq").header
    assert header["prior_coding"] == "raster" and "prior_device" not in header and "prior_batch" not in header


def test_train_prior_resumes_to_the_same_result(work, tiny_phantom, monkeypatch):
    straight = load_config(None, prior_overrides(tiny_phantom, work["root"], "straight", steps=6, interval=3,
                                                 checkpoint_every=2, **{"transformer.dropout": 0.1}))
    train_prior(straight, work["vqvae"])

    interrupted = prior_overrides(tiny_phantom, work["root"], "interrupted", steps=6, interval=3,
                                  checkpoint_every=2, **{"transformer.dropout": 0.1})
    step = PriorTraining.train_step

    def stop_after_step_4(self, batch):
        applied = step(self, batch)
        if self.state.step == 3:  # state.step counts finished steps before this one
            os.kill(os.getpid(), signal.SIGTERM)
        return applied

    monkeypatch.setattr(PriorTraining, "train_step", stop_after_step_4)
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(interrupted)]) == 143
    monkeypatch.undo()
    run = work["root"] / "interrupted"
    assert load_checkpoint(run / "models/prior_last.pt")["step"] == 4
    assert run_main(["train-prior", "--resume", str(run)]) == 0

    a = load_checkpoint(straight.model_dir / "prior_last.pt")
    b = load_checkpoint(run / "models/prior_last.pt")
    assert a["step"] == b["step"] == 6
    for key in a["prior"]:
        assert torch.equal(a["prior"][key], b["prior"][key]), key
    assert comparable(read_metrics(straight.run_dir / "prior_metrics.csv")) == \
        comparable(read_metrics(run / "prior_metrics.csv"))


def test_prior_bad_input_is_one_line_and_exit_2(work, tiny_phantom, tmp_path, capsys):
    cases = [
        (["train-prior", "--checkpoint", str(tmp_path / "none.pt"), "--set", f"output.dir={tmp_path / 'r'}"],
         "checkpoint not found"),
        (["train-prior", "--set", f"output.dir={tmp_path / 'r'}"], "--checkpoint"),
        (["train-prior", "--resume", str(tmp_path / "nowhere")], "not a prior run to resume"),
        (["sample", "--prior", str(work["vqvae"]), "--out", str(tmp_path / "s")], "not a prior checkpoint"),
        (["encode", "--checkpoint", str(work["vqvae"]), str(tiny_phantom / "keras_slices_test"),
          "--out", str(tmp_path / "c.mrvq"), "--prior", str(work["vqvae"])], "not a prior checkpoint"),
        (["sample", "--prior", str(work["vqvae"]), "--out", str(tmp_path / "s"), "--top-p", "0"], "--top-p"),
        (["train-prior", "--set", "prior.transformer.n_head=3"], "prior"),
        (["train-prior", "--checkpoint", str(work["vqvae"]), "--set", f"output.dir={tmp_path / 'r'}",
          "--set", "prior.copies.shift=32"], "prior.copies.shift (32) must be smaller than the slices (64 x 32)"),
        (["train-prior", "--checkpoint", str(work["vqvae"]), "--set", f"output.dir={tmp_path / 'r'}",
          "--set", "prior.copies.scale=[1.08, 3]"], "prior.copies.scale"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert run_main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()
    assert not (tmp_path / "c.mrvq").exists()


def test_prior_max_time_fits_the_prior_steps_to_the_budget(work, tiny_phantom, monkeypatch):
    """A clock on which every step takes one second: a 24-second budget is 24 prior steps,
    whatever prior.steps says, and the learning rate ends at its floor."""
    use_step_clock(monkeypatch)
    monkeypatch.setattr(train_prior_module, "_clock", lambda: 0.0)  # encoding the codes takes no time
    config = load_config(None, prior_overrides(tiny_phantom, work["root"], "timed", steps=5, interval=10,
                                               max_time="24s", min_lr_ratio=0.1))
    summary = train_prior(config, work["vqvae"])
    assert summary["steps"] == 24
    last = load_checkpoint(config.model_dir / "prior_last.pt")
    assert last["total_steps"] == 24
    assert last["scheduler"]["_last_lr"][0] == pytest.approx(config.prior.lr * 0.1, rel=1e-3)
    assert "prior.max_time 24 s: 24 steps in all" in (config.log_dir / "prior.log").read_text()


def test_prior_max_time_counts_the_encoding_of_the_codes(work, tiny_phantom, monkeypatch):
    """Encoding the training codes (and their augmented copies) is part of prior.max_time: with
    10 of 24 seconds spent there, the loop fits 14 one-second steps."""
    use_step_clock(monkeypatch)
    ticks = iter([0.0, 10.0])
    monkeypatch.setattr(train_prior_module, "_clock", lambda: next(ticks))
    config = load_config(None, prior_overrides(tiny_phantom, work["root"], "counted", steps=5, interval=10,
                                               max_time="24s"))
    assert train_prior(config, work["vqvae"])["steps"] == 14
    assert "10 s went to reading the slices and encoding their codes" in (config.log_dir / "prior.log").read_text()


def test_encode_and_predict_map_the_bits_the_prior_spends(work, tiny_phantom, tmp_path, capsys):
    sets = prior_overrides(tiny_phantom, work["root"], "mapped", steps=2, interval=2)
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 0
    prior = str(work["root"] / "mapped" / "models/prior_best.pt")
    test_split = tiny_phantom / "keras_slices_test"
    maps = tmp_path / "maps"
    encode_args = ["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(tmp_path / "t.mrvq"),
                   "--prior", prior, "--surprise", str(maps)]
    capsys.readouterr()
    assert run_main([*encode_args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    total = 0.0
    for source_path in sorted(test_split.glob("*.nii.gz")):
        source, bits = nib.load(source_path), nib.load(maps / source_path.name.replace(".nii.gz", "_bits.nii.gz"))
        assert bits.shape == source.shape and np.allclose(bits.affine, source.affine)
        data = np.asarray(bits.dataobj)
        assert np.isfinite(data).all() and (data > 0).all()
        total += float(data.sum())
    # the maps add up to the stream the range coder wrote (64x32 slices: no resampling): one
    # stream per slice, each with its length word and the coder's last two words
    stream_bits = report["bits_per_pixel"]["stream"] * report["pixels"]
    slices = len(list(test_split.glob("*.nii.gz")))
    assert total <= stream_bits <= total * 1.02 + 96 * slices
    assert (maps / "surprise.png").stat().st_size > 1000
    # a second encode into the same folder replaces the maps only when asked to
    assert run_main(encode_args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_main([*encode_args, "--overwrite"]) == 0
    # the maps measure the prior: none without it, and nothing written
    capsys.readouterr()
    assert run_main([a for a in encode_args if a != prior and a != "--prior"] + ["--overwrite"]) == 2
    assert "give the prior with --prior" in capsys.readouterr().err

    run = work["root"] / "mapped"
    assert run_main(["predict", "--checkpoint", str(work["vqvae"]), "--prior", prior,
                     *set_args(tiny_data_overrides(tiny_phantom, work["root"] / "cache")
                               + [f"output.dir={run}", "predict.sample_size=2", "predict.sample_sets=1"])]) == 0
    summary = json.loads((run / "predict" / "summary.json").read_text())
    assert summary["surprise"]["bits_per_pixel_mean"] == pytest.approx(total / report["pixels"], rel=1e-4)
    assert len(list((run / "predict" / "surprise").glob("*_bits.nii.gz"))) == summary["n_images"]
    assert (run / "visuals" / "surprise.png").stat().st_size > 1000
    # the codecs are compared at the rate of the file encode writes with that prior
    assert [table["coder"] for table in summary["codecs"]["rates"]] == ["prior"]
    assert summary["codecs"]["bits_per_pixel"] == summary["bits_per_pixel_prior_coded"]


def test_predict_compares_the_codecs_at_the_written_files_rate_or_at_every_files():
    rates = {"raw": 18.0, "frequencies": 0.6, "prior": 0.3}
    assert compared_rates(rates, "written") == {"prior": 0.3}
    assert compared_rates(rates, "files") == {"frequencies": 0.6, "prior": 0.3}
    assert compared_rates({"raw": 18.0, "frequencies": 0.6}, "written") == {"frequencies": 0.6}


def test_a_pass_prior_codes_files_any_machine_decodes_and_refuses_a_damaged_copy(work, tiny_phantom, tmp_path,
                                                                                   capsys):
    sets = prior_overrides(tiny_phantom, work["root"], "passes", steps=4, interval=2) + [
        "prior.kind=passes", "prior.passes.channels=16", "prior.passes.layers=2"]
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 0
    prior_path = work["root"] / "passes" / "models/prior_best.pt"
    ckpt = load_checkpoint(prior_path)
    assert ckpt["integer_fingerprint"] == load_prior(prior_path)[0].integer.fingerprint()
    test_split = tiny_phantom / "keras_slices_test"
    coded = tmp_path / "passes.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(coded),
                     "--prior", str(prior_path)]) == 0
    torch.set_num_threads(2)  # another thread count than the encoder's
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "d"),
                     "--prior", str(prior_path)]) == 0
    torch.set_num_threads(1)
    plain = tmp_path / "plain.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(plain)]) == 0
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(plain), "--out", str(tmp_path / "p")]) == 0
    for source in test_split.glob("*.nii.gz"):
        a, b = (np.asarray(nib.load(tmp_path / folder / source.name).dataobj) for folder in ("d", "p"))
        assert np.array_equal(a, b), source.name
    # a transformer prior cannot decode it, nor a copy whose tables were changed
    capsys.readouterr()
    other = work["root"] / "mapped" / "models/prior_best.pt"
    if not other.exists():
        other_sets = prior_overrides(tiny_phantom, work["root"], "mapped", steps=2, interval=2)
        assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(other_sets)]) == 0
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "x"),
                     "--prior", str(other)]) == 2
    assert "another prior" in capsys.readouterr().err
    ckpt["integer"]["top"]["convs"][0]["multiplier"] = ckpt["integer"]["top"]["convs"][0]["multiplier"] * 2**40
    spoiled = tmp_path / "spoiled.pt"
    save_checkpoint(spoiled, ckpt)
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "x"),
                     "--prior", str(spoiled)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "integer coding copy" in err[0] and "beyond" in err[0]
    assert not (tmp_path / "x").exists()


def test_the_samples_mutual_ssim_is_the_mean_over_every_pair_whatever_the_chunks(monkeypatch):
    from mrivq.apps import sample as sample_app
    from mrivq.engine.losses import differentiable_ssim

    rng = np.random.default_rng(0)
    slices = rng.random((7, 32, 16)).astype(np.float32)
    slices[3] = slices[2]  # one pair alike
    images = torch.from_numpy(slices)[:, None]
    expected = np.mean([float(differentiable_ssim(images[i:i + 1], images[j:j + 1]))
                        for i in range(7) for j in range(i + 1, 7)])
    monkeypatch.setattr(sample_app, "PAIR_CHUNK", 4)  # 21 pairs: 5 full chunks and one of 1
    assert sample_app._mutual_ssim(slices, "minmax") == pytest.approx(expected, abs=1e-5)
    assert sample_app._mutual_ssim(slices[:1], "minmax") is None
