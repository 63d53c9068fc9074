"""Federation of event entities (a button, a doorbell, a remote's keys): main's event entity and its device
triggers fire once per event on the hub, never when the hub's state is published again.

Pure tests of hasync.federation.mapping.event_message and export.trigger_messages, then one against two real
Home Assistants: the demo's event entity (``event.push_button_press``, fired by the demo's
``demo_button_pressed`` event) becomes a device trigger on main that a ``subscribe_trigger`` on main sees fire
once per press, and not again when the hub's agent is killed and a new one publishes everything again."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.agents import checked_cluster
from harness.brokers import MosquittoProcess
from harness.ha import StartHA
from hasync.federation import mapping
from hasync.federation.export import Device, Entry, Exported, Hub, discovery_message, trigger_messages, uid

HUB = Hub("hasync", "radios", agent_version="0.1.0")
PUSH = Device("6219", "Push", key="dpush")
BUTTON = Exported(Entry("event.push_button_press", "2f8a", "demo", "push", device_id="6219",
                        original_name="Button press"), PUSH, None)
PRESSED = {"event_types": ["pressed"], "event_type": "pressed", "device_class": "button",
           "friendly_name": "Push Button press"}
T1, T2 = "2026-12-03T03:44:54.350+00:00", "2026-12-03T03:45:10.001+00:00"
# HA's MQTT discovery topic: <component>/[<node id>/]<object id>/config
DISCOVERY_TOPIC = re.compile(r"homeassistant/(?P<component>\w+)/(?:[a-zA-Z0-9_-]+/)?[a-zA-Z0-9_-]+/config")


def events(states: list[str], attributes: dict[str, Any] = PRESSED, first: str | None = "unknown") -> list[str]:
    """The states of an event entity as the exporter sees them one after another, from ``first``: which of
    them are published as events."""
    mark: str | None = first
    fired = []
    for state in states:
        if mapping.event_message(mark, state, attributes) is not None:
            fired.append(state)
        mark = mapping.event_mark(mark, state)
    return fired


def test_an_event_is_a_new_time_never_the_same_one_published_or_restored_again() -> None:
    assert events([T1]) == [T1]  # the first press of a button that never fired (unknown)
    assert events([T1, T1, T2]) == [T1, T2]  # the same state again (an attribute changed): no press
    assert events(["unavailable", T1]) == [T1]  # pressed after coming back
    assert events([T1, "unavailable", T1, T2]) == [T1, T2]  # back with the time it showed before: no press
    assert events([T1], first=T1) == []  # the hub restarted and restored its last event
    assert events([T1], first=None) == []  # an entity the agent had not seen: just added, not pressed
    assert events(["unknown", T1, "unknown"]) == [T1]
    assert events([T1], {"event_types": ["single"], "event_type": "pressed"}) == []  # main would refuse it
    assert events([T1], {"event_types": ["pressed"], "event_type": None}) == []


def test_the_event_message_is_what_mains_event_entity_reads() -> None:
    message = mapping.event_message("unknown", T1, {**PRESSED, "button": 2, "unit_of_measurement": "x"})
    assert message is not None and json.loads(message) == {"event_type": "pressed", "button": 2}
    topics = HUB.topics(uid(BUTTON.entry))
    config = mapping.discovery("event.push_button_press", PRESSED, topics)
    assert config is not None
    # The retained state is published again at every export and at main's birth: an event read from it would
    # press the button again each time. Main's entity reads the events' topic, which is never retained.
    assert config["state_topic"] == topics.event != topics.state and "value_template" not in config
    assert config["event_types"] == ["pressed"]


def test_an_event_entity_is_a_device_trigger_per_event_type_on_its_device() -> None:
    [(topic, config)] = trigger_messages(HUB, [(BUTTON, PRESSED)])
    _, entity_config = discovery_message(HUB, BUTTON, T1, PRESSED)  # type: ignore[misc]
    assert topic == f"homeassistant/device_automation/hasync_fed_radios/{uid(BUTTON.entry)}_pressed/config"
    assert config["device"] == entity_config["device"]  # the same device on main as the event entity's
    assert config["topic"] == entity_config["state_topic"] == HUB.topics(uid(BUTTON.entry)).event
    assert {k: config[k] for k in ("automation_type", "type", "subtype", "payload")} == {
        "automation_type": "trigger", "type": "pressed", "subtype": "Button press", "payload": "pressed"}
    assert config["value_template"] == "{{ value_json.event_type }}"  # the payload compared is the event type
    assert config["unique_id"] == f"hasync_fed_radios_{uid(BUTTON.entry)}_pressed"
    renamed = Exported(Entry("event.doorbell", "ffff", "demo", "push", device_id="6219", name="Doorbell",
                             original_name="Button press"), PUSH, None)
    assert trigger_messages(HUB, [(renamed, PRESSED)]) == [(topic, config)]  # main's automations keep working
    assert trigger_messages(HUB, [(Exported(Entry("sensor.x", "1", "demo", "x"), PUSH, None), PRESSED)]) == []


def test_two_keys_with_one_name_on_one_device_are_still_two_triggers() -> None:
    remote = {"event_types": ["short_release", "long_release", "Long release!", ""]}
    keys = [(Exported(Entry(f"event.remote_{n}", n, "hue", n, original_name="Button"), PUSH, None), remote)
            for n in ("1", "2")]
    loose = (Exported(Entry("event.loose", "9", "demo", "9"), None, None), {"event_types": ["pressed"]})
    messages = trigger_messages(HUB, [*keys, loose])
    triples = [(c["device"]["identifiers"][0], c["type"], c["subtype"]) for _, c in messages]
    assert len(messages) == 7 and len(set(triples)) == 7 and len({t for t, _ in messages}) == 7
    assert ("hasync_fed_radios_dpush", "short_release", "Button (event.remote_2)") in triples
    assert ("hasync_fed_radios", "pressed", "loose") in triples  # no device on the hub: the hub's own, named
    assert all(DISCOVERY_TOPIC.fullmatch(t) for t, _ in messages)


_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=3), max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(entities=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.none(), st.text(max_size=6)),
                                   st.booleans(),
                                   st.dictionaries(st.sampled_from(["event_types", "event_type", "friendly_name",
                                                                    "x"]), _ANY, max_size=4)), max_size=5),
       states=st.lists(st.one_of(st.sampled_from(["unavailable", "unknown", "", T1, T2]), st.text(max_size=30)),
                       max_size=8))
def test_no_event_entity_the_hub_reports_makes_the_hub_raise_or_main_refuse_a_trigger(
        entities: list[tuple[str, str | None, bool, dict[str, Any]]], states: list[str]) -> None:
    items = [(Exported(Entry(f"event.e{i}", str(i), "p", str(i), original_name=name), PUSH if on_device else None,
                       None), attributes) for i, (_, name, on_device, attributes) in enumerate(entities)]
    messages = trigger_messages(HUB, items)
    assert all(DISCOVERY_TOPIC.fullmatch(t) for t, _ in messages)
    assert len({t for t, _ in messages}) == len(messages)  # one config per trigger: none overwrites another
    assert len({c["unique_id"] for _, c in messages}) == len(messages)
    triples = [(c["device"]["identifiers"][0], c["type"], c["subtype"]) for _, c in messages]
    assert len(set(triples)) == len(triples)  # main refuses a second trigger with the same device, type, subtype
    for _, attributes in items:
        fired = events(states, attributes)
        assert len(fired) <= len(states) and not set(fired) & {"unavailable", "unknown", ""}
        for state in fired:
            message = mapping.event_message("before", state, attributes)
            assert message is not None and json.loads(message)["event_type"] in mapping.event_types(attributes)


# ---- against real Home Assistants --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.mosquitto
@pytest.mark.timeout(240)
def test_the_hubs_button_presses_fire_mains_device_trigger_once_each(
        start_ha: StartHA, mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str) -> None:
    (hub_ha,) = start_ha("hub", demo=True, mqtt_port=mosquitto.port)
    (main,) = start_ha("main", mqtt_port=mosquitto.port)
    button, copy = "event.push_button_press", "event.test_push_button_press"
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        cluster.add("hub1", homeassistant={"url": hub_ha.url, "token": hub_ha.token},
                    federation={"include": {"entities": [button, "switch.ac"]}})
        assert cluster.wait_for_leader(30) == "hub1"
        main.wait_for_state(copy, lambda s: s is not None and s["state"] != "unavailable", 60)
        [registry] = main.websocket({"type": "config/entity_registry/list"})
        device_id = next(e["device_id"] for e in registry if e["entity_id"] == copy)
        [triggers] = main.websocket({"type": "device_automation/trigger/list", "device_id": device_id})
        mqtt = [t for t in triggers if t["domain"] == "mqtt"]
        assert mqtt == [{"platform": "device", "domain": "mqtt", "device_id": device_id, "type": "pressed",
                         "subtype": "Button press", "metadata": {}}], triggers
        with main.subscribe({"type": "subscribe_trigger", "trigger": mqtt[0]}) as fired, \
                main.subscribe({"type": "subscribe_events", "event_type": "state_changed"}) as changes:
            for press in (1, 2):
                hub_ha.fire_event("demo_button_pressed")
                fired.wait_for(lambda _: True, 15, f"main's trigger to fire for press {press}", start=press - 1)
                _, changed = changes.wait_for(lambda e: e["data"]["entity_id"] == copy, 15, "main's event entity")
                assert changed["data"]["new_state"]["attributes"]["event_type"] == "pressed"
                changes.events.clear()
            assert fired.events[0]["variables"]["trigger"]["payload_json"]["event_type"] == "pressed"
            pressed_on_main = main.get_state(copy)["state"]  # type: ignore[index]  # the time of main's last event
            # The hub's agent dies and a new one publishes every config and state again: no press on main.
            cluster.kill("hub1")
            main.wait_for_state(copy, "unavailable", 30)
            cluster.agents["hub1"].start()
            main.wait_for_state(copy, lambda s: s is not None and s["state"] != "unavailable", 60)
            hub_ha.call_service("switch", "toggle", {"entity_id": "switch.ac"})  # published after all that
            main.wait_for_state("switch.test_ac", "on", 15)
            assert len(fired.events) == 2, fired.events
            assert main.get_state(copy)["state"] == pressed_on_main  # type: ignore[index]
