#!/usr/bin/env bash
# Build the ARM (and static musl) binaries and run them: the ARM ones under
# qemu-user on this x86_64 machine. Each must print its version and pass
# `outpost demo` end to end (a box, a device over QUIC on loopback, commands
# delivered, one retried), so a 32-bit or alignment bug fails here.
#
#   scripts/test-cross.sh [TARGET...]   (default: aarch64, armv7, x86_64 musl)
#   PROFILE=release scripts/test-cross.sh   (the shipped build; slower)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cross-env.sh
profile=${PROFILE:-cross-check}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl)
NO_DEB=1 PROFILE="$profile" scripts/build-release.sh "${targets[@]}"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
for t in "${targets[@]}"; do
  bin="target/$t/$profile/outpost"
  runner=$(cross_runner "$t")
  echo "== $t: ${runner:-native}" >&2
  got=$($runner "$bin" --version)
  [ "$got" = "outpost $version" ] || { echo "$t: --version printed '$got'" >&2; exit 1; }
  home=$(mktemp -d)
  if ! out=$(HOME="$home" XDG_DATA_HOME="$home" OUTPOST_LOG=warn timeout 600 $runner "$bin" demo 2>&1); then
    echo "$out" >&2
    echo "$t: outpost demo failed" >&2
    exit 1
  fi
  rm -rf "$home"
  grep -q "demo passed" <<<"$out" || { echo "$out" >&2; echo "$t: demo did not pass" >&2; exit 1; }
  echo "$t: --version and demo ok" >&2
done
echo "cross: ${targets[*]} ok"
