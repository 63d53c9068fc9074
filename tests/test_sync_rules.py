"""The entity sync state machine (hasync.sync.state), pure, one test per rule of its theory of operation:
explicit wall times in ms, no event loop, no network."""

from __future__ import annotations

from harness.records import T0, E, apply_of, drops, node, published, rec
from hasync.sync.hlc import Stamp
from hasync.sync.state import (
    AppliedRemote,
    ApplyFailed,
    Connected,
    Disconnected,
    EntityRecord,
    EntityRemoved,
    LocalChange,
    LocalSnapshot,
    RemoteUnreadable,
    RemoteVersion,
    Remove,
    RetainedDone,
    SyncState,
    Tick,
    compare,
)

# ---- the state machine, rule by rule ------------------------------------------------------------


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


def test_an_unreadable_message_on_a_topic_is_repaired_with_the_record_known() -> None:
    """Rule 4: garbage, another entity's record or a cleared topic leaves nothing a joiner could use."""
    b = node("b")
    record = rec("on", 5, "a")
    b.handle(RemoteVersion(record), T0 + 6)
    assert published(b.handle(RemoteUnreadable(E), T0 + 7)) == [record]  # the same record, unchanged
    # Each such message may have replaced the repair on the broker: each gets one.
    assert published(b.handle(RemoteUnreadable(E), T0 + 7)) == [record]
    b.handle(RemoteVersion(record), T0 + 8)  # its echo
    assert published(b.handle(RemoteUnreadable(E, retained=True), T0 + 9)) == []  # a late retained copy
    assert published(b.handle(RemoteUnreadable("input_boolean.unknown"), T0 + 9)) == []  # nothing to repair with
    b.handle(Disconnected(), T0 + 10)
    assert published(b.handle(RemoteUnreadable(E), T0 + 10)) == []  # not connected: it cannot publish
