#!/usr/bin/env bash
# Make dist/outpost_<version>_<arch>.deb from a built binary, with dpkg-deb:
# the binary, the systemd unit and its sysusers user, a default config as a
# conffile, shell completions, the man page. Installing enables nothing;
# upgrading keeps data and config (and restarts a running box); only purge
# removes /var/lib/outpost.
#
#   scripts/build-deb.sh TARGET [PROFILE]   (after `cargo build --target TARGET`)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cross-env.sh
target=${1:?usage: build-deb.sh TARGET [PROFILE]}
profile=${2:-release}
arch=$(deb_arch "$target")
[ -n "$arch" ] || { echo "no Debian architecture for $target" >&2; exit 2; }
bin="target/$target/$profile/outpost"
[ -x "$bin" ] || { echo "$bin is missing: build it first (scripts/build-release.sh $target)" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

# Completions and the man page come from the binary itself; a foreign one
# runs under qemu.
runner=$(cross_runner "$target")
run() { $runner "$bin" "$@"; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -Dm755 "$bin" "$root/usr/bin/outpost"
install -Dm644 systemd/outpost.service "$root/lib/systemd/system/outpost.service"
install -Dm644 systemd/outpost.sysusers "$root/usr/lib/sysusers.d/outpost.conf"
# The packaged box keeps its data where the unit puts it, and the CLI finds
# it there through this file.
install -d "$root/etc/outpost"
sed 's|^# data_dir = "/var/lib/outpost"|data_dir = "/var/lib/outpost"|' packaging/outpost.toml \
  > "$root/etc/outpost/outpost.toml"
grep -q '^data_dir = ' "$root/etc/outpost/outpost.toml"
chmod 644 "$root/etc/outpost/outpost.toml"
install -d "$root/usr/share/bash-completion/completions" \
  "$root/usr/share/zsh/vendor-completions" \
  "$root/usr/share/fish/vendor_completions.d" \
  "$root/usr/share/man/man1" "$root/usr/share/doc/outpost"
run completions bash > "$root/usr/share/bash-completion/completions/outpost"
run completions zsh > "$root/usr/share/zsh/vendor-completions/_outpost"
run completions fish > "$root/usr/share/fish/vendor_completions.d/outpost.fish"
run man | gzip -9n > "$root/usr/share/man/man1/outpost.1.gz"
gzip -9nc CHANGELOG.md > "$root/usr/share/doc/outpost/changelog.gz"
install -m644 README.md "$root/usr/share/doc/outpost/README.md"
cat > "$root/usr/share/doc/outpost/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: outpost
License: Apache-2.0

Files: *
License: Apache-2.0
 On Debian systems, the full text is in /usr/share/common-licenses/Apache-2.0.
COPY

install -d "$root/DEBIAN"
depends="libc6"
[[ "$target" == *musl* ]] && depends=""
size_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
{
  echo "Package: outpost"
  echo "Version: $version"
  echo "Architecture: $arch"
  echo "Maintainer: outpost maintainers <maintainers@outpost.invalid>"
  echo "Installed-Size: $size_kb"
  [ -n "$depends" ] && echo "Depends: $depends"
  echo "Recommends: systemd"
  echo "Section: net"
  echo "Priority: optional"
  echo "Description: offline-first device relay and durable command queue for edge boxes"
  echo " outpost keeps commands for the devices of a site in an embedded database"
  echo " until each device has received and acknowledged them, across power cuts"
  echo " and reboots; devices connect over QUIC with their own certificates."
} > "$root/DEBIAN/control"
echo "/etc/outpost/outpost.toml" > "$root/DEBIAN/conffiles"

cat > "$root/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers outpost.conf
  elif ! getent passwd outpost >/dev/null; then
    adduser --system --group --home /var/lib/outpost --no-create-home outpost
  fi
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # A fresh install enables and starts nothing; an upgrade restarts a box
    # that was running, on the data it had.
    if [ -n "$2" ]; then
      systemctl try-restart outpost.service || true
    fi
  fi
fi
exit 0
SH
cat > "$root/DEBIAN/prerm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop outpost.service || true
  systemctl disable outpost.service >/dev/null 2>&1 || true
fi
exit 0
SH
cat > "$root/DEBIAN/postrm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
  # Only purge removes the box's data: its queue, results and certificates.
  rm -rf /var/lib/outpost
  rmdir /etc/outpost 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
exit 0
SH
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
mkdir -p dist
out="dist/outpost_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "$out"
