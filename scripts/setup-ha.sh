#!/usr/bin/env bash
# Installs Home Assistant Core in its own virtual environment, .cache/ha-venv, for the integration tests
# that run a real Home Assistant as a subprocess (harness/ha.py). HA pins its own library versions
# (aiohttp, pydantic 1.x, ...), so it cannot share the project's .venv.
#
# Besides HA and two pins, it pre-installs the requirements HA would otherwise pip-install on its first
# start for the integrations the tests load, so HA always starts with --skip-pip: faster, repeatable,
# and no network access at test time.
#
# Idempotent: a stamp file records what was installed; a second run with the same list does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

HA_VERSION=2024.3.3
# josepy 1.14 breaks the `acme` import the cloud integration pulls in (HA then starts in recovery mode);
# HA 2024.3's MQTT integration needs paho-mqtt 1.x.
PINS=("josepy<1.14" "paho-mqtt==1.6.1")
# What HA 2024.3.3 pip-installs on its first start with harness/ha.py's configuration and an MQTT config
# entry ("Attempting install of" in its log at INFO): the requirements of integrations it always loads
# (frontend, backup, hardware, image_upload via person, file_upload, recorder's via after-dependencies) and
# of camera, which the MQTT entry sets up with all its platforms. Versions are HA 2024.3.3's own pins.
FIRST_START_REQUIREMENTS=(
  "home-assistant-frontend==20240307.0"
  "Pillow==10.2.0"
  "PyTurboJPEG==1.7.1"
  "SQLAlchemy==2.0.27"
  "fnv-hash-fast==0.5.0"
  "janus==1.0.0"
  "psutil-home-assistant==0.0.1"
  "securetar==2024.2.1"
  # The demo integration (federation tests: real lights, covers, climates, locks, fans...) depends on
  # conversation.
  "hassil==1.6.1"
  "home-assistant-intents==2024.3.12"
)

venv=.cache/ha-venv
stamp=$venv/.hasync-ha-installed
wanted="homeassistant==$HA_VERSION
pins: ${PINS[*]}
first-start requirements: ${FIRST_START_REQUIREMENTS[*]}"

if [ -x "$venv/bin/hass" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  echo "setup-ha: Home Assistant $HA_VERSION is already installed in $venv"
  exit 0
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup-ha: Home Assistant $HA_VERSION needs Python 3.11 or newer; $python is $("$python" -V 2>&1)" >&2
  exit 1
fi

started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
  echo "setup-ha: creating $venv with $("$python" -V 2>&1)"
  mkdir -p .cache
  "$python" -m venv "$venv"
fi
pip_install() {
  # -q still prints warnings; drop only the one some machines' pip.conf produces for every package
  # (extra-index-url naming a local directory that has no entry for it).
  "$venv/bin/python" -m pip --disable-pip-version-check -q install "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade pip wheel

echo "setup-ha: installing homeassistant==$HA_VERSION with ${PINS[*]} (several minutes on a fresh machine)"
pip_install "homeassistant==$HA_VERSION" "${PINS[@]}"

if [ ${#FIRST_START_REQUIREMENTS[@]} -gt 0 ]; then
  echo "setup-ha: installing first-start requirements: ${FIRST_START_REQUIREMENTS[*]}"
  # HA installs these under its own constraints file; so do we, and the pins again so they cannot move.
  constraints=$("$venv/bin/python" -c \
    'import homeassistant, pathlib; print(pathlib.Path(homeassistant.__file__).parent / "package_constraints.txt")')
  pip_install --constraint "$constraints" "${FIRST_START_REQUIREMENTS[@]}" "${PINS[@]}"
fi

# A failed import here is what would put HA into recovery mode later; better to fail now.
"$venv/bin/python" -c 'import acme, paho.mqtt, homeassistant.const as c; assert c.__version__ == "'"$HA_VERSION"'"'

printf '%s\n' "$wanted" >"$stamp"
echo "setup-ha: done in $((SECONDS - started)) s; $(du -sh "$venv" | cut -f1) in $venv"
