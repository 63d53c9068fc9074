"""HomeAssistantLink against the fake Home Assistant (harness.fakeha), on virtual time: every health check
and failure mode, reconnects, state watching, scene.apply with contexts, helpers, managed automations, and
what HA should never send. The real HA runs the same paths in test_homeassistant.py; the fake's frames are
recordings of the real one (test_fakeha.py keeps them in step)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from harness import vclock
from harness.fakeha import FakeHomeAssistant, HealthChanges
from hasync.homeassistant.automations import AutomationSwitch
from hasync.homeassistant.errors import CommandFailed, NotConnected
from hasync.homeassistant.link import HomeAssistantLink

URL = "http://ha.test:8123"
LOGGER = "hasync.homeassistant"
PROBE = "hasync/test/nodes/n1/ha-probe"


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


@asynccontextmanager
async def link_to(fake: FakeHomeAssistant, changes: HealthChanges, *, token: str | None = None,
                  **options: Any) -> AsyncIterator[HomeAssistantLink]:
    """The link with the agent's own settings (check every 2 s, 5 s timeout, reconnect 0.5-30 s)."""
    async with HomeAssistantLink(URL, token or fake.token, on_change=changes, open_websocket=fake.open,
                                 probe_topic=PROBE, **options) as link:
        yield link


def warnings(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= level]


def test_healthy_with_the_right_token(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        async with link_to(fake, changes) as link:
            assert await changes.wait_for(True, within=10) == (True, "ok")
            assert link.healthy and link.detail == "ok" and link.connected
            assert link.ha_version == "2024.3.3"
            await asyncio.sleep(60)  # a minute of checks: ping, the MQTT entry, the echo, every 2 s
            assert len(fake.commands("ping")) >= 25
            assert len(fake.service_calls("mqtt", "publish")) >= 25
        assert changes.calls == [(True, "ok")]
        assert not warnings(caplog)

    run(scenario)


def test_a_wrong_token_is_one_error_retried_slowly_and_never_healthy(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        async with link_to(fake, changes, token="not-a-valid-token") as link:
            _, detail = await changes.wait_for(False, within=10)
            assert "token" in detail
            connections = fake.connections
            await asyncio.sleep(95)  # retried every reconnect_max (30 s), not in a tight loop
            assert fake.connections - connections in (3, 4)
            assert not link.healthy and "token" in link.detail
            with pytest.raises(NotConnected):
                await AutomationSwitch(link).set_automations(False)
        assert [healthy for healthy, _ in changes.calls] == [False]
        errors = warnings(caplog, logging.ERROR)
        assert len(errors) == 1, errors
        assert "rejected the access token (auth_invalid" in errors[0] and "long-lived access token" in errors[0]
        assert "not-a-valid-token" not in caplog.text

    run(scenario)


def test_home_assistant_stopping_and_starting_again() -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        async with link_to(fake, changes) as link:
            await changes.wait_for(True, within=10)
            fake.stop()
            _, detail = await changes.wait_for(False, within=5)
            assert "closed by Home Assistant, code 1001" in detail, detail
            assert not link.connected
            await asyncio.sleep(20)  # reconnecting meanwhile, with backoff
            assert "unreachable" in link.detail and "Connection refused" in link.detail, link.detail
            fake.start()
            await changes.wait_for(True, within=35)  # within one reconnect_max
            assert link.connected

    run(scenario)


def test_home_assistants_mqtt_client_down_and_up(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        async with link_to(fake, changes) as link:
            await changes.wait_for(True, within=10)
            fake.mqtt_connected = False
            _, detail = await changes.wait_for(False, within=5)
            assert detail == ("Home Assistant's MQTT connection is down (Error talking to MQTT: The client is not "
                              "currently connected.)"), detail
            assert link.connected  # HA itself is fine
            # HA logs a traceback for every publish that fails: while it is down, the probe slows to every 10 s.
            before = len(fake.service_calls("mqtt", "publish"))
            await asyncio.sleep(60)
            assert 5 <= len(fake.service_calls("mqtt", "publish")) - before <= 6  # not 30
            assert len(fake.commands("ping")) >= 30  # ping and the entry check go on every 2 s
            fake.mqtt_connected = True
            await changes.wait_for(True, within=11)
        assert sum("MQTT connection is down" in m for m in warnings(caplog)) == 1

    run(scenario)


@pytest.mark.parametrize(("entry", "expected"), [
    (None, "the MQTT integration is not set up in Home Assistant"),
    ("setup_retry", "MQTT integration not loaded (state: setup_retry)"),
    ("not_loaded", "MQTT integration not loaded (state: not_loaded)"),
])
def test_the_mqtt_integration_not_loaded(entry: str | None, expected: str) -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        fake.mqtt_entry_state = entry
        async with link_to(fake, changes) as link:
            assert await changes.wait_for(False, within=10) == (False, expected)
            assert link.connected
            fake.mqtt_entry_state = "loaded"
            await changes.wait_for(True, within=5)

    run(scenario)


def test_an_echo_that_never_comes_back() -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        fake.mqtt_echo = False  # a broker ACL dropping HA's probe
        async with link_to(fake, changes) as link:
            _, detail = await changes.wait_for(False, within=15)
            assert detail.startswith(
                f"Home Assistant's MQTT connection is down (a test message HA published on {PROBE} did not come "
                "back within 5s"), detail
            assert link.connected
            # republished every half second while it waits, then unsubscribed to subscribe afresh next time
            assert len(fake.service_calls("mqtt", "publish")) >= 9
            assert fake.commands("unsubscribe_events")
            fake.mqtt_echo = True
            await changes.wait_for(True, within=10)

    run(scenario)


def test_a_token_of_a_user_who_is_not_an_administrator() -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        fake.admin = False
        async with link_to(fake, changes):
            _, detail = await changes.wait_for(False, within=10)
            assert "not an administrator" in detail and "mqtt/subscribe" in detail

    run(scenario)


def test_a_hung_home_assistant_is_left_and_connected_to_again() -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        async with link_to(fake, changes) as link:
            await changes.wait_for(True, within=10)
            fake.hang = True
            _, detail = await changes.wait_for(False, within=10)
            assert "did not answer" in detail and "within 5s" in detail, detail
            connections = fake.connections
            await asyncio.sleep(10)
            assert fake.connections > connections  # a half-open connection is only found out by a new one
            fake.hang = False
            await changes.wait_for(True, within=35)
            assert link.healthy

    run(scenario)


def test_what_home_assistant_should_never_send_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake, changes = FakeHomeAssistant(), HealthChanges()
        async with link_to(fake, changes) as link:
            await changes.wait_for(True, within=10)
            for text in ("not json", "[1, 2]", "{}", '{"id": 999, "type": "result", "success": true}',
                         '{"id": "x", "type": "event"}', '{"id": 1, "type": "mystery"}', '[{"id": 998}]', "null"):
                fake.send_raw(text)
            await asyncio.sleep(10)
            assert link.healthy
        assert changes.calls == [(True, "ok")]

    run(scenario)


# ---- state watching, applying, helpers ------------------------------------------------------------------


class Watcher:
    def __init__(self) -> None:
        self.snapshots: list[list[dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []

    def on_states(self, states: list[dict[str, Any]]) -> None:
        self.snapshots.append(states)

    def on_state_changed(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def test_states_are_watched_from_a_snapshot_on_every_connection() -> None:
    async def scenario() -> None:
        fake = FakeHomeAssistant(entities={"input_boolean.a": ("off", {}), "input_number.n": ("1.0", {"min": 0})})
        watcher, changes = Watcher(), HealthChanges()
        async with link_to(fake, changes, on_states=watcher.on_states, on_state_changed=watcher.on_state_changed):
            await changes.wait_for(True, within=10)
            [snapshot] = watcher.snapshots
            assert {s["entity_id"]: s["state"] for s in snapshot} == {"input_boolean.a": "off", "input_number.n": "1.0"}
            context = fake.set_state("input_boolean.a", "on")
            await asyncio.sleep(0.1)
            [event] = watcher.events
            assert event["data"]["new_state"]["state"] == "on" and event["context"]["id"] == context["id"]
            fake.stop()
            fake.set_state("input_boolean.a", "off")  # while the link is away: only the next snapshot shows it
            fake.start()
            await changes.wait_for(False, within=5)
            await changes.wait_for(True, within=35)
            assert len(watcher.snapshots) == 2 and len(watcher.events) == 1
            assert {s["entity_id"]: s["state"] for s in watcher.snapshots[1]}["input_boolean.a"] == "off"

    run(scenario)


def test_apply_states_answers_with_the_context_its_events_carry() -> None:
    async def scenario() -> None:
        fake = FakeHomeAssistant(entities={"input_boolean.a": ("off", {}),
                                           "input_number.n": ("1.0", {"min": 0, "max": 10})})
        watcher, changes = Watcher(), HealthChanges()
        async with link_to(fake, changes, on_states=watcher.on_states,
                           on_state_changed=watcher.on_state_changed) as link:
            await changes.wait_for(True, within=10)
            context = await link.apply_states({"input_boolean.a": {"state": "on"}, "input_number.n": {"state": "99"},
                                               "input_boolean.missing": {"state": "on"}})
            assert [e["context"]["id"] for e in watcher.events] == [context]  # 99 is out of range: no event
            assert (fake.state("input_boolean.a"), fake.state("input_number.n")) == ("on", "1.0")

    run(scenario)


def test_only_helpers_made_in_the_ui_can_be_deleted() -> None:
    async def scenario() -> None:
        fake = FakeHomeAssistant(entities={"input_boolean.yaml": ("off", {})})
        fake.add("input_boolean.ui", "off", ui_helper=True)
        changes = HealthChanges()
        async with link_to(fake, changes) as link:
            await changes.wait_for(True, within=10)
            await link.delete_helper("input_boolean.ui")
            assert fake.state("input_boolean.ui") is None
            with pytest.raises(CommandFailed, match="not_found"):
                await link.delete_helper("input_boolean.yaml")
            assert fake.state("input_boolean.yaml") == "off"

    run(scenario)


def test_managed_automations_switch_all_but_the_kept_ones(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeHomeAssistant(entities={"automation.a": ("on", {}), "automation.b": ("on", {}),
                                           "automation.kept": ("on", {}), "automation.broken": ("unavailable", {}),
                                           "light.x": ("on", {})})
        changes = HealthChanges()
        async with link_to(fake, changes) as link:
            await changes.wait_for(True, within=10)
            switch = AutomationSwitch(link)
            assert await switch.set_automations(False, keep=["automation.kept", "automation.gone"]) == [
                "automation.a", "automation.b"]
            assert [fake.state(e) for e in ("automation.a", "automation.b", "automation.kept", "automation.broken")] \
                == ["off", "off", "on", "unavailable"]
            assert await switch.set_automations(False, keep=["automation.kept", "automation.gone"]) == []
            assert await switch.set_automations(True) == ["automation.a", "automation.b"]
            with pytest.raises(ValueError, match=r"automation\.x"):
                await switch.set_automations(True, keep=["water_everywhere"])
        assert sum("automation.gone" in m for m in warnings(caplog)) == 1  # warned about once

    run(scenario)
