"""Entity sync between agents as real processes on real brokers (amqtt and Mosquitto), with the memory
backend: entities are set through each agent's HTTP API as a user would set them in HA.

Home Assistant itself is in test_ha_sync.py; these tests cover the bus: propagation, echoes, concurrent
changes, restarts, broker restarts and late joiners.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.agents import AgentProcess, Cluster, checked_cluster, wait_until
from harness.brokers import BrokerProcess

pytestmark = pytest.mark.integration

SYNC = {"sync": {"backend": "memory", "retry_interval": 1.0}}


@pytest.fixture
def cluster(broker: BrokerProcess, tmp_path: Path, topic_prefix: str) -> Iterator[Cluster]:
    with checked_cluster(tmp_path / "agents", broker.url, topic_prefix) as c:
        yield c


def put(agent: AgentProcess, values: dict[str, str]) -> None:
    body = json.dumps({e: {"state": v} for e, v in values.items()}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{agent.http_port}/sync/entities", body, method="PUT")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


def entities(agent: AgentProcess) -> dict[str, str]:
    code, body = agent.http("/sync/entities")
    return {e: v["state"] for e, v in json.loads(body).items()} if code == 200 else {}


def applied(agent: AgentProcess) -> list[dict[str, Any]]:
    code, body = agent.http("/sync/applied?after=0")
    assert code == 200
    result: list[dict[str, Any]] = json.loads(body)
    return result


def start(cluster: Cluster, *names: str) -> list[AgentProcess]:
    agents = [cluster.add(name, priority=100 - i, **SYNC) for i, name in enumerate(names)]
    for agent in agents:
        wait_until(lambda a=agent: (a.status().get("sync") or {}).get("synced"), 15, f"{agent.node} to sync")
    return agents


def converged(agents: list[AgentProcess], expected: dict[str, str]) -> bool:
    return all(all(entities(a).get(e) == v for e, v in expected.items()) for a in agents)


def settled(agent: AgentProcess) -> bool:
    sync = agent.status().get("sync") or {}
    return sync.get("pending") == 0 and sync.get("queued") == 0


def test_a_change_reaches_every_peer_exactly_once(cluster: Cluster) -> None:
    n1, n2, n3 = start(cluster, "n1", "n2", "n3")
    values = {f"input_number.level_{i}": str(i) for i in range(20)}
    put(n2, values)  # made on a standby, as in its HA's UI
    wait_until(lambda: converged([n1, n2, n3], values), 10, "every node to hold the values")
    wait_until(lambda: all(settled(a) for a in (n1, n2, n3)), 10, "every node to settle")
    # Nothing more happens: over a bounded window no node applies or publishes anything else.
    time.sleep(1.0)
    for peer in (n1, n3):
        assert sorted(e["entity_id"] for e in applied(peer)) == sorted(values)
        assert peer.metric("hasync_sync_records_published_total") == 0
    assert applied(n2) == []
    assert n2.metric("hasync_sync_records_published_total") == len(values)
    assert n2.metric("hasync_sync_local_changes_total") == len(values)


def test_concurrent_changes_of_one_entity_converge_everywhere(cluster: Cluster) -> None:
    n1, n2, n3 = start(cluster, "n1", "n2", "n3")
    ids = [f"input_select.mode_{i}" for i in range(30)]
    barrier = threading.Barrier(2)

    def writer(agent: AgentProcess, value: str) -> None:
        barrier.wait(timeout=10)
        for entity in ids:
            put(agent, {entity: value})

    threads = [threading.Thread(target=writer, args=(a, a.node)) for a in (n1, n2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    def agreed() -> dict[str, str] | None:
        views = [entities(a) for a in (n1, n2, n3)]
        if all(len(v) == len(ids) for v in views) and views[0] == views[1] == views[2]:
            return views[0]
        return None

    final = wait_until(agreed, 15, "the three nodes to agree on every entity")
    assert set(final.values()) <= {"n1", "n2"}
    wait_until(lambda: all(settled(a) for a in (n1, n2, n3)), 10, "every node to settle")
    assert agreed() == final  # and it stays that way


def test_a_restarted_agent_and_a_late_joiner_catch_up(cluster: Cluster) -> None:
    n1, n2, n3 = start(cluster, "n1", "n2", "n3")
    put(n1, {f"counter.c{i}": "0" for i in range(50)})
    wait_until(lambda: converged([n3], {"counter.c49": "0"}), 10, "n3 to hold the first values")
    n3.terminate()
    later = {f"counter.c{i}": str(i) for i in range(50)}
    put(n2, later)
    n3.start()
    n4 = cluster.add("n4", priority=10, **SYNC)
    wait_until(lambda: converged([n1, n2, n3, n4], later), 15, "the restarted and the new node to catch up")


def test_changes_made_while_the_broker_was_down_meet_after_it_returns(
    cluster: Cluster, broker: BrokerProcess
) -> None:
    """Neither broker here keeps retained messages across a restart: the agents put back what it lost, and
    what each node changed meanwhile reaches the others."""
    n1, n2, n3 = start(cluster, "n1", "n2", "n3")
    before = {f"input_boolean.b{i}": "off" for i in range(20)}
    put(n1, before)
    wait_until(lambda: converged([n1, n2, n3], before), 10, "the first values everywhere")
    broker.stop()
    wait_until(lambda: not any((a.status().get("sync") or {}).get("synced") for a in (n1, n2, n3)), 10,
               "the agents to notice the broker is gone")
    put(n1, {"input_boolean.b1": "on"})
    put(n3, {"input_boolean.b2": "on", "input_text.note": "made offline"})
    broker.start()
    after = {**before, "input_boolean.b1": "on", "input_boolean.b2": "on", "input_text.note": "made offline"}
    wait_until(lambda: converged([n1, n2, n3], after), 20, "every node to hold every change")
    n4 = cluster.add("n4", priority=10, **SYNC)
    wait_until(lambda: converged([n4], after), 15, "a new node to find everything retained again")


def test_the_http_api_rejects_bad_input_and_keeps_running(cluster: Cluster) -> None:
    [n1] = start(cluster, "n1")
    for body in (b"not json", b"[]", b'{"Light.x": {"state": "on"}}', b'{"light.x": {"state": 1}}'):
        request = urllib.request.Request(f"http://127.0.0.1:{n1.http_port}/sync/entities", body, method="PUT")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        info.value.close()
        assert info.value.code == 400
    put(n1, {"light.x": "on"})
    assert entities(n1) == {"light.x": "on"}
