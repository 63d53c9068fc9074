#!/usr/bin/env bash
# keepalived from Debian's packages, the anchor of the two-node home (tests/test_home_e2e.py, the benchmark
# home-keepalived): the tests start their own keepalived processes in network namespaces, so the package
# must not start a system one. A policy-rc.d that refuses every start is put in place for the install (if
# there is none already) and removed after; Debian's unit also starts only with a non-empty
# /etc/keepalived/keepalived.conf, which the package does not ship. Root only; nothing to do if installed.
set -euo pipefail
if [ "$(id -u)" -ne 0 ] || [ -x /usr/sbin/keepalived ]; then
  exit 0
fi
policy=/usr/sbin/policy-rc.d
ours=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# hasync scripts/setup-keepalived.sh: no service starts during this install\nexit 101\n' > "$policy"
  chmod 755 "$policy"
  ours=1
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends keepalived curl >/dev/null
if [ -n "$ours" ]; then
  rm -f "$policy"
  trap - EXIT
fi
