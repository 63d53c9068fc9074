"""A one-question DNS client for the namespace tests: ``python -m harness.dnsclient SERVER NAME`` prints the first
A record of NAME that SERVER answers with, or nothing (exit status 1) if no answer came within the timeout."""

from __future__ import annotations

import secrets
import socket
import struct
import sys

TIMEOUT = 0.5  # s


def query(server: str, name: str, timeout: float = TIMEOUT) -> str | None:
    ident = secrets.randbelow(65536)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            return None
    got, flags, _, answers = struct.unpack("!HHHH", reply[:8])
    if got != ident or flags & 0x000F or not answers:
        return None
    at = 12 + len(question) + 4
    for _ in range(answers):
        at += 2 if reply[at] & 0xC0 == 0xC0 else len(question)  # the name: a pointer to the question, here
        rtype, _, _, length = struct.unpack("!HHIH", reply[at:at + 10])
        at += 10
        if rtype == 1 and length == 4:
            return socket.inet_ntoa(reply[at:at + 4])
        at += length
    return None


if __name__ == "__main__":
    answer = query(sys.argv[1], sys.argv[2])
    if answer is None:
        sys.exit(1)
    print(answer)
