#!/bin/bash
# The coordinator at scale (issue 17), in one command:
#
#   benches/scale.sh                 # 20,000 layers, 200 workers x 4 slots; prints a table
#   LAYERS=2000 WORKERS=20 benches/scale.sh     # a quick run
#
# Runs `cargo bench -p farm-coordinator --bench scale` (coordinator/benches/scale.rs):
# the real gRPC services on loopback (tonic server and clients, the state store, the
# action cache), stand-in workers in the same process that speak the worker protocol
# over their own connections (on a runtime of their own) and answer at once; later phases
# hold layers, to measure dispatch latency below saturation. With FARM_BIN unset it first builds
# the `farm` binary (release) to time `farm submit` of the unchanged DAG; FARM_BIN=none
# skips that.
#
# Settings (environment): LAYERS=20000 WAVE=500 FILES=LAYERS/50 WORKERS=200 SLOTS=4 LISTED=1000
# FAIR_HOLD_MS=200, STOP_AFTER=cold|hits (to profile one phase); CARGO_TARGET_DIR as usual.
# Nothing fails on timing: it measures.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${FARM_BIN:-}" ]; then
    cargo build --release -q -p farm-cli
    # Absolute: cargo runs the bench in the package's directory.
    FARM_BIN="$(cd "$TARGET/release" && pwd)/farm"
    export FARM_BIN
elif [ "$FARM_BIN" = none ]; then
    export FARM_BIN=
fi
# The coordinator runs in this process, with the `farm` binary's allocator (jemalloc, set
# in the bench) and, for what C libraries allocate, as many glibc arenas as cores
# (cli/src/main.rs), unless MALLOC_ARENA_MAX is given.
export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-$(nproc)}
echo "commit $(git rev-parse --short HEAD)$( [ -n "$(git status --porcelain -- coordinator)" ] && echo ' + uncommitted changes')" >&2
exec cargo bench -q -p farm-coordinator --bench scale
