"""The residual layer (``encode --max-error``): every voxel within the bound, exactly at 0, in the
input's own type and scaling; the same on a machine whose floating point rounds otherwise; damaged
payloads and data it cannot code refused in one line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_main
from prior_helpers import OneUlp

from mrivq.compression import layers, residual
from mrivq.compression.codec import CodecInput
from mrivq.compression.container import CodesFile, read_codes_file
from mrivq.compression.layers import Stored
from mrivq.engine.checkpoint import load_codec

DELTAS = (0, 1, 2, 4)


@pytest.fixture(scope="module")
def test_files(tiny_phantom):
    return sorted((tiny_phantom / "keras_slices_test").glob("*.nii.gz"))[:4]


def _stored_of(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj.get_unscaled())


@pytest.fixture
def grouped(monkeypatch):
    """The mean's weights fitted per contrast group even in the tests' small slices (real slices
    need 8,192 voxels in a phase for that)."""
    monkeypatch.setattr(residual, "GROUP_VOXELS", 8)


@pytest.fixture(params=["three phases", "four phases"])
def layout(request, monkeypatch):
    """Every slice coded in the layout the parameter names (the encoder's choice, read by the
    decoder from the payload's flag), whatever :func:`residual._four_phases` would pick."""
    four = request.param == "four phases"
    monkeypatch.setattr(residual, "_four_phases", lambda *args: four)
    return four


@pytest.mark.parametrize("groups", ["one mean per phase", "contrast groups"])
@pytest.mark.parametrize("delta", DELTAS)
def test_every_voxel_decodes_within_the_bound_and_exactly_at_zero(work, test_files, delta, one_thread, groups,
                                                                  layout, request):
    if groups == "contrast groups":
        request.getfixturevalue("grouped")
    codec = load_codec(work["vqvae"])
    slices = CodecInput.read(test_files, codec.prep, originals=True)
    packed = codec.compress(slices, layers=("residual",), layer_options={"residual": {"max_error": delta}})
    file = CodesFile.from_bytes(packed.blob)
    assert all(len(residual._parse(p, s.values.shape).phases) == (4 if layout else 3)
               for p, s in zip(file.layers["residual"], slices.originals))
    decoded = dict(codec.decompress(file))
    errors = [np.abs(decoded[i].values.astype(np.float64) - _stored_of(path)).max() for i, path in enumerate(test_files)]
    assert max(errors) <= delta
    if delta == 0:
        assert all(np.array_equal(decoded[i].values, _stored_of(path)) for i, path in enumerate(test_files))
    else:  # the bound is used, not just met: a coarser residual costs fewer bits than the exact one
        exact = codec.compress(slices, layers=("residual",), layer_options={"residual": {"max_error": 0}})
        assert max(errors) == delta and len(packed.blob) < 0.95 * len(exact.blob)
    # a residual file costs more than the codes alone, and less than the slices' raw float32
    codes_only = codec.compress(slices)
    assert len(codes_only.blob) < len(packed.blob) < sum(4 * p.size for p in slices.images)


@pytest.mark.parametrize("picture", ["integer copy", "float64"])
def test_a_machine_whose_floating_point_rounds_otherwise_decodes_the_same_values(work, test_files, one_thread,
                                                                                 picture, monkeypatch, grouped,
                                                                                 layout):
    """Every float result of torch moved one ulp: a new file's picture (the decoder's integer copy)
    does not move at all; an older file's (float64, as files before the copy, and models without
    one, have it) moves, and the decoded values do not (at 0 and 2)."""
    if picture == "float64":
        monkeypatch.setattr("mrivq.compression.codec.has_copy", lambda model: False)
    codec = load_codec(work["vqvae"])
    slices = CodecInput.read(test_files, codec.prep, originals=True)
    for delta in (0, 2):
        packed = codec.compress(slices, layers=("residual",), layer_options={"residual": {"max_error": delta}})
        file = CodesFile.from_bytes(packed.blob)
        assert ("picture" in file.header) == (picture == "integer copy")
        plain = dict(codec._decoded(file, *packed.codes, exact=True))
        with OneUlp():
            nudged = dict(codec._decoded(file, *packed.codes, exact=True))
            decoded = dict(codec.decompress(file, codes=packed.codes))
        moved = [not np.array_equal(plain[i], nudged[i]) for i in plain]
        assert any(moved) if picture == "float64" else not any(moved)
        again = dict(codec.decompress(file, codes=packed.codes))
        for i, stored in decoded.items():
            assert np.array_equal(stored.values, again[i].values)
            assert np.abs(stored.values - _stored_of(test_files[i])).max() <= delta


def test_pictures_at_rounding_ties_store_their_rounding():
    """A picture exactly halfway between integers rounds one way on one machine and the other way a
    hair away: the layer stores those roundings, so both decode the same values."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 400, size=(24, 20)).astype(np.int64)
    picture = np.round(values + rng.normal(0, 3, values.shape)) + 0.5  # every voxel at a tie
    payload = residual.encode(Stored(values, "int16"), picture, max_error=0)
    assert len(residual._parse(payload, values.shape).near) == values.size  # all stored
    for nudge in (1e-13, -1e-13):
        assert np.array_equal(residual.decode(payload, picture * (1 + nudge)).values, values)
    # far from ties nothing is stored
    assert len(residual._parse(residual.encode(Stored(values, "int16"), picture + 0.25), values.shape).near) == 0


def test_a_picture_further_off_than_the_guard_is_refused_not_decoded_wrong():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 400, size=(16, 16)).astype(np.int64)
    picture = values + rng.normal(0, 3, values.shape)
    payload = residual.encode(Stored(values, "uint16"), picture, max_error=1)
    # another picture gives other classes (the payload's shapes do not fit them), or other values
    with pytest.raises(ValueError, match="checksum|decode|do not fit"):
        residual.decode(payload, picture + 0.5)


def test_integer_types_and_scaling_come_back_as_stored(work, tmp_path, one_thread, capsys):
    """An int16 slice with scl_slope 2, scl_inter -7, a uint8 slice and a 3-D int16 volume: decode
    writes the same type, scaling and stored numbers (and --codes-only the float32 picture)."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "in"
    folder.mkdir()
    base = np.clip(rng.normal(300, 80, (64, 32)), 0, None)
    scaled = nib.Nifti1Image(base.astype(np.int16), np.diag([0.8, 0.8, 3.0, 1.0]))
    scaled.header.set_slope_inter(2.0, -7.0)
    nib.save(scaled, folder / "scaled.nii.gz")
    nib.save(nib.Nifti1Image((base / 4).astype(np.uint8), np.eye(4)), folder / "bytes.nii.gz")
    volume = np.stack([base + 10 * k for k in range(3)], axis=2).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "volume.nii.gz")
    coded = tmp_path / "all.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(folder), "--out", str(coded),
                     "--max-error", "0"]) == 0
    assert "exactly (lossless)" in capsys.readouterr().out
    assert read_codes_file(coded).header["layers"] == ["residual"]
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "out")]) == 0
    for name in ("scaled.nii.gz", "bytes.nii.gz", "volume.nii.gz"):
        original, decoded = nib.load(folder / name), nib.load(tmp_path / "out" / name)
        assert decoded.get_data_dtype() == original.get_data_dtype()
        assert decoded.dataobj.slope == original.dataobj.slope and decoded.dataobj.inter == original.dataobj.inter
        assert np.array_equal(np.asarray(decoded.dataobj.get_unscaled()), np.asarray(original.dataobj.get_unscaled()))
        assert np.allclose(decoded.affine, original.affine)
    # one slice of the volume on its own: a 2-D int16 file, exactly that slice
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "one"),
                     "--slices", "volume_slice_1*"]) == 0
    one = nib.load(tmp_path / "one" / "volume_slice_1.nii.gz")
    assert one.get_data_dtype() == np.int16 and np.array_equal(np.asarray(one.dataobj), volume[:, :, 1])
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "fast"),
                     "--codes-only"]) == 0
    picture = nib.load(tmp_path / "fast" / "scaled.nii.gz")
    assert picture.get_data_dtype() == np.float32
    assert 0 < np.abs(picture.get_fdata() - scaled.get_fdata()).max()


def test_float_data_that_are_not_integers_are_refused_lossless_and_bounded_otherwise(work, tmp_path, capsys,
                                                                                    one_thread):
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    data = rng.normal(100, 20, (64, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), folder / "floats.nii.gz")
    coded = tmp_path / "f.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(folder), "--out", str(coded),
                     "--max-error", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "floats.nii.gz" in err and "not integers" in err and len(err.splitlines()) == 1 and not coded.exists()
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(folder), "--out", str(coded),
                     "--max-error", "0.25"]) == 0
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(coded), "--out", str(tmp_path / "out")]) == 0
    decoded = nib.load(tmp_path / "out" / "floats.nii.gz")
    assert decoded.get_data_dtype() == np.float32
    error = np.abs(np.asarray(decoded.dataobj, dtype=np.float64) - data).max()
    assert 0.2 < error <= 0.25
    for bad in ("-1", "nan"):
        assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(folder), "--out", str(coded),
                         "--max-error", bad]) == 2
        assert "--max-error" in capsys.readouterr().err


def test_a_damaged_residual_is_refused_in_one_line(work, test_files, tmp_path, capsys, one_thread):
    coded = tmp_path / "r.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), *map(str, test_files[:2]), "--out", str(coded),
                     "--max-error", "1"]) == 0
    file = read_codes_file(coded)
    shape = nib.load(test_files[0]).shape[:2]
    words = len(residual._parse(file.layers["residual"][0], shape).words)
    # the payload's version, the slice's height, a word in the middle of the coder's stream (its
    # last bits may be slack: a flip there can leave every value as it was, which decode rightly accepts)
    for position in (0, 3, -4 * (words // 2) - 2):
        payload = bytearray(file.layers["residual"][0])
        payload[position] ^= 0x5A
        file.layers["residual"][0] = bytes(payload)
        damaged = tmp_path / f"damaged{position}.mrvq"
        damaged.write_bytes(file.to_bytes())
        file.layers["residual"][0] = read_codes_file(coded).layers["residual"][0]
        capsys.readouterr()
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(damaged), "--out",
                         str(tmp_path / f"out{position}")]) == 2
        err = capsys.readouterr().err.strip()
        assert "residual layer does not decode" in err and len(err.splitlines()) == 1
        assert not list((tmp_path / f"out{position}").glob("*.nii.gz"))
    # the last slice's stream damaged (a word in its middle: the tail's last bits may be slack): the
    # slices decoded before it are not left behind either
    payload = bytearray(file.layers["residual"][1])
    payload[len(payload) // 2] ^= 0x5A
    file.layers["residual"][1] = bytes(payload)
    (tmp_path / "late.mrvq").write_bytes(file.to_bytes())
    capsys.readouterr()
    assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(tmp_path / "late.mrvq"), "--out",
                     str(tmp_path / "late")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not list((tmp_path / "late").glob("*.nii.gz"))


def test_the_float64_picture_is_the_float32_one_to_float32_precision(work, test_files):
    codec = load_codec(work["vqvae"])
    packed = codec.compress(CodecInput.read(test_files, codec.prep))
    single = dict(codec._decoded(packed.file, *packed.codes))
    double = dict(codec._decoded(packed.file, *packed.codes, exact=True))
    assert all(double[i].dtype == np.float64 for i in double)
    scale = max(np.abs(single[i]).max() for i in single)
    assert max(np.abs(double[i] - single[i]).max() for i in single) < 1e-4 * scale
    assert next(codec.model.parameters()).dtype == torch.float32  # the codec's own model is untouched


def test_damaged_payloads_never_decode_to_other_values(grouped, layout):
    """Bytes flipped anywhere in a payload, or the payload cut short: a ValueError, or (a byte the
    decoder never reads) exactly the values encoded."""
    rng = np.random.default_rng(4)
    values = rng.integers(0, 900, size=(20, 18)).astype(np.int64)
    picture = values + rng.normal(0, 6, values.shape)
    for delta in (0, 3):
        payload = residual.encode(Stored(values, "int16"), picture, max_error=delta)
        for trial in range(150):
            damaged = bytearray(payload)
            if trial % 10 == 9:
                damaged = damaged[:int(rng.integers(0, len(payload)))]
            else:
                damaged[int(rng.integers(0, len(payload)))] ^= int(rng.integers(1, 256))
            try:
                decoded = residual.decode(bytes(damaged), picture)
            except ValueError:
                continue
            assert np.abs(decoded.values - values).max() <= delta


def test_predict_puts_the_bounded_files_beside_the_lossless_codecs(work, tmp_path):
    import json

    out = tmp_path / "run"
    assert run_main(["predict", "--checkpoint", str(work["vqvae"]), "--max-error", "0", "2",
                     "--set", "predict.sample_sets=1", "--set", f"output.dir={out}"]) == 0
    ladder = json.loads((out / "predict" / "summary.json").read_text())["max_error"]
    assert [row["max_error"] for row in ladder["rows"]] == [0, 2]
    exact, bounded = ladder["rows"]
    assert exact["mrivq"]["largest_error"] == 0 and exact["mrivq"]["psnr"] is None
    assert bounded["mrivq"]["largest_error"] <= 2 and bounded["mrivq"]["ssim"] < 1
    assert bounded["mrivq"]["bits_per_voxel"] < exact["mrivq"]["bits_per_voxel"]
    assert exact["mrivq"]["codes"] + exact["mrivq"]["residual"] == pytest.approx(exact["mrivq"]["bits_per_voxel"])
    assert {"JPEG-LS", "JPEG XL", "JPEG 2000", "HTJ2K", "PNG"} <= set(exact["codecs"])
    assert set(bounded["codecs"]) == {"JPEG-LS"}
    # the lossy codecs at each file's rate, on the same stored values: what error they make there
    assert ladder["lossy"]["slices"] >= 1 and "JPEG XL" in ladder["lossy"]["method"]
    for row in (exact, bounded):
        assert set(row["lossy"]) == {"JPEG XL", "AVIF", "WebP"}
        for entry in row["lossy"].values():
            assert 0 < entry["bits_per_voxel"] <= row["mrivq"]["bits_per_voxel"]
            assert entry["largest_error"] >= 0 and 0 < entry["ssim"] <= 1
    assert (out / "visuals" / "max_error.png").stat().st_size > 0
    assert "Lossless and bounded-error files" in (out / "report.html").read_text()


def test_the_mean_is_fitted_from_the_decoded_neighbours_and_the_pictures_differences():
    """A smooth residual field: the fitted weights predict each voxel from its decoded neighbours
    (the payload is far smaller than for the same residuals shuffled in place, which no neighbour
    predicts); and the weights of an exact linear relation come back from the fit."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    values = np.round(500 + 4 * np.cumsum(np.cumsum(rng.normal(0, 1, (48, 40)), 0), 1)).astype(np.int64)
    picture = values.astype(np.float64) + 0.2
    field = np.round(ndimage.gaussian_filter(rng.normal(0, 60, values.shape), 1.5)).astype(np.int64)
    shuffled = rng.permutation(field.ravel()).reshape(field.shape)
    sizes = [len(residual.encode(Stored(values + f, "int16"), picture)) for f in (field, shuffled)]
    assert sizes[0] < 0.8 * sizes[1]
    columns = rng.integers(-300, 300, size=(6, 400)).astype(np.int64)  # a row per column of the design
    weights = np.array([256, -128, 64, 0, 512, -32], dtype=np.int64)
    q = residual._weighted_mean(columns * 3, weights, 3)
    assert np.abs(residual._fit_weights(q, columns * 3, 3) - weights).max() <= 2


def test_a_phase_is_split_at_its_contrast_quantiles_and_each_group_gets_its_own_mean(monkeypatch, grouped):
    """A phase's voxels fall into groups by the picture's contrast (quantile bins, ties to the lower
    bin, in a stable order); where the residual follows its neighbours in flat parts of the picture
    and alternates in sign across them in textured parts, one set of weights per group codes it
    in far fewer bits than one set for the whole phase, and both decode exactly."""
    contrast = np.array([5, 0, 0, 9, 2, 0, 7, 2, 2, 1, 0, 3])
    order, bounds = residual._mean_groups(contrast, 4)
    edges = np.sort(contrast)[[3, 6, 9]]  # 0, 2, 5
    assert np.array_equal(edges, [0, 2, 5])
    group = (contrast[:, None] > edges).sum(1)
    assert np.array_equal(order, np.argsort(group, kind="stable"))
    assert np.array_equal(bounds, np.append(0, np.cumsum(np.bincount(group, minlength=4))))
    assert residual._mean_groups(contrast, 1)[0] is None

    rng = np.random.default_rng(2)
    rows, cols = np.indices((64, 64))
    textured = cols >= 32
    picture = 800.0 + np.where(textured, 300 * ((rows + cols) % 3), 0) + 0.3
    from scipy import ndimage
    smooth = ndimage.gaussian_filter(rng.normal(0, 80, picture.shape), 2)
    field = np.round(np.where(textured, np.where((rows + cols) % 2, 1, -1) * smooth, smooth)).astype(np.int64)
    values = np.round(picture).astype(np.int64) + field
    payloads = {}
    for groups in (4, 1):
        monkeypatch.setattr(residual, "_group_count", lambda n, groups=groups: groups)
        payloads[groups] = residual.encode(Stored(values, "int16"), picture)
        assert np.array_equal(residual.decode(payloads[groups], picture).values, values)
    assert len(payloads[4]) < 0.9 * len(payloads[1])


def test_the_coders_one_shape_tables_are_the_fitted_tables_rows():
    for width in (0, 3, 40):
        for cls in range(0, residual.N_CLASSES, 7):
            table = residual._weights(cls, width)
            for shape in range(residual.SHAPES):
                assert np.array_equal(table[shape], residual._shape_weights(cls, width, shape))


@pytest.mark.parametrize("width", [0, 1, 40, residual.ESCAPE])
def test_the_fit_prices_each_shape_at_what_the_coders_tables_would_cost(width):
    """The fit reads its costs from the non-zero counts alone; they are the bits under the
    coder's own tables (-log2 of each normalised row, times the counts)."""
    rng = np.random.default_rng(width)
    counts = rng.integers(0, 9, size=(residual.N_CLASSES, 2 * width + 2)) * (rng.random((residual.N_CLASSES, 1)) < 0.4)
    used, costs = residual._shape_costs(width, counts)
    assert np.array_equal(used, np.flatnonzero(counts.sum(1)))
    for j, cls in enumerate(used[:6]):
        table = residual._weights(int(cls), width)
        bits = -((np.log2(table) - np.log2(table.sum(1, keepdims=True))) @ counts[cls])
        np.testing.assert_allclose(costs[:, j], bits, rtol=1e-9)


def test_slices_of_a_volume_are_coded_given_the_slices_around_them(work, tiny_phantom, tmp_path, one_thread):
    """A scan's consecutive slices: each slice between two key slices is coded given the two it is
    coded after (as they decode); the file lists them, every slice still decodes within δ, and a
    slice decoded alone is the slice the whole file gives."""
    files = sorted((tiny_phantom / "keras_slices_test").glob("*.nii.gz"))
    codec = load_codec(work["vqvae"])
    slices = CodecInput.read(files, codec.prep, originals=True)
    for delta in (0, 2):
        packed = codec.compress(slices, layers=("residual",), layer_options={"residual": {"max_error": delta}})
        refs = np.asarray(packed.file.header["layer_references"])
        assert (refs[:, 0] >= 0).sum() >= len(files) - 2
        flagged = [residual._parse(p, o.values.shape).head["referenced"]
                   for p, o in zip(packed.file.layers["residual"], slices.originals)]
        assert flagged == list(refs[:, 0] >= 0)
        file = CodesFile.from_bytes(packed.blob)
        order = [i for i, _ in codec.decompress(file)]
        assert order == list(range(len(files)))  # file order, though references come first inside
        whole = dict(codec.decompress(file))
        for i, stored in whole.items():
            assert np.abs(stored.values - _stored_of(files[i])).max() <= delta
            assert np.array_equal(stored.values, packed.decoded[i].values)
        middle = int(np.flatnonzero(refs[:, 0] >= 0)[-1])
        top, bottom = codec.decompress_codes(file, only=[middle])
        alone = dict(codec.decompress(file, codes=(top, bottom), only=[middle]))
        assert list(alone) == [middle] and np.array_equal(alone[middle].values, whole[middle].values)


def test_a_payload_coded_given_references_needs_those_references():
    rng = np.random.default_rng(1)
    base = rng.integers(100, 900, size=(24, 20))  # texture the picture lacks and the neighbours share
    values = [base + rng.integers(-2, 3, size=base.shape) for _ in range(3)]
    picture = np.full(base.shape, 500.0) + rng.normal(0, 2, base.shape)
    refs = (Stored(values[0], "int16"), Stored(values[2], "int16"))
    payload = residual.encode(Stored(values[1], "int16"), picture, references=refs)
    assert np.array_equal(residual.decode(payload, picture, refs).values, values[1])
    with pytest.raises(ValueError, match="reference"):
        residual.decode(payload, picture)
    with pytest.raises(ValueError):
        residual.decode(payload, picture, (Stored(values[2], "int16"), Stored(values[2], "int16")))
    alone = residual.encode(Stored(values[1], "int16"), picture)
    assert len(payload) < 0.7 * len(alone)  # the neighbours predict the slice


def test_edited_layer_references_are_refused_in_one_line(work, tiny_phantom, tmp_path, capsys, one_thread):
    from hostile_helpers import read_header, with_header

    coded = tmp_path / "volume.mrvq"
    assert run_main(["encode", "--checkpoint", str(work["vqvae"]), str(tiny_phantom / "keras_slices_test"),
                     "--out", str(coded), "--max-error", "0"]) == 0
    blob = coded.read_bytes()
    header = read_header(blob)
    n = len(header["sources"])
    cycle = [[1, -1], [0, -1]] + [[-1, -1]] * (n - 2)
    for refs, message in ((cycle, "header"), ([[-1, -1]] * n, "does not decode"), ([[0, 0]] * n, "header")):
        path = tmp_path / "edited.mrvq"
        path.write_bytes(with_header(blob, {**header, "layer_references": refs}))
        capsys.readouterr()
        assert run_main(["decode", "--checkpoint", str(work["vqvae"]), str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_the_walk_visits_references_first_even_down_a_long_chain():
    from mrivq.compression.codec import _ReferenceWalk

    n = 5000  # every slice coded after the one before: far deeper than Python's recursion limit
    refs = np.stack([np.arange(n) - 1, np.full(n, -1)], 1)
    order = list(_ReferenceWalk(refs, n, np.array([n - 1])).order())
    assert order == list(range(n))
    refs = np.array([[-1, -1], [0, 2], [0, 4], [2, 4], [-1, -1]])  # a run of 5: keys 0 and 4, then 2, then 1 and 3
    order = list(_ReferenceWalk(refs, 5, np.arange(5)).order())
    assert sorted(order) == list(range(5))
    assert all(order.index(int(j)) < order.index(i) for i in range(5) for j in refs[i] if j >= 0)


def test_a_file_coded_on_worker_processes_is_the_file_coded_here(work, tiny_phantom, monkeypatch, one_thread):
    """Coding layers share a file's slices among processes (key slices alone, then each run of
    slices between them): the same bytes and decoded slices as coding them one after another."""
    files = sorted((tiny_phantom / "keras_slices_test").glob("*.nii.gz"))
    codec = load_codec(work["vqvae"])
    slices = CodecInput.read(files, codec.prep, originals=True)
    options = {"residual": {"max_error": 2}}
    here = codec.compress(slices, layers=("residual",), layer_options=options)
    assert np.asarray(here.file.header["layer_references"]).max() >= 0  # slices coded given others
    monkeypatch.setattr(layers, "PARALLEL_SLICES", 2)
    monkeypatch.setattr(layers, "LAYER_PROCESSES", 2)
    shared = codec.compress(slices, layers=("residual",), layer_options=options)
    assert shared.blob == here.blob
    assert all(np.array_equal(a.values, b.values) for a, b in zip(shared.decoded, here.decoded))


def test_slices_are_coded_after_their_references_and_a_circle_of_references_is_refused(monkeypatch):
    from mrivq.data.volumes import references

    monkeypatch.setattr(layers, "LAYER_PROCESSES", 1)  # here, so that the layer's list records the order
    names = [f"case_001_week_0_slice_{s}.nii.gz" for s in range(20)] + ["other.nii.gz"]
    refs = references(names, 8)
    order = []
    recording = layers.CodingLayer("order", "the order", _record_order, _nothing, references=True)
    originals = [Stored(np.full((2, 2), i), "int16") for i in range(len(names))]
    layers.code_slices([recording], {"order": {"seen": order}}, originals, [np.zeros((2, 2))] * len(names), refs)
    assert sorted(order) == list(range(len(names)))
    assert all(order.index(int(j)) < order.index(i) for i in range(len(names)) for j in refs[i] if j >= 0)
    for wrong in (np.array([[1, -1], [0, -1]]), np.array([[-1, -1]]), np.array([[-1, -1], [0, -1], [1, -1]])):
        with pytest.raises(ValueError, match="order"):  # a circle, or not one row per slice
            layers.code_slices([recording], {"order": {"seen": []}}, originals[:2], [np.zeros((2, 2))] * 2, wrong)


def _record_order(original: Stored, picture: np.ndarray, *, seen: list, references=()) -> bytes:
    seen.append(int(original.values[0, 0]))
    return b""


def _refuse_the_third(original: Stored, picture: np.ndarray) -> bytes:
    if original.values[0, 0] == 3:
        raise layers.Refused("it is the third")
    return b""


def _nothing(payload: bytes, picture: np.ndarray, references=()) -> Stored:
    return Stored(np.zeros(picture.shape, dtype=np.int64), "int16")


def test_a_slice_refused_on_a_worker_process_is_named(monkeypatch):
    monkeypatch.setattr(layers, "PARALLEL_SLICES", 2)
    monkeypatch.setattr(layers, "LAYER_PROCESSES", 2)
    layer = layers.CodingLayer("refuse", "the refusing layer", _refuse_the_third, _nothing)
    originals = [Stored(np.full((4, 4), i), "int16") for i in range(6)]
    with pytest.raises(layers.SliceRefused) as refused:
        layers.code_slices([layer], {}, originals, [np.zeros((4, 4))] * 6, None)
    assert (refused.value.index, refused.value.label, refused.value.reason) == (3, "the refusing layer", "it is the third")


def test_a_slice_is_coded_in_four_phases_where_its_odd_rows_follow_their_diagonal_neighbours():
    """The encoder's choice of layout: a residual that is smooth across voxels (the odd rows' quarter
    predicted far better once the even rows are decoded) gets four phases, and in fewer bytes than
    three; white noise around the picture keeps three (a fourth phase's settings would buy
    nothing). Both decode exactly, the decoder reading the choice from the payload."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    picture = np.full((96, 80), 1000.0) + 0.3
    fields = {"smooth": ndimage.zoom(rng.normal(0, 60, (24, 20)), 4, order=1), "white": rng.normal(0, 20, picture.shape)}
    for name, field in fields.items():
        values = np.round(picture + field).astype(np.int64)
        payload = residual.encode(Stored(values, "int16"), picture)
        four = len(residual._parse(payload, values.shape).phases) == 4
        assert four == (name == "smooth"), name
        assert np.array_equal(residual.decode(payload, picture).values, values)
        if four:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(residual, "_four_phases", lambda *args: False)
                three = residual.encode(Stored(values, "int16"), picture)
            assert len(payload) < 0.97 * len(three)
