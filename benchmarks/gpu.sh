#!/usr/bin/env bash
# The GPU benchmark run, as one command on a lent GPU machine (see README, Benchmarks).
# Expects wheels of the packages that machine lacks in .whl/ (open_clip_torch, webdataset,
# braceexpand, zarr, numcodecs, donfig, google-crc32c, ftfy, wcwidth) and $OUT for results.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
run() { echo "=== $*"; timeout "$1" "${@:2}" 2>&1 | grep -v -E "Warning|warn\(" | tail -25; }
run 150 python3 benchmarks/bench_embed.py --gpu --shards 8 --per-shard 1000 --workers 12 --batch 512
# select and train GPU figures: benchmarks/results/select-gpu-*.json, train-gpu-*.json
# [ -f benchmarks/bench_select.py ] && run 200 python3 benchmarks/bench_select.py --large-only --device cuda
# run 150 python3 benchmarks/bench_train.py --device cuda --epochs 2 --naive-iters 30
cp benchmarks/results/*.json "$OUT"/ 2>/dev/null
ls "$OUT"
