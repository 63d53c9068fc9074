"""A DHCP prober for the namespace tests.

``exchange(interface, mac)`` is what a DHCP client does at boot, bounded: one DHCPDISCOVER (with the broadcast flag,
so that every answer comes back to 255.255.255.255 and a plain UDP socket gets it), a DHCPREQUEST for the first
offer, its DHCPACK (or DHCPNAK); and, unlike a client, it keeps listening until ``window`` has passed since the
DISCOVER to record every server that offered, so that two DHCP servers on the LAN show (a DHCP client such as
busybox udhcpc takes the first offer and says nothing of the others). Nothing is configured: the address is only
asked for.

``python -m harness.dhcpclient IFACE`` broadcasts one DHCPDISCOVER and prints the server identifier of every
DHCPOFFER that arrives within the timeout, one a line.
"""

from __future__ import annotations

import secrets
import socket
import struct
import sys
import time
from dataclasses import dataclass

TIMEOUT = 1.0  # s to collect offers
MAGIC = b"\x63\x82\x53\x63"
DISCOVER, OFFER, REQUEST, ACK, NAK = 1, 2, 3, 5, 6
_HEADER = "!BBBBIHH4s4s4s4s16s64s128s"


def random_mac() -> bytes:
    mac = secrets.token_bytes(6)
    return bytes([mac[0] & 0xFE | 0x02]) + mac[1:]  # a locally administered unicast address


def packet(kind: int, xid: int, mac: bytes, options: dict[int, bytes] | None = None) -> bytes:
    """A BOOTREQUEST of DHCP message type ``kind`` from ``mac``, broadcast flag set, with ``options``."""
    head = struct.pack(_HEADER, 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4, mac, b"", b"")
    body = b"".join(bytes([code, len(value)]) + value for code, value in {53: bytes([kind]), **(options or {})}.items())
    return head + MAGIC + body + b"\xff"


@dataclass(frozen=True)
class Reply:
    kind: int  # DHCP message type (OFFER, ACK, NAK...)
    server: str  # the server identifier (option 54)
    address: str  # yiaddr: the address offered or acknowledged


def parse(data: bytes, xid: int) -> Reply | None:
    """A BOOTREPLY to transaction ``xid`` with a message type and a server identifier, or None for anything else
    (another transaction, not DHCP, malformed: the bytes come from the network, nothing here raises)."""
    if len(data) < 240 or data[0] != 2 or struct.unpack_from("!I", data, 4)[0] != xid or data[236:240] != MAGIC:
        return None
    kind, server, at = 0, "", 240
    while at < len(data) and data[at] != 255:
        if data[at] == 0:  # padding
            at += 1
            continue
        if at + 1 >= len(data):
            return None
        code, length = data[at], data[at + 1]
        value = data[at + 2:at + 2 + length]
        if len(value) != length:
            return None
        if code == 53 and length == 1:
            kind = value[0]
        elif code == 54 and length == 4:
            server = socket.inet_ntoa(value)
        at += 2 + length
    if not kind or not server:
        return None
    return Reply(kind, server, socket.inet_ntoa(data[16:20]))


@dataclass(frozen=True)
class Exchange:
    offers: tuple[str, ...]  # the servers that offered, in order of arrival
    acked_by: str | None  # the server whose DHCPACK came (None: no offer, a DHCPNAK, or no answer in time)
    error: str | None  # why not, when not


def _socket(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # Several probes may be in flight at once: each socket gets every broadcast answer and keeps its own.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", 68))
    except OSError:
        sock.close()
        raise
    return sock


def exchange(interface: str, mac: bytes, *, window: float = 0.2, timeout: float = 1.0) -> Exchange:
    """DISCOVER, REQUEST the first offer, wait for its ACK (at most ``timeout`` after the DISCOVER); every offer
    that arrives within ``window`` of the DISCOVER is recorded."""
    xid = secrets.randbits(32)
    offers: list[str] = []
    acked_by: str | None = None
    error: str | None = None
    requested: str | None = None
    with _socket(interface) as sock:
        start = time.monotonic()
        sock.sendto(packet(DISCOVER, xid, mac), ("255.255.255.255", 67))
        while True:
            now = time.monotonic()
            # Until the exchange is over (an ACK, a NAK, or the timeout), then until the window for offers ends.
            end = start + (window if acked_by is not None or error is not None else timeout)
            if now >= end:
                break
            sock.settimeout(end - now)
            try:
                reply = parse(sock.recv(2048), xid)
            except TimeoutError:
                break
            if reply is None:
                continue
            if reply.kind == OFFER:
                offers.append(reply.server)
                if requested is None:
                    requested = reply.server
                    sock.sendto(packet(REQUEST, xid, mac, {50: socket.inet_aton(reply.address),
                                                           54: socket.inet_aton(reply.server)}),
                                ("255.255.255.255", 67))
            elif reply.server == requested and reply.kind == ACK:
                acked_by = reply.server
            elif reply.server == requested and reply.kind == NAK:
                error = f"DHCPNAK from {reply.server}"
    if acked_by is None and error is None:
        error = "no DHCPACK" if offers else "no DHCPOFFER"
    return Exchange(tuple(offers), acked_by, error)


def discover(interface: str, timeout: float = TIMEOUT) -> list[str]:
    """The servers that offer an address to one DHCPDISCOVER (from a new random MAC) within ``timeout``."""
    xid = secrets.randbits(32)
    with _socket(interface) as sock:
        sock.sendto(packet(DISCOVER, xid, random_mac()), ("255.255.255.255", 67))
        servers: list[str] = []
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = parse(sock.recv(2048), xid)
            except TimeoutError:
                break
            if reply is not None and reply.kind == OFFER:
                servers.append(reply.server)
    return servers


if __name__ == "__main__":
    for server in discover(sys.argv[1]):
        print(server)
