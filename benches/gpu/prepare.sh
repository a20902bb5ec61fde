#!/usr/bin/env bash
# Builds here (no GPU needed) what benches/gpu/run.sh needs on the GPU machine, into the ignored
# folder target/gpu-carry (pass it as the device tool's `carry`):
#   bin/train.xz      the CUDA + NCCL build of `train` (stripped, xz; libnccl.so.2 comes from
#                     PyTorch's wheels there)
#   bin/gpu.xz        the GPU test binary (crates/model/tests/gpu: kernels vs CPU, AdamW, parity,
#                     the block path's layers on the GPU vs candle's autograd there)
#   bin/block.xz      the block path's CUDA backend against its CPU backend (crates/block/tests/cuda.rs)
#   tiny-shards/      the bundled example prepared for the tiny 2.6 model (50-step CPU/GPU run)
#   dist-shards/      the same, one sample per pack at 112 px (11 packs: several ranks' steps
#                     within one epoch, run.sh dist)
#   tests/fixtures/model/{v2_0,v2_6}  the PyTorch parity fixtures the GPU test runs (the device tool's
#                        64 MiB budget cannot take all three: v2_0 has the ViT and MiniCPM's
#                        scalings, v2_6 NaViT, Qwen2 biases and GQA; 2.5 shares their parts)
# Needs the CUDA toolkit: scripts/cuda-env.sh (CUDA 13.0 from PyPI wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."
C=target/gpu-carry
cargo fetch --quiet # cudarc's sources (an optional dependency): the driver stub is made from them
source scripts/cuda-env.sh >/dev/null
cargo build --release --features cuda,nccl -p cpmv-train --bin train
log=$(cargo test --release --features cuda -p cpmv-model --test gpu --no-run 2>&1) \
  || { echo "$log" >&2; exit 1; }
test_bin=$(echo "$log" | sed -n 's/.*Executable tests\/gpu\/main.rs (\(.*\))/\1/p' | tail -1)
[ -n "$test_bin" ] || { echo "$log" >&2; echo "prepare: no GPU test binary" >&2; exit 1; }
log=$(cargo test --release --features cuda -p cpmv-block --test cuda --no-run 2>&1) \
  || { echo "$log" >&2; exit 1; }
block_bin=$(echo "$log" | sed -n 's/.*Executable tests\/cuda.rs (\(.*\))/\1/p' | tail -1)
[ -n "$block_bin" ] || { echo "$log" >&2; echo "prepare: no block-path CUDA test binary" >&2; exit 1; }
cargo build --release -p cpmv-prep --bin prep
rm -rf "$C" && mkdir -p "$C/bin" "$C/tests/fixtures/model"
strip -o "$C/bin/train" target/release/train
strip -o "$C/bin/gpu" "$test_bin"
strip -o "$C/bin/block" "$block_bin"
xz -T2 -6 "$C/bin/train" "$C/bin/gpu" "$C/bin/block"
target/release/prep build --config pipelines/tiny-cpu-demo.toml --data examples/data/train.json \
  --model examples/models/minicpm-v-2_6-tiny --out "$C/tiny-shards" --overwrite --quiet
target/release/prep build --config pipelines/tiny-cpu-demo.toml --data examples/data/train.json \
  --model examples/models/minicpm-v-2_6-tiny --out "$C/dist-shards" --no-pack --max-slice-nums 1 \
  --scale-resolution 112 --overwrite --quiet
cp -r tests/fixtures/model/v2_0 tests/fixtures/model/v2_6 "$C/tests/fixtures/model/"
du -sh "$C" "$C"/bin/* "$C"/tiny-shards "$C"/dist-shards "$C"/tests/fixtures
