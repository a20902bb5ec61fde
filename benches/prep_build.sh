#!/usr/bin/env bash
# `prep build` throughput benchmark, side by side with a Python baseline doing the reference's
# per-sample work, and with the decode-only floor of the same images.
#
#   benches/prep_build.sh            # N=600 samples, 3 repetitions: ~7.5 min on 2 cores once
#                                    # built (the first jpeg-simd build adds ~5 min)
#   BENCH_N=2000 BENCH_REPS=5 benches/prep_build.sh
#
# Environment:
#   BENCH_N      samples in the benchmark data set (default 600)
#   BENCH_REPS   repetitions per configuration; the median is reported (default 3)
#   BENCH_DIR    work folder (default .bench, git-ignored): data/, out/, bin/, results/
#   BENCH_OUT    where `prep build` writes its shards (default $BENCH_DIR/out)
#   BENCH_SIMD   auto (default: build the jpeg-simd variant when nasm is, or can be, installed),
#                0 (never), 1 (required)
#   PY           Python with Pillow, numpy, tokenizers, transformers (default /work/pyenv/bin/python)
#
# What is measured (all on the same data set, one run of this script):
#   decode-only  cpmv_image::decode of every image reference (benches/decode_floor.rs), rayon
#                with 1 / 2 threads; file bytes pre-read, only decoding timed: the floor.
#   decode+slice decode + slice_image_into (overview, refine resized straight into its slices):
#                all our pixel work.
#   prep build   target/release/prep build --threads 1 / 2, wall clock of the whole process
#                (start-up, tokenizer load, JSON, images, tokens, packing, Arrow shards,
#                manifest). Output removed and `sync`ed between runs (not timed).
#   python       benches/prep_baseline.py --workers 1 / 2: Pillow open+convert, reference slicing
#                (Pillow BICUBIC + crop), chat template + HF tokenizers, labels, bounds.
#   python+tensor  the same plus ToTensor+Normalize to float32 and the patch-strip re-layout
#                (what the reference computes per sample). Python's timed region excludes
#                interpreter start, imports and tokenizer loading (favours the baseline).
# "MB/s of input" counts the bytes of every image reference plus the JSON file, for every row.
# The table is printed last; raw JSON results are kept in $BENCH_DIR/results/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
N="${BENCH_N:-600}"
REPS="${BENCH_REPS:-3}"
BENCH_DIR="${BENCH_DIR:-$ROOT/.bench}"
DATA_DIR="$BENCH_DIR/data"
DATA="$DATA_DIR/train.json"
OUT="${BENCH_OUT:-$BENCH_DIR/out}"
BIN="$BENCH_DIR/bin"
RES="$BENCH_DIR/results"
MODEL="$ROOT/examples/models/minicpm-v-2_6-tiny"
SIMD="${BENCH_SIMD:-auto}"
PY="${PY:-/work/pyenv/bin/python}"
[ -x "$PY" ] || PY=python3
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
mkdir -p "$BIN" "$RES"
rm -f "$RES"/*.json

# ------------------------------------------------------------------------------------------------
# builds
# ------------------------------------------------------------------------------------------------
bench_exe() { # cargo args... -> path of the decode_floor bench executable
  local out
  out=$(cargo bench --bench decode_floor --no-run "$@" 2>&1) || { echo "$out" >&2; return 1; }
  echo "$out" >>"$BENCH_DIR/build.log"
  echo "$out" | sed -n 's/.*Executable .*(\(.*decode_floor-[0-9a-f]*\)).*/\1/p' | tail -n1
}

: >"$BENCH_DIR/build.log"
log "building (release, portable JPEG decoder): prep, decode_floor"
cargo build --release -p cpmv-prep --no-default-features 2>&1 | tee -a "$BENCH_DIR/build.log" >&2
cp target/release/prep "$BIN/prep-plain"
cp "$(bench_exe --no-default-features)" "$BIN/decode_floor-plain"
VARIANTS=(plain)

if [ "$SIMD" != 0 ]; then
  if ! command -v nasm >/dev/null 2>&1; then
    log "nasm not found; trying apt-get install nasm"
    if [ "$(id -u)" = 0 ]; then
      (apt-get install -y nasm || (apt-get update && apt-get install -y nasm)) >>"$BENCH_DIR/build.log" 2>&1 || true
    elif command -v sudo >/dev/null 2>&1; then
      (sudo -n apt-get install -y nasm) >>"$BENCH_DIR/build.log" 2>&1 || true
    fi
  fi
  if command -v nasm >/dev/null 2>&1; then
    log "building the jpeg-simd variant, the default build ($(nasm -v))"
    cargo build --release -p cpmv-prep 2>&1 | tee -a "$BENCH_DIR/build.log" >&2
    cp target/release/prep "$BIN/prep-simd"
    cp "$(bench_exe)" "$BIN/decode_floor-simd"
    VARIANTS+=(simd)
  elif [ "$SIMD" = 1 ]; then
    log "BENCH_SIMD=1 but nasm is not available"; exit 1
  else
    log "nasm unavailable: jpeg-simd variant skipped"
  fi
fi

# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
have_n=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['samples'])" "$DATA_DIR/info.json" 2>/dev/null || echo 0)
if [ ! -f "$DATA" ] || [ "$have_n" != "$N" ]; then
  log "generating $N samples in $DATA_DIR"
  rm -rf "$DATA_DIR"
  "$PY" benches/make_bench_data.py --out "$DATA_DIR" -n "$N" >/dev/null
fi
log "data: $(cat "$DATA_DIR/info.json" | tr -d '\n ' | cut -c1-300)"
log "warming the file cache"
cat "$DATA" "$DATA_DIR"/images/* >/dev/null

# ------------------------------------------------------------------------------------------------
# runs (each configuration REPS times; the JSON of every run goes to $RES/<name>.<rep>.json)
# ------------------------------------------------------------------------------------------------
run_prep() { # variant threads rep
  local v=$1 t=$2 r=$3 t0 t1 rc=0
  rm -rf "$OUT"; sync
  t0=$EPOCHREALTIME
  "$BIN/prep-$v" build --data "$DATA" --model "$MODEL" --out "$OUT" --threads "$t" --quiet \
    >"$RES/prep-$v-$t.$r.log" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  if [ "$rc" != 0 ]; then
    log "prep build failed (exit $rc):"; cat "$RES/prep-$v-$t.$r.log" >&2; exit 1
  fi
  local out_bytes; out_bytes=$(du -sb "$OUT" | cut -f1)
  printf '{"seconds": %s, "samples": %s, "out_bytes": %s}\n' \
    "$(awk "BEGIN { print $t1 - $t0 }")" "$N" "$out_bytes" >"$RES/prep-$v-$t.$r.json"
  rm -rf "$OUT"; sync
}

for r in $(seq 1 "$REPS"); do
  log "repetition $r/$REPS"
  for v in "${VARIANTS[@]}"; do
    for t in 1 2; do
      "$BIN/decode_floor-$v" --data "$DATA" --threads "$t" --mode decode >"$RES/decode-$v-$t.$r.json"
      "$BIN/decode_floor-$v" --data "$DATA" --threads "$t" --mode slice >"$RES/slice-$v-$t.$r.json"
      run_prep "$v" "$t" "$r"
    done
  done
  for w in 1 2; do
    "$PY" benches/prep_baseline.py --data "$DATA" --model "$MODEL" --workers "$w" \
      2> >(grep -v 'PyTorch was not found' >&2) >"$RES/python-$w.$r.json"
    "$PY" benches/prep_baseline.py --data "$DATA" --model "$MODEL" --workers "$w" --tensor \
      2> >(grep -v 'PyTorch was not found' >&2) >"$RES/pytensor-$w.$r.json"
  done
done

# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
"$PY" - "$RES" "$DATA_DIR/info.json" "$N" "${VARIANTS[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path

res, info, n, variants = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), int(sys.argv[3]), sys.argv[4:]
input_mb = (info["image_ref_bytes"] + info["data_file_bytes"]) / 1e6

def med(name):
    runs = [json.loads(p.read_text()) for p in sorted(res.glob(f"{name}.*.json"))]
    if not runs:
        return None
    for r in runs:
        if "ok" in r and r["ok"] != r["samples"]:
            sys.exit(f"{name}: the baseline rejected samples: {r['errors']}")
    return statistics.median(r["seconds"] for r in runs), len(runs), runs

py = {c: med(f"python-{c}")[0] for c in (1, 2)}
pyt = {c: med(f"pytensor-{c}")[0] for c in (1, 2)}
rows = []
for v in variants:
    tag = "" if v == "plain" else " [jpeg-simd]"
    dec = {c: med(f"decode-{v}-{c}")[0] for c in (1, 2)}
    for kind, label in (("decode", "decode-only"), ("slice", "cpmv decode+slice"), ("prep", "prep build")):
        for c in (1, 2):
            s = med(f"{kind}-{v}-{c}")[0]
            rows.append((f"{label}{tag} {c}t", c, s, dec[c]))
for c in (1, 2):
    rows.append((f"python baseline {c}w", c, py[c], None))
for c in (1, 2):
    rows.append((f"python baseline+tensor {c}w", c, pyt[c], None))

hdr = ("configuration", "samples/s", "MB/s in", "x python", "x py+tensor", "time/decode")
print()
print(f"prep build throughput: {n} samples, {info['image_refs']} image references, "
      f"{input_mb:.1f} MB of input (images + JSON); median of {med('python-1')[1]} runs; "
      f"x python / x py+tensor: speed-up over the baseline at the same core count; "
      f"time/decode: seconds / decode-only seconds (same build, same threads)")
print(f"| {hdr[0]:<34} | {hdr[1]:>9} | {hdr[2]:>7} | {hdr[3]:>8} | {hdr[4]:>11} | {hdr[5]:>11} |")
print(f"|{'-'*36}|{'-'*10}:|{'-'*8}:|{'-'*9}:|{'-'*12}:|{'-'*12}:|")
for label, c, s, d in rows:
    rate = n / s
    xp = py[c] / s
    xpt = pyt[c] / s
    td = f"{s / d:.2f}" if d else "-"
    print(f"| {label:<34} | {rate:>9.1f} | {input_mb / s:>7.1f} | {xp:>8.2f} | {xpt:>11.2f} | {td:>11} |")
EOF
