"""What the home's observers saw, reduced to figures: pure functions over timestamped records (no I/O).

The client's attempts (harness.homeprobe) give the outage: the time between two answers' arrivals during
which requests failed (attempts start on a fixed schedule, so the resolution is the probe's interval).
The address monitors give, per node, when it held the floating IP; two nodes' holding intervals
intersected are the two-holder time. The DHCP probe's attempts each say which servers offered an address:
runs of attempts that two servers answered are the two-DHCP-server time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    probe: str
    start: float
    end: float
    ok: bool
    who: str | None = None
    error: str | None = None
    servers: tuple[str, ...] = ()  # DHCP: every server that offered


@dataclass(frozen=True)
class Outage:
    """Requests failed between the arrival of one answer (``start``) and the next (``end``, None if none
    came); ``failed`` attempts started in between."""

    start: float
    end: float | None
    failed: int

    def seconds(self, window_end: float) -> float:
        return (self.end if self.end is not None else window_end) - self.start


def outages(attempts: Iterable[Attempt], t0: float, t1: float, probe: str = "http") -> list[Outage]:
    """The gaps between two answers' arrivals during which a request failed: a failed attempt started after
    one answer arrived and before the next (gaps that end before ``t0`` or start after ``t1`` left out).
    Measured on arrivals, an attempt started during the outage that hangs until the address comes back
    ends the outage when its answer arrives, not when it started."""
    mine = [a for a in attempts if a.probe == probe]
    arrivals = sorted(a.end for a in mine if a.ok)
    failures = sorted(a.start for a in mine if not a.ok)
    found: list[Outage] = []
    bounds: list[float | None] = [*arrivals, None]
    previous: float | None = None
    i = 0
    for arrival in bounds:
        lo = previous if previous is not None else float("-inf")
        hi = arrival if arrival is not None else float("inf")
        failed = 0
        while i < len(failures) and failures[i] < hi:
            failed += failures[i] >= lo
            i += 1
        if failed and previous is not None and hi >= t0 and lo <= t1:
            found.append(Outage(previous, arrival, failed))
        previous = arrival
    return found


def longest_outage(attempts: Iterable[Attempt], t0: float, t1: float, probe: str = "http") -> float:
    """Seconds of the longest failure run started in [t0, t1] (an unfinished one counts to t1); 0 if none."""
    return max((o.seconds(t1) for o in outages(attempts, t0, t1, probe)), default=0.0)


def answered_by(attempts: Iterable[Attempt], who: str, after: float, probe: str = "http") -> float | None:
    """When the first answer from ``who`` arrived after ``after`` (its attempt may have started before)."""
    ends = [a.end for a in attempts if a.probe == probe and a.ok and a.who == who and a.end >= after]
    return min(ends, default=None)


def both_answered(attempts: Iterable[Attempt], old: str, new: str, t0: float, t1: float, *,
                  probe: str = "http") -> float:
    """Seconds from the first answer of ``new`` to the last answer of ``old`` after it, within [t0, t1]:
    how long the client got answers from both nodes (0 if the old one never answered after the new)."""
    inside = [a for a in attempts if a.probe == probe and a.ok and t0 <= a.start <= t1]
    first_new = min((a.start for a in inside if a.who == new), default=None)
    if first_new is None:
        return 0.0
    last_old = max((a.start for a in inside if a.who == old and a.start > first_new), default=None)
    return 0.0 if last_old is None else last_old - first_new


Interval = tuple[float, float]


def held(changes: Sequence[tuple[float, bool]], t0: float, t1: float) -> list[Interval]:
    """The intervals within [t0, t1] during which a node held the address, from its changes ``(t, held)``
    in time order (the first one is its state when observation began)."""
    found: list[Interval] = []
    since: float | None = None
    for t, on in changes:
        if on and since is None:
            since = t
        elif not on and since is not None:
            found.append((since, t))
            since = None
    if since is not None:
        found.append((since, t1))
    return [(max(a, t0), min(b, t1)) for a, b in found if min(b, t1) > max(a, t0)]


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    return [(max(x0, y0), min(x1, y1)) for x0, x1 in a for y0, y1 in b if min(x1, y1) > max(x0, y0)]


def two_holders(first: Sequence[tuple[float, bool]], second: Sequence[tuple[float, bool]], t0: float,
                t1: float) -> float:
    """Seconds within [t0, t1] during which both nodes held the address."""
    return sum(b - a for a, b in intersect(held(first, t0, t1), held(second, t0, t1)))


@dataclass(frozen=True)
class Doubles:
    """Attempts answered by two servers or more: how many, and the seconds their runs spanned."""

    count: int
    seconds: float


def two_servers(attempts: Iterable[Attempt], t0: float, t1: float, probe: str = "dhcp") -> Doubles:
    """The attempts started within [t0, t1] that more than one server answered; a run of them (in order of start,
    none answered by one server or none in between) spans from its first one's start to its last one's end. The
    resolution is the probe's interval: two servers for less than that may fall between two attempts."""
    mine = sorted((a for a in attempts if a.probe == probe and t0 <= a.start <= t1), key=lambda a: a.start)
    runs = [list(run) for double, run in itertools.groupby(mine, key=lambda a: len(set(a.servers)) > 1) if double]
    return Doubles(sum(map(len, runs)), sum(run[-1].end - run[0].start for run in runs))
