#!/bin/sh
# Builds the farm image with farm itself, as root, into an OCI layout:
#   deploy/images/build.sh                       # -> target/farm-image/oci, tag farm
#   deploy/images/build.sh docker://REGISTRY/NS  # ... and pushes NS/farm:TAG with farm publish
# Environment: FARM_BINARY (default: a release build, `cargo build --release -p farm-cli`),
# OUT (default target/farm-image), TAG (default latest), SUITE (default bookworm),
# SOURCE_DATE_EPOCH (default: the last commit's time; the same inputs give the same image).
# Needs mmdebstrap (apt-get install mmdebstrap) and Debian's package mirror.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${OUT:-$repo/target/farm-image}
suite=${SUITE:-bookworm}
tag=${TAG:-latest}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
command -v mmdebstrap >/dev/null 2>&1 || {
  echo "build.sh: mmdebstrap is missing: apt-get install -y mmdebstrap" >&2
  exit 1
}
if [ -z "${FARM_BINARY:-}" ]; then
  (cd "$repo" && cargo build --quiet --release --locked -p farm-cli)
  FARM_BINARY=${CARGO_TARGET_DIR:-$repo/target}/release/farm
fi
mkdir -p "$out"
rootfs=$out/rootfs-$suite-$SOURCE_DATE_EPOCH.tar
if [ ! -s "$rootfs" ]; then
  echo "build.sh: making the $suite root filesystem with mmdebstrap" >&2
  mmdebstrap --quiet --format=tar --variant=essential \
    --include=uidmap,btrfs-progs,ca-certificates \
    "$suite" "$rootfs.part"
  mv "$rootfs.part" "$rootfs"
fi
farm=${FARM:-$FARM_BINARY}
# The pool apart from the state dir: farm keeps a state dir 0700, and as root the build
# namespace's root is a subordinate id that must reach the pool.
mkdir -p "$out/pool"
chmod 0755 "$out" "$out/pool"
"$farm" build -f "$here/stacker.yaml" -o "$out/oci" --state-dir "$out/state" --pool "$out/pool" \
  --substitute "ROOTFS=$rootfs" --substitute "FARM_BINARY=$FARM_BINARY"
echo "build.sh: $out/oci, tag farm" >&2
if [ $# -gt 0 ]; then
  "$farm" publish --url "$1" --layout "$out/oci" --tag "$tag"
fi
