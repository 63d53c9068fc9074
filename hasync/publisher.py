"""The agent's one ordered publisher: everything the agent says on the broker goes through it.

Two lanes share one connection:

* **control**: lease records, heartbeats, the leader topic, discovery, the sync marker. A FIFO: each
  message goes on the wire in the order it was put, behind every earlier one.
* **bulk**: entity records of state sync, pulled from a :class:`BulkSource` (the sync driver, which keeps
  them coalesced per entity, latest wins) only while fewer than ``bulk_in_flight`` of them await their
  acknowledgement.

Nothing waits for an acknowledgement before sending the next message (the protocol never relies on one:
only an echo counts), but the number of publishes awaiting one is bounded: ``max_in_flight`` in all, of
which bulk may use ``bulk_in_flight``. The rest is kept for control messages, so a burst of entity records
never makes a lease renewal wait for a free slot in the client's window (paho sends nothing past its own
window of ``hasync.mqtt.MAX_INFLIGHT``). An acknowledgement that does not come within ``ack_timeout``
frees its slot and is counted; the connection's own keepalive decides whether the broker is gone.

A message put while there is no connection is dropped: what the agent says is about the present, and it
says it again when it connects (records of an older connection must never go out on a newer one). The
sync driver keeps its own records until they are sent.

``close(final)`` is how the agent leaves: the final messages (the release, the offline heartbeat) go
behind everything already queued, nothing put afterwards is sent, and it returns once they are
acknowledged or the timeout passed. So the last word the broker retains from this agent is the final one.

The pump (``run``) is one task for the agent's lifetime; it never creates a task per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .transport import MqttFailure, Session

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 120  # below the client's own window (hasync.mqtt.MAX_INFLIGHT, 128)
BULK_IN_FLIGHT = 64
ACK_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool


class BulkSource(Protocol):
    def take(self) -> Outgoing | None:
        """The next message to send, removed from the source; None when there is nothing to send."""


@dataclass(slots=True)
class _InFlight:
    bulk: bool
    sent_at: float


class Publisher:
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        on_unacknowledged: Callable[[int], None] = lambda _: None,
        max_in_flight: int = MAX_IN_FLIGHT,
        bulk_in_flight: int = BULK_IN_FLIGHT,
        ack_timeout: float = ACK_TIMEOUT,
    ) -> None:
        if not 0 < bulk_in_flight < max_in_flight:
            raise ValueError(f"need 0 < bulk_in_flight ({bulk_in_flight}) < max_in_flight ({max_in_flight})")
        self._clock = clock
        self._on_unacknowledged = on_unacknowledged
        self._max = max_in_flight
        self._bulk_max = bulk_in_flight
        self._ack_timeout = ack_timeout
        self._control: deque[Outgoing] = deque()
        self._bulk: BulkSource | None = None
        self._in_flight: dict[int, _InFlight] = {}
        self._bulk_count = 0
        self._next_id = 0
        self._wake = asyncio.Event()
        self._expiry: asyncio.TimerHandle | None = None  # wakes the pump when the oldest in flight may expire
        self._session: Session | None = None
        self._closing = False
        self.sent = 0
        self.unacknowledged = 0  # acknowledgements that never came within ack_timeout (a counter)
        self.dropped = 0  # messages put while there was no connection, or after close

    # ---- what the agent calls -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._closing

    def put(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Queue a control message behind every earlier one (dropped while not connected)."""
        if not self.connected:
            self.dropped += 1
            return
        self._control.append(Outgoing(topic, payload, retain))
        self._wake.set()

    def attach_bulk(self, source: BulkSource) -> None:
        self._bulk = source

    def bulk_ready(self) -> None:
        """The bulk source has something new to send."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def attach(self, session: Session) -> None:
        """A connection is up: send on it from now on (nothing queued before is kept)."""
        self._reset()
        self._session = session
        self._wake.set()

    def detach(self) -> None:
        """The connection is gone: forget what was queued or awaiting acknowledgement."""
        self._session = None
        self._reset()
        self._wake.set()  # a close() waiting for acknowledgements learns the connection is gone

    async def run(self) -> None:
        """The pump: one task for the agent's lifetime."""
        while True:
            self._wake.clear()
            session = self._session
            if session is not None:
                self._expire()
                try:
                    self._pump(session)
                except MqttFailure as exc:
                    # The connection is gone; its receive loop reports it and detaches us.
                    logger.debug("publishing failed: %s", exc)
                    self._reset()
            await self._sleep()

    def _reset(self) -> None:
        self._control.clear()
        self._in_flight.clear()
        self._bulk_count = 0

    async def close(self, final: list[Outgoing]) -> bool:
        """Send ``final`` behind everything queued, refuse anything later, and wait until every control
        message is acknowledged (True), or the connection is gone (False; at once without one). The caller
        bounds the wait."""
        if self._session is None:
            return False
        self._control.extend(final)
        self._closing = True
        self._wake.set()
        while self._session is not None and (self._control or len(self._in_flight) > self._bulk_count):
            self._wake.clear()
            await self._wake.wait()
        return self._session is not None

    # ---- the pump -------------------------------------------------------------------------------

    def _pump(self, session: Session) -> None:
        sent = self.sent
        while self._control and len(self._in_flight) < self._max:
            self._send(session, self._control.popleft(), bulk=False)
        while (self._bulk is not None and not self._closing and self._bulk_count < self._bulk_max
               and len(self._in_flight) < self._max):
            message = self._bulk.take()
            if message is None:
                break
            self._send(session, message, bulk=True)
        if self.sent != sent:
            session.flush()

    def _send(self, session: Session, message: Outgoing, *, bulk: bool) -> None:
        self._next_id += 1
        ident = self._next_id
        self._in_flight[ident] = _InFlight(bulk, self._clock())
        if bulk:
            self._bulk_count += 1
        try:
            session.send(message.topic, message.payload, retain=message.retain, on_ack=lambda: self._acked(ident))
        except MqttFailure:
            self._forget(ident)
            raise
        self.sent += 1

    def _acked(self, ident: int) -> None:
        if self._forget(ident):
            self._wake.set()

    def _forget(self, ident: int) -> bool:
        entry = self._in_flight.pop(ident, None)
        if entry is None:
            return False
        if entry.bulk:
            self._bulk_count -= 1
        return True

    def _expire(self) -> None:
        if not self._in_flight:
            return
        # In-flight entries are in send order, so the stale ones come first.
        horizon = self._clock() - self._ack_timeout
        expired = 0
        while self._in_flight:
            ident, entry = next(iter(self._in_flight.items()))
            if entry.sent_at > horizon:
                break
            self._forget(ident)
            expired += 1
        if expired:
            self.unacknowledged += expired
            self._on_unacknowledged(expired)
            logger.debug("%d publishes not acknowledged within %.0f s", expired, self._ack_timeout)

    async def _sleep(self) -> None:
        # One timer at a time, armed for the oldest publish in flight: not one per wake-up, of which a stream
        # of acknowledgements makes thousands a second. It may fire early (that publish was acknowledged
        # meanwhile); the pump then arms it again for the new oldest.
        if self._in_flight and self._expiry is None:
            oldest = next(iter(self._in_flight.values())).sent_at
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, oldest + self._ack_timeout - self._clock()), self._expiry_due)
        await self._wake.wait()

    def _expiry_due(self) -> None:
        self._expiry = None
        self._wake.set()
