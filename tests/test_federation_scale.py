"""A hub with 1,000 exported entities, against two real Home Assistants on Mosquitto: the hub's HA with 1,000
input_boolean helpers (``bulk_helpers``: it starts as fast as without them), its MQTT discovery off (a hub
must not import its own exports), and a main HA with MQTT discovery. The agent exports all of them; main
creates 1,000 entities holding the hub's state, follows changes on the hub, and its commands come back.
How fast is measured by the benchmark (``python -m bench --only federation-ha``), not here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.footprint import cpu_seconds, rss_mib
from harness.agents import checked_cluster
from harness.brokers import MosquittoProcess
from harness.ha import StartHA, bulk_entity
from harness.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto, pytest.mark.timeout(300)]

ENTITIES = 1000


def test_a_hub_of_1000_entities_shows_them_all_on_main_and_follows_both_ways(
        start_ha: StartHA, mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str) -> None:
    (hub_ha,) = start_ha("hub", bulk_helpers=ENTITIES, mqtt_port=mosquitto.port, mqtt_discovery=False)
    (main,) = start_ha("main", mqtt_port=mosquitto.port)
    copies = {bulk_entity(i): f"switch.test_{bulk_entity(i).partition('.')[2]}" for i in range(ENTITIES)}

    def not_holding(state: str = "off") -> dict[str, Any]:
        on_main = {s["entity_id"]: s["state"] for s in main.states()}
        return {copy: on_main.get(copy) for copy in copies.values() if on_main.get(copy) != state}

    def all_holding() -> bool:
        try:
            return not not_holding()
        except OSError:  # main, creating 1,000 entities on a busy machine, may answer later than a request waits
            return False

    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        agent = cluster.add("hub1", log={"level": "INFO"}, sync={"enabled": False},
                            homeassistant={"url": hub_ha.url, "token": hub_ha.token},
                            federation={"include": {"entity_globs": ["input_boolean.bulk_*"]}})
        try:
            wait_until(all_holding, 120, f"main to hold all {ENTITIES} entities", step=1.0)
        except AssertionError:
            missing = not_holding()
            raise AssertionError(f"{len(missing)} not holding the hub's state on main, e.g. "
                                 f"{sorted(missing.items())[:5]}") from None
        print(f"\nagent exporting {ENTITIES}: RSS {rss_mib(agent.pid):.1f} MiB, "
              f"CPU {cpu_seconds(agent.pid):.2f} s since its start")
        assert agent.metric("hasync_federation_exported") == ENTITIES
        [registry] = main.websocket({"type": "config/entity_registry/list"})
        federated = [e for e in registry if e["unique_id"].startswith("hasync_fed_test_")]
        assert len(federated) == ENTITIES == len({e["unique_id"] for e in federated})
        assert {e["entity_id"] for e in federated} == set(copies.values())  # no _2 duplicates either

        changed = [bulk_entity(i) for i in (7, 500, ENTITIES - 1)]
        for entity in changed:
            hub_ha.call_service("input_boolean", "turn_on", {"entity_id": entity})
        for entity in changed:
            main.wait_for_state(copies[entity], "on", 15)
        commanded = [bulk_entity(i) for i in (1, 998)]
        for entity in commanded:
            main.call_service("switch", "turn_on", {"entity_id": copies[entity]})
        for entity in commanded:
            hub_ha.wait_for_state(entity, "on", 15)
            main.wait_for_state(copies[entity], "on", 15)
        assert agent.metric("hasync_federation_commands_total", result="done") == len(commanded)
        assert set(not_holding()) == {copies[e] for e in changed + commanded}  # and nothing else moved
