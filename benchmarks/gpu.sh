#!/usr/bin/env bash
# The whole GPU measurement in one go, on a lent GPU machine with no network (see
# docs/benchmarks.md): install the wheels it lacks, run the GPU tests, then the embed, select and
# kNN benchmarks on the GPU. Results (JSON) and the log go to $OUT.
# Expects in .whl/ the wheels that machine lacks: open_clip_torch, webdataset, braceexpand, zarr,
# numcodecs, donfig, google-crc32c, ftfy, wcwidth, faiss-cpu (pip download --python-version 3.12).
set -uo pipefail
export PYTHONUNBUFFERED=1 ENGINE_PROGRESS=0
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))" \
  | tee -a "$OUT/gpu.txt"
run() { local limit=$1; shift; echo "=== $*"; timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tail -40; }
{
  run 150 python3 -m pytest -q -p no:cacheprovider -m gpu_test tests/test_embed.py tests/test_classifiers.py \
    tests/test_select.py tests/test_train.py tests/test_robust.py
  run 60 python3 -m pytest -q -p no:cacheprovider tests/test_reader.py
  run 330 python3 benchmarks/bench_embed.py --data photos --gpu --sizes 256 --images 40000 --shards 8 \
    --workers 14 --batch 512 --repeats 2
  [ -n "${SKIP_SELECT:-}" ] || run 230 python3 benchmarks/bench_select.py --large-only --device cuda --mid-n 0 --modes clipcleaner,robust
} 2>&1 | tee "$OUT/log.txt"
cp benchmarks/results/*-gpu-*.json benchmarks/results/embed-photos-gpu-*.json "$OUT"/ 2>/dev/null
ls "$OUT"
