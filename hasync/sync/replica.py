"""Entity sync I/O: drives the pure ``hasync.sync.state.SyncState`` from MQTT and from a state backend.

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

* ``Publish``: the record goes into a map keyed by entity, which the agent's publisher drains in insertion
  order as its bulk lane (``take``), with a bound on publishes awaiting their acknowledgement
  (``hasync.publisher``). A newer record of an entity replaces one still waiting (latest wins), so a burst
  costs one publish per entity, and memory is bounded by the number of entities.
* ``Apply``/``Remove``: also a map keyed by entity; the applier hands the backend up to ``APPLY_BATCH`` at a
  time (one ``scene.apply`` call for Home Assistant) and the backend answers each entity.

Echo suppression (a change the node applies must not come back from the backend as a new local change) is
the backend's: ``hasync.homeassistant.backend`` explains how Home Assistant's contexts prove it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..aio import wait_or
from ..config import SyncConfig
from ..logs import printable
from ..messages import DropReason as MessageDropReason
from ..messages import MessageError, SyncSummary, parse
from ..metrics import Metrics
from ..publisher import Outgoing, Publisher
from ..topics import Topics
from .backend import Backend
from .hlc import Stamp
from .selection import Selector, Throttle
from .state import (
    Action,
    AppliedRemote,
    Apply,
    ApplyFailed,
    Connected,
    Disconnected,
    Drop,
    DropReason,
    EntityRecord,
    EntityRemoved,
    Event,
    LocalChange,
    LocalSnapshot,
    Publish,
    RemoteUnreadable,
    RemoteVersion,
    Remove,
    RetainedDone,
    SyncState,
    Tick,
    Value,
)

logger = logging.getLogger(__name__)

APPLY_BATCH = 250
SENT_KEPT = 1024  # payloads of our latest publications kept to recognise their echoes without parsing them
SUMMARY_REFRESH = 5.0  # s between two passes over every entity for the heartbeat's counts
MAX_RECORD_BYTES = 16 * 1024

# Drops that are part of normal operation (replays, races, our own echoes): logged at DEBUG only.
_QUIET_DROPS = {DropReason.STALE, DropReason.UNEXPECTED_ANSWER}


class Replica:
    def __init__(
        self,
        node: str,
        topics: Topics,
        config: SyncConfig,
        backend: Backend,
        metrics: Metrics,
        *,
        publisher: Publisher,
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
        self._publisher = publisher
        publisher.attach_bulk(self)
        self._wall_ms = wall_ms
        self._clock = clock
        self._dirty: dict[str, EntityRecord] = {}
        # Our latest publications by payload: the broker sends each back to us (we subscribe to every entity
        # topic), and a payload identical to one we encoded is that record, so its echo needs no parsing.
        self._sent: dict[bytes, EntityRecord] = {}
        self._applies: dict[str, Apply | Remove] = {}
        self._applies_event = asyncio.Event()
        self._wake = asyncio.Event()
        self._marker: str | None = None
        self._window_deadline = math.inf
        self._logged: set[tuple[DropReason, str | None]] = set()
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
        self._publisher.put(self.topics.sync_marker(self.node), self._marker.encode(), retain=False)
        self._wake.set()

    def disconnected(self) -> None:
        self._marker = None
        self._window_deadline = math.inf
        self._dirty.clear()
        self._sent.clear()
        self._feed(Disconnected())

    def on_marker(self, payload: bytes) -> None:
        if self._marker is not None and payload == self._marker.encode():
            self._close_window("its marker came back")

    def on_record(self, entity_id: str, payload: bytes, retained: bool) -> None:
        """A message on an entity topic. An invalid one (garbage, another entity's record, an empty payload
        clearing the topic) makes the node repair the topic if it knows a record, then raises MessageError
        (the caller counts it), except for an empty payload, which is no message at all."""
        self.metrics.sync_received.inc()
        if not self.selected(entity_id):
            self._drop(Drop(DropReason.NOT_SELECTED, entity_id, "not selected on this node"))
            return
        try:
            if not payload:
                self._feed(RemoteUnreadable(entity_id, retained=retained))
                return
            record = self._sent.pop(payload, None) or parse(EntityRecord, payload)
            if record.entity_id != entity_id:
                raise MessageError(MessageDropReason.ENTITY_MISMATCH,
                                   f"a record of {record.entity_id} on {entity_id}'s topic")
        except MessageError:
            self._feed(RemoteUnreadable(entity_id, retained=retained))
            raise
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
        if version.wall_ms > 0:  # a value nobody changed has stamp 0: it has no age
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
                    self._publisher.bulk_ready()
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
        self.metrics.sync_dropped.labels(drop.reason.value).inc()
        key = (drop.reason, drop.entity_id)
        if drop.reason in _QUIET_DROPS or key in self._logged:
            logger.debug("sync: %s %s: %s", drop.reason, drop.entity_id or "", drop.detail)
            return
        if len(self._logged) < 10_000:
            self._logged.add(key)
        logger.warning("sync: %s%s: %s", drop.reason, f" ({drop.entity_id})" if drop.entity_id else "",
                       printable(drop.detail))

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

    # ---- the publisher's bulk lane ---------------------------------------------------------------

    def take(self) -> Outgoing | None:
        """The next record to publish, oldest change first (``hasync.publisher.BulkSource``)."""
        while self._dirty:
            entity_id = next(iter(self._dirty))
            record = self._dirty.pop(entity_id)
            payload = record.to_payload()
            if len(payload) > MAX_RECORD_BYTES:
                self._drop(Drop(DropReason.TOO_LARGE, entity_id, f"{len(payload)} bytes > {MAX_RECORD_BYTES}: not "
                                "published (exclude the entity or its big attributes)"))
                continue
            self.metrics.sync_published.inc()
            if len(self._sent) >= SENT_KEPT:
                del self._sent[next(iter(self._sent))]  # the oldest: its echo is late or never comes
            self._sent[payload] = record
            return Outgoing(self.topics.entity(entity_id), payload, True)
        return None
