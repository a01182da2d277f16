"""Golden files: codes files an earlier mrivq wrote (tests/golden/, see its README.md) still decode,
their codes bit for bit and their slices to within another CPU's float rounding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import run_main

GOLDEN = Path(__file__).parent / "golden"

# name -> the prior it was coded under (None: code frequencies)
FILES = {"frequencies": None, "passes": "prior_passes.pt", "raster": "prior_transformer.pt"}


@pytest.fixture(scope="module")
def expected():
    import numpy as np

    with np.load(GOLDEN / "expected.npz") as stored:
        return {key: stored[key] for key in stored.files}


def prior_args(name: str) -> list[str]:
    return [] if FILES[name] is None else ["--prior", str(GOLDEN / FILES[name])]


@pytest.mark.parametrize("name", list(FILES))
def test_golden_file_is_unchanged(name, expected):
    """The stored file itself is the one the earlier version wrote (nobody regenerated it)."""
    data = (GOLDEN / f"{name}.mrvq").read_bytes()
    assert len(data) == int(expected[f"{name}/size"])
    assert hashlib.sha256(data).hexdigest() == str(expected[f"{name}/sha256"])


@pytest.mark.parametrize("name", list(FILES))
def test_golden_file_decodes_to_the_same_codes(name, expected):
    """The codes come back exactly: the file format and the entropy coders are unchanged."""
    import numpy as np

    from mrivq.compression.container import read_codes_file
    from mrivq.engine.checkpoint import load_codec

    prior = None if FILES[name] is None else GOLDEN / FILES[name]
    codec = load_codec(GOLDEN / "vqvae.pt", prior=prior)
    top, bottom = codec.decompress_codes(read_codes_file(GOLDEN / f"{name}.mrvq"))
    for level, codes in (("top", top), ("bottom", bottom)):
        stored = expected[f"{name}/{level}"]
        codes = np.asarray(codes)
        assert codes.shape == stored.shape, level
        assert np.array_equal(codes, stored), f"{name}: {level} codes differ"


@pytest.mark.parametrize("name", list(FILES))
def test_golden_file_decodes_to_the_same_slices(name, expected, tmp_path):
    """``mrivq decode`` writes the same slices, to a tolerance for the VQ-VAE decoder's float
    rounding on another CPU (1e-3 of each slice's intensity range)."""
    import nibabel as nib
    import numpy as np

    out = tmp_path / "out"
    args = ["decode", "--device", "cpu", "--checkpoint", str(GOLDEN / "vqvae.pt"), *prior_args(name),
            str(GOLDEN / f"{name}.mrvq"), "--out", str(out)]
    assert run_main(args) == 0
    names = [str(n) for n in expected[f"{name}/names"]]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == names
    for written, stored in zip(names, expected[f"{name}/slices"]):
        decoded = np.asarray(nib.load(out / written).dataobj, dtype=np.float32)
        assert decoded.shape == stored.shape, written
        tolerance = 1e-3 * float(stored.max() - stored.min())
        np.testing.assert_allclose(decoded, stored, rtol=0, atol=tolerance, err_msg=f"{name}: {written}")


@pytest.mark.parametrize("name", list(FILES))
def test_the_same_codes_are_coded_into_the_same_bytes_today(name):
    """Coding the golden file's own codes and side data again gives the very bytes the earlier
    version wrote: the header, the frequency coder and both priors' integer coders are unchanged
    (integers, so on any machine)."""
    from mrivq.compression.codec import CodecInput
    from mrivq.compression.container import read_codes_file
    from mrivq.engine.checkpoint import load_codec

    prior = None if FILES[name] is None else GOLDEN / FILES[name]
    codec = load_codec(GOLDEN / "vqvae.pt", prior=prior)
    file = read_codes_file(GOLDEN / f"{name}.mrvq")
    codes = codec.decompress_codes(file)
    slices = CodecInput(None, file.norm, file.affines, file.shapes, file.header["sources"])
    assert codec.compress_codes(codes, slices).blob == (GOLDEN / f"{name}.mrvq").read_bytes()


@pytest.mark.parametrize("name", ["passes", "raster"])
def test_golden_prior_coded_files_decode_the_same_with_every_float_result_one_ulp_off(name, expected, monkeypatch):
    """The integer copies' weights do not move when every floating-point result does (one thread:
    torch function modes hold in the thread that enters them). The pass prior's copy takes its
    float32-products path, as on a CPU without VNNI, so that there are float results to move."""
    import numpy as np
    import torch
    from prior_helpers import OneUlp

    from mrivq.compression.container import read_codes_file
    from mrivq.compression.portable import passes
    from mrivq.engine.checkpoint import load_codec

    monkeypatch.setattr(passes, "int_mm_is_exact", lambda device: False)

    codec = load_codec(GOLDEN / "vqvae.pt", prior=GOLDEN / FILES[name])
    file = read_codes_file(GOLDEN / f"{name}.mrvq")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with OneUlp() as nudge:
            top, bottom = codec.decompress_codes(file)
    finally:
        torch.set_num_threads(threads)
    assert nudge.calls > 0
    assert np.array_equal(top, expected[f"{name}/top"]) and np.array_equal(bottom, expected[f"{name}/bottom"])


@pytest.mark.parametrize("version", ["", "2", "3", "4", "5"])
@pytest.mark.parametrize("name", ["lossless", "bounded2"])
def test_residual_files_of_earlier_payload_versions_decode_to_the_values_they_held(name, version, tmp_path):
    """Files the residual layer's earlier payload versions wrote (``encode --max-error 0`` and ``2``):
    version 1 (before the weighted mean; the float64 picture) and version 2 (the weighted mean in
    1/256 and float16 coefficients; the first files on the decoder's integer copy, ``int8-v1``) and
    version 3 (9-bit coefficients, weights in 1/128, the middle slice coded given the other two) and
    version 4 (the mean's weights in four contrast groups of every phase) and version 5 (each slice in
    four phases, the picture's spread a scale feature):
    ``mrivq decode`` writes exactly the stored values they held."""
    import nibabel as nib
    import numpy as np

    path = GOLDEN / f"residual{version}_{name}.mrvq"
    data = path.read_bytes()
    with np.load(GOLDEN / f"expected_residual{version}.npz") as stored:
        expected = {key: stored[key] for key in stored.files}
    assert hashlib.sha256(data).hexdigest() == str(expected[f"{name}/sha256"])
    out = tmp_path / "out"
    assert run_main(["decode", "--device", "cpu", "--checkpoint", str(GOLDEN / "vqvae.pt"), str(path),
                     "--out", str(out)]) == 0
    for written, values in zip(expected["names"], expected[f"{name}/values"]):
        decoded = np.asarray(nib.load(out / f"{written}.nii.gz").dataobj.get_unscaled())
        assert np.array_equal(decoded, values), written
    if version in ("4", "5"):  # these files exercise the groups: every phase of every slice has four
        from mrivq.compression import residual
        from mrivq.compression.container import read_codes_file

        payloads = read_codes_file(path).layers["residual"]
        parsed = [residual._parse(p, (64, 32)).phases for p in payloads]
        assert all(len(mean) == 4 for phases in parsed for _, _, mean in phases)
        assert all(len(phases) == (4 if version == "5" else 3) for phases in parsed)
