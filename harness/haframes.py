"""Frames of Home Assistant's websocket API, recorded from the real Home Assistant the tests install.

``record(url, token)`` runs every command hasync's link uses against a live HA and returns the frames it
got, by name (``haframes.json`` keeps them, for ``harness.fakeha``). ``shape(value)`` reduces a frame to its
keys and value types, recursively: the fake's frames must have the shapes of the recorded ones, and a
fresh recording must have the shapes of the stored one (tests/test_fakeha.py), so the fake cannot drift
from the real thing without a test failing.

``python -m harness.haframes`` starts a Home Assistant and a Mosquitto, records, and rewrites the file.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .brokers import MosquittoProcess
from .ha import HomeAssistant

FRAMES_PATH = Path(__file__).with_name("haframes.json")

# Entities the recording keeps from get_states (the rest of a real HA's states only make the file long).
KEPT_ENTITIES = ("input_boolean.test_flag", "input_number.test_level", "automation.count_test_presses")


def load() -> dict[str, Any]:
    frames: dict[str, Any] = json.loads(FRAMES_PATH.read_text())
    return frames


def shape(value: Any) -> Any:
    """Keys and JSON types, recursively; a list by the union of its items' shapes (as a sorted list). An
    entity's ``attributes`` are its integration's business: only their type counts."""
    if isinstance(value, dict):
        return {key: "object" if key == "attributes" and isinstance(item, dict) else shape(item)
                for key, item in sorted(value.items())}
    if isinstance(value, list):
        shapes: list[Any] = []
        for item in value:
            s = shape(item)
            if s not in shapes:
                shapes.append(s)
        return ["list", *sorted(shapes, key=json.dumps)]
    if value is None:
        return "null"
    return type(value).__name__


class _Recorder:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop(0)
        frame: dict[str, Any] = json.loads((await self.ws.receive(timeout=10)).data)
        return frame

    async def command(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send with the next id; return its result and the event frames that came before it."""
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_json({"id": ident, **message})
        events: list[dict[str, Any]] = []
        while True:
            frame = await self.receive()
            if frame.get("id") == ident and frame.get("type") in ("result", "pong"):
                return frame, events
            events.append(frame)

    async def events(self, subscription: int, count: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        keep: list[dict[str, Any]] = []
        while len(found) < count:
            frame = await self.receive()
            (found if frame.get("id") == subscription and frame.get("type") == "event" else keep).append(frame)
        self.pending = keep + self.pending
        return found


async def record(url: str, token: str, stop_broker: Callable[[], None] | None = None) -> dict[str, Any]:
    """Every frame hasync's link sees, from a live HA (its MQTT integration set up and connected). With
    ``stop_broker``, it then stops HA's broker and records what an MQTT publish answers while it is down."""
    frames: dict[str, Any] = {}
    ws_url = url.rstrip("/") + "/api/websocket"
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url) as ws:
            frames["auth_required"] = json.loads((await ws.receive(timeout=10)).data)
            await ws.send_json({"type": "auth", "access_token": "not-a-token"})
            frames["auth_invalid"] = json.loads((await ws.receive(timeout=10)).data)
        async with http.ws_connect(ws_url) as ws:
            await ws.receive(timeout=10)
            await ws.send_json({"type": "auth", "access_token": token})
            frames["auth_ok"] = json.loads((await ws.receive(timeout=10)).data)
            r = _Recorder(ws)
            frames["pong"], _ = await r.command({"type": "ping"})
            frames["unknown_command"], _ = await r.command({"type": "hasync/no_such_command"})
            states, _ = await r.command({"type": "get_states"})
            states["result"] = [s for s in states["result"] if s["entity_id"] in KEPT_ENTITIES]
            frames["get_states"] = states
            frames["config_entries_get"], _ = await r.command({"type": "config_entries/get", "domain": "mqtt"})
            frames["subscribe_events"], _ = await r.command({"type": "subscribe_events",
                                                             "event_type": "state_changed"})
            subscription = r.next_id
            # A user's change: the event, with the call's context.
            frames["call_service"], before = await r.command({
                "type": "call_service", "domain": "input_boolean", "service": "toggle",
                "target": {"entity_id": "input_boolean.test_flag"}})
            r.pending = before + r.pending  # a call's events come before its answer
            [frames["state_changed"]] = await r.events(subscription, 1)
            # scene.apply of two entities: two events, then the result with the context they carry.
            frames["scene_apply"], before = await r.command({
                "type": "call_service", "domain": "scene", "service": "apply",
                "service_data": {"entities": {"input_boolean.test_flag": "off", "input_number.test_level": "42"}}})
            r.pending = before + r.pending
            frames["scene_apply_events"] = await r.events(subscription, 2)
            frames["call_service_unknown"], _ = await r.command({
                "type": "call_service", "domain": "input_boolean", "service": "no_such_service"})
            frames["unsubscribe_events"], _ = await r.command({"type": "unsubscribe_events",
                                                               "subscription": subscription})
            # The MQTT echo: subscribe through HA, have HA publish, the message comes back as an event.
            topic = f"hasync/record/{secrets.token_hex(4)}"
            frames["mqtt_subscribe"], _ = await r.command({"type": "mqtt/subscribe", "topic": topic, "qos": 0})
            mqtt_subscription = r.next_id
            await asyncio.sleep(1.5)  # HA subscribes at the broker after a debounce of up to 1 s
            frames["mqtt_publish"], before = await r.command({
                "type": "call_service", "domain": "mqtt", "service": "publish",
                "service_data": {"topic": topic, "payload": "probe", "qos": 0, "retain": False}})
            r.pending = before + r.pending
            [frames["mqtt_message"]] = await r.events(mqtt_subscription, 1)
            frames.update(await _record_helpers(r))
            frames.update(await _record_registries(r))
            if stop_broker is not None:
                await asyncio.to_thread(stop_broker)
                for _attempt in range(50):  # until HA's MQTT client has noticed
                    answer, _ = await r.command({
                        "type": "call_service", "domain": "mqtt", "service": "publish",
                        "service_data": {"topic": topic, "payload": "probe", "qos": 0, "retain": False}})
                    if not answer["success"]:
                        frames["mqtt_publish_disconnected"] = answer
                        break
                    await asyncio.sleep(0.2)
                frames["config_entries_get_disconnected"], _ = await r.command(
                    {"type": "config_entries/get", "domain": "mqtt"})
    return frames


async def _record_helpers(r: _Recorder) -> dict[str, Any]:
    """Helpers made in the UI: the registry entry, and deleting one."""
    frames: dict[str, Any] = {}
    created, _ = await r.command({"type": "input_boolean/create", "name": "hasync recorded"})
    frames["input_boolean_create"] = created
    entity_id = f"input_boolean.{created['result']['id']}"
    frames["entity_registry_get"], _ = await r.command({"type": "config/entity_registry/get", "entity_id": entity_id})
    frames["entity_registry_get_missing"], _ = await r.command({"type": "config/entity_registry/get",
                                                                "entity_id": "input_boolean.nothing_here"})
    frames["input_boolean_delete"], _ = await r.command({"type": "input_boolean/delete",
                                                         "input_boolean_id": created["result"]["id"]})
    return frames


async def _record_registries(r: _Recorder) -> dict[str, Any]:
    """The registry events (created, updated, removed) of an entity, a device and an area, and the registry
    lists (cut to what the recording made: a UI helper, an MQTT entity with its device, an area)."""
    frames: dict[str, Any] = {}
    subscriptions = {}
    for event_type in ("entity_registry_updated", "device_registry_updated", "area_registry_updated"):
        await r.command({"type": "subscribe_events", "event_type": event_type})
        subscriptions[event_type] = r.next_id

    async def run(message: dict[str, Any]) -> dict[str, Any]:
        answer, before = await r.command(message)
        r.pending = before + r.pending  # the events a command caused come before its answer
        return answer

    async def event(event_type: str, name: str) -> None:
        [frames[f"{event_type}_{name}"]] = await r.events(subscriptions[event_type], 1)

    created = await run({"type": "input_boolean/create", "name": "hasync registry"})
    helper = f"input_boolean.{created['result']['id']}"
    await event("entity_registry_updated", "create")
    await run({"type": "config/entity_registry/update", "entity_id": helper, "new_entity_id": helper + "_renamed"})
    await event("entity_registry_updated", "update")  # a rename: with old_entity_id
    area = await run({"type": "config/area_registry/create", "name": "hasync recorded"})
    area_id = area["result"]["area_id"]
    await event("area_registry_updated", "create")
    await run({"type": "config/area_registry/update", "area_id": area_id, "name": "hasync recorded 2"})
    await event("area_registry_updated", "update")
    # An MQTT entity with a device, by discovery: the device registry's events and list.
    topic = f"homeassistant/switch/hasync_record/{secrets.token_hex(4)}/config"
    config = {"name": "recorded", "unique_id": f"hasync_record_{secrets.token_hex(4)}",
              "command_topic": "hasync/record/set", "device": {"identifiers": ["hasync_record"], "name": "Recorded"}}
    data = {"topic": topic, "payload": json.dumps(config), "qos": 1, "retain": False}
    publish = {"type": "call_service", "domain": "mqtt", "service": "publish", "service_data": data}
    await run(publish)
    await event("device_registry_updated", "create")
    await r.events(subscriptions["entity_registry_updated"], 1)  # the MQTT entity's
    [device] = [d for d in (await run({"type": "config/device_registry/list"}))["result"]
                if ["mqtt", "hasync_record"] in d["identifiers"]]
    await run({"type": "config/device_registry/update", "device_id": device["id"], "area_id": area_id})
    await event("device_registry_updated", "update")
    kept = {"entity": ("unique_id", {created["result"]["id"], config["unique_id"]}),
            "device": ("id", {device["id"]}), "area": ("area_id", {area_id})}
    for kind, (key, values) in kept.items():
        answer = await run({"type": f"config/{kind}_registry/list"})
        answer["result"] = [item for item in answer["result"] if item[key] in values]
        frames[f"{kind}_registry_list"] = answer
    await run({"type": "input_boolean/delete", "input_boolean_id": created["result"]["id"]})
    await event("entity_registry_updated", "remove")
    await run({**publish, "service_data": {**data, "payload": ""}})  # MQTT removes the entity and its device
    await r.events(subscriptions["entity_registry_updated"], 1)
    await event("device_registry_updated", "remove")
    await run({"type": "config/area_registry/delete", "area_id": area_id})
    await event("area_registry_updated", "remove")
    return frames


def _main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="haframes-") as tmp,
        MosquittoProcess(Path(tmp) / "mosquitto") as broker,
        HomeAssistant(Path(tmp) / "ha", name="recording", mqtt_port=broker.port) as ha,
    ):
        frames = asyncio.run(record(ha.url, ha.token, broker.stop))
    FRAMES_PATH.write_text(json.dumps(frames, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(frames)} frames to {FRAMES_PATH}")


if __name__ == "__main__":
    _main()
