#!/bin/sh
# hasync role hook: dnsmasq (DHCP and DNS for the house) runs on the primary only. See README.md here.
# Configure it as both the promote and the demote hook (hasync.yaml here); the floating IP is hasync's own
# (vip:), not a hook's.
#
#   promote: starts dnsmasq and fails (exit 1) if it is not running a moment later: a bad configuration, a
#            port taken. With hooks.on_promote_failure: handover the node then steps down, so it does not stay
#            primary with no DHCP.
#   demote:  stops it (idempotent: hasync also runs it once at start, in case a killed run left it behind).
#   fence:   stops it too; run by the agent's guardian, not the agent, when the agent died as primary (kill -9,
#            a crash) or stalled past its deadline (SIGSTOP), so that the next primary's dnsmasq is the only
#            DHCP server. Configure it as hooks.fence as well.
#   fault:   nothing. A primary that becomes unhealthy is demoted too, and the demote stops dnsmasq; a node
#            that keeps dnsmasq through a broker outage (hooks.on_broker_loss: kept) must not stop it because
#            a check through the broker failed.
#
# How dnsmasq is run, by DNSMASQ_CONTROL:
#   systemd (default)  systemctl start/stop $DNSMASQ_UNIT (dnsmasq); disable the unit so that only this hook
#                      starts it: systemctl disable --now dnsmasq
#   pidfile            the dnsmasq binary itself, with --conf-file=$DNSMASQ_CONF (/etc/dnsmasq.conf) and
#                      --pid-file=$DNSMASQ_PIDFILE (/run/hasync-dnsmasq.pid): no init system needed (a
#                      container, the tests' network namespaces)
set -eu
CONTROL=${DNSMASQ_CONTROL:-systemd}
UNIT=${DNSMASQ_UNIT:-dnsmasq}
CONF=${DNSMASQ_CONF:-/etc/dnsmasq.conf}
PIDFILE=${DNSMASQ_PIDFILE:-/run/hasync-dnsmasq.pid}

case "$CONTROL" in
  systemd|pidfile) ;;
  *) echo "DNSMASQ_CONTROL must be systemd or pidfile, not '$CONTROL'" >&2; exit 2 ;;
esac

# The process runs (a zombie does not: dnsmasq forks into the background, and until whatever adopted it reaps it,
# which a container's init may do late or never, kill -0 still finds an exited dnsmasq).
alive() {
  kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

running() {
  if [ "$CONTROL" = systemd ]; then
    systemctl is-active --quiet "$UNIT"
  else
    [ -s "$PIDFILE" ] && alive "$(cat "$PIDFILE")"
  fi
}

start() {
  if [ "$CONTROL" = systemd ]; then
    systemctl start "$UNIT"
  elif ! running; then
    # dnsmasq forks into the background once its sockets are open, and exits non-zero if it cannot; its
    # output goes to a file, or hasync would wait for the daemon's end of the pipe (hooks must not hold it).
    out=$(mktemp)
    if ! dnsmasq --conf-file="$CONF" --pid-file="$PIDFILE" >"$out" 2>&1 </dev/null; then
      cat "$out" >&2; rm -f "$out"; exit 1
    fi
    rm -f "$out"
  fi
  i=0
  until running; do  # up a moment later, or the promote fails
    i=$((i + 1)); [ "$i" -le 20 ] || { echo "dnsmasq is not running" >&2; exit 1; }
    sleep 0.1
  done
}

stop() {
  if [ "$CONTROL" = systemd ]; then
    systemctl stop "$UNIT"
  elif [ -s "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    i=0
    while alive "$pid"; do  # gone before the release lets the next primary start its own
      i=$((i + 1)); [ "$i" -le 100 ] || { kill -9 "$pid" 2>/dev/null || true; break; }
      sleep 0.05
    done
    rm -f "$PIDFILE"
  fi
}

case "${HASYNC_EVENT:-}" in
  promote) echo "primary for term $HASYNC_TERM: starting dnsmasq"; start ;;
  demote) echo "standby ($HASYNC_REASON): stopping dnsmasq"; stop ;;
  fence) echo "fenced ($HASYNC_REASON, term $HASYNC_TERM): stopping dnsmasq"; stop ;;
  fault) echo "fault ($HASYNC_REASON): dnsmasq left to the demote hook" ;;
  *) echo "run by hasync as a role hook (HASYNC_EVENT promote, demote, fault or fence)" >&2; exit 2 ;;
esac
