"""Two real Home Assistant instances, an agent beside each, Mosquitto: what each HA shows as primary.

Each HA looks at its own node's ``binary_sensor.hasync_test_<node>_primary`` (the condition users add
to their automations). Timestamps from HA (``last_changed``) and from the agents' event logs are both
wall clock on this one machine, so their order can be compared.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from agents import Cluster, checked_cluster, wait_until
from brokers import MosquittoProcess
from ha import HomeAssistant, StartHA

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

# Discovery needs renew_deadline > 1 s (HA's expire_after is whole seconds and must be shorter).
HA_SETTINGS = {
    "election": {"lease_duration": 2.5, "renew_deadline": 2.0, "renew_interval": 0.5, "heartbeat_interval": 1.0,
                 "claim_stagger": 0.1, "preempt_delay": 1.0},
    "homeassistant": {"discovery": True},
}


def primary(node: str) -> str:
    return f"binary_sensor.hasync_test_{node}_primary"


def changed_at(ha: HomeAssistant, entity: str) -> float:
    state = ha.get_state(entity)
    assert state is not None
    return datetime.fromisoformat(state["last_changed"]).timestamp()


@pytest.fixture
def pair(
    mosquitto: MosquittoProcess, start_ha: StartHA, tmp_path: Path, topic_prefix: str
) -> Iterator[tuple[Cluster, dict[str, HomeAssistant]]]:
    ha_a, ha_b = start_ha("ha_a", "ha_b", mqtt_port=mosquitto.port)
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        cluster.add("a", priority=200, **HA_SETTINGS)
        cluster.add("b", priority=100, **HA_SETTINGS)
        cluster.wait_for_leader(timeout=15)
        wait_until(lambda: cluster.current_leader() == "a", 15, "a (the better priority) to lead")
        ha_a.wait_for_state(primary("a"), "on", timeout=20)
        ha_b.wait_for_state(primary("b"), "off", timeout=20)
        yield cluster, {"a": ha_a, "b": ha_b}


def test_exactly_one_home_assistant_shows_its_node_as_primary(pair: tuple[Cluster, dict[str, HomeAssistant]]) -> None:
    _, ha = pair
    for _ in range(6):  # over a few renewals, never both
        states = {n: ha[n].get_state(primary(n)) for n in ("a", "b")}
        assert [n for n, s in states.items() if s and s["state"] == "on"] == ["a"]
        time.sleep(0.5)
    # Both HAs see both devices (one broker), with the same answer.
    assert ha["a"].get_state(primary("b"))["state"] == "off"  # type: ignore[index]
    assert ha["b"].get_state(primary("a"))["state"] == "on"  # type: ignore[index]
    role = ha["a"].get_state("sensor.hasync_test_a_role")
    assert role is not None and role["state"] == "primary"


def test_kill9_of_the_primary_agent_moves_primary_to_the_other_home_assistant(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = pair
    cluster.kill("a")
    ha["a"].wait_for_state(primary("a"), "unavailable", timeout=10)
    ha["b"].wait_for_state(primary("b"), "on", timeout=15)
    assert ha["a"].get_state(primary("a"))["state"] == "unavailable"  # type: ignore[index]


def test_sigstop_primary_goes_unavailable_in_its_home_assistant_before_the_other_is_elected(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = pair
    agent = cluster.agents["a"]
    agent.signal(signal.SIGSTOP)
    try:
        ha["a"].wait_for_state(primary("a"), "unavailable", timeout=10)  # expire_after: the agent is silent
        ha["b"].wait_for_state(primary("b"), "on", timeout=15)
        fenced = changed_at(ha["a"], primary("a"))
        promoted = [e for e in cluster.agents["b"].events() if e["event"] == "promote"][-1]["wall"]
        assert fenced < promoted, f"HA A still showed a as primary {fenced - promoted:.3f} s after b was elected"
    finally:
        agent.signal(signal.SIGCONT)
    demote = wait_until(lambda: [e for e in agent.events() if e["event"] == "demote"], 10, "a to log its demotion")
    assert demote[-1]["acting_until"] <= cluster.leaders_since(0)[-1]["t"]


def test_step_down_button_and_maintenance_switch_in_home_assistant(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = pair
    t0 = time.monotonic()
    ha["a"].call_service("button", "press", {"entity_id": "button.hasync_test_a_step_down"})
    assert cluster.wait_for_leader(timeout=10, after=t0, exclude="a") == "b"
    demote = [e for e in cluster.agents["a"].events() if e["event"] == "demote"][-1]
    assert demote["reason"] == "step-down requested"
    # a has the better priority: it takes over again after the preempt delay...
    assert cluster.wait_for_leader(timeout=10, after=t0, exclude="b") == "a"
    ha["a"].wait_for_state(primary("a"), "on", timeout=10)
    # ...unless its maintenance switch is on: it hands over and stays away.
    t1 = time.monotonic()
    ha["a"].call_service("switch", "turn_on", {"entity_id": "switch.hasync_test_a_maintenance"})
    assert cluster.wait_for_leader(timeout=10, after=t1, exclude="a") == "b"
    ha["a"].wait_for_state("switch.hasync_test_a_maintenance", "on", timeout=10)
    ha["b"].wait_for_state(primary("b"), "on", timeout=10)
    time.sleep(HA_SETTINGS["election"]["preempt_delay"] + 2.5)  # longer than the preempt delay
    assert cluster.current_leader() == "b"
    t2 = time.monotonic()
    ha["a"].call_service("switch", "turn_off", {"entity_id": "switch.hasync_test_a_maintenance"})
    assert cluster.wait_for_leader(timeout=15, after=t2) == "a"
    ha["a"].wait_for_state(primary("a"), "on", timeout=10)
