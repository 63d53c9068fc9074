"""A LAN of network namespaces for process tests that need a network of their own (root and iproute2).

``Lan(["n1", "n2"])`` makes a bridge in the test's own namespace, with an address (so a broker started
by the test listens there and the test reaches the nodes), and one namespace per node, each with a veth
on the bridge. A process started with ``lan.prefix(node)`` runs inside that node's namespace: its
network faults (``iptables`` there, ``harness.netem``) touch nobody else. Names and the subnet are
random per LAN, so tests may build several at once.

Traffic between two namespaces crosses the bridge, and with ``br_netfilter`` loaded (Docker loads it, and sets
the FORWARD policy to DROP) the host's iptables FORWARD chain sees it: the LAN then inserts one ACCEPT rule for
this bridge's own traffic (``forward``: None, the default, when bridged frames go through iptables; True or
False to force it), and removes it with the LAN.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

TOOL_TIMEOUT = 30.0


def available() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: iproute2, iptables)"
    return None


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def realtime() -> list[str]:
    """A command prefix that runs it in the real-time class where this process may (root, ``chrt``): an
    observer that stamps what it reads (``ip -ts monitor``) then reads each change as it comes, not two in
    one go whenever a busy machine gets round to it."""
    return ["chrt", "-f", "2"] if os.geteuid() == 0 and shutil.which("chrt") else []


LOCK = Path(tempfile.gettempdir()) / "hasync-netns.lock"  # subnets are chosen one LAN at a time


def _subnets_in_use() -> set[int]:
    return {int(m) for m in re.findall(r"\b10\.213\.(\d+)\.", run("ip", "-br", "addr"))}


def _bridge_calls_iptables() -> bool:
    try:
        return Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip() == "1"
    except OSError:
        return False  # br_netfilter not loaded: bridged frames skip iptables


class Lan:
    def __init__(self, nodes: Sequence[str], *, forward: bool | None = None) -> None:
        tag = secrets.token_hex(3)
        self._forward = forward
        self.bridge = f"hsbr{tag}"
        self.namespaces = {node: f"hasync-{tag}-{node}" for node in nodes}
        self._nodes = list(nodes)
        self._veths = {node: f"hsv{tag}{i}" for i, node in enumerate(nodes)}
        self._made: list[tuple[str, str]] = []
        self.gateway = ""
        self.addresses: dict[str, str] = {}

    def prefix(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node]]

    def run_in(self, node: str, *argv: str) -> str:
        return run(*self.prefix(node), *argv)

    def veth(self, node: str) -> str:
        """The bridge's end of the node's link, in the test's own namespace: set it down to pull the cable."""
        return self._veths[node]

    def __enter__(self) -> Self:
        try:
            with LOCK.open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another test's LAN may be choosing its subnet right now
                free = sorted(set(range(1, 255)) - _subnets_in_use())
                if not free:
                    raise RuntimeError("no free 10.213.x.0/24 subnet for a test LAN")
                third = secrets.choice(free)
                self.gateway = f"10.213.{third}.1"
                self.addresses = {node: f"10.213.{third}.{10 + i}" for i, node in enumerate(self._nodes)}
                run("ip", "link", "add", self.bridge, "type", "bridge")
                self._made.append(("link", self.bridge))
                run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
            if self._forward or (self._forward is None and _bridge_calls_iptables()):
                # br_netfilter (loaded by Docker) sends bridged frames through this namespace's FORWARD chain,
                # whose policy Docker sets to DROP: node-to-node traffic would vanish. Our bridge's own is let
                # through, above Docker's rules; close() removes the rule.
                run("iptables", "-I", "FORWARD", "1", *self._forward_rule())
                self._made.append(("forward", self.bridge))
            for node, ns in self.namespaces.items():
                run("ip", "netns", "add", ns)
                self._made.append(("netns", ns))
                veth = self._veths[node]
                run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
                run("ip", "link", "set", veth, "master", self.bridge, "up")
                self.run_in(node, "ip", "addr", "add", f"{self.addresses[node]}/24", "dev", "eth0")
                self.run_in(node, "ip", "link", "set", "eth0", "up")
                self.run_in(node, "ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for kind, name in reversed(self._made):
            if kind == "forward":
                subprocess.run(["iptables", "-D", "FORWARD", *self._forward_rule()], capture_output=True,
                               timeout=TOOL_TIMEOUT, check=False)
            elif kind == "netns":
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=TOOL_TIMEOUT, check=False)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=TOOL_TIMEOUT, check=False)
        self._made.clear()

    def _forward_rule(self) -> list[str]:
        return ["-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT", "-m", "comment", "--comment", "hasync test LAN"]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
