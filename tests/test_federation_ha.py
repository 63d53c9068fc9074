"""Federation's mapping against two real Home Assistants: a hub running HA's demo integration (real lights,
covers, climates, locks, fans, numbers, selects...) and a main with the MQTT integration on Mosquitto.

The test plays the exporter's part by hand (the agent's exporter is not written yet): it reads the hub's
registries and states, publishes hasync.federation.export's discovery and state messages, and checks that main
turns every one into an entity of its own with the hub's state; then, domain by domain, it calls a service on
main's copy, takes the command main publishes, turns it into a service call with hasync.federation.mapping
and makes it on the hub, and checks the hub's entity changed. Both directions of every mapping, against the
discovery schemas of a real HA."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from harness.agents import checked_cluster
from harness.brokers import MosquittoProcess
from harness.ha import HomeAssistant, StartHA
from harness.wait import wait_until
from hasync import __version__
from hasync.federation import mapping
from hasync.federation.export import Exported, Hub, Rules, Selection, discovery_message, parse_registries, select

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.timeout(300)]

DOMAINS = frozenset({"sensor", "binary_sensor", "switch", "light", "cover", "lock", "climate", "fan", "number",
                     "select", "button", "event", "input_boolean", "input_number", "input_select"})


class Broker:
    """A paho client publishing retained messages and recording what arrives on the hub's command topics."""

    def __init__(self, port: int, hub: Hub) -> None:
        self.commands: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fed-test-{time.monotonic_ns()}")
        client.on_connect = lambda c, *_: c.subscribe([(f"{hub.base}/+/set", 1), (f"{hub.base}/+/set/+", 1)])
        client.on_subscribe = lambda *_: ready.set()
        client.on_message = lambda _c, _u, m: self._record(m.topic, bytes(m.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        wait_until(ready.is_set, 10, "the test's MQTT client to subscribe")
        self.client = client

    def _record(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.commands.append((topic, payload))

    def publish(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def take(self) -> list[tuple[str, bytes]]:
        with self._lock:
            taken, self.commands = self.commands, []
        return taken

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def homes(start_ha: StartHA, mosquitto: MosquittoProcess) -> Iterator[tuple[HomeAssistant, HomeAssistant, Broker,
                                                                             Hub]]:
    (hub_ha,) = start_ha("hub", demo=True)
    (main,) = start_ha("main", mqtt_port=mosquitto.port)
    hub = Hub("hasync", "radios", agent_version=__version__)
    broker = Broker(mosquitto.port, hub)
    try:
        yield hub_ha, main, broker, hub
    finally:
        broker.close()


@dataclass
class Federated:
    """What the test exported by hand: the hub's states, its exported entities and main's copies of them."""

    hub_ha: HomeAssistant
    broker: Broker
    hub: Hub
    states: dict[str, dict[str, Any]]
    exported: dict[str, Exported]
    copies: dict[str, str]  # hub entity id -> main's

    def publish_state(self, entity_id: str) -> None:
        state = self.hub_ha.get_state(entity_id)
        assert state is not None
        self.broker.publish(self.hub.topics(self.exported[entity_id].uid).state,
                            mapping.state_payload(entity_id, state["state"], state["attributes"]))


def export_by_hand(hub_ha: HomeAssistant, broker: Broker, hub: Hub) -> Federated:
    entities, devices, areas = parse_registries(*hub_ha.websocket({"type": "config/entity_registry/list"},
                                                                  {"type": "config/device_registry/list"},
                                                                  {"type": "config/area_registry/list"}))
    states = {s["entity_id"]: s for s in hub_ha.states()}
    # The demo's locks have no unique id (no registry entry): exported only when named (here by a glob).
    exported = select(entities, devices, areas, Selection(include=Rules(domains=DOMAINS, entity_globs=("lock.*",))),
                      unregistered=states)
    assert len({e.split(".")[0] for e in exported}) >= 12, sorted(exported)
    fed = Federated(hub_ha, broker, hub, states, exported, {})
    broker.publish(hub.status_topic, "online")
    for entity_id, item in exported.items():
        message = discovery_message(hub, item, states[entity_id]["state"], states[entity_id]["attributes"])
        assert message is not None
        topic, config = message
        broker.publish(topic, json.dumps(config))
        fed.publish_state(entity_id)
        component = mapping.component(entity_id)
        fed.copies[entity_id] = f"{component}.{config['object_id']}"
    return fed


def test_every_demo_entity_becomes_an_entity_on_main_and_commands_come_back(
        homes: tuple[HomeAssistant, HomeAssistant, Broker, Hub]) -> None:
    hub_ha, main, broker, hub = homes
    fed = export_by_hand(hub_ha, broker, hub)
    copies, states, exported = fed.copies, fed.states, fed.exported

    def main_states() -> dict[str, dict[str, Any]]:
        return {s["entity_id"]: s for s in main.states()}

    try:
        wait_until(lambda: set(copies.values()) <= set(main_states()), 60, f"main to create all {len(copies)} entities")
    except AssertionError:
        missing = sorted(set(copies.values()) - set(main_states()))
        log = [line for line in main.log_tail(400_000).splitlines() if "ERROR" in line or "rror" in line]
        raise AssertionError(f"missing on main: {missing}\n" + "\n".join(log[-30:])) from None
    registry = {e["entity_id"]: e for e in main.websocket({"type": "config/entity_registry/list"})[0]}
    for entity_id, copy in copies.items():
        assert registry[copy]["unique_id"] == f"hasync_fed_radios_{exported[entity_id].uid}", copy
    same = [e for e in copies if e.split(".")[0] in ("sensor", "binary_sensor", "switch", "lock", "cover", "select",
                                                      "input_boolean", "input_select")]

    def differing() -> dict[str, tuple[str, str]]:
        on_main = main_states()
        return {e: (on_main[copies[e]]["state"], states[e]["state"]) for e in same
                if on_main[copies[e]]["state"] != states[e]["state"]}

    try:
        wait_until(lambda: not differing(), 30, "main's copies to show the hub's states")
    except AssertionError:
        raise AssertionError(f"main (left) and the hub (right) differ: {differing()}") from None
    assert "Exception" not in main.log_tail(200_000) and "Invalid config" not in main.log_tail(200_000)
    round_trips(main, fed)


def round_trips(main: HomeAssistant, fed: Federated) -> None:
    """Domain by domain: a service call on main's copy, the command it publishes, the call on the hub."""
    hub_ha, copies = fed.hub_ha, fed.copies

    def command(copy_service: tuple[str, str, dict[str, Any]], entity_id: str, messages: int = 1) -> None:
        fed.broker.take()
        domain, service, data = copy_service
        main.call_service(domain, service, {"entity_id": copies[entity_id], **data})
        wait_until(lambda: len(fed.broker.commands) >= messages, 10, f"main's command for {copies[entity_id]}")
        taken = fed.broker.take()
        assert len(taken) == messages, taken
        for topic, payload in taken:
            what = topic.removeprefix(fed.hub.topics(fed.exported[entity_id].uid).command()).lstrip("/") or None
            attributes = fed.states[entity_id]["attributes"]
            call = mapping.command(entity_id, attributes, what, payload)
            assert isinstance(call, mapping.ServiceCall), (topic, payload, call)
            hub_ha.call_service(call.domain, call.service, {"entity_id": call.entity_id, **call.data})
            attributes.update(call.data)  # as the exporter does: the next command of a pair sees this one
            fed.publish_state(entity_id)

    command(("light", "turn_on", {"brightness": 128}), "light.bed_light")
    hub_ha.wait_for_state("light.bed_light", lambda s: s is not None and s["attributes"]["brightness"] == 128)
    main.wait_for_state(copies["light.bed_light"], lambda s: s is not None and s["state"] == "on"
                        and s["attributes"].get("brightness") == 128)
    command(("light", "turn_on", {"hs_color": [120, 60]}), "light.bed_light")
    hub_ha.wait_for_state("light.bed_light", lambda s: s is not None and s["attributes"]["color_mode"] == "hs"
                          and round(s["attributes"]["hs_color"][0]) == 120)
    command(("light", "turn_off", {}), "light.bed_light")
    hub_ha.wait_for_state("light.bed_light", "off")
    command(("cover", "set_cover_position", {"position": 30}), "cover.living_room_window")
    hub_ha.wait_for_state("cover.living_room_window",
                          lambda s: s is not None and s["attributes"]["current_position"] == 30, 30)
    command(("lock", "unlock", {}), "lock.front_door")
    hub_ha.wait_for_state("lock.front_door", "unlocked")
    main.wait_for_state(copies["lock.front_door"], "unlocked")
    command(("climate", "set_hvac_mode", {"hvac_mode": "cool"}), "climate.ecobee")
    hub_ha.wait_for_state("climate.ecobee", "cool")
    # Main sends a range as two commands (low, then high): the second must not undo the first.
    command(("climate", "set_temperature", {"target_temp_low": 20, "target_temp_high": 25}), "climate.ecobee", 2)
    hub_ha.wait_for_state("climate.ecobee", lambda s: s is not None and s["attributes"]["target_temp_low"] == 20
                          and s["attributes"]["target_temp_high"] == 25)
    command(("fan", "set_percentage", {"percentage": 66}), "fan.living_room_fan")
    hub_ha.wait_for_state("fan.living_room_fan", lambda s: s is not None and s["attributes"]["percentage"] == 66)
    command(("switch", "turn_off", {}), "switch.decorative_lights")
    hub_ha.wait_for_state("switch.decorative_lights", "off")
    command(("switch", "turn_on", {}), "input_boolean.test_flag")
    hub_ha.wait_for_state("input_boolean.test_flag", "on")
    command(("number", "set_value", {"value": 42}), "input_number.test_level")
    hub_ha.wait_for_state("input_number.test_level", "42.0")
    command(("select", "select_option", {"option": "night"}), "input_select.test_mode")
    hub_ha.wait_for_state("input_select.test_mode", "night")


def test_a_hub_agent_exports_routes_commands_and_its_death_makes_main_show_unavailable(
        start_ha: StartHA, mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str) -> None:
    """The agent as a hub: the selected entities on main, main's command run on the hub; kill -9 of the hub's
    agent: main's copies unavailable (the export session's will), not deleted; a new agent: back."""
    (hub_ha,) = start_ha("hub", demo=True, mqtt_port=mosquitto.port)
    (main,) = start_ha("main", mqtt_port=mosquitto.port)
    wanted = ["light.bed_light", "cover.living_room_window", "sensor.outside_temperature", "switch.ac"]
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        hub_agent = cluster.add("hub1", homeassistant={"url": hub_ha.url, "token": hub_ha.token},
                                federation={"include": {"entities": wanted}})
        assert cluster.wait_for_leader(30) == "hub1"
        copies = {e: f"{e.split('.')[0]}.test_{e.split('.')[1]}" for e in wanted}
        for copy in copies.values():
            main.wait_for_state(copy, lambda s: s is not None and s["state"] not in ("unavailable", "unknown"), 60)
        assert main.get_state(copies["sensor.outside_temperature"])["state"] == (  # type: ignore[index]
            hub_ha.get_state("sensor.outside_temperature")["state"])  # type: ignore[index]
        assert hub_agent.metric("hasync_federation_exported") == len(wanted)
        main.call_service("light", "turn_on", {"entity_id": copies["light.bed_light"], "brightness": 100})
        hub_ha.wait_for_state("light.bed_light", lambda s: s is not None and s["attributes"]["brightness"] == 100, 15)
        main.wait_for_state(copies["light.bed_light"], lambda s: s is not None and s["state"] == "on", 15)
        main.call_service("switch", "turn_off", {"entity_id": copies["switch.ac"]})
        hub_ha.wait_for_state("switch.ac", "off", 15)
        # Counted once HA has answered the call, which can come after the state change the test saw.
        wait_until(lambda: hub_agent.metric("hasync_federation_commands_total", result="done") == 2, 10,
                   "both commands counted")

        cluster.kill("hub1")
        for copy in copies.values():
            main.wait_for_state(copy, "unavailable", 30)
        registry = {e["entity_id"] for e in main.websocket({"type": "config/entity_registry/list"})[0]}
        assert set(copies.values()) <= registry  # unavailable, not deleted
        cluster.agents["hub1"].start()
        for copy in copies.values():
            main.wait_for_state(copy, lambda s: s is not None and s["state"] != "unavailable", 60)
        assert not [e for e in main.states() if e["entity_id"].endswith("_2")]  # no duplicates


def test_a_hub_that_is_an_ha_pair_fails_over_without_main_noticing_more_than_a_blip(
        start_ha: StartHA, mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str) -> None:
    """Two hub nodes (each its own HA with the demo, the same entities), one cluster: only the primary exports;
    kill -9 of it: the other exports the same identities, main keeps its entities (ids, no duplicates), and the
    next command runs once, on the new primary's HA."""
    hub_a, hub_b = start_ha("hub_a", "hub_b", demo=True, mqtt_port=mosquitto.port)
    (main,) = start_ha("main", mqtt_port=mosquitto.port)
    wanted = {"entities": ["switch.ac", "light.bed_light"]}
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        cluster.add("a", priority=200, homeassistant={"url": hub_a.url, "token": hub_a.token}, federation={
            "include": wanted})
        cluster.add("b", priority=100, homeassistant={"url": hub_b.url, "token": hub_b.token}, federation={
            "include": wanted})
        assert cluster.wait_for_leader(30) == "a"
        main.wait_for_state("switch.test_ac", "off", 60)  # the demo's air conditioner starts off
        before = {e["entity_id"]: e["unique_id"] for e in main.websocket({"type": "config/entity_registry/list"})[0]
                  if e["unique_id"].startswith("hasync_fed_")}
        assert set(before) == {"switch.test_ac", "light.test_bed_light"}
        assert cluster.agents["b"].metric("hasync_federation_exported") == 0  # the standby exports nothing

        killed = cluster.kill("a")
        assert cluster.wait_for_leader(15, after=killed, exclude="a") == "b"
        wait_until(lambda: cluster.agents["b"].metric("hasync_federation_exported") == 2, 15, "b to export")
        main.call_service("switch", "turn_on", {"entity_id": "switch.test_ac"})
        hub_b.wait_for_state("switch.ac", "on", 15)
        assert hub_a.get_state("switch.ac")["state"] == "off"  # type: ignore[index]  # once, on the new primary
        main.wait_for_state("switch.test_ac", "on", 15)
        assert cluster.agents["b"].metric("hasync_federation_commands_total", result="done") == 1
        after = {e["entity_id"]: e["unique_id"] for e in main.websocket({"type": "config/entity_registry/list"})[0]
                 if e["unique_id"].startswith("hasync_fed_")}
        assert after == before  # the same entities on main: ids and unique ids
