#!/usr/bin/env bash
# Builds hasync's container image (Dockerfile) on this machine: the container tooling and a local Debian base
# from scripts/setup-docker.sh, BuildKit (Debian's /usr/bin/docker), and this machine's CA bundle as a build
# secret when it has one (pip inside the build then trusts a TLS-intercepting proxy; the bundle is not kept in
# the image). Elsewhere `docker build -t hasync .` is all it takes.
#
#   ./scripts/build-image.sh [TAG]        default TAG: hasync:test; prints the tag on its last line
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-hasync:test}"
base=$(./scripts/setup-docker.sh | tail -n 1)
secret=()
ca="${HASYNC_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
if [ -s "$ca" ]; then
  secret=(--secret "id=ca,src=$ca")
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DOCKER_BUILDKIT=1 /usr/bin/docker build -q --build-arg "BASE=$base" --build-arg "VERSION=$version" \
  --build-arg "REVISION=$revision" "${secret[@]}" -t "$tag" . >/dev/null
echo "$tag"
