"""Entity sync I/O: drives the pure ``hasync.sync.SyncState`` from MQTT and from a state backend.

Theory of operation
-------------------
``Replica`` owns one ``SyncState`` and is only touched from the event loop's thread. Events reach it from
three sides, and it feeds each to the state machine at once, in the order they happen:

* the **broker**: ``connected()`` when a session starts (before subscribing), each record on an entity topic
  (``on_record``), the node's own sync marker (``on_marker``), ``disconnected()``;
* the **backend**, where the entities live (``HomeAssistantBackend`` or, for tests, demos and benchmarks,
  ``MemoryBackend``): a snapshot after it (re)connects, each local change, and the answer to each apply;
* **time**: ``run()`` ticks every ``retry_interval`` (failed applies are retried), flushes throttled values
  when they fall due, and closes the reconcile window after ``reconcile_timeout`` if the marker never came.

The reconcile window of a connection closes when the node's marker comes back: the node subscribes to the
entity topics, then publishes a marker (a nonce of this connection) on its own marker topic; the broker
queues the retained records for the subscription before it routes the marker, so the marker arrives after
them. A broker that does not keep that order only makes the node publish a repair it did not need, which the
state machine handles like any other record (``hasync.sync`` rule 4).

What the state machine asks for is done without blocking it:

* ``Publish``: the record goes into a map keyed by entity, which the session's sender drains in insertion
  order with at most ``MAX_IN_FLIGHT`` publishes awaiting their acknowledgement. A newer record of an entity
  replaces one still waiting (latest wins), so a burst costs one publish per entity, and memory is bounded by
  the number of entities.
* ``Apply``/``Remove``: also a map keyed by entity; the applier hands the backend up to ``APPLY_BATCH`` at a
  time (one ``scene.apply`` call for Home Assistant) and the backend answers each entity.

Echo suppression: a change the node applies must not come back from the backend as a new local change. With
Home Assistant the proof is the context: ``scene.apply`` answers with the context id of the call, and every
``state_changed`` event the call caused carries it. Events of entities in an apply in flight are held until
the call's answer, then handled in their order; those with the call's context are the apply's own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .config import SyncConfig
from .hlc import Stamp
from .homeassistant import CommandFailed, HomeAssistantError, HomeAssistantLink
from .messages import MessageError, SyncSummary, parse
from .metrics import Metrics
from .mqtt import MqttFailure, Session, wait_or
from .selection import Selector, Throttle
from .sync import (
    Action,
    AppliedRemote,
    Apply,
    ApplyFailed,
    Attributes,
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
)
from .topics import Topics

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # publishes awaiting their acknowledgement, per session: below mqtt.MAX_INFLIGHT
PUBLISH_TIMEOUT = 10.0  # s; a broker that never acknowledges must not hold a slot forever
APPLY_BATCH = 250
SUMMARY_REFRESH = 5.0  # s between two passes over every entity for the heartbeat's counts
MAX_RECORD_BYTES = 16 * 1024

# Drops that are part of normal operation (replays, races, our own echoes): logged at DEBUG only.
_QUIET_DROPS = {"stale", "unexpected_answer"}


class Sink(Protocol):
    """What a backend reports to the replica."""

    def local_snapshot(self, entities: Mapping[str, Value]) -> None: ...
    def local_changed(self, entity_id: str, value: Value | None, *, appeared: bool = False) -> None: ...
    def applied(self, entity_id: str, version: Stamp) -> None: ...
    def apply_failed(self, entity_id: str, version: Stamp, reason: str) -> None: ...


class Backend(Protocol):
    name: str

    def bind(self, sink: Sink, selected: Callable[[str], bool]) -> None: ...
    async def apply(self, batch: list[Apply | Remove]) -> None: ...


class Replica:
    def __init__(
        self,
        node: str,
        topics: Topics,
        config: SyncConfig,
        backend: Backend,
        metrics: Metrics,
        *,
        publish: Callable[[str, bytes, bool], None],
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.topics = topics
        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.selected: Selector = config.selector()
        self.state = SyncState(node, max_drift_ms=int(config.max_clock_drift * 1000),
                               max_entities=config.max_entities)
        self.throttle = Throttle(config.throttle_rules())
        self._publish_direct = publish  # the agent's ordered outbox (for the marker)
        self._wall_ms = wall_ms
        self._clock = clock
        self._dirty: dict[str, EntityRecord] = {}
        self._dirty_event = asyncio.Event()
        self._applies: dict[str, Apply | Remove] = {}
        self._applies_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._marker: str | None = None
        self._window_deadline = math.inf
        self._logged: set[tuple[str, str | None]] = set()
        self.last_lag: float | None = None
        self._counts = (0, 0)
        self._counts_at = -math.inf
        backend.bind(self, self.selected)

    # ---- queries --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "synced": self.state.synced,
            "entities": len(self.state.records()),
            "pending": self.state.pending(),
            "queued": len(self._dirty) + len(self._applies),
            "lag_seconds": None if self.last_lag is None else round(self.last_lag, 4),
        }

    def summary(self) -> SyncSummary:
        """For heartbeats: the counts that take a pass over every entity are refreshed every few seconds."""
        now = self._clock()
        if now >= self._counts_at + SUMMARY_REFRESH:
            self._counts = (len(self.state.records()), self.state.pending())
            self._counts_at = now
        return SyncSummary(
            synced=self.state.synced, entities=self._counts[0], pending=self._counts[1],
            queued=len(self._dirty) + len(self._applies),
            lag_ms=None if self.last_lag is None else int(self.last_lag * 1000),
        )

    # ---- the broker side ------------------------------------------------------------------------

    def subscriptions(self) -> list[str]:
        return [self.topics.all_entities, self.topics.sync_marker(self.node)]

    def connected(self) -> None:
        """A session started; call before subscribing to ``subscriptions()``."""
        self._dirty.clear()
        self._marker = None
        self._feed(Connected())

    def subscribed(self) -> None:
        """The subscriptions are in place: send the marker that closes the reconcile window."""
        self._marker = secrets.token_hex(8)
        self._window_deadline = self._clock() + self.config.reconcile_timeout
        self._publish_direct(self.topics.sync_marker(self.node), self._marker.encode(), False)
        self._wake.set()

    def disconnected(self) -> None:
        self._marker = None
        self._window_deadline = math.inf
        self._dirty.clear()
        self._feed(Disconnected())

    def on_marker(self, payload: bytes) -> None:
        if self._marker is not None and payload == self._marker.encode():
            self._close_window("its marker came back")

    def on_record(self, entity_id: str, payload: bytes, retained: bool) -> None:
        """A message on an entity topic. Raises MessageError for an invalid one (the caller counts it)."""
        if not payload:
            return  # a cleared topic
        record = parse(EntityRecord, payload)
        if record.entity_id != entity_id:
            raise MessageError("entity_mismatch", f"a record of {record.entity_id} on {entity_id}'s topic")
        self.metrics.sync_received.inc()
        if not self.selected(entity_id):
            self._drop(Drop("not_selected", entity_id, "not selected on this node"))
            return
        self._feed(RemoteVersion(record, retained=retained))

    def _close_window(self, why: str) -> None:
        if self._marker is None:
            return
        self._marker = None
        self._window_deadline = math.inf
        logger.debug("sync: retained records received (%s)", why)
        self._feed(RetainedDone())
        self.metrics.sync_synced.set(1)

    # ---- the backend side (Sink) ----------------------------------------------------------------

    def local_snapshot(self, entities: Mapping[str, Value]) -> None:
        selected = {e: v for e, v in entities.items() if self.selected(e)}
        logger.info("sync: %d mirrored entities in %s", len(selected), self.backend.name)
        self._feed(LocalSnapshot(selected))

    def local_changed(self, entity_id: str, value: Value | None, *, appeared: bool = False) -> None:
        if not self.selected(entity_id):
            return
        self.metrics.sync_local_changes.inc()
        if value is None:
            self.throttle.forget(entity_id)
            self._feed(EntityRemoved(entity_id))
        elif appeared or self.throttle.offer(entity_id, value, self._clock()):
            self._feed(LocalChange(entity_id, value[0], value[1], appeared=appeared))
        else:
            self._wake.set()  # a held value falls due later

    def applied(self, entity_id: str, version: Stamp) -> None:
        self.throttle.forget(entity_id)
        self.metrics.sync_applied.inc()
        lag = max(0.0, (self._wall_ms() - version.wall_ms) / 1000)
        self.last_lag = lag
        self.metrics.sync_lag.observe(lag)
        self._feed(AppliedRemote(entity_id, version))

    def apply_failed(self, entity_id: str, version: Stamp, reason: str) -> None:
        self.metrics.sync_apply_failures.inc()
        self._feed(ApplyFailed(entity_id, version, reason))

    # ---- the state machine ----------------------------------------------------------------------

    def set_leader_term(self, term: int) -> None:
        self.state.leader_term = term

    def _feed(self, event: Event) -> None:
        self._execute(self.state.handle(event, self._wall_ms()))

    def _execute(self, actions: Iterable[Action]) -> None:
        for action in actions:
            match action:
                case Publish(record=record):
                    self._dirty.pop(record.entity_id, None)  # re-inserted last: drained in order of change
                    self._dirty[record.entity_id] = record
                    self._dirty_event.set()
                case Apply(entity_id=entity_id) | Remove(entity_id=entity_id):
                    self._applies[entity_id] = action
                    self._applies_event.set()
                case Drop():
                    self._drop(action)

    def update_gauges(self) -> None:
        """Set the gauges that take a pass over every entity (called when metrics are read)."""
        self.metrics.sync_pending.set(self.state.pending())
        self.metrics.sync_queued.set(len(self._dirty) + len(self._applies))

    def _drop(self, drop: Drop) -> None:
        self.metrics.sync_dropped.labels(drop.reason).inc()
        key = (drop.reason, drop.entity_id)
        if drop.reason in _QUIET_DROPS or key in self._logged:
            logger.debug("sync: %s %s: %s", drop.reason, drop.entity_id or "", drop.detail)
            return
        if len(self._logged) < 10_000:
            self._logged.add(key)
        logger.warning("sync: %s%s: %s", drop.reason, f" ({drop.entity_id})" if drop.entity_id else "", drop.detail)

    # ---- tasks ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """The applier and the timers; runs for the agent's lifetime."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._applier(), name=f"hasync[{self.node}].sync-applier")
            tg.create_task(self._timers(), name=f"hasync[{self.node}].sync-timers")

    async def _timers(self) -> None:
        next_tick = self._clock() + self.config.retry_interval
        while True:
            now = self._clock()
            if now >= self._window_deadline:
                logger.warning("sync: the marker did not come back within %.1f s; taking the retained records "
                               "received so far as complete", self.config.reconcile_timeout)
                self._close_window("timeout")
            for entity_id, value in self.throttle.due(now):
                self._feed(LocalChange(entity_id, value[0], value[1]))
            if now >= next_tick:
                next_tick = now + self.config.retry_interval
                self._feed(Tick())
            wake_at = min(next_tick, self._window_deadline, self.throttle.next_due())
            self._wake.clear()
            await wait_or(self._wake, max(0.0, wake_at - self._clock()))

    async def _applier(self) -> None:
        while True:
            await self._applies_event.wait()
            self._applies_event.clear()
            while self._applies:
                batch: list[Apply | Remove] = []
                for entity_id in list(self._applies)[:APPLY_BATCH]:
                    batch.append(self._applies.pop(entity_id))
                started = self._clock()
                try:
                    await self.backend.apply(batch)
                except Exception as exc:  # a bug in a backend must not stop sync: fail the batch, retry later
                    logger.exception("sync: applying %d changes failed unexpectedly", len(batch))
                    for item in batch:
                        self.apply_failed(item.entity_id, item.version, f"unexpected error: {exc}")
                self.metrics.sync_apply_seconds.observe(self._clock() - started)

    async def sender(self, session: Session) -> None:
        """Drain the records to publish on this session (cancelled when it ends)."""
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        inflight: set[asyncio.Task[None]] = set()

        async def publish(topic: str, payload: bytes) -> None:
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await session.publish(topic, payload, retain=True)
            except (MqttFailure, TimeoutError) as exc:
                logger.debug("sync: publish on %s not acknowledged: %s", topic, exc or "timeout")
            finally:
                slots.release()

        try:
            while True:
                await self._dirty_event.wait()
                self._dirty_event.clear()
                while self._dirty:
                    await slots.acquire()
                    if not self._dirty:
                        slots.release()
                        break
                    entity_id = next(iter(self._dirty))
                    record = self._dirty.pop(entity_id)
                    payload = record.to_payload()
                    if len(payload) > MAX_RECORD_BYTES:
                        slots.release()
                        self._drop(Drop("too_large", entity_id, f"{len(payload)} bytes > {MAX_RECORD_BYTES}: not "
                                        "published (exclude the entity or its big attributes)"))
                        continue
                    self.metrics.sync_published.inc()
                    task = asyncio.create_task(publish(self.topics.entity(entity_id), payload),
                                               name=f"hasync[{self.node}].sync-publish")
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
        finally:
            for task in inflight:
                task.cancel()


# ---- backends -----------------------------------------------------------------------------------


def _value(state: Any) -> Value | None:
    """(state, attributes) of a Home Assistant state object, or None if it is not one."""
    if not isinstance(state, dict):
        return None
    value, attributes = state.get("state"), state.get("attributes")
    if not isinstance(value, str):
        return None
    return (value, attributes if isinstance(attributes, dict) else {})


def _context_id(state: Any) -> str | None:
    context = state.get("context") if isinstance(state, dict) else None
    ident = context.get("id") if isinstance(context, dict) else None
    return ident if isinstance(ident, str) else None


class HomeAssistantBackend:
    """The entities of this node's Home Assistant, through ``HomeAssistantLink``'s state watching.

    Applies go through ``scene.apply``; removals through ``{domain}/delete`` (UI-made helpers only).
    Home Assistant cannot create an entity from a record: a record of an entity this HA lacks fails with a
    message saying so, and is retried when the entity appears.
    """

    name = "Home Assistant"

    def __init__(self) -> None:
        self.link: HomeAssistantLink | None = None  # set by the agent once the link exists
        self._sink: Sink | None = None
        self._selected: Callable[[str], bool] = lambda _: False
        self._current: dict[str, str] = {}  # the state HA shows for each mirrored entity
        self._inflight: set[str] = set()
        self._held: list[dict[str, Any]] = []
        self._removing: set[str] = set()

    def bind(self, sink: Sink, selected: Callable[[str], bool]) -> None:
        self._sink, self._selected = sink, selected

    # Callbacks of HomeAssistantLink (see its state watching).

    def on_states(self, states: list[dict[str, Any]]) -> None:
        assert self._sink is not None
        snapshot: dict[str, Value] = {}
        for state in states:
            entity_id = state.get("entity_id") if isinstance(state, dict) else None
            value = _value(state)
            if isinstance(entity_id, str) and value is not None and self._selected(entity_id):
                snapshot[entity_id] = value
        self._current = {e: v[0] for e, v in snapshot.items()}
        self._held.clear()
        self._sink.local_snapshot(snapshot)

    def on_state_changed(self, event: dict[str, Any]) -> None:
        data = event.get("data")
        entity_id = data.get("entity_id") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(entity_id, str) or not self._selected(entity_id):
            return
        if entity_id in self._inflight:
            self._held.append(data)
        else:
            self._handle(data, ours=None)

    def _handle(self, data: dict[str, Any], ours: str | None) -> bool:
        """One state_changed event; True if it is the apply's own (context ``ours``)."""
        assert self._sink is not None
        entity_id = data["entity_id"]
        new = data.get("new_state")
        value = _value(new)
        if new is None:
            self._current.pop(entity_id, None)
            if entity_id in self._removing:
                return True
            self._sink.local_changed(entity_id, None)
            return False
        if value is None:
            return False
        self._current[entity_id] = value[0]
        if ours is not None and _context_id(new) == ours:
            return True
        self._sink.local_changed(entity_id, value, appeared=data.get("old_state") is None)
        return False

    async def apply(self, batch: list[Apply | Remove]) -> None:
        sink = self._sink
        assert sink is not None
        applies = [a for a in batch if isinstance(a, Apply)]
        for item in batch:
            if isinstance(item, Remove):
                await self._remove(item)
        missing = [a for a in applies if a.entity_id not in self._current]
        for a in missing:
            sink.apply_failed(a.entity_id, a.version, f"{a.entity_id} does not exist in this Home Assistant, and "
                              "hasync cannot create it: add the helper here too (same id)")
        todo = [a for a in applies if a.entity_id in self._current]
        if not todo:
            return
        if self.link is None:
            for a in todo:
                sink.apply_failed(a.entity_id, a.version, "not connected to Home Assistant")
            return
        chunks = [todo]
        while chunks:
            chunk = chunks.pop(0)
            self._inflight = {a.entity_id for a in chunk}
            ours: str | None = None
            error: str | None = None
            rejected = False  # HA answered the call with an error (a bad value), rather than not answering
            try:
                ours = await self.link.apply_states({a.entity_id: {"state": a.state, **a.attributes} for a in chunk})
            except CommandFailed as exc:
                error, rejected = str(exc), True
            except HomeAssistantError as exc:
                error = str(exc)
            finally:
                held, self._held, self._inflight = self._held, [], set()
            if rejected and len(chunk) > 1:
                # One bad value fails the whole call: find it by trying each entity alone.
                self._flush(held, None, {})
                chunks.extend([a] for a in chunk)
                continue
            wanted = {a.entity_id: a for a in chunk}
            done = self._flush(held, ours, wanted)
            for a in chunk:
                if a.entity_id in done:
                    continue
                if error is not None:
                    sink.apply_failed(a.entity_id, a.version, error)
                elif self._current.get(a.entity_id) == a.state:
                    sink.applied(a.entity_id, a.version)  # HA held that state already (attributes may differ)
                else:
                    sink.apply_failed(a.entity_id, a.version, f"Home Assistant did not take {a.state!r}: "
                                      f"{a.entity_id} shows {self._current.get(a.entity_id)!r} (out of range, or "
                                      "not an option of this helper?)")

    def _flush(self, held: list[dict[str, Any]], ours: str | None, wanted: dict[str, Apply]) -> set[str]:
        """Handle held events in order; an entity's answer goes in at the place of its apply's own event."""
        assert self._sink is not None
        done: set[str] = set()
        for data in held:
            entity_id = data["entity_id"]
            if self._handle(data, ours) and entity_id in wanted and entity_id not in done:
                done.add(entity_id)
                self._sink.applied(entity_id, wanted[entity_id].version)
        return done

    async def _remove(self, item: Remove) -> None:
        assert self._sink is not None
        if item.entity_id not in self._current:
            self._sink.applied(item.entity_id, item.version)  # already absent
            return
        if self.link is None:
            self._sink.apply_failed(item.entity_id, item.version, "not connected to Home Assistant")
            return
        self._removing.add(item.entity_id)
        try:
            await self.link.delete_helper(item.entity_id)
        except HomeAssistantError as exc:
            self._sink.apply_failed(item.entity_id, item.version, f"cannot delete {item.entity_id} (deleted on "
                                    f"another node; only helpers made in HA's UI can be deleted by hasync): {exc}")
        else:
            self._current.pop(item.entity_id, None)
            self._sink.applied(item.entity_id, item.version)
        finally:
            self._removing.discard(item.entity_id)


@dataclass(frozen=True)
class AppliedEntry:
    seq: int
    entity_id: str
    state: str | None
    t: float  # time.monotonic() when applied


class MemoryBackend:
    """Entities kept in memory, changed through the agent's HTTP API: for tests, demos and benchmarks.

    Applies take effect at once and are logged (``applied_since``) with their monotonic time, so a benchmark
    can time a change from one node to another.
    """

    name = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, log_size: int = 200_000) -> None:
        self.entities: dict[str, Value] = {}
        self._sink: Sink | None = None
        self._selected: Callable[[str], bool] = lambda _: True
        self._clock = clock
        self._log: deque[AppliedEntry] = deque(maxlen=log_size)
        self._seq = 0

    def bind(self, sink: Sink, selected: Callable[[str], bool]) -> None:
        self._sink, self._selected = sink, selected
        sink.local_snapshot({})

    def set_local(self, entity_id: str, state: str, attributes: Attributes | None = None) -> None:
        """A local change, as a user would make it in HA."""
        assert self._sink is not None
        appeared = entity_id not in self.entities
        value: Value = (state, dict(attributes or {}))
        self.entities[entity_id] = value
        self._sink.local_changed(entity_id, value, appeared=appeared)

    def remove_local(self, entity_id: str) -> bool:
        assert self._sink is not None
        if self.entities.pop(entity_id, None) is None:
            return False
        self._sink.local_changed(entity_id, None)
        return True

    async def apply(self, batch: list[Apply | Remove]) -> None:
        assert self._sink is not None
        now = self._clock()
        for item in batch:
            if isinstance(item, Apply):
                self.entities[item.entity_id] = (item.state, dict(item.attributes))
            else:
                self.entities.pop(item.entity_id, None)
            self._seq += 1
            self._log.append(AppliedEntry(self._seq, item.entity_id, getattr(item, "state", None), now))
            self._sink.applied(item.entity_id, item.version)

    def applied_since(self, seq: int, limit: int = 10_000) -> list[AppliedEntry]:
        out: list[AppliedEntry] = []
        for entry in reversed(self._log):
            if entry.seq <= seq:
                break
            out.append(entry)
        out.reverse()
        return out[:limit]


def backend_for(config: SyncConfig) -> HomeAssistantBackend | MemoryBackend:
    return MemoryBackend() if config.backend == "memory" else HomeAssistantBackend()

