#!/bin/bash
# farm's build engine against its peers, side by side on this machine, in one run.
#
#   sudo benches/engine.sh            # everything; the table goes to stdout and to
#                                     # benches/results/engine-DATE.txt
#
# (a) a 1,000-file change (1,000 new files of 1 KB) on a 100,000-file base: farm's build
#     of that layer (base cached) against `umoci repack` of the same change, and
#     buildah's rebuild of the same step with the base in its store (if installable)
# (b) export of a ~700 MB layer of real files: farm (gzip, zstd) against
#     `tar | gzip -6 | sha256sum` and `tar | zstd -3 -T0 | sha256sum`
# (c) a second image from an already-extracted OCI base: extraction time and total
# (d) peak memory of farm and its `farm __farm-userns` children while exporting (b)
#
# farm runs as the unprivileged user BENCH_USER (default farmtest, which needs a subuid
# range) through setpriv, with its pool and state dir on a loopback btrfs at BENCH_ROOT
# (made with `farm setup` when it is not there). Big trees all live on that btrfs (the
# ext4 root disk slows down badly when ~100k files are created right after ~100k were
# deleted). Nothing here fails on timing: it measures and reports.
#
# Settings (environment):
#   BENCH_ROOT=/srv/farm/bench   btrfs mount for everything big (farm setup makes it)
#   BENCH_SIZE=20G               size of its loopback file when it is made
#   BENCH_USER=farmtest          who runs farm, umoci and buildah
#   BENCH_REV=                   a git revision to build (from a clean `git archive`
#                                into /var/tmp/farm-bench/src) instead of the work tree
#   REPS=3                       timed rebuilds of the (a) layer (farm and buildah)
#   B_REPS=3                     rounds of (b): pipeline and farm, gzip then zstd
#   BUILDAH=auto                 auto: install with apt-get if missing; 0: skip
#   EXPORT_BENCH=1               also run image/examples/export_bench.sh on the (b) data
#   KEEP=0                       1: keep this run's pool, state and bundles afterwards
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
BENCH_ROOT=${BENCH_ROOT:-/srv/farm/bench}
BENCH_SIZE=${BENCH_SIZE:-20G}
BENCH_USER=${BENCH_USER:-farmtest}
BENCH_REV=${BENCH_REV:-}
REPS=${REPS:-3}
B_REPS=${B_REPS:-3}
BUILDAH=${BUILDAH:-auto}
EXPORT_BENCH=${EXPORT_BENCH:-1}
KEEP=${KEEP:-0}
export CARGO_TARGET_DIR=/work/target-bench
HELPERS="/usr/bin/python3 $HERE/engine_helpers.py"
FARM_LOG_SPEC="warn,farm_worker=debug,farm_image=debug"
BASE_DIRS=100     # x FILES_PER_DIR files of 1 KB in the base
FILES_PER_DIR=1000
DATA_MB=700

[ "$(id -u)" = 0 ] || { echo "engine.sh: run as root (it runs farm as $BENCH_USER)" >&2; exit 1; }
id "$BENCH_USER" > /dev/null || { echo "engine.sh: no user $BENCH_USER" >&2; exit 1; }
for tool in umoci zstd gzip busybox setpriv btrfs /usr/bin/time /usr/bin/python3; do
    command -v "$tool" > /dev/null || { echo "engine.sh: needs $tool" >&2; exit 1; }
done

say() { printf '\n== %s\n' "$*" >&2; }
secs_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
calc() { awk "BEGIN { x = $1; if (x != x) print \"-\"; else printf \"%.${2:-2}f\", x }" 2> /dev/null || echo -; }
stamp() { while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done; }
as_user() { # run as BENCH_USER with a clean environment (extra VAR=VALUE first)
    setpriv --reuid "$BENCH_USER" --regid "$BENCH_USER" --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$(getent passwd "$BENCH_USER" | cut -d: -f6)" "$@"
}

# ---------------------------------------------------------------------------- build
say "building farm (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
SRC=$REPO
if [ -n "$BENCH_REV" ]; then
    SRC=/var/tmp/farm-bench/src
    rm -rf "$SRC" && mkdir -p "$SRC"
    git -C "$REPO" archive "$BENCH_REV" | tar -x -C "$SRC"
fi
REV=$(git -C "$REPO" rev-parse --short "${BENCH_REV:-HEAD}")
DIRTY=""
[ -z "$BENCH_REV" ] && [ -n "$(git -C "$REPO" status --porcelain -- . ':!benches')" ] && DIRTY=" + uncommitted changes"
(cd "$SRC" && cargo build --release -q -p farm-cli)
[ "$EXPORT_BENCH" = 1 ] && (cd "$SRC" && cargo build --release -q -p farm-image --example export_bench)

# The pool filesystem; farm's binary is copied there so the user can run it and the
# memory sampler can find its processes by executable.
if ! mountpoint -q "$BENCH_ROOT" || [ "$(stat -f -c %T "$BENCH_ROOT")" != btrfs ]; then
    say "making the bench pool: farm setup --user $BENCH_USER --pool $BENCH_ROOT --size $BENCH_SIZE"
    "$CARGO_TARGET_DIR/release/farm" setup --user "$BENCH_USER" --pool "$BENCH_ROOT" --size "$BENCH_SIZE" >&2
fi
STAMP=$(date +%Y%m%d-%H%M%S)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
BUSY=""
RUN=$BENCH_ROOT/runs/$STAMP
INPUTS=$BENCH_ROOT/inputs
LOGS=$RUN/logs
mkdir -p "$RUN/bin" "$LOGS" "$INPUTS"
FARM=$RUN/bin/farm
install -m 0755 "$CARGO_TARGET_DIR/release/farm" "$FARM"
chown "$BENCH_USER:" "$RUN" "$LOGS"
chmod 0755 "$BENCH_ROOT/runs" "$RUN"
echo "run directory: $RUN (pool, state dirs, bundles, logs: all on btrfs $BENCH_ROOT)" >&2

# ---------------------------------------------------------------------------- inputs
# Kept between runs (made once): a busybox root, the 100,000-file base as a tarball,
# and ~700 MB of real files for the export.
make_busybox_root() { # DIR: /bin/busybox and its applet links (as make-rootfs.sh)
    local d=$1 bb
    bb=$(command -v busybox)
    mkdir -p "$d/bin" "$d/sbin" "$d/usr/bin" "$d/usr/sbin" "$d/etc" "$d/tmp" "$d/root"
    chmod 1777 "$d/tmp"
    cp "$bb" "$d/bin/busybox"
    for applet in $("$bb" --list-full); do
        [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$d/$applet"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' > "$d/etc/passwd"
    echo 'root:x:0:' > "$d/etc/group"
}
if [ ! -e "$INPUTS/base.done" ]; then
    say "making the inputs: busybox root, $BASE_DIRS x $FILES_PER_DIR files of 1 KB"
    rm -rf "$INPUTS/busybox" "$INPUTS/base"
    make_busybox_root "$INPUTS/busybox"
    tar --numeric-owner --owner=0 --group=0 --mtime=@1700000000 -C "$INPUTS/busybox" \
        -cf "$INPUTS/busybox.tar" .
    make_busybox_root "$INPUTS/base"
    /usr/bin/python3 - "$INPUTS/base" "$BASE_DIRS" "$FILES_PER_DIR" <<'EOF'
import os, sys
root, dirs, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for d in range(dirs):
    p = os.path.join(root, "data", f"d{d:03d}")
    os.makedirs(p)
    for i in range(files):
        line = f"file {d:03d}/{i:04d} of the farm benchmark base ".encode()
        with open(os.path.join(p, f"f{i:04d}"), "wb") as f:
            f.write((line * (1024 // len(line) + 1))[:1023] + b"\n")
EOF
    tar --numeric-owner --owner=0 --group=0 --mtime=@1700000000 -C "$INPUTS/base" \
        -cf "$INPUTS/base.tar" .
    touch "$INPUTS/base.done"
fi
if [ ! -e "$INPUTS/data.done" ]; then
    say "copying ~$DATA_MB MB of real files from /usr to $INPUTS/data (export_bench prepare)"
    rm -rf "$INPUTS/data"
    (cd "$SRC" && cargo build --release -q -p farm-image --example export_bench)
    "$CARGO_TARGET_DIR/release/examples/export_bench" prepare "$INPUTS/data" "$DATA_MB" >&2
    # Readable by the user; owned by it, so the files are root's inside the build.
    chown -R -h "$BENCH_USER:" "$INPUTS/data"
    chmod -R a+rX,u+w "$INPUTS/data"
    touch "$INPUTS/data.done"
fi
chmod 0755 "$INPUTS"
DATA_TAR_BYTES=$(tar -C "$INPUTS/data" -cf - . | wc -c)
DATA_FILES=$(find "$INPUTS/data" | wc -l)

# The change of (a), one line of sh for farm, umoci and buildah alike: 1,000 files of
# exactly 1 KB in $R/change (R is empty inside the builds). farm's rebuilds set N to a
# new number each time, so that each makes a new layer (mtimes have 1 s resolution in
# a tar: two builds in the same second would otherwise give the same layer).
CHANGE='mkdir -p "$R/change"; pad=$(printf "%01017d" "${N:-0}"); i=0; while [ $i -lt 1000 ]; do printf "%s %05d\n" "$pad" $i > "$R/change/f$i"; i=$((i+1)); done'

# ---------------------------------------------------------------------------- farm runs
# farm_build NAME ARGS...: `farm build ARGS` as the user, with --state-dir/--pool given
# in ARGS; its stderr+stdout stamped into $LOGS/NAME.log, /usr/bin/time -v into
# $LOGS/NAME.time; sets WALL (s) and RC.
note_busy() { # other heavy work on this 2-core machine makes the numbers noisy
    local p
    for p in rustc cargo cc1 ld; do
        pgrep -x "$p" > /dev/null && [[ " $BUSY " != *" $p "* ]] && BUSY+="$p "
    done
    return 0
}
farm_build() {
    local name=$1; shift
    note_busy
    local t0=$EPOCHREALTIME
    set +e
    /usr/bin/time -v -o "$LOGS/$name.time" \
        setpriv --reuid "$BENCH_USER" --regid "$BENCH_USER" --init-groups \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$(getent passwd "$BENCH_USER" | cut -d: -f6)" \
        FARM_LOG="$FARM_LOG_SPEC" NO_COLOR=1 \
        "$FARM" build "$@" < /dev/null 2>&1 | stamp > "$LOGS/$name.log"
    RC=${PIPESTATUS[0]}
    set -e
    WALL=$(secs_since "$t0")
    if [ "$RC" != 0 ]; then
        echo "engine.sh: farm build ($name) failed (exit $RC); the end of $LOGS/$name.log:" >&2
        tail -20 "$LOGS/$name.log" | cut -d' ' -f2- >&2
    fi
}
maxrss_mb() { awk '/Maximum resident set size/ { printf "%.1f", $NF / 1024 }' "$LOGS/$1.time"; }

CTX=$RUN/ctx
mkdir -p "$CTX"
STATE=$RUN/state
POOL=$RUN/pool
for v in "change:-e" "change-xtrace:-xe"; do # the second with stacker's default -xe
    layer=${v%%:*}
    cat > "$CTX/$layer.yaml" <<EOF
base:
  from:
    type: tar
    url: $INPUTS/base.tar
  environment:
    PATH: /bin:/sbin:/usr/bin:/usr/sbin
$layer:
  from:
    type: built
    tag: base
  run: |
    #!/bin/sh ${v#*:}
    N=\${{REV}}
    $CHANGE
EOF
done
chown -R "$BENCH_USER:" "$CTX"
COMMON=(--state-dir "$STATE" --pool "$POOL" --allow-outside-context)

say "(a) farm: the 100,000-file base and the first build of the change layer"
cd "$RUN"
farm_build a-first -f "$CTX/change.yaml" -o "$RUN/oci-a" "${COMMON[@]}" --substitute REV=0
A_FIRST_WALL=$WALL
A_BASE_TIME=$($HELPERS layer-time "$LOGS/a-first.log" base)
[ "$RC" = 0 ] || { echo "engine.sh: cannot go on without the base" >&2; exit 1; }

say "(a) farm: $REPS rebuilds of the change layer (only its run line changes)"
A_LAYER=() A_WALL=() A_RUN=() A_EXP=() A_AFTER=()
for n in $(seq 1 "$REPS"); do
    farm_build "a-rebuild-$n" -f "$CTX/change.yaml" -o "$RUN/oci-a" "${COMMON[@]}" --substitute "REV=$n"
    A_LAYER+=("$($HELPERS layer-time "$LOGS/a-rebuild-$n.log" change)")
    A_WALL+=("$WALL")
    read -r _ _ e r a < <($HELPERS export-window "$LOGS/a-rebuild-$n.log")
    A_RUN+=("$r") A_EXP+=("$e") A_AFTER+=("$a")
    grep -q '\[base\] cached' "$LOGS/a-rebuild-$n.log" || echo "engine.sh: warning: base not cached in a-rebuild-$n" >&2
    echo "  rebuild $n: layer ${A_LAYER[-1]} s (run $r, export $e, new chain $a), wall $WALL s" >&2
done
farm_build a-xtrace -f "$CTX/change-xtrace.yaml" -o "$RUN/oci-ax" "${COMMON[@]}" --substitute REV=99
A_XTRACE_LAYER=$($HELPERS layer-time "$LOGS/a-xtrace.log" change-xtrace)
A_XTRACE_WALL=$WALL

median() { printf '%s\n' "$@" | grep -v '^-$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
A_LAYER_MED=$(median "${A_LAYER[@]}")
A_WALL_MED=$(median "${A_WALL[@]}")
A_RUN_MED=$(median "${A_RUN[@]}") A_EXP_MED=$(median "${A_EXP[@]}") A_AFTER_MED=$(median "${A_AFTER[@]}")

# ---------------------------------------------------------------------------- umoci
say "(a) umoci: unpack --rootless of the same base, the same change, repack"
U=$RUN/umoci
mkdir -p "$U" && chown "$BENCH_USER:" "$U"
as_user cp -a "$RUN/oci-a" "$U/layout"
t0=$EPOCHREALTIME
UMOCI_UNPACK=-
UMOCI_REPACK=-
if as_user umoci unpack --rootless --image "$U/layout:base" "$U/bundle" > "$LOGS/umoci-unpack.log" 2>&1; then
    UMOCI_UNPACK=$(secs_since "$t0")
    as_user R="$U/bundle/rootfs" busybox sh -c "$CHANGE"
    t0=$EPOCHREALTIME
    if as_user umoci repack --image "$U/layout:change" "$U/bundle" > "$LOGS/umoci-repack.log" 2>&1; then
        UMOCI_REPACK=$(secs_since "$t0")
    else
        echo "engine.sh: umoci repack failed: $(tail -3 "$LOGS/umoci-repack.log")" >&2
    fi
else
    echo "engine.sh: umoci unpack failed: $(tail -3 "$LOGS/umoci-unpack.log")" >&2
fi
echo "  umoci unpack $UMOCI_UNPACK s, repack $UMOCI_REPACK s" >&2

# ---------------------------------------------------------------------------- buildah
BUILDAH_COLD=- BUILDAH_STEP=- BUILDAH_NOTE=""
if [ "$BUILDAH" != 0 ] && ! command -v buildah > /dev/null; then
    say "installing buildah (apt-get install -y buildah)"
    apt-get install -y buildah > "$LOGS/apt-buildah.log" 2>&1 || BUILDAH_NOTE="apt-get install buildah failed"
fi
if [ "$BUILDAH" = 0 ]; then
    BUILDAH_NOTE="skipped (BUILDAH=0)"
elif command -v buildah > /dev/null; then
    say "(a) buildah: the same step, rebuilt with the base in its store (peers.md set-up)"
    H=$RUN/buildah
    mkdir -p "$H/.config/containers" "$H/run" "$H/ctx"
    chmod 700 "$H/run"
    printf '[containers]\ncgroups = "disabled"\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n' > "$H/.config/containers/containers.conf"
    printf '[storage]\ndriver = "overlay"\n' > "$H/.config/containers/storage.conf"
    printf 'FROM oci:%s:base\nRUN %s\n' "$RUN/oci-a" "$CHANGE" > "$H/ctx/Containerfile"
    chown -R "$BENCH_USER:" "$H"
    bud() { # LOGNAME, extra args
        local log=$1; shift
        as_user HOME="$H" XDG_RUNTIME_DIR="$H/run" buildah --root "$H/store" --runroot "$H/run/st" \
            bud --isolation=rootless --network=none --layers "$@" \
            -f "$H/ctx/Containerfile" -t localhost/change "$H/ctx" > "$LOGS/$log.log" 2>&1
    }
    t0=$EPOCHREALTIME
    if bud buildah-cold; then
        BUILDAH_COLD=$(secs_since "$t0")
        B_STEP=()
        for n in $(seq 1 "$REPS"); do
            t0=$EPOCHREALTIME
            if bud "buildah-rebuild-$n" --no-cache; then
                B_STEP+=("$(secs_since "$t0")")
                echo "  buildah step rebuilt: ${B_STEP[-1]} s" >&2
            else
                BUILDAH_NOTE="buildah --no-cache rebuild failed: $(tail -2 "$LOGS/buildah-rebuild-$n.log" | tr '\n' ' ')"
                break
            fi
        done
        [ ${#B_STEP[@]} -gt 0 ] && BUILDAH_STEP=$(median "${B_STEP[@]}")
    else
        BUILDAH_NOTE="buildah bud failed: $(tail -2 "$LOGS/buildah-cold.log" | tr '\n' ' ')"
    fi
else
    BUILDAH_NOTE="buildah is not installed"
fi
[ -n "$BUILDAH_NOTE" ] && echo "engine.sh: buildah: $BUILDAH_NOTE" >&2

# ---------------------------------------------------------------------------- (b), (d)
say "(b, d) the ~$DATA_MB MB export: pipelines and farm on the same files, interleaved, $B_REPS rounds"
# Warm the page cache (through cat: GNU tar does not read the files when writing to /dev/null).
tar -C "$INPUTS/data" -cf - . | cat > /dev/null
pipeline() { # COMPRESSOR...: sets P_SECS P_RSS
    local out
    note_busy
    out=$( { /usr/bin/time -f '%e %M' bash -c "tar -C '$INPUTS/data' -cf - . | $* | sha256sum" > /dev/null; } 2>&1 | tail -1)
    P_SECS=${out% *}
    P_RSS=$(calc "${out#* } / 1024" 1)
}
cat > "$CTX/b.yaml" <<EOF
busybox:
  from:
    type: tar
    url: $INPUTS/busybox.tar
data:
  from:
    type: built
    tag: busybox
  imports:
    - $INPUTS/data
  run: |
    #!/bin/sh -e
    cp -a /stacker/imports/data /data
    echo \${{REV}} > /rev
EOF
# The busybox base first (both compressions), so the measured builds build only `data`.
sed -n '1,/^data:/p' "$CTX/b.yaml" | sed '$d' > "$CTX/b0.yaml"
chown "$BENCH_USER:" "$CTX/b.yaml" "$CTX/b0.yaml"
for c in gzip zstd; do
    farm_build "b-base-$c" -f "$CTX/b0.yaml" -o "$RUN/oci-b0" "${COMMON[@]}" --compression "$c"
done

declare -A P_FULL P_T P_R P_CPU P_DIRTY F_CPU F_DIRTY F_EXP F_RUN F_AFTER F_LAYER F_WALL F_TAR F_BLOB F_RSS F_RSS_ONE F_RSS_MAIN F_RSS_KIDS F_RSS_ALL F_RSS_TIME
for r in $(seq 1 "$B_REPS"); do
    for c in gzip zstd; do
        k=$c-$r
        $HELPERS sample /nonexistent "$LOGS/p-$k.rss" 0.05 &
        SAMPLER=$!
        case $c in gzip) pipeline gzip -6 ;; zstd) pipeline zstd -q -3 -T0 ;; esac
        kill -TERM "$SAMPLER"; wait "$SAMPLER" || true
        P_T[$c,$r]=$P_SECS P_R[$c,$r]=$P_RSS
        if [ "$c" = zstd ]; then
            # What an export must do besides: hash the uncompressed tar (the diff_id) and
            # store the blob. Information only; the targets are against the plain pipeline.
            mkdir -p "$RUN/tmp"
            pipeline "tee >(openssl dgst -sha256 > /dev/null) | zstd -q -3 -T0 | tee '$RUN/tmp/blob.zst'"
            P_FULL[$r]=$P_SECS
            rm -f "$RUN/tmp/blob.zst"
        fi
        read -r P_CPU[$c,$r] P_DIRTY[$c,$r] _ < <($HELPERS machine "$LOGS/p-$k.rss")
        echo "  round $r: tar | $c | sha256sum: $P_SECS s (machine busy ${P_CPU[$c,$r]}%, dirty ${P_DIRTY[$c,$r]} MB)" >&2
        $HELPERS sample "$FARM" "$LOGS/b-$k.rss" 0.05 &
        SAMPLER=$!
        farm_build "b-$k" -f "$CTX/b.yaml" -o "$RUN/oci-b-$k" "${COMMON[@]}" --compression "$c" --substitute "REV=$k"
        kill -TERM "$SAMPLER"; wait "$SAMPLER" || true
        F_WALL[$c,$r]=$WALL
        F_LAYER[$c,$r]=$($HELPERS layer-time "$LOGS/b-$k.log" data)
        read -r t0 t1 F_EXP[$c,$r] F_RUN[$c,$r] F_AFTER[$c,$r] < <($HELPERS export-window "$LOGS/b-$k.log")
        read -r F_RSS[$c,$r] F_RSS_ONE[$c,$r] F_RSS_MAIN[$c,$r] F_RSS_KIDS[$c,$r] < <($HELPERS peak "$LOGS/b-$k.rss" "$t0" "$t1")
        read -r F_RSS_ALL[$c,$r] _ < <($HELPERS peak "$LOGS/b-$k.rss")
        read -r F_CPU[$c,$r] F_DIRTY[$c,$r] _ < <($HELPERS machine "$LOGS/b-$k.rss" "$t0" "$t1")
        F_RSS_TIME[$c,$r]=$(maxrss_mb "b-$k")
        F_TAR[$c,$r]=0 F_BLOB[$c,$r]=0
        if [ "$RC" = 0 ]; then
            read -r mt digest < <($HELPERS last-layer "$RUN/oci-b-$k" data)
            blob=$RUN/oci-b-$k/blobs/${digest%%:*}/${digest#*:}
            F_BLOB[$c,$r]=$(stat -c %s "$blob")
            case $mt in
                *zstd) F_TAR[$c,$r]=$(zstd -dc "$blob" | wc -c) ;;
                *gzip) F_TAR[$c,$r]=$(gzip -dc "$blob" | wc -c) ;;
                *) F_TAR[$c,$r]=${F_BLOB[$c,$r]} ;;
            esac
        fi
        echo "  round $r: farm $c: export ${F_EXP[$c,$r]} s (machine busy ${F_CPU[$c,$r]}%, dirty ${F_DIRTY[$c,$r]} MB at its start) of $((F_TAR[$c,$r] / 1000000)) MB tar; run (cp -a) ${F_RUN[$c,$r]} s; new chain ${F_AFTER[$c,$r]} s; layer ${F_LAYER[$c,$r]} s; wall ${F_WALL[$c,$r]} s" >&2
        echo "  round $r: farm $c: peak RSS during the export: summed ${F_RSS[$c,$r]} MB (main ${F_RSS_MAIN[$c,$r]}, children ${F_RSS_KIDS[$c,$r]}); whole build ${F_RSS_ALL[$c,$r]} MB; time -v ${F_RSS_TIME[$c,$r]} MB" >&2
    done
done
best() { printf '%s\n' "$@" | grep -v -e '^-$' -e nan | sort -g | head -1; }
worst() { printf '%s\n' "$@" | grep -v -e '^-$' -e nan | sort -g | tail -1; }
vals() { local a=$1 c=$2 r out=""; for r in $(seq 1 "$B_REPS"); do eval "out+=\${$a[\$c,\$r]}' '"; done; echo "${out% }"; }
declare -A B_EXP B_P B_TP B_PTP B_RSS
for c in gzip zstd; do
    # Best of the rounds for each side (the least disturbed by the machine's neighbours).
    B_EXP[$c]=$(best $(vals F_EXP $c)); B_P[$c]=$(best $(vals P_T $c))
    B_TP[$c]=$(calc "${F_TAR[$c,1]} / 1e6 / ${B_EXP[$c]}" 1)
    B_PTP[$c]=$(calc "$DATA_TAR_BYTES / 1e6 / ${B_P[$c]}" 1)
    B_RSS[$c]=$(worst $(vals F_RSS $c))
done

EXPORT_BENCH_OUT=""
if [ "$EXPORT_BENCH" = 1 ]; then
    say "(b) image/examples/export_bench.sh on the same files (the export library alone)"
    mkdir -p "$RUN/tmp"
    EXPORT_BENCH_OUT=$(cd "$SRC" && TMPDIR=$RUN/tmp image/examples/export_bench.sh "$INPUTS/data" "$DATA_MB" 2>&1 | grep -v '^data:') || true
    echo "$EXPORT_BENCH_OUT" >&2
fi

# ---------------------------------------------------------------------------- (c)
say "(c) two images from the same OCI base (a fresh pool and state dir)"
for n in 1 2; do
    cat > "$CTX/c$n.yaml" <<EOF
image$n:
  from:
    type: oci
    url: $RUN/oci-a:base
  run: |
    echo "image $n" > /image$n
EOF
done
chown "$BENCH_USER:" "$CTX"/c?.yaml
COMMON_C=(--state-dir "$RUN/state-c" --pool "$RUN/pool-c" --allow-outside-context)
farm_build c1 -f "$CTX/c1.yaml" -o "$RUN/oci-c" "${COMMON_C[@]}"
C1_WALL=$WALL; read -r C1_COUNT C1_EXTRACT < <($HELPERS extract "$LOGS/c1.log")
C1_LAYER=$($HELPERS layer-time "$LOGS/c1.log" image1)
farm_build c2 -f "$CTX/c2.yaml" -o "$RUN/oci-c" "${COMMON_C[@]}"
C2_WALL=$WALL; read -r C2_COUNT C2_EXTRACT < <($HELPERS extract "$LOGS/c2.log")
C2_LAYER=$($HELPERS layer-time "$LOGS/c2.log" image2)
echo "  first image: $C1_COUNT extraction(s), ${C1_EXTRACT} s extracting, layer $C1_LAYER s, wall $C1_WALL s" >&2
echo "  second image: $C2_COUNT extraction(s), ${C2_EXTRACT} s extracting, layer $C2_LAYER s, wall $C2_WALL s" >&2

# ---------------------------------------------------------------------------- table
mb() { calc "$1 / 1000000" 0; }
RSS_MAX=$(worst "${B_RSS[gzip]}" "${B_RSS[zstd]}")
DATE=$(date '+%Y-%m-%d %H:%M')
mkdir -p "$HERE/results"
OUT=$HERE/results/engine-$STAMP.txt
{
echo "farm engine benchmark, $DATE, farm $REV$DIRTY, $(nproc) cores, kernel $(uname -r)"
echo "command: $( [ -n "$BENCH_REV" ] && printf 'BENCH_REV=%s ' "$BENCH_REV")REPS=$REPS B_REPS=$B_REPS benches/engine.sh"
echo "farm runs as $BENCH_USER via setpriv; --pool and --state-dir on btrfs ($BENCH_ROOT, loopback); logs in $LOGS"
echo
echo "(a) 1,000 new files of 1 KB on a base of $((BASE_DIRS * FILES_PER_DIR)) files of 1 KB + busybox (base cached; median of $REPS)"
printf '  %-58s %10s\n' "farm: the change layer (farm's summary)" "$A_LAYER_MED s"
printf '  %-58s %10s\n' "farm: wall time of the whole farm build" "$A_WALL_MED s"
printf '  %-58s %10s\n' "  (each rebuild: layer / wall)" "$(paste -d/ <(printf '%s\n' "${A_LAYER[@]}") <(printf '%s\n' "${A_WALL[@]}") | tr '\n' ' ')"
printf '  %-58s %10s\n' "  (phases: run / export / new chain in the pool, medians)" "$A_RUN_MED / $A_EXP_MED / $A_AFTER_MED s"
printf '  %-58s %10s\n' "farm: the same with #!/bin/sh -xe (layer / wall)" "$A_XTRACE_LAYER / $A_XTRACE_WALL s"
printf '  %-58s %10s\n' "farm: first build, base layer (unpack+export) / wall" "$A_BASE_TIME / $A_FIRST_WALL s"
printf '  %-58s %10s\n' "umoci repack of the change" "$UMOCI_REPACK s"
printf '  %-58s %10s\n' "  (umoci unpack --rootless of the base, not compared)" "$UMOCI_UNPACK s"
printf '  %-58s %10s\n' "buildah: the step rebuilt, base in store (median)" "$BUILDAH_STEP s"
printf '  %-58s %10s\n' "  (buildah: cold build from the OCI base)" "$BUILDAH_COLD s"
[ -n "$BUILDAH_NOTE" ] && echo "  buildah: $BUILDAH_NOTE"
printf '  %-58s %10s   (target >= 20x)\n' "umoci repack / farm layer" "$(calc "$UMOCI_REPACK / $A_LAYER_MED" 1)x"
printf '  %-58s %10s\n' "umoci repack / farm wall" "$(calc "$UMOCI_REPACK / $A_WALL_MED" 1)x"
printf '  %-58s %10s\n' "buildah step / farm layer" "$(calc "$BUILDAH_STEP / $A_LAYER_MED" 2)x"
printf '  %-58s %10s\n' "buildah step / farm wall" "$(calc "$BUILDAH_STEP / $A_WALL_MED" 2)x"
echo
echo "(b) export of a layer of real files: $DATA_FILES files, tar $(mb "$DATA_TAR_BYTES") MB (farm's layer tar: $(mb "${F_TAR[gzip,1]}") MB); best of $B_REPS interleaved rounds"
printf '  %-34s %8s %12s %8s   %s\n' "" "seconds" "MB/s of tar" "blob MB" "(every round, s)"
for c in gzip zstd; do
    printf '  %-34s %8s %12s %8s   %s\n' "farm export, --compression $c" "${B_EXP[$c]}" "${B_TP[$c]}" "$(mb "${F_BLOB[$c,1]}")" "$(vals F_EXP $c)"
    case $c in gzip) p="tar | gzip -6 | sha256sum" ;; zstd) p="tar | zstd -3 -T0 | sha256sum" ;; esac
    printf '  %-34s %8s %12s %8s   %s\n' "$p" "${B_P[$c]}" "${B_PTP[$c]}" "" "$(vals P_T $c)"
done
P_FULL_BEST=$(best "${P_FULL[@]}")
printf '  %-34s %8s %12s %8s   %s\n' "  same + sha256 of the tar + blob file" "$P_FULL_BEST" "$(calc "$DATA_TAR_BYTES / 1e6 / $P_FULL_BEST" 1)" "" "${P_FULL[*]}"
printf '  %-58s %10s   (target >= 1.5x)\n' "gzip: farm throughput / pipeline throughput" "$(calc "${B_TP[gzip]} / ${B_PTP[gzip]}" 2)x"
printf '  %-58s %10s   (target <= 1.3x)\n' "zstd: farm time per MB / pipeline time per MB" "$(calc "${B_PTP[zstd]} / ${B_TP[zstd]}" 2)x"
printf '  %-58s %10s\n' "zstd: the same against the pipeline that also hashes + stores" "$(calc "$DATA_TAR_BYTES / 1e6 / $P_FULL_BEST / ${B_TP[zstd]}" 2)x"
printf '  %-58s %10s\n' "machine CPU busy % during: farm gzip export / gzip pipeline" "$(vals F_CPU gzip) / $(vals P_CPU gzip)"
printf '  %-58s %10s\n' "machine CPU busy % during: farm zstd export / zstd pipeline" "$(vals F_CPU zstd) / $(vals P_CPU zstd)"
printf '  %-58s %10s\n' "dirty page cache at the start (MB): farm export (after its cp -a)" "$(vals F_DIRTY gzip) $(vals F_DIRTY zstd)"
for c in gzip zstd; do
    for r in $(seq 1 "$B_REPS"); do
        printf '  %-58s %10s\n' "farm data layer $c #$r: run (cp -a) / export / new chain / layer / wall" \
            "${F_RUN[$c,$r]} / ${F_EXP[$c,$r]} / ${F_AFTER[$c,$r]} / ${F_LAYER[$c,$r]} / ${F_WALL[$c,$r]} s"
    done
done
if [ -n "$EXPORT_BENCH_OUT" ]; then
    echo "  image/examples/export_bench.sh (the export library alone, same files):"
    echo "$EXPORT_BENCH_OUT" | sed 's/^/    /'
fi
echo
echo "(c) a second image from an already-extracted OCI base ($((BASE_DIRS * FILES_PER_DIR)) files)"
printf '  %-58s %10s\n' "first image: 'extracting base layer' lines / seconds" "$C1_COUNT / $C1_EXTRACT s"
printf '  %-58s %10s\n' "first image: layer / wall" "$C1_LAYER / $C1_WALL s"
printf '  %-58s %10s   (target ~0)\n' "second image: 'extracting base layer' lines / seconds" "$C2_COUNT / $C2_EXTRACT s"
printf '  %-58s %10s\n' "second image: layer / wall" "$C2_LAYER / $C2_WALL s"
echo
echo "(d) peak memory while exporting the ~$DATA_MB MB layer (sampled every 50 ms; MB)"
for c in gzip zstd; do
    for r in $(seq 1 "$B_REPS"); do
        printf '  %-58s %10s\n' "$c #$r: summed (farm + __farm-userns children) / main / children" \
            "${F_RSS[$c,$r]} / ${F_RSS_MAIN[$c,$r]} / ${F_RSS_KIDS[$c,$r]}"
        printf '  %-58s %10s\n' "$c #$r: whole build summed / /usr/bin/time -v max RSS" "${F_RSS_ALL[$c,$r]} / ${F_RSS_TIME[$c,$r]}"
    done
done
printf '  %-58s %10s   (target < 150 MB)\n' "peak during the export, summed, worst" "$RSS_MAX MB"
printf '  %-58s %10s\n' "pipelines' /usr/bin/time max RSS, gzip / zstd" "${P_R[gzip,1]} / ${P_R[zstd,1]} MB"
echo
echo "machine: load average at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg); compilers seen running during the timings: ${BUSY:-none}"
} | tee "$OUT"
echo "written to $OUT" >&2

# ---------------------------------------------------------------------------- clean up
if [ "$KEEP" != 1 ]; then
    say "removing this run's pools, state and bundles (KEEP=1 keeps them)"
    cd /
    btrfs subvolume list "$BENCH_ROOT" 2> /dev/null | awk '{ print $NF }' \
        | grep "^runs/$STAMP/" | sort -r | while read -r sv; do
            btrfs subvolume delete "$BENCH_ROOT/$sv" > /dev/null 2>&1 || true
        done
    find "$RUN" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
fi
