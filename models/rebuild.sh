#!/usr/bin/env bash
# Rebuilds models/crater_lake.onnx and its held-out evaluation (models/crater_lake_eval/)
# from the digital twin, with the `sorting` CLI only. Deterministic for a given code version.
#   usage: models/rebuild.sh [WORKDIR]      (WORKDIR holds the simulated datasets; default: a temp dir)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
train_seed=1; test_seed=2

sorting simulate rocks "$work/train_set" --n 1500 --seed "$train_seed" --force
sorting train "$work/train_set" --out "$here/crater_lake.onnx" --target-recovery 0.95 --seed 0
# held out: another simulator seed, every row of it (its own train/test split is ignored)
sorting simulate rocks "$work/test_set" --n 1000 --seed "$test_seed" --force
sorting evaluate "$work/test_set" --model "$here/crater_lake.onnx" --report "$here/crater_lake_eval" --split all
echo "datasets in $work"
