#!/usr/bin/env bash
# Build the amd64 .deb and put it through a technician's life on this
# machine: install, run the packaged box as its user with the packaged
# config, upgrade (data and an edited config kept), remove (data kept),
# purge (data gone). Needs root and dpkg; refuses to touch a machine where
# outpost is already installed.
#
#   scripts/test-deb.sh            (builds with the release profile)
#   PROFILE=cross-check scripts/test-deb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
if [ "$(id -u)" != 0 ] || ! command -v dpkg >/dev/null; then
  echo "test-deb: skipped: needs root and dpkg (run it in CI or a throwaway VM)" >&2
  exit 0
fi
if dpkg -s outpost >/dev/null 2>&1; then
  echo "test-deb: skipped: outpost is installed on this machine and this test would purge it" >&2
  exit 0
fi
cargo build --locked --profile "$profile" --target x86_64-unknown-linux-gnu --bin outpost
deb=$(scripts/build-deb.sh x86_64-unknown-linux-gnu "$profile")
fail() { echo "test-deb: $*" >&2; exit 1; }
box=""
cleanup() {
  [ -n "$box" ] && kill "$box" 2>/dev/null || true
  dpkg -P outpost >/dev/null 2>&1 || true
}
trap cleanup EXIT

# What the package holds.
contents=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/outpost ./lib/systemd/system/outpost.service ./usr/lib/sysusers.d/outpost.conf \
  ./etc/outpost/outpost.toml ./usr/share/man/man1/outpost.1.gz \
  ./usr/share/bash-completion/completions/outpost ./usr/share/zsh/vendor-completions/_outpost \
  ./usr/share/fish/vendor_completions.d/outpost.fish ./usr/share/doc/outpost/copyright; do
  grep -q " $f\$" <<<"$contents" || fail "$deb lacks $f"
done
[ "$(dpkg-deb --field "$deb" Architecture)" = amd64 ] || fail "wrong architecture"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/outpost/outpost.toml \
  || fail "the config is not a conffile"

# Install: the user exists, nothing is enabled or started.
dpkg -i "$deb" >/dev/null
outpost --version | grep -q "^outpost " || fail "outpost --version"
getent passwd outpost >/dev/null || fail "no outpost user after install"
grep -q '^ExecStart=/usr/bin/outpost serve' /lib/systemd/system/outpost.service || fail "unit"
[ ! -e /etc/systemd/system/multi-user.target.wants/outpost.service ] || fail "install enabled the service"
man -w outpost >/dev/null 2>&1 || zcat /usr/share/man/man1/outpost.1.gz | grep -q '^\.TH' || fail "man page"

# Run the packaged box as systemd would (its user, its state dir, the
# packaged config) and drive it with the CLI as root.
start_box() {
  runuser -u outpost -- env OUTPOST_LOG=warn outpost serve --listen 127.0.0.1:0 >/dev/null 2>&1 &
  box=$!
  for _ in $(seq 100); do
    outpost status >/dev/null 2>&1 && break
    sleep 0.1
  done
}
install -d -o outpost -g outpost -m 0750 /var/lib/outpost
start_box
outpost status --json | grep -q '"data_dir":"/var/lib/outpost"' || fail "the CLI does not find the packaged box"
outpost enroll dev-1 --out /tmp/outpost-test-dev-1.bundle >/dev/null
id=$(outpost send dev-1 hello)
kill "$box"; wait "$box" 2>/dev/null || true; box=""
rm -f /tmp/outpost-test-dev-1.bundle

# Upgrade (the same package again): data and the edited config are kept.
echo "# edited by the technician" >> /etc/outpost/outpost.toml
dpkg -i --force-confold "$deb" >/dev/null
grep -q "edited by the technician" /etc/outpost/outpost.toml || fail "upgrade replaced the edited config"
[ -d /var/lib/outpost/db ] || fail "upgrade lost the data"

# The queued command is still there after the upgrade.
start_box
outpost show "$id" --json | grep -q '"state":"queued"' || fail "the queued command did not survive the upgrade"
kill "$box"; wait "$box" 2>/dev/null || true; box=""

# Remove keeps data and config; purge removes both.
dpkg -r outpost >/dev/null
[ ! -e /usr/bin/outpost ] || fail "remove left the binary"
[ -d /var/lib/outpost/db ] || fail "remove deleted the data"
[ -f /etc/outpost/outpost.toml ] || fail "remove deleted the config"
dpkg -P outpost >/dev/null
[ ! -e /var/lib/outpost ] || fail "purge left /var/lib/outpost"
[ ! -e /etc/outpost ] || fail "purge left /etc/outpost"
echo "deb: install, run, upgrade, remove, purge ok ($deb, $(stat -c %s "$deb") bytes)"
