#!/usr/bin/env bash
# What `--pixels slices|source` and `--compression none|lz4|zstd` cost on disk and at build
# time, and how fast the trainer's loader serves each, on the bundled example and on the
# benchmark data set. One table, last.
#
#   benches/pixels.sh                 # BENCH_N=300 generated samples (~2 min on 2 cores once built)
#
# Environment: BENCH_N (samples of the generated set), BENCH_DIR (work folder, default .bench),
# PY (Python with Pillow, for benches/make_bench_data.py).
#
# Measured, per set and mode: bytes on disk per sample (Arrow shards + images.arrow + manifest),
# the same as a multiple of the image bytes the samples reference (counting repeats: what a set
# of distinct photos would cost), `prep build --threads 1` wall clock, and the loader
# (`cpmv_train::data::make_batch`, what the trainer's background thread runs) in samples/s on
# one core (benches/pixel_loader.rs).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${BENCH_N:-300}"
BENCH_DIR="${BENCH_DIR:-$ROOT/.bench}"
W="$BENCH_DIR/pixels"
PY="${PY:-/work/pyenv/bin/python}"
[ -x "$PY" ] || PY=python3
MODEL=examples/models/minicpm-v-2_6-tiny
mkdir -p "$W"

cargo build --release -q -p cpmv-prep --bin prep
log=$(cargo bench --bench pixel_loader --no-run 2>&1) || { echo "$log" >&2; exit 1; }
LOADER=$(echo "$log" | sed -n 's/.*Executable benches\/pixel_loader.rs (\(.*\))/\1/p' | tail -1)
[ -n "$LOADER" ] || { echo "$log" >&2; echo "pixels.sh: no pixel_loader binary" >&2; exit 1; }
PREP=target/release/prep

if [ ! -f "$W/data/train.json" ]; then
  "$PY" benches/make_bench_data.py --out "$W/data" -n "$N" --seed 3 >/dev/null
fi

now() { date +%s.%N; }
# Image bytes the samples of a data file reference, counting repeats.
ref_bytes() {
  python3 - "$1" <<'PY'
import json, os, sys
path = sys.argv[1]
base = os.path.dirname(path)
total = 0
for s in json.load(open(path)):
    img = s.get("image")
    paths = [] if img is None else [img] if isinstance(img, str) else list(img.values())
    total += sum(os.path.getsize(os.path.join(base, p)) for p in paths)
print(total)
PY
}

rows=()
for set in example bench; do
  case $set in
    example) data=examples/data/train.json ;;
    bench) data="$W/data/train.json" ;;
  esac
  refs=$(ref_bytes "$data")
  for variant in slices:none slices:lz4 slices:zstd source:none source:zstd; do
    mode=${variant%%:*}
    codec=${variant##*:}
    out="$W/out-$set-$mode-$codec"
    sync
    s=$(now)
    "$PREP" build --data "$data" --model "$MODEL" --out "$out" --pixels "$mode" --threads 1 \
      --compression "$codec" --overwrite --quiet >/dev/null
    e=$(now)
    build=$(awk -v s="$s" -v e="$e" 'BEGIN{printf "%.1f", e-s}')
    line=$("$LOADER" "$out")
    rows+=("$(python3 - "$line" "$set" "$mode" "$codec" "$build" "$refs" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
set_, mode, codec = sys.argv[2], sys.argv[3], sys.argv[4]
build, refs = float(sys.argv[5]), int(sys.argv[6])
per = r["bytes_per_sample"]
print(f"| {set_} ({r['samples']}) | {mode} | {codec} | {per / 1e3:,.0f} kB | "
      f"{r['bytes'] / refs:.2f}x | {build:.1f} s | {r['loader_samples_per_s']:.0f} |")
PY
)")
  done
done

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "| set (samples) | pixels | compression | bytes / sample | x referenced image bytes | prep build, 1 thread | loader samples/s, 1 core |"
echo "|---|---|---|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
