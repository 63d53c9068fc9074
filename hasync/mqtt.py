"""The MQTT edge: the only module that imports aiomqtt.

Exceptions::

    MqttFailure                 base: the connection could not be made or was lost
    ├── AuthFailure             bad credentials or not authorised: permanent, retry slowly
    └── ConnectionLost          network or broker trouble: retry with backoff

A fresh aiomqtt client is used for every connection, so nothing queued on an old connection is re-sent
on a new one (paho re-sends unacknowledged publishes after a reconnect otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiomqtt

from .config import BrokerConfig

logger = logging.getLogger(__name__)


class MqttFailure(Exception):
    """The broker connection failed or was lost."""


class AuthFailure(MqttFailure):
    """The broker refused our credentials; retrying at once will not help."""


class ConnectionLost(MqttFailure):
    """The broker could not be reached or the connection dropped."""


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes


MAX_INFLIGHT = 128  # unacknowledged QoS 1 publishes per connection (paho's default is 20)
_AUTH_CODES = {4, 5, 134, 135}  # 3.1.1: bad credentials, not authorised; 5.0 equivalents


def _translate(exc: aiomqtt.MqttError) -> MqttFailure:
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if isinstance(exc, aiomqtt.MqttCodeError) and code in _AUTH_CODES:
        return AuthFailure(str(exc))
    return ConnectionLost(str(exc) or type(exc).__name__)


class Session:
    """One live connection. Publish and iterate; any failure raises MqttFailure."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._client = client

    async def subscribe(self, *topics: str) -> None:
        try:
            for topic in topics:
                await self._client.subscribe(topic, qos=1)
        except aiomqtt.MqttError as exc:
            raise _translate(exc) from exc

    async def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        try:
            await self._client.publish(topic, payload, qos=qos, retain=retain)
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


@asynccontextmanager
async def connect(cfg: BrokerConfig, client_id: str, will: Will | None = None) -> AsyncIterator[Session]:
    """Connect with a fresh client; leaving the block disconnects (with an exception: uncleanly)."""
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
            # Above entity sync's own bound on unacknowledged publishes (hasync.replica.MAX_IN_FLIGHT), so
            # a burst of entity records never makes a lease renewal wait for a free slot.
            max_inflight_messages=MAX_INFLIGHT,
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionLost(f"TLS setup failed: {exc}") from exc
    try:
        async with client:
            no_delay(client)
            yield Session(client)
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


class Backoff:
    """Exponential backoff with full jitter and a cap; reset after a connection that worked."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._attempt = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self, *, permanent: bool = False) -> float:
        if permanent:
            return self.maximum
        ceiling = min(self.maximum, self.minimum * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self.minimum + self._rng.random() * (ceiling - self.minimum)


async def wait_or(event: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``event`` is set; True if the event was set."""
    try:
        async with asyncio.timeout(delay):
            await event.wait()
    except TimeoutError:
        return False
    return True
