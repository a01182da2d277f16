"""The row prior (prior.kind: rows): causal by construction, coded in integers row by row, files
that decode bit for bit whatever the floating-point results, threads and batches."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_main, set_args
from prior_helpers import OneUlp, prior_overrides

from mrivq.compression import driver
from mrivq.compression.container import read_codes_file
from mrivq.compression.portable.rows import IntegerRowPrior, row_copy, row_copy_problem
from mrivq.data.volumes import references
from mrivq.engine.checkpoint import load_checkpoint, load_prior, save_checkpoint
from mrivq.nn.pass_prior import referenced_grids
from mrivq.nn.row_prior import RowNet, RowPrior


def test_each_code_sees_only_the_rows_above_and_an_odd_column_its_two_neighbours():
    """Changing one code changes no logit its coder would not know it for: rows below it only, and
    in its own row the odd columns beside an even one."""
    torch.manual_seed(0)
    net = RowNet(16, (6, 8), channels=8, layers=4, head_channels=16)
    for parameter in net.parameters():
        parameter.data.normal_(0, 0.3)
    codes = torch.randint(0, 16, (1, 6, 8))
    with torch.no_grad():
        base = net(codes)
        for i, j in np.ndindex(6, 8):
            changed = codes.clone()
            changed[0, i, j] = (changed[0, i, j] + 1) % 16
            moved = (net(changed) - base).abs().sum(1)[0] > 0
            allowed = torch.zeros(6, 8, dtype=torch.bool)
            allowed[i + 1:] = True
            if j % 2 == 0:
                allowed[i, [k for k in (j - 1, j + 1) if 0 <= k < 8]] = True
            assert not (moved & ~allowed).any(), (i, j)
            assert moved[i + 1:].any() or i == 5  # and the rows below do see it


@pytest.fixture(scope="module")
def fitted():
    """A tiny row prior (8 codes) fitted to runs in which each grid repeats the one before it with a
    tenth of its codes redrawn, and its integer copy; 13 held-back grids and their references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 8, size=(8, 4))]
    for _ in range(60):
        grid = grids[-1].copy()
        change = rng.random(grid.shape) < 0.1
        grid[change] = rng.integers(0, 8, size=int(change.sum()))
        grids.append(grid)
    top = torch.as_tensor(np.stack(grids))
    bottom = top.repeat_interleave(2, 1).repeat_interleave(2, 2)
    prior = RowPrior(8, (8, 4), channels=16, layers=3, condition_layers=1, head_channels=32)
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(100):
        i = torch.as_tensor(rng.integers(4, 44, size=8))
        gap = torch.as_tensor(rng.choice([0, 1, 2, 4], size=8))
        refs = torch.where((gap > 0)[:, None], torch.stack([i - gap, i + gap], 1), -1)
        nll_top, nll_bottom = prior.nll_bits(top[i], bottom[i], referenced_grids(refs, top, bottom))
        optimizer.zero_grad()
        (nll_top + 4 * nll_bottom).backward()
        optimizer.step()
    prior.eval()
    prior.integer = row_copy(prior, top[:32], bottom[:32])
    yield prior, top[48:], bottom[48:], references([f"v_slice_{s}" for s in range(13)], key_every=8)
    torch.set_num_threads(threads)


def test_a_row_prior_codes_what_its_float_prior_predicts_and_leans_on_the_neighbours(fitted):
    prior, top, bottom, refs = fitted
    assert isinstance(prior.integer, IntegerRowPrior) and row_copy_problem(prior.integer.state, prior) is None
    between = driver.encode(prior.integer, top.numpy(), bottom.numpy(), references=refs)
    alone = driver.encode(prior.integer, top.numpy(), bottom.numpy(), references=np.full((13, 2), -1))
    assert between.size < 0.85 * alone.size
    with torch.inference_mode():
        nll_top, nll_bottom = prior.nll_bits(top, bottom, referenced_grids(torch.as_tensor(refs), top, bottom))
    float_bits = 13 * (float(nll_top) * 32 + float(nll_bottom) * 128)
    assert between.size * 32 <= float_bits * 1.02 + 13 * 96  # the copy's rounding, the streams' ends


def test_a_row_prior_decodes_exactly_whatever_the_floating_point_results_threads_and_batches(fitted):
    prior, top, bottom, refs = fitted
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy(), batch_size=5, references=refs)
    with OneUlp():
        decoded = driver.decode(prior.integer, words, 13, batch_size=1, references=refs)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    torch.set_num_threads(2)
    try:
        decoded = driver.decode(prior.integer, words, 13, batch_size=3, references=refs)
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    top_part, bottom_part = driver.decode(prior.integer, words, 13, references=refs, wanted=[3])
    decoded_slices = [0, 2, 3, 4, 8]  # slice 3 and the slices it is coded after
    assert np.array_equal(np.flatnonzero(top_part[:, 0, 0] >= 0), decoded_slices)
    assert np.array_equal(bottom_part[decoded_slices], bottom.numpy()[decoded_slices])


def test_a_row_prior_trained_by_train_prior_codes_files_that_decode_and_draws_slices(work, tiny_phantom, tmp_path,
                                                                                     capsys):
    sets = prior_overrides(tiny_phantom, work["root"], "rows", kind="rows", steps=4, interval=2,
                           **{"rows.channels": 16, "rows.layers": 2, "rows.head_channels": 32, "rows.key_every": 4})
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 0
    prior_path = work["root"] / "rows" / "models/prior_best.pt"
    assert isinstance(load_prior(prior_path)[0], RowPrior)
    test_split = tiny_phantom / "keras_slices_test"
    coded, plain = tmp_path / "rows.mrvq", tmp_path / "plain.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(coded),
                     "--prior", str(prior_path)]) == 0
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test_split), "--out", str(plain)]) == 0
    header = read_codes_file(coded).header
    assert header["prior_coding"] == "rows" and any(a >= 0 for pair in header["references"] for a in pair)
    torch.set_num_threads(2)  # another thread count than the encoder's
    try:
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "d"),
                         "--prior", str(prior_path)]) == 0
    finally:
        torch.set_num_threads(1)
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(plain), "--out", str(tmp_path / "p")]) == 0
    for source in test_split.glob("*.nii.gz"):
        a, b = (np.asarray(nib.load(tmp_path / folder / source.name).dataobj) for folder in ("d", "p"))
        assert np.array_equal(a, b), source.name
    assert run_main(["sample", "--prior", str(prior_path), "--n", "2", "--out", str(tmp_path / "drawn")]) == 0
    # a copy whose weights were changed beyond its bounds is refused in one line
    ckpt = load_checkpoint(prior_path)
    ckpt["integer"]["bottom"]["convs"][0]["multiplier"] = ckpt["integer"]["bottom"]["convs"][0]["multiplier"] * 2**40
    spoiled = tmp_path / "spoiled.pt"
    save_checkpoint(spoiled, ckpt)
    capsys.readouterr()
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "x"),
                     "--prior", str(spoiled)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "integer coding copy" in err[0] and "beyond" in err[0]
    assert not (tmp_path / "x").exists()
