#!/usr/bin/env bash
# One-GPU check (about 5 minutes on an H100-class GPU): the CUDA Table 6 and a CNN-2
# CIFAR-10 training throughput figure. Usage: scripts/gpu_check.sh [CIFAR10_SOURCE]
# CIFAR10_SOURCE defaults to data/cifar10-train.tgz (copy ../shared/data/cifar10-jpg/train.tgz there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
SRC=${1:-data/cifar10-train.tgz}
export PYTHONUNBUFFERED=1
$PY - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY
echo "== Table 6 on CUDA (batch 50, mean +- std over 100 iterations) =="
$PY -m exdrop bench table6 --device cuda --iters 100 --warmup 5 --json models/bench/table6_cuda.json
echo "== CNN-2 CIFAR-10 (32x32, batch 100): Standard vs Excitation, one iteration =="
$PY -m exdrop bench cnn2-cifar10 --device cuda --iters 200 --warmup 20 --json models/bench/cnn2_cifar10_cuda.json
echo "== CNN-2 CIFAR-10 training throughput (2000 iterations with one validation pass) =="
$PY -m exdrop train prototxt/cnn2/cifar10/solver_ed.prototxt --data "$SRC" --max-iter 2000 \
    --test-interval 2000 --display 500 --device cuda --quiet --out models/gpu_check/ed
$PY -c "import json; r = json.load(open('models/gpu_check/ed/results.json')); print('throughput: %.1f it/s, %.2f ms/it, val acc %.4f after %d it (reduced budget)' % (1 / r['seconds_per_iter'], 1000 * r['seconds_per_iter'], r['test_accuracy'], r['iterations']))"
