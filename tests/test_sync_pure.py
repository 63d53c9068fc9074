"""Pure tests of the hybrid logical clock (hasync.hlc) and the entity sync state machine (hasync.sync).

Explicit wall times in ms, no event loop, no network. The clock has property tests, the sync one unit test
per rule, and the last two tests simulate three nodes, each with a SyncState and a fake Home Assistant (a
dict), around a model broker, under adversarial schedules, and check that they converge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hasync.messages import MessageError, parse
from hasync.sync.hlc import HLC, MAX_COUNTER, ClockDriftError, Stamp, StampFormatError
from hasync.sync.state import (
    Action,
    AppliedRemote,
    Apply,
    ApplyFailed,
    Connected,
    Disconnected,
    Drop,
    EntityRecord,
    EntityRemoved,
    Event,
    LocalChange,
    LocalSnapshot,
    Publish,
    RemoteVersion,
    Remove,
    RetainedDone,
    SyncState,
    Tick,
    Value,
    compare,
)

T0 = 1_795_300_000_000
E = "input_boolean.kitchen"
NODE_IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
STAMPS = st.builds(Stamp, st.integers(0, 10**13 - 1), st.integers(0, MAX_COUNTER), NODE_IDS)


# ---- the clock ----------------------------------------------------------------------------------


@given(STAMPS)
def test_wire_round_trip(stamp: Stamp) -> None:
    assert Stamp.from_wire(stamp.to_wire()) == stamp


@given(STAMPS, STAMPS)
def test_wire_strings_sort_like_stamps(a: Stamp, b: Stamp) -> None:
    assert (a < b) == (a.to_wire() < b.to_wire())
    assert (a == b) == (a.to_wire() == b.to_wire())


def test_wire_example_and_node_tiebreak() -> None:
    assert Stamp(1795300000000, 3, "ha-1").to_wire() == "1795300000000-0003-ha-1"
    assert Stamp.from_wire("0000000000042-0000-a-b-c") == Stamp(42, 0, "a-b-c")
    assert Stamp(5, 1, "a") < Stamp(5, 1, "b") < Stamp(5, 2, "a") < Stamp(6, 0, "a")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1795300000000-3-ha-1",  # counter not 4 digits
        "179530000000-0003-ha-1",  # wall not 13 digits
        "1795300000000-0003-",  # no node
        "1795300000000-0003-ha 1",
        " 1795300000000-0003-ha-1",
        "+795300000000-0003-ha-1",
        "1795300000000_0003_ha-1",
        "1795300000000-0003-" + "x" * 65,
        "١٧٩٥٣٠٠٠٠٠٠٠٠-0003-ha-1",  # non-ASCII digits
    ],
)
def test_from_wire_is_strict(text: str) -> None:
    with pytest.raises(StampFormatError, match="is not '<13-digit wall_ms>-<4-digit counter>-<node id>'"):
        Stamp.from_wire(text)


def test_stamp_fields_are_checked() -> None:
    with pytest.raises(StampFormatError, match="counter must be"):
        Stamp(1, MAX_COUNTER + 1, "a")
    with pytest.raises(StampFormatError, match="wall_ms must be"):
        Stamp(-1, 0, "a")
    with pytest.raises(StampFormatError, match="wall_ms must be"):
        Stamp(True, 0, "a")
    with pytest.raises(StampFormatError, match="node must be"):
        Stamp(1, 0, "a/b")
    with pytest.raises(StampFormatError, match="a stamp on the wire is a string"):
        Stamp.from_wire(123)  # type: ignore[arg-type]


CLOCK_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("now"), st.integers(0, 3000), st.just(None)),
        st.tuples(
            st.just("update"),
            st.integers(0, 3000),
            st.builds(Stamp, st.integers(0, 3000), st.integers(0, MAX_COUNTER), st.sampled_from(["a", "b", "z"])),
        ),
    ),
    max_size=60,
)


@given(CLOCK_OPS)
def test_clock_is_monotonic_and_receive_follows_the_message(ops: list[tuple[str, int, Stamp | None]]) -> None:
    clock = HLC("b", max_drift_ms=10_000)
    previous: Stamp | None = None
    for op, wall, remote in ops:
        stamp = clock.now(wall) if remote is None else clock.update(remote, wall)
        assert stamp.counter <= MAX_COUNTER
        assert stamp.wall_ms >= wall  # never behind the wall clock
        if remote is not None:
            assert stamp > remote, op
        if previous is not None:
            assert stamp > previous
        assert clock.last == stamp
        previous = stamp


@given(
    offsets=st.lists(st.integers(-5000, 5000), min_size=3, max_size=3),
    stuck=st.lists(st.booleans(), min_size=3, max_size=3),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["local", "send", "recv"]), st.integers(0, 2), st.integers(0, 50), st.integers(0, 600)
        ),
        max_size=50,
    ),
)
def test_clock_preserves_happened_before(
    offsets: list[int], stuck: list[bool], steps: list[tuple[str, int, int, int]]
) -> None:
    """Whenever event e happened before event f (vector clocks), stamp(e) < stamp(f); all stamps differ."""
    clocks = [HLC(n) for n in "abc"]
    vectors = [[0, 0, 0] for _ in range(3)]
    events: list[tuple[Stamp, tuple[int, ...]]] = []
    messages: list[tuple[Stamp, tuple[int, ...]]] = []
    now = T0
    for kind, i, pick, dt in steps:
        now += dt
        wall = (T0 if stuck[i] else now) + offsets[i]
        vectors[i][i] += 1
        if kind == "recv" and messages:
            stamp_in, vector_in = messages[pick % len(messages)]
            vectors[i] = [max(x, y) for x, y in zip(vectors[i], vector_in, strict=True)]
            stamp = clocks[i].update(stamp_in, wall)
        else:
            stamp = clocks[i].now(wall)
        events.append((stamp, tuple(vectors[i])))
        if kind == "send":
            messages.append(events[-1])
    assert len({s for s, _ in events}) == len(events)
    for s1, v1 in events:
        for s2, v2 in events:
            if v1 != v2 and all(x <= y for x, y in zip(v1, v2, strict=True)):
                assert s1 < s2


def test_counter_is_bounded_under_a_stuck_wall_clock() -> None:
    clock = HLC("a")
    n = 3 * (MAX_COUNTER + 1) + 5
    stamps = [clock.now(T0) for _ in range(n)]
    assert all(s.counter <= MAX_COUNTER for s in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == n
    assert stamps[-1].wall_ms - T0 <= n // (MAX_COUNTER + 1)
    assert clock.now(T0 + 10).counter == 0  # the wall clock moved past: the counter restarts
    # A received stamp at the counter's limit also moves on to the next millisecond.
    assert clock.update(Stamp(T0 + 20, MAX_COUNTER, "b"), T0) == Stamp(T0 + 21, 0, "a")


@given(walls=st.lists(st.integers(0, 5), min_size=1, max_size=300), start=st.integers(0, MAX_COUNTER))
def test_counter_bounded_when_the_clock_stands_still_or_goes_back(walls: list[int], start: int) -> None:
    clock = HLC("a", last=Stamp(T0, start, "a"))
    for i, w in enumerate(walls, 1):
        stamp = clock.now(T0 - w)  # stuck or behind the clock's own past
        assert stamp.counter <= MAX_COUNTER
        assert stamp.wall_ms - T0 <= (start + i) // (MAX_COUNTER + 1)


def test_a_stamp_from_the_future_is_refused_and_leaves_the_clock_alone() -> None:
    clock = HLC("a", max_drift_ms=60_000)
    mine = clock.now(T0)
    with pytest.raises(ClockDriftError, match="60001 ms ahead") as info:
        clock.update(Stamp(T0 + 60_001, 0, "b"), T0)
    assert info.value.remote == Stamp(T0 + 60_001, 0, "b")
    assert clock.last == mine
    assert clock.now(T0) == Stamp(T0, 1, "a")
    assert clock.update(Stamp(T0 + 60_000, 0, "b"), T0) == Stamp(T0 + 60_000, 1, "a")  # the limit is allowed


# ---- the record ---------------------------------------------------------------------------------


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


def test_record_round_trip_and_wire_form() -> None:
    record = rec("on", 5, attributes={"friendly_name": "Kitchen", "nested": [1, {"x": None}]})
    payload = record.to_payload()
    assert b'"version":"1795300000005-0000-b"' in payload
    assert parse(EntityRecord, payload) == record
    tombstone = rec(None, 6)
    assert b'"state"' not in tombstone.to_payload()
    assert parse(EntityRecord, tombstone.to_payload()) == tombstone
    assert tombstone.value is None and record.value == ("on", record.attributes)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tombstone": True}, "a tombstone carries no state"),
        ({"state": None}, "a record carries a state"),
        ({"origin": "c"}, "is not the node of version"),
        ({"version": "1795300000005-5-b"}, "is not '<13-digit wall_ms>"),
        ({"version": 5}, "a version is a stamp string"),
        ({"entity_id": "Input_Boolean.x"}, "String should match pattern"),
        ({"extra": 1}, "Extra inputs are not permitted"),
        ({"leader_term": "3"}, "Input should be a valid integer"),
        ({"state": "x" * 256}, "at most 255 characters"),
    ],
)
def test_record_rejects(change: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "entity_id": E, "state": "on", "attributes": {}, "version": "1795300000005-0000-b", "origin": "b",
    }
    with pytest.raises(ValidationError, match=message):
        EntityRecord.model_validate(fields | change)


def test_record_of_another_protocol_version_is_labelled() -> None:
    with pytest.raises(MessageError, match="wrong_version"):
        parse(EntityRecord, rec("on", 1).to_payload().replace(b'"v":1', b'"v":2'))


# ---- the state machine, rule by rule ------------------------------------------------------------


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


def test_a_local_change_is_stamped_and_published() -> None:
    a = node("a", {E: ("off", {})})
    out = a.handle(LocalChange(E, "on", {"x": 1}), T0 + 10)
    [record] = published(out)
    assert (record.state, record.attributes, record.origin) == ("on", {"x": 1}, "a")
    assert record.version == Stamp(T0 + 10, 0, "a")
    assert a.pending() == 1  # until its echo comes back
    assert a.handle(RemoteVersion(record), T0 + 11) == []
    assert a.pending() == 0
    assert a.handle(LocalChange(E, "on", {"x": 1}), T0 + 12) == []  # nothing changed


def test_leader_term_is_copied_into_records() -> None:
    a = node("a", {E: ("off", {})})
    a.leader_term = 7
    [record] = published(a.handle(LocalChange(E, "on"), T0 + 10))
    assert record.leader_term == 7


def test_a_newer_remote_record_is_applied_once() -> None:
    a = node("a", {E: ("off", {})})
    remote = rec("on", 5)
    assert a.handle(RemoteVersion(remote), T0 + 10) == [apply_of(remote)]
    assert a.handle(RemoteVersion(remote), T0 + 11) == []  # a duplicate
    assert a.pending() == 1
    assert a.handle(AppliedRemote(E, remote.version), T0 + 12) == []
    assert a.pending() == 0
    assert a.record(E) == remote


def test_nothing_is_applied_when_ha_already_holds_the_value() -> None:
    a = node("a", {E: ("on", {"x": 1})})
    assert a.handle(RemoteVersion(rec("on", 5, attributes={"x": 1})), T0 + 10) == []
    assert a.pending() == 0
    # Attributes count: the same state with other attributes is applied. So does JSON type: 1 is not 1.0.
    assert len(a.handle(RemoteVersion(rec("on", 6, attributes={"x": 1.0})), T0 + 11)) == 1


def test_a_stale_remote_record_is_dropped() -> None:
    a = node("a", {E: ("off", {})})
    newer = rec("on", 5)
    a.handle(RemoteVersion(newer), T0 + 10)
    a.handle(AppliedRemote(E, newer.version), T0 + 10)
    out = a.handle(RemoteVersion(rec("off", 4, "c")), T0 + 11)
    assert drops(out) == ["stale"]
    assert a.record(E) == newer


def test_the_newest_record_is_republished_unchanged_when_the_broker_regresses() -> None:
    """MQTT has no compare-and-set: an older record that arrives after a newer one is what the broker now
    retains. A node that knows the newer one republishes it, even if another node made it."""
    a = node("a", {E: ("off", {})})
    newer = rec("on", 5, "b")
    a.handle(RemoteVersion(newer), T0 + 10)
    out = a.handle(RemoteVersion(rec("off", 4, "c")), T0 + 11)
    assert published(out) == [newer]
    assert a.handle(RemoteVersion(newer), T0 + 12) == []


def test_own_stale_echo_overtaken_by_a_newer_publication_is_not_repaired() -> None:
    a = node("a", {E: ("off", {})})
    [first] = published(a.handle(LocalChange(E, "on"), T0 + 10))
    [second] = published(a.handle(LocalChange(E, "off"), T0 + 11))
    assert published(a.handle(RemoteVersion(first), T0 + 12)) == []  # our echo; `second` follows it
    assert a.handle(RemoteVersion(second), T0 + 13) == []
    # The same old record once more: someone republished it after ours, so the broker holds it now.
    assert published(a.handle(RemoteVersion(first), T0 + 14)) == [second]


def test_own_record_of_an_earlier_connection_published_again_is_repaired() -> None:
    """Only records sent on this connection can be echoes; an older one of ours that arrives now was
    published again by someone (a tool, a stale queue), and the broker holds it."""
    a = node("a", {E: ("off", {})})
    [old] = published(a.handle(LocalChange(E, "on"), T0 + 10))
    a.handle(Disconnected(), T0 + 11)
    a.handle(Connected(), T0 + 12)
    a.handle(RemoteVersion(old, retained=True), T0 + 13)
    a.handle(RetainedDone(), T0 + 14)
    [new] = published(a.handle(LocalChange(E, "off"), T0 + 15))
    assert published(a.handle(RemoteVersion(old), T0 + 16)) == [new]


def test_changes_made_while_disconnected_wait_for_the_retained_records() -> None:
    a = node("a", {E: ("off", {})})
    a.handle(Disconnected(), T0 + 10)
    assert a.handle(LocalChange(E, "on"), T0 + 20) == []
    assert a.pending() == 1
    assert a.handle(Connected(), T0 + 30) == []
    assert drops(a.handle(RemoteVersion(rec("off", 15), retained=True), T0 + 31)) == ["stale"]
    out = a.handle(RetainedDone(), T0 + 32)
    [record] = published(out)
    assert (record.state, record.version) == ("on", Stamp(T0 + 20, 0, "a"))


def test_a_change_made_while_disconnected_loses_to_a_newer_one() -> None:
    a = node("a", {E: ("off", {})})
    a.handle(Disconnected(), T0 + 10)
    a.handle(LocalChange(E, "on"), T0 + 20)
    a.handle(Connected(), T0 + 30)
    newer = rec("off", 25, attributes={"by": "b"})
    assert a.handle(RemoteVersion(newer, retained=True), T0 + 31) == [apply_of(newer)]
    assert a.handle(RetainedDone(), T0 + 32) == []  # nothing to publish: the bus has the newest


def test_a_restarted_node_stamps_its_changes_after_the_retained_records() -> None:
    """A fresh clock may be behind the node's own earlier stamps (its wall clock went back). Changes seen
    before the first RetainedDone are stamped after the clock has absorbed the retained records."""
    before_restart = rec("off", 5000, "a")
    a = SyncState("a")
    a.handle(LocalSnapshot({E: ("off", {})}), T0 + 1000)
    assert a.handle(LocalChange(E, "on"), T0 + 1001) == []
    a.handle(Connected(), T0 + 1002)
    assert a.handle(RemoteVersion(before_restart, retained=True), T0 + 1003) == []  # no Apply over the change
    [record] = published(a.handle(RetainedDone(), T0 + 1004))
    assert record.state == "on"
    assert record.version > before_restart.version


def test_after_a_restart_the_bus_wins_over_what_ha_holds() -> None:
    a = SyncState("a")
    a.handle(LocalSnapshot({E: ("off", {}), "counter.only_here": ("3", {})}), T0)
    a.handle(Connected(), T0)
    bus = rec("on", -100)
    assert a.handle(RemoteVersion(bus, retained=True), T0 + 1) == [apply_of(bus)]
    [record] = published(a.handle(RetainedDone(), T0 + 2))  # an entity the bus never saw gets a version
    assert (record.entity_id, record.state, record.version) == ("counter.only_here", "3", Stamp(0, 0, "a"))


def test_a_snapshot_after_the_first_sync_applies_and_publishes() -> None:
    bus = rec("on", 1)
    a = SyncState("a")
    a.handle(Connected(), T0)
    a.handle(RemoteVersion(bus, retained=True), T0 + 1)
    assert a.handle(RetainedDone(), T0 + 2) == []  # HA's state is unknown until its snapshot: no Apply yet
    out = a.handle(LocalSnapshot({E: ("off", {}), "counter.new": ("1", {})}), T0 + 3)
    assert out[0] == apply_of(bus)
    [record] = published(out)
    assert (record.entity_id, record.version) == ("counter.new", Stamp(0, 0, "a"))


def test_an_absent_entity_is_created_by_apply() -> None:
    a = node("a")
    bus = rec("on", 1)
    assert a.handle(RemoteVersion(bus), T0 + 2) == [apply_of(bus)]


def test_an_entity_that_appears_in_ha_takes_the_bus_value() -> None:
    """A helper created in HA (say, its YAML added and reloaded) starts at its initial value: that is no
    user's change, so the value the cluster holds wins, as in a snapshot."""
    a = node("a")
    bus = rec("on", 1)
    a.handle(RemoteVersion(bus), T0 + 2)
    a.handle(ApplyFailed(E, bus.version, "absent"), T0 + 3)
    out = a.handle(LocalChange(E, "off", appeared=True), T0 + 4)
    assert out == [apply_of(bus)]
    assert a.record(E) == bus


def test_an_entity_that_appears_and_is_new_to_the_bus_is_published() -> None:
    a = node("a")
    [record] = published(a.handle(LocalChange(E, "off", appeared=True), T0 + 4))
    assert (record.state, record.version) == ("off", Stamp(0, 0, "a"))


def test_a_value_nobody_changed_loses_to_any_record() -> None:
    """HA's value of an entity the bus never showed this node (the broker may have dropped its retained
    record on the way) has the node's lowest version: the record, however old, still wins when it comes."""
    a = SyncState("a")
    a.handle(LocalSnapshot({E: ("off", {})}), T0)
    a.handle(Connected(), T0)
    [floor] = published(a.handle(RetainedDone(), T0 + 1))
    assert floor.version == Stamp(0, 0, "a")
    late = rec("on", -10_000)  # made long before, by b
    assert a.handle(RemoteVersion(late), T0 + 2) == [apply_of(late)]
    assert a.record(E) == late
    # A user's change is stamped as usual, above everything seen.
    a.handle(AppliedRemote(E, late.version), T0 + 3)
    [change] = published(a.handle(LocalChange(E, "off"), T0 + 4))
    assert change.version == Stamp(T0 + 4, 0, "a")


def test_an_entity_brought_back_after_its_tombstone_is_a_change() -> None:
    a = node("a")
    tombstone = EntityRecord(entity_id=E, tombstone=True, version=Stamp(T0 + 1, 0, "b"), origin="b")
    a.handle(RemoteVersion(tombstone), T0 + 2)
    [record] = published(a.handle(LocalChange(E, "off", appeared=True), T0 + 4))
    assert record.state == "off" and record.version > tombstone.version


def test_a_removal_is_published_as_a_tombstone() -> None:
    a = node("a", {E: ("on", {})})
    a.handle(RemoteVersion(rec("on", 1)), T0 + 2)
    [tombstone] = published(a.handle(EntityRemoved(E), T0 + 3))
    assert tombstone.tombstone and tombstone.state is None and tombstone.version == Stamp(T0 + 3, 0, "a")
    assert a.handle(EntityRemoved(E), T0 + 4) == []  # already absent


def test_tombstones_stick() -> None:
    a = node("a", {E: ("on", {})})
    tombstone = rec(None, 5)
    assert a.handle(RemoteVersion(tombstone), T0 + 10) == [Remove(E, tombstone.version)]
    a.handle(AppliedRemote(E, tombstone.version), T0 + 11)
    assert a.pending() == 0
    # HA restarts and still has the entity (say, from YAML): it is removed again, not resurrected.
    assert a.handle(LocalSnapshot({E: ("on", {})}), T0 + 12) == [Remove(E, tombstone.version)]
    a.handle(AppliedRemote(E, tombstone.version), T0 + 13)
    # A fresh node whose HA still has it does the same.
    b = SyncState("b")
    b.handle(LocalSnapshot({E: ("on", {})}), T0 + 20)
    b.handle(Connected(), T0 + 20)
    assert b.handle(RemoteVersion(tombstone, retained=True), T0 + 21) == [Remove(E, tombstone.version)]
    assert published(b.handle(RetainedDone(), T0 + 22)) == []
    # Only a local change after the tombstone brings it back, everywhere.
    [back] = published(a.handle(LocalChange(E, "off"), T0 + 30))
    assert back.version > tombstone.version and not back.tombstone


def test_versions_arriving_during_an_apply_are_coalesced() -> None:
    a = node("a", {E: ("off", {})})
    v1, v2, v3 = rec("1", 1), rec("2", 2), rec("3", 3)
    assert a.handle(RemoteVersion(v1), T0 + 10) == [apply_of(v1)]
    assert a.handle(RemoteVersion(v2), T0 + 11) == []
    assert a.handle(RemoteVersion(v3), T0 + 12) == []
    assert drops(a.handle(AppliedRemote(E, v2.version), T0 + 13)) == ["unexpected_answer"]
    assert a.handle(AppliedRemote(E, v1.version), T0 + 14) == [apply_of(v3)]  # v2 is never applied
    assert a.handle(AppliedRemote(E, v3.version), T0 + 15) == []
    assert a.pending() == 0


def test_a_late_retained_copy_does_not_hide_a_regression() -> None:
    """Retained copies are the broker's store at subscribe time. One that arrives after a live record of the
    topic (here our own publication's echo) says nothing about what the broker holds now."""
    a = SyncState("a")
    a.handle(LocalSnapshot({E: ("on", {})}), T0)
    a.handle(Connected(), T0)
    [mine] = published(a.handle(RetainedDone(), T0 + 1))  # the window closed before the retained copies came
    assert a.handle(RemoteVersion(mine), T0 + 2) == []  # the broker now holds ours
    newer = rec("on", 5, "b")
    # b's record was retained before we subscribed; ours replaced it; b's copy only arrives now.
    assert published(a.handle(RemoteVersion(newer, retained=True), T0 + 3)) == [newer]


def test_a_change_before_the_first_sync_survives_an_apply_in_flight() -> None:
    a = SyncState("a")
    a.handle(LocalSnapshot({E: ("off", {})}), T0)
    a.handle(Connected(), T0)
    retained = rec("on", -10)
    assert a.handle(RemoteVersion(retained, retained=True), T0 + 1) == [apply_of(retained)]
    assert a.handle(LocalChange(E, "user"), T0 + 2) == []  # stamped at RetainedDone
    # HA executes our Apply after the user's change: HA shows "on", but the user asked for "user".
    assert a.handle(AppliedRemote(E, retained.version), T0 + 3) == []
    out = a.handle(RetainedDone(), T0 + 4)
    [mine] = published(out)
    assert mine.state == "user" and mine.version > retained.version
    assert out[0] == apply_of(mine)  # and HA is set back to the user's value


def test_a_failed_apply_is_retried_on_tick() -> None:
    a = node("a", {E: ("off", {})})
    remote = rec("on", 1)
    a.handle(RemoteVersion(remote), T0 + 10)
    assert drops(a.handle(ApplyFailed(E, remote.version, "HA is restarting"), T0 + 11)) == ["apply_failed"]
    assert a.handle(RemoteVersion(remote), T0 + 12) == []  # not before the Tick
    assert a.handle(Tick(), T0 + 13) == [apply_of(remote)]


def test_a_failed_apply_is_retried_at_once_when_ha_is_back() -> None:
    """HA restarted: its new snapshot is news about HA, like a local change, so a failed apply does not wait
    for the next Tick (a whole retry interval after HA was already back)."""
    a = node("a", {E: ("off", {})})
    remote = rec("on", 1)
    a.handle(RemoteVersion(remote), T0 + 10)
    a.handle(ApplyFailed(E, remote.version, "not connected to Home Assistant"), T0 + 11)
    assert a.handle(LocalSnapshot({E: ("off", {})}), T0 + 12) == [apply_of(remote)]


def test_a_local_change_during_an_apply_wins() -> None:
    a = node("a", {E: ("off", {})})
    remote = rec("on", 1)
    a.handle(RemoteVersion(remote), T0 + 10)
    [mine] = published(a.handle(LocalChange(E, "user"), T0 + 11))
    assert mine.version > remote.version
    # HA then executes our Apply over the user's value: the user's newer record is applied back.
    assert a.handle(AppliedRemote(E, remote.version), T0 + 12) == [apply_of(mine)]


def test_concurrent_changes_on_two_nodes_the_later_stamp_wins_everywhere() -> None:
    a, b = node("a", {E: ("off", {})}), node("b", {E: ("off", {})}, now=0)
    [from_a] = published(a.handle(LocalChange(E, "a-was-here"), T0 + 100))
    [from_b] = published(b.handle(LocalChange(E, "b-was-here"), T0 + 101))
    # Each receives both, in its own order; b's stamp is later.
    assert drops(b.handle(RemoteVersion(from_a), T0 + 102)) == ["stale"]
    assert a.handle(RemoteVersion(from_b), T0 + 102) == [apply_of(from_b)]
    assert a.record(E) == b.record(E) == from_b


def test_a_stamp_too_far_ahead_is_dropped() -> None:
    a = node("a", {E: ("off", {})})
    mine = a.record(E)
    out = a.handle(RemoteVersion(rec("on", 60_001)), T0)
    assert drops(out) == ["clock_drift"]
    assert a.record(E) == mine
    assert a.hlc.now(T0).wall_ms == T0  # the clock was not dragged along


def test_the_number_of_entities_is_bounded() -> None:
    a = SyncState("a", max_entities=2)
    a.handle(LocalSnapshot({"counter.one": ("1", {}), "counter.two": ("2", {})}), T0)
    out = a.handle(RemoteVersion(rec("on", 1)), T0 + 1)
    assert drops(out) == ["too_many_entities"]
    assert drops(a.handle(LocalChange("counter.three", "3"), T0 + 2)) == ["too_many_entities"]


def test_invalid_local_values_are_dropped() -> None:
    a = node("a")
    assert drops(a.handle(LocalChange("Not An Id", "on"), T0)) == ["invalid_local_value"]
    assert drops(a.handle(LocalChange(E, "x" * 300), T0)) == ["invalid_local_value"]
    assert a.pending() == 0


def test_retained_done_outside_the_window_is_dropped() -> None:
    a = node("a")
    assert drops(a.handle(RetainedDone(), T0)) == ["unexpected_retained_done"]


def test_equal_versions_with_different_content_are_ordered_the_same_everywhere() -> None:
    x, y = rec("x", 1, "a"), rec("y", 1, "a")
    assert compare(x, y) == -compare(y, x) != 0
    winner = x if compare(x, y) > 0 else y
    for first, second in ((x, y), (y, x)):
        n = node("n", {E: ("off", {})})
        n.handle(RemoteVersion(first), T0 + 2)
        n.handle(RemoteVersion(second), T0 + 3)
        assert n.record(E) == winner


# ---- convergence: three nodes, a model broker, an adversarial schedule --------------------------

NODES = ("a", "b", "c")
ENTITIES = ("input_boolean.one", "input_number.two", "counter.three")
VALUES: tuple[Value, ...] = (("on", {}), ("off", {}), ("1", {"unit": "x"}), ("1", {"unit": "y"}), ("2", {}))
RETAINED_DONE = "retained-done"
EXPECTED_DROPS = {"stale", "apply_failed"}

# One step: (kind, node index, a, b); a and b are read per kind. Delivery is the most common step.
KINDS = ["deliver"] * 6 + ["change"] * 3 + ["ha"] * 2 + [
    "connect", "disconnect", "remove", "replay", "dup", "time", "time", "tick", "ha_fail", "restart",
    "ha_restart", "broker",
]
# Concurrent writers: no restarts, mostly changes racing deliveries, so the broker often ends up retaining
# an older record than one already delivered (MQTT has no compare-and-set), and repairs are needed.
RACING_KINDS = ["change"] * 4 + ["deliver"] * 6 + ["ha"] * 2 + ["time", "dup", "replay", "connect", "disconnect"]


OFFSETS = st.lists(st.integers(-5000, 5000), min_size=3, max_size=3)  # each node's clock, ms
STUCK = st.lists(st.sampled_from([False, False, True]), min_size=3, max_size=3)  # a wall clock that stands still
INITIAL_HA = st.lists(
    st.dictionaries(st.sampled_from(ENTITIES), st.sampled_from(VALUES), max_size=3), min_size=3, max_size=3
)


def schedules(kinds: list[str]) -> st.SearchStrategy[list[tuple[str, int, int, int]]]:
    step = st.tuples(st.sampled_from(kinds), st.integers(0, 2), st.integers(0, 7), st.integers(0, 7))
    return st.lists(step, min_size=20, max_size=60)


@dataclass
class Change:
    """A change the user made in one node's HA, replacing what HA showed then (``replaced``)."""

    entity_id: str
    value: Value | None
    replaced: EntityRecord | None
    basis: EntityRecord | None = None  # the newest record the node knew when it stamped the change
    stamped: bool = False
    published: bool = False


@dataclass
class SimNode:
    name: str
    offset: int
    stuck: bool
    ha: dict[str, Value]
    sync: SyncState
    connected: bool = False
    synced: bool = False  # RetainedDone delivered on this connection
    inbox: list[tuple[EntityRecord, bool] | str] = field(default_factory=list)
    ha_queue: list[tuple[Apply | Remove, EntityRecord]] = field(default_factory=list)
    # What the broker holds on each topic as far as the node can know, this connection: the last record
    # delivered, unless it is a retained copy that came after a live record (a snapshot of an older store).
    last_seen: dict[str, EntityRecord] = field(default_factory=dict)
    live_seen: set[str] = field(default_factory=set)
    last_live: EntityRecord | None = None  # the message just delivered, if live: what a duplicate repeats
    # For the lost-update and resurrection checks, per agent life (a restart starts a new one):
    ever_synced: bool = False  # a RetainedDone was delivered to the current SyncState
    received: dict[str, list[EntityRecord]] = field(default_factory=dict)  # by the current SyncState
    changed_to: dict[str, list[Value | None]] = field(default_factory=dict)  # the user's values, this life
    made: dict[str, list[EntityRecord]] = field(default_factory=dict)  # records it published first, this life
    # Across lives: the record whose value HA shows, and the user's changes still to be judged.
    shows: dict[str, EntityRecord] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)


class Cluster:
    """Three nodes and a model broker: the retained record per entity topic, and one inbox per connected
    node, in the broker's order except that retained copies and the RetainedDone marker may be delivered
    early or late (Cluster.deliver). Old records may be published again (replays) and a delivery repeated
    (QoS 1 duplicates). A disconnected node's inbox is lost; a broker restart keeps, wipes or rolls back
    the retained records. Every Apply is checked not to be spurious and every Publish not to be an echo."""

    def __init__(self, offsets: list[int], stuck: list[bool], initial: list[dict[str, Value]]) -> None:
        self.t = T0
        self.nodes = [
            SimNode(name, offset, frozen, dict(ha), SyncState(name))
            for name, offset, frozen, ha in zip(NODES, offsets, stuck, initial, strict=True)
        ]
        self.retained: dict[str, EntityRecord] = {}
        self.history: list[EntityRecord] = []
        self.snapshots: list[dict[str, EntityRecord]] = []  # what a broker with periodic persistence may restore
        self.created: dict[str, EntityRecord] = {}  # the highest record ever published, per entity
        self.lost: set[str] = set()  # entities whose highest record is held nowhere any more
        self.restarted = False
        self.repairs = 0
        for n in self.nodes:
            self.feed(n, LocalSnapshot(dict(n.ha)))

    def wall(self, n: SimNode) -> int:
        return (T0 if n.stuck else self.t) + n.offset

    def feed(self, n: SimNode, ev: Event) -> None:
        for action in n.sync.handle(ev, self.wall(n)):
            match action:
                case Publish(record=record, retain=retain):
                    assert retain and n.connected and n.synced, "published outside a synced connection"
                    seen = n.last_seen.get(record.entity_id)
                    assert compare(record, seen) > 0, f"{n.name} echoed {record}: the broker holds {seen}"
                    if record.origin != n.name:
                        self.repairs += 1
                    else:
                        self.published_own(n, record)
                    self.publish(record)
                case Apply(entity_id=e, state=state, attributes=attributes):
                    assert n.ha.get(e) != (state, attributes), f"spurious Apply on {n.name}: {action}"
                    n.ha_queue.append((action, self.best(n, e)))
                case Remove(entity_id=e):
                    assert e in n.ha, f"spurious Remove on {n.name}: {action}"
                    n.ha_queue.append((action, self.best(n, e)))
                case Drop(reason=reason):
                    assert reason in EXPECTED_DROPS, action

    @staticmethod
    def best(n: SimNode, e: str) -> EntityRecord:
        record = n.sync.record(e)
        assert record is not None
        return record

    def published_own(self, n: SimNode, record: EntityRecord) -> None:
        """No stale resurrection: a record a node makes carries a value its user set in this life, unless
        the node has received no record of the entity (it is new to this node, or the broker lost it)."""
        e = record.entity_id
        received = n.received.get(e, [])
        if any(compare(r, record) == 0 for r in received + n.made.get(e, [])):
            return  # published before (by this life or a former one): a repair
        n.made.setdefault(e, []).append(record)
        assert not received or record.value in n.changed_to.get(e, []), (
            f"{n.name} resurrected {record.value} for {e}: its user never set it, the bus had {received[-1]}"
        )
        for change in n.changes:
            if change.entity_id == e:
                change.published = True
        if n.ha.get(e) == record.value:
            n.shows[e] = record

    def publish(self, record: EntityRecord) -> None:
        self.retained[record.entity_id] = record
        self.history.append(record)
        if compare(record, self.created.get(record.entity_id)) > 0:
            self.created[record.entity_id] = record
            self.lost.discard(record.entity_id)
        for n in self.nodes:
            if n.connected:
                n.inbox.append((record, False))

    # ---- steps ----------------------------------------------------------------------------------

    def connect(self, n: SimNode) -> None:
        if not n.connected:
            n.connected, n.synced, n.last_seen, n.live_seen = True, False, {}, set()
            n.inbox = [(r, True) for r in self.retained.values()] + [RETAINED_DONE]
            self.feed(n, Connected())

    def disconnect(self, n: SimNode) -> None:
        if n.connected:
            n.connected, n.synced, n.inbox, n.last_live = False, False, [], None
            self.feed(n, Disconnected())

    def deliver(self, n: SimNode, pick: int | None = None) -> None:
        """Deliver the next message; with ``pick``, one of the retained copies, the RetainedDone marker or
        the first live message instead: retained copies may come late, the window may end early, but live
        messages keep the broker's order."""
        if not n.inbox:
            return
        index = 0
        if pick is not None:
            first_live = [i for i, item in enumerate(n.inbox) if not isinstance(item, str) and not item[1]][:1]
            choices = [i for i, item in enumerate(n.inbox) if isinstance(item, str) or item[1]] + first_live
            index = choices[pick % len(choices)]
        item = n.inbox.pop(index)
        if isinstance(item, str):
            n.last_live = None
            n.synced = True
            if not n.ever_synced:  # the changes made since the restart are stamped now
                n.ever_synced = True
                for change in n.changes:
                    if not change.stamped:
                        change.basis, change.stamped = n.sync.record(change.entity_id), True
            self.feed(n, RetainedDone())
        else:
            self.receive(n, *item)

    def receive(self, n: SimNode, record: EntityRecord, retained: bool) -> None:
        if not (retained and record.entity_id in n.live_seen):
            n.last_seen[record.entity_id] = record
        if not retained:
            n.live_seen.add(record.entity_id)
        n.last_live = None if retained else record
        n.received.setdefault(record.entity_id, []).append(record)
        self.feed(n, RemoteVersion(record, retained))

    def run_ha(self, n: SimNode, *, answer: bool = True, ok: bool = True) -> None:
        action, record = n.ha_queue.pop(0)
        if ok:
            if isinstance(action, Apply):
                n.ha[action.entity_id] = (action.state, dict(action.attributes))
            else:
                n.ha.pop(action.entity_id, None)
            n.shows[action.entity_id] = record
        if answer:
            answer_event = AppliedRemote if ok else ApplyFailed
            self.feed(n, answer_event(action.entity_id, action.version))

    def user_change(self, n: SimNode, e: str, value: Value | None) -> None:
        change = Change(e, value, n.shows.get(e))
        if n.ever_synced:  # stamped at once; before the first sync, at RetainedDone
            change.basis, change.stamped = n.sync.record(e), True
        n.changes.append(change)
        n.changed_to.setdefault(e, []).append(value)

    def step(self, kind: str, i: int, a: int, b: int) -> None:
        """Run one step of a schedule on node ``i``; ``a`` and ``b`` are read per kind."""
        getattr(self, f"step_{kind}")(self.nodes[i], a, b)
        self.t += 1
        self.snapshots.append(dict(self.retained))
        self.check_loss()

    def step_change(self, n: SimNode, a: int, b: int) -> None:
        e, value = ENTITIES[a % 3], VALUES[b % len(VALUES)]
        if n.ha.get(e) != value:  # HA reports no change when nothing changed
            self.user_change(n, e, value)
            n.ha[e] = (value[0], dict(value[1]))
            self.feed(n, LocalChange(e, value[0], dict(value[1])))

    def step_remove(self, n: SimNode, a: int, b: int) -> None:
        e = ENTITIES[a % 3]
        if e in n.ha:
            self.user_change(n, e, None)
            del n.ha[e]
            self.feed(n, EntityRemoved(e))

    def step_deliver(self, n: SimNode, a: int, b: int) -> None:
        self.deliver(n, b if a >= 6 else None)

    def step_replay(self, n: SimNode, a: int, b: int) -> None:
        """An old record is published again (a tool, an agent's stale queue)."""
        if self.history:
            self.publish(self.history[(a * 8 + b) % len(self.history)])

    def step_dup(self, n: SimNode, a: int, b: int) -> None:
        """QoS 1 delivers the message just delivered once more."""
        if n.connected and n.last_live is not None:
            self.receive(n, n.last_live, False)

    def step_connect(self, n: SimNode, a: int, b: int) -> None:
        self.connect(n)

    def step_disconnect(self, n: SimNode, a: int, b: int) -> None:
        self.disconnect(n)

    def step_ha(self, n: SimNode, a: int, b: int) -> None:
        if n.ha_queue:
            self.run_ha(n)

    def step_ha_fail(self, n: SimNode, a: int, b: int) -> None:
        if n.ha_queue:
            self.run_ha(n, ok=False)

    def step_tick(self, n: SimNode, a: int, b: int) -> None:
        self.feed(n, Tick())

    def step_time(self, n: SimNode, a: int, b: int) -> None:
        # At most 60 steps of 561 ms: with the offsets, clocks stay less than max_drift_ms (60 s) apart.
        self.t += a * 80

    def step_restart(self, n: SimNode, a: int, b: int) -> None:
        """The agent restarts: its state is lost, its HA keeps its values; the host's clock may be stepped."""
        while n.ha_queue:
            self.run_ha(n, answer=False, ok=a % 2 == 0)  # calls in flight may or may not have happened
        self.disconnect(n)
        self.restarted = True
        n.sync = SyncState(n.name)
        n.ever_synced, n.received, n.changed_to, n.made = False, {}, {}, {}
        n.changes = [c for c in n.changes if c.published]  # unpublished changes die with the agent
        n.offset = (b - 4) * 1000  # backwards too
        self.feed(n, LocalSnapshot(dict(n.ha)))

    def step_ha_restart(self, n: SimNode, a: int, b: int) -> None:
        """HA restarts under a running agent: the calls in flight succeed or fail."""
        while n.ha_queue:
            self.run_ha(n, ok=a % 2 == 0)
        self.feed(n, LocalSnapshot(dict(n.ha)))

    def step_broker(self, n: SimNode, a: int, b: int) -> None:
        """The broker restarts: every client is disconnected; retained records kept, wiped or rolled back."""
        for m in self.nodes:
            self.disconnect(m)
        if a % 3 == 1:
            self.retained = {}
        elif a % 3 == 2 and self.snapshots:
            self.retained = dict(self.snapshots[b % len(self.snapshots)])

    def check_loss(self) -> None:
        """Note entities whose highest published record is no longer held anywhere: not by the broker, not in
        a connected node's inbox, not by any node's state. No node can know it then; expect agreement only."""
        for e, created in self.created.items():
            held = [self.retained.get(e)] + [n.sync.record(e) for n in self.nodes]
            held += [item[0] for n in self.nodes for item in n.inbox if not isinstance(item, str)]
            if all(compare(h, created) < 0 for h in held if h is None or h.entity_id == e):
                self.lost.add(e)

    def settle(self) -> None:
        """Deliver everything among the connected nodes until nothing moves, and check that the broker then
        retains the newest record any of them knows (a connected node repairs a regression itself, without
        waiting for somebody to reconnect). Then reconnect everyone and do it again."""
        self.quiesce()
        for n in self.nodes:
            for e in ENTITIES:
                assert not n.connected or compare(n.sync.record(e), self.retained.get(e)) <= 0, (
                    f"{n.name} knows {n.sync.record(e)}, the broker retains {self.retained.get(e)}"
                )
        for n in self.nodes:
            self.connect(n)
        self.quiesce()

    def quiesce(self) -> None:
        for _ in range(500):
            moved = False
            for n in self.nodes:
                while n.inbox or n.ha_queue:
                    moved = True
                    if n.inbox:
                        self.deliver(n)
                    else:
                        self.run_ha(n)
                before = len(n.ha_queue) + sum(len(m.inbox) for m in self.nodes)
                self.feed(n, Tick())  # retries failed applies
                moved |= len(n.ha_queue) + sum(len(m.inbox) for m in self.nodes) != before
            self.t += 10
            self.check_loss()
            if not moved:
                return
        raise AssertionError("the cluster did not settle")

    def check_no_lost_update(self) -> None:
        """A change the user made is overwritten only by a record newer than the one it replaced.

        Exempt: changes lost with the agent before they were published (documented), entities whose newest
        record was lost, and a change stamped by a node that had not seen the record it replaced (a restarted
        node whose broker no longer held it: there is nothing to compare with)."""
        ha = self.nodes[0].ha
        for n in self.nodes:
            last = {change.entity_id: change for change in n.changes}  # earlier ones the user superseded
            for change in last.values():
                e = change.entity_id
                if e in self.lost or ha.get(e) == change.value or change.replaced is None:
                    continue
                assert change.stamped
                if compare(change.basis, change.replaced) < 0:
                    continue
                final = n.sync.record(e)
                assert compare(final, change.replaced) > 0, (
                    f"{n.name}'s change of {e} to {change.value} was undone by {final}, the record it replaced"
                )


def run_schedule(
    offsets: list[int],
    stuck: list[bool],
    initial: list[dict[str, Value]],
    warm: bool,
    steps: list[tuple[str, int, int, int]],
) -> Cluster:
    """Run a schedule, settle, and check the end state (see the property below); return the cluster."""
    cluster = Cluster(offsets, stuck, initial)
    if warm:
        cluster.settle()
    for step in steps:
        cluster.step(*step)
    cluster.settle()

    first = cluster.nodes[0]
    for n in cluster.nodes:
        assert n.synced and n.sync.pending() == 0, n.name
        assert n.ha == first.ha, f"{n.name} differs from {first.name}"
    for e in ENTITIES:
        records = [n.sync.record(e) for n in cluster.nodes] + [cluster.retained.get(e)]
        assert all(compare(r, records[0]) == 0 for r in records), e
        held = first.ha.get(e)
        if records[0] is None:
            assert held is None, e
            assert e not in cluster.created or e in cluster.lost, e
            continue
        assert held == records[0].value
        if e not in cluster.lost:
            assert compare(records[0], cluster.created[e]) == 0, f"{e}: not the newest version"
    assert cluster.restarted or not cluster.lost
    cluster.check_no_lost_update()
    return cluster


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    offsets=OFFSETS,
    stuck=STUCK,
    initial=INITIAL_HA,
    warm=st.booleans(),
    steps=schedules(KINDS),
)
def test_nodes_converge_to_the_newest_version(
    offsets: list[int],
    stuck: list[bool],
    initial: list[dict[str, Value]],
    warm: bool,
    steps: list[tuple[str, int, int, int]],
) -> None:
    """After any schedule:

    * once the connected nodes have delivered everything among themselves, the broker retains the newest
      record any of them knows (Cluster.settle): a regression is repaired without waiting for a reconnect;
    * once everyone is connected and everything is delivered, every node's HA holds the same values, and
      every node the same record per entity, which the broker retains;
    * that record is the highest one ever published (a tombstone: the entity is absent everywhere), unless
      every copy of it was lost (node restarts while the broker did not hold it), which needs a restart;
    * no lost update: a user's change is overwritten only by a record newer than the one it replaced
      (Cluster.check_no_lost_update);
    * along the way, no Apply/Remove was emitted for a value the node's HA already held, no Publish
      repeated what the broker had just shown the node on that topic (no echo) or came outside a synced
      connection, and no node published a value its user never set for an entity it had a record of
      (no stale value resurrected): all checked in Cluster.feed.
    """
    cluster = run_schedule(offsets, stuck, initial, warm, steps)
    event(f"repairs: {min(cluster.repairs, 3)}")
    if cluster.lost:
        event("a version was lost")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    offsets=OFFSETS,
    stuck=STUCK,
    initial=INITIAL_HA,
    steps=schedules(RACING_KINDS),
)
def test_racing_writers_converge_to_the_newest_version(
    offsets: list[int],
    stuck: list[bool],
    initial: list[dict[str, Value]],
    steps: list[tuple[str, int, int, int]],
) -> None:
    """The same checks, on a warm cluster whose nodes keep changing the same entities while messages are in
    flight: without restarts nothing may be lost, so every node ends on the newest version ever made."""
    cluster = run_schedule(offsets, stuck, initial, True, steps)
    assert not cluster.lost
    event(f"repairs: {min(cluster.repairs, 3)}")
