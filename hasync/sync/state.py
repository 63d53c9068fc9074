"""Entity state sync: the pure reconciliation of one node, ``SyncState.handle(event, now_wall_ms) -> actions``.

Theory of operation
===================
Each mirrored Home Assistant entity has one retained topic. A record on it (``EntityRecord``) says "entity E
has this state and these attributes", or, as a *tombstone*, "E is deleted", and carries a *version*: a
hybrid-logical-clock stamp (``hasync.sync.hlc``) taken by the node where the change was made. Versions are
totally ordered (wall time, counter, node id) and the rule everywhere is **last writer wins**: of two records
for an entity, the higher version is the entity's value. Taking the higher of two records is commutative,
associative and idempotent, so a node may receive records in any order, any number of times, replays of old
ones included, and ends in the same place as soon as it has seen the highest one. Convergence therefore comes
down to two things: the highest record reaches every node, and every node makes its HA hold it.

(Two *different* records never share a version in normal operation: a node's clock never repeats a stamp. It
can happen if a node id is reused by a clock that lost its memory: a restart with a wall clock set back while
the bus has lost the node's newest record, or two agents configured with one node id. Records with equal
versions are then ordered by their canonical JSON, so every node still picks the same one.)

What a node keeps, per entity
-----------------------------
* ``best``: the highest record it knows, received from the bus or made here from a local change;
* ``local``: what its HA holds, as far as it knows: a value, absent, or unknown (before the first snapshot);
* ``bus``: the last record the broker delivered on the topic during the current connection, which is what
  the broker retains as far as this node can tell (one broker delivers a topic's messages to each
  subscriber in the order it stored them). A retained copy is the store at subscribe time: it never
  replaces a live record of the topic already delivered on this connection, should it arrive after one;
* at most one ``Apply`` awaiting its answer; the first and the last record it published on this connection,
  and the newest of those it has seen come back;
* a local change made before the first ``RetainedDone`` that is not stamped yet (rule 6).

No queues: a burst of versions for one entity coalesces into ``best``; memory is a few references per entity
and the number of entities is capped (``max_entities``; past it, new entities are dropped with a ``Drop``).

The rules
---------
1. **Receiving.** A record, retained or live, is first fed to the clock (so later local stamps follow it).
   Higher than ``best``: it becomes ``best``. Equal: an echo or duplicate, nothing to do. Lower:
   ``Drop("stale")``. A stamp too far ahead of the local wall clock is refused: ``Drop("clock_drift")``.
2. **Applying.** Whenever ``local`` is known and differs from ``best``, the node emits ``Apply`` (``Remove`` for
   a tombstone) with ``best``'s version, one at a time per entity. The caller answers ``AppliedRemote`` (HA
   now holds that version) or ``ApplyFailed`` (retried on the next ``Tick``, or as soon as HA reports a change
   of the entity or a new snapshot). Versions that arrive meanwhile
   are not queued: after the answer, the node applies whatever ``best`` is then. Nothing is applied when HA
   already holds the value (state and attributes compared), so HA sees no spurious writes.
3. **Local changes.** ``LocalChange`` and ``EntityRemoved`` (the caller has filtered out the changes it caused
   itself) update ``local``. If the new value differs from ``best``, the node stamps a new record: the stamp is
   above every record the node has seen, so a user's change always beats the value the user was looking at.
4. **Publishing.** Only while connected and outside the reconcile window (rule 5), the node publishes
   ``best`` (retained) when it is higher than ``bus``, once per connection. A publication is never a reply to
   receiving the same record: a node republishes a record it did not make only when the broker has shown it
   an older record on that topic, or none at all, during this connection, that is when the broker's retained
   record has regressed (below). Two exceptions keep this exact. The echo of the node's own earlier
   publication on this connection, overtaken by a newer one it already sent, is no regression: the broker
   processes one client's messages in order, so the newer one is stored after it. And a retained copy that
   arrives after a live record of the topic (retained copies are the store at subscribe time, and may come
   late) does not change ``bus``: the live record is the newer state of the broker. A message on the topic
   that is not a valid record of the entity (garbage, another entity's record, an empty payload clearing
   it: ``RemoteUnreadable``) leaves the broker holding nothing a node could use: ``bus`` is forgotten, and a
   node that knows a record publishes it again, so the topic is repaired for nodes that join later.
5. **Reconcile window.** ``Connected`` forgets ``bus`` and opens the window: nothing is published until the
   caller sends ``RetainedDone`` (its subscription's retained delivery is over, e.g. after a short quiet
   period). Records received meanwhile are handled by rule 1 and applied by rule 2 as usual. At
   ``RetainedDone`` the node publishes every ``best`` that is newer than what the bus showed: changes made
   while disconnected, which lost to anything newer made elsewhere in the meantime, and repairs. So nothing
   derived from a pre-disconnect view is published without first comparing it to the retained records.
6. **Restarts.** A fresh ``SyncState`` knows no versions, and a fresh clock may be behind the node's own
   earlier stamps (its wall clock may have gone back). So until its first ``RetainedDone`` a node stamps
   nothing: local changes and removals are remembered unstamped (the value the user set, kept apart from what
   HA holds, which an ``Apply`` answered meanwhile may change) and stamped at ``RetainedDone``, after the
   clock has absorbed the retained records; HA is then set back to the user's value if needed.
   ``LocalSnapshot`` (what HA holds after a start) only sets ``local``; it never makes a version for an entity
   that has one. Where HA differs from the bus, **the bus wins**: the node cannot tell a stale HA (down while
   the others changed things) from a change made while no agent was watching, and taking the stale value
   would undo other nodes' newer changes. An entity in the snapshot that the bus has never seen (and an entity
   that appears in HA, ``LocalChange(appeared=True)``) is published with the node's *lowest* version,
   ``Stamp(0, 0, node)``: nobody changed that value while the node watched, so any record made anywhere beats
   it, also one the broker failed to deliver to this node; between two such values the node ids decide.
7. **Tombstones stick.** A removal is a record like any other. A snapshot that still contains the entity
   does not bring it back (rule 6: the node removes it); only a local change after the tombstone does, since
   its stamp is newer. Tombstones stay retained.

What converges, and under which assumptions
--------------------------------------------
Once every node is connected, has received what the broker holds and what is published, and its HA has
answered every ``Apply``, all nodes hold the same ``best`` for every entity, every HA holds that value (or
lacks a tombstoned entity), and the broker retains it. That ``best`` is the highest version ever published,
unless it was lost (below). Assumed:

* one broker, which delivers each topic's live messages to every connected subscriber in the order it stored
  them, a node's own messages included (no MQTT v5 "no local"); the retained copies sent on subscribing may
  come late, even after ``RetainedDone``;
* clocks within ``max_drift_ms`` of each other (NTP); otherwise the nodes behind drop the records of the node
  ahead and do not converge on those entities;
* a caller that answers every ``Apply``, reports every change it did not cause, and feeds a record only
  between the ``Connected`` and ``Disconnected`` of the connection that received it (a record left in a
  client-side queue from an earlier connection is not what the broker holds now: drop it).

Time: ``now_wall_ms`` is wall-clock time and is used only to stamp versions. Nothing here expires; a failed
``Apply`` waits for the caller's next ``Tick``.

MQTT has no compare-and-set. Two nodes that publish one entity at the same moment may leave the broker
retaining the *older* record (it stores whichever arrives last). Every node that knows the newer one sees the
older one arrive after it and republishes the newer record unchanged (rule 4), so the retained record is
repaired within one round trip. A version is **lost** only if the broker does not hold it (lost in such a race,
or in a broker restart without persistence, or rolled back by one with periodic persistence) and every node
that knew it restarted before republishing it. A node that restarts also loses its own changes made while it
was disconnected and not yet published: after the restart its HA still shows them, but the bus wins (rule 6).

What the user sees
------------------
When two nodes change one helper at about the same time, the change with the later stamp, that is with the
later wall-clock time as the clocks tell it, wins on every node. The other node's change is overwritten a
moment later: its HA shows the user's value, then the winner's. With clocks apart by *d*, the node whose clock
is ahead wins conflicts up to *d* apart. A change made after seeing another value always wins over that value.
A change made on a node disconnected from the broker shows at once on that node, and on the others after it
reconnects, unless someone changed the entity in the meantime; then it is overwritten there too.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import (
    Field,
    JsonValue,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from ..messages import Message, NodeId, Term
from ..topics import ENTITY_ID, ENTITY_ID_PATTERN
from .hlc import DEFAULT_MAX_DRIFT_MS, HLC, ClockDriftError, Stamp

Attributes = dict[str, JsonValue]
Value = tuple[str, Attributes]  # state and attributes, as HA holds them

MAX_STATE_LENGTH = 255  # Home Assistant's own limit


def _stamp(value: object) -> Stamp:
    if isinstance(value, Stamp):
        return value
    if isinstance(value, str):
        return Stamp.from_wire(value)
    raise ValueError(f"a version is a stamp string like '1795300000000-0003-ha-1', got {type(value).__name__}")


Version = Annotated[
    Stamp,
    PlainValidator(_stamp),
    PlainSerializer(Stamp.to_wire, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^[0-9]{13}-[0-9]{4}-[A-Za-z0-9_-]{1,64}$"}),
]


class EntityRecord(Message):
    """The retained record of one entity: its value (or a tombstone) at one version.

    ``version`` is a ``Stamp`` in its wire form; ``origin`` is the node that made the change and must equal
    ``version.node``. ``leader_term`` is the election term the origin knew when it made the change: for
    humans and logs, never used to decide anything.
    """

    entity_id: Annotated[str, Field(pattern=ENTITY_ID_PATTERN, max_length=255)]
    state: Annotated[str, Field(max_length=MAX_STATE_LENGTH)] | None = None
    tombstone: bool = False
    attributes: Attributes = Field(default_factory=dict)
    version: Version
    origin: NodeId
    leader_term: Term = 0

    @model_validator(mode="after")
    def _shape(self) -> EntityRecord:
        if self.tombstone:
            if self.state is not None or self.attributes:
                raise ValueError("a tombstone carries no state and no attributes")
        elif self.state is None:
            raise ValueError("a record carries a state, unless it is a tombstone")
        if self.version.node != self.origin:
            raise ValueError(f"origin {self.origin!r} is not the node of version {self.version.to_wire()}")
        return self

    @property
    def value(self) -> Value | None:
        """``(state, attributes)``, or None for a tombstone."""
        if self.tombstone or self.state is None:
            return None
        return (self.state, self.attributes)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compare(a: EntityRecord | None, b: EntityRecord | None) -> int:
    """-1, 0 or 1 as ``a`` is older than, the same as, or newer than ``b``; None is older than anything.

    Records are ordered by version; two different records with one version by their canonical JSON.
    """
    if a is b:
        return 0
    if a is None or b is None:
        return (a is not None) - (b is not None)
    if a.version != b.version:
        return 1 if a.version > b.version else -1
    if a == b:
        return 0
    ka, kb = _canonical(a.model_dump(mode="json")), _canonical(b.model_dump(mode="json"))
    return (ka > kb) - (ka < kb)


def _same_value(a: Value | None, b: Value | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return a[0] == b[0] and _same_json(a[1], b[1])


def _same_json(x: object, y: object) -> bool:
    """Equal as JSON values, types included: not ==, since 1 == 1.0 == True in Python but HA would show them
    differently. (Comparing canonical JSON strings gives the same answer, at many times the cost.) One object
    is the same value: an applied record's attributes are what HA then holds, compared on every event."""
    if x is y:
        return True
    if type(x) is not type(y):
        return False
    if isinstance(x, dict):
        assert isinstance(y, dict)
        return x.keys() == y.keys() and all(_same_json(v, y[k]) for k, v in x.items())
    if isinstance(x, list):
        assert isinstance(y, list)
        return len(x) == len(y) and all(_same_json(v, w) for v, w in zip(x, y, strict=True))
    return x == y


# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalChange:
    """HA reported a new value that this node did not cause by applying a record.

    ``appeared``: the entity was just created in HA (it was absent). Like an entity in a ``LocalSnapshot``,
    its first value is not a user's change: where the bus has a value for it, the bus wins. Only where the bus
    holds a tombstone is the creation a change (the user brought the entity back).
    """

    entity_id: str
    state: str
    attributes: Attributes = field(default_factory=dict)
    appeared: bool = False


@dataclass(frozen=True)
class EntityRemoved:
    """The entity was deleted from the local HA (not by a ``Remove`` of ours)."""

    entity_id: str


@dataclass(frozen=True)
class AppliedRemote:
    """The local HA now holds ``version``: the answer to an ``Apply`` or ``Remove``."""

    entity_id: str
    version: Stamp


@dataclass(frozen=True)
class ApplyFailed:
    """An ``Apply`` or ``Remove`` did not take effect; tried again on the next ``Tick`` (or sooner, rule 2)."""

    entity_id: str
    version: Stamp
    reason: str = ""


@dataclass(frozen=True)
class RemoteVersion:
    """A valid record received on an entity topic (``retained``: delivered as the broker's retained copy)."""

    record: EntityRecord
    retained: bool = False


@dataclass(frozen=True)
class RemoteUnreadable:
    """A message on the entity's topic that is not a valid record of it (``retained``: as above)."""

    entity_id: str
    retained: bool = False


@dataclass(frozen=True)
class LocalSnapshot:
    """Everything the local HA holds of the mirrored entities, after HA or the agent (re)started.

    An entity that is not in the snapshot is absent from HA.
    """

    entities: Mapping[str, Value]


@dataclass(frozen=True)
class Connected:
    """Connected and subscribed to the entity topics: the reconcile window opens."""


@dataclass(frozen=True)
class Disconnected:
    reason: str = "connection lost"


@dataclass(frozen=True)
class RetainedDone:
    """The subscription's retained records have all been delivered: the reconcile window closes."""


@dataclass(frozen=True)
class Tick:
    """Periodic: retries failed applies."""


Event = (
    LocalChange
    | EntityRemoved
    | AppliedRemote
    | ApplyFailed
    | RemoteVersion
    | RemoteUnreadable
    | LocalSnapshot
    | Connected
    | Disconnected
    | RetainedDone
    | Tick
)


# ---- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish ``record`` on its entity's topic."""

    record: EntityRecord
    retain: bool = True


@dataclass(frozen=True)
class Apply:
    """Set the local entity to this state and these attributes (creating it if it is absent), then answer
    ``AppliedRemote(entity_id, version)`` or ``ApplyFailed``."""

    entity_id: str
    state: str
    attributes: Attributes
    version: Stamp


@dataclass(frozen=True)
class Remove:
    """Delete the local entity (a tombstone won), then answer ``AppliedRemote`` or ``ApplyFailed``."""

    entity_id: str
    version: Stamp


class DropReason(enum.StrEnum):
    """Why sync ignored something (the label of ``hasync_sync_dropped_total``)."""

    STALE = "stale"
    CLOCK_DRIFT = "clock_drift"
    APPLY_FAILED = "apply_failed"
    UNEXPECTED_ANSWER = "unexpected_answer"
    UNEXPECTED_RETAINED_DONE = "unexpected_retained_done"
    INVALID_LOCAL_VALUE = "invalid_local_value"
    TOO_MANY_ENTITIES = "too_many_entities"
    NOT_SELECTED = "not_selected"
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class Drop:
    """Something was ignored; ``reason`` is its label for metrics, ``detail`` is for the log."""

    reason: DropReason
    entity_id: str | None = None
    detail: str = ""


Action = Publish | Apply | Remove | Drop


# ---- state --------------------------------------------------------------------------------------


class _Unknown(enum.Enum):
    UNKNOWN = "unknown"


_UNKNOWN = _Unknown.UNKNOWN


@dataclass(frozen=True, slots=True)
class _Intent:
    """A local change not stamped yet: the value the user set (None: removed)."""

    value: Value | None


@dataclass(slots=True)
class _Entity:
    entity_id: str
    local: Value | _Unknown | None  # what HA holds: a value, absent (None), or unknown
    best: EntityRecord | None = None  # the highest record known
    bus: EntityRecord | None = None  # the last record delivered on the topic during this connection
    first_sent: EntityRecord | None = None  # the first record published during this connection
    sent: EntityRecord | None = None  # the last record published during this connection
    echoed: EntityRecord | None = None  # the newest of our own records seen to come back (this connection)
    live: bool = False  # a live (not retained) record was delivered on the topic during this connection
    applying: EntityRecord | None = None  # an Apply/Remove awaiting its answer
    # A local change seen before the first RetainedDone, stamped then. Kept apart from ``local``: an Apply
    # answered meanwhile changes what HA holds, not what the user asked for.
    intent: _Intent | None = None
    failed: bool = False  # the last Apply failed: wait for a Tick


class SyncState:
    """One node's entity sync. Feed it events with the wall time in ms; do what it returns.

    ``leader_term`` is copied into the records this node makes (informational); the caller keeps it current.
    """

    def __init__(
        self,
        node: str,
        *,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
        max_entities: int = 10_000,
        leader_term: int = 0,
    ) -> None:
        self.node = node
        self.hlc = HLC(node, max_drift_ms)
        self.max_entities = max_entities
        self.leader_term = leader_term
        self.connected = False
        self._in_window = False
        self._ever_synced = False  # the clock has absorbed a retained snapshot: local changes may be stamped
        self._ha_known = False  # a LocalSnapshot has told what HA holds
        self._entities: dict[str, _Entity] = {}
        self._unsettled: set[str] = set()  # the entities ``pending`` counts, brought up to date by every event

    # ---- queries --------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """Connected, and the reconcile window of this connection is over: publishing is allowed."""
        return self.connected and not self._in_window

    def record(self, entity_id: str) -> EntityRecord | None:
        """The highest record this node knows for ``entity_id``."""
        ent = self._entities.get(entity_id)
        return ent.best if ent else None

    def records(self) -> dict[str, EntityRecord]:
        return {e: ent.best for e, ent in self._entities.items() if ent.best is not None}

    def pending(self) -> int:
        """How many entities have work outstanding: a change not yet stamped, an Apply that is needed or
        unanswered, or a best record the bus has not been seen to hold (this connection). Kept as events are
        handled (metrics and status read it often; a pass over ten thousand entities each time is not free)."""
        return len(self._unsettled)

    # ---- the entry point ------------------------------------------------------------------------

    def handle(self, event: Event, now_wall_ms: int) -> list[Action]:
        actions: list[Action] = []
        now = now_wall_ms
        touched: str | None = None  # the one entity the event may change; None: any of them
        match event:
            case LocalChange(entity_id=entity_id, state=state, attributes=attributes, appeared=appeared):
                touched = entity_id
                self._on_local(entity_id, (state, dict(attributes)), now, actions, appeared=appeared)
            case EntityRemoved(entity_id=entity_id):
                touched = entity_id
                self._on_local(entity_id, None, now, actions)
            case RemoteVersion(record=record, retained=retained):
                touched = record.entity_id
                self._on_remote(record, retained, now, actions)
            case RemoteUnreadable(entity_id=entity_id, retained=retained):
                touched = entity_id
                self._on_unreadable(entity_id, retained, now, actions)
            case AppliedRemote(entity_id=entity_id, version=version):
                touched = entity_id
                ent = self._answered(entity_id, version, actions)
                if ent is not None and ent.applying is not None:
                    ent.local = ent.applying.value
                    ent.applying = None
                    self._reconcile(ent, now, actions)
            case ApplyFailed(entity_id=entity_id, version=version, reason=reason):
                touched = entity_id
                ent = self._answered(entity_id, version, actions)
                if ent is not None:
                    ent.applying = None
                    ent.failed = True
                    actions.append(Drop(DropReason.APPLY_FAILED, entity_id, reason))
            case LocalSnapshot(entities=entities):
                self._on_snapshot(entities, now, actions)
            case Connected():
                self.connected = True
                self._in_window = True
                for ent in self._entities.values():
                    ent.bus = ent.first_sent = ent.sent = ent.echoed = None
                    ent.live = False
            case Disconnected():
                self.connected = False
                self._in_window = False
            case RetainedDone():
                if not self.connected or not self._in_window:
                    actions.append(Drop(DropReason.UNEXPECTED_RETAINED_DONE, None, "not in a reconcile window"))
                else:
                    self._in_window = False
                    self._ever_synced = True
                    self._reconcile_all(now, actions)
            case Tick():
                self._reconcile_all(now, actions, retry=True)
        self._recount(touched)
        return actions

    def _recount(self, entity_id: str | None) -> None:
        if entity_id is None:
            self._unsettled = {e for e, ent in self._entities.items() if not self._settled(ent)}
            return
        ent = self._entities.get(entity_id)
        if ent is None or self._settled(ent):
            self._unsettled.discard(entity_id)
        else:
            self._unsettled.add(entity_id)

    # ---- events ---------------------------------------------------------------------------------

    def _on_local(
        self, entity_id: str, value: Value | None, now: int, actions: list[Action], *, appeared: bool = False
    ) -> None:
        problem = self._invalid(entity_id, value)
        if problem is not None:
            actions.append(Drop(DropReason.INVALID_LOCAL_VALUE, entity_id, problem))
            return
        ent = self._entity(entity_id, actions)
        if ent is None:
            return
        if ent.local is not _UNKNOWN and _same_value(ent.local, value):
            return  # nothing changed
        ent.local = value
        ent.failed = False  # HA changed: an Apply that failed before may work now
        if not (appeared and ent.intent is None and (ent.best is None or not ent.best.tombstone)):
            ent.intent = _Intent(value)
        self._reconcile(ent, now, actions)

    def _on_remote(self, rec: EntityRecord, retained: bool, now: int, actions: list[Action]) -> None:
        try:
            self.hlc.update(rec.version, now)
        except ClockDriftError as exc:
            actions.append(Drop(DropReason.CLOCK_DRIFT, rec.entity_id, str(exc)))
            return
        ent = self._entity(rec.entity_id, actions)
        if ent is None:
            return
        # The first sighting of a record we published on this connection (they only ever go up, so those are
        # our own from the first one sent to the last). If we sent a newer one after it, this is its echo and
        # no sign of a regression: the broker stores one client's messages in order, so ours comes after it.
        echo = (
            rec.origin == self.node
            and compare(ent.first_sent, rec) <= 0 <= compare(ent.sent, rec)
            and compare(rec, ent.echoed) > 0
        )
        if self.connected:
            # A retained copy is the broker's store at subscribe time: once a live record of the topic has
            # arrived, that is newer broker state, and a retained copy delivered late must not replace it.
            if not (retained and ent.live):
                ent.bus = rec
            ent.live = ent.live or not retained
            if echo:
                ent.echoed = rec
        order = compare(rec, ent.best)
        if order > 0:
            ent.best = rec
        elif order < 0:
            assert ent.best is not None
            where = "retained" if retained else "live"
            actions.append(
                Drop(DropReason.STALE, rec.entity_id, f"{where} {rec.version} is older than {ent.best.version}")
            )
            if self.connected and not (echo and compare(rec, ent.sent) < 0):
                ent.sent = None  # the broker holds an older record than ours: publish ours again
        self._reconcile(ent, now, actions)

    def _on_unreadable(self, entity_id: str, retained: bool, now: int, actions: list[Action]) -> None:
        ent = self._entities.get(entity_id)
        if ent is None or not self.connected or (retained and ent.live):
            return  # nothing to repair it with; or a late retained copy, older than what the topic got since
        ent.bus = None
        ent.live = ent.live or not retained
        ent.sent = None
        self._reconcile(ent, now, actions)

    def _on_snapshot(self, entities: Mapping[str, Value], now: int, actions: list[Action]) -> None:
        self._ha_known = True
        held: dict[str, Value | _Unknown] = {}
        for entity_id, (state, attributes) in entities.items():
            value = (state, dict(attributes))
            problem = self._invalid(entity_id, value)
            if problem is not None:
                actions.append(Drop(DropReason.INVALID_LOCAL_VALUE, entity_id, problem))
            if ENTITY_ID.fullmatch(entity_id) and self._entity(entity_id, actions) is not None:
                # A value that cannot be a record: HA holds *something*, so never judge it absent.
                held[entity_id] = value if problem is None else _UNKNOWN
        for entity_id, ent in self._entities.items():
            ent.local = held.get(entity_id)
            ent.failed = False  # HA is back (or restarted): an Apply that failed before may work now
        self._reconcile_all(now, actions)

    def _answered(self, entity_id: str, version: Stamp, actions: list[Action]) -> _Entity | None:
        ent = self._entities.get(entity_id)
        if ent is None or ent.applying is None or ent.applying.version != version:
            actions.append(Drop(DropReason.UNEXPECTED_ANSWER, entity_id, f"no Apply of {version} awaits an answer"))
            return None
        return ent

    # ---- decisions ------------------------------------------------------------------------------

    def _reconcile_all(self, now: int, actions: list[Action], *, retry: bool = False) -> None:
        for ent in self._entities.values():
            self._reconcile(ent, now, actions, retry=retry)

    def _reconcile(self, ent: _Entity, now: int, actions: list[Action], *, retry: bool = False) -> None:
        local = ent.local
        if self._ever_synced:
            if ent.intent is not None:
                self._stamp(ent, ent.intent.value, now)
                ent.intent = None
            elif ent.best is None and local is not _UNKNOWN and local is not None:
                # An entity the bus has never seen, with a value nobody changed while this node watched (HA's
                # snapshot, or a new entity's first value): it gets this node's lowest version, so that any
                # record made anywhere beats it. Should the broker have dropped retained records on the way
                # to this node, a stale value of HA cannot overwrite the cluster's newer one.
                ent.best = self._make(ent.entity_id, local, Stamp(0, 0, self.node))
        best = ent.best
        if best is None:
            return
        if local is not _UNKNOWN and ent.intent is None and ent.applying is None and (retry or not ent.failed):
            want = best.value
            if not _same_value(local, want):
                ent.failed = False
                ent.applying = best
                if want is None:
                    actions.append(Remove(ent.entity_id, best.version))
                else:
                    actions.append(Apply(ent.entity_id, want[0], want[1], best.version))
        if self.synced and compare(best, ent.bus) > 0 and compare(best, ent.sent) != 0:
            if ent.first_sent is None:
                ent.first_sent = best
            ent.sent = best
            actions.append(Publish(best))

    def _stamp(self, ent: _Entity, want: Value | None, now: int) -> None:
        """Make a record of the local value, if it differs from ``best``."""
        best = ent.best
        if (best is None and want is None) or (best is not None and _same_value(best.value, want)):
            return
        ent.best = self._make(ent.entity_id, want, self.hlc.now(now))

    def _make(self, entity_id: str, value: Value | None, version: Stamp) -> EntityRecord:
        return EntityRecord(
            entity_id=entity_id,
            state=None if value is None else value[0],
            attributes={} if value is None else value[1],
            tombstone=value is None,
            version=version,
            origin=self.node,
            leader_term=self.leader_term,
        )

    def _settled(self, ent: _Entity) -> bool:
        if ent.intent is not None or ent.applying is not None or ent.local is _UNKNOWN:
            return False
        if ent.best is None:
            return ent.local is None
        return _same_value(ent.local, ent.best.value) and compare(ent.best, ent.bus) <= 0

    def _entity(self, entity_id: str, actions: list[Action]) -> _Entity | None:
        ent = self._entities.get(entity_id)
        if ent is None:
            if len(self._entities) >= self.max_entities:
                actions.append(Drop(DropReason.TOO_MANY_ENTITIES, entity_id, f"already {self.max_entities} entities"))
                return None
            ent = _Entity(entity_id, local=None if self._ha_known else _UNKNOWN)
            self._entities[entity_id] = ent
        return ent

    def _invalid(self, entity_id: str, value: Value | None) -> str | None:
        """Why this local value cannot be made a record, or None."""
        if not ENTITY_ID.fullmatch(entity_id):
            return f"entity id {entity_id!r} is not 'domain.object_id' (a-z, 0-9, '_')"
        if value is None:
            return None
        try:
            self._make(entity_id, value, Stamp(0, 0, self.node))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            return f"{where}: {first['msg']}"
        return None
