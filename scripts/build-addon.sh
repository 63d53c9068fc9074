#!/usr/bin/env bash
# Builds the add-on's image (addon/Dockerfile) as the Supervisor would, for the tests: hasync's image first
# (scripts/build-image.sh), and as BUILD_FROM a stand-in for Home Assistant's base image (harness/addon_base:
# a local Debian base with a small s6-like /init), because ghcr.io is not reachable here. With BUILD_FROM
# set (e.g. ghcr.io/home-assistant/amd64-base-debian:bookworm) it builds on that instead.
#
#   ./scripts/build-addon.sh [TAG]        default TAG: hasync-addon:test; prints the tag on its last line
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-hasync-addon:test}"
hasync_image=$(./scripts/build-image.sh hasync:test | tail -n 1)
build_from="${BUILD_FROM:-}"
if [ -z "$build_from" ]; then
  base=$(./scripts/setup-docker.sh | tail -n 1)
  build_from=hasync-addon-base:test
  DOCKER_BUILDKIT=1 /usr/bin/docker build -q --build-arg "BASE=$base" -t "$build_from" harness/addon_base >/dev/null
fi
DOCKER_BUILDKIT=1 /usr/bin/docker build -q --build-arg "BUILD_FROM=$build_from" \
  --build-arg "HASYNC_IMAGE=$hasync_image" -t "$tag" addon >/dev/null
echo "$tag"
