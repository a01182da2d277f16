"""The row prior (prior.kind: rows): causal by construction, trained, coded and drawn through the
commands (its integer copy's exactness under the one-ulp nudge, threads and batches is tested with the
volume prior's, in test_volume_prior.py)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import torch
from conftest import run_main, set_args
from prior_helpers import prior_overrides

from mrivq.compression.container import read_codes_file
from mrivq.engine.checkpoint import load_checkpoint, load_prior, save_checkpoint
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
