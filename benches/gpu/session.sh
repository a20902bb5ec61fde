#!/usr/bin/env bash
# One device call that runs several phases of benches/gpu/run.sh under a hard deadline and hands
# back everything in two files (the device tool returns at most 8):
#   $OUT/session.log    the console output of every phase, with timestamps
#   $OUT/results.tgz    run.sh's result files (check.txt, tiny.jsonl, cpmv.jsonl, torch.jsonl,
#                       table.md, profile.json, dist.txt, offload.jsonl, ...), re-packed after
#                       every phase, so a call cut short still returns what finished
#
#   PHASES="check dist bench" DEADLINE_S=520 bash benches/gpu/session.sh
#
# A phase starts only if at least its MIN_<phase>_S seconds are left, and is stopped (timeout)
# MARGIN_S seconds before the deadline. The environment of run.sh (CONFIGS, STEPS, WARMUP,
# TORCH_WEIGHTS, PROFILE_CONFIG, TINY, ...) passes through.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT_ROOT=${OUT:-out/gpu-session}
mkdir -p "$OUT_ROOT"
RESULTS=$(mktemp -d)
DEADLINE_S=${DEADLINE_S:-520}
MARGIN_S=${MARGIN_S:-15}
t0=$(date +%s)
left() { echo $(( DEADLINE_S - ($(date +%s) - t0) )); }
pack() { tar czf "$OUT_ROOT/results.tgz" -C "$RESULTS" . 2>/dev/null; }
min_s() {
  case $1 in
    check) echo "${MIN_check_S:-90}" ;;
    dist) echo "${MIN_dist_S:-120}" ;;
    bench) echo "${MIN_bench_S:-120}" ;;
    *) echo 60 ;;
  esac
}
status=0
exec > >(tee "$OUT_ROOT/session.log") 2>&1
echo "session: phases '${PHASES:-check dist bench}', deadline ${DEADLINE_S}s"
for phase in ${PHASES:-check dist bench}; do
  l=$(left)
  if [ "$l" -lt "$(min_s "$phase")" ]; then
    echo "== skip $phase: ${l}s left, needs $(min_s "$phase")s"
    status=1
    continue
  fi
  if [ $(( l - MARGIN_S )) -lt 10 ]; then
    echo "== skip $phase: ${l}s left, the margin is ${MARGIN_S}s"
    status=1
    continue
  fi
  echo "== phase $phase (t+$(( $(date +%s) - t0 ))s, ${l}s left)"
  OUT=$RESULTS timeout --signal=TERM --kill-after=5 $(( l - MARGIN_S )) bash benches/gpu/run.sh "$phase"
  rc=$?
  [ "$rc" = 0 ] || { echo "!! phase $phase exited $rc"; status=1; }
  # run.sh's own `timeout`s put each command in a process group of its own, which the phase's
  # timeout does not reach: stop what a cut phase left running before the next one starts.
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    pkill -TERM -f "${CARRY:-target/gpu-carry}/bin/" 2>/dev/null
    pkill -TERM -f "benches/gpu/torch_baseline.py" 2>/dev/null
    pkill -TERM -x ncu 2>/dev/null
    sleep 3
  fi
  pack
done
echo "== session done (t+$(( $(date +%s) - t0 ))s, status $status)"
pack
sleep 1 # let tee write the last lines of session.log
rm -rf "$RESULTS"
exit $status
