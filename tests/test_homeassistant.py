"""HomeAssistantLink against a real Home Assistant (harness/ha.py) and Mosquitto: health, the failures only
a real HA and broker show (HA stopping, its broker stopping, an ACL dropping its probe), managed
automations; and the link's websocket opener against what is not Home Assistant (nothing listening, a host
that does not resolve, a server without HA's API). The other failure modes and the state watching run
against the fake Home Assistant in test_homeassistant_inprocess.py.

Every wait is bounded and waits for a reported change (or polls a predicate), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from harness.brokers import MosquittoProcess, mosquitto_binary
from harness.fakeha import HealthChanges
from harness.ha import TEST_EVENT, HomeAssistant, StartHA
from harness.wait import HOST, free_port
from hasync.homeassistant.automations import AutomationSwitch
from hasync.homeassistant.errors import NotConnected
from hasync.homeassistant.link import HomeAssistantLink

pytestmark = [pytest.mark.timeout(240)]
integration = pytest.mark.integration

LOGGER = "hasync.homeassistant"
KEPT = "automation.count_test_presses"  # the automation that TEST_EVENT triggers (harness/ha.py)


class LogWatch(logging.Handler):
    """Wakes ``until()`` whenever the link logs, to re-check a predicate over caplog's records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self._logged.set()

    async def until(self, predicate: Callable[[], bool], within: float) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self._logged.clear()
                await self._logged.wait()


@pytest.fixture
def log_watch(caplog: pytest.LogCaptureFixture) -> Iterator[LogWatch]:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    watch = LogWatch()
    logging.getLogger(LOGGER).addHandler(watch)
    yield watch
    logging.getLogger(LOGGER).removeHandler(watch)


def repeats(caplog: pytest.LogCaptureFixture) -> int:
    """How many failures the link logged as repeats (at DEBUG)."""
    return sum(1 for r in caplog.records if r.name.startswith(LOGGER) and "still unhealthy" in r.getMessage())


@asynccontextmanager
async def link_to(url: str, token: str, changes: HealthChanges, **options: Any) -> AsyncIterator[HomeAssistantLink]:
    defaults: dict[str, Any] = {"check_interval": 0.5, "timeout": 3.0, "reconnect_min": 0.1, "reconnect_max": 1.0}
    async with HomeAssistantLink(url, token, on_change=changes, **(defaults | options)) as link:
        yield link


@pytest.fixture
def ha(start_ha: StartHA, mosquitto: MosquittoProcess) -> HomeAssistant:
    """One HA whose MQTT integration is connected to the test's Mosquitto."""
    (instance,) = start_ha("hal", mqtt_port=mosquitto.port)
    return instance


# ---- healthy ------------------------------------------------------------------------------------------


@integration
async def test_healthy_with_good_url_and_token(ha: HomeAssistant, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    changes = HealthChanges()
    async with link_to(ha.url, ha.token, changes) as link:
        assert await changes.wait_for(True, within=30) == (True, "ok")
        assert link.healthy and link.detail == "ok" and link.connected
        assert link.ha_version == "2024.3.3"
    assert changes.calls == [(True, "ok")]
    assert not [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.WARNING]


# ---- what is not Home Assistant (no HA needed) ---------------------------------------------------------


async def test_nothing_listening(caplog: pytest.LogCaptureFixture, log_watch: LogWatch) -> None:
    url = f"http://{HOST}:{free_port()}"
    changes = HealthChanges()
    async with link_to(url, "token", changes) as link:
        _, detail = await changes.wait_for(False, within=10)
        assert detail == f"Home Assistant unreachable at {url}: Cannot connect (Connection refused)"
        await log_watch.until(lambda: repeats(caplog) >= 2, within=10)
        with pytest.raises(NotConnected, match="Connection refused"):
            await AutomationSwitch(link).set_automations(True)
    warnings = [r for r in caplog.records if r.name.startswith(LOGGER) and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_unresolvable_host() -> None:
    url = "http://hasync-no-such-host.invalid:8123"
    changes = HealthChanges()
    async with link_to(url, "token", changes):
        _, detail = await changes.wait_for(False, within=15)
    # "Cannot resolve host", or a resolver that hangs runs into the connect timeout.
    assert detail.startswith(f"Home Assistant unreachable at {url}: "), detail


async def test_http_server_that_is_not_home_assistant() -> None:
    app = web.Application()  # no routes: every path answers 404
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        url = f"http://{HOST}:{sock.getsockname()[1]}"
        await web.SockSite(runner, sock).start()
        try:
            changes = HealthChanges()
            async with link_to(url, "token", changes):
                _, detail = await changes.wait_for(False, within=10)
        finally:
            await runner.cleanup()
    assert detail.startswith(f"Home Assistant not found at {url}: HTTP 404 for /api/websocket"), detail


# ---- HA stopped and started again, broker stopped and started again ------------------------------------


@integration
async def test_ha_stopped_then_started(ha: HomeAssistant) -> None:
    changes = HealthChanges()
    async with link_to(ha.url, ha.token, changes) as link:
        await changes.wait_for(True, within=30)
        stopping = time.monotonic()
        stop = asyncio.create_task(asyncio.to_thread(ha.stop))
        _, detail = await changes.wait_for(False, within=10)
        lost_after = time.monotonic() - stopping
        await stop
        assert f"Home Assistant at {ha.url}" in detail or "unreachable" in detail, detail
        assert not link.healthy

        await asyncio.to_thread(ha.start)
        started = time.monotonic()
        await changes.wait_for(True, within=30)
        back_after = time.monotonic() - started
    print(f"\nHA stop -> unhealthy after {lost_after:.2f} s ({detail}); HA started -> healthy after {back_after:.2f} s")


@integration
async def test_ha_mqtt_connection_down_and_up(ha: HomeAssistant, mosquitto: MosquittoProcess) -> None:
    changes = HealthChanges()
    async with link_to(ha.url, ha.token, changes) as link:
        await changes.wait_for(True, within=30)
        stopped = time.monotonic()
        await asyncio.to_thread(mosquitto.stop)
        _, detail = await changes.wait_for(False, within=10)
        down_after = time.monotonic() - stopped
        assert detail.startswith("Home Assistant's MQTT connection is down"), detail
        assert link.connected  # HA itself is fine

        await asyncio.to_thread(mosquitto.start)
        started = time.monotonic()
        await changes.wait_for(True, within=60)
        up_after = time.monotonic() - started
    print(f"\nbroker stopped -> unhealthy after {down_after:.2f} s ({detail}); up -> healthy after {up_after:.2f} s")


@integration
async def test_echo_that_never_comes_back(start_ha: StartHA, tmp_path: Path) -> None:
    """A broker ACL that drops HA's probe: HA's client is connected, yet the probe cannot come back."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    acl = tmp_path / "mosquitto.acl"
    acl.write_text("topic readwrite homeassistant/#\n")  # anonymous clients: nothing else
    with MosquittoProcess(tmp_path / "acl-broker", extra_config=[f"acl_file {acl}"]) as broker:
        (instance,) = start_ha("acl", mqtt_port=broker.port)
        changes = HealthChanges()
        async with link_to(instance.url, instance.token, changes, probe_topic="denied/probe") as link:
            _, detail = await changes.wait_for(False, within=30)
            assert detail.startswith(
                "Home Assistant's MQTT connection is down (a test message HA published on "
                "denied/probe did not come back within 3s"
            ), detail
            assert link.connected


# ---- managed automations --------------------------------------------------------------------------------


@integration
async def test_set_automations(ha: HomeAssistant) -> None:
    def automation_states() -> dict[str, str]:
        return {s["entity_id"]: s["state"] for s in ha.states() if s["entity_id"].startswith("automation.")}

    before = await asyncio.to_thread(automation_states)
    assert KEPT in before and set(before.values()) == {"on"}, before
    others = sorted(set(before) - {KEPT})
    assert others, f"the generated configuration should define more automations than {KEPT}: {before}"

    changes = HealthChanges()
    async with link_to(ha.url, ha.token, changes) as link:
        await changes.wait_for(True, within=30)
        switch = AutomationSwitch(link)

        assert await switch.set_automations(False, keep=[KEPT]) == others
        assert await asyncio.to_thread(automation_states) == {**dict.fromkeys(others, "off"), KEPT: "on"}
        assert await switch.set_automations(False, keep=[KEPT]) == []

        # The kept automation still runs.
        await asyncio.to_thread(ha.fire_event, TEST_EVENT)
        await asyncio.to_thread(ha.wait_for_state, "counter.presses", "1", 10)

        assert await switch.set_automations(True, keep=[KEPT]) == others
        assert await asyncio.to_thread(automation_states) == before
        assert await switch.set_automations(True, keep=[KEPT]) == []

        # Without keep, every automation is managed; an id that HA does not have is only warned about.
        assert await switch.set_automations(False, keep=["automation.not_there"]) == sorted(before)
        assert set((await asyncio.to_thread(automation_states)).values()) == {"off"}
        assert await switch.set_automations(True) == sorted(before)
        with pytest.raises(ValueError, match=r"automation\.x"):
            await switch.set_automations(True, keep=["water_everywhere"])
    assert [healthy for healthy, _ in changes.calls] == [True]
