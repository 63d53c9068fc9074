"""Every change of some addresses in a LAN's namespaces, in the order the kernel made them.

One ``ip -ts -o monitor address all-nsid`` in the test's own namespace hears every namespace that has an id
there (``ip netns set NAME auto``), on one netlink socket: the kernel queues each notification when it makes
the change (under its routing lock), so the order of the lines is the order of the changes, across
namespaces. Separate monitors, one per namespace, would each add their own wake-up delay to their
timestamps: on a busy machine that can reverse two changes a few milliseconds apart. The times are ``ip``'s
own stamps, taken when it reads a notification (converted to ``time.monotonic()``): a margin between two
changes is a lower bound (two read in one wake-up get nearly the same time), the order exact.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from . import netns
from .home import LineReader, _ip_stamp

MARKER = "192.0.2.78"  # TEST-NET-1: added and removed until the monitor reports it (it is listening)
_LINE = re.compile(r"\[nsid (\d+)\](Deleted )?\d+: \S+\s+inet6? ([0-9a-fA-F.:]+)/")


@dataclass(frozen=True)
class Change:
    t: float
    node: str
    ip: str
    held: bool


class AddressLog:
    """The changes of ``ips`` on the LAN's nodes (``changes``, in the kernel's order) from ``start``."""

    def __init__(self, lan: netns.Lan, ips: Sequence[str], workdir: Path) -> None:
        self.lan = lan
        self.ips = set(ips)
        self.changes: list[Change] = []
        self._nodes: dict[int, str] = {}
        self._ready = threading.Event()
        # (In the real-time class where it may: it reads each change as it comes, see netns.realtime.)
        self._reader = LineReader([*netns.realtime(), "ip", "-ts", "-o", "monitor", "address", "all-nsid"],
                                  self._line, workdir / "address-log.txt")

    def _line(self, line: str) -> None:
        parsed = _ip_stamp(line)
        match = _LINE.search(parsed[1]) if parsed else None
        if parsed is None or match is None:
            return
        nsid, deleted, ip = match.groups()
        node = self._nodes.get(int(nsid))
        if ip == MARKER:
            self._ready.set()
        elif node is not None and ip in self.ips:
            self.changes.append(Change(parsed[0], node, ip, deleted is None))

    def start(self) -> Self:
        for ns in self.lan.namespaces.values():
            if self._nsid(ns) is None:
                netns.run("ip", "netns", "set", ns, "auto")
        self._nodes = {nsid: node for node, ns in self.lan.namespaces.items()
                       if (nsid := self._nsid(ns)) is not None}
        self._reader.start()
        node = next(iter(self.lan.namespaces))
        deadline = time.monotonic() + 10
        while not self._ready.is_set():
            if time.monotonic() > deadline:
                raise AssertionError("timed out after 10 s waiting for the address log to listen")
            self.lan.run_in(node, "ip", "addr", "add", f"{MARKER}/32", "dev", "lo")
            self._ready.wait(0.2)
            self.lan.run_in(node, "ip", "addr", "del", f"{MARKER}/32", "dev", "lo")
        return self

    @staticmethod
    def _nsid(ns: str) -> int | None:
        found = [n.get("id") for n in json.loads(netns.run("ip", "-j", "netns", "list") or "[]") if n["name"] == ns]
        return found[0] if found and found[0] is not None else None

    def first(self, node: str, ip: str, *, held: bool, after: float) -> int | None:
        """The index in ``changes`` of the first change of ``ip`` on ``node`` to ``held`` after ``after``."""
        return next((i for i, c in enumerate(list(self.changes))
                     if c.node == node and c.ip == ip and c.held == held and c.t > after), None)

    def close(self) -> None:
        self._reader.close()
