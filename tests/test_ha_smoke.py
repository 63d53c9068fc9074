"""Smoke tests against a real Home Assistant (tests/ha.py): MQTT discovery, expire_after, availability,
two instances on one broker, and an automation.

HA is onboarded once per session into a template config dir; each test starts copies of it, so the
owner and long-lived token are created once and every test starts from the same state. Needs
scripts/setup-ha.sh; without it these tests skip, or fail when CI is set.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Self

import pytest

from harness.brokers import MosquittoProcess
from harness.ha import TEST_EVENT, HomeAssistant, StartHA
from hasync.aio import wait_or
from hasync.config import BrokerConfig
from hasync.mqtt import connect
from hasync.transport import Session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EXPIRE_AFTER = 2
DISCOVERY_TOPIC = "homeassistant/binary_sensor/hasync_smoke/primary/config"
OBJECT_ID = "hasync_smoke_primary"
ENTITY_ID = f"binary_sensor.{OBJECT_ID}"

class RepeatingPublisher:
    """Publishes one message every ``interval`` s until the block ends, as an agent renews its state.

    ``last_sent`` is the monotonic time the broker acknowledged the newest one; leaving the block waits
    for a publish under way, so nothing is sent after it.
    """

    def __init__(self, session: Session, topic: str, payload: bytes, interval: float = 0.5) -> None:
        self._session = session
        self._topic = topic
        self._payload = payload
        self._interval = interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_sent: float | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"publish-every[{self._topic}]")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._task is not None
        async with asyncio.timeout(10):
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._session.publish(self._topic, self._payload, retain=False)
            self.last_sent = time.monotonic()
            await wait_or(self._stop, self._interval)


async def _announce_sensor(session: Session, prefix: str) -> tuple[str, str]:
    """Publish the discovery config (retained) and availability online; returns (state, availability) topics."""
    state_topic = f"{prefix}/primary/state"
    availability_topic = f"{prefix}/primary/availability"
    config = {
        "name": "Primary",
        "object_id": OBJECT_ID,
        "unique_id": f"{prefix}_primary",
        "state_topic": state_topic,
        "availability_topic": availability_topic,
        "payload_available": "online",
        "payload_not_available": "offline",
        "expire_after": EXPIRE_AFTER,
        "device": {"identifiers": [f"{prefix}_node"], "name": "hasync smoke", "manufacturer": "hasync"},
    }
    await session.publish(DISCOVERY_TOPIC, json.dumps(config).encode(), retain=True)
    await session.publish(availability_topic, b"online", retain=True)
    return state_topic, availability_topic


async def _wait_for_state(ha: HomeAssistant, expected: str, within: float) -> None:
    # On a thread, so the MQTT client on this loop keeps running while HA is polled.
    await asyncio.to_thread(ha.wait_for_state, ENTITY_ID, expected, within)


@pytest.mark.mosquitto
async def test_discovered_binary_sensor_expires_and_follows_availability(
    mosquitto: MosquittoProcess, start_ha: StartHA, topic_prefix: str
) -> None:
    (ha,) = await asyncio.to_thread(start_ha, "ha1", mqtt_port=mosquitto.port)
    async with connect(BrokerConfig(url=mosquitto.url), client_id=f"{topic_prefix}-test") as session:
        state_topic, availability_topic = await _announce_sensor(session, topic_prefix)

        # Re-published until HA shows it: a state sent before HA processed the discovery config is dropped.
        async with RepeatingPublisher(session, state_topic, b"ON") as renewer:
            await _wait_for_state(ha, "on", 60)
        state = ha.get_state(ENTITY_ID)
        assert state is not None
        assert state["attributes"]["friendly_name"] == "hasync smoke Primary"

        # Silence: HA must give up on the state by itself, expire_after seconds after the last message.
        assert renewer.last_sent is not None
        silent_since = renewer.last_sent
        await _wait_for_state(ha, "unavailable", EXPIRE_AFTER + 2 - (time.monotonic() - silent_since))
        expired_after = time.monotonic() - silent_since
        print(f"\nexpire_after={EXPIRE_AFTER}: unavailable {expired_after:.2f} s after the last state message")
        assert expired_after >= EXPIRE_AFTER - 0.5

        # While the state keeps coming, availability alone decides.
        async with RepeatingPublisher(session, state_topic, b"ON"):
            await _wait_for_state(ha, "on", 10)
            await session.publish(availability_topic, b"offline", retain=True)
            await _wait_for_state(ha, "unavailable", 5)
            await session.publish(availability_topic, b"online", retain=True)
            await _wait_for_state(ha, "on", 5)


@pytest.mark.mosquitto
async def test_two_instances_on_one_broker_see_the_same_entity(
    mosquitto: MosquittoProcess, start_ha: StartHA, topic_prefix: str
) -> None:
    ha_a, ha_b = await asyncio.to_thread(start_ha, "ha-a", "ha-b", mqtt_port=mosquitto.port)
    assert ha_a.url != ha_b.url
    async with connect(BrokerConfig(url=mosquitto.url), client_id=f"{topic_prefix}-test") as session:
        state_topic, availability_topic = await _announce_sensor(session, topic_prefix)
        async with RepeatingPublisher(session, state_topic, b"ON"):
            await asyncio.gather(_wait_for_state(ha_a, "on", 60), _wait_for_state(ha_b, "on", 60))
            await session.publish(availability_topic, b"offline", retain=True)
            await asyncio.gather(_wait_for_state(ha_a, "unavailable", 5), _wait_for_state(ha_b, "unavailable", 5))


def test_event_triggers_automation_that_increments_counter(start_ha: StartHA) -> None:
    (ha,) = start_ha("ha-counter")
    presses = ha.get_state("counter.presses")
    assert presses is not None
    assert presses["state"] == "0"
    ha.fire_event(TEST_EVENT, {"source": "hasync tests"})
    ha.wait_for_state("counter.presses", "1", timeout=10)
    assert ha.get_state("input_boolean.test_flag") is not None


@pytest.mark.mosquitto
def test_restart_keeps_onboarding_token_and_mqtt_entry(mosquitto: MosquittoProcess, start_ha: StartHA) -> None:
    (ha,) = start_ha("ha-restart", mqtt_port=mosquitto.port)
    token = ha.token
    for crash in (False, True):
        if crash:
            ha.kill()
        else:
            ha.stop()
        ha.start()  # no second onboarding; the MQTT entry in .storage is reused and must load again
        print(f"\nHA {ha.name}: restart after {'a kill' if crash else 'a stop'} took {ha.start_seconds:.1f} s")
        assert ha.token == token
        assert ha.get_state("counter.presses") is not None
