#!/usr/bin/env bash
# Build outpost for every shipped target on this machine (no containers),
# print each stripped binary's size, and make the .deb of each Debian
# architecture.
#
#   scripts/build-release.sh                      # all targets, release profile
#   scripts/build-release.sh aarch64-unknown-linux-gnu
#   PROFILE=cross-check scripts/build-release.sh  # faster, no LTO (CI's check)
#   NO_DEB=1 scripts/build-release.sh             # binaries only
#
# Installs what is missing first (Debian cross compilers, musl-tools,
# qemu-user, rust-std for the targets): run as root on a Debian/Ubuntu box.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cross-env.sh
profile=${PROFILE:-release}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || read -r -a targets <<<"$TARGETS_ALL"
cross_install "${targets[@]}"
mkdir -p dist
for t in "${targets[@]}"; do
  (
    cross_env "$t"
    echo "== $t ($profile)" >&2
    cargo build --locked --profile "$profile" --target "$t" --bin outpost
  )
  bin="target/$t/$profile/outpost"
  size=$(stat -c %s "$bin")
  awk -v t="$t" -v s="$size" -v b="$bin" 'BEGIN { printf "%-32s %8.2f MiB  %s\n", t, s / 1048576, b }'
  if [ -z "${NO_DEB:-}" ] && [ -n "$(deb_arch "$t")" ]; then
    scripts/build-deb.sh "$t" "$profile"
  fi
done
