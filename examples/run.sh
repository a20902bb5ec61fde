#!/usr/bin/env bash
# The quick start: prepare the bundled example data, write a tiny seeded MiniCPM-V 2.6 checkpoint,
# and fine-tune it on the CPU (pipelines/tiny-cpu-demo.toml). Results in out/quickstart/run:
# loss.png, log.jsonl, tb/ (TensorBoard), checkpoints and the final model.
# PROFILE=dev uses the debug build (what CI has already built); default: release.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
OUT=${OUT:-out/quickstart}
cargo build --profile "$PROFILE" -p cpmv-prep -p cpmv-train
BIN=target/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
"$BIN/prep" build --config pipelines/tiny-cpu-demo.toml --data examples/data/train.json \
  --model examples/models/minicpm-v-2_6-tiny --out "$OUT/shards" --overwrite
rm -rf "$OUT/model" "$OUT/run"
"$BIN/train" init-model --like examples/models/minicpm-v-2_6-tiny --size tiny --seed 0 --out "$OUT/model"
"$BIN/train" --config pipelines/tiny-cpu-demo.toml --shards "$OUT/shards" --model "$OUT/model" \
  --output "$OUT/run" --eval-shards "$OUT/shards"
