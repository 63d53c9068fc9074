"""hasync's MQTT discovery messages as a real Home Assistant (harness/ha.py) reads them: the primary sensor is
``on`` only while fresh state messages say so and their deadline has not passed, turns ``unavailable`` by itself
``expire_after`` seconds after the last one, and follows the node's heartbeat (its Last Will) for availability.
This is what automations gated on the sensor rely on when an agent hangs or dies.
"""

from __future__ import annotations

import asyncio
import time
from typing import Self

import pytest

from harness.brokers import MosquittoProcess
from harness.ha import HomeAssistant, StartHA
from hasync import __version__
from hasync.aio import wait_or
from hasync.config import BrokerConfig
from hasync.homeassistant.discovery import Discovery, primary_state
from hasync.messages import Heartbeat, NodeRole
from hasync.mqtt import connect
from hasync.topics import Topics
from hasync.transport import Session

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.timeout(240)]

NODE = "n1"
RENEW_DEADLINE = 3.0  # expire_after 2 s


class Renewing:
    """Publishes the primary sensor's state every ``interval`` s until the block ends, as an agent does.

    ``last_sent`` is the monotonic time the broker acknowledged the newest one; leaving the block waits for
    a publish under way, so nothing is sent after it.
    """

    def __init__(self, session: Session, discovery: Discovery, *, valid_for: float, interval: float = 0.5) -> None:
        self._session, self._discovery = session, discovery
        self._valid_for, self._interval = valid_for, interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_sent: float | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="renewing")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._task is not None
        async with asyncio.timeout(10):
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            payload = primary_state(True, time.time() + self._valid_for)
            await self._session.publish(self._discovery.primary_state_topic(), payload, retain=False)
            self.last_sent = time.monotonic()
            await wait_or(self._stop, self._interval)


async def _wait_for_state(ha: HomeAssistant, entity_id: str, expected: str, within: float) -> None:
    # On a thread, so the MQTT client on this loop keeps running while HA is polled.
    await asyncio.to_thread(ha.wait_for_state, entity_id, expected, within)


def _heartbeat(topics: Topics, online: bool) -> bytes:
    return Heartbeat(node=NODE, incarnation="smoke", conn=1, online=online,
                     role=NodeRole.PRIMARY if online else NodeRole.OFFLINE).to_payload()


async def test_the_primary_sensor_expires_follows_the_will_and_reads_off_past_its_deadline(
    mosquitto: MosquittoProcess, start_ha: StartHA, topic_prefix: str
) -> None:
    (ha,) = await asyncio.to_thread(start_ha, "ha1", mqtt_port=mosquitto.port)
    topics = Topics(topic_prefix, "smoke")
    discovery = Discovery(topics, NODE, "homeassistant", RENEW_DEADLINE, __version__)
    sensor = f"binary_sensor.{discovery.unique_prefix}_primary"
    async with connect(BrokerConfig(url=mosquitto.url), f"{topic_prefix}-test") as session:
        for topic, payload in discovery.configs():
            await session.publish(topic, payload, retain=True)
        await session.publish(topics.heartbeat(NODE), _heartbeat(topics, True), retain=True)

        # Renewed until HA shows it (a state sent before HA processed the discovery config is dropped).
        async with Renewing(session, discovery, valid_for=RENEW_DEADLINE) as renewer:
            await _wait_for_state(ha, sensor, "on", 60)
        state = ha.get_state(sensor)
        assert state is not None and state["attributes"]["friendly_name"] == f"hasync {NODE} Primary"

        # Silence (a hung agent): HA gives the state up by itself, expire_after seconds after the last one.
        assert renewer.last_sent is not None
        silent_since = renewer.last_sent
        await _wait_for_state(ha, sensor, "unavailable", discovery.expire_after + 2)
        expired_after = time.monotonic() - silent_since
        print(f"\nexpire_after={discovery.expire_after}: unavailable {expired_after:.2f} s after the last message")
        assert expired_after >= discovery.expire_after - 0.5

        async with Renewing(session, discovery, valid_for=RENEW_DEADLINE):
            await _wait_for_state(ha, sensor, "on", 10)
            # The node's will (offline heartbeat) makes every entity unavailable, even with states coming.
            await session.publish(topics.heartbeat(NODE), _heartbeat(topics, False), retain=True)
            await _wait_for_state(ha, sensor, "unavailable", 5)
            await session.publish(topics.heartbeat(NODE), _heartbeat(topics, True), retain=True)
            await _wait_for_state(ha, sensor, "on", 5)
        # A state whose deadline has passed (it sat in a frozen agent's buffer) reads off.
        async with Renewing(session, discovery, valid_for=-1.0):
            await _wait_for_state(ha, sensor, "off", 5)
