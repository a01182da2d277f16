"""Files from someone else: codes files, checkpoints, priors and NIfTI are validated before use,
fail in one line with exit 2 and bounded memory, and never make mrivq overwrite a user's file.

One test per class of misbehaviour found by hand; ``test_fuzzed_files`` throws hundreds of
seeded mutations at the same commands."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_main
from hostile_helpers import (
    build_bases,
    join_sections,
    read_header,
    split_sections,
    with_header,
    with_section,
)

from mrivq.compression.container import MAX_SLICES
from mrivq.engine.checkpoint import load_checkpoint, run_config

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def bases(tiny_phantom, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_bases(tiny_phantom, tmp_path_factory.mktemp("hostile"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Caches the commands choose themselves (sample's training slices) go to a test folder."""
    monkeypatch.setenv("MRIVQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "default_cache"))


def refused(args, capsys, *expected) -> str:
    """Run ``mrivq ARGS``: exit 2, one line on stderr holding each of ``expected``; returns it."""
    capsys.readouterr()
    assert run_main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mrivq: error: "), err
    assert all(e in err[0] for e in expected), err
    return err[0]


def decode_args(bases, codes, out, *extra):
    return ["decode", "--checkpoint", bases["vqvae"], codes, "--out", out, *extra]


def spoiled(tmp_path, name, data) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def child(args: list[str], cwd: Path) -> tuple[int, str, float]:
    """``mrivq ARGS`` in a fresh process: exit status, stderr, peak resident memory in MiB."""
    proc = subprocess.Popen([sys.executable, "-m", "mrivq", *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err, usage.ru_maxrss / 1024


# ---------------------------------------------------------------------------------------
# Codes files: contents that used to raise
# ---------------------------------------------------------------------------------------

def test_a_damaged_stream_is_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    stream = dict(split_sections(blob))["stream"]
    flipped = bytes(b ^ 0x5A for b in stream[:len(stream) // 2]) + stream[len(stream) // 2:]
    path = spoiled(tmp_path, "flipped.mrvq", with_section(blob, "stream", flipped))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, str(path))
    assert not (tmp_path / "out").exists()


def test_frequency_tables_that_do_not_count_the_codes_are_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    n_embed = read_header(blob)["n_embed"]
    path = spoiled(tmp_path, "zeros.mrvq", with_section(blob, "tables", zlib.compress(bytes(8 * n_embed))))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "frequency tables")


def test_a_stream_of_broken_words_is_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    path = spoiled(tmp_path, "odd.mrvq", with_section(blob, "stream", dict(split_sections(blob))["stream"] + b"x"))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "32-bit words")


@pytest.mark.parametrize("key", ["model_fingerprint", "top_grid", "codes_crc32", "image_size", "normalize", "fit",
                                 "n", "n_embed", "sources", "coder", "percentiles"])
@pytest.mark.parametrize("edit", ["missing", "string", "list", "null", "float"])
def test_header_keys_missing_or_of_the_wrong_type_are_refused(bases, tmp_path, capsys, key, edit):
    blob = bases["codes"].read_bytes()
    header = read_header(blob)
    if edit == "missing":
        del header[key]
    else:
        header[key] = {"string": "x", "list": [[1]], "null": None, "float": 2.5}[edit]
    path = spoiled(tmp_path, "edited.mrvq", with_header(blob, header))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "header")


@pytest.mark.parametrize("key", ["prior_batch", "prior_fingerprint"])
def test_prior_header_keys_are_checked(bases, tmp_path, capsys, key):
    blob = bases["prior_codes"].read_bytes()  # raster-coded: a batch is never given, so even 16 is refused
    for value in ((None,) if key == "prior_fingerprint" else (16,)) + ("16", -1, [16]):
        header = read_header(blob)
        header[key] = value
        path = spoiled(tmp_path, "edited.mrvq", with_header(blob, header))
        refused(decode_args(bases, path, tmp_path / "out", "--prior", bases["prior"]), capsys, "header")


@pytest.mark.parametrize("edit, message", [
    ({"prior_coding": "sequential"}, "header"), ({"prior_batch": 16}, "header"), ({"prior_device": "cpu"}, "header"),
    ({"prior_coding": "Side ways"}, "header"), ({"prior_coding": "sideways"}, "coded in sideways order"),
    ({"prior_coding": "sequential", "prior_batch": 16, "prior_device": "cpu"}, "mrivq 0.1.0 from before 2026-12-04")])
def test_a_prior_coding_that_does_not_fit_the_header_is_refused(bases, tmp_path, capsys, edit, message):
    """A raster-coded file claiming the retired floating-point coding without the batch and device
    it fixed, or given them alone, or a coding that is no name, is refused by the header's schema;
    one whose coding no prior here has, by name; one of the retired coding, by the version that
    wrote it. No prior runs."""
    blob = bases["prior_codes"].read_bytes()
    header = {**read_header(blob), **edit}
    path = spoiled(tmp_path, "edited.mrvq", with_header(blob, header))
    refused(decode_args(bases, path, tmp_path / "out", "--prior", bases["prior"]), capsys, message)


def test_a_file_claiming_another_kind_of_prior_is_refused(bases, tmp_path, capsys):
    blob = bases["prior_codes"].read_bytes()
    path = spoiled(tmp_path, "edited.mrvq", with_header(blob, {**read_header(blob), "prior_coding": "passes"}))
    refused(decode_args(bases, path, tmp_path / "out", "--prior", bases["prior"]), capsys, "coded in passes order")


def test_prior_coding_on_a_frequency_coded_file_is_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    header = {**read_header(blob), "prior_coding": "passes"}
    path = spoiled(tmp_path, "edited.mrvq", with_header(blob, header))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "header")


@pytest.mark.parametrize("field,value", [("name", 5), ("name", None), ("shape", "64x32"), ("shape", [64, -32]),
                                         ("dtype", 3), ("extra", 1)])
def test_source_entries_are_checked(bases, tmp_path, capsys, field, value):
    blob = bases["codes"].read_bytes()
    header = read_header(blob)
    header["sources"][0][field] = value
    path = spoiled(tmp_path, "edited.mrvq", with_header(blob, header))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "header's sources.0")


def test_a_deeply_nested_header_is_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    path = spoiled(tmp_path, "nested.mrvq", with_header(blob, "[" * 200_000 + "]" * 200_000))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "header")


def test_a_huge_top_grid_is_refused_not_aborted(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    header = read_header(blob)
    header["top_grid"] = [100_000, 100_000]
    path = spoiled(tmp_path, "grid.mrvq", with_header(blob, header))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "top grid")
    header["image_size"] = [800_000, 800_000]
    path = spoiled(tmp_path, "grid.mrvq", with_header(blob, header))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "codes than one file may hold")


def test_sections_that_are_unknown_repeated_or_overlong_are_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    sections = split_sections(blob)
    from hostile_helpers import join_sections

    for name, data, message in [("unknown", join_sections(blob, [*sections, ("extra", b"")]), "unknown or repeated"),
                                ("repeated", join_sections(blob, [*sections, sections[0]]), "unknown or repeated"),
                                ("overlong", blob[:12] + b"\xff\xff\xff\x7f" + blob[16:], "runs past the end")]:
        path = spoiled(tmp_path, f"{name}.mrvq", data)
        refused(decode_args(bases, path, tmp_path / "out"), capsys, message)


# ---------------------------------------------------------------------------------------
# Sizes the file chooses
# ---------------------------------------------------------------------------------------

def test_a_header_that_inflates_to_a_gigabyte_is_refused_with_bounded_memory(bases, tmp_path):
    deflate, chunk = zlib.compressobj(9), b" " * (1 << 20)
    bomb = deflate.compress(b'{"format": "mrivq-codes", "pad": "')
    bomb += b"".join(deflate.compress(chunk) for _ in range(1024)) + deflate.compress(b'"}') + deflate.flush()
    path = spoiled(tmp_path, "bomb.mrvq", with_section(bases["codes"].read_bytes(), "header", bomb))
    status, err, peak_mib = child(decode_args(bases, path, tmp_path / "out"), tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "inflates to more than" in err, err
    assert peak_mib < 900, peak_mib  # a Python with torch imported is ~400 MiB; the bomb is 1 GiB
    assert not (tmp_path / "out").exists()


def test_shapes_and_slice_counts_beyond_the_limits_are_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    header = read_header(blob)
    big = json.loads(json.dumps(header))
    big["sources"][0]["shape"] = [65535, 65535]
    refused(decode_args(bases, spoiled(tmp_path, "shape.mrvq", with_header(blob, big)), tmp_path / "out"), capsys,
            "header's sources.0.shape")
    many = json.loads(json.dumps(header))
    many["n"] = MAX_SLICES + 1
    many["sources"] = [dict(header["sources"][0], name=f"s{i}.nii.gz") for i in range(MAX_SLICES + 1)]
    refused(decode_args(bases, spoiled(tmp_path, "many.mrvq", with_header(blob, many)), tmp_path / "out"), capsys,
            "header's n")
    fewer = json.loads(json.dumps(header))
    fewer["n"] = header["n"] + 1000  # more slices than the side data describes
    fewer["sources"] = [dict(header["sources"][0], name=f"s{i}.nii.gz") for i in range(fewer["n"])]
    refused(decode_args(bases, spoiled(tmp_path, "fewer.mrvq", with_header(blob, fewer)), tmp_path / "out"), capsys,
            "side data")
    assert not (tmp_path / "out").exists()


def test_decode_holds_one_batch_of_slices_at_a_time(bases, tmp_path, monkeypatch):
    """Many slices in a small file (blank ones code to almost nothing) are decoded and written a
    batch at a time (one batch written while the next is decoded), so memory does not grow with
    the count."""
    from mrivq.apps import decode as decode_app
    from mrivq.compression import codec

    lock, waiting, most = threading.Lock(), [0], [0]
    real_decode, real_write, real_init = codec.decode_images, decode_app.atomic_write, codec.Codec.__init__

    def decode_images(model, top, *args, **kwargs):
        with lock:  # slices decoded and not yet written, once this batch is decoded
            waiting[0] += len(top)
            most[0] = max(most[0], waiting[0])
        return real_decode(model, top, *args, **kwargs)

    def write(*args, **kwargs):
        real_write(*args, **kwargs)
        with lock:
            waiting[0] -= 1

    monkeypatch.setattr(codec.Codec, "__init__", lambda self, *a, **k: real_init(self, *a, **{**k, "batch_size": 2}))
    monkeypatch.setattr(codec, "decode_images", decode_images)
    monkeypatch.setattr(decode_app, "atomic_write", write)
    written = decode_app.decode(bases["vqvae"], bases["codes"], tmp_path / "out")
    assert len(written) == 6 and all(path.exists() for path in written) and waiting[0] == 0
    assert most[0] <= 2 * 2  # the batch being decoded and at most one batch of 2 waiting to be written


def nifti_header_claiming(shape) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    return header.binaryblock + bytes(4) + bytes(100)


def test_a_nifti_header_claiming_more_than_its_data_allocates_nothing(bases, tmp_path):
    path = spoiled(tmp_path, "claims.nii", nifti_header_claiming((30000, 30000)))
    status, err, peak_mib = child(["encode", "--checkpoint", bases["vqvae"], path, "--out", tmp_path / "c.mrvq"],
                                  tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "claims.nii" in err, err
    assert peak_mib < 900, peak_mib  # the claimed image is 3.4 GiB
    path = spoiled(tmp_path, "short.nii", nifti_header_claiming((300, 300)))
    status, err, _ = child(["encode", "--checkpoint", bases["vqvae"], path, "--out", tmp_path / "c.mrvq"], tmp_path)
    assert status == 2 and "truncated" in err, err
    assert not (tmp_path / "c.mrvq").exists()


def test_a_gzip_bomb_nifti_is_refused_with_bounded_memory(bases, tmp_path):
    image = nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4))
    header = image.header.copy()
    header.set_data_shape((16384, 16384))
    path = tmp_path / "bomb.nii.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(header.binaryblock + bytes(4))
        for _ in range(320):
            fh.write(bytes(1 << 20))  # 320 MiB of zeros in about 1 MB
    status, err, peak_mib = child(["encode", "--checkpoint", bases["vqvae"], path, "--out", tmp_path / "c.mrvq"],
                                  tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "bomb.nii.gz" in err, err
    assert peak_mib < 1100, peak_mib  # the cap is 256 MiB uncompressed


def test_a_deflate_bomb_dicom_is_refused_with_bounded_memory(bases, tmp_path):
    from dicom_helpers import MR_SMALL, deflated

    bomb = deflated(MR_SMALL, tmp_path / "bomb.dcm", 600)
    assert bomb.stat().st_size < 1 << 20
    status, err, peak_mib = child(["encode", "--checkpoint", bases["vqvae"], bomb, "--out", tmp_path / "c.mrvq"],
                                  tmp_path)
    assert status == 2 and len(err.strip().splitlines()) == 1 and "inflates to more than 256 MiB" in err, err
    assert peak_mib < 1100, peak_mib  # the cap is 256 MiB inflated; the bomb is 600 MiB
    assert not (tmp_path / "c.mrvq").exists()


# ---------------------------------------------------------------------------------------
# Decode writes only its own files
# ---------------------------------------------------------------------------------------

def renamed(bases, tmp_path, names) -> Path:
    blob = bases["codes"].read_bytes()
    header = read_header(blob)
    for source, name in zip(header["sources"], names):
        source["name"] = name
    return spoiled(tmp_path, "renamed.mrvq", with_header(blob, header))


@pytest.mark.parametrize("name,message", [("notes.txt", "does not end in .nii"), ("", "empty name"),
                                          (".", "empty name"), ("..", "empty name"),
                                          ("../up.nii.gz", "folder separator"), ("/etc/x.nii.gz", "folder separator"),
                                          ("a\x00b.nii.gz", "control character"), (".hidden.nii.gz", "hidden"),
                                          ("renamed.mrvq", "does not end in .nii")])
def test_names_decode_would_misuse_are_refused(bases, tmp_path, capsys, name, message):
    out = tmp_path / "out" / "new"
    path = renamed(bases, tmp_path, [name])
    refused(decode_args(bases, path, out), capsys, "header's sources.0.name", message)
    assert not out.exists() and not (tmp_path / "out").exists()


def test_two_slices_with_one_name_are_refused(bases, tmp_path, capsys):
    path = renamed(bases, tmp_path, ["same.nii.gz", "SAME.nii.gz"])
    line = refused(decode_args(bases, path, tmp_path / "out"), capsys, "in its header, two slices have the same name")
    assert "Value error" not in line and "header header" not in line  # a sentence, not the validator's words


def test_decode_never_replaces_a_file_it_did_not_write(bases, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "notes.nii.gz"
    mine.write_text("my notes")
    path = renamed(bases, tmp_path, ["notes.nii.gz"])
    refused(decode_args(bases, path, out), capsys, "exists and was not written by mrivq")
    refused(decode_args(bases, path, out, "--overwrite"), capsys, "exists and was not written by mrivq")
    assert mine.read_text() == "my notes"

    # decoding into the folder of the inputs: the originals are never replaced by lossy copies
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for source in bases["slices"].glob("*.nii.gz"):
        (inputs / source.name).write_bytes(source.read_bytes())
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    refused(decode_args(bases, bases["codes"], inputs), capsys, "was not written by mrivq")
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before


def test_decode_replaces_its_own_outputs_only_when_asked(bases, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main([str(a) for a in decode_args(bases, bases["codes"], out)]) == 0
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == sorted(p.name for p in bases["slices"].glob("*.nii.gz"))
    refused(decode_args(bases, bases["codes"], out), capsys, "pass --overwrite")
    assert run_main([str(a) for a in decode_args(bases, bases["codes"], out, "--overwrite")]) == 0


def test_encode_replaces_only_codes_files(bases, tmp_path, capsys):
    notes = tmp_path / "notes.mrvq"
    notes.write_text("not codes")
    refused(["encode", "--checkpoint", bases["vqvae"], bases["slices"], "--out", notes], capsys,
            "is not an mrivq codes file")
    assert notes.read_text() == "not codes"
    again = tmp_path / "again.mrvq"
    again.write_bytes(bases["codes"].read_bytes())
    assert run_main(["encode", "--checkpoint", str(bases["vqvae"]), str(bases["slices"]), "--out", str(again)]) == 0


# ---------------------------------------------------------------------------------------
# A tampered header
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda h: h.update(image_size=[-64, 32]), "header's image_size"),
    (lambda h: h["sources"][0].update(shape=[0, 32]), "header's sources.0.shape"),
    (lambda h: h.update(image_size=[128, 32], top_grid=[16, 4]), "frequency tables do not count the codes"),
    (lambda h: h.update(normalize="zscore"), "not the ones its model was trained with"),
    (lambda h: h.update(fit="resize"), "not the ones its model was trained with"),
    (lambda h: h["sources"][0].update(shape=[32, 64, 1]), "does not fit its stored shape"),
])
def test_a_tampered_header_is_refused(bases, tmp_path, capsys, edit, message):
    blob = bases["codes"].read_bytes()
    header = read_header(blob)
    edit(header)
    if "shape" in message and "stored" in message:  # same pixels, another arrangement: fine
        assert run_main([str(a) for a in decode_args(bases, spoiled(tmp_path, "t.mrvq", with_header(blob, header)),
                                                     tmp_path / "ok")]) == 0
        header["sources"][0]["shape"] = [33, 64, 1]
    refused(decode_args(bases, spoiled(tmp_path, "t.mrvq", with_header(blob, header)), tmp_path / "out"), capsys,
            message)
    assert not (tmp_path / "out").exists()


def test_side_data_with_nan_is_refused(bases, tmp_path, capsys):
    blob = bases["codes"].read_bytes()
    n = read_header(blob)["n"]
    side = bytearray(zlib.decompress(dict(split_sections(blob))["side"]))
    side[8 * n:8 * n + 4] = np.float32(np.nan).tobytes()
    path = spoiled(tmp_path, "nan.mrvq", with_section(blob, "side", zlib.compress(bytes(side))))
    refused(decode_args(bases, path, tmp_path / "out"), capsys, "NaN or Inf")


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

def respoiled_checkpoint(source: Path, tmp_path: Path, edit) -> Path:
    ckpt = load_checkpoint(source)
    edit(ckpt)
    path = tmp_path / "spoiled.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda c: (c.clear(), c.update(format="mrivq-vqvae2")), "holds no VQ-VAE weights"),
    (lambda c: c.update(model=torch.zeros(3)), "not a mapping of names to tensors"),
    (lambda c: c.update(config="a string"), "stored config is missing or not a mapping"),
    (lambda c: c["config"]["model"].update(channel=10**7), "stored config is invalid"),
    (lambda c: c["config"]["model"].update(channel=4096), "do not fit the model config"),
    (lambda c: c["config"]["model"].update(n_res_block=64), "do not fit the model config"),
    (lambda c: c["config"]["data"].update(image_size=[30000, 30000]), "stored config is invalid"),
    (lambda c: c["model"].update({"enc_b.blocks.0.weight": torch.zeros(2, 2)}), "do not fit the model config"),
    (lambda c: c["model"].update({"two\nlines": torch.zeros(1)}), "two lines"),
    (lambda c: c["model"].update({"sparse": torch.zeros(2, 2).to_sparse()}), "not a mapping of names to tensors"),
    (lambda c: c.update(config={**c["config"], "seed": [[1] * 10] * 10}), "stored config is invalid"),
])
def test_vqvae_checkpoints_are_checked_before_anything_is_built(bases, tmp_path, capsys, edit, message):
    path = respoiled_checkpoint(bases["vqvae"], tmp_path, edit)
    refused(decode_args({"vqvae": path}, bases["codes"], tmp_path / "out"), capsys, str(path), message)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("prior_shape"), "prior_shape"),
    (lambda c: c.update(prior_shape={"n_embed": 16, "top_grid": [1000, 1000]}), "prior_shape"),
    (lambda c: c["config"]["prior"]["transformer"].update(d_model=4096), "do not fit the model config"),
    (lambda c: c["config"]["prior"]["transformer"].update(d_model=10**7), "stored config is invalid"),
    (lambda c: c["config"]["prior"]["transformer"].update(d_model=4096, n_layer_bottom=64), "key/value caches"),
    (lambda c: c.update(prior=[1, 2]), "not a mapping of names to tensors"),
    (lambda c: c.update(vqvae="x"), "holds no VQ-VAE"),
    (lambda c: c["reference"].update(affine=torch.full((4, 4), float("nan"))), "reference slice"),
])
def test_prior_checkpoints_are_checked_before_anything_is_built(bases, tmp_path, capsys, edit, message):
    path = respoiled_checkpoint(bases["prior"], tmp_path, edit)
    refused(["sample", "--prior", path, "--n", "1", "--out", tmp_path / "out"], capsys, str(path), message)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_asking_for_a_huge_model_allocates_nothing(bases, tmp_path):
    path = respoiled_checkpoint(bases["vqvae"], tmp_path, lambda c: c["config"]["model"].update(
        channel=4096, n_res_channel=4096, n_res_block=64))  # about 60 GiB if it were built
    status, err, peak_mib = child(decode_args({"vqvae": path}, bases["codes"], tmp_path / "out"), tmp_path)
    assert status == 2 and "do not fit the model config" in err, err
    assert peak_mib < 900, peak_mib


def test_a_checkpoint_cannot_choose_where_mrivq_writes(bases, tmp_path, capsys):
    elsewhere = tmp_path / "chosen_by_the_file"

    def point_elsewhere(ckpt):
        ckpt["config"]["data"]["cache_dir"] = str(elsewhere / "cache")
        ckpt["config"]["output"].update(dir=str(elsewhere / "run"), log_dir=str(elsewhere / "logs"))

    prior = respoiled_checkpoint(bases["prior"], tmp_path, point_elsewhere)
    assert run_main(["sample", "--prior", str(prior), "--n", "2", "--out", str(tmp_path / "samples")]) == 0
    assert not elsewhere.exists()
    assert sorted(p.name for p in (tmp_path / "samples").glob("sample_*.nii.gz")) == ["sample_000.nii.gz",
                                                                                      "sample_001.nii.gz"]
    # predict and train-prior run a checkpoint in the run directory it lies in, caches where the user says
    from mrivq.config import Config, config_from_dict

    ckpt = load_checkpoint(bases["vqvae"])
    point_elsewhere(ckpt)
    models = tmp_path / "run" / "models"
    merged, _ = run_config(Config(), config_from_dict(ckpt["config"]), models / "best.pt")
    assert merged.data.cache_dir is None and merged.run_dir == tmp_path / "run"
    assert merged.log_dir == tmp_path / "run" / "logging" and merged.model_dir == models


# ---------------------------------------------------------------------------------------
# encode and sample
# ---------------------------------------------------------------------------------------

def test_encode_refuses_slices_a_codes_file_cannot_hold(bases, tmp_path, capsys):
    wide = tmp_path / "wide.nii"
    nib.save(nib.Nifti2Image(np.zeros((2, 40000), np.uint8), np.eye(4)), wide)
    refused(["encode", "--checkpoint", bases["vqvae"], wide, "--out", tmp_path / "c.mrvq"], capsys,
            "wide.nii", "sides up to 32767")
    header = nib.Nifti1Image(np.ones((64, 32), np.float32), np.eye(4)).header
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_x"] = [np.nan, 0, 0, 0]  # nibabel will not write such an affine itself
    header["vox_offset"] = 352
    broken = spoiled(tmp_path, "broken.nii", header.binaryblock + bytes(4) + np.ones((64, 32), "<f4").tobytes())
    refused(["encode", "--checkpoint", bases["vqvae"], broken, "--out", tmp_path / "c.mrvq"], capsys,
            "broken.nii", "affine")
    assert not (tmp_path / "c.mrvq").exists()


def test_an_affine_nibabel_cannot_decompose_round_trips(bases, tmp_path, capsys):
    header = nib.Nifti1Image(np.ones((64, 32), np.float32), np.eye(4)).header
    header["qform_code"], header["sform_code"] = 0, 1
    header["srow_y"] = [0, 0, 0, 5]  # the second axis has no length: no qform can say this
    header["vox_offset"] = 352
    flat = spoiled(tmp_path, "flat.nii", header.binaryblock + bytes(4) + np.ones((64, 32), "<f4").tobytes())
    codes = tmp_path / "flat.mrvq"
    capsys.readouterr()
    assert run_main(["encode", "--checkpoint", str(bases["vqvae"]), str(flat), "--out", str(codes)]) == 0
    assert run_main(["decode", "--checkpoint", str(bases["vqvae"]), str(codes), "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err == ""
    np.testing.assert_allclose(nib.load(tmp_path / "o" / "flat.nii.gz").affine, nib.load(flat).affine)


def test_nibabel_messages_fold_into_the_one_error_line(bases, tmp_path, capsys):
    junk = spoiled(tmp_path, "junk.nii", b"hello, not an image " * 40)
    line = refused(["encode", "--checkpoint", bases["vqvae"], junk, "--out", tmp_path / "c.mrvq"], capsys,
                   "junk.nii: not a NIfTI file")
    assert "nibabel:" in line


def test_sample_without_its_training_data_still_samples_and_says_so(bases, tmp_path, capsys):
    def lost_data(ckpt):
        ckpt["config"]["data"]["root"] = str(tmp_path / "gone")

    prior = respoiled_checkpoint(bases["prior"], tmp_path, lost_data)
    capsys.readouterr()
    assert run_main(["sample", "--prior", str(prior), "--n", "17", "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "not comparing samples with the training slices" in err and "gone" in err
    assert "17 slices will take about" in err
    assert len(list((tmp_path / "s").glob("sample_*.nii.gz"))) == 17
    assert not (tmp_path / "s" / "nearest.png").exists()


def test_an_interrupted_sample_keeps_what_it_drew(bases, tmp_path, monkeypatch):
    from mrivq.apps import sample as sample_app
    from mrivq.nn.transformer_prior import TransformerPrior

    real, calls = TransformerPrior.sample, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TransformerPrior, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample_app.sample(bases["prior"], 40, tmp_path / "s", batch_size=16, nearest=False)
    kept = sorted(p.name for p in (tmp_path / "s").glob("sample_*.nii.gz"))
    assert kept == [f"sample_{i:03d}.nii.gz" for i in range(16)]
    for name in kept[:2]:
        assert nib.load(tmp_path / "s" / name).get_fdata().shape == (64, 32)


def test_sample_refuses_a_temperature_that_breaks_the_softmax(bases, tmp_path, capsys):
    refused(["sample", "--prior", bases["prior"], "--n", "1", "--out", tmp_path / "s", "--temperature", "1e-300"],
            capsys, "--temperature must be between")


def test_sample_refuses_to_replace_other_files(bases, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "samples.png").write_text("my picture")
    refused(["sample", "--prior", bases["prior"], "--n", "1", "--out", out], capsys, "samples.png",
            "not written by mrivq")
    assert (out / "samples.png").read_text() == "my picture" and not (out / "sample_000.nii.gz").exists()


# ---------------------------------------------------------------------------------------
# The fuzz test
# ---------------------------------------------------------------------------------------

def test_fuzzed_files(bases, tmp_path):
    """Seeded mutations of the codes files, checkpoints and DICOM images (truncations, byte flips,
    header and config edits with random types and sizes, bombs) through decode, sample and encode, in a child
    process: each ends in exit 0 or in exit 2 with one line and no traceback, nothing outside
    its --out changes, and peak memory stays bounded."""
    summary = tmp_path / "summary.json"
    args = [sys.executable, str(TESTS / "hostile_fuzz.py"), "--cases", "520", "--seed", "7", "--work", str(tmp_path),
            "--summary", str(summary), *(f"--{key}={value}" for key, value in bases.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MRIVQ_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(summary.read_text())
    assert result["cases"] >= 500 and not result["failures"], result["failures"][:5]
    assert result["exit_2"] > 0.5 * result["cases"]
    assert result["peak_mib"] < 1200, result["peak_mib"]
    spoiled_dicom = sum(count for kind, count in result["kinds"].items() if kind.startswith("dicom/"))
    assert spoiled_dicom > 40 and result["kinds"].get("dicom/bomb", 0) > 0, result["kinds"]


def _with_layer(blob: bytes, listed, section: tuple[str, bytes] | None) -> bytes:
    """``blob`` whose header lists the coding layers ``listed`` (None: no entry), with ``section`` added."""
    header = read_header(blob)
    if listed is not None:
        header["layers"] = listed
    blob = with_header(blob, header)
    return join_sections(blob, split_sections(blob) + ([section] if section else []))


@pytest.mark.parametrize("listed, section, message", [
    (["exact"], None, "coding layers are not the ones its header lists"),
    (None, ("layer-exact", b"\0" * 64), "coding layers are not the ones its header lists"),
    (["exact"], ("layer-other", b"\0" * 64), "coding layers are not the ones its header lists"),
    (["exact"], ("layer-exact", b"\xff" * 64), "slice lengths do not add up"),
    (["exact"], ("layer-exact", b"\0" * 2), "slice lengths do not add up"),
    (5, None, "header's layers"), (["../x"], None, "header's layers.0"), (["a", "a"], None, "listed twice"),
    (["exact"] * 9, None, "header's layers"),
    (["unknown"], ("layer-unknown", None), "coding layer 'unknown', which this mrivq does not know"),
])
def test_coding_layer_sections_that_do_not_fit_are_refused(bases, tmp_path, capsys, listed, section, message):
    """A layer section the header does not list, a listed one missing, per-slice lengths that do
    not add up (or a length a million times too large), a list of the wrong type, a name that is
    a path, a layer this mrivq does not know: one line, exit 2, nothing written."""
    blob = bases["codes"].read_bytes()
    n = read_header(blob)["n"]
    if section is not None and section[1] is None:  # a well-formed section of n empty payloads
        section = (section[0], b"\0" * (4 * n))
    path = spoiled(tmp_path, "layered.mrvq", _with_layer(blob, listed, section))
    out = tmp_path / "out"
    refused(decode_args(bases, path, out), capsys, message)
    assert not list(out.glob("*.nii.gz")) if out.exists() else True
