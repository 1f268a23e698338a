#!/bin/bash
# Export benchmark: farm-image export vs. tar | gzip/zstd | sha256sum on the same files.
# Usage: image/examples/export_bench.sh [DATA_DIR] [MB]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-/tmp/farm-bench-data}
MB=${2:-700}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-image}
cargo build --release -q -p farm-image --example export_bench
BIN=$CARGO_TARGET_DIR/release/examples/export_bench
[ -d "$DATA" ] || "$BIN" prepare "$DATA" "$MB"
SIZE=$(tar -C "$DATA" -cf - . | wc -c)
echo "data: $DATA, tar size $((SIZE / 1000000)) MB"
tar -C "$DATA" -cf - . > /dev/null  # warm the page cache

measure() { # name, command...
    local name=$1; shift
    local out; out=$( { /usr/bin/time -f '%e %M' "$@" > /dev/null; } 2>&1 | tail -1)
    local secs=${out% *} rss=${out#* }
    awk -v n="$name" -v s="$secs" -v r="$rss" -v b="$SIZE" \
        'BEGIN { printf "%-34s %7.2f s %8.1f MB/s  peak RSS %6.1f MB\n", n, s, b/1e6/s, r/1024 }'
}
for c in gzip zstd; do
    measure "farm export ($c)" "$BIN" export "$DATA" "$c"
done
measure "tar | gzip -6 | sha256sum" bash -c "tar -C '$DATA' -cf - . | gzip -6 | sha256sum"
measure "tar | zstd -3 -T0 | sha256sum" bash -c "tar -C '$DATA' -cf - . | zstd -q -3 -T0 | sha256sum"
if command -v pigz > /dev/null; then
    measure "tar | pigz -6 | sha256sum" bash -c "tar -C '$DATA' -cf - . | pigz -6 | sha256sum"
fi
