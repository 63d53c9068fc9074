"""Builders of entity records and sync nodes for the pure sync tests: explicit wall times in ms from ``T0``."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from hasync.sync.hlc import MAX_COUNTER, Stamp
from hasync.sync.state import (
    Action,
    Apply,
    Connected,
    Drop,
    EntityRecord,
    LocalSnapshot,
    Publish,
    RetainedDone,
    SyncState,
    Value,
)

T0 = 1_795_300_000_000
E = "input_boolean.kitchen"
NODE_IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
STAMPS = st.builds(Stamp, st.integers(0, 10**13 - 1), st.integers(0, MAX_COUNTER), NODE_IDS)


def rec(
    value: str | None,
    wall: int,
    node: str = "b",
    *,
    counter: int = 0,
    entity: str = E,
    attributes: dict[str, Any] | None = None,
) -> EntityRecord:
    """A record of ``value`` (None: a tombstone) stamped ``(T0 + wall, counter, node)``."""
    return EntityRecord(
        entity_id=entity,
        state=value,
        tombstone=value is None,
        attributes=attributes or {},
        version=Stamp(T0 + wall, counter, node),
        origin=node,
    )


def node(name: str = "a", ha: dict[str, Value] | None = None, *, now: int = 0) -> SyncState:
    """A node whose HA holds ``ha``, connected, with an empty retained snapshot delivered."""
    state = SyncState(name)
    state.handle(LocalSnapshot(ha or {}), T0 + now)
    state.handle(Connected(), T0 + now)
    state.handle(RetainedDone(), T0 + now)
    return state


def published(actions: list[Action]) -> list[EntityRecord]:
    return [a.record for a in actions if isinstance(a, Publish)]


def drops(actions: list[Action]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Drop)]


def apply_of(record: EntityRecord) -> Apply:
    assert record.state is not None
    return Apply(record.entity_id, record.state, record.attributes, record.version)
