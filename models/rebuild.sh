#!/usr/bin/env bash
# Rebuilds models/crater_lake.onnx and its held-out evaluation (models/crater_lake_eval/)
# from the digital twin, with the `sorting` CLI only. Byte-identical for a given code version
# and set of library versions (requirements-lock.txt).
#   usage: models/rebuild.sh [WORKDIR]      (WORKDIR holds the simulated datasets; default: a temp dir)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
train_seed=1; test_seed=2
# the date the shipped model records (its metadata's created_utc), fixed so that a rebuild gives
# the same bytes: the reproducible-builds convention. Move it on when a rebuild changes the model.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1796428800}"  # 2026-12-05T00:00:00Z

sorting simulate rocks "$work/train_set" --n 1500 --seed "$train_seed" --force
# models/crater_lake.onnx links to the packaged file (sorting/data/models/): written through
sorting train "$work/train_set" --out "$here/crater_lake.onnx" --target-recovery 0.95 --seed 0
# held out: another simulator seed, every row of it (its own train/test split is ignored)
sorting simulate rocks "$work/test_set" --n 1000 --seed "$test_seed" --force
sorting evaluate "$work/test_set" --model "$here/crater_lake.onnx" --report "$here/crater_lake_eval" --split all
echo "datasets in $work"
