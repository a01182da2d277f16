"""Real MRI for the quality benchmark: axial slices of the MNI152 T1 template shipped in nilearn.

The phantom is what every default run and test uses; a recipe must also win on real anatomy.
nilearn's wheel carries the ICBM 2009a MNI152 T1 head (197 x 233 x 189 at 1 mm), so no
download happens at run time. This writes its axial slices that hold some head (more than 5 %
of pixels above 5 % of the maximum) as a flat folder of ``case_NNN_slice_S.nii.gz`` files, one
"case" per slab of ``--slab`` neighbouring slices, so mrivq's split by case keeps neighbouring
(near-identical) slices on one side:

    pip install nilearn        # or: --source path/to/nilearn-*.whl
    python benchmarks/real_mri.py /tmp/mni_slices
    python benchmarks/quality.py --set data.root=/tmp/mni_slices --set "data.image_size=[232,192]" \\
        --precision fp32 --steps 360

It is one (averaged) head, smoother than a single scan: a check that a recipe does not only
suit the phantom, not a clinical benchmark.
"""

from __future__ import annotations

import argparse
import gzip
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

TEMPLATE = "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def template_bytes(source: str | None) -> bytes:
    """The template's .nii.gz bytes from a nilearn wheel, or from the installed nilearn."""
    if source:
        with zipfile.ZipFile(source) as wheel:
            return wheel.read(TEMPLATE)
    from importlib.resources import files

    return (files("nilearn") / TEMPLATE.removeprefix("nilearn/")).read_bytes()


def write_slices(out_dir: Path, source: str | None, slab: int) -> int:
    raw = gzip.decompress(template_bytes(source))
    volume = nib.Nifti1Image.from_bytes(raw)
    data = np.asarray(volume.dataobj, dtype=np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold = 0.05 * data.max()
    kept = [k for k in range(data.shape[2]) if (data[:, :, k] > threshold).mean() > 0.05]
    for i, k in enumerate(kept):
        image = nib.Nifti1Image(data[:, :, k], volume.affine)
        nib.save(image, str(out_dir / f"case_{i // slab:03d}_slice_{k}.nii.gz"))
    return len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source", help="a nilearn wheel to read the template from (default: installed nilearn)")
    parser.add_argument("--slab", type=int, default=12, help="slices per pseudo-case (default 12)")
    args = parser.parse_args()
    n = write_slices(args.out_dir, args.source, args.slab)
    print(f"wrote {n} axial slices in {-(-n // args.slab)} slabs to {args.out_dir}")


if __name__ == "__main__":
    main()
