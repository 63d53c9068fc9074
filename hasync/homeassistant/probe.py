"""The MQTT echo probe: proves that Home Assistant's own MQTT client is connected to the broker (see the
health checks in ``hasync.homeassistant.link``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ..aio import wait_or
from .errors import CommandFailed, RequestTimeout
from .websocket import Connection

REPUBLISH_AFTER = 0.5  # s without an echo before the probe publishes again


class MqttProbe:
    """Proves HA's MQTT client is connected: HA publishes ``payload`` on ``topic`` and receives it back.

    The payload is the same on every probe of a link: HA's recorder stores each service call as an
    event, and identical event data is stored once. An echo delayed past one probe's deadline could
    confirm the next probe; it did cross the broker, so the link is slow rather than down.
    """

    def __init__(self, topic: str, payload: str, timeout: float, down_interval: float) -> None:
        self.topic = topic
        self._payload = payload
        self._timeout = timeout
        self._down_interval = down_interval
        self._subscription: int | None = None
        self._echo = asyncio.Event()
        self._held: tuple[bool, str] | None = None  # a "down" result repeated until _retry_at
        self._retry_at = 0.0

    def reset(self, conn: Connection) -> None:
        """Forget the subscription (the MQTT entry was unloaded, or the probe lost its echo)."""
        if self._subscription is not None:
            conn.forget(self._subscription)
        self._subscription = None
        self._held = None

    def _on_event(self, event: Any) -> None:
        if isinstance(event, dict) and event.get("payload") == self._payload:
            self._echo.set()

    async def run(self, conn: Connection) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        if self._held is not None and loop.time() < self._retry_at:
            return self._held
        self._held = None
        if self._subscription is None:
            try:
                self._subscription = await conn.subscribe(
                    {"type": "mqtt/subscribe", "topic": self.topic, "qos": 0}, self._on_event
                )
            except CommandFailed as exc:
                if exc.code == "unauthorized":
                    return False, (
                        "the access token's user is not an administrator; Home Assistant allows only "
                        "administrators to subscribe to MQTT topics (mqtt/subscribe), which the MQTT check needs"
                    )
                return False, f"Home Assistant refused to subscribe to MQTT topic {self.topic}: {exc.message}"
        self._echo.clear()
        publish = {"topic": self.topic, "payload": self._payload, "qos": 0, "retain": False}
        try:
            async with asyncio.timeout(self._timeout):
                while True:  # again every REPUBLISH_AFTER: HA may not have subscribed at the broker yet
                    await conn.command(
                        {"type": "call_service", "domain": "mqtt", "service": "publish", "service_data": publish}
                    )
                    if await wait_or(self._echo, REPUBLISH_AFTER):
                        return True, "ok"
        except CommandFailed as exc:
            # HA's MQTT client is disconnected: it refuses to publish. Probe less often (see module docstring).
            self._held = (False, f"Home Assistant's MQTT connection is down ({exc.message})")
            self._retry_at = loop.time() + self._down_interval
            return self._held
        except (TimeoutError, RequestTimeout):
            await self._unsubscribe(conn)
            return False, (
                f"Home Assistant's MQTT connection is down (a test message HA published on {self.topic} did not "
                f"come back within {self._timeout:g}s; with broker ACLs, HA's MQTT user needs read and write "
                "access to that topic)"
            )

    async def _unsubscribe(self, conn: Connection) -> None:
        """Subscribe afresh next time, in case HA lost our subscription (e.g. an entry reload)."""
        subscription = self._subscription
        self.reset(conn)
        if subscription is None:
            return
        with contextlib.suppress(CommandFailed, RequestTimeout):
            await conn.command({"type": "unsubscribe_events", "subscription": subscription})
