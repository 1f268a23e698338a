#!/bin/bash
# The farm's fan-out with one and with two workers (issue 5, benchmark (a)).
#
#   sudo benches/farm.sh              # the table goes to stdout and to
#                                     # benches/results/farm-DATE.txt
#
# A stackerfile of LAYERS independent layers, each `sleep SLEEP` on a shared busybox base,
# is submitted with `farm submit` to a real `farm coordinator` on 127.0.0.1 with 1 and
# then 2 `farm worker` processes (SLOTS slots each), each worker with a loopback btrfs
# pool of its own, all sharing one file:// blob store. Each round starts from an empty
# state dir and blob store, and the layers carry a per-round salt, so nothing is cached
# but the base, which is built first, alone, and not timed. What is timed is the
# `farm submit` of the fan-out, from start to exit (upload, plan, schedule, build, results).
# Nothing here fails on timing: it measures and reports.
#
# Settings (environment):
#   FARM_BIN=                    the farm binary [default: a release build into
#                                CARGO_TARGET_DIR=/work/target-bench]
#   BENCH_ROOT=/var/tmp/farm-bench-farm   pools (made with `farm setup`), runs, logs
#   BENCH_USER=farmtest          who runs the coordinator, the workers and the client
#   LAYERS=6 SLEEP=4 SLOTS=2     the fan-out and the worker size
#   ROUNDS=1                     timed rounds per worker count (the median is shown)
#   KEEP=0                       1: keep the rounds' state, blobs and logs
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_ROOT=${BENCH_ROOT:-/var/tmp/farm-bench-farm}
BENCH_USER=${BENCH_USER:-farmtest}
LAYERS=${LAYERS:-6}
SLEEP=${SLEEP:-4}
SLOTS=${SLOTS:-2}
ROUNDS=${ROUNDS:-1}
KEEP=${KEEP:-0}

[ "$(id -u)" = 0 ] || { echo "farm.sh: run as root (it runs farm as $BENCH_USER)" >&2; exit 1; }
id "$BENCH_USER" > /dev/null || { echo "farm.sh: no user $BENCH_USER" >&2; exit 1; }
for tool in setpriv busybox python3 tar; do
    command -v "$tool" > /dev/null || { echo "farm.sh: needs $tool" >&2; exit 1; }
done

say() { printf '== %s\n' "$*" >&2; }
now() { printf '%s' "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HOME_DIR=$(getent passwd "$BENCH_USER" | cut -d: -f6)
# Run as BENCH_USER with a clean environment.
AS_USER=(setpriv --reuid "$BENCH_USER" --regid "$BENCH_USER" --init-groups
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$HOME_DIR" NO_COLOR=1)
as_user() { "${AS_USER[@]}" "$@"; }

if [ -z "${FARM_BIN:-}" ]; then
    say "building farm (release, CARGO_TARGET_DIR=/work/target-bench)"
    (cd "$REPO" && CARGO_TARGET_DIR=/work/target-bench cargo build --release -q -p farm-cli)
    FARM_BIN=/work/target-bench/release/farm
fi
# The user must be able to run it: a copy of our own.
mkdir -p "$BENCH_ROOT"
chmod 755 "$BENCH_ROOT"
install -m 755 "$FARM_BIN" "$BENCH_ROOT/farm"
FARM="$BENCH_ROOT/farm"
REV=$(git -C "$REPO" rev-parse --short HEAD)

for w in 1 2; do
    pool="$BENCH_ROOT/pool-w$w"
    if ! mountpoint -q "$pool"; then
        say "making the pool $pool"
        "$FARM" setup --user "$BENCH_USER" --pool "$pool" --size 4G > /dev/null
    fi
done

# The busybox base: a root filesystem tarball.
BASE_TAR="$BENCH_ROOT/busybox.tar"
if [ ! -f "$BASE_TAR" ]; then
    rootfs=$(mktemp -d)
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc"
    cp "$(command -v busybox)" "$rootfs/bin/busybox"
    for a in sh sleep echo cat ls; do ln -s busybox "$rootfs/bin/$a"; done
    echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
    tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -cf "$BASE_TAR" .
    rm -rf "$rootfs"
fi

STAMP=$(date +%Y%m%d-%H%M%S)
RUNS="$BENCH_ROOT/runs/$STAMP"
mkdir -p "$RUNS"
chown "$BENCH_USER:" "$RUNS"

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2> /dev/null || true; done
    PIDS=()
}
trap cleanup EXIT

# One round: $1 workers; prints the fan-out's wall time in seconds.
round() {
    local workers=$1 n=$2
    local dir="$RUNS/w$workers-$n"
    as_user mkdir -p "$dir/ctx"
    cp "$BASE_TAR" "$dir/ctx/busybox.tar"
    chown -R "$BENCH_USER:" "$dir"
    local port mport
    port=$(free_port)
    mport=$(free_port)
    local addr="127.0.0.1:$port"
    # Each daemon in a session (and process group) of its own, killed as a group.
    (cd "$dir" && exec setsid "${AS_USER[@]}" "$FARM" coordinator --listen "$addr" \
        --state-dir "$dir/state" --blobs "file://$dir/blobs" --metrics "127.0.0.1:$mport") \
        > "$dir/coordinator.log" 2>&1 &
    PIDS+=($!)
    disown
    for _ in $(seq 100); do
        (echo > "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break
        sleep 0.1
    done
    for w in $(seq "$workers"); do
        (cd "$dir" && exec setsid "${AS_USER[@]}" "$FARM" worker --coordinator "http://$addr" \
            --pool "$BENCH_ROOT/pool-w$w" --blobs "file://$dir/blobs" --slots "$SLOTS" \
            --name "w$w") > "$dir/w$w.log" 2>&1 &
        PIDS+=($!)
        disown
    done
    local connected=0
    for _ in $(seq 300); do
        connected=$(cd "$dir" && as_user "$FARM" workers --json --coordinator "$addr" \
            | grep -c '"connected": true' || true)
        [ "$connected" = "$workers" ] && break
        sleep 0.1
    done
    [ "$connected" = "$workers" ] || { echo "farm.sh: workers did not connect (see $dir)" >&2; exit 1; }

    local base="base:\n  from:\n    type: tar\n    url: busybox.tar\n"
    printf "$base" | as_user tee "$dir/ctx/base.yaml" > /dev/null
    (cd "$dir/ctx" && as_user "$FARM" submit base.yaml --coordinator "$addr") \
        > "$dir/base.out" 2>&1 || { echo "farm.sh: the base failed (see $dir)" >&2; exit 1; }
    {
        printf "$base"
        for i in $(seq "$LAYERS"); do
            printf 'l%s:\n  from:\n    type: built\n    tag: base\n  run: sleep %s; echo %s-%s > /l%s\n' \
                "$i" "$SLEEP" "$STAMP" "$n" "$i"
        done
    } | as_user tee "$dir/ctx/stacker.yaml" > /dev/null
    local t0 t1
    t0=$(now)
    (cd "$dir/ctx" && as_user "$FARM" submit --json --coordinator "$addr") \
        > "$dir/fanout.json" 2> "$dir/fanout.err" || { echo "farm.sh: the fan-out failed (see $dir)" >&2; exit 1; }
    t1=$(now)
    cleanup
    local on
    on=$(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(",".join(sorted({l["worker"] for l in s["layers"] if l["worker"]})))' "$dir/fanout.json")
    echo "$(secs "$t0" "$t1") $on"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

declare -A WALL ON
for workers in 1 2; do
    times=()
    for n in $(seq "$ROUNDS"); do
        say "fan-out of $LAYERS x sleep $SLEEP on $workers worker(s) x $SLOTS slots, round $n"
        round "$workers" "$n" > "$RUNS/result"
        read -r t on < "$RUNS/result"
        times+=("$t")
        ON[$workers]=$on
        say "  $t s (layers on $on)"
    done
    WALL[$workers]=$(printf '%s\n' "${times[@]}" | median)
done

serial=$((LAYERS * SLEEP))
ideal() { # waves x sleep for $1 workers
    local slots=$(($1 * SLOTS))
    echo $(((LAYERS + slots - 1) / slots * SLEEP))
}
OUT="$HERE/results/farm-$STAMP.txt"
mkdir -p "$HERE/results"
{
    echo "farm fan-out benchmark, $(date '+%Y-%m-%d %H:%M'), farm $REV, $(nproc) cores, kernel $(uname -r)"
    echo "command: LAYERS=$LAYERS SLEEP=$SLEEP SLOTS=$SLOTS ROUNDS=$ROUNDS benches/farm.sh (farm binary: $FARM_BIN)"
    echo "coordinator and workers as $BENCH_USER on 127.0.0.1, file:// blobs, a btrfs pool per worker; logs in $RUNS"
    echo
    echo "$LAYERS independent layers of 'sleep $SLEEP' on a cached busybox base (serial: $serial s)"
    printf '  %-10s %8s %10s %10s   %s\n' workers wall ideal speed-up "layers on"
    for workers in 1 2; do
        printf '  %-10s %7ss %9ss %9sx   %s\n' "$workers x $SLOTS" "${WALL[$workers]}" "$(ideal "$workers")" \
            "$(awk -v a="${WALL[1]}" -v b="${WALL[$workers]}" 'BEGIN { printf "%.2f", a / b }')" "${ON[$workers]}"
    done
    echo "  (ideal: waves x sleep; speed-up: 1 worker's wall / this wall)"
} | tee "$OUT"
[ "$KEEP" = 1 ] || rm -rf "$RUNS"
