"""The home's client: ``python -m harness.homeprobe --http HOST:PORT [--http [IPV6]:PORT] [--dns SERVER NAME]
[--dhcp IFACE]``, run in the client's network namespace, asks continuously and prints one JSON line per answer
(or failure) on stdout::

    {"probe": "http", "start": 1234.5, "end": 1234.51, "ok": true, "who": "n1", "servers": [], "error": null}

``start`` and ``end`` are ``time.monotonic()`` (one clock for every process on the machine, whatever
their namespace); ``who`` is what identifies the node that answered: the body of the HA stand-in's answer
(its node's name), the address a DNS server gives for a name it answers with its own address, a DHCP server's
identifier. ``servers``: every DHCP server that offered an address to that attempt's DISCOVER.

A probe is anything with a ``name``, an ``interval`` and a blocking ``ask()`` that returns an ``Answer``
or raises ``OSError`` (a failure, its text recorded). Each probe is asked on its own schedule; every
attempt runs on a thread of its own, so an attempt that hangs until its timeout does not delay the next
one and the schedule's resolution holds during an outage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from hasync.health import DnsError, dns_query, parse_dns_answer

from . import dhcpclient

MAX_IN_FLIGHT = 64  # attempts waiting for their timeout at once; more are skipped, and counted as failures


@dataclass(frozen=True)
class Answer:
    who: str | None  # the node that answered, if the answer says
    servers: tuple[str, ...] = ()  # DHCP: every server that offered


class Probe(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def interval(self) -> float: ...

    def ask(self) -> Answer:
        """One attempt; raises OSError (or http.client.HTTPException) on failure."""
        ...


@dataclass(frozen=True)
class HttpProbe:
    """GET ``/`` on a new connection each time (as a browser or the phone app after a change of network):
    the answer's body is the node's name (harness.standin_ha)."""

    host: str
    port: int
    interval: float = 0.025
    timeout: float = 0.5
    name: str = "http"

    def ask(self) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode(errors="replace").strip()
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
            return Answer(body or None)
        finally:
            conn.close()


@dataclass(frozen=True)
class DnsProbe:
    """An A query for ``query`` to ``server`` (UDP, no retry): the answer's first address is ``who``."""

    server: str
    query: str
    interval: float = 0.05
    timeout: float = 0.5
    name: str = "dns"
    port: int = 53

    def ask(self) -> Answer:
        ident = int.from_bytes(os.urandom(2), "big")
        with socket.socket(socket.AF_INET6 if ":" in self.server else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect((self.server, self.port))  # connected: an ICMP port unreachable fails the attempt at once
            sock.send(dns_query(ident, self.query, "A"))
            data = sock.recv(4096)  # a socket of its own: nothing but the answer to this question comes here
        try:
            found = parse_dns_answer(data, ident, "A")
        except DnsError as exc:
            raise OSError(str(exc)) from None
        if not found:
            raise OSError(f"no A record for {self.query}")
        return Answer(found[0])


@dataclass(frozen=True)
class DhcpProbe:
    """A DHCP exchange on ``interface`` (harness.dhcpclient: DISCOVER, REQUEST, ACK) from one client MAC, as one
    client booting again and again would: ``who`` is the server that acknowledged, ``servers`` all that offered."""

    interface: str
    mac: bytes
    interval: float = 0.1
    window: float = 0.2
    timeout: float = 1.0
    name: str = "dhcp"

    def ask(self) -> Answer:
        done = dhcpclient.exchange(self.interface, self.mac, window=self.window, timeout=self.timeout)
        if done.acked_by is None:
            raise _Failed(done.error or "no DHCPACK", done.offers)
        return Answer(done.acked_by, done.offers)


class _Failed(OSError):
    """A failed attempt that still saw something (the offers of a DHCP exchange that was not acknowledged)."""

    def __init__(self, message: str, servers: tuple[str, ...]) -> None:
        super().__init__(message)
        self.servers = servers


class Recorder:
    """Writes each attempt as one JSON line, from whichever thread finished it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def record(self, probe: Probe, start: float, answer: Answer | None, error: str | None,
               servers: tuple[str, ...] = ()) -> None:
        line = json.dumps({"probe": probe.name, "start": start, "end": time.monotonic(), "ok": answer is not None,
                           "who": answer.who if answer else None,
                           "servers": list(answer.servers if answer else servers), "error": error})
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def attempt(probe: Probe, recorder: Recorder) -> None:
    start = time.monotonic()
    try:
        answer = probe.ask()
    except (OSError, http.client.HTTPException) as exc:
        recorder.record(probe, start, None, f"{type(exc).__name__}: {exc}", getattr(exc, "servers", ()))
    except Exception as exc:  # a bug of the probe's own: recorded as a failure, never a silent missing attempt
        recorder.record(probe, start, None, f"probe error {type(exc).__name__}: {exc}")
    else:
        recorder.record(probe, start, answer, None)


def schedule(probe: Probe, pool: concurrent.futures.ThreadPoolExecutor, recorder: Recorder,
             stop: threading.Event) -> None:
    """Start an attempt every ``probe.interval`` (on the clock, not after the previous one) until ``stop``."""
    in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)
    due = time.monotonic()
    while not stop.is_set():
        if in_flight.acquire(blocking=False):
            future = pool.submit(attempt, probe, recorder)
            future.add_done_callback(lambda _f: in_flight.release())
        else:
            recorder.record(probe, time.monotonic(), None, "skipped: too many attempts in flight")
        due += probe.interval
        stop.wait(max(0.0, due - time.monotonic()))


def run(probes: list[Probe]) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    recorder = Recorder()
    with concurrent.futures.ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT * len(probes)) as pool:
        threads = [threading.Thread(target=schedule, args=(p, pool, recorder, stop), name=f"probe-{p.name}")
                   for p in probes]
        for thread in threads:
            thread.start()
        print(json.dumps({"ready": True}), flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            stop.set()
        for thread in threads:
            thread.join()


def probes(http: list[str], interval: float, timeout: float, dns: list[str] | None,
           dhcp: str | None) -> list[Probe]:
    """The probes of the command line: ``http`` ``HOST:PORT`` or ``[IPV6]:PORT`` (named http, http6)."""
    found: list[Probe] = []
    for target in http:
        host, _, port = target.rpartition(":")
        six = host.startswith("[")
        found.append(HttpProbe(host.strip("[]"), int(port), interval, timeout, name="http6" if six else "http"))
    if dns:
        found.append(DnsProbe(dns[0], dns[1]))
    if dhcp:
        found.append(DhcpProbe(dhcp, dhcpclient.random_mac()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", action="append", required=True, metavar="HOST:PORT",
                        help="the floating IP's HA ([address]:port for IPv6); twice for both families")
    parser.add_argument("--interval", type=float, default=0.025, help="s between HTTP requests")
    parser.add_argument("--timeout", type=float, default=0.5, help="s an HTTP request may take")
    parser.add_argument("--dns", nargs=2, metavar=("SERVER", "NAME"), help="ask SERVER for NAME's A record")
    parser.add_argument("--dhcp", metavar="IFACE", help="DHCP exchanges on IFACE")
    args = parser.parse_args()
    run(probes(args.http, args.interval, args.timeout, args.dns, args.dhcp))


if __name__ == "__main__":
    main()
