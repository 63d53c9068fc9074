"""The MQTT edge: the only module that imports aiomqtt. It implements ``hasync.transport.Session``.

A fresh aiomqtt client is used for every connection, so nothing queued on an old connection is re-sent
on a new one (paho re-sends unacknowledged publishes after a reconnect otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiomqtt
import paho.mqtt.client as paho

from .config import BrokerConfig
from .transport import AuthFailure, Connect, ConnectionLost, Incoming, MqttFailure, Session, Will

logger = logging.getLogger(__name__)

MAX_INFLIGHT = 128  # unacknowledged QoS 1 publishes per connection (paho's default is 20)
_AUTH_CODES = {4, 5, 134, 135}  # 3.1.1: bad credentials, not authorised; 5.0 equivalents


def _translate(exc: aiomqtt.MqttError) -> MqttFailure:
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if isinstance(exc, aiomqtt.MqttCodeError) and code in _AUTH_CODES:
        return AuthFailure(str(exc))
    return ConnectionLost(str(exc) or type(exc).__name__)


class _Acknowledged:
    """Stands in for the asyncio.Event aiomqtt's PUBACK callback sets: calls ``on_ack`` instead."""

    __slots__ = ("_on_ack",)

    def __init__(self, on_ack: Callable[[], None]) -> None:
        self._on_ack = on_ack

    def set(self) -> None:
        self._on_ack()


class MqttSession:
    """One live connection over aiomqtt (``hasync.transport.Session``)."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client

    async def subscribe(self, *topics: str) -> None:
        try:
            for topic in topics:
                await self._client.subscribe(topic, qos=1)
        except aiomqtt.MqttError as exc:
            raise _translate(exc) from exc

    def send(self, topic: str, payload: bytes, *, retain: bool, on_ack: Callable[[], None] | None = None) -> None:
        # aiomqtt's publish() awaits the acknowledgement; its paho client puts the packet on the wire (or in
        # its own ordered queue) synchronously, which is what keeps publishes in order without a task each.
        # The acknowledgement is routed through aiomqtt's table of pending publishes (pinned: aiomqtt 2.x).
        info = self._client._client.publish(topic, payload, 1, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"could not publish on {topic}: {paho.error_string(info.rc)}")
        if on_ack is None:
            return
        if info.is_published():
            on_ack()
        else:
            self._client._pending_publishes[info.mid] = _Acknowledged(on_ack)  # type: ignore[assignment]

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        try:
            await self._client.publish(topic, payload, qos=1, retain=retain)
        except aiomqtt.MqttError as exc:
            raise _translate(exc) from exc

    async def messages(self) -> AsyncIterator[Incoming]:
        try:
            async for message in self._client.messages:
                payload = message.payload
                if isinstance(payload, str):
                    payload = payload.encode()
                elif not isinstance(payload, bytes | bytearray):
                    payload = b"" if payload is None else str(payload).encode()
                yield Incoming(str(message.topic), bytes(payload), bool(message.retain))
        except aiomqtt.MqttError as exc:
            raise _translate(exc) from exc


def _tls_context(cfg: BrokerConfig) -> ssl.SSLContext | None:
    if not cfg.tls:
        return None
    context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if cfg.cert_file and cfg.key_file:
        context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    if cfg.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Lanes:
    """The received messages waiting for the agent, in two FIFO lanes: ``urgent`` topics first.

    The election's own messages must not queue behind entity records: a primary that is busy (a thousand
    entity records a second, a loaded machine) reads several packets per turn of the event loop but handles
    one message per turn, and its renewals' echoes, which keep it primary, would wait behind every record
    read before them (fast timing profile: a false failover after about 0.6 s of that). Order is kept within each
    lane; across lanes MQTT promises none anyway (and the election never relies on it)."""

    __slots__ = ("first", "rest", "urgent")

    def __init__(self, urgent: Callable[[str], bool]) -> None:
        self.urgent = urgent
        self.first: deque[aiomqtt.Message] = deque()
        self.rest: deque[aiomqtt.Message] = deque()

    def __len__(self) -> int:
        return len(self.first) + len(self.rest)

    def append(self, message: aiomqtt.Message) -> None:
        (self.first if self.urgent(message.topic.value) else self.rest).append(message)

    def popleft(self) -> aiomqtt.Message:
        return self.first.popleft() if self.first else self.rest.popleft()


def _queue_type(urgent: Callable[[str], bool]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's queue of received messages (its ``queue_type``), with :class:`_Lanes` inside."""

    class UrgentFirst(asyncio.Queue[aiomqtt.Message]):
        def _init(self, maxsize: int) -> None:
            # What asyncio.Queue uses of its _queue: len(), append(), popleft() (as its PriorityQueue does).
            self._queue = _Lanes(urgent)

    return UrgentFirst


@asynccontextmanager
async def connect(cfg: BrokerConfig, client_id: str, will: Will | None = None, *,
                  urgent: Callable[[str], bool] | None = None) -> AsyncIterator[MqttSession]:
    """Connect with a fresh client; leaving the block disconnects (with an exception: uncleanly). ``urgent``:
    received messages on the topics it accepts are handed over before any others waiting."""
    username, password = cfg.credentials
    try:
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=username,
            password=password,
            identifier=client_id,
            keepalive=cfg.keepalive,
            clean_session=True,
            timeout=cfg.connect_timeout,
            tls_context=_tls_context(cfg),
            will=aiomqtt.Will(will.topic, will.payload, qos=1, retain=True) if will else None,
            # Above the agent's own bound on unacknowledged publishes (hasync.publisher.MAX_IN_FLIGHT), so a
            # burst of entity records never makes a lease renewal wait for a free slot in paho's window.
            max_inflight_messages=MAX_INFLIGHT,
            queue_type=None if urgent is None else _queue_type(urgent),
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionLost(f"TLS setup failed: {exc}") from exc
    try:
        async with client:
            no_delay(client)
            yield MqttSession(client)
    except aiomqtt.MqttError as exc:
        raise _translate(exc) from exc
    except OSError as exc:
        raise ConnectionLost(str(exc)) from exc


def no_delay(client: aiomqtt.Client) -> None:
    """Turn off Nagle's algorithm on the client's socket, as asyncio does for its own TCP connections.

    paho opens the socket itself and leaves Nagle on: then a small publish waits for the ACK of the
    previous segment, which the peer delays up to 40 ms, and a stream of QoS 1 publishes crawls at one
    window per 40 ms."""
    sock = client._client.socket()  # aiomqtt does not expose the socket
    # An ssl.SSLSocket is a socket.socket too.
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connector(cfg: BrokerConfig, *, urgent: Callable[[str], bool] | None = None) -> Connect:
    """The agent's :data:`hasync.transport.Connect` for the broker ``cfg`` describes (``urgent``: see
    :func:`connect`)."""

    def connect_to(client_id: str, will: Will | None) -> AbstractAsyncContextManager[Session]:
        return connect(cfg, client_id, will, urgent=urgent)

    return connect_to


__all__ = ["AuthFailure", "ConnectionLost", "MqttFailure", "MqttSession", "connect", "connector", "no_delay"]
