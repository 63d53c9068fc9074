#!/usr/bin/env bash
# Installs everything hasync's demo and tests need on a fresh Debian machine: Mosquitto from
# Debian's packages, a project virtual environment in .venv and, for the tests against a real Home
# Assistant, Home Assistant Core in its own environment in .cache/ha-venv (skip it with HASYNC_NO_HA=1).
# HASYNC_SETUP=demo installs only what the demo needs: the project with its embedded broker, no
# Mosquitto, no test tools, no Home Assistant. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${HASYNC_SETUP:-test}"

if [ "$mode" != "demo" ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    # The package starts a system broker on port 1883; tests use their own on free ports.
    (systemctl disable --now mosquitto >/dev/null 2>&1 || service mosquitto stop >/dev/null 2>&1 || true)
  else
    echo "setup: mosquitto is missing; install it with: sudo apt-get install mosquitto" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ "$mode" = "demo" ]; then
  extras="broker"
  stamp=.venv/.hasync-installed-demo
else
  extras="test"
  stamp=.venv/.hasync-installed
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
  touch "$stamp"
fi

if [ "$mode" != "demo" ] && [ "${HASYNC_NO_HA:-0}" != "1" ]; then
  ./scripts/setup-ha.sh
fi
