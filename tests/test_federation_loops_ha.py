"""Federation with three real Home Assistants on one Mosquitto, every one of them reading the discovery prefix:
two hubs (clusters alpha and beta) that export to each other and to themselves, and a main.

One set of Home Assistants for all the asserts (each start costs seconds): the loops first (each hub's HA
makes MQTT copies of its own exports and of the other hub's; neither hub exports a copy; the self-check
warns), then an entity added, renamed and removed on a hub while it exports, as main sees it; then the
loops again, after all that traffic: finite counts, no duplicates, no `_2` entity ids."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from harness.agents import AgentProcess, TopicRecorder, checked_cluster
from harness.brokers import MosquittoProcess
from harness.ha import HomeAssistant, StartHA
from harness.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.timeout(300)]

GRACE = 8.0  # federation.removal_grace, shortened for the test
# The test HAs' YAML helpers, and the domains main's copies (MQTT entities) have on a hub that reads the
# prefix: selected too, so only the loop rule keeps them from being exported.
DOMAINS = ["input_boolean", "input_number", "input_select", "switch", "number", "select"]
HELPERS = {"switch": "test_flag", "number": "test_level", "select": "test_mode"}


def copies(cluster: str) -> set[str]:
    return {f"{component}.{cluster}_{name}" for component, name in HELPERS.items()}


def federated(ha: HomeAssistant) -> dict[str, str]:
    """The entities HA made from hasync's federation configs: entity id -> unique id."""
    [entries] = ha.websocket({"type": "config/entity_registry/list"})
    return {e["entity_id"]: e["unique_id"] for e in entries if str(e["unique_id"]).startswith("hasync_fed_")}


def configs(recorder: TopicRecorder) -> dict[str, list[str]]:
    """The configs the broker holds under each hasync node id (the last message on each topic, if not empty)."""
    last: dict[str, bytes] = {}
    for _, topic, payload in list(recorder.messages):
        last[topic] = payload
    held: dict[str, list[str]] = {}
    for topic, payload in sorted(last.items()):
        node = topic.split("/")[2]
        if payload and node.startswith("hasync_fed_"):
            held.setdefault(node, []).append(topic)
    return held


def hub(cluster: Any, name: str, ha: HomeAssistant) -> AgentProcess:
    agent: AgentProcess = cluster.add(f"{name}1", cluster=name, homeassistant={"url": ha.url, "token": ha.token},
                                      federation={"include": {"domains": DOMAINS}, "removal_grace": GRACE})
    return agent


def test_hubs_reading_their_own_and_each_other_s_exports_neither_loop_nor_duplicate_and_follow_their_registries(
        start_ha: StartHA, mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str) -> None:
    alpha_ha, beta_ha, main = start_ha("alpha", "beta", "main", mqtt_port=mosquitto.port)
    everywhere = copies("alpha") | copies("beta")
    with (TopicRecorder(mosquitto.url, "homeassistant/+/+/+/config") as recorder,
          checked_cluster(tmp_path / "alpha", mosquitto.url, topic_prefix) as alpha_cluster,
          checked_cluster(tmp_path / "beta", mosquitto.url, topic_prefix) as beta_cluster):
        alpha, beta = hub(alpha_cluster, "alpha", alpha_ha), hub(beta_cluster, "beta", beta_ha)
        for ha in (main, alpha_ha, beta_ha):  # each hub's HA has copies of both hubs' exports, as main has
            wait_until(lambda ha=ha: set(federated(ha)) == everywhere, 60, f"{ha.name}'s federated entities")
        for agent in (alpha, beta):
            wait_until(lambda agent=agent: agent.metric("hasync_federation_self_imported") == 3, 15,
                       f"{agent.node}'s self-check")
            assert agent.metric("hasync_federation_exported") == 3  # its helpers; no copy (MQTT) ever
            assert agent.status()["federation"]["self_imported"] == 3
        loops_hold(recorder, main, alpha_ha, beta_ha, alpha, beta)

        registry_changes(alpha_ha, main, alpha)

        time.sleep(3)  # after all that traffic (and any copy a loop would have made in between)
        loops_hold(recorder, main, alpha_ha, beta_ha, alpha, beta)
        for agent in (alpha, beta):
            assert agent.log().count("reads the discovery prefix") == 1  # one warning, not one per read


def loops_hold(recorder: TopicRecorder, main: HomeAssistant, alpha_ha: HomeAssistant, beta_ha: HomeAssistant,
               alpha: AgentProcess, beta: AgentProcess) -> None:
    everywhere = copies("alpha") | copies("beta")
    held = configs(recorder)  # one config per export under each hub's node id, and no others
    assert sorted(held) == ["hasync_fed_alpha", "hasync_fed_beta"], held
    for topics in held.values():
        assert sorted(t.split("/")[1] for t in topics) == sorted(HELPERS), topics
    for ha in (main, alpha_ha, beta_ha):
        assert set(federated(ha)) == everywhere, ha.name
        assert not [s["entity_id"] for s in ha.states() if s["entity_id"].endswith("_2")], ha.name
    for agent in (alpha, beta):
        assert agent.metric("hasync_federation_exported") == 3


def registry_changes(hub_ha: HomeAssistant, main: HomeAssistant, agent: AgentProcess) -> None:
    """A helper created on the hub appears on main; renamed on the hub, it keeps main's entity id and unique id,
    and state and commands follow the new entity id; deleted, it is unavailable on main at once and deleted
    there only after the grace."""
    hub_ha.websocket({"type": "input_boolean/create", "name": "Garage"})
    main.wait_for_state("switch.alpha_garage", "off", 15)
    unique_id = federated(main)["switch.alpha_garage"]

    hub_ha.websocket({"type": "config/entity_registry/update", "entity_id": "input_boolean.garage",
                      "new_entity_id": "input_boolean.garage_door"})
    hub_ha.wait_for_state("input_boolean.garage_door", "off", 10)
    time.sleep(1.5)  # the exporter's debounced read of the registry
    hub_ha.call_service("input_boolean", "turn_on", {"entity_id": "input_boolean.garage_door"})
    main.wait_for_state("switch.alpha_garage", "on", 10)
    main.call_service("switch", "turn_off", {"entity_id": "switch.alpha_garage"})
    hub_ha.wait_for_state("input_boolean.garage_door", "off", 10)
    assert federated(main)["switch.alpha_garage"] == unique_id
    assert "switch.alpha_garage_door" not in federated(main)

    removed = time.monotonic()
    hub_ha.websocket({"type": "input_boolean/delete", "input_boolean_id": "garage"})
    main.wait_for_state("switch.alpha_garage", "unavailable", 10)
    assert "switch.alpha_garage" in federated(main)  # unavailable, not deleted
    wait_until(lambda: "switch.alpha_garage" not in federated(main), GRACE + 20, "main to delete it")
    assert time.monotonic() - removed >= GRACE
    assert agent.metric("hasync_federation_cleared_total") == 1
