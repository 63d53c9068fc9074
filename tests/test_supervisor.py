"""Running as a Home Assistant add-on (hasync.supervisor): the add-on's options, a stand-in Supervisor on
a free port (its MQTT service, with its token check), and the agent reaching Home Assistant through the
Supervisor's WebSocket proxy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from harness import vclock
from harness.fakebroker import FakeMqtt
from harness.fakeha import FakeHomeAssistant
from harness.wait import eventually
from hasync import cli, supervisor
from hasync.agent import Agent
from hasync.config import ConfigError, HttpConfig, default_node_id
from hasync.supervisor import SupervisorError

TOKEN = "supervisor-token"
MOSQUITTO_ADDON = {"host": "core-mosquitto", "port": 1883, "ssl": False, "protocol": "3.1.1",
                   "username": "addons", "password": "s3cret"}


class StandInSupervisor:
    """The Supervisor's /services/mqtt, answering only with the add-on's token."""

    def __init__(self, service: dict[str, Any] | None) -> None:
        self.service = service
        self.requests = 0
        self.url = ""

    async def mqtt(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"result": "error", "message": "Unauthorized"}, status=401)
        if self.service is None:
            return web.json_response({"result": "error", "message": "No mqtt service"}, status=400)
        return web.json_response({"result": "ok", "data": self.service})


@pytest.fixture
async def stand_in(request: pytest.FixtureRequest) -> AsyncIterator[StandInSupervisor]:
    sup = StandInSupervisor(getattr(request, "param", MOSQUITTO_ADDON))
    app = web.Application()
    app.router.add_get("/services/mqtt", sup.mqtt)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sup.url = f"http://127.0.0.1:{port}"
    yield sup
    await runner.cleanup()


def env(sup: StandInSupervisor, token: str = TOKEN) -> dict[str, str]:
    return {"SUPERVISOR_TOKEN": token, "HASYNC_SUPERVISOR_URL": sup.url}


OPTIONS = {"node_id": "ha-kitchen", "cluster": "home", "priority": 150,
           "homeassistant": {"managed_automations": True}, "sync": {"include": {"domains": ["input_boolean"]}}}


async def test_options_and_the_supervisors_broker_and_proxy_make_the_configuration(
        stand_in: StandInSupervisor, tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    for name in ("promote", "fence"):
        (hooks / name).write_text("#!/bin/sh\nexit 0\n")
        (hooks / name).chmod(0o755)
    cfg = await supervisor.configure(OPTIONS, env(stand_in), hook_dir=hooks)
    assert (cfg.node_id, cfg.cluster, cfg.priority) == ("ha-kitchen", "home", 150)
    assert cfg.broker.url == "mqtt://core-mosquitto:1883"
    assert cfg.broker.credentials == ("addons", "s3cret")
    ha = cfg.homeassistant
    assert (ha.url, ha.token, ha.websocket_url) == (f"{stand_in.url}/core", TOKEN, f"{stand_in.url}/core/websocket")
    assert ha.managed_automations and cfg.sync.include.domains == ["input_boolean"]
    assert cfg.hooks.promote == str(hooks / "promote") and cfg.hooks.demote is None
    assert cfg.hooks.fence == str(hooks / "fence")
    assert cfg.events_file == Path("/data/events.jsonl")
    # A broker named in the options wins, and the Supervisor is not asked.
    asked = stand_in.requests
    named = await supervisor.configure({**OPTIONS, "broker": {"url": "mqtts://broker.lan:8883"}}, env(stand_in),
                                       hook_dir=hooks)
    assert named.broker.url == "mqtts://broker.lan:8883" and stand_in.requests == asked


@pytest.mark.parametrize("stand_in", [None], indirect=True)
async def test_no_mqtt_service_is_one_line_saying_what_to_do(stand_in: StandInSupervisor, tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="offers no MQTT service: install and start the Mosquitto broker"):
        await supervisor.configure(OPTIONS, env(stand_in), hook_dir=tmp_path)


async def test_a_wrong_token_is_refused_by_the_supervisor(stand_in: StandInSupervisor, tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match="offers no MQTT service"):
        await supervisor.configure(OPTIONS, env(stand_in, token="stale"), hook_dir=tmp_path)
    with pytest.raises(SupervisorError, match="SUPERVISOR_TOKEN is not set"):
        await supervisor.configure(OPTIONS, {}, hook_dir=tmp_path)


@pytest.mark.parametrize(("options", "message"), [
    ({"homeassistant": {"token": "x"}}, "homeassistant.token is set by the Supervisor"),
    ({"hooks": {"promote": "systemctl start dnsmasq"}}, "hooks are files in the add-on's configuration folder"),
    ({"homeassistant": "yes"}, "homeassistant must be a mapping"),
])
async def test_options_the_supervisor_provides_or_that_are_files_are_refused(
        options: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match=message):
        await supervisor.configure(options, {"SUPERVISOR_TOKEN": TOKEN}, hook_dir=tmp_path)


async def test_a_hook_that_is_not_executable_and_a_bad_option_are_named(stand_in: StandInSupervisor,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "demote").write_text("#!/bin/sh\n")
    with pytest.raises(SupervisorError, match=r"the hook .*demote is not executable"):
        await supervisor.configure(OPTIONS, env(stand_in), hook_dir=tmp_path)
    (tmp_path / "demote").unlink()
    with pytest.raises(ConfigError, match=r"invalid add-on options:\n.*priority"):
        await supervisor.configure({**OPTIONS, "priority": "high"}, env(stand_in), hook_dir=tmp_path)


def test_the_cli_reads_the_options_file_and_fails_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = tmp_path / "options.json"
    options.write_text("{not json")
    monkeypatch.setenv("HASYNC_ADDON_OPTIONS", str(options))
    monkeypatch.setenv("HASYNC_ADDON_HOOKS", str(tmp_path))
    monkeypatch.setenv("SUPERVISOR_TOKEN", TOKEN)
    result = CliRunner().invoke(cli.main, ["agent", "--addon"])
    assert result.exit_code == 1 and result.output.startswith(f"hasync: the add-on's options {options} are not JSON")
    options.write_text(json.dumps({**OPTIONS, "priority": 5000, "broker": {"url": "mqtt://127.0.0.1:9"}}))
    result = CliRunner().invoke(cli.main, ["agent", "--addon"])
    assert result.exit_code == 2 and "invalid add-on options" in result.output and "priority" in result.output


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


def test_the_agent_reaches_home_assistant_through_the_supervisors_websocket_proxy(tmp_path: Path) -> None:
    options = {**OPTIONS, "broker": {"url": "mqtt://core-mosquitto:1883"},
               "homeassistant": {"discovery": False}}
    cfg = asyncio.run(supervisor.configure(options, {"SUPERVISOR_TOKEN": TOKEN}, hook_dir=tmp_path))
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 8765)  # where the Supervisor's watchdog asks
    cfg = cfg.model_copy(update={"http": HttpConfig(enabled=False)})  # no real port on the virtual clock
    ha = FakeHomeAssistant(token=TOKEN)  # Home Assistant behind the proxy takes the add-on's token
    opened: list[str] = []

    async def through_the_proxy(url: str, request_timeout: float) -> Any:
        opened.append(url)
        return await ha.open(url, request_timeout)

    async def scenario() -> None:
        async with Agent(cfg.model_copy(update={"events_file": None}), connect=FakeMqtt().connect,
                         open_websocket=through_the_proxy, clock=vclock.clock, wall=vclock.wall) as agent:
            await eventually(lambda: any(ws.authenticated for ws in ha.sockets), 10,
                             "the agent to authenticate with the add-on's token")
            assert agent.status()["home_assistant"] is not None

    run(scenario)
    assert opened and set(opened) == {"http://supervisor/core/websocket"}


async def test_the_addons_flat_options_land_at_the_configuration_files_paths(stand_in: StandInSupervisor) -> None:
    """The Supervisor's schema nests two levels: sync.include_domains is sync.include.domains, and so on."""
    options = {"node_id": "", "broker": {"url": "mqtt://core-mosquitto:1883", "username": ""},
               "sync": {"enabled": True, "include_domains": ["light"], "include_entity_globs": ["switch.k_*"],
                        "exclude_entities": ["light.porch"]},
               "log_level": "DEBUG", "vip": [{"address": "192.168.1.50/24", "interface": "eth0"}]}
    cfg = await supervisor.configure(options, env(stand_in), hook_dir=Path("/nonexistent"))
    assert [(str(v.address), v.interface) for v in cfg.vip] == [("192.168.1.50/24", "eth0")]
    assert cfg.sync.include.domains == ["light"] and cfg.sync.include.entity_globs == ["switch.k_*"]
    assert cfg.sync.exclude.entities == ["light.porch"] and cfg.sync.exclude.domains == []
    assert cfg.log.level == "DEBUG"
    assert cfg.node_id == default_node_id()  # empty: the host's name
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 8765)
    with pytest.raises(SupervisorError, match="the option http is fixed"):
        await supervisor.configure({**options, "http": {"port": 1}}, env(stand_in), hook_dir=Path("/x"))
    with pytest.raises(ConfigError, match="log"):
        await supervisor.configure({**options, "log_level": "LOUD"}, env(stand_in), hook_dir=Path("/x"))
