#!/bin/sh
# hasync role hook: run dnsmasq (DHCP/DNS for the house) only on the primary.
# Replaces the seed's loop that started dnsmasq on the backup when the primary stopped answering.
# hasync sets HASYNC_EVENT (promote, demote, fault), HASYNC_ROLE, HASYNC_TERM, HASYNC_LEADER,
# HASYNC_NODE, HASYNC_CLUSTER and HASYNC_REASON. A non-zero exit is logged and counted as a failure.
set -eu
case "$HASYNC_EVENT" in
  promote)
    echo "primary for term $HASYNC_TERM: starting dnsmasq"
    systemctl start dnsmasq
    ;;
  demote|fault)
    # The demote hook finishes before a graceful handover's release is published, so the next
    # primary starts dnsmasq only after this one has stopped it.
    echo "standby ($HASYNC_REASON): stopping dnsmasq"
    systemctl stop dnsmasq
    ;;
esac
