"""dnsmasq as the recipe (examples/dnsmasq) runs it, for the namespace tests: a node's configuration, the recipe's
hook script as a command, and the clean-up of a dnsmasq that outlived its test.

Every node's dnsmasq serves DHCP on the LAN's ``.100``-``.150`` and answers ``whoami.test`` with its own node's
address, so a client that asks the floating IP learns which node answered.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
from pathlib import Path

from . import netns
from .brokers import mosquitto_binary

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "dnsmasq" / "dnsmasq.sh"
WHOAMI = "whoami.test"


def missing() -> str | None:
    """Why the recipe cannot run here (root, the tools), or None."""
    why = netns.available()
    if why is not None:
        return why
    for tool, package in (("mosquitto", "mosquitto"), ("dnsmasq", "dnsmasq-base"), ("busybox", "busybox")):
        if (mosquitto_binary() if tool == "mosquitto" else shutil.which(tool)) is None:
            return f"{tool} is not installed (Debian: {package})"
    return None


def write_config(path: Path, lan: netns.Lan, node: str, vip: str) -> None:
    """``node``'s dnsmasq.conf at ``path`` (its log and lease file beside it); ``vip`` (an address) is the DNS
    server the clients are given."""
    third = lan.gateway.split(".")[2]
    path.write_text("\n".join([
        "interface=eth0", "except-interface=lo", "no-resolv", "no-hosts", "user=root",
        f"log-facility={path.parent / 'dnsmasq.log'}",
        f"dhcp-range=10.213.{third}.100,10.213.{third}.150,255.255.255.0,2m",
        f"dhcp-option=option:dns-server,{vip}",
        f"dhcp-leasefile={path.parent / 'leases'}", "dhcp-authoritative",
        f"address=/{WHOAMI}/{lan.addresses[node]}",
        "no-ping",  # (dnsmasq pings an address before offering it: seconds per exchange, and the client asks often)
    ]) + "\n")


def hook(conf: Path, pidfile: Path) -> str:
    """The recipe's hook script as hasync runs it here: dnsmasq started and stopped by pidfile (no systemd)."""
    return (f"DNSMASQ_CONTROL=pidfile DNSMASQ_CONF={shlex.quote(str(conf))} "
            f"DNSMASQ_PIDFILE={shlex.quote(str(pidfile))} /bin/sh {shlex.quote(str(RECIPE))}")


def running(pidfile: Path) -> bool:
    """The dnsmasq of ``pidfile`` is running (pid namespaces are shared: the test sees the process), not a zombie
    that nobody has reaped yet (daemonized, it is adopted by init, which here may take seconds to reap it)."""
    try:
        stat = Path(f"/proc/{int(pidfile.read_text())}/stat").read_text()
    except (OSError, ValueError):
        return False
    return stat.rpartition(") ")[2][:1] != "Z"


def kill(pidfile: Path) -> None:
    """SIGKILL the dnsmasq of ``pidfile``, if any: one an agent (or keepalived) left behind."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
