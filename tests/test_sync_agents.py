"""Entity sync between agents as real processes on real brokers (amqtt and Mosquitto), with the memory
backend set through each agent's HTTP API as a user would set helpers in HA: the real broker's delivery and
the HTTP API. Conflicts, restarts, late joiners and a broker that goes away run in-process in
test_sync_inprocess.py; Home Assistant itself is in test_ha_sync.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agents import AgentProcess, Cluster, checked_cluster
from harness.brokers import BrokerProcess
from harness.wait import wait_until

pytestmark = pytest.mark.integration

SYNC = {"sync": {"backend": "memory", "retry_interval": 1.0}}


@pytest.fixture
def cluster(broker: BrokerProcess, tmp_path: Path, topic_prefix: str) -> Iterator[Cluster]:
    with checked_cluster(tmp_path / "agents", broker.url, topic_prefix) as c:
        yield c


def start(cluster: Cluster, *names: str) -> list[AgentProcess]:
    agents = [cluster.add(name, priority=100 - i, **SYNC) for i, name in enumerate(names)]
    for agent in agents:
        wait_until(lambda a=agent: (a.status().get("sync") or {}).get("synced"), 15, f"{agent.node} to sync")
    return agents


def settled(agent: AgentProcess) -> bool:
    sync = agent.status().get("sync") or {}
    return sync.get("pending") == 0 and sync.get("queued") == 0


def test_a_change_reaches_every_peer_exactly_once(cluster: Cluster) -> None:
    n1, n2, n3 = start(cluster, "n1", "n2", "n3")
    values = {f"input_number.level_{i}": str(i) for i in range(20)}
    apis = {a.node: a.memory() for a in (n1, n2, n3)}
    try:
        apis["n2"].put(values)  # made on a standby, as in its HA's UI
        wait_until(lambda: all(api.entities() == values for api in apis.values()), 10,
                   "every node to hold the values")
        wait_until(lambda: all(settled(a) for a in (n1, n2, n3)), 10, "every node to settle")
        # Nothing more happens: over a bounded window no node applies or publishes anything else.
        time.sleep(1.0)
        for peer in ("n1", "n3"):
            assert sorted(e["entity_id"] for e in apis[peer].all_applied()) == sorted(values)
            assert cluster.agents[peer].metric("hasync_sync_records_published_total") == 0
        assert apis["n2"].all_applied() == []
        assert n2.metric("hasync_sync_records_published_total") == len(values)
        assert n2.metric("hasync_sync_local_changes_total") == len(values)
    finally:
        for api in apis.values():
            api.close()


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_the_http_api_rejects_bad_input_and_keeps_running(cluster: Cluster) -> None:
    [n1] = start(cluster, "n1")
    with n1.memory() as api:
        for body in (b"not json", b"[]", b'{"Light.x": {"state": "on"}}', b'{"light.x": {"state": 1}}'):
            status, _ = api.raw("PUT", "/sync/entities", body)
            assert status == 400, body
        assert api.raw("DELETE", "/sync/entities/light.nothing")[0] == 404
        assert api.raw("GET", "/sync/applied?after=x")[0] == 400
        api.put({"light.x": "on"})
        assert api.entities() == {"light.x": "on"}
