"""Home Assistant discovery payloads (pure) and the commands HA's button and switch send."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hasync.homeassistant.discovery import Discovery, primary_state
from hasync.messages import Command, MessageError, parse
from hasync.topics import Topics

D = Discovery(Topics("hasync", "home"), "ha-kitchen", "homeassistant", 2.0, "0.1.0")


def configs() -> dict[str, dict[str, object]]:
    return {topic: json.loads(payload) for topic, payload in D.configs()}


def test_one_device_per_node_with_stable_unique_ids() -> None:
    cfgs = configs()
    assert set(cfgs) == {
        "homeassistant/binary_sensor/hasync_home_ha-kitchen/primary/config",
        "homeassistant/sensor/hasync_home_ha-kitchen/role/config",
        "homeassistant/sensor/hasync_home_ha-kitchen/leader/config",
        "homeassistant/sensor/hasync_home_ha-kitchen/term/config",
        "homeassistant/sensor/hasync_home_ha-kitchen/health/config",
        "homeassistant/button/hasync_home_ha-kitchen/step_down/config",
        "homeassistant/button/hasync_home_ha-kitchen/resume/config",
        "homeassistant/switch/hasync_home_ha-kitchen/maintenance/config",
    }
    ids = [c["unique_id"] for c in cfgs.values()]
    assert len(set(ids)) == len(ids) and all(str(i).startswith("hasync_home_ha-kitchen_") for i in ids)
    devices = {json.dumps(c["device"], sort_keys=True) for c in cfgs.values()}
    assert len(devices) == 1
    assert configs() == cfgs  # deterministic


def test_every_entity_is_unavailable_when_the_agent_is_offline() -> None:
    for cfg in configs().values():
        [availability] = cfg["availability"]  # type: ignore[misc]
        assert availability["topic"] == "hasync/home/nodes/ha-kitchen"
        assert "value_json.online" in availability["value_template"]


def test_primary_sensor_expires_before_the_renew_deadline() -> None:
    primary = configs()["homeassistant/binary_sensor/hasync_home_ha-kitchen/primary/config"]
    assert primary["state_topic"] == "hasync/home/nodes/ha-kitchen/primary"
    assert primary["expire_after"] == 1


@given(st.floats(min_value=1.001, max_value=600, allow_nan=False))
def test_expire_after_is_whole_seconds_shorter_than_any_valid_renew_deadline(deadline: float) -> None:
    d = Discovery(Topics("hasync", "home"), "n", "homeassistant", deadline, "0")
    assert isinstance(d.expire_after, int)
    assert 1 <= d.expire_after < deadline


def test_primary_state_carries_its_own_deadline() -> None:
    assert json.loads(primary_state(True, 1795000000.1234)) == {"primary": True, "until": 1795000000.123}
    assert json.loads(primary_state(False, 0.0)) == {"primary": False, "until": 0.0}


def test_button_and_switch_send_valid_commands() -> None:
    cfgs = configs()
    button = cfgs["homeassistant/button/hasync_home_ha-kitchen/step_down/config"]
    switch = cfgs["homeassistant/switch/hasync_home_ha-kitchen/maintenance/config"]
    assert button["command_topic"] == switch["command_topic"] == "hasync/home/nodes/ha-kitchen/command"
    assert parse(Command, str(button["payload_press"]).encode()) == Command(command="step_down")
    resume = cfgs["homeassistant/button/hasync_home_ha-kitchen/resume/config"]
    assert resume["command_topic"] == button["command_topic"]
    assert parse(Command, str(resume["payload_press"]).encode()) == Command(command="resume")
    assert parse(Command, str(switch["payload_on"]).encode()) == Command(command="maintenance", on=True)
    assert parse(Command, str(switch["payload_off"]).encode()) == Command(command="maintenance", on=False)


@pytest.mark.parametrize("payload", [
    {"v": 1, "command": "maintenance"},
    {"v": 1, "command": "step_down", "on": True},
    {"v": 1, "command": "maintenance", "on": True, "successor": "x"},
])
def test_malformed_commands_are_rejected(payload: dict[str, object]) -> None:
    with pytest.raises(MessageError):
        parse(Command, json.dumps(payload).encode())


def test_removal_clears_every_config_and_the_status() -> None:
    removals = dict(D.removals())
    assert set(removals) >= set(dict(D.configs()))
    assert "hasync/home/nodes/ha-kitchen" in removals
    assert all(payload == b"" for payload in removals.values())
