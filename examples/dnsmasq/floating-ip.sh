#!/bin/sh
# hasync role hook: move a floating IP address to the primary (what keepalived's VRRP did).
# Configure: hooks: {promote: /etc/hasync/hooks/floating-ip.sh, demote: ..., fault: ...}
set -eu
ADDR=${FLOATING_IP:-192.0.2.10/24}
DEV=${FLOATING_DEV:-eth0}
case "$HASYNC_EVENT" in
  promote)
    ip addr replace "$ADDR" dev "$DEV"
    # Tell the switches and neighbours where the address lives now.
    arping -c 2 -U -I "$DEV" "${ADDR%/*}" >/dev/null 2>&1 || true
    ;;
  demote|fault)
    ip addr del "$ADDR" dev "$DEV" 2>/dev/null || true
    ;;
esac
