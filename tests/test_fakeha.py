"""The fake Home Assistant (harness.fakeha) against the recordings of the real one (harness/haframes.json):
every frame the fake sends has the shape of the recorded frame of its kind, and a fresh recording of the
real Home Assistant the tests install has the shapes of the stored one. Together: the fake cannot drift from
HA 2024.3.3's websocket API without a test failing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from harness import haframes, vclock
from harness.brokers import MosquittoProcess
from harness.fakeha import FakeHomeAssistant, FakeWebSocket
from harness.ha import StartHA

RECORDED = haframes.load()


async def _frames(ws: FakeWebSocket) -> list[dict[str, Any]]:
    await asyncio.sleep(0)
    frames = []
    while not ws._out.empty():
        message = await ws.receive()
        if message.type is aiohttp.WSMsgType.TEXT:
            frames.append(json.loads(message.data))
    return frames


async def _registry_frames(fake: FakeHomeAssistant, command: Any, out: dict[str, Any]) -> None:
    """As the recording: a helper created and renamed, an area, an MQTT entity with its device."""
    for event_type in ("entity_registry_updated", "device_registry_updated", "area_registry_updated"):
        await command({"type": "subscribe_events", "event_type": event_type})
    ws = next(iter(fake.sockets))
    fake.register("input_boolean.hasync_registry", platform="input_boolean", unique_id="hasync_registry",
                  original_name="hasync registry")
    [out["entity_registry_updated_create"]] = await _frames(ws)
    fake.update_entry("input_boolean.hasync_registry", new_entity_id="input_boolean.hasync_registry_renamed")
    [out["entity_registry_updated_update"]] = await _frames(ws)
    fake.add_area("hasync_recorded", "hasync recorded")
    [out["area_registry_updated_create"]] = await _frames(ws)
    fake.update_area("hasync_recorded", "hasync recorded 2")
    [out["area_registry_updated_update"]] = await _frames(ws)
    fake.add_device("81b26c7c", "Recorded", identifiers=[["mqtt", "hasync_record"]])
    [out["device_registry_updated_create"]] = await _frames(ws)
    fake.register("switch.recorded_recorded", platform="mqtt", unique_id="hasync_record_1", device_id="81b26c7c",
                  original_name="recorded")
    await _frames(ws)
    fake.update_device("81b26c7c", area_id="hasync_recorded")
    [out["device_registry_updated_update"]] = await _frames(ws)
    for kind in ("entity", "device", "area"):
        [out[f"{kind}_registry_list"]] = await command({"type": f"config/{kind}_registry/list"})
    fake.unregister("input_boolean.hasync_registry_renamed")
    [out["entity_registry_updated_remove"]] = await _frames(ws)
    fake.unregister("switch.recorded_recorded")
    fake.remove_device("81b26c7c")
    [_, out["device_registry_updated_remove"]] = await _frames(ws)
    fake.remove_area("hasync_recorded")
    [out["area_registry_updated_remove"]] = await _frames(ws)


def _fake_frames() -> dict[str, Any]:
    """The fake's frame for every recorded kind, produced the way the recording produced the real ones."""

    async def session() -> dict[str, Any]:
        fake = FakeHomeAssistant(entities={"input_boolean.test_flag": ("off", {}),
                                           "input_number.test_level": ("0.0", {"min": 0.0, "max": 100.0})})
        out: dict[str, Any] = {}
        bad = await fake.open("ws://fake", 5)
        [out["auth_required"]] = await _frames(bad)
        await bad.send_json({"type": "auth", "access_token": "wrong"})
        [out["auth_invalid"]] = [f for f in await _frames(bad) if f.get("type") == "auth_invalid"]
        ws = await fake.open("ws://fake", 5)
        await _frames(ws)
        await ws.send_json({"type": "auth", "access_token": fake.token})
        [out["auth_ok"]] = await _frames(ws)
        ident = 0

        async def command(message: dict[str, Any]) -> list[dict[str, Any]]:
            nonlocal ident
            ident += 1
            await ws.send_json({"id": ident, **message})
            return await _frames(ws)

        [out["pong"]] = await command({"type": "ping"})
        [out["unknown_command"]] = await command({"type": "hasync/no_such_command"})
        [out["get_states"]] = await command({"type": "get_states"})
        [out["config_entries_get"]] = await command({"type": "config_entries/get", "domain": "mqtt"})
        [out["subscribe_events"]] = await command({"type": "subscribe_events", "event_type": "state_changed"})
        fake.set_state("input_boolean.test_flag", "on")
        [out["state_changed"]] = await _frames(ws)
        *out["scene_apply_events"], out["scene_apply"] = await command({
            "type": "call_service", "domain": "scene", "service": "apply",
            "service_data": {"entities": {"input_boolean.test_flag": "off", "input_number.test_level": "42"}}})
        out["call_service"] = out["scene_apply"]
        [out["call_service_unknown"]] = await command({"type": "call_service", "domain": "input_boolean",
                                                       "service": "no_such_service"})
        [out["unsubscribe_events"]] = await command({"type": "unsubscribe_events", "subscription": 5})
        [out["mqtt_subscribe"]] = await command({"type": "mqtt/subscribe", "topic": "hasync/t", "qos": 0})
        out["mqtt_message"], out["mqtt_publish"] = await command({
            "type": "call_service", "domain": "mqtt", "service": "publish",
            "service_data": {"topic": "hasync/t", "payload": "probe", "qos": 0, "retain": False}})
        fake.add("input_boolean.hasync_recorded", "off", ui_helper=True)
        [out["entity_registry_get"]] = await command({"type": "config/entity_registry/get",
                                                      "entity_id": "input_boolean.hasync_recorded"})
        [out["entity_registry_get_missing"]] = await command({"type": "config/entity_registry/get",
                                                              "entity_id": "input_boolean.nothing_here"})
        [out["input_boolean_delete"]] = await command({"type": "input_boolean/delete",
                                                       "input_boolean_id": "hasync_recorded"})
        fake.mqtt_connected = False
        [out["mqtt_publish_disconnected"]] = await command({
            "type": "call_service", "domain": "mqtt", "service": "publish",
            "service_data": {"topic": "hasync/t", "payload": "probe", "qos": 0, "retain": False}})
        [out["config_entries_get_disconnected"]] = await command({"type": "config_entries/get", "domain": "mqtt"})
        await _registry_frames(fake, command, out)
        return out

    return vclock.run(session())


FAKE = _fake_frames()
# input_boolean/create is only used by the recording, to make a helper to delete.
FAKE_KINDS = sorted(set(RECORDED) - {"input_boolean_create"})


def test_the_fake_covers_every_recorded_kind_but_helper_creation() -> None:
    assert sorted(FAKE) == FAKE_KINDS


@pytest.mark.parametrize("kind", FAKE_KINDS)
def test_each_fake_frame_has_the_shape_of_the_real_one(kind: str) -> None:
    assert haframes.shape(FAKE[kind]) == haframes.shape(RECORDED[kind])


@pytest.mark.integration
@pytest.mark.mosquitto
@pytest.mark.timeout(240)
def test_the_recording_still_matches_the_real_home_assistant(mosquitto: MosquittoProcess, start_ha: StartHA) -> None:
    (ha,) = start_ha("recording", mqtt_port=mosquitto.port)
    fresh = asyncio.run(haframes.record(ha.url, ha.token, mosquitto.stop))
    assert sorted(fresh) == sorted(RECORDED)
    for kind in RECORDED:
        assert haframes.shape(fresh[kind]) == haframes.shape(RECORDED[kind]), kind
