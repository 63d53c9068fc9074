"""The broker seam: what the agent needs from an MQTT connection, and nothing else.

``hasync.mqtt`` implements it over aiomqtt; ``harness.fakebroker`` implements it in memory for the
in-process tests. The agent is given a :data:`Connect` (like httpx is given a transport) and never imports
either.

Exceptions::

    MqttFailure                 base: the connection could not be made or was lost
    ├── AuthFailure             bad credentials or not authorised: permanent, retry slowly
    └── ConnectionLost          network or broker trouble: retry with backoff
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


class MqttFailure(Exception):
    """The broker connection failed or was lost."""


class AuthFailure(MqttFailure):
    """The broker refused our credentials; retrying at once will not help."""


class ConnectionLost(MqttFailure):
    """The broker could not be reached or the connection dropped."""


@dataclass(frozen=True, slots=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes


class Session(Protocol):
    """One live connection (clean session, QoS 1 throughout). Any failure raises :class:`MqttFailure`."""

    async def subscribe(self, *topics: str) -> None: ...

    def send(self, topic: str, payload: bytes, *, retain: bool, on_ack: Callable[[], None] | None = None) -> None:
        """Queue a publish behind every earlier ``send`` of this session; it goes on the wire at ``flush`` or at
        the event loop's next turn, whichever comes first. ``on_ack`` is called when the broker acknowledges it
        (never, if the connection is lost first)."""

    def flush(self) -> None:
        """Write what ``send`` queued now (a burst of sends goes out in one write)."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """``send`` and wait for the acknowledgement."""

    def messages(self) -> AsyncIterator[Incoming]: ...


# connect(client_id, will): leaving the block disconnects; the will is published only if the connection
# ends without a clean disconnect (a crash, a lost network).
Connect = Callable[[str, Will | None], AbstractAsyncContextManager[Session]]
