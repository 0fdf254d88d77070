#!/usr/bin/env bash
# Session 6, call 1 on the lent GPU: the machine, then the 12-model zoo's full grid with
# `stgs profile` (resumable: call 2 carries this CSV back and finishes what the limit cut off).
# Run from the repository root: bash benchmarks/results/2026-12-04-h200/c1.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,mig.mode.current,compute_mode,clocks.max.sm \
    --format=csv; nproc; python3 -c 'import torch, torchvision, torchaudio, transformers as t;
print(torch.__version__, torchvision.__version__, torchaudio.__version__, t.__version__)'; } \
    > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
timeout -s TERM "${LIMIT_S:-545}" python3 -m api.cli profile resnet50 vit_b_16 bert_base \
    mobilenet_v3_large efficientnet_b0 densenet121 vgg16 resnet18 inception_v3 googlenet \
    mnasnet1_0 wav2vec2_base --out "$OUT/profiles.csv" --quiet --no-fit 2>&1 | tee "$OUT/c1.log"
wc -l "$OUT/profiles.csv"
