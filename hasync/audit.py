"""Reading agents' event logs (``events_file``) and checking the election's invariants on them.

Timestamps are ``time.monotonic()`` of each agent; on one Linux machine all processes share that clock,
so logs of several agents can be compared directly (the demo, the tests and the benchmarks do).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of one log; a torn last line (the agent was killed mid-write) is skipped."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


@dataclass(frozen=True)
class Tenure:
    """One stretch of a node acting as primary: from its promotion to the last instant it could act."""

    node: str
    term: int
    start: float
    end: float


def tenures(
    events: Iterable[dict[str, Any]], end: float, deaths: Mapping[str, float | Sequence[float]] | None = None
) -> list[Tenure]:
    """Tenures from promote/demote events. One with no demotion lasts until ``end``, or until the
    node's first death after its promotion (``deaths``: node -> the time, or times, it was killed)."""
    out: list[Tenure] = []
    open_: dict[str, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        key = f"{e['node']}/{e.get('incarnation', '')}"
        if e["event"] == "promote":
            open_[key] = e
        elif e["event"] == "demote" and key in open_:
            start = open_.pop(key)
            out.append(Tenure(e["node"], start["term"], start["t"], e["acting_until"]))
    for start in open_.values():
        died = (deaths or {}).get(start["node"], ())
        after = [t for t in ((died,) if isinstance(died, float | int) else died) if t >= start["t"]]
        out.append(Tenure(start["node"], start["term"], start["t"], min(after, default=end)))
    return sorted(out, key=lambda t: t.start)


def overlaps(tenures_: list[Tenure]) -> list[tuple[Tenure, Tenure]]:
    """Pairs of tenures of different nodes that intersect in time: two primaries at once."""
    return [
        (a, b)
        for i, a in enumerate(tenures_)
        for b in tenures_[i + 1:]
        if a.node != b.node and b.start < a.end and a.start < b.end
    ]


def terms_with_two_winners(events: Iterable[dict[str, Any]]) -> dict[int, set[str]]:
    winners: dict[int, set[str]] = {}
    for e in events:
        if e["event"] == "promote":
            winners.setdefault(e["term"], set()).add(e["node"])
    return {term: nodes for term, nodes in winners.items() if len(nodes) > 1}


def decreasing_terms(events: Iterable[dict[str, Any]]) -> list[str]:
    """Per agent incarnation, promotions must come in strictly increasing terms."""
    last: dict[str, int] = {}
    bad = []
    for e in sorted(events, key=lambda e: e["t"]):
        if e["event"] != "promote":
            continue
        key = f"{e['node']}/{e.get('incarnation', '')}"
        if e["term"] <= last.get(key, 0):
            bad.append(f"{key}: term {e['term']} after {last[key]}")
        last[key] = e["term"]
    return bad
