# Sourced by the build scripts: what each target needs, here, without
# containers. Debian's cross compilers link and build ring's C for the ARM
# targets; musl-gcc builds ring's C for the static x86_64 binary.

# Every target outpost ships for.
TARGETS_ALL="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl"

# The Debian packages a target needs to be built (and run under qemu).
cross_packages() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo "gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user" ;;
    armv7-unknown-linux-gnueabihf) echo "gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user" ;;
    x86_64-unknown-linux-musl) echo "musl-tools" ;;
    *) echo "" ;;
  esac
}

# Install what is missing: Debian packages (needs root) and rust-std.
cross_install() {
  local t pkgs="" missing=""
  for t in "$@"; do pkgs="$pkgs $(cross_packages "$t")"; done
  for p in $pkgs; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    echo "installing:$missing" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
  local installed
  installed=$(rustup target list --installed)
  for t in "$@"; do
    if ! grep -qx "$t" <<<"$installed"; then
      rustup target add "$t"
    fi
  done
}

# Export the linker and C compiler for a target.
cross_env() {
  case "$1" in
    aarch64-unknown-linux-gnu)
      export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
      export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
      export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar ;;
    armv7-unknown-linux-gnueabihf)
      export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
      export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
      export AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar ;;
    x86_64-unknown-linux-musl)
      export CC_x86_64_unknown_linux_musl=musl-gcc ;;
  esac
}

# How to run a target's binary on this x86_64 machine.
cross_runner() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo "qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
    armv7-unknown-linux-gnueabihf) echo "qemu-arm -L /usr/arm-linux-gnueabihf" ;;
    *) echo "" ;;
  esac
}

# The Debian architecture of a target (empty: not packaged).
deb_arch() {
  case "$1" in
    x86_64-unknown-linux-gnu) echo amd64 ;;
    aarch64-unknown-linux-gnu) echo arm64 ;;
    armv7-unknown-linux-gnueabihf) echo armhf ;;
    *) echo "" ;;
  esac
}
