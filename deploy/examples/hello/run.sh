#!/bin/sh
# The main job on a fresh machine, from the repository's root:
#   deploy/examples/hello/run.sh
# 1. checks for what the example needs (Debian's busybox-static for the base root
#    filesystem, umoci and runc to run the result, uidmap for rootless builds) and, as
#    root, installs what is missing; as another user it says the one line to run;
# 2. builds the two images of stacker.yaml with farm's embedded coordinator and worker
#    (`farm submit` with no coordinator configured) into ./oci;
# 3. runs the `hello` image with runc and shows what it prints.
# FARM=/path/to/farm uses that binary instead of `cargo run --release`.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)

missing=""
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 || missing="$missing busybox-static"
command -v umoci >/dev/null 2>&1 || missing="$missing umoci"
command -v runc >/dev/null 2>&1 || missing="$missing runc"
if [ "$(id -u)" != 0 ]; then
  command -v newuidmap >/dev/null 2>&1 || missing="$missing uidmap"
fi
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "farm example: installing$missing" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "farm example: missing$missing; run: sudo apt-get install -y$missing" >&2
    exit 1
  fi
fi

"$here/make-rootfs.sh"
cd "$repo"
if [ -n "${FARM:-}" ]; then
  "$FARM" submit deploy/examples/hello/stacker.yaml -o oci
else
  cargo run --quiet --release -p farm-cli -- submit deploy/examples/hello/stacker.yaml -o oci
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$(id -u)" = 0 ]; then
  umoci unpack --image oci:hello "$work/bundle" >/dev/null
else
  umoci unpack --rootless --image oci:hello "$work/bundle" >/dev/null
fi
# Not on a terminal when run from a script or CI.
sed -i 's/"terminal": *true/"terminal": false/' "$work/bundle/config.json"
echo "farm example: running the image 'hello' with runc:" >&2
runc --root "$work/runc" run --bundle "$work/bundle" "farm-hello-$$"
