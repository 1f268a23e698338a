#!/bin/sh
# Make busybox-rootfs.tar beside this script from Debian's busybox-static
# (apt-get install busybox-static): /bin/busybox plus its applet links.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/busybox-rootfs.tar"
[ -e "$out" ] && exit 0
bb=$(command -v busybox || echo /bin/busybox)
tmp=$(mktemp -d)
chmod 0755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin" "$tmp/sbin" "$tmp/usr/bin" "$tmp/usr/sbin" "$tmp/etc" "$tmp/tmp" "$tmp/root"
cp "$bb" "$tmp/bin/busybox"
for applet in $("$bb" --list-full); do
  [ "$applet" = bin/busybox ] || ln -sf /bin/busybox "$tmp/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$tmp/etc/passwd"
echo 'root:x:0:' > "$tmp/etc/group"
tar --numeric-owner --owner=0 --group=0 -C "$tmp" -cf "$out" .
