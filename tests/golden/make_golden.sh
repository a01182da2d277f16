#!/bin/bash
# How tests/golden/ was made (once, with main at the commit in README.md): PYTHONPATH=<that checkout>/src
# bash make_golden.sh writes them into $W/golden (W: an empty folder, default a new temp one).
# Never rerun it to replace the files in tests/golden/.
set -euo pipefail
W=${W:-$(mktemp -d)}; mkdir -p "$W"; [ -z "$(ls -A "$W")" ] || { echo "W=$W must be empty" >&2; exit 1; }; cd "$W"
export MRIVQ_CACHE_DIR=$W/mcache
python -c "from mrivq.data.phantom import synthesize; synthesize('$W/phantom/hipmri', cases=6, seed=0, slices_per_volume=6, shape=(64, 32), montage=False)"
D="--set data.root=$W/phantom/hipmri --set data.image_size=[64,32] --set data.cache_dir=$W/cache --set data.workers=1 --set train.num_threads=1 --set train.precision=fp32"
python -m mrivq train $D --set train.epochs=48 --set train.batch_size=4 --set train.interval=6 --set train.warmup_steps=2 --set train.sample_size=2 --set output.dir=$W/vqvae --set model.channel=8 --set model.n_res_block=1 --set model.n_res_channel=8 --set model.embed_dim=8 --set model.n_embed=16
A="--set prior.augment_shift=0 --set prior.augment_scale=0 --set prior.augment_flip=none --set prior.steps=30 --set prior.interval=10 --set prior.batch_size=8 --set prior.warmup_steps=2 --set prior.dropout=0.0 --set prior.condition_blocks=1"
python -m mrivq train-prior --checkpoint vqvae/models/best.pt $D $A --set output.dir=$W/prior_passes --set prior.architecture=passes --set prior.channels=8 --set prior.layers=2
python -m mrivq train-prior --checkpoint vqvae/models/best.pt $D $A --set output.dir=$W/prior_transformer --set prior.architecture=transformer --set prior.d_model=8 --set prior.n_head=2 --set prior.n_layer_top=1 --set prior.n_layer_bottom=1
T=phantom/hipmri/keras_slices_test; S="$T/case_724_week_0_slice_1.nii.gz $T/case_724_week_0_slice_2.nii.gz $T/case_724_week_0_slice_3.nii.gz"
mkdir -p golden
cp vqvae/models/best.pt golden/vqvae.pt
cp prior_passes/models/prior_best.pt golden/prior_passes.pt
cp prior_transformer/models/prior_best.pt golden/prior_transformer.pt
python -m mrivq encode --device cpu --checkpoint golden/vqvae.pt $S --out golden/frequencies.mrvq
python -m mrivq encode --device cpu --checkpoint golden/vqvae.pt --prior golden/prior_passes.pt $S --out golden/passes.mrvq
python -m mrivq encode --device cpu --checkpoint golden/vqvae.pt --prior golden/prior_transformer.pt $S --out golden/raster.mrvq
python -m mrivq decode --device cpu --checkpoint golden/vqvae.pt golden/frequencies.mrvq --out decoded/frequencies
python -m mrivq decode --device cpu --checkpoint golden/vqvae.pt --prior golden/prior_passes.pt golden/passes.mrvq --out decoded/passes
python -m mrivq decode --device cpu --checkpoint golden/vqvae.pt --prior golden/prior_transformer.pt golden/raster.mrvq --out decoded/raster
python - <<'PY'
import hashlib, os, numpy as np, nibabel as nib
from mrivq.compression.container import read_codes_file
from mrivq.engine.checkpoint import load_codec
out = {}
for name, prior in [("frequencies", None), ("passes", "golden/prior_passes.pt"), ("raster", "golden/prior_transformer.pt")]:
    path = f"golden/{name}.mrvq"
    top, bottom = load_codec("golden/vqvae.pt", prior=prior).decompress_codes(read_codes_file(path))
    out[f"{name}/top"], out[f"{name}/bottom"] = np.asarray(top), np.asarray(bottom)
    files = sorted(f for f in os.listdir(f"decoded/{name}") if f.endswith(".nii.gz"))
    out[f"{name}/names"] = np.array(files)
    out[f"{name}/slices"] = np.stack([np.asarray(nib.load(f"decoded/{name}/{f}").dataobj, dtype=np.float32) for f in files])
    out[f"{name}/size"] = np.int64(os.path.getsize(path))
    out[f"{name}/sha256"] = np.array(hashlib.sha256(open(path, "rb").read()).hexdigest())
    print(name, "codes used: top", len(np.unique(top)), "bottom", len(np.unique(bottom)))
np.savez_compressed("golden/expected.npz", **out)
for k, v in out.items(): print(k, v.dtype, v.shape)
PY
