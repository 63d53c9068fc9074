"""A one-question DNS client for the namespace tests: ``python -m harness.dnsclient SERVER NAME`` prints the first
A record of NAME that SERVER answers with, or nothing (exit status 1) if no answer came within the timeout. The
query and the reading of the answer are the agent's own (hasync.health, whose parser is fuzzed)."""

from __future__ import annotations

import secrets
import socket
import sys

from hasync.health import DnsError, dns_query, parse_dns_answer

TIMEOUT = 0.5  # s


def query(server: str, name: str, timeout: float = TIMEOUT) -> str | None:
    ident = secrets.randbelow(65536)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(dns_query(ident, name, "A"), (server, 53))
        try:
            reply = sock.recv(4096)
        except TimeoutError:
            return None
    try:
        found = parse_dns_answer(reply, ident, "A")
    except DnsError:
        return None
    return found[0] if found else None


if __name__ == "__main__":
    answer = query(sys.argv[1], sys.argv[2])
    if answer is None:
        sys.exit(1)
    print(answer)
