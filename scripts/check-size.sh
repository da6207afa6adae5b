#!/usr/bin/env bash
# The stripped release binary against its ceiling in .ci/size (issue 29):
# a binary that grows past it fails CI, naming both figures. Builds the
# release binary if scripts/test-deb.sh has not already.
#
#   scripts/check-size.sh [TARGET]     (default x86_64-unknown-linux-gnu)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-x86_64-unknown-linux-gnu}
ceiling=$(awk -v t="$target" '$1 == t { print $2 }' .ci/size)
[ -n "$ceiling" ] || { echo "check-size: .ci/size names no ceiling for $target" >&2; exit 1; }
bin=target/$target/release/outpost
if [ ! -x "$bin" ]; then
  cargo build --locked --release --target "$target" --bin outpost
fi
# The release profile strips already; strip a copy anyway, so the figure
# is the stripped size whatever the profile says.
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
strip -o "$tmp" "$bin" 2>/dev/null || cp "$bin" "$tmp"
size=$(stat -c %s "$tmp")
mib=$(awk -v b="$size" 'BEGIN { printf "%.2f", b / 1048576 }')
if [ "$size" -gt "$ceiling" ]; then
  echo "check-size: $target: the stripped binary is $size bytes ($mib MiB), over the ceiling of $ceiling in .ci/size; find what grew with \`cargo tree -d\` and \`cargo bloat --release --crates\`" >&2
  exit 1
fi
echo "check-size: $target: $size bytes ($mib MiB), ceiling $ceiling"
