"""How a hub's entity looks on main, and how main's commands become service calls on the hub: pure, no I/O.

Each exported entity has one retained state message, ``{"state": ..., "attributes": {...}}`` (HA's own state
object, trimmed), except lights, whose state follows HA's MQTT JSON light schema. Main's entity reads it
through templates in its discovery config, so the entity shows the hub's real state (never optimistic), and
its commands arrive on ``<base>/set`` (the entity's main command) and ``<base>/set/<field>`` (a cover's
position, a climate's target temperature...). ``command`` turns one of those into the service call the hub's
agent makes on its own Home Assistant, or a refusal saying why: the payload comes from the network, so
anything it holds is checked against what the entity supports before it reaches a device.

Source domains and what they become on main (``COMPONENTS``): sensor, binary_sensor, switch (and
input_boolean), light (JSON schema), cover (position, tilt), lock, climate (modes, target temperatures
including low/high, fan and preset modes), fan (percentage, preset, oscillation), number (and input_number),
select (and input_select), button (and input_button, script, scene) and event. Anything else is not
exported (``component`` returns None).

Events. An event entity's state on the hub is the time of its last event; main's event entity and its
device triggers must fire once per event, never when a state is published again (at every export, main's
birth, a failover) nor when the hub restarts and restores that time. So events travel on a topic of their own,
``<base>/event``, never retained, one message per new event (``event_message`` decides what is new), while the
retained state message still carries the entity's availability and attributes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Source domain -> the MQTT component main creates.
COMPONENTS: Mapping[str, str] = {
    "sensor": "sensor",
    "binary_sensor": "binary_sensor",
    "switch": "switch",
    "input_boolean": "switch",
    "light": "light",
    "cover": "cover",
    "lock": "lock",
    "climate": "climate",
    "fan": "fan",
    "number": "number",
    "input_number": "number",
    "select": "select",
    "input_select": "select",
    "button": "button",
    "input_button": "button",
    "script": "button",
    "scene": "button",
    "event": "event",
}

# Attributes that describe the entity rather than its state: carried in the discovery config, not repeated
# in every state message.
_DESCRIPTIVE = frozenset({
    "friendly_name", "icon", "unit_of_measurement", "device_class", "state_class", "supported_features",
    "supported_color_modes", "min_mireds", "max_mireds", "min_color_temp_kelvin", "max_color_temp_kelvin",
    "effect_list", "hvac_modes", "fan_modes", "preset_modes", "swing_modes", "min_temp", "max_temp",
    "target_temp_step", "options", "min", "max", "step", "mode", "event_types", "entity_picture",
    "attribution", "assumed_state", "editable", "id",
})
MAX_STATE_CHARS = 255  # HA's own limit for a state
MAX_PAYLOAD = 16_384  # a command payload beyond this is refused unread

# Feature bits HA's entities report in ``supported_features`` (HA's own enums, stable across versions).
COVER_SET_POSITION, COVER_STOP, COVER_SET_TILT = 4, 8, 128
LOCK_OPEN = 1
CLIMATE_TARGET, CLIMATE_RANGE, CLIMATE_FAN_MODE, CLIMATE_PRESET, CLIMATE_SWING = 1, 2, 8, 16, 32
FAN_SET_SPEED, FAN_OSCILLATE, FAN_PRESET = 1, 2, 8
LIGHT_TRANSITION = 32

_ON, _OFF = "ON", "OFF"
_COLOUR_MODES = frozenset({"hs", "rgb", "rgbw", "rgbww", "xy"})


@dataclass(frozen=True)
class ServiceCall:
    """What the hub calls on its own Home Assistant: ``domain.service`` on the entity, with ``data``."""

    domain: str
    service: str
    entity_id: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """A command that is not carried out, and why (published back and counted)."""

    reason: str


def component(entity_id: str) -> str | None:
    return COMPONENTS.get(entity_id.partition(".")[0])


# ---- state --------------------------------------------------------------------------------------


def state_payload(entity_id: str, state: str, attributes: Mapping[str, Any]) -> bytes:
    """The retained state message of an entity (HA's state and its non-descriptive attributes)."""
    if entity_id.startswith("light."):
        return _dumps(_light_state(state, attributes))
    kept = {k: v for k, v in attributes.items() if k not in _DESCRIPTIVE}
    return _dumps({"state": state[:MAX_STATE_CHARS], "attributes": kept})


def _dumps(value: Any) -> bytes:
    """Strict JSON (HA's parser rejects NaN and infinities: they become null)."""
    try:
        return json.dumps(value, separators=(",", ":"), default=str, allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite_only(value), separators=(",", ":"), default=str, allow_nan=False).encode()


def _finite_only(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite_only(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(v) for v in value]
    return value


def _light_state(state: str, a: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"state": _ON if state == "on" else _OFF, "available": state != "unavailable"}
    if state != "on":
        return out
    if (brightness := _whole(a.get("brightness"))) is not None:
        out["brightness"] = brightness
    mode = a.get("color_mode")
    if isinstance(mode, str):
        out["color_mode"] = mode
    if mode == "color_temp" and (color_temp := _whole(a.get("color_temp"))) is not None:
        out["color_temp"] = color_temp
    for key, name in (("hs_color", "hs"), ("rgb_color", "rgb"), ("xy_color", "xy")):
        value = a.get(key)
        if mode == name and isinstance(value, list | tuple) and len(value) >= 2:
            fields = {"hs": ("h", "s"), "rgb": ("r", "g", "b"), "xy": ("x", "y")}[name]
            out["color"] = dict(zip(fields, value, strict=False))
    if isinstance(a.get("effect"), str):
        out["effect"] = a["effect"]
    return out


def _whole(value: Any) -> int | None:
    """A number of an attribute as a whole number, None if it is not a finite number (a NaN or an infinity
    in the hub's attributes, which int() would raise on)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value)


_NOT_AN_EVENT = frozenset({"unavailable", "unknown", ""})


def event_message(last: str | None, state: str, attributes: Mapping[str, Any]) -> bytes | None:
    """The message of the event an event entity's new ``state`` reports (HA's ``event_type`` and the event's
    own attributes), or None if it reports none. ``last`` is the entity's state before, ignoring
    ``unavailable`` (None if the hub's agent has not seen the entity yet): an event entity's state is the time
    of its last event, so only a time that differs from the one it showed before is a new event; the same time
    restored after a restart of the hub, or back after ``unavailable``, is not."""
    event_type = attributes.get("event_type")
    if last is None or state in _NOT_AN_EVENT or state == last or not isinstance(event_type, str) or not event_type:
        return None
    if event_type not in event_types(attributes):
        return None  # main's entity would refuse it (the types are in its discovery config)
    kept = {k: v for k, v in attributes.items() if k not in _DESCRIPTIVE and k != "event_type"}
    return _dumps({**kept, "event_type": event_type})


def event_mark(last: str | None, state: str) -> str | None:
    """What ``event_message`` compares the next state with: the entity's state, ``unavailable`` skipped."""
    return last if state == "unavailable" else state


# ---- discovery ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topics:
    """An exported entity's topics: ``base`` is ``<prefix>/<cluster>/fed/<uid>``."""

    base: str

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def event(self) -> str:
        """An event entity's events, one message each, never retained."""
        return f"{self.base}/event"

    def command(self, what: str | None = None) -> str:
        return f"{self.base}/set" if what is None else f"{self.base}/set/{what}"


_AVAILABLE = "{{ 'offline' if value_json.state in ('unavailable', None) else 'online' }}"
_STATE = "{{ value_json.state }}"


def discovery(entity_id: str, attributes: Mapping[str, Any], topics: Topics) -> dict[str, Any] | None:
    """The domain part of main's discovery config for the entity (the caller adds identity, device and
    availability), derived from what its state says it supports; None if its domain is not carried."""
    domain = entity_id.partition(".")[0]
    build = _DISCOVERY.get(domain)
    if build is None:
        return None
    config: dict[str, Any] = {}
    for key in ("unit_of_measurement", "device_class", "state_class", "icon"):
        if isinstance(attributes.get(key), str):
            config[key] = attributes[key]
    if domain != "light":
        config["json_attributes_topic"] = topics.state
        config["json_attributes_template"] = "{{ value_json.attributes | tojson }}"
    config.update(build(attributes, topics))
    return config


def entity_availability(entity_id: str, topics: Topics) -> dict[str, str]:
    """An availability entry that follows the entity's own state on the hub (``unavailable``)."""
    if entity_id.startswith("light."):  # the light schema's state message says it in a field of its own
        return {"topic": topics.state, "value_template": "{{ 'online' if value_json.available else 'offline' }}"}
    return {"topic": topics.state, "value_template": _AVAILABLE}


def _sensor(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    return {"state_topic": t.state, "value_template": _STATE}


def _binary_sensor(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    return {"state_topic": t.state, "value_template": _STATE, "payload_on": "on", "payload_off": "off"}


def _switch(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    return {"state_topic": t.state, "value_template": _STATE, "state_on": "on", "state_off": "off",
            "command_topic": t.command(), "payload_on": _ON, "payload_off": _OFF}


def _light(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    config: dict[str, Any] = {"schema": "json", "state_topic": t.state, "command_topic": t.command()}
    modes = _strings(a.get("supported_color_modes"))
    if modes and modes != ["onoff"]:
        # HA 2024.3 wants color_mode: true beside supported_color_modes (one inclusion group; later HA drops it).
        config.update(supported_color_modes=modes, color_mode=True, brightness=True)
    if "color_temp" in modes:
        for key in ("min_mireds", "max_mireds"):
            if isinstance(a.get(key), int | float):
                config[key] = int(a[key])
    effects = _strings(a.get("effect_list"))
    if effects:
        config["effect"] = True
        config["effect_list"] = effects
    return config


def _cover(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    features = _features(a)
    config: dict[str, Any] = {"state_topic": t.state, "value_template": _STATE, "command_topic": t.command(),
                              "payload_open": "OPEN", "payload_close": "CLOSE",
                              "payload_stop": "STOP" if features & COVER_STOP else None}  # None: no stop button
    if features & COVER_SET_POSITION:
        config.update(position_topic=t.state, position_template="{{ value_json.attributes.current_position }}",
                      set_position_topic=t.command("position"))
    if features & COVER_SET_TILT:
        config.update(tilt_status_topic=t.state,
                      tilt_status_template="{{ value_json.attributes.current_tilt_position }}",
                      tilt_command_topic=t.command("tilt"))
    return config


def _lock(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    config = {"state_topic": t.state, "value_template": _STATE, "command_topic": t.command(),
              "payload_lock": "LOCK", "payload_unlock": "UNLOCK", "state_locked": "locked",
              "state_unlocked": "unlocked", "state_locking": "locking", "state_unlocking": "unlocking",
              "state_jammed": "jammed"}
    if _features(a) & LOCK_OPEN:
        config["payload_open"] = "OPEN"
    return config


def _climate(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    features = _features(a)
    config: dict[str, Any] = {
        "modes": _strings(a.get("hvac_modes")),
        "mode_state_topic": t.state, "mode_state_template": _STATE, "mode_command_topic": t.command("mode"),
        "current_temperature_topic": t.state,
        "current_temperature_template": "{{ value_json.attributes.current_temperature }}",
    }
    for key in ("min_temp", "max_temp"):
        if _number(a.get(key)) is not None:
            config[key] = a[key]
    if _number(a.get("target_temp_step")) is not None:
        config["temp_step"] = a["target_temp_step"]
    if features & CLIMATE_TARGET:
        config.update(temperature_state_topic=t.state,
                      temperature_state_template="{{ value_json.attributes.temperature }}",
                      temperature_command_topic=t.command("temperature"))
    if features & CLIMATE_RANGE:
        for side in ("low", "high"):
            config.update({f"temperature_{side}_state_topic": t.state,
                           f"temperature_{side}_state_template":
                               f"{{{{ value_json.attributes.target_temp_{side} }}}}",
                           f"temperature_{side}_command_topic": t.command(f"temperature_{side}")})
    for bit, key in ((CLIMATE_FAN_MODE, "fan_mode"), (CLIMATE_PRESET, "preset_mode"), (CLIMATE_SWING, "swing_mode")):
        plural = f"{key}s"
        if features & bit and isinstance(a.get(plural), list):
            config.update({plural: _strings(a[plural]), f"{key}_state_topic": t.state,
                           f"{key}_state_template": f"{{{{ value_json.attributes.{key} }}}}",
                           f"{key}_command_topic": t.command(key)})
    return config


def _fan(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    features = _features(a)
    config: dict[str, Any] = {"state_topic": t.state, "command_topic": t.command(), "payload_on": _ON,
                              "payload_off": _OFF,
                              "state_value_template": "{{ 'ON' if value_json.state == 'on' else 'OFF' }}"}
    if features & FAN_SET_SPEED:
        config.update(percentage_state_topic=t.state,
                      percentage_value_template="{{ value_json.attributes.percentage }}",
                      percentage_command_topic=t.command("percentage"))
    if features & FAN_PRESET and isinstance(a.get("preset_modes"), list):
        config.update(preset_modes=_strings(a["preset_modes"]), preset_mode_state_topic=t.state,
                      preset_mode_value_template="{{ value_json.attributes.preset_mode }}",
                      preset_mode_command_topic=t.command("preset_mode"))
    if features & FAN_OSCILLATE:
        config.update(oscillation_state_topic=t.state,
                      oscillation_value_template="{{ 'oscillate_on' if value_json.attributes.oscillating "
                                                 "else 'oscillate_off' }}",
                      oscillation_command_topic=t.command("oscillation"))
    return config


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _number_entity(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    config: dict[str, Any] = {"state_topic": t.state, "value_template": _STATE, "command_topic": t.command()}
    for key in ("min", "max", "step"):
        if _number(a.get(key)) is not None:
            config[key] = a[key]
    if a.get("mode") in ("box", "slider", "auto"):
        config["mode"] = a["mode"]
    return config


def _select(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    return {"state_topic": t.state, "value_template": _STATE, "command_topic": t.command(),
            "options": _strings(a.get("options"))}


def _button(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    return {"command_topic": t.command(), "payload_press": "PRESS"}


def _event(a: Mapping[str, Any], t: Topics) -> dict[str, Any]:
    # The event topic's messages are what HA's MQTT event reads as they are: {"event_type": ..., ...}.
    return {"state_topic": t.event, "event_types": event_types(a)}


def event_types(attributes: Mapping[str, Any]) -> list[str]:
    """An event entity's event types, as its state lists them (an empty one could never be matched)."""
    return [t for t in _strings(attributes.get("event_types")) if t]


def _strings(value: Any) -> list[str]:
    """A list attribute as strings (HA's own, but a hub's HA runs integrations we do not control)."""
    return [str(v) for v in value] if isinstance(value, list) else []


def _features(a: Mapping[str, Any]) -> int:
    value = a.get("supported_features")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


_DISCOVERY: Mapping[str, Callable[[Mapping[str, Any], Topics], dict[str, Any]]] = {
    "sensor": _sensor, "binary_sensor": _binary_sensor, "switch": _switch, "input_boolean": _switch,
    "light": _light, "cover": _cover, "lock": _lock, "climate": _climate, "fan": _fan,
    "number": _number_entity, "input_number": _number_entity, "select": _select, "input_select": _select,
    "button": _button, "input_button": _button, "script": _button, "scene": _button, "event": _event,
}


# ---- commands -----------------------------------------------------------------------------------


def command(entity_id: str, attributes: Mapping[str, Any], what: str | None, payload: bytes) -> ServiceCall | Refused:
    """Main's command on the entity's topic ``set`` (``what`` None) or ``set/<what>``, as the service call
    that carries it out on the hub; ``Refused`` for anything the entity does not support or cannot mean."""
    domain = entity_id.partition(".")[0]
    handler = _COMMANDS.get(domain)
    if handler is None:
        return Refused(f"{domain} entities take no commands")
    if len(payload) > MAX_PAYLOAD:
        return Refused(f"a payload of {len(payload)} bytes")
    try:
        text = payload.decode()
    except UnicodeDecodeError:
        return Refused("the payload is not UTF-8")
    return handler(entity_id, attributes, what, text)


def _call(entity_id: str, service: str, domain: str | None = None, **data: Any) -> ServiceCall:
    return ServiceCall(domain or entity_id.partition(".")[0], service, entity_id, data)


def _unknown(what: str | None, text: str) -> Refused:
    shown = text if len(text) <= 40 else text[:37] + "..."
    return Refused(f"unknown command {shown!r}" if what is None else f"no command topic set/{what}")


def _on_off(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    if what is None and text in (_ON, _OFF):
        return _call(entity_id, "turn_on" if text == _ON else "turn_off")
    return _unknown(what, text)


def _press(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    if what is not None or text != "PRESS":
        return _unknown(what, text)
    domain = entity_id.partition(".")[0]
    service = {"button": "press", "input_button": "press", "script": "turn_on", "scene": "turn_on"}[domain]
    return _call(entity_id, service)


def _finite(text: str, low: float | None = None, high: float | None = None) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        return None
    return value


def _cover_command(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    features = _features(a)
    if what is None:
        service = {"OPEN": "open_cover", "CLOSE": "close_cover", "STOP": "stop_cover"}.get(text)
        if service is None or (service == "stop_cover" and not features & COVER_STOP):
            return _unknown(what, text)
        return _call(entity_id, service)
    if what in ("position", "tilt"):
        if not features & (COVER_SET_POSITION if what == "position" else COVER_SET_TILT):
            return Refused(f"{entity_id} has no {what}")
        value = _finite(text, 0, 100)
        if value is None:
            return Refused(f"{what} must be a number from 0 to 100")
        if what == "position":
            return _call(entity_id, "set_cover_position", position=round(value))
        return _call(entity_id, "set_cover_tilt_position", tilt_position=round(value))
    return _unknown(what, text)


def _lock_command(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    service = {"LOCK": "lock", "UNLOCK": "unlock", "OPEN": "open"}.get(text) if what is None else None
    if service is None or (service == "open" and not _features(a) & LOCK_OPEN):
        return _unknown(what, text)
    return _call(entity_id, service)


def _in(text: str, options: Any) -> bool:
    return text in _strings(options)


def _climate_command(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    features = _features(a)
    low, high = _number(a.get("min_temp")), _number(a.get("max_temp"))
    match what:
        case "mode":
            if not _in(text, a.get("hvac_modes")):
                return Refused(f"{text[:40]!r} is not one of the entity's modes")
            return _call(entity_id, "set_hvac_mode", hvac_mode=text)
        case "temperature" if features & CLIMATE_TARGET:
            value = _finite(text, low, high)
            if value is None:
                return Refused(f"temperature must be a number within {low}-{high}")
            return _call(entity_id, "set_temperature", temperature=value)
        case "temperature_low" | "temperature_high" if features & CLIMATE_RANGE:
            value = _finite(text, low, high)
            other_key = "target_temp_high" if what == "temperature_low" else "target_temp_low"
            other = _number(a.get(other_key))
            if value is None or other is None:
                return Refused(f"{what} must be a number within {low}-{high}, with the other end known")
            pair = (value, other) if what == "temperature_low" else (other, value)
            if pair[0] > pair[1]:
                return Refused(f"the low target {pair[0]} would be above the high target {pair[1]}")
            return _call(entity_id, "set_temperature", target_temp_low=pair[0], target_temp_high=pair[1])
        case "fan_mode" | "preset_mode" | "swing_mode":
            bit = {"fan_mode": CLIMATE_FAN_MODE, "preset_mode": CLIMATE_PRESET, "swing_mode": CLIMATE_SWING}[what]
            if not features & bit or not _in(text, a.get(f"{what}s")):
                return Refused(f"{text[:40]!r} is not one of the entity's {what}s")
            return _call(entity_id, f"set_{what}", **{what: text})
    return _unknown(what, text)


def _fan_command(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    features = _features(a)
    match what:
        case None:
            return _on_off(entity_id, a, what, text)
        case "percentage" if features & FAN_SET_SPEED:
            value = _finite(text, 0, 100)
            if value is None:
                return Refused("percentage must be a number from 0 to 100")
            return _call(entity_id, "set_percentage", percentage=round(value))
        case "preset_mode" if features & FAN_PRESET:
            if not _in(text, a.get("preset_modes")):
                return Refused(f"{text[:40]!r} is not one of the entity's preset modes")
            return _call(entity_id, "set_preset_mode", preset_mode=text)
        case "oscillation" if features & FAN_OSCILLATE:
            if text not in ("oscillate_on", "oscillate_off"):
                return Refused("oscillation is oscillate_on or oscillate_off")
            return _call(entity_id, "oscillate", oscillating=text == "oscillate_on")
    return _unknown(what, text)


def _number_command(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    if what is not None:
        return _unknown(what, text)
    value = _finite(text, _number(a.get("min")), _number(a.get("max")))
    if value is None:
        return Refused(f"the value must be a number within {a.get('min')}-{a.get('max')}")
    return _call(entity_id, "set_value", value=value)


def _select_command(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    if what is not None:
        return _unknown(what, text)
    if not _in(text, a.get("options")):
        return Refused(f"{text[:40]!r} is not one of the entity's options")
    return _call(entity_id, "select_option", option=text)


def _light_command(entity_id: str, a: Mapping[str, Any], what: str | None, text: str) -> ServiceCall | Refused:
    """HA's MQTT JSON light schema: ``{"state": "ON", "brightness": 128, "color_temp": 300, "color": {...},
    "effect": "...", "transition": 2}``."""
    if what is not None:
        return _unknown(what, text)
    try:
        body = json.loads(text)
    except ValueError:
        return Refused("not JSON")
    if not isinstance(body, dict) or body.get("state") not in (_ON, _OFF):
        return Refused('a light command is a JSON object with "state": "ON" or "OFF"')
    data: dict[str, Any] = {}
    transition = body.get("transition")
    if transition is not None:
        value = _finite(str(transition), 0, 3600) if isinstance(transition, int | float) else None
        if value is None:
            return Refused("transition must be 0-3600 seconds")
        data["transition"] = value
    if body["state"] == _OFF:
        return _call(entity_id, "turn_off", **data)
    modes = set(_strings(a.get("supported_color_modes")))
    if "brightness" in body:
        value = _finite(str(body["brightness"]), 0, 255) if isinstance(body["brightness"], int | float) else None
        if value is None or modes <= {"onoff"}:
            return Refused("brightness must be 0-255, on a dimmable light")
        data["brightness"] = round(value)
    if "color_temp" in body:
        low, high = _number(a.get("min_mireds")), _number(a.get("max_mireds"))
        value = _finite(str(body["color_temp"]), low, high) if isinstance(body["color_temp"], int | float) else None
        if value is None or "color_temp" not in modes:
            return Refused(f"color_temp must be {low}-{high} mireds, on a light with colour temperatures")
        data["color_temp"] = round(value)
    if "color" in body:
        color = _light_color(body["color"], modes)
        if isinstance(color, Refused):
            return color
        data.update(color)
    if "effect" in body:
        if not _in(str(body["effect"]), a.get("effect_list")):
            return Refused("not one of the light's effects")
        data["effect"] = str(body["effect"])
    return _call(entity_id, "turn_on", **data)


def _light_color(color: Any, modes: set[str]) -> dict[str, Any] | Refused:
    if not isinstance(color, dict):
        return Refused("color must be an object")
    shapes = (("hs", ("h", "s"), "hs_color", (360, 100)), ("rgb", ("r", "g", "b"), "rgb_color", (255, 255, 255)),
              ("xy", ("x", "y"), "xy_color", (1, 1)))
    if not modes & _COLOUR_MODES:
        return Refused("the light takes no colour")
    for mode, keys, name, limits in shapes:  # HA converts between them for any colour light
        if set(keys) <= set(color):
            values = [color[k] for k in keys]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                       and 0 <= v <= limit for v, limit in zip(values, limits, strict=True)):
                return Refused(f"{mode} colour out of range")
            return {name: [round(v) if mode == "rgb" else v for v in values]}
    return Refused("color must hold h and s, r g and b, or x and y")


_COMMANDS: Mapping[str, Callable[[str, Mapping[str, Any], str | None, str], ServiceCall | Refused]] = {
    "switch": _on_off, "input_boolean": _on_off, "light": _light_command, "cover": _cover_command,
    "lock": _lock_command, "climate": _climate_command, "fan": _fan_command, "number": _number_command,
    "input_number": _number_command, "select": _select_command, "input_select": _select_command,
    "button": _press, "input_button": _press, "script": _press, "scene": _press,
}
