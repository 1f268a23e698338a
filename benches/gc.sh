#!/bin/bash
# Time and peak memory of `farm gc` over a file:// store of N blobs (default 10,000):
# half referenced by action cache entries (2 blobs each), half unreferenced and older
# than the grace period. Measures a dry run, then the collection (which also switches
# the fresh cache.db to incremental vacuuming), then a second collection (nothing left
# to remove: the marking and listing cost alone). Measures; asserts nothing.
#
#   benches/gc.sh [N]       FARM_BIN=target/release/farm by default (else debug)
set -euo pipefail
n=${1:-10000}
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bin=${FARM_BIN:-$target/release/farm}
[[ -x $bin ]] || bin=$target/debug/farm
dir=$(mktemp -d /tmp/farm-gc-bench.XXXXXX)
trap 'rm -rf "$dir"' EXIT
python3 - "$dir" "$n" <<'PY'
import hashlib, json, os, sqlite3, sys, time
d, n = sys.argv[1], int(sys.argv[2])
blobs = os.path.join(d, "blobs", "blobs", "sha256")
os.makedirs(blobs)
old = time.time() - 7200
digests = []
for i in range(n):
    data = (b"blob %d " % i) * (16 + i % 64)
    h = hashlib.sha256(data).hexdigest()
    p = os.path.join(blobs, h)
    with open(p, "wb") as f:
        f.write(data)
    os.utime(p, (old, old))
    digests.append((h, len(data)))
db = sqlite3.connect(os.path.join(d, "cache.db"))
db.execute("CREATE TABLE action_cache (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
           "created INTEGER NOT NULL, last_used INTEGER NOT NULL)")
now = int(time.time())
for e in range(n // 4):
    (c, cs), (l, ls) = digests[2 * e], digests[2 * e + 1]
    value = {"config_digest": "sha256:" + c, "config_size": cs,
             "layers": [{"media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
                         "digest": "sha256:" + l, "size": ls, "diff_id": "sha256:" + l}],
             "chain_id": "sha256:" + "0" * 64}
    db.execute("INSERT INTO action_cache VALUES (?, ?, ?, ?)",
               ("key-%d" % e, json.dumps(value), now, now - e))
db.commit()
PY
echo "farm gc over $n blobs ($(du -sh "$dir/blobs" | cut -f1)) with $bin"
for run in "--dry-run" "" ""; do
    /usr/bin/time -f "%e s, peak RSS %M KiB" -o "$dir/time" \
        "$bin" gc --state-dir "$dir" $run > "$dir/out"
    echo "== farm gc $run: $(cat "$dir/time")"
    sed 's/^/   /' "$dir/out"
done
