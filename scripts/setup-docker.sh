#!/usr/bin/env bash
# The container tooling the image, compose and add-on tests need, on a Debian machine as root: Debian's
# docker.io and docker-compose (its /usr/bin/docker has BuildKit; another docker CLI earlier on PATH may
# not), a dockerd started here when none answers, and a local Debian base image (debootstrap
# --variant=minbase from this machine's own Debian mirror, trimmed like debian:bookworm-slim, then docker
# import) for machines that cannot reach Docker Hub. Idempotent: a second run only checks. Prints the base
# image's name on its last line.
#
#   HASYNC_BASE_IMAGE   the local base's name (default hasync-base:bookworm)
#   HASYNC_DOCKERD_LOG  dockerd's log when started here (default .cache/dockerd.log)
set -euo pipefail
cd "$(dirname "$0")/.."
docker=/usr/bin/docker
base="${HASYNC_BASE_IMAGE:-hasync-base:bookworm}"
log="${HASYNC_DOCKERD_LOG:-$PWD/.cache/dockerd.log}"

if [ ! -x "$docker" ] || [ ! -x /usr/sbin/dockerd ] || [ ! -x /usr/bin/docker-compose ] || ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup-docker: needs root to install docker.io, docker-compose and debootstrap (sudo apt-get install docker.io docker-compose debootstrap)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi

if ! "$docker" info >/dev/null 2>&1; then
  mkdir -p "$(dirname "$log")"
  # setsid: the daemon outlives this script and is not in the caller's process group.
  setsid /usr/sbin/dockerd --storage-driver overlay2 >"$log" 2>&1 < /dev/null &
  for _ in $(seq 120); do
    "$docker" info >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! "$docker" info >/dev/null 2>&1; then
    echo "setup-docker: dockerd did not answer within 60 s; its log ($log) ends with:" >&2
    tail -n 20 "$log" >&2
    exit 1
  fi
fi

if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
  mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)
  mirror="${mirror:-http://deb.debian.org/debian}"
  rootfs=$(mktemp -d /tmp/hasync-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "setup-docker: building the base image $base from $mirror (debootstrap, about a minute)" >&2
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
    echo "setup-docker: debootstrap failed; its log ends with:" >&2
    tail -n 20 "$rootfs.log" >&2
    exit 1
  fi
  rm -f "$rootfs.log"
  # What debian:bookworm-slim leaves out: package caches and lists, documentation, translations.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  tar -C "$rootfs" -c . | "$docker" import --change 'CMD ["bash"]' - "$base" >/dev/null
fi
echo "$base"
