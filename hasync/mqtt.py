"""The MQTT edge: the only module that imports aiomqtt. It implements ``hasync.transport.Session``.

A fresh aiomqtt client is used for every connection, so nothing queued on an old connection is re-sent
on a new one (paho re-sends unacknowledged publishes after a reconnect otherwise).

aiomqtt does the connection's lifecycle (connect, TLS, the will, keepalive, disconnect); the per-message
paths, which entity sync runs thousands of times a second, bypass it (pinned: aiomqtt 2.x, paho 2.x):

* **sending**: ``send`` hands the publish to paho directly, without a task and a future per message;
* **receiving**: paho's message callback appends to a queue that ``messages()`` drains without awaiting
  between queued messages (aiomqtt makes a task and an ``asyncio.wait`` per message);
* **reading**: paho reads every packet with at least three ``recv`` calls (its type, its length, its body);
  the socket is wrapped in :class:`_BufferedReads`, which reads up to 64 KiB per system call and serves
  paho from that buffer;
* **writing**: paho writes every queued packet with its own ``send`` (a burst of publishes, or the
  acknowledgements of a burst received); :func:`_write_queued` writes what is queued with one ``send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

from .config import BrokerConfig
from .transport import AuthFailure, Connect, ConnectionLost, Incoming, MqttFailure, Session, Will

logger = logging.getLogger(__name__)

MAX_INFLIGHT = 128  # unacknowledged QoS 1 publishes per connection (paho's default is 20)
READ_SIZE = 64 * 1024  # bytes asked of the kernel per read
WRITE_SIZE = 64 * 1024  # bytes of queued packets joined into one write (at least one whole packet)
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


class _BufferedReads:
    """paho's socket with reads served from a buffer: one ``recv`` system call fills it with up to
    ``READ_SIZE`` bytes, which paho's small reads then take without further calls.

    aiomqtt's read callback calls paho's ``loop_read`` again while ``pending()`` is not zero (it does so for
    TLS sockets, whose decrypted bytes the event loop cannot see either), so bytes left in the buffer are
    never stranded waiting for the socket to become readable. Everything else goes to the socket itself.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = memoryview(b"")

    def recv(self, bufsize: int) -> bytes:
        if not self._buffer:
            data: bytes = self._sock.recv(max(bufsize, READ_SIZE))  # raises BlockingIOError etc. as paho expects
            if len(data) <= bufsize:
                return data  # (b"" at the end of the stream)
            self._buffer = memoryview(data)
        chunk = self._buffer[:bufsize]
        self._buffer = self._buffer[bufsize:]
        return chunk.tobytes()

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)
        return len(self._buffer) + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _write_queued(client: paho.Client) -> MQTTErrorCode:
    """paho's ``_packet_write`` with the queued packets joined into one ``send`` (up to ``WRITE_SIZE``).

    The queue holds packets to send in order; a packet partly sent stays at its head with its position, as
    paho keeps it. A QoS 0 publish or a DISCONNECT (which paho completes with callbacks and, for the
    latter, by closing the socket) is left to paho's own method: the agent sends neither in normal operation.
    """
    queue = client._out_packet
    while queue:
        if any(p["command"] & 0xF0 == paho.DISCONNECT or (p["command"] & 0xF0 == paho.PUBLISH and p["qos"] == 0)
               for p in queue):
            return paho.Client._packet_write(client)
        chunks: list[bytes | bytearray | memoryview] = []
        size = 0
        for p in queue:
            chunk = memoryview(p["packet"])[p["pos"]:]
            chunks.append(chunk)
            size += len(chunk)
            if size >= WRITE_SIZE:
                break
        try:
            written = client._sock_send(b"".join(chunks))
        except (AttributeError, ValueError):
            return paho.MQTT_ERR_SUCCESS  # no socket (any more): as paho's own method
        except BlockingIOError:
            return paho.MQTT_ERR_AGAIN  # (paho's _sock_send registered for writability)
        except OSError as exc:
            logger.debug("sending to the broker failed: %s", exc)
            return paho.MQTT_ERR_CONN_LOST
        while written > 0:
            head = queue[0]
            taken = min(written, head["to_process"])
            head["pos"] += taken
            head["to_process"] -= taken
            written -= taken
            if head["to_process"] == 0:
                queue.popleft()
        with client._msgtime_mutex:
            client._last_msg_out = time.monotonic()
    return paho.MQTT_ERR_SUCCESS


class MqttSession:
    """One live connection over aiomqtt (``hasync.transport.Session``)."""

    def __init__(self, client: aiomqtt.Client, urgent: Callable[[str], bool] | None = None) -> None:
        self._client = client
        self._paho = client._client
        self._inbox = _Lanes(urgent or _never)
        self._arrived = asyncio.Event()
        # Replaces aiomqtt's callback: the messages go to our queue, not to aiomqtt's.
        self._paho.on_message = self._on_message
        self._disconnected: asyncio.Future[None] = client._disconnected
        self._disconnected.add_done_callback(lambda _: self._arrived.set())

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        # Called by paho on the event loop's thread, from aiomqtt's read callback. A topic that is not
        # UTF-8 (which a broker should never forward) is decoded with replacements: it matches no topic of
        # ours and is dropped as such, instead of raising inside paho, which would end the connection.
        topic = message._topic.decode("utf-8", "replace")
        self._inbox.append(Incoming(topic, bytes(message.payload), bool(message.retain)))
        self._arrived.set()

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
        info = self._paho.publish(topic, payload, 1, retain)
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
        """Every message received, in order within each lane of :class:`_Lanes`, until the connection ends
        (then ConnectionLost). Messages already queued are handed out without a pass through the event loop in
        between."""
        inbox = self._inbox
        while True:
            while inbox:
                yield inbox.popleft()
            if self._disconnected.done():
                exc = None if self._disconnected.cancelled() else self._disconnected.exception()
                raise ConnectionLost(str(exc) if exc else "disconnected") from exc
            self._arrived.clear()
            if not inbox and not self._disconnected.done():
                await self._arrived.wait()


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


def _never(_topic: str) -> bool:
    return False


class _Lanes:
    """The received messages waiting for the agent, in two FIFO lanes: ``urgent`` topics first.

    The election's own messages must not queue behind entity records: a primary that is busy (a thousand
    entity records a second, a loaded machine) reads many packets at once, and its renewals' echoes, which keep
    it primary, would wait behind every record read before them (fast timing profile: a false failover after
    about 0.6 s of that). Order is kept within each lane; across lanes MQTT promises none anyway (and the
    election never relies on it)."""

    __slots__ = ("first", "rest", "urgent")

    def __init__(self, urgent: Callable[[str], bool]) -> None:
        self.urgent = urgent
        self.first: deque[Incoming] = deque()
        self.rest: deque[Incoming] = deque()

    def __len__(self) -> int:
        return len(self.first) + len(self.rest)

    def append(self, message: Incoming) -> None:
        (self.first if self.urgent(message.topic) else self.rest).append(message)

    def popleft(self) -> Incoming:
        return self.first.popleft() if self.first else self.rest.popleft()


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
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionLost(f"TLS setup failed: {exc}") from exc
    try:
        async with client:
            no_delay(client)
            buffer_reads(client)
            yield MqttSession(client, urgent)
    except aiomqtt.MqttError as exc:
        raise _translate(exc) from exc
    except OSError as exc:
        raise ConnectionLost(str(exc)) from exc
    raise_lost_cancellation()


def raise_lost_cancellation() -> None:
    """Raise the current task's cancellation again if something swallowed it.

    aiomqtt's clean disconnect awaits the broker's goodbye through ``asyncio.wait_for``, which on Python 3.11
    returns the result instead of raising when the task is cancelled in the same turn as the awaited future
    completes (CPython gh-86296, fixed in 3.12). A task cancelled then ran on: the agent's federation
    exporter, cancelled at shutdown just as its session closed, went back to waiting for the next promotion
    and the agent never exited."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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


def buffer_reads(client: aiomqtt.Client) -> None:
    """Serve paho's reads of a connected client from a buffer (:class:`_BufferedReads`), and join its queued
    packets into one write (:func:`_write_queued`)."""
    paho_client = client._client
    if paho_client._sock is not None and not isinstance(paho_client._sock, _BufferedReads):
        paho_client._sock = _BufferedReads(paho_client._sock)
    paho_client._packet_write = functools.partial(_write_queued, paho_client)  # type: ignore[method-assign]


def connector(cfg: BrokerConfig, *, urgent: Callable[[str], bool] | None = None) -> Connect:
    """The agent's :data:`hasync.transport.Connect` for the broker ``cfg`` describes (``urgent``: see
    :func:`connect`)."""

    def connect_to(client_id: str, will: Will | None) -> AbstractAsyncContextManager[Session]:
        return connect(cfg, client_id, will, urgent=urgent)

    return connect_to


__all__ = ["AuthFailure", "ConnectionLost", "MqttFailure", "MqttSession", "connect", "connector", "no_delay"]
