"""The MQTT edge: the only module that imports aiomqtt. It implements ``hasync.transport.Session``.

A fresh aiomqtt client is used for every connection, so nothing queued on an old connection is re-sent
on a new one (paho re-sends unacknowledged publishes after a reconnect otherwise).

aiomqtt and paho do the connection's lifecycle (connect, TLS, the will, subscribing, keepalive, disconnect);
the per-message paths, which entity sync runs thousands of times a second, bypass both once the connection is
up (:class:`_Wire`; pinned: aiomqtt 2.x, paho 2.x, MQTT 3.1.1):

* **reading**: one ``recv`` of up to 64 KiB per readable socket (paho makes three per packet: its type, its
  length, its body), framed by ``hasync.wire``; a PUBLISH goes to the inbox and its PUBACK to the write queue,
  a PUBACK of ours calls its ``on_ack``; any other packet is handed to paho's own handler, as if paho had read
  it (SUBACK, PINGRESP, the PUBACKs of aiomqtt's ``publish``);
* **sending**: ``send`` encodes the PUBLISH and puts it on paho's write queue, in order with whatever paho
  queues itself, without a task, a future or a message object per publish;
* **writing**: what is queued goes out in one ``send`` (:func:`_write_queued`) when the sender calls ``flush``
  (the publisher, after each burst) or else at the event loop's next turn, so a burst of publishes, and the
  acknowledgements of a burst received, cost one system call (paho writes each packet with its own, after a
  round through ``call_soon_threadsafe`` and the selector). paho's own packets (a DISCONNECT, a QoS 0
  publish) and what is queued before them are left to paho's writer;
* **receiving**: ``messages()`` drains the inbox without awaiting between queued messages (aiomqtt makes a
  task and an ``asyncio.wait`` per message).
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
from typing import TYPE_CHECKING

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

from . import wire
from .config import BrokerConfig
from .transport import AuthFailure, Connect, ConnectionLost, Incoming, MqttFailure, Session, Will

if TYPE_CHECKING:
    from paho.mqtt.client import _InPacket

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


def _write_queued(client: paho.Client, *, only_ours: bool = False) -> MQTTErrorCode:
    """paho's ``_packet_write`` with the queued packets joined into one ``send`` (up to ``WRITE_SIZE``).

    The queue holds packets to send in order; a packet partly sent stays at its head with its position, as
    paho keeps it. A QoS 0 publish or a DISCONNECT (which paho completes with callbacks and, for the
    latter, by closing the socket) is left to paho's own method: the agent sends neither in normal operation.
    ``only_ours`` (a write of :class:`_Wire`'s, not from paho's writer): then they are left alone altogether,
    with what is queued before them, for paho's writer, which paho registered when it queued them. (Written
    here, the DISCONNECT closes the socket before aiomqtt adds that writer, at the loop's next turn, and the
    event loop logs a traceback for the closed file descriptor.)
    """
    queue = client._out_packet
    while queue:
        if any(p["command"] & 0xF0 == paho.DISCONNECT or (p["command"] & 0xF0 == paho.PUBLISH and p["qos"] == 0)
               for p in queue):
            return paho.MQTT_ERR_SUCCESS if only_ours else paho.Client._packet_write(client)
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


class _Wire:
    """The per-message paths of one connected paho client (see the module's docstring), installed at a packet
    boundary: a packet paho had begun to read when the connection came up is taken over with its bytes."""

    def __init__(self, client: paho.Client, deliver: Callable[[str, bytes, bool], None],
                 on_error: Callable[[Exception], None]) -> None:
        self._paho = client
        self._deliver = deliver
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self.acks: dict[int, Callable[[], None]] = {}  # our publishes awaiting their PUBACK, by packet id
        self._flush_due = False
        # Bytes received that do not make a whole packet yet, and how many it takes before framing is worth
        # another try (so a big packet arriving in many reads is joined once, not once per read).
        self._rest: list[bytes] = []
        self._have = 0
        self._want = 0
        partial = client._in_packet
        if partial["command"]:
            self._keep(bytes((partial["command"], *partial["remaining_count"])) + bytes(partial["packet"]))
            client._in_packet = _fresh_in_packet()
        client._packet_read = self._read  # type: ignore[method-assign]
        client._packet_write = functools.partial(_write_queued, client)  # type: ignore[method-assign]

    # ---- sending --------------------------------------------------------------------------------

    def send(self, topic: str, payload: bytes, *, retain: bool, on_ack: Callable[[], None] | None) -> None:
        if self._paho._sock is None:
            raise ConnectionLost(f"could not publish on {topic}: not connected")
        mid = self._paho._mid_generate()
        self._queue(wire.encode_publish(topic.encode(), payload, mid, retain=retain), paho.PUBLISH | 0x02, mid)
        if on_ack is not None:
            self.acks[mid] = on_ack

    def _queue(self, packet: bytes, command: int, mid: int) -> None:
        self._paho._out_packet.append({"command": command, "mid": mid, "qos": 1, "pos": 0,
                                       "to_process": len(packet), "packet": packet, "info": None})
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self.flush()

    def flush(self) -> None:
        client = self._paho
        if not client._out_packet or client._sock is None:
            return
        try:
            rc = _write_queued(client, only_ours=True)
            if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_AGAIN):
                client._loop_rc_handle(rc)
            elif client._out_packet:
                # The rest waits for the socket, paho's way. Never unregister here: aiomqtt adds the writer at
                # the loop's next turn (call_soon_threadsafe) and removes it at once, so an unregistering write
                # between the two would leave a writer that paho believes gone, called on every turn.
                client._call_socket_register_write()
        except Exception as exc:  # as aiomqtt's own write callback: the connection is broken
            self._on_error(exc)

    # ---- reading --------------------------------------------------------------------------------

    def _read(self) -> MQTTErrorCode:
        """paho's ``_packet_read``: called (through ``loop_read``) when the socket is readable."""
        client = self._paho
        try:
            data = client._sock_recv(READ_SIZE)
        except BlockingIOError:
            return paho.MQTT_ERR_AGAIN
        except OSError as exc:
            logger.debug("receiving from the broker failed: %s", exc)
            return paho.MQTT_ERR_CONN_LOST
        if not data:
            return paho.MQTT_ERR_CONN_LOST
        with client._msgtime_mutex:
            client._last_bytes_received = time.monotonic()
        if self._rest:
            self._rest.append(data)
            self._have += len(data)
            if self._have < self._want:
                return paho.MQTT_ERR_SUCCESS
            data = b"".join(self._rest)
            self._rest.clear()
        try:
            while data:
                packets, used, want = wire.frames(data)
                if not packets:
                    self._keep(data, want)
                    break
                data = data[used:]
                for first, body in packets:  # (packets ahead of something malformed are handled first)
                    rc = self._handle(first, body)
                    if rc != paho.MQTT_ERR_SUCCESS:
                        return rc
        except wire.Malformed as exc:
            logger.warning("the broker sent something that is not MQTT (%s): reconnecting", exc)
            return paho.MQTT_ERR_PROTOCOL
        return paho.MQTT_ERR_SUCCESS

    def _keep(self, rest: bytes, want: int = 0) -> None:
        self._rest = [rest]
        self._have = len(rest)
        self._want = want

    def _handle(self, first: int, body: bytes) -> MQTTErrorCode:
        kind = first & 0xF0
        if kind == wire.PUBLISH:
            message = wire.decode_publish(first, body)
            if message.qos < 2:
                # A topic that is not UTF-8 (which a broker should never forward) is decoded with replacements:
                # it matches no topic of ours and is dropped as such.
                self._deliver(message.topic.decode("utf-8", "replace"), message.payload, message.retain)
                if message.qos == 1:
                    self._queue(wire.encode_puback(message.mid), paho.PUBACK, message.mid)
                return paho.MQTT_ERR_SUCCESS
        elif kind == wire.PUBACK and len(body) == 2:
            on_ack = self.acks.pop(wire.decode_puback(body), None)
            if on_ack is not None:
                on_ack()
                return paho.MQTT_ERR_SUCCESS
        return self._to_paho(first, body)

    def _to_paho(self, first: int, body: bytes) -> MQTTErrorCode:
        """Let paho handle the packet, as its own ``_packet_read`` does once it has read one."""
        client = self._paho
        client._in_packet = {"command": first, "have_remaining": 1, "remaining_count": [], "remaining_mult": 1,
                             "remaining_length": len(body), "packet": bytearray(body), "to_process": 0, "pos": 0}
        try:
            return client._packet_handle()
        except MalformedPacket as exc:
            logger.warning("the broker sent a malformed packet (%s): reconnecting", exc)
            return paho.MQTT_ERR_PROTOCOL
        finally:
            client._in_packet = _fresh_in_packet()


def _fresh_in_packet() -> _InPacket:
    """paho's state of a packet not begun (as its ``_packet_read`` resets it)."""
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1, "remaining_length": 0,
            "packet": bytearray(b""), "to_process": 0, "pos": 0}


class MqttSession:
    """One live connection over aiomqtt (``hasync.transport.Session``)."""

    def __init__(self, client: aiomqtt.Client, urgent: Callable[[str], bool] | None = None) -> None:
        self._client = client
        self._paho = client._client
        self._inbox = _Lanes(urgent or _never)
        self._arrived = asyncio.Event()
        self._disconnected: asyncio.Future[None] = client._disconnected
        self._disconnected.add_done_callback(lambda _: self._arrived.set())
        self._wire = _Wire(self._paho, self._receive, self._broken)
        # What paho still delivers itself (a QoS 2 message, which the agent never asks for) goes to our inbox
        # too, not to aiomqtt's queue.
        self._paho.on_message = self._on_message

    def _receive(self, topic: str, payload: bytes, retain: bool) -> None:
        self._inbox.append(Incoming(topic, payload, retain))
        self._arrived.set()

    def _on_message(self, _client: paho.Client, _userdata: object, message: paho.MQTTMessage) -> None:
        self._receive(message._topic.decode("utf-8", "replace"), bytes(message.payload), bool(message.retain))

    def _broken(self, exc: Exception) -> None:
        if not self._disconnected.done():
            self._disconnected.set_exception(exc)

    async def subscribe(self, *topics: str) -> None:
        """One SUBSCRIBE for all ``topics``: one round trip to the broker, not one each."""
        try:
            await self._client.subscribe([(topic, 1) for topic in topics])
        except aiomqtt.MqttError as exc:
            raise _translate(exc) from exc

    def send(self, topic: str, payload: bytes, *, retain: bool, on_ack: Callable[[], None] | None = None) -> None:
        self._wire.send(topic, payload, retain=retain, on_ack=on_ack)

    def flush(self) -> None:
        self._wire.flush()

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


def connector(cfg: BrokerConfig, *, urgent: Callable[[str], bool] | None = None) -> Connect:
    """The agent's :data:`hasync.transport.Connect` for the broker ``cfg`` describes (``urgent``: see
    :func:`connect`)."""

    def connect_to(client_id: str, will: Will | None) -> AbstractAsyncContextManager[Session]:
        return connect(cfg, client_id, will, urgent=urgent)

    return connect_to


__all__ = ["AuthFailure", "ConnectionLost", "MqttFailure", "MqttSession", "connect", "connector", "no_delay"]
