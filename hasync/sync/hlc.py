"""Hybrid logical clocks: timestamps that respect causality and stay close to wall time.

Theory of operation
===================
A hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks", 2014) stamps events with
``Stamp(wall_ms, counter, node)``. ``wall_ms`` is the largest wall-clock reading, in milliseconds, that this
node has seen: its own, or one carried by a stamp it received. ``counter`` orders the events that share
that reading. ``node`` breaks the remaining ties, so stamps made by different nodes never compare equal.
Stamps compare lexicographically on ``(wall_ms, counter, node)``: a total order.

Guarantees of one ``HLC`` instance:

* **Monotonic.** Every stamp it returns is greater than every stamp it returned before, even when the
  wall clock stands still or steps backwards.
* **Causal.** ``update(remote, ...)``, called when a message stamped ``remote`` is received, returns a
  stamp greater than ``remote``. So if event *e* happened before event *f* (same node, or *e* sent a
  message that *f*'s node received, or a chain of both), ``stamp(e) < stamp(f)``.
* **Close to wall time.** ``wall_ms`` is never behind the local wall clock. It is ahead only as far as
  received stamps are ahead (at most ``max_drift_ms``, see below), plus one millisecond per
  ``MAX_COUNTER + 1`` events stamped within one millisecond. The counter is bounded: when it would overflow
  its four wire digits, the clock moves on to the next millisecond and the counter restarts at 0. A stuck
  wall clock therefore costs one millisecond of lead per 10,000 events, never an unbounded counter.

Not guaranteed: agreement with real time. Two events with no causal link are ordered by the clocks of
the nodes that stamped them, so "later" is only as good as the clocks' synchronisation (NTP). A remote
stamp more than ``max_drift_ms`` ahead of the local wall clock is refused with ``ClockDriftError`` and the
clock is left unchanged: absorbing it would drag this node's stamps, and those of every node it talks to,
into the future, where they would beat every honest stamp for as long as the offset lasts. The caller logs
and drops the message that carried it.

An instance has no memory across restarts: a fresh clock starts from the wall clock (or from ``last``).
A caller that needs a node's stamps to keep growing across restarts must first feed the clock the newest
stamps it can read; ``hasync.sync`` absorbs the retained records before it stamps anything.

Wire format
-----------
``"{wall_ms:013d}-{counter:04d}-{node}"``, for example ``"1795300000000-0003-ha-1"``. Both numbers are
fixed-width decimals (``wall_ms`` below 10**13, that is before the year 2286; ``counter`` at most
``MAX_COUNTER``), so the strings sort exactly like the stamps. Node ids are 1-64 characters of A-Z, a-z,
0-9, ``_`` and ``-``; a node id may itself contain ``-``, which is unambiguous because the first two fields
have fixed widths. ``Stamp.from_wire`` accepts nothing else: no signs, no spaces, no other widths.

Errors::

    HLCError (ValueError)
     +-- StampFormatError   a malformed wire stamp, or a field out of range
     +-- ClockDriftError    a remote stamp too far ahead of the local wall clock
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_COUNTER = 9_999
MAX_WALL_MS = 10**13 - 1
DEFAULT_MAX_DRIFT_MS = 60_000

_NODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_WIRE = re.compile(r"(?P<wall>[0-9]{13})-(?P<counter>[0-9]{4})-(?P<node>[A-Za-z0-9_-]{1,64})")


class HLCError(ValueError):
    """Base class of the clock's errors."""


class StampFormatError(HLCError):
    """A stamp that is malformed on the wire, or has a field out of range."""


class ClockDriftError(HLCError):
    """A remote stamp further ahead of the local wall clock than ``max_drift_ms``."""

    def __init__(self, remote: Stamp, wall_ms: int, max_drift_ms: int) -> None:
        super().__init__(
            f"stamp {remote.to_wire()} is {remote.wall_ms - wall_ms} ms ahead of the local wall clock "
            f"({wall_ms}), more than the {max_drift_ms} ms allowed: is a clock wrong?"
        )
        self.remote = remote
        self.wall_ms = wall_ms
        self.max_drift_ms = max_drift_ms


@dataclass(frozen=True, order=True, slots=True)
class Stamp:
    """One hybrid-logical-clock timestamp; ordered by ``(wall_ms, counter, node)``."""

    wall_ms: int
    counter: int
    node: str

    def __post_init__(self) -> None:
        if type(self.wall_ms) is not int or not 0 <= self.wall_ms <= MAX_WALL_MS:
            raise StampFormatError(f"wall_ms must be an int in 0..{MAX_WALL_MS}, got {self.wall_ms!r}")
        if type(self.counter) is not int or not 0 <= self.counter <= MAX_COUNTER:
            raise StampFormatError(f"counter must be an int in 0..{MAX_COUNTER}, got {self.counter!r}")
        if not isinstance(self.node, str) or not _NODE.fullmatch(self.node):
            raise StampFormatError(
                f"node must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-', got {self.node!r}"
            )

    def to_wire(self) -> str:
        return f"{self.wall_ms:013d}-{self.counter:04d}-{self.node}"

    @classmethod
    def from_wire(cls, text: str) -> Stamp:
        """Parse ``"{wall_ms:013d}-{counter:04d}-{node}"``; raise StampFormatError for anything else."""
        if not isinstance(text, str):
            raise StampFormatError(f"a stamp on the wire is a string, got {type(text).__name__}")
        match = _WIRE.fullmatch(text)
        if match is None:
            shown = text if len(text) <= 100 else text[:100] + "..."
            raise StampFormatError(
                f"stamp {shown!r} is not '<13-digit wall_ms>-<4-digit counter>-<node id>', "
                "e.g. '1795300000000-0003-ha-1'"
            )
        return cls(int(match["wall"]), int(match["counter"]), match["node"])

    def __str__(self) -> str:
        return self.to_wire()


class HLC:
    """One node's hybrid logical clock. Wall time is injected: integer milliseconds since the epoch."""

    def __init__(self, node: str, max_drift_ms: int = DEFAULT_MAX_DRIFT_MS, *, last: Stamp | None = None) -> None:
        if not _NODE.fullmatch(node):
            raise StampFormatError(f"node must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-', got {node!r}")
        if max_drift_ms < 0:
            raise ValueError(f"max_drift_ms must be >= 0, got {max_drift_ms}")
        self.node = node
        self.max_drift_ms = max_drift_ms
        self._wall = -1 if last is None else last.wall_ms
        self._counter = 0 if last is None else last.counter

    @property
    def last(self) -> Stamp | None:
        """The newest stamp this clock has issued or absorbed (None for a fresh clock)."""
        return None if self._wall < 0 else Stamp(self._wall, self._counter, self.node)

    def now(self, wall_ms: int) -> Stamp:
        """Stamp a local event, or a message about to be sent."""
        if wall_ms > self._wall:
            return self._set(wall_ms, 0)
        return self._set(self._wall, self._counter + 1)

    def update(self, remote: Stamp, wall_ms: int) -> Stamp:
        """Absorb the stamp of a received message; return the stamp of the receive event.

        Raises ClockDriftError, leaving the clock unchanged, if ``remote`` is more than ``max_drift_ms``
        ahead of ``wall_ms``.
        """
        if remote.wall_ms - wall_ms > self.max_drift_ms:
            raise ClockDriftError(remote, wall_ms, self.max_drift_ms)
        wall = max(self._wall, remote.wall_ms, wall_ms)
        if wall == self._wall == remote.wall_ms:
            counter = max(self._counter, remote.counter) + 1
        elif wall == self._wall:
            counter = self._counter + 1
        elif wall == remote.wall_ms:
            counter = remote.counter + 1
        else:
            counter = 0
        return self._set(wall, counter)

    def _set(self, wall: int, counter: int) -> Stamp:
        if counter > MAX_COUNTER:
            # Borrow the next millisecond rather than widen the counter: stamps stay monotonic and the
            # clock leads the wall clock by one millisecond per MAX_COUNTER + 1 events at most.
            wall, counter = wall + 1, 0
        stamp = Stamp(wall, counter, self.node)  # validates the range before the state changes
        self._wall, self._counter = wall, counter
        return stamp
