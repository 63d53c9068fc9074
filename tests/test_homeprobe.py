"""The home's client (harness.homeprobe) and its DHCP prober (harness.dhcpclient): what they send and how they
read answers, without a network namespace (the exchanges themselves run in tests/test_home_e2e.py)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import dhcpclient
from harness.homeprobe import DhcpProbe, DnsProbe, HttpProbe, probes
from hasync.health import dns_query

MAC = bytes.fromhex("020000000001")


def reply(kind: int, xid: int, server: str = "10.0.0.10", offered: str = "10.0.0.100",
          extra: bytes = b"") -> bytes:
    """A BOOTREPLY as dnsmasq sends it."""
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 2, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4,
                       socket.inet_aton(offered), b"\0" * 4, b"\0" * 4, MAC, b"", b"")
    options = bytes([53, 1, kind, 54, 4]) + socket.inet_aton(server) + extra + b"\xff"
    return head + dhcpclient.MAGIC + options


def test_a_request_is_a_broadcast_bootrequest_with_its_type_and_options() -> None:
    sent = dhcpclient.packet(dhcpclient.REQUEST, 0x01020304, MAC, {50: socket.inet_aton("10.0.0.100")})
    assert sent[0] == 1 and sent[4:8] == b"\x01\x02\x03\x04" and sent[10:12] == b"\x80\x00"
    assert sent[28:34] == MAC and sent[236:240] == dhcpclient.MAGIC
    assert sent[240:] == bytes([53, 1, 3, 50, 4, 10, 0, 0, 100, 255])


def test_an_offer_and_an_ack_are_read_with_their_server_and_address() -> None:
    assert dhcpclient.parse(reply(dhcpclient.OFFER, 7), 7) == dhcpclient.Reply(dhcpclient.OFFER, "10.0.0.10",
                                                                                 "10.0.0.100")
    padded = reply(dhcpclient.ACK, 7, extra=b"\0\0" + bytes([51, 4, 0, 0, 0, 120]))
    assert dhcpclient.parse(padded, 7) == dhcpclient.Reply(dhcpclient.ACK, "10.0.0.10", "10.0.0.100")


@pytest.mark.parametrize("data", [
    reply(dhcpclient.OFFER, 8),  # another transaction
    b"\x01" + reply(dhcpclient.OFFER, 7)[1:],  # a request, not a reply
    reply(dhcpclient.OFFER, 7)[:239],  # too short for the magic cookie
    reply(dhcpclient.OFFER, 7)[:-6],  # the server identifier cut off
    reply(dhcpclient.OFFER, 7)[:-3],  # the server identifier cut short
    reply(dhcpclient.OFFER, 7)[:240] + b"\xff",  # no message type
])
def test_anything_else_is_none(data: bytes) -> None:
    assert dhcpclient.parse(data, 7) is None


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400), st.binary(max_size=80))
def test_parse_never_raises_on_what_the_network_sends(noise: bytes, options: bytes) -> None:
    dhcpclient.parse(noise, 7)
    parsed = dhcpclient.parse(reply(dhcpclient.OFFER, 7)[:240] + options, 7)
    assert parsed is None or parsed.kind in range(256)


def test_the_command_line_makes_one_probe_of_each_kind() -> None:
    made = probes(["10.0.0.50:8123", "[fd00::50]:8123"], 0.025, 0.5, ["10.0.0.50", "whoami.test"], "eth0")
    assert [p.name for p in made] == ["http", "http6", "dns", "dhcp"]
    assert made[1] == HttpProbe("fd00::50", 8123, 0.025, 0.5, name="http6")
    assert made[2] == DnsProbe("10.0.0.50", "whoami.test")
    assert isinstance(made[3], DhcpProbe) and made[3].interface == "eth0" and made[3].mac[0] & 0x03 == 0x02


@pytest.fixture
def dns_server() -> Iterator[tuple[int, list[bytes]]]:
    """A UDP server on loopback that answers each question with ``answers.pop(0)`` built for its id."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    answers: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                question, peer = sock.recvfrom(512)
            except TimeoutError:
                continue
            if answers:
                sock.sendto(question[:2] + answers.pop(0), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()[1], answers
    stop.set()
    thread.join(5)
    sock.close()


def test_the_dns_probe_names_the_address_answered_and_fails_on_an_error(dns_server: tuple[int, list[bytes]]) -> None:
    port, answers = dns_server
    question = dns_query(0, "whoami.test", "A")[12:]
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + socket.inet_aton("10.0.0.11")
    answers.append(struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + record)
    answers.append(struct.pack("!HHHHH", 0x8183, 1, 0, 0, 0) + question)  # NXDOMAIN
    probe = DnsProbe("127.0.0.1", "whoami.test", port=port)
    assert probe.ask().who == "10.0.0.11"
    with pytest.raises(OSError, match="NXDOMAIN"):
        probe.ask()
    with pytest.raises(OSError):  # nobody answers: the timeout
        DnsProbe("127.0.0.1", "whoami.test", port=port, timeout=0.2).ask()
