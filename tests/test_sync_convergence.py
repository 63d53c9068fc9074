"""Convergence of entity sync (hasync.sync.state): three nodes, each with a SyncState and a fake Home
Assistant (a dict), around a model broker, under adversarial schedules (hypothesis); they must end holding
the newest version everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from harness.records import T0
from hasync.sync.state import (
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
        actions = n.sync.handle(ev, self.wall(n))
        # pending() is kept per event: it must equal a count over every entity after each one.
        assert n.sync.pending() == sum(not n.sync._settled(ent) for ent in n.sync._entities.values())
        for action in actions:
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
