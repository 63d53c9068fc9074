"""An MQTT broker in memory: the model the in-process tests and the election's simulation both run on.

:class:`BrokerModel` is synchronous and has no clock. It keeps what hasync's protocol relies on a broker
for, and nothing else (docs/protocol.md, and the facts in shared/NOTES-ha-mqtt.md):

* **retained messages**: a retained publish replaces the topic's stored message, an empty one deletes it;
  a new subscription gets the stored messages that match it (``retain=True``), then live ones;
* **one order per subscriber**: every publish gets the next number of one global sequence, and each
  subscriber is handed matching messages in that order (live ones with ``retain=False``, as Mosquitto and
  amqtt forward them), its own included;
* **Last Will on abnormal close only**: ``close(clean=False)`` publishes the client's will (retained);
  ``close(clean=True)`` discards it; ``drop()`` closes without publishing, for a caller that publishes the
  will itself later (a broker timing a silent client out after its keepalive);
* **QoS 1 duplicates and replays on demand**: ``replay(client, topic)`` hands a client the last message it
  got on a topic again, as a broker re-sending an unacknowledged message would;
* **an ACL that silently drops**: a publish the ACL refuses is acknowledged and goes nowhere, as with
  Mosquitto under MQTT 3.1.1.

How a message reaches a client is the client's ``deliver`` callback: :class:`FakeMqtt` puts it in an
asyncio queue (the in-process tier), ``harness.sim`` schedules it after a network delay.

:class:`FakeMqtt` is ``hasync.transport`` over the model: ``FakeMqtt().connect`` is what
``Agent(connect=...)`` takes. Acknowledgements come on the next loop iteration (``ack_delay`` later if
set); ``pause()`` hangs the broker (nothing delivered or acknowledged until ``resume()``), ``cut(client_id)``
drops a connection abnormally (its will goes out), ``refuse`` makes connects fail, ``isolate(node)`` cuts one
node off until ``reconnect_node(node)``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field

from hasync.transport import AuthFailure, Connect, ConnectionLost, Incoming, MqttFailure, Session, Will

Acl = Callable[[str, str], bool]  # (client id, topic) -> may publish


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching, with ``+`` (one level) and ``#`` (the rest)."""
    pattern = topic_filter.split("/")
    levels = topic.split("/")
    for i, part in enumerate(pattern):
        if part == "#":
            return True
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(pattern) == len(levels)


@dataclass(eq=False)
class Client:
    """One connection, as the broker sees it."""

    ident: int
    client_id: str
    will: Will | None
    deliver: Callable[[Incoming], None]
    filters: list[str] = field(default_factory=list)
    open: bool = True
    last: dict[str, Incoming] = field(default_factory=dict)  # per topic, for replays


@dataclass(frozen=True)
class Published:
    seq: int
    client_id: str | None  # None: the broker itself (a will)
    topic: str
    payload: bytes
    retain: bool
    dropped: bool  # refused by the ACL


class BrokerModel:
    def __init__(self, *, acl: Acl | None = None, log_size: int = 100_000) -> None:
        self.acl = acl
        self.retained: dict[str, bytes] = {}
        self.clients: list[Client] = []
        self.log: deque[Published] = deque(maxlen=log_size)
        self._seq = itertools.count(1)
        self._idents = itertools.count(1)

    def connect(self, client_id: str, will: Will | None, deliver: Callable[[Incoming], None]) -> Client:
        # A broker takes over a client id: the older connection is closed, and its will published.
        for old in [c for c in self.clients if c.client_id == client_id and c.open]:
            self.close(old, clean=False)
        client = Client(next(self._idents), client_id, will, deliver)
        self.clients.append(client)
        return client

    def subscribe(self, client: Client, *filters: str) -> None:
        for topic_filter in filters:
            if topic_filter not in client.filters:
                client.filters.append(topic_filter)
            for topic, payload in sorted(self.retained.items()):
                if matches(topic_filter, topic):
                    self._hand(client, Incoming(topic, payload, True))

    def publish(self, client: Client | None, topic: str, payload: bytes, *, retain: bool) -> bool:
        """Route a publish; False if the ACL dropped it (the publisher cannot tell)."""
        if client is not None and not client.open:
            return False
        client_id = None if client is None else client.client_id
        dropped = client is not None and self.acl is not None and not self.acl(client.client_id, topic)
        self.log.append(Published(next(self._seq), client_id, topic, payload, retain, dropped))
        if dropped:
            return False
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        message = Incoming(topic, payload, False)
        for subscriber in self.clients:
            if subscriber.open and any(matches(f, topic) for f in subscriber.filters):
                self._hand(subscriber, message)
        return True

    def close(self, client: Client, *, clean: bool) -> None:
        """The connection ends; without a clean DISCONNECT, the broker publishes the client's will."""
        if not client.open:
            return
        will = self.drop(client)
        if not clean and will is not None:
            self.publish(None, will.topic, will.payload, retain=True)

    def drop(self, client: Client) -> Will | None:
        """Close without publishing anything; returns the will, for the caller to publish when it decides."""
        client.open = False
        self.clients.remove(client)
        return client.will

    def replay(self, client: Client, topic: str) -> bool:
        """Hand ``client`` the last message it got on ``topic`` again (a QoS 1 duplicate)."""
        message = client.last.get(topic)
        if message is None or not client.open:
            return False
        client.deliver(message)
        return True

    def _hand(self, client: Client, message: Incoming) -> None:
        client.last[message.topic] = message
        client.deliver(message)


# ---- hasync.transport over the model ------------------------------------------------------------


class FakeSession:
    """``hasync.transport.Session`` on a :class:`BrokerModel`."""

    def __init__(self, fake: FakeMqtt, client_id: str, will: Will | None) -> None:
        self._fake = fake
        self._queue: asyncio.Queue[Incoming | None] = asyncio.Queue()
        self.client = fake.model.connect(client_id, will, self._arrive)
        self.lost: str | None = None
        self._gone = asyncio.Event()
        self.deaf = False  # inbound blocked (a one-way fault): deliveries wait in ``unheard``
        self.unheard: list[Incoming] = []

    def _arrive(self, message: Incoming) -> None:
        if self._fake.paused:
            self._fake.held.append((self, message))
        elif self.deaf:
            self.unheard.append(message)
        else:
            self._queue.put_nowait(message)

    def hear(self) -> None:
        """Inbound works again: what was held back arrives, in order."""
        self.deaf = False
        unheard, self.unheard = self.unheard, []
        for message in unheard:
            self._queue.put_nowait(message)

    def _check(self) -> None:
        if not self.client.open:
            raise ConnectionLost(self.lost or "connection closed")

    async def subscribe(self, *topics: str) -> None:
        self._check()
        await self._fake.wait_unpaused()
        self._check()
        self._fake.model.subscribe(self.client, *topics)

    def send(self, topic: str, payload: bytes, *, retain: bool, on_ack: Callable[[], None] | None = None) -> None:
        self._check()
        fake = self._fake
        if fake.paused:
            fake.held_publishes.append((self, topic, payload, retain, on_ack))
            return
        fake.model.publish(self.client, topic, payload, retain=retain)
        if on_ack is not None:
            fake.acknowledge(self, on_ack)

    def flush(self) -> None:
        """Nothing to write: ``send`` delivers at once."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        acked = asyncio.Event()
        self.send(topic, payload, retain=retain, on_ack=acked.set)
        waiter = asyncio.ensure_future(acked.wait())
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            gone.cancel()
        self._check()

    async def messages(self) -> AsyncIterator[Incoming]:
        while True:
            message = await self._queue.get()
            if message is None:
                raise ConnectionLost(self.lost or "connection closed by the broker")
            yield message

    def end(self, reason: str) -> None:
        """The broker closed this connection."""
        self.lost = reason
        self._gone.set()
        self._queue.put_nowait(None)


class FakeMqtt:
    def __init__(self, model: BrokerModel | None = None, *, ack_delay: float = 0.0) -> None:
        self.model = model or BrokerModel()
        self.ack_delay = ack_delay
        self.sessions: dict[str, FakeSession] = {}  # by client id, the newest
        self.refuse: MqttFailure | None = None  # set: connects fail with it (e.g. AuthFailure("bad password"))
        self.paused = False
        self.held: list[tuple[FakeSession, Incoming]] = []
        self.held_publishes: list[tuple[FakeSession, str, bytes, bool, Callable[[], None] | None]] = []
        self.connects = 0
        self.unreachable: set[str] = set()  # nodes cut off from the broker: their connects fail
        self._unpaused = asyncio.Event()
        self._unpaused.set()

    @property
    def connect(self) -> Connect:
        """The agent's connect seam."""
        return self._connect

    def _connect(self, client_id: str, will: Will | None) -> AbstractAsyncContextManager[Session]:
        return self._session(client_id, will)

    @asynccontextmanager
    async def _session(self, client_id: str, will: Will | None) -> AsyncIterator[Session]:
        await asyncio.sleep(0)  # a connect is never instantaneous
        if self.refuse is not None:
            raise self.refuse
        if self.paused:
            raise ConnectionLost("no CONNACK: the broker hangs")
        if any(client_id.startswith(f"hasync-{node}-") for node in self.unreachable):
            raise ConnectionLost("no route to the broker (cut off by the test)")
        session = FakeSession(self, client_id, will)
        self.sessions[client_id] = session
        self.connects += 1
        try:
            yield session
        finally:
            if session.client.open:
                self.model.close(session.client, clean=True)
            session._gone.set()

    def session_of(self, node: str) -> FakeSession | None:
        """The newest open session whose client id names ``node`` (agents use ``hasync-{node}-...``)."""
        found = [s for cid, s in self.sessions.items() if cid.startswith(f"hasync-{node}-") and s.client.open]
        return found[-1] if found else None

    def cut(self, node: str, *, will: bool = True) -> None:
        """The node's connection breaks (a network cut): it learns at once; its will goes out if ``will``."""
        session = self.session_of(node)
        if session is None:
            return
        if will:
            self.model.close(session.client, clean=False)
        else:
            self.model.drop(session.client)
        session.end("connection reset (cut by the test)")

    def isolate(self, node: str, *, will: bool = True) -> None:
        """The node is cut off from the broker (and only it): its connection breaks and it cannot connect
        again until ``reconnect_node``. ``will``: the broker notices and publishes its will."""
        self.unreachable.add(node)
        self.cut(node, will=will)

    def reconnect_node(self, node: str) -> None:
        self.unreachable.discard(node)

    def deafen(self, node: str) -> FakeSession:
        """The node's inbound path blocks (its publishes still go out) until ``hear()`` on the session."""
        session = self.session_of(node)
        assert session is not None, f"{node} is not connected"
        session.deaf = True
        return session

    def restart(self, *, keep_retained: bool = True) -> None:
        """Every connection breaks without wills (the broker went away); retained messages kept or lost."""
        for session in list(self.sessions.values()):
            if session.client.open:
                self.model.drop(session.client)
                session.end("the broker restarted")
        if not keep_retained:
            self.model.retained.clear()

    def acknowledge(self, session: FakeSession, on_ack: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def ack() -> None:
            if session.client.open:
                on_ack()

        if self.ack_delay > 0:
            loop.call_later(self.ack_delay, ack)
        else:
            loop.call_soon(ack)

    def pause(self) -> None:
        """The broker hangs: connections stay open, nothing is delivered, acknowledged or accepted."""
        self.paused = True
        self._unpaused.clear()

    def resume(self) -> None:
        self.paused = False
        self._unpaused.set()
        held_publishes, self.held_publishes = self.held_publishes, []
        for session, topic, payload, retain, on_ack in held_publishes:
            if session.client.open:
                self.model.publish(session.client, topic, payload, retain=retain)
                if on_ack is not None:
                    self.acknowledge(session, on_ack)
        held, self.held = self.held, []
        for session, message in held:
            if session.client.open:
                session._queue.put_nowait(message)

    async def wait_unpaused(self) -> None:
        await self._unpaused.wait()

    def inject(self, topic: str, payload: bytes, *, retain: bool = False, client_id: str = "intruder") -> None:
        """Publish as another client would (a rogue, a tool, Home Assistant)."""
        client = self.model.connect(client_id, None, lambda _: None)
        self.model.publish(client, topic, payload, retain=retain)
        self.model.close(client, clean=True)


__all__ = ["AuthFailure", "BrokerModel", "Client", "FakeMqtt", "FakeSession", "matches"]
