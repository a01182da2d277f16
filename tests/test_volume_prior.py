"""Slices coded as volumes: the chains HipMRI's names give, a volume prior whose integer copy codes
each slice given the one before it (bit for bit on any machine, thread count or batch), the
files that carry the chains, and a prior file never larger than the frequency-coded one."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_main, set_args
from prior_helpers import OneUlp, fitted_to_runs, prior_overrides, use_step_clock

from mrivq.apps import train_prior as train_prior_module
from mrivq.compression import codec, driver
from mrivq.compression.container import SourceEntry, read_codes_file, volume_problem
from mrivq.compression.portable.passes import IntegerVolumePrior, pass_copy
from mrivq.compression.portable.rows import row_copy
from mrivq.compression.priors import kind_of
from mrivq.data.volumes import (
    coding_depths,
    gap_shares,
    neighbours,
    references,
    volume_place,
    volume_runs,
)
from mrivq.engine.checkpoint import load_checkpoint
from mrivq.nn.pass_prior import VolumePrior, referenced_grids
from mrivq.nn.row_prior import RowPrior

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slices_are_ordered_by_their_hipmri_names_not_their_place_in_the_list():
    names = ["case_004_week_0_slice_2.nii.gz", "case_004_week_0_slice_0.nii.gz", "case_004_week_1_slice_1.nii.gz",
             "case_004_week_0_slice_1.nii.gz", "scan.nii.gz", "case_004_week_0_slice_4.nii.gz",
             "case_004_week_0_slice_3.nii"]
    assert volume_place("keras/case_004_week_0_slice_12.nii.gz") == ("case_004_week_0", 12)
    assert volume_place("scan.nii.gz") is None
    assert neighbours(names, 1).tolist() == [[3, 6], [-1, 3], [-1, -1], [1, 0], [-1, -1], [6, -1], [0, 5]]
    assert [run.tolist() for run in volume_runs(names)] == [[1, 3, 0, 6, 5], [2], [4]]
    # week 0: keys at slices 0 and 4 (and the run's last, 4); 2 between them; 1 and 3 between those
    assert references(names, key_every=4).tolist() == [[1, 5], [-1, -1], [-1, -1], [1, 0], [-1, -1], [-1, -1],
                                                        [0, 5]]
    assert references(names, key_every=2).tolist() == [[-1, -1], [-1, -1], [-1, -1], [1, 0], [-1, -1], [-1, -1],
                                                        [0, 5]]
    assert (references(names, key_every=1) == -1).all()


def test_a_run_is_coded_in_halving_gaps():
    names = [f"v_slice_{s}" for s in range(17)]
    refs = references(names, key_every=8)
    assert refs[4].tolist() == [0, 8] and refs[2].tolist() == [0, 4] and refs[1].tolist() == [0, 2]
    assert refs[12].tolist() == [8, 16] and (refs[[0, 8, 16]] == -1).all()
    assert coding_depths(refs).max() == 3  # keys, then gaps of 4, 2 and 1
    assert gap_shares(8) == pytest.approx({0: 0.127, 1: 0.499, 2: 0.2495, 4: 0.1248}, abs=1e-3)


@pytest.mark.parametrize("refs", [[[1, -1], [0, -1]], [[0, -1]], [[-1, 5]], [[-2, -1]], [[2, -1], [0, -1], [1, -1]],
                                  [[-1, -1], [0, 2], [1, -1]]],
                         ids=["cycle", "itself", "out-of-range", "below-minus-one", "loop-of-three", "two-way"])
def test_references_a_decoder_cannot_follow_are_refused(refs):
    assert coding_depths(refs) is None


def test_coding_depths_count_the_waves_before_each_slice():
    assert coding_depths([[-1, -1], [0, 2], [-1, -1], [1, 2], [1, 3]]).tolist() == [0, 1, 0, 2, 3]


#: The priors that code volumes, each fitted to runs of grids (:func:`prior_helpers.fitted_to_runs`).
VOLUME_PRIORS = {
    "volume": (lambda: VolumePrior(8, (8, 4), channels=16, layers=3, condition_layers=1), pass_copy),
    "rows": (lambda: RowPrior(8, (8, 4), channels=16, layers=3, condition_layers=1, head_channels=32), row_copy),
}


@pytest.fixture(scope="module", params=list(VOLUME_PRIORS))
def fitted(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield fitted_to_runs(*VOLUME_PRIORS[request.param])
    torch.set_num_threads(threads)


def test_a_slice_coded_between_its_neighbours_costs_less_than_alone(fitted):
    prior, top, bottom, refs = fitted
    assert isinstance(prior.integer, IntegerVolumePrior)
    assert kind_of(prior).copy_problem(prior.integer.state, prior) is None
    between = driver.encode(prior.integer, top.numpy(), bottom.numpy(), references=refs)
    alone = driver.encode(prior.integer, top.numpy(), bottom.numpy(), references=np.full((13, 2), -1))
    assert between.size < 0.85 * alone.size
    # the stream is what the float prior's probabilities cost (to the coder's rounding)
    with torch.inference_mode():
        nll_top, nll_bottom = prior.nll_bits(top, bottom, referenced_grids(torch.as_tensor(refs), top, bottom))
    float_bits = 13 * (float(nll_top) * 32 + float(nll_bottom) * 128)
    assert between.size * 32 <= float_bits * 1.02 + 13 * 96


def test_a_volume_decodes_exactly_whatever_the_floating_point_results_threads_and_batches(fitted):
    prior, top, bottom, refs = fitted
    words = driver.encode(prior.integer, top.numpy(), bottom.numpy(), batch_size=5, references=refs)
    torch.set_num_threads(1)
    with OneUlp():
        decoded = driver.decode(prior.integer, words, 13, batch_size=1, references=refs)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    torch.set_num_threads(2)
    try:
        decoded = driver.decode(prior.integer, words, 13, batch_size=3, references=refs)
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(decoded[0], top.numpy()) and np.array_equal(decoded[1], bottom.numpy())
    # slice 3 decodes with the slices it is coded after (2 and 4; 0 and 4; 0 and 8), and no other
    top_part, bottom_part = driver.decode(prior.integer, words, 13, references=refs, wanted=[3])
    decoded_slices = [0, 2, 3, 4, 8]
    assert np.array_equal(np.flatnonzero(top_part[:, 0, 0] >= 0), decoded_slices)
    assert np.array_equal(top_part[decoded_slices], top.numpy()[decoded_slices])
    assert np.array_equal(bottom_part[decoded_slices], bottom.numpy()[decoded_slices])
    # a decoder told other references gets other codes (or a stream that does not decode): they matter
    try:
        wrong = driver.decode(prior.integer, words, 13, references=np.full((13, 2), -1))
        assert not np.array_equal(wrong[1], bottom.numpy())
    except ValueError:
        pass


@pytest.fixture(scope="module")
def volume_prior(work, tiny_phantom):
    """A tiny volume prior (key_every 4) trained by `mrivq train-prior` on the phantom's codes."""
    sets = prior_overrides(tiny_phantom, work["root"], "volume", kind="volume", steps=40, interval=20,
                           **{"volume.channels": 32, "volume.layers": 2, "volume.key_every": 4})
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 0
    return work["root"] / "volume" / "models" / "prior_best.pt"


def test_volume_prior_trains_on_consecutive_slices_and_codes_files_decode_reads(work, volume_prior, tiny_phantom,
                                                                               tmp_path, capsys):
    prior = volume_prior
    test = tiny_phantom / "keras_slices_test"
    coded, plain = tmp_path / "volume.mrvq", tmp_path / "plain.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test), "--out", str(coded),
                     "--prior", str(prior)]) == 0
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test), "--out", str(plain)]) == 0
    header = read_codes_file(coded).header
    names = [source["name"] for source in header["sources"]]
    assert header["coder"] == "prior" and header["prior_coding"] == "volume"
    assert [list(pair) for pair in header["references"]] == references(names, key_every=4).tolist()
    assert max(coding_depths(header["references"])) == 2  # six slices a volume: keys 0, 4, 5; 2; 1 and 3
    capsys.readouterr()
    for path, out, extra in ((coded, "a", ["--prior", str(prior)]), (plain, "b", [])):
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(path), "--out", str(tmp_path / out),
                         *extra]) == 0
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # a slice range decodes to the same slices, written alone
    last = max(names)
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "one"),
                     "--prior", str(prior), "--slices", last[:-len("slice_5.nii.gz")] + "slice_5*"]) == 0
    assert [p.name for p in (tmp_path / "one").glob("*.nii.gz")] == [last]
    alone, together = (np.asarray(nib.load(tmp_path / folder / last).dataobj) for folder in ("one", "a"))
    assert np.allclose(alone, together, rtol=0, atol=1e-4 * np.ptp(together))  # the VQ-VAE's batch of one
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "none"),
                     "--prior", str(prior), "--slices", "nothing*"]) == 2
    assert "no slice of" in capsys.readouterr().err
    # it draws slices too (key slices: no references)
    assert run_main(["sample", "--prior", str(prior), "--n", "2", "--out", str(tmp_path / "drawn")]) == 0
    # references a decoder cannot follow are refused before any decoding
    file = read_codes_file(coded)
    file.header["references"] = [[1, -1], [0, -1], *file.header["references"][2:]]
    damaged = tmp_path / "damaged.mrvq"
    damaged.write_bytes(file.to_bytes())
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(damaged), "--out", str(tmp_path / "c"),
                     "--prior", str(prior)]) == 2
    assert "not an order a decoder can follow" in capsys.readouterr().err


def test_a_3d_nifti_is_coded_as_a_volume_and_decoded_back_whole(work, volume_prior, tiny_phantom, tmp_path, capsys):
    test = tiny_phantom / "keras_slices_test"
    case = min(test.glob("*_slice_0.nii.gz")).name[:-len("_slice_0.nii.gz")]
    files = [test / f"{case}_slice_{s}.nii.gz" for s in range(6)]
    first = nib.load(files[0])
    affine = first.affine.copy()
    affine[:3, 2] = [0.5, 0.25, 3.0]  # slices 3 mm apart (and a little oblique)
    stack = np.stack([np.asarray(nib.load(f).dataobj, dtype=np.float32).reshape(first.shape[:2]) for f in files], 2)
    volumes = tmp_path / "in"
    volumes.mkdir()
    nib.save(nib.Nifti1Image(stack, affine), volumes / "scan.nii.gz")
    coded, alone = tmp_path / "scan.mrvq", tmp_path / "slices.mrvq"
    for inputs, out in (([volumes / "scan.nii.gz"], coded), (files, alone)):
        assert run_main(["encode", "--checkpoint", str(work["vqvae"]), *map(str, inputs), "--out", str(out),
                         "--prior", str(volume_prior)]) == 0
    header, slices = read_codes_file(coded).header, read_codes_file(alone).header
    assert [source["name"] for source in header["sources"]] == [f"scan_slice_{s}.nii.gz" for s in range(6)]
    assert header["sources"][4]["volume"] == {"name": "scan.nii.gz", "shape": [*first.shape[:2], 6], "index": 4}
    assert header["references"] == slices["references"]  # the same chain as the volume's named slices
    assert header["codes_crc32"] == slices["codes_crc32"]  # and the same codes
    capsys.readouterr()
    for path, out in ((coded, "whole"), (alone, "each")):
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(path), "--out", str(tmp_path / out),
                         "--prior", str(volume_prior)]) == 0
    assert "wrote 1 NIfTI file to" in capsys.readouterr().out
    whole = nib.load(tmp_path / "whole" / "scan.nii.gz")
    assert whole.shape == stack.shape and [p.name for p in (tmp_path / "whole").glob("*.nii.gz")] == ["scan.nii.gz"]
    np.testing.assert_allclose(whole.affine, affine, atol=1e-5)
    each = np.stack([np.asarray(nib.load(tmp_path / "each" / f.name).dataobj).reshape(stack.shape[:2])
                     for f in files], 2)
    assert np.allclose(np.asarray(whole.dataobj), each, rtol=0, atol=1e-4 * np.ptp(each))
    # some of its slices: each its own 2-D file, where it lies in the volume
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "two"),
                     "--prior", str(volume_prior), "--slices", "scan_slice_[23]*"]) == 0
    assert sorted(p.name for p in (tmp_path / "two").glob("*.nii.gz")) == ["scan_slice_2.nii.gz", "scan_slice_3.nii.gz"]
    three = nib.load(tmp_path / "two" / "scan_slice_3.nii.gz")
    np.testing.assert_allclose(three.affine @ [5, 7, 0, 1], affine @ [5, 7, 3, 1], atol=1e-4)
    assert np.allclose(np.asarray(three.dataobj), each[:, :, 3], rtol=0, atol=1e-4 * np.ptp(each))
    # a file whose volume lacks a slice, or names a slice twice, is refused before decoding
    for index in (5, 4):
        file = read_codes_file(coded)
        file.header["sources"][4]["volume"]["index"] = index if index == 5 else 7
        damaged = tmp_path / f"damaged{index}.mrvq"
        damaged.write_bytes(file.to_bytes())
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(damaged), "--out", str(tmp_path / "x"),
                         "--prior", str(volume_prior)]) == 2
        assert "does not have each of its 6 slices once" in capsys.readouterr().err
    # two volumes interleaved (decode would hold both), or one larger than a file mrivq reads: refused
    entry = {"name": "a_slice_0.nii.gz", "shape": [4, 4], "dtype": "float32",
             "volume": {"name": "a.nii.gz", "shape": [4, 4, 2], "index": 0}}

    def like(name: str, index: int, shape=(4, 4, 2)) -> SourceEntry:
        return SourceEntry.model_validate({**entry, "name": f"{name}_slice_{index}.nii.gz", "volume": {
            "name": f"{name}.nii.gz", "shape": list(shape), "index": index}})
    assert volume_problem([like("a", 0), like("a", 1), like("b", 0), like("b", 1)]) is None
    assert "not one after another" in volume_problem([like("a", 0), like("b", 0), like("a", 1), like("b", 1)])
    big = (8192, 8192, 2)
    assert "larger than" in volume_problem([SourceEntry.model_validate(
        {**entry, "name": f"a_slice_{i}.nii.gz", "shape": [8192, 8192],
         "volume": {"name": "a.nii.gz", "shape": list(big), "index": i}}) for i in range(2)])


def test_encode_never_writes_a_prior_file_larger_than_the_frequency_coded_one(work, tiny_phantom, tmp_path, capsys,
                                                                            monkeypatch):
    """A prior trained for one step predicts worse than the codes' own frequencies: encode writes
    the frequency-coded file and says so."""
    monkeypatch.setattr(codec, "SMALLEST_FILE", True)  # the suite turns it off for the other tests
    sets = prior_overrides(tiny_phantom, work["root"], "starved", steps=1, interval=1)
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 0
    test = tiny_phantom / "keras_slices_test"
    out, plain = tmp_path / "starved.mrvq", tmp_path / "plain.mrvq"
    capsys.readouterr()
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test), "--out", str(out), "--prior",
                     str(work["root"] / "starved" / "models" / "prior_best.pt")]) == 0
    said = capsys.readouterr().out
    assert "larger than the frequency-coded one" in said
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(test), "--out", str(plain)]) == 0
    assert read_codes_file(out).header["coder"] == "frequencies"
    assert out.read_bytes() == plain.read_bytes()


def test_a_short_prior_budget_encodes_only_the_copies_that_fit_its_share(work, tiny_phantom, monkeypatch):
    """On a clock that moves 3 s at each look, each version of the training codes takes 3 s: with
    prior.max_time 100 s, a quarter (25 s) holds the plain codes and two copies; the checkpoint
    says two, so a resumed run reads the same ones."""
    use_step_clock(monkeypatch)  # and the loop's clock reads its step
    ticks = iter(range(0, 10_000, 3))
    monkeypatch.setattr(train_prior_module, "_copies_clock", lambda: float(next(ticks)))
    sets = prior_overrides(tiny_phantom, work["root"], "budget", max_time="100s", interval=100,
                           checkpoint_every=100)
    assert run_main(["train-prior", "--checkpoint", str(work["vqvae"]), *set_args(sets)]) == 0
    log = (work["root"] / "budget" / "logging" / "prior.log").read_text()
    assert re.search(r"prior.max_time: 2 of the 13 training copies encoded", log)
    last = load_checkpoint(work["root"] / "budget" / "models" / "prior_last.pt")
    assert last["reference"]["training_copies"] == 2
