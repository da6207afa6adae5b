#!/usr/bin/env bash
# W1 on this machine: outpost beside NATS JetStream and Mosquitto, one table.
# Installs the peers from Debian if they are missing (needs root for that),
# runs them on loopback ports only, and stops them by PID when done.
#
#   benches/peers/run.sh                          # 100 devices, 100,000 commands
#   OUTPOST_PEERS_COMMANDS=20000 benches/peers/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=""
command -v nats-server >/dev/null || missing="$missing nats-server"
command -v mosquitto >/dev/null || missing="$missing mosquitto"
if [ -n "$missing" ]; then
  echo "installing:$missing" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
# Debian starts the packaged services; the bench runs its own instances on
# free loopback ports and leaves those alone.
exec cargo bench --bench peers
