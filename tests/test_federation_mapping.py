"""Federation's mapping (hasync.federation.mapping): what a hub's entity looks like on main, and main's
commands as service calls on the hub. Pure; the attributes are those of HA's demo entities."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hasync.federation import mapping
from hasync.federation.mapping import Refused, ServiceCall, Topics, command, component, discovery, state_payload

T = Topics("hasync/home/fed/3f2a")

LIGHT = {"supported_color_modes": ["color_temp", "hs"], "color_mode": "hs", "brightness": 180,
         "hs_color": [345.0, 75.0], "min_mireds": 153, "max_mireds": 500, "effect_list": ["rainbow", "none"],
         "effect": "none", "friendly_name": "Bed Light", "supported_features": 44}
COVER = {"current_position": 70, "current_tilt_position": 50, "supported_features": 255,
         "friendly_name": "Living Room Window", "device_class": "window"}
CLIMATE = {"hvac_modes": ["off", "heat", "cool", "auto", "dry", "fan_only"], "min_temp": 7, "max_temp": 35,
           "target_temp_step": 0.5, "current_temperature": 22, "temperature": None, "target_temp_low": 21,
           "target_temp_high": 24, "fan_modes": ["on_high", "off"], "fan_mode": "on_high",
           "preset_modes": ["home", "eco"], "preset_mode": "home", "swing_modes": ["auto", "off"],
           "swing_mode": "auto", "supported_features": 2 | 8 | 16 | 32}
FAN = {"percentage": 33, "preset_modes": ["auto", "smart"], "preset_mode": None, "oscillating": False,
       "supported_features": 1 | 2 | 8}


def test_domains_map_to_components_and_the_rest_is_not_exported() -> None:
    assert component("input_boolean.heating") == "switch" and component("script.goodnight") == "button"
    assert component("light.bed") == "light" and component("event.doorbell") == "event"
    for unsupported in ("media_player.tv", "camera.door", "automation.x", "person.me", "weather.home"):
        assert component(unsupported) is None
        assert discovery(unsupported, {}, T) is None
        domain = unsupported.split(".")[0]
        assert command(unsupported, {}, None, b"ON") == Refused(f"{domain} entities take no commands")


def test_a_light_is_a_json_schema_light_with_what_it_supports() -> None:
    config = discovery("light.bed_light", LIGHT, T)
    assert config is not None
    assert config["schema"] == "json" and config["command_topic"] == "hasync/home/fed/3f2a/set"
    assert config["supported_color_modes"] == ["color_temp", "hs"] and config["brightness"] is True
    assert (config["min_mireds"], config["max_mireds"]) == (153, 500)
    assert config["effect_list"] == ["rainbow", "none"]
    assert "json_attributes_topic" not in config  # the JSON light's state topic has its own format
    state = json.loads(state_payload("light.bed_light", "on", LIGHT))
    assert state == {"state": "ON", "available": True, "brightness": 180, "color_mode": "hs",
                     "color": {"h": 345.0, "s": 75.0}, "effect": "none"}
    assert json.loads(state_payload("light.bed_light", "off", LIGHT)) == {"state": "OFF", "available": True}
    assert not json.loads(state_payload("light.bed_light", "unavailable", {}))["available"]
    onoff = discovery("light.plain", {"supported_color_modes": ["onoff"]}, T)
    assert onoff is not None and "brightness" not in onoff and "supported_color_modes" not in onoff


def test_light_commands_become_turn_on_and_off_with_checked_fields() -> None:
    def light(body: Any) -> ServiceCall | Refused:
        return command("light.bed_light", LIGHT, None, json.dumps(body).encode())

    assert light({"state": "OFF", "transition": 2}) == ServiceCall("light", "turn_off", "light.bed_light",
                                                                   {"transition": 2.0})
    assert light({"state": "ON", "brightness": 128, "color_temp": 300}) == ServiceCall(
        "light", "turn_on", "light.bed_light", {"brightness": 128, "color_temp": 300})
    assert light({"state": "ON", "color": {"h": 120, "s": 50}}).data == {"hs_color": [120, 50]}  # type: ignore[union-attr]
    assert light({"state": "ON", "color": {"r": 255, "g": 10.4, "b": 0}}).data == {  # type: ignore[union-attr]
        "rgb_color": [255, 10, 0]}
    assert light({"state": "ON", "effect": "rainbow"}).data == {"effect": "rainbow"}  # type: ignore[union-attr]
    assert isinstance(light({"state": "ON", "brightness": 256}), Refused)
    assert isinstance(light({"state": "ON", "brightness": True}), Refused)
    assert isinstance(light({"state": "ON", "color_temp": 100}), Refused)  # below min_mireds
    assert isinstance(light({"state": "ON", "effect": "strobe"}), Refused)
    assert isinstance(light({"state": "ON", "color": {"h": 400, "s": 50}}), Refused)
    assert isinstance(light({"state": "ON", "transition": -1}), Refused)
    assert isinstance(light({"state": "TOGGLE"}), Refused) and isinstance(light([1]), Refused)
    assert command("light.bed_light", LIGHT, None, b"{not json") == Refused("not JSON")
    plain = {"supported_color_modes": ["onoff"]}
    assert isinstance(command("light.plain", plain, None, b'{"state":"ON","brightness":9}'), Refused)
    assert command("light.plain", plain, None, b'{"state":"ON","color":{"h":1,"s":1}}') == Refused(
        "the light takes no colour")


def test_a_cover_with_position_and_tilt() -> None:
    config = discovery("cover.living_room_window", COVER, T)
    assert config is not None
    assert config["set_position_topic"] == T.command("position") and config["tilt_command_topic"] == T.command("tilt")
    assert config["payload_stop"] == "STOP" and config["device_class"] == "window"
    assert command("cover.living_room_window", COVER, None, b"STOP") == ServiceCall(
        "cover", "stop_cover", "cover.living_room_window")
    assert command("cover.living_room_window", COVER, "position", b"42.6") == ServiceCall(
        "cover", "set_cover_position", "cover.living_room_window", {"position": 43})
    assert command("cover.living_room_window", COVER, "tilt", b"10").data == {"tilt_position": 10}  # type: ignore[union-attr]
    assert isinstance(command("cover.living_room_window", COVER, "position", b"101"), Refused)
    assert isinstance(command("cover.living_room_window", COVER, "position", b"nan"), Refused)
    simple = {"supported_features": 3}  # open and close only
    assert discovery("cover.garage", simple, T)["payload_stop"] is None  # type: ignore[index]
    assert isinstance(command("cover.garage", simple, None, b"STOP"), Refused)
    assert command("cover.garage", simple, "position", b"5") == Refused("cover.garage has no position")


def test_a_lock_opens_only_if_it_can() -> None:
    assert command("lock.front_door", {"supported_features": 0}, None, b"UNLOCK") == ServiceCall(
        "lock", "unlock", "lock.front_door")
    assert isinstance(command("lock.front_door", {"supported_features": 0}, None, b"OPEN"), Refused)
    assert command("lock.poorly_installed_door", {"supported_features": 1}, None, b"OPEN").service == "open"  # type: ignore[union-attr]
    assert "payload_open" not in discovery("lock.front_door", {}, T)  # type: ignore[operator]


def test_a_climate_with_a_range_fan_preset_and_swing_modes() -> None:
    config = discovery("climate.ecobee", CLIMATE, T)
    assert config is not None
    assert config["modes"] == CLIMATE["hvac_modes"] and config["temp_step"] == 0.5
    assert config["temperature_low_command_topic"] == T.command("temperature_low")
    assert "temperature_command_topic" not in config  # no single target on this one
    assert config["fan_modes"] == ["on_high", "off"] and config["swing_mode_command_topic"] == T.command("swing_mode")
    assert command("climate.ecobee", CLIMATE, "mode", b"heat") == ServiceCall(
        "climate", "set_hvac_mode", "climate.ecobee", {"hvac_mode": "heat"})
    assert command("climate.ecobee", CLIMATE, "temperature_low", b"20") == ServiceCall(
        "climate", "set_temperature", "climate.ecobee", {"target_temp_low": 20.0, "target_temp_high": 24.0})
    assert isinstance(command("climate.ecobee", CLIMATE, "temperature_low", b"25"), Refused)  # above high
    assert isinstance(command("climate.ecobee", CLIMATE, "temperature", b"20"), Refused)  # no single target
    assert isinstance(command("climate.ecobee", CLIMATE, "mode", b"turbo"), Refused)
    assert command("climate.ecobee", CLIMATE, "preset_mode", b"eco").data == {"preset_mode": "eco"}  # type: ignore[union-attr]
    single = {**CLIMATE, "supported_features": 1}
    assert command("climate.hvac", single, "temperature", b"21.5").data == {"temperature": 21.5}  # type: ignore[union-attr]
    assert isinstance(command("climate.hvac", single, "temperature", b"99"), Refused)  # above max_temp


def test_a_fan_and_the_helpers() -> None:
    config = discovery("fan.living_room_fan", FAN, T)
    assert config is not None and config["preset_modes"] == ["auto", "smart"]
    assert command("fan.living_room_fan", FAN, "percentage", b"66") == ServiceCall(
        "fan", "set_percentage", "fan.living_room_fan", {"percentage": 66})
    assert command("fan.living_room_fan", FAN, "oscillation", b"oscillate_on").data == {"oscillating": True}  # type: ignore[union-attr]
    assert command("fan.living_room_fan", FAN, None, b"OFF").service == "turn_off"  # type: ignore[union-attr]
    assert command("input_boolean.heating", {}, None, b"ON") == ServiceCall(
        "input_boolean", "turn_on", "input_boolean.heating")
    number = {"min": 0, "max": 100, "step": 5, "mode": "slider"}
    assert discovery("input_number.volume", number, T)["max"] == 100  # type: ignore[index]
    assert command("input_number.volume", number, None, b"55") == ServiceCall(
        "input_number", "set_value", "input_number.volume", {"value": 55.0})
    assert isinstance(command("input_number.volume", number, None, b"-1"), Refused)
    options = {"options": ["Home", "Away"]}
    assert command("input_select.mode", options, None, b"Away").data == {"option": "Away"}  # type: ignore[union-attr]
    assert isinstance(command("input_select.mode", options, None, b"Gone"), Refused)
    assert command("script.goodnight", {}, None, b"PRESS") == ServiceCall("script", "turn_on", "script.goodnight")
    assert command("input_button.bell", {}, None, b"PRESS").service == "press"  # type: ignore[union-attr]


def test_state_messages_keep_the_state_and_drop_what_the_discovery_says() -> None:
    payload = json.loads(state_payload("sensor.outside_temperature", "15.6", {
        "unit_of_measurement": "°C", "device_class": "temperature", "friendly_name": "Outside", "battery": 80}))
    assert payload == {"state": "15.6", "attributes": {"battery": 80}}
    long = json.loads(state_payload("sensor.text", "x" * 1000, {}))
    assert len(long["state"]) == mapping.MAX_STATE_CHARS
    config = discovery("sensor.outside_temperature", {"unit_of_measurement": "°C", "device_class": "temperature",
                                                      "state_class": "measurement"}, T)
    assert config is not None and config["unit_of_measurement"] == "°C" and config["state_class"] == "measurement"


@pytest.mark.parametrize(("entity_id", "attributes"), [
    ("light.bed_light", LIGHT), ("cover.living_room_window", COVER), ("climate.ecobee", CLIMATE),
    ("fan.living_room_fan", FAN), ("lock.poorly_installed_door", {"supported_features": 1}),
    ("input_number.volume", {"min": 0, "max": 10}), ("select.speed", {"options": ["a"]}),
    ("switch.ac", {}), ("button.restart", {}),
])
def test_every_command_topic_in_a_discovery_config_is_one_the_hub_understands(
        entity_id: str, attributes: dict[str, Any]) -> None:
    config = discovery(entity_id, attributes, T)
    assert config is not None
    topics = [v for k, v in config.items() if k.endswith("command_topic") or k == "set_position_topic"]
    assert topics
    for topic in topics:
        what = None if topic == T.command() else topic.removeprefix(T.command() + "/")
        result = command(entity_id, attributes, what, b"\x00")
        assert not (isinstance(result, Refused) and result.reason.startswith("no command topic")), (topic, result)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=3000, deadline=None)
@given(
    entity_id=st.sampled_from(["light.l", "cover.c", "climate.t", "fan.f", "lock.k", "number.n", "select.s",
                               "switch.w", "button.b", "script.s", "sensor.x", "input_number.n"]),
    attributes=st.dictionaries(st.sampled_from(sorted(set(LIGHT) | set(COVER) | set(CLIMATE) | set(FAN) |
                                                      {"min", "max", "options"})), _JSON, max_size=8),
    what=st.one_of(st.none(), st.sampled_from(["position", "tilt", "mode", "temperature", "temperature_low",
                                               "temperature_high", "fan_mode", "preset_mode", "percentage",
                                               "oscillation", "swing_mode"]), st.text(max_size=12)),
    payload=st.one_of(st.binary(max_size=64), _JSON.map(lambda v: json.dumps(v).encode()),
                      st.sampled_from([b"ON", b"OFF", b"PRESS", b"OPEN", b"STOP", b"50", b"1e308", b"-0",
                                       b'{"state":"ON","brightness":1e400}'])),
)
def test_no_command_from_the_network_raises_and_every_call_carries_plain_finite_values(
        entity_id: str, attributes: dict[str, Any], what: str | None, payload: bytes) -> None:
    result = command(entity_id, attributes, what, payload)
    assert isinstance(result, ServiceCall | Refused)
    discovery(entity_id, attributes, Topics("p/c/fed/u"))  # nor does what the hub's own HA reports
    json.loads(state_payload(entity_id, "on", attributes), parse_constant=pytest.fail)  # strict
    if isinstance(result, ServiceCall):
        assert result.entity_id == entity_id

        def plain(value: Any) -> bool:
            if isinstance(value, float):
                return math.isfinite(value)
            if isinstance(value, list):
                return all(plain(v) for v in value)
            return isinstance(value, str | int | bool)

        assert all(plain(v) for v in result.data.values()), result


def test_a_light_state_with_numbers_that_are_not_finite_leaves_them_out() -> None:
    # Found by the fuzz above: int() of a NaN or an infinity in the hub's attributes raised.
    for bad in (math.nan, math.inf, -math.inf, True):
        out = json.loads(state_payload("light.l", "on", {"brightness": bad, "color_mode": "color_temp",
                                                          "color_temp": bad}), parse_constant=pytest.fail)
        assert "brightness" not in out and "color_temp" not in out, bad
    assert json.loads(state_payload("light.l", "on", {"brightness": 127.6}))["brightness"] == 127
