"""The floating IP: addresses (``vip:``) that only the primary holds, moved by netlink, announced on the LAN.

Theory of operation
===================

The election decides who is primary; this module makes the LAN agree. While this node is primary its
configured addresses are on their interfaces; at every other moment they are not.

* **Promotion** (``promoted``) adds the addresses (netlink, ``RTM_NEWADDR``; IPv6 ones without duplicate
  address detection, which would leave them tentative and silent for a second), then announces each one
  ``ANNOUNCE_COUNT`` times, ``ANNOUNCE_INTERVAL`` apart: a gratuitous ARP request for IPv4, an unsolicited
  neighbour advertisement with the override flag for IPv6. Hosts that already have a neighbour entry for
  the address (the old primary's MAC) replace it at once, instead of after their entry goes stale
  (minutes). The first goes out the moment the address is up; the repeats are for a frame lost on the way
  (a broadcast is never retransmitted, and a Wi-Fi client in power save listens only every beacon, 100 to
  300 ms) and for kernels before 4.12, which ignore an ARP update within a second (``locktime``) of the
  last: three, 0.6 s apart, span 1.2 s.
* **Demotion** (``demoted``), for any reason, removes them. The renew deadline is a demotion: when this
  node cannot be sure it still holds the lease it stops holding the addresses, within one turn of the
  event loop. Nothing here waits for the role hooks (a hung promote hook does not delay it) nor for the
  broker. A graceful release is published only once the addresses are gone (``release``), so the
  successor never adds them while this node still answers for them.
* **Start** (``check``): before the agent can be elected, any of its addresses still on an interface (a
  previous run killed with ``kill -9`` while primary) is removed. The same check (is the interface there,
  may this process change its addresses) runs again every ``RECHECK_INTERVAL`` while a fault stands.
* **Faults**: a missing interface, a missing capability (``CAP_NET_ADMIN``: ``EPERM``), a netlink call
  that does not answer within ``NETLINK_TIMEOUT``. Each is one log line (WARNING the first time, DEBUG
  after), a count in ``hasync_vip_errors_total{operation,error}``, and never an exception out of here. A
  failure to add or to check makes the node unhealthy (``fault``, reported through ``on_fault``): like a
  failing health check, the primary runs its fault hook and hands over, and the node is not eligible until
  the check passes again. A failure to announce is counted and logged only: the address works, clients
  just learn it by asking. An address already on the interface (put there by someone else) is counted
  (``error="exists"``) and held from then on.

**Lifetimes.** A process that is frozen (SIGSTOP, a stalled disk) or dead runs nothing of its own, while the
others elect a successor a lease after its last renewal. So a fenced address is never permanent: it is
added, and given a new lifetime (``RTM_NEWADDR`` with replace) every time the election extends this node's
acting deadline (``extend``: the promotion and every renewal that came back), for as long as the kernel
may keep it. A renewal sent at ``s`` lets another node hold the addresses from ``s + takeover_after`` at
the earliest (``AgentConfig.takeover_after``: a lease of silence, or the Last Will 1.5 keepalives after
this node's last packet); the kernel takes lifetimes in whole seconds and removes an expired address up to
``ADDRESS_LIFETIME_LAG`` late (its check runs on a whole second when that is within 0.25 s of the expiry,
and no sooner than a second after its previous run, which any change of an address in the namespace
triggers: measured 0.25 s and 0.93 s). A request the kernel handles at ``t`` therefore gets
``floor(s + takeover_after - ADDRESS_LIFETIME_LAG - t)`` seconds (``Lifetime``), computed by the seam right
before it sends the request; when that is not even one second (the renewal came back too late), there is
no refresh (counted, ``error="late"``). With the defaults (lease 3 s, renew deadline 2 s, keepalive 5 s) a
renewal back at once gives one second, and the next one comes half a second later; when none does (a broker
cut or stalled), a top-up gives the longest lifetime the last one allows (``_next_topup``: 1.7 s after it
was sent), so the address stays nearly until the renew deadline (2 s) removes it. It lapses while this node
may still be primary only when no renewal has come back for those 1.7 s (a second, if the agent itself was
starved); a refresh that comes after that adds it again and is counted (``hasync_vip_lapses_total``). A
refresh never shortens a lifetime; one that fails otherwise than late is a fault, like an add. The
configuration refuses timings without room for one second
(``AgentConfig._fenced_lifetime``). A kept address stays permanent: it must outlive a broker outage, when
there are no renewals, for as long as the agent is alive; a frozen agent keeps it (as a cut-off one does,
the trade-off of ``kept``).

**The guardian.** A dead process is faster than a lifetime: its connection closes, the broker publishes its
will and a successor is elected within milliseconds. The guardian (``hasync.fence``, ``hasync.guardian``)
runs beside the agent and removes every configured address the moment the agent's process ends, however it
ends (and nothing while it lives). ``/healthz`` (``guardian``) and ``hasync_guardian`` tell whether it runs;
one that dies is started again.

What is not covered: a frozen whole host (a paused virtual machine: the kernel's clock stops too); kill -9
of the agent and its guardian together is bounded by the lifetime only; another host that answers for
the same address is not detected.

**Broker loss.** An address is fenced by default: a broker loss is a demotion like any other. One with
``on_broker_loss: kept`` stays through it (``demoted(keep=True)``) until ``hasync.kept`` decides that it must
go (``demoted()`` again); re-elected meanwhile, the node adds only the addresses it let go of and announces
them all again.

The kernel is reached through two seams: ``Netlink`` (``PyRoute2Netlink``; pyroute2 is imported only
when a floating IP is configured) and ``Announcer`` (``RawAnnouncer``: frames built here, sent on an
``AF_PACKET`` socket, which needs ``CAP_NET_RAW``); the guardian is started only with the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import logging
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .aio import wait_or
from .config import ADDRESS_LIFETIME_LAG, BrokerLoss, VipAddress
from .metrics import Metrics

if TYPE_CHECKING:
    from pyroute2 import AsyncIPRoute

logger = logging.getLogger(__name__)
R = TypeVar("R")

ANNOUNCE_COUNT = 3
ANNOUNCE_INTERVAL = 0.6  # s
NETLINK_TIMEOUT = 2.0  # s one netlink request may take (the kernel answers in a millisecond)
RECHECK_INTERVAL = 10.0  # s between checks while a fault stands
REMOVE_RETRY = 1.0  # s between attempts to remove an address that would not go
IFA_F_NODAD = 0x02  # linux/if_addr.h
TOPUP_EARLY = 0.05  # s: a top-up aims its lifetime's end this much before the latest safe one (loop lateness)
TOPUP_GAIN = 0.1  # s a top-up must add to the lifetime's end to be worth a netlink call


class VipErrorKind(enum.StrEnum):
    """What went wrong (the ``error`` label of ``hasync_vip_errors_total``)."""

    NO_INTERFACE = "no_interface"
    PERMISSION = "permission"
    EXISTS = "exists"
    TIMEOUT = "timeout"
    LATE = "late"  # no lifetime of a whole second would end before another node may hold the address
    OTHER = "other"


class Operation(enum.StrEnum):
    ADD = "add"
    REFRESH = "refresh"
    REMOVE = "remove"
    CHECK = "check"
    ANNOUNCE = "announce"


class VipError(Exception):
    """A netlink or packet operation failed; ``kind`` says how, the message says it for a human."""

    def __init__(self, kind: VipErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _kind(code: int | None) -> VipErrorKind:
    if code in (errno.EPERM, errno.EACCES):
        return VipErrorKind.PERMISSION
    if code in (errno.ENODEV, errno.ENXIO):
        return VipErrorKind.NO_INTERFACE
    if code == errno.EEXIST:
        return VipErrorKind.EXISTS
    return VipErrorKind.OTHER


_HINTS = {
    VipErrorKind.PERMISSION: " (the agent needs CAP_NET_ADMIN and CAP_NET_RAW: see the README's vip section)",
    VipErrorKind.NO_INTERFACE: "",
}


# ---- the seams ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lifetime:
    """A fenced address's lifetime: the kernel must have removed it by ``gone_by`` (the agent's monotonic clock)
    unless it is refreshed meanwhile."""

    gone_by: float

    def seconds(self, now: float) -> int:
        """``valid_lft`` (and ``preferred_lft``: never deprecated) for a request the kernel handles at ``now``:
        whole seconds, ended by ``gone_by`` even if the kernel is ``ADDRESS_LIFETIME_LAG`` late; ``VipError``
        (``LATE``) if not even one second is."""
        seconds = math.floor(self.gone_by - ADDRESS_LIFETIME_LAG - now)
        if seconds < 1:
            raise VipError(VipErrorKind.LATE, f"no lifetime of a whole second ends {ADDRESS_LIFETIME_LAG:g} s before "
                                              f"another node may hold the address (in {self.gone_by - now:.2f} s)")
        return seconds


class Netlink(Protocol):
    async def add(self, vip: VipAddress, lifetime: Lifetime | None = None) -> int | None:
        """Put the address on its interface, for ``lifetime`` (None: permanent); the seconds given, if any.
        ``VipError`` (``EXISTS`` if it is there already, ``LATE`` from ``lifetime``)."""

    async def refresh(self, vip: VipAddress, lifetime: Lifetime) -> int:
        """Start the address's lifetime again, adding it again if it has lapsed; the seconds given. ``VipError``."""

    async def remove(self, vip: VipAddress) -> bool:
        """Take it off; False if it was not there. ``VipError`` otherwise."""


class Announcer(Protocol):
    def announce(self, vip: VipAddress) -> None:
        """Send one gratuitous ARP (IPv4) or unsolicited neighbour advertisement (IPv6); ``VipError``."""


_DOING = {"add": "adding", "replace": "refreshing", "del": "removing"}


class PyRoute2Netlink:
    """``Netlink`` over pyroute2's ``AsyncIPRoute`` (its synchronous ``IPRoute`` runs an event loop of its own,
    which cannot run inside the agent's). One socket per request, subscribed to nothing: a long-lived
    rtnetlink socket would queue every address and link change on the host. ``clock``: the agent's, for
    lifetimes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Imported here, at the agent's start, not by the first request: on a busy small host the import alone
        # can take longer than NETLINK_TIMEOUT. It sets its logger's level; pyroute2 logs every netlink message
        # at DEBUG, which at the agent's DEBUG level would drown its own log.
        import pyroute2  # noqa: F401

        logging.getLogger("pyroute2").setLevel(logging.WARNING)

    async def add(self, vip: VipAddress, lifetime: Lifetime | None = None) -> int | None:
        return await self._call(vip, "add", lifetime)

    async def refresh(self, vip: VipAddress, lifetime: Lifetime) -> int:
        seconds = await self._call(vip, "replace", lifetime)
        assert seconds is not None
        return seconds

    async def remove(self, vip: VipAddress) -> bool:
        try:
            await self._call(vip, "del", None)
        except VipError as exc:
            if getattr(exc.__cause__, "code", None) == errno.EADDRNOTAVAIL:
                return False
            raise
        return True

    async def _call(self, vip: VipAddress, command: str, lifetime: Lifetime | None) -> int | None:
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        extra: dict[str, Any] = {}
        if command != "del":
            if vip.ip.version == 6:
                extra["flags"] = IFA_F_NODAD
            if vip.label is not None:
                extra["label"] = vip.label
        seconds = None
        try:
            ipr: AsyncIPRoute
            async with AsyncIPRoute(groups=0) as ipr:
                found = await ipr.link_lookup(ifname=vip.interface)
                if not found:
                    raise VipError(VipErrorKind.NO_INTERFACE, f"no interface {vip.interface}")
                if lifetime is not None:
                    # Now, not before the lookup: the kernel starts the lifetime when it takes the request, which
                    # pyroute2 sends before its first await.
                    seconds = lifetime.seconds(self._clock())
                    extra.update(valid_lft=seconds, preferred_lft=seconds)
                await ipr.addr(command, index=found[0], address=str(vip.ip), prefixlen=vip.prefixlen, **extra)
        except NetlinkError as exc:
            kind = _kind(exc.code)
            raise VipError(kind, f"{_DOING[command]} {vip.address} on {vip.interface}: "
                                 f"{exc.args[1] if len(exc.args) > 1 else exc}{_HINTS.get(kind, '')}") from exc
        except OSError as exc:
            raise VipError(_kind(exc.errno), f"netlink: {exc.strerror or exc}") from exc
        return seconds


# ---- announcements: the frames (pure) and the raw socket -------------------------------------------------

BROADCAST = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
ETH_P_ARP, ETH_P_IPV6 = 0x0806, 0x86DD
ICMPV6, NEIGHBOR_ADVERTISEMENT, OVERRIDE = 58, 136, 0x20
MIN_FRAME = 60  # Ethernet's minimum without the FCS


def garp_frame(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request (RFC 5227, "ARP Announcement"), broadcast: sender and target are both ``ip``.
    A request rather than a reply: every host takes a request, some ignore unsolicited replies."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip.packed, b"\0" * 6, ip.packed)
    return (BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp).ljust(MIN_FRAME, b"\0")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def unsolicited_na_frame(mac: bytes, ip: ipaddress.IPv6Address) -> bytes:
    """An unsolicited neighbour advertisement (RFC 4861 7.2.6) to all nodes: override set, solicited not,
    the target's link-layer address as option; from ``ip`` itself, hop limit 255."""
    option = struct.pack("!BB6s", 2, 1, mac)
    body = struct.pack("!BBHB3x16s", NEIGHBOR_ADVERTISEMENT, 0, 0, OVERRIDE, ip.packed) + option
    pseudo = ip.packed + ALL_NODES.packed + struct.pack("!I3xB", len(body), ICMPV6)
    body = body[:2] + struct.pack("!H", _checksum(pseudo + body)) + body[4:]
    header = struct.pack("!IHBB16s16s", 6 << 28, len(body), ICMPV6, 255, ip.packed, ALL_NODES.packed)
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + header + body


def frame(mac: bytes, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return garp_frame(mac, ip) if isinstance(ip, ipaddress.IPv4Address) else unsolicited_na_frame(mac, ip)


class RawAnnouncer:
    """``Announcer`` on an ``AF_PACKET`` socket (``CAP_NET_RAW``), opened per announcement: the frame is
    complete, so neither the address's state nor the routing table matters, and no binary is needed."""

    def announce(self, vip: VipAddress) -> None:
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.setblocking(False)
                sock.bind((vip.interface, 0))
                mac = sock.getsockname()[4]
                sock.send(frame(mac, vip.ip))
        except OSError as exc:
            kind = _kind(exc.errno)
            raise VipError(kind, f"announcing {vip.address} on {vip.interface}: {exc.strerror or exc}"
                                 f"{_HINTS.get(kind, '')}") from exc


# ---- the driver ----------------------------------------------------------------------------------------


async def _bounded(call: Awaitable[R]) -> R:
    """A netlink request, given up after ``NETLINK_TIMEOUT`` (a seam that hangs must not hold the role)."""
    try:
        async with asyncio.timeout(NETLINK_TIMEOUT):
            return await call
    except TimeoutError:
        raise VipError(VipErrorKind.TIMEOUT, f"netlink did not answer within {NETLINK_TIMEOUT:g} s") from None


class FloatingIps:
    """Holds ``addresses`` while this node is primary. ``run`` is the agent's ``vip`` task; ``promoted`` and
    ``demoted`` are called by the role effects, from the event loop."""

    def __init__(self, addresses: Sequence[VipAddress], metrics: Metrics, *, netlink: Netlink,
                 announcer: Announcer, clock: Callable[[], float], takeover_gap: float,
                 on_fault: Callable[[], None] = lambda: None) -> None:
        """``takeover_gap``: how long after this node's acting deadline another node may hold the addresses at
        the earliest (``AgentConfig.takeover_after - renew_deadline``)."""
        self.addresses = list(addresses)
        self._takeover_gap = takeover_gap
        self._deadline: float | None = None
        self._gone_by: float | None = None  # when the fenced addresses must be gone unless refreshed (extend)
        self._expires: dict[str, float] = {}  # when each fenced address's lifetime ends, as last given
        self._refresh_due = False
        self._topup_at = math.inf  # when a refresh would end the fenced addresses' lifetimes later (none came back)
        self._lapses = 0
        self._netlink = netlink
        self._announcer = announcer
        self._metrics = metrics
        self._clock = clock
        self._on_fault = on_fault
        self._want = False
        self._keep = False  # not primary, but the kept addresses stay (a broker outage: hasync.kept)
        self._tenure = 0  # promotions so far; _added_for is the one whose addresses were added
        self._added_for = 0
        self._held: dict[str, VipAddress] = {}
        self._announce_left = 0
        self._next_announce = float("inf")
        self._next_retry = 0.0
        self._fault: str | None = None
        self._next_check = float("inf")
        self._announced = 0
        self._stale_removed = 0
        self._warned: set[tuple[Operation, VipErrorKind]] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        for vip in self.addresses:
            metrics.vip_held.labels(vip.address).set(0)

    # ---- from the role effects ----------------------------------------------------------------------

    def promoted(self) -> None:
        self._want, self._keep = True, False
        self._tenure += 1
        self._wake.set()

    def demoted(self, *, keep: bool = False) -> None:
        """Remove the addresses; ``keep``: all but those kept through a broker outage."""
        self._want, self._keep = False, keep
        self._announce_left = 0
        self._wake.set()

    def extend(self, deadline: float) -> None:
        """This node's acting deadline while primary. When the election extends it (the promotion, a renewal
        that came back), the fenced addresses get a lifetime that ends before another node may hold them."""
        if self._deadline == deadline:
            return
        self._deadline = deadline
        self._gone_by = deadline + self._takeover_gap
        self._refresh_due = True
        self._wake.set()

    @property
    def fault(self) -> str | None:
        """Why this node may not hold the addresses now (it is then not eligible), or None."""
        return self._fault

    @property
    def held(self) -> list[str]:
        return sorted(self._held)

    def status(self) -> dict[str, Any]:
        return {
            "addresses": [f"{vip.address} on {vip.interface}" for vip in self.addresses],
            "held": self.held,
            "fault": self._fault,
            "announcements": self._announced,
            "stale_removed": self._stale_removed,
            "lapses": self._lapses,
        }

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def check(self) -> None:
        """Remove every configured address that is on its interface (left by a previous run), and find out
        whether the interfaces exist and this process may change them. Only while not holding them."""
        async with self._lock:
            if self._want or self._held:
                return
            problems: list[str] = []
            for vip in self.addresses:
                try:
                    removed = await _bounded(self._netlink.remove(vip))
                except VipError as exc:
                    self._failed(Operation.CHECK, exc)
                    problems.append(str(exc))
                    continue
                if removed:
                    self._stale_removed += 1
                    self._metrics.vip_stale_removed.inc()
                    logger.warning("floating IP: removed %s from %s, left there by an earlier run", vip.address,
                                   vip.interface)
            self._set_fault("; ".join(problems) or None)

    async def release(self) -> None:
        """Stop holding the addresses now (before a graceful release is published, and on the way out)."""
        self.demoted()
        async with self._lock:
            await self._remove_unwanted()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self._reconcile()
            now = self._clock()
            due = [self._next_check if not self._want and not self._held else float("inf"),
                   self._next_announce if self._want and self._announce_left else float("inf"),
                   self._next_retry if self._unwanted() else float("inf"),
                   self._topup_at if self._want else float("inf")]
            await wait_or(self._wake, max(0.001, min(due) - now))  # (at least a millisecond: float rounding)

    async def _reconcile(self) -> None:
        if not self._want:
            if self._unwanted() and self._clock() >= self._next_retry:
                async with self._lock:
                    await self._remove_unwanted()
            elif not self._held and self._fault is not None and self._clock() >= self._next_check:
                await self.check()
            return
        if self._clock() >= self._topup_at:
            self._topup_at, self._refresh_due = math.inf, True
        if self._added_for != self._tenure or self._refresh_due:
            async with self._lock:
                await self._hold_all()
                self._topup_at = self._next_topup()
        if self._want and self._announce_left and self._clock() >= self._next_announce:
            self._announce()

    # ---- the work -----------------------------------------------------------------------------------

    def _lifetime(self, vip: VipAddress) -> Lifetime | None:
        """None for a kept address (permanent), else the current one (already over before any ``extend``)."""
        if vip.on_broker_loss is BrokerLoss.KEPT:
            return None
        return Lifetime(self._gone_by if self._gone_by is not None else -math.inf)

    async def _hold_all(self) -> None:
        """Add what is not held yet (announcing them all again if anything was added), refresh the lifetimes of
        the fenced addresses that are."""
        self._added_for, self._refresh_due = self._tenure, False
        added = False
        for vip in self.addresses:
            if not self._want:
                return
            lifetime = self._lifetime(vip)
            if vip.address in self._held:
                if lifetime is not None and not await self._refresh(vip, lifetime):
                    return
                continue
            started = self._clock()
            try:
                seconds = await _bounded(self._netlink.add(vip, lifetime))
            except VipError as exc:
                if exc.kind is VipErrorKind.LATE:
                    self._failed(Operation.ADD, exc)  # not a fault: the next renewal that comes back adds it
                    continue
                self._failed(Operation.ADD, exc)
                if exc.kind in (VipErrorKind.TIMEOUT, VipErrorKind.OTHER):
                    self._held[vip.address] = vip  # it may have been added after all: remove it to be sure
                if exc.kind is not VipErrorKind.EXISTS:
                    self._set_fault(str(exc))  # the node hands over: demoted() then removes what was added
                    return
                seconds = None
            self._held[vip.address] = vip
            if seconds is not None:
                self._expires[vip.address] = started + seconds
            added = True
            self._metrics.vip_held.labels(vip.address).set(1)
            logger.info("floating IP: %s added on %s%s", vip.address, vip.interface,
                        f" for {seconds} s, renewed with the lease" if seconds is not None else "")
        if added:
            self._announce_left, self._next_announce = ANNOUNCE_COUNT, self._clock()

    def _next_topup(self) -> float:
        """When a refresh would end the fenced addresses' lifetimes later than those last given, if it would.

        A lifetime given at ``t`` ends at ``t + floor(gone_by - ADDRESS_LIFETIME_LAG - t)``: up to a second before
        the latest safe end. A refresh the moment a renewal comes back gets a second with the defaults, while the
        next renewal is due half a second later; when none comes (a broker cut, a slow broker), the same
        ``gone_by`` allows a lifetime that ends later, given at the last moment it still gets as many whole
        seconds. (A frozen agent gives none: its address goes a lifetime after its last refresh.)"""
        given = [self._expires[address] for address in self._held if address in self._expires]
        if self._gone_by is None or not given:
            return math.inf
        best = self._gone_by - ADDRESS_LIFETIME_LAG - TOPUP_EARLY
        whole = math.floor(best - self._clock())
        return best - whole if best > min(given) + TOPUP_GAIN and whole >= 1 else math.inf

    async def _refresh(self, vip: VipAddress, lifetime: Lifetime) -> bool:
        """A new lifetime for a fenced address held, unless it would end no later than the one it has; False if
        that failed in a way that makes the node unfit."""
        started = self._clock()
        with contextlib.suppress(VipError):  # (too late: the seam says so below)
            if started + lifetime.seconds(started) <= self._expires.get(vip.address, -math.inf):
                return True
        if started >= self._expires.get(vip.address, math.inf):
            self._lapses += 1
            self._metrics.vip_lapses.inc()
            logger.log(logging.WARNING if self._lapses == 1 else logging.DEBUG,
                       "floating IP: the lifetime of %s ended %.2f s ago while this node was primary (no renewal came "
                       "back in time); adding it again", vip.address, started - self._expires[vip.address])
        try:
            seconds = await _bounded(self._netlink.refresh(vip, lifetime))
        except VipError as exc:
            self._failed(Operation.REFRESH, exc)
            if exc.kind is VipErrorKind.LATE:
                return True  # it lapses; the next renewal that comes back in time adds it again
            self._set_fault(str(exc))  # like a failed add: the node hands over
            return False
        self._expires[vip.address] = started + seconds
        self._metrics.vip_refreshes.inc()
        return True

    def _wanted(self, vip: VipAddress) -> bool:
        return self._want or (self._keep and vip.on_broker_loss is BrokerLoss.KEPT)

    def _unwanted(self) -> list[VipAddress]:
        return [vip for vip in self._held.values() if not self._wanted(vip)]

    async def _remove_unwanted(self) -> None:
        for vip in self._unwanted():
            key = vip.address
            try:
                removed = await _bounded(self._netlink.remove(vip))
            except VipError as exc:
                self._failed(Operation.REMOVE, exc)
                if exc.kind is not VipErrorKind.NO_INTERFACE:  # (the address went with its interface)
                    self._next_retry = self._clock() + REMOVE_RETRY
                    continue
                removed = False
            del self._held[key]
            self._expires.pop(key, None)
            self._metrics.vip_held.labels(vip.address).set(0)
            logger.info("floating IP: %s %s from %s", vip.address, "removed" if removed else "already gone",
                        vip.interface)

    def _announce(self) -> None:
        for vip in self._held.values():
            try:
                self._announcer.announce(vip)
            except VipError as exc:
                self._failed(Operation.ANNOUNCE, exc)
                continue
            self._announced += 1
            self._metrics.vip_announcements.inc()
        self._announce_left -= 1
        self._next_announce = self._clock() + ANNOUNCE_INTERVAL

    def _failed(self, operation: Operation, exc: VipError) -> None:
        """One line per failure: WARNING the first time for its operation and kind, DEBUG after."""
        self._metrics.vip_errors.labels(operation.value, exc.kind.value).inc()
        key = (operation, exc.kind)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)  # (bounded: operations x kinds)
        logger.log(level, "floating IP: %s failed: %s", operation.value, exc)

    def _set_fault(self, detail: str | None) -> None:
        self._next_check = self._clock() + RECHECK_INTERVAL if detail is not None else float("inf")
        if detail == self._fault:
            return
        was, self._fault = self._fault, detail
        self._metrics.vip_fault.set(0 if detail is None else 1)
        if detail is not None:
            logger.warning("floating IP: this node is not eligible while it cannot hold its addresses (checked "
                           "again every %.0f s)", RECHECK_INTERVAL)
        elif was is not None:
            logger.warning("floating IP: the interfaces can be managed again; this node is eligible")
        self._on_fault()
