"""Two real Home Assistant instances, an agent beside each, Mosquitto: what each HA shows as primary.

Each agent's node id is its HA instance's name (``ha_a``, ``ha_b``), and each HA looks at its own
node's ``binary_sensor.hasync_test_<node>_primary`` (the condition users add to their automations).
Timestamps from HA (``last_changed``) and from the agents' event logs are both wall clock on this one
machine, so their order can be compared.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from harness.agents import Cluster, checked_cluster, wait_until
from harness.brokers import MosquittoProcess
from harness.ha import GATED_EVENT, HomeAssistant, StartHA

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

A, B = "ha_a", "ha_b"

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
    ha_a, ha_b = start_ha(A, B, mqtt_port=mosquitto.port)
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        cluster.add(A, priority=200, **HA_SETTINGS)
        cluster.add(B, priority=100, **HA_SETTINGS)
        cluster.wait_for_leader(timeout=15)
        wait_until(lambda: cluster.current_leader() == A, 15, "ha_a (the better priority) to lead")
        ha_a.wait_for_state(primary(A), "on", timeout=20)
        ha_b.wait_for_state(primary(B), "off", timeout=20)
        yield cluster, {A: ha_a, B: ha_b}


def test_exactly_one_home_assistant_shows_its_node_as_primary(pair: tuple[Cluster, dict[str, HomeAssistant]]) -> None:
    _, ha = pair
    for _ in range(6):  # over a few renewals, never both
        states = {n: ha[n].get_state(primary(n)) for n in (A, B)}
        assert [n for n, s in states.items() if s and s["state"] == "on"] == [A]
        time.sleep(0.5)
    # Both HAs see both devices (one broker), with the same answer.
    assert ha[A].get_state(primary(B))["state"] == "off"  # type: ignore[index]
    assert ha[B].get_state(primary(A))["state"] == "on"  # type: ignore[index]
    role = ha[A].get_state(f"sensor.hasync_test_{A}_role")
    assert role is not None and role["state"] == "primary"


def test_kill9_of_the_primary_agent_moves_primary_to_the_other_home_assistant(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = pair
    cluster.kill(A)
    ha[A].wait_for_state(primary(A), "unavailable", timeout=10)
    ha[B].wait_for_state(primary(B), "on", timeout=15)
    assert ha[A].get_state(primary(A))["state"] == "unavailable"  # type: ignore[index]


def test_sigstop_primary_goes_unavailable_in_its_home_assistant_before_the_other_is_elected(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = pair
    agent = cluster.agents[A]
    agent.signal(signal.SIGSTOP)
    try:
        ha[A].wait_for_state(primary(A), "unavailable", timeout=10)  # expire_after: the agent is silent
        ha[B].wait_for_state(primary(B), "on", timeout=15)
        fenced = changed_at(ha[A], primary(A))
        promoted = [e for e in cluster.agents[B].events() if e["event"] == "promote"][-1]["wall"]
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
    ha[A].call_service("button", "press", {"entity_id": f"button.hasync_test_{A}_step_down"})
    assert cluster.wait_for_leader(timeout=10, after=t0, exclude=A) == B
    demote = [e for e in cluster.agents[A].events() if e["event"] == "demote"][-1]
    assert demote["reason"] == "step-down requested"
    # a has the better priority, but it stepped down (for an update, say): it stays away...
    time.sleep(HA_SETTINGS["election"]["preempt_delay"] + 2.5)
    assert cluster.current_leader() == B
    # ...until its resume button is pressed: then it takes over again.
    ha[A].call_service("button", "press", {"entity_id": f"button.hasync_test_{A}_resume"})
    assert cluster.wait_for_leader(timeout=10, after=t0, exclude=B) == A
    ha[A].wait_for_state(primary(A), "on", timeout=10)
    # ...unless its maintenance switch is on: it hands over and stays away.
    t1 = time.monotonic()
    ha[A].call_service("switch", "turn_on", {"entity_id": f"switch.hasync_test_{A}_maintenance"})
    assert cluster.wait_for_leader(timeout=10, after=t1, exclude=A) == B
    ha[A].wait_for_state(f"switch.hasync_test_{A}_maintenance", "on", timeout=10)
    ha[B].wait_for_state(primary(B), "on", timeout=10)
    time.sleep(HA_SETTINGS["election"]["preempt_delay"] + 2.5)  # longer than the preempt delay
    assert cluster.current_leader() == B
    t2 = time.monotonic()
    ha[A].call_service("switch", "turn_off", {"entity_id": f"switch.hasync_test_{A}_maintenance"})
    assert cluster.wait_for_leader(timeout=15, after=t2) == A
    ha[A].wait_for_state(primary(A), "on", timeout=10)


def test_a_trigger_reaching_both_instances_runs_the_gated_automation_once(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    """The seed's problem: a button press reaches both instances; the flowers must be watered once."""
    cluster, ha = pair

    def total() -> int:
        return sum(int(ha[n].get_state("counter.gated_presses")["state"]) for n in (A, B))  # type: ignore[index]

    for expected in (1, 2, 3):
        for n in (A, B):
            ha[n].fire_event(GATED_EVENT, {})
        wait_until(lambda e=expected: total() >= e, 10, f"{expected} gated presses in total")  # type: ignore[misc]
        assert total() == expected
    assert ha[A].get_state("counter.gated_presses")["state"] == "3"  # type: ignore[index]
    # Right after a failover: the new primary's instance runs it, still exactly once per trigger.
    cluster.kill(A)
    ha[B].wait_for_state(primary(B), "on", timeout=15)
    for expected in (4, 5):
        for n in (A, B):
            ha[n].fire_event(GATED_EVENT, {})
        wait_until(lambda e=expected: total() >= e, 10, f"{expected} gated presses in total")  # type: ignore[misc]
        assert total() == expected
    assert ha[B].get_state("counter.gated_presses")["state"] == "2"  # type: ignore[index]


@pytest.fixture
def linked_pair(
    mosquitto: MosquittoProcess, start_ha: StartHA, tmp_path: Path, topic_prefix: str
) -> Iterator[tuple[Cluster, dict[str, HomeAssistant]]]:
    """Like ``pair``, but each agent also watches its own HA (URL and token) and manages its automations,
    leaving automation.count_test_presses to run everywhere."""
    ha_a, ha_b = start_ha(A, B, mqtt_port=mosquitto.port)
    ha = {A: ha_a, B: ha_b}
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        for node, priority in ((A, 200), (B, 100)):
            cluster.add(node, priority=priority, election=HA_SETTINGS["election"], homeassistant={
                "discovery": True, "url": ha[node].url, "token": ha[node].token,
                "managed_automations": True, "run_everywhere": ["automation.count_test_presses"],
            })
        cluster.wait_for_leader(timeout=20)
        wait_until(lambda: cluster.current_leader() == A, 20, "ha_a (the better priority) to lead")
        yield cluster, ha


GATED = "automation.count_gated_presses_primary_only"
EVERYWHERE = "automation.count_test_presses"


def test_managed_mode_keeps_automations_on_only_on_the_primary_across_failovers(
    linked_pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = linked_pair
    ha[A].wait_for_state(GATED, "on", timeout=15)
    ha[B].wait_for_state(GATED, "off", timeout=15)
    assert ha[B].get_state(EVERYWHERE)["state"] == "on"  # type: ignore[index]  # run_everywhere: left alone
    # Graceful handover: a turns its automations off, then b turns its own on.
    t0 = time.monotonic()
    ha[A].call_service("button", "press", {"entity_id": f"button.hasync_test_{A}_step_down"})
    assert cluster.wait_for_leader(timeout=10, after=t0, exclude=A) == B
    ha[B].wait_for_state(GATED, "on", timeout=15)
    ha[A].wait_for_state(GATED, "off", timeout=15)
    # ...and back (a resumes and preempts), then a crash of a's agent: b turns its automations on again.
    ha[A].call_service("button", "press", {"entity_id": f"button.hasync_test_{A}_resume"})
    assert cluster.wait_for_leader(timeout=15, after=t0, exclude=B) == A
    ha[A].wait_for_state(GATED, "on", timeout=15)
    ha[B].wait_for_state(GATED, "off", timeout=15)
    cluster.kill(A)
    ha[B].wait_for_state(GATED, "on", timeout=15)
    assert ha[A].get_state(EVERYWHERE)["state"] == "on"  # type: ignore[index]


def test_stopping_the_primarys_home_assistant_moves_leadership(
    linked_pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = linked_pair
    wait_until(lambda: cluster.agents[B].status().get("eligible"), 15, "ha_b to be eligible")
    t0 = time.monotonic()
    ha[A].stop()
    assert cluster.wait_for_leader(timeout=20, after=t0) == B
    demote = [e for e in cluster.agents[A].events() if e["event"] == "demote"][-1]
    assert demote["reason"].startswith("unhealthy") and "Home Assistant" in demote["reason"]
    status = cluster.agents[A].status()
    assert status["eligible"] is False and status["home_assistant"]["healthy"] is False
    ha[B].wait_for_state(primary(B), "on", timeout=10)


def test_home_assistant_restart_gets_discovery_and_state_again(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    cluster, ha = pair
    ha[B].stop()
    ha[B].start()
    wait_until(lambda: "Home Assistant came online" in cluster.agents[B].log(), 15,
               "ha_b's agent to see HA's birth message")
    ha[B].wait_for_state(primary(B), "off", timeout=15)
    ha[B].wait_for_state(primary(A), "on", timeout=15)


def test_decommissioned_node_disappears_from_home_assistant(
    pair: tuple[Cluster, dict[str, HomeAssistant]],
) -> None:
    import subprocess
    import sys

    cluster, ha = pair
    assert cluster.agents[B].terminate() == 0
    result = subprocess.run(
        [sys.executable, "-m", "hasync", "decommission", "--broker", cluster.broker_url, "--cluster", "test",
         "--topic-prefix", cluster.prefix, "--node", B],
        capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    for entity in (primary(B), f"sensor.hasync_test_{B}_role", f"switch.hasync_test_{B}_maintenance"):
        wait_until(lambda e=entity: ha[A].get_state(e) is None, 15, f"{entity} to be removed")  # type: ignore[misc]
    assert ha[A].get_state(primary(A)) is not None  # the other node is untouched


def test_a_wrong_token_is_reported_and_keeps_the_node_out(
    mosquitto: MosquittoProcess, start_ha: StartHA, tmp_path: Path, topic_prefix: str
) -> None:
    import json
    import subprocess
    import sys

    [ha_a] = start_ha(A, mqtt_port=mosquitto.port)
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        agent = cluster.add(A, election=HA_SETTINGS["election"], homeassistant={
            "discovery": True, "url": ha_a.url, "token": "not-a-valid-token"})
        wait_until(lambda: "token" in (agent.status().get("home_assistant") or {}).get("detail", ""), 15,
                   "/healthz to report the rejected token")
        assert agent.status()["eligible"] is False
        assert "Home Assistant" in agent.status()["health_detail"]
        out = subprocess.run(
            [sys.executable, "-m", "hasync", "status", "--json", "--broker", cluster.broker_url, "--cluster", "test",
             "--topic-prefix", cluster.prefix], capture_output=True, text=True, timeout=30, check=True).stdout
        [node] = json.loads(out)["nodes"]
        assert node["checks"] == {"home-assistant": False} and node["healthy"] is False
        time.sleep(HA_SETTINGS["election"]["lease_duration"] + 1)  # the only node, but not eligible: no primary
        assert not agent.promotions()
        assert "rejected the access token" in agent.log()
