#!/usr/bin/env bash
# Issue 5, benchmark (c): end-to-end `farm submit` of an unchanged 50-layer stackerfile
# against a running coordinator (every layer a cache hit). Builds it once, then times
# REPS resubmissions. Uses the release binary (FARM_BIN to override).
# Run: benches/resubmit.sh   (as any user; the worker pool is a plain directory)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-5}
FARM=${FARM_BIN:-target/release/farm}
[ -x "$FARM" ] || cargo build --release -p farm-cli
FARM=$(realpath "$FARM")
work=$(mktemp -d /tmp/farm-resubmit.XXXXXX)
# As root, builds run as subordinate ids that must reach the pool.
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/ctx"
for i in $(seq 0 4); do echo "$i" > "$work/ctx/f$i.txt"; done
for i in $(seq 0 49); do
  printf 'l%d:\n  from: {type: scratch}\n  imports:\n    - path: f%d.txt\n      dest: /f%d.txt\n' "$i" $((i % 5)) "$i"
done > "$work/ctx/stacker.yaml"
"$FARM" coordinator --listen 127.0.0.1:$port --state-dir "$work/state" --blobs "file://$work/blobs" 2>"$work/coordinator.log" &
"$FARM" worker --coordinator 127.0.0.1:$port --pool "$work/pool" --blobs "file://$work/blobs" --slots 2 --name w 2>"$work/worker.log" &
export FARM_COORDINATOR=127.0.0.1:$port
cd "$work/ctx"
for _ in $(seq 50); do "$FARM" workers --json 2>/dev/null | grep -q '"name"' && break; sleep 0.1; done
"$FARM" submit >/dev/null 2>"$work/first.log" || { cat "$work/first.log" "$work/worker.log" >&2; exit 1; }
echo "first build done; timing $REPS resubmissions of 50 cached layers"
for _ in $(seq "$REPS"); do
  /usr/bin/time -f "%e s" "$FARM" submit 2>&1 >/dev/null | tail -1
done
