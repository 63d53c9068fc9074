"""A DHCP prober for the namespace tests: ``python -m harness.dhcpclient IFACE`` broadcasts one DHCPDISCOVER (with
the broadcast flag, so that offers come back to 255.255.255.255 and a plain UDP socket gets them) and prints the
server identifier of every DHCPOFFER that arrives within the timeout, one a line: how many DHCP servers answer
(a DHCP client such as busybox udhcpc takes the first offer and says nothing of the others)."""

from __future__ import annotations

import secrets
import socket
import struct
import sys
import time

TIMEOUT = 1.0  # s to collect offers
MAGIC = b"\x63\x82\x53\x63"


def discover(interface: str, timeout: float = TIMEOUT) -> list[str]:
    xid = secrets.randbits(32)
    mac = secrets.token_bytes(6)
    mac = bytes([mac[0] & 0xFE | 0x02]) + mac[1:]  # a locally administered unicast address
    packet = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                         b"\0" * 4, mac, b"", b"") + MAGIC + bytes([53, 1, 1, 255])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", 68))
        sock.sendto(packet, ("255.255.255.255", 67))
        servers: list[str] = []
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                reply = sock.recv(2048)
            except TimeoutError:
                break
            if len(reply) < 240 or struct.unpack("!I", reply[4:8])[0] != xid or reply[236:240] != MAGIC:
                continue
            options, at, kind, server = reply[240:], 0, 0, ""
            while at < len(options) and options[at] != 255:
                if options[at] == 0:
                    at += 1
                    continue
                code, length = options[at], options[at + 1]
                value = options[at + 2:at + 2 + length]
                if code == 53:
                    kind = value[0]
                elif code == 54:
                    server = socket.inet_ntoa(value)
                at += 2 + length
            if kind == 2 and server:  # DHCPOFFER
                servers.append(server)
    return servers


if __name__ == "__main__":
    for server in discover(sys.argv[1]):
        print(server)
