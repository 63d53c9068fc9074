"""The home's client: ``python -m harness.homeprobe --http URL [--interval S]``, run in the client's
network namespace, asks continuously and prints one JSON line per answer (or failure) on stdout::

    {"probe": "http", "start": 1234.5, "end": 1234.51, "ok": true, "who": "n1", "error": null}

``start`` and ``end`` are ``time.monotonic()`` (one clock for every process on the machine, whatever
their namespace); ``who`` is the node that answered, when the answer says.

A probe is anything with a ``name``, an ``interval`` and a blocking ``ask()`` that returns an ``Answer``
or raises ``OSError`` (a failure, its text recorded). Each probe is asked on its own schedule; every
attempt runs on a thread of its own, so an attempt that hangs until its timeout does not delay the next
one and the schedule's resolution holds during an outage. The HTTP probe is the one built here; a DNS
query or a DHCP renewal (dnsmasq on the primary, issue 12) is another ``Probe`` whose answer names the
server that answered, added to ``probes()``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Protocol

MAX_IN_FLIGHT = 64  # attempts waiting for their timeout at once; more are skipped, and counted as failures


@dataclass(frozen=True)
class Answer:
    who: str | None  # the node that answered, if the answer says


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


class Recorder:
    """Writes each attempt as one JSON line, from whichever thread finished it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def record(self, probe: Probe, start: float, answer: Answer | None, error: str | None) -> None:
        line = json.dumps({"probe": probe.name, "start": start, "end": time.monotonic(), "ok": answer is not None,
                           "who": answer.who if answer else None, "error": error})
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


def attempt(probe: Probe, recorder: Recorder) -> None:
    start = time.monotonic()
    try:
        answer = probe.ask()
    except (OSError, http.client.HTTPException) as exc:
        recorder.record(probe, start, None, f"{type(exc).__name__}: {exc}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http", required=True, metavar="HOST:PORT", help="the floating IP's HA")
    parser.add_argument("--interval", type=float, default=0.025)
    parser.add_argument("--timeout", type=float, default=0.5)
    args = parser.parse_args()
    host, _, port = args.http.rpartition(":")
    run([HttpProbe(host, int(port), args.interval, args.timeout)])


if __name__ == "__main__":
    main()
