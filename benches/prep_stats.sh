#!/usr/bin/env bash
# `prep stats` throughput: samples/s on a large generated data set (real photos reused), and the
# speedup over `prep build` on the same data (build timed on the first BUILD_N samples, as a
# rate: building 100k samples would take the better part of an hour here). One table, last.
#
#   benches/prep_stats.sh                      # 100k samples, then 1M
#   STATS_SIZES="100000" benches/prep_stats.sh
#
# Needs the Python of the fixture scripts (Pillow) for the data generator: PY=/path/to/python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-/work/pyenv/bin/python}"
[ -x "$PY" ] || PY=python3
SIZES="${STATS_SIZES:-100000 1000000}"
BUILD_N="${BUILD_N:-1000}"
DIR="${BENCH_DIR:-$ROOT/.bench}/stats"
MODEL="$ROOT/examples/models/minicpm-v-2_6-tiny"
mkdir -p "$DIR"

cargo build --release -q -p cpmv-prep
PREP="$ROOT/target/release/prep"

now() { date +%s.%N; }
rows=()
for n in $SIZES; do
  data="$DIR/n$n/train.json"
  if [ ! -f "$data" ]; then
    echo "generating $n samples..." >&2
    "$PY" benches/make_bench_data.py --out "$DIR/n$n" -n "$n" --seed 1 >/dev/null
  fi
  for t in 1 2; do
    cat "$data" >/dev/null # warm the page cache
    s=$(now)
    "$PREP" stats --data "$data" --model "$MODEL" --threads "$t" --json --quiet >"$DIR/stats-$n-$t.json"
    e=$(now)
    secs=$(awk -v s="$s" -v e="$e" 'BEGIN{print e-s}')
    rate=$(awk -v n="$n" -v t="$secs" 'BEGIN{print n/t}')
    rows+=("$(printf 'prep stats   %8d samples  %d thread(s)  %8.1f s  %10.0f samples/s' "$n" "$t" "$secs" "$rate")")
    [ "$t" = 2 ] && stats_rate_2=$rate
  done
done

# prep build on the first BUILD_N samples of the 100k set (same generator, same mix).
first=$(echo "$SIZES" | awk '{print $1}')
sub="$DIR/n$first/build-subset.json"
"$PY" - "$DIR/n$first/train.json" "$sub" "$BUILD_N" <<'PY'
import json, sys
samples = json.load(open(sys.argv[1]))[: int(sys.argv[3])]
json.dump(samples, open(sys.argv[2], "w"))
PY
s=$(now)
"$PREP" build --data "$sub" --model "$MODEL" --out "$DIR/build-out" --threads 2 --overwrite --quiet >/dev/null
e=$(now)
secs=$(awk -v s="$s" -v e="$e" 'BEGIN{print e-s}')
build_rate=$(awk -v n="$BUILD_N" -v t="$secs" 'BEGIN{print n/t}')
rows+=("$(printf 'prep build   %8d samples  2 thread(s)  %8.1f s  %10.0f samples/s' "$BUILD_N" "$secs" "$build_rate")")

echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
for r in "${rows[@]}"; do echo "$r"; done
printf 'speedup of prep stats over prep build (2 threads, samples/s): %.0fx\n' "$(awk -v a="$stats_rate_2" -v b="$build_rate" 'BEGIN{print a/b}')"
