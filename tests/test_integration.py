"""Agents as real processes on real brokers (amqtt and Mosquitto): faults, and the invariants after each.

Timing settings are the fast ones in agents.FAST_ELECTION (lease 1.5 s, renew deadline 1 s).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agents import FAST_ELECTION, Cluster, LeaseRecorder, checked_cluster, wait_until
from harness.brokers import BrokerProcess
from hasync.config import BrokerConfig
from hasync.messages import LeaseRecord
from hasync.mqtt import connect
from hasync.status import ClusterView, snapshot
from hasync.topics import Topics

pytestmark = pytest.mark.integration

LEASE = FAST_ELECTION["lease_duration"]
DEADLINE = FAST_ELECTION["renew_deadline"]
# A crashed or hung leader is replaced within: the lease, the stagger for two better-ranked nodes,
# a claim round trip, and scheduling slack on a loaded two-core machine.
FAILOVER_BOUND = LEASE + 2 * FAST_ELECTION["claim_stagger"] + 2.0


@pytest.fixture
def cluster(broker: BrokerProcess, tmp_path: Path, topic_prefix: str) -> Iterator[Cluster]:
    with checked_cluster(tmp_path / "agents", broker.url, topic_prefix) as c:
        yield c


def three(cluster: Cluster, **settings: object) -> str:
    for i, prio in ((1, 100), (2, 90), (3, 80)):
        cluster.add(f"n{i}", priority=prio, **settings)
    first = cluster.wait_for_leader(timeout=15)
    # Settled: with preemption the best node leads (it takes over within preempt_delay if another won
    # the start-up race), and every agent has finished observing.
    leader = first if settings.get("preempt") is False else "n1"
    wait_until(lambda: cluster.current_leader() == leader, 15, f"{leader} to lead")
    wait_until(lambda: all(a.status().get("role") in ("standby", "primary") for a in cluster.agents.values()),
               10, "every agent to finish observing")
    return leader


def publish(broker: BrokerProcess, topic: str, payload: bytes, retain: bool = False) -> None:
    async def go() -> None:
        async with connect(BrokerConfig(url=broker.url), f"test-{time.monotonic_ns()}") as session:
            await session.publish(topic, payload, retain=retain)

    asyncio.run(go())


def test_one_leader_then_kill9_failover(cluster: Cluster) -> None:
    leader = three(cluster)
    assert cluster.current_leader() == leader
    assert cluster.agents[leader].http("/role")[0] == 200
    for name, agent in cluster.agents.items():
        if name != leader:
            assert agent.http("/role")[0] == 503
    t_kill = cluster.kill(leader)
    new = cluster.wait_for_leader(timeout=FAILOVER_BOUND + 2, after=t_kill, exclude=leader)
    t_new = cluster.leaders_since(t_kill)[0]["t"]
    assert new != leader
    assert t_new - t_kill < FAILOVER_BOUND, f"failover took {t_new - t_kill:.2f} s"
    assert cluster.agents[new].http("/role")[0] == 200


def test_sigstop_leader_steps_down_and_stays_down_on_wake(cluster: Cluster) -> None:
    # Without preemption, so that the woken (highest-priority) node has no legitimate way back.
    leader = three(cluster, preempt=False)
    old = cluster.agents[leader]
    recorder = LeaseRecorder(cluster.broker_url, cluster.prefix)
    old_term = cluster.leaders_since(0)[-1]["term"]
    t_stop = time.monotonic()
    old.signal(signal.SIGSTOP)
    try:
        new = cluster.wait_for_leader(timeout=FAILOVER_BOUND + 4, after=t_stop, exclude=leader)
        t_new = cluster.leaders_since(t_stop)[0]["t"]
        # The frozen leader's lease ran out before the new one started (its deadline is in its log
        # when it wakes; the invariant check compares it with the new tenure).
        time.sleep(0.3)  # keep it frozen a little past the new election: the interesting wake-up
    finally:
        t_cont = time.monotonic()
        old.signal(signal.SIGCONT)
    demote = wait_until(lambda: [e for e in old.events() if e["event"] == "demote"], 10,
                        "the woken leader to record its demotion")[-1]
    assert demote["acting_until"] <= t_new, (demote, t_new)
    # Awake again, it must not win anything with its stale term; the new leader keeps the lease.
    time.sleep(LEASE)  # a full lease: any stale renewal of the old term would have been acted on by now
    assert cluster.current_leader() == new
    assert not old.promotions(after=t_stop)
    assert old.metric("hasync_is_primary") == 0
    # Woken, it published nothing for its stale term (a packet already in its socket buffer at the
    # freeze may leave at the instant it wakes; nothing after that).
    recorder.close()
    stale = [r for t, r in recorder.records if r.holder == leader and r.term == old_term and t > t_cont + 0.2]
    assert not stale, stale
    assert any(r.holder == new for _, r in recorder.records)  # the recorder did see the lease stream


def test_sigterm_hands_over_gracefully(cluster: Cluster) -> None:
    leader = three(cluster)
    t0 = time.monotonic()
    assert cluster.agents[leader].terminate() == 0
    new = cluster.wait_for_leader(timeout=3, after=t0, exclude=leader)
    t_new = cluster.leaders_since(t0)[0]["t"]
    demote = [e for e in cluster.agents[leader].events() if e["event"] == "demote"][-1]
    assert demote["reason"] == "shutdown"
    assert demote["acting_until"] <= t_new
    # A handover does not wait for the lease to expire.
    assert t_new - t0 < DEADLINE, f"handover took {t_new - t0:.2f} s"
    assert new != leader


def test_step_down_command_hands_over(cluster: Cluster) -> None:
    leader = three(cluster)
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "hasync", "step-down", "--broker", cluster.broker_url, "--cluster", "test",
         "--topic-prefix", cluster.prefix, "--node", leader],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 0, result.stderr
    new = cluster.wait_for_leader(timeout=5, after=t0, exclude=leader)
    assert new != leader


def test_broker_restart_elects_one_leader(cluster: Cluster, broker: BrokerProcess) -> None:
    leader = three(cluster)
    t0 = time.monotonic()
    broker.restart()
    # Every agent reconnects; the leader lost its connection, so it demoted; one leader again.
    wait_until(lambda: [e for e in cluster.agents[leader].events() if e["event"] == "demote"
                        and e["t"] > t0], 10, "the leader to demote on losing the broker")
    cluster.wait_for_leader(timeout=LEASE * 2 + 10, after=t0)
    wait_until(cluster.current_leader, 5, "exactly one acting primary")


def test_hung_broker_primary_stops_at_its_own_deadline(cluster: Cluster, broker: BrokerProcess) -> None:
    """With the broker frozen, nothing arrives and nothing is refused: only the primary's own renew
    deadline can stop it. It must, within renew_deadline of its last echoed renewal."""
    leader = three(cluster)
    t_pause = time.monotonic()
    broker.pause()
    try:
        demote = wait_until(lambda: [e for e in cluster.agents[leader].events()
                                     if e["event"] == "demote" and e["t"] > t_pause], DEADLINE + 3,
                            "the primary to demote on its own")[0]
        assert demote["reason"].startswith("renew deadline passed")
        # Its last echo came at most a renew interval before the pause.
        assert demote["acting_until"] <= t_pause + DEADLINE
        assert cluster.agents[leader].http("/role")[0] == 503
        assert not cluster.leaders_since(t_pause)  # nobody else can be elected without a broker
    finally:
        broker.resume()
    cluster.wait_for_leader(timeout=LEASE * 2 + 10, after=t_pause)


def test_replayed_old_renewal_and_rogue_old_claim_are_ignored(cluster: Cluster, broker: BrokerProcess) -> None:
    # Without preemption: the leadership must stay where the handover put it, whoever that is.
    leader = three(cluster, preempt=False)
    agent = cluster.agents[leader]
    t0 = time.monotonic()
    # Force a later term first, so there is an old term to replay: hand over twice.
    agent.signal(signal.SIGTERM)
    second = cluster.wait_for_leader(timeout=5, after=t0, exclude=leader)
    term = cluster.leaders_since(t0)[0]["term"]
    assert term >= 2
    topics = Topics(cluster.prefix, "test")
    base = {"holder": leader, "incarnation": "old", "conn": 1, "lease_ms": 1500, "sent_at": 0.0}
    stale = LeaseRecord.model_validate({**base, "kind": "renew", "term": term - 1, "seq": 999})
    rogue = LeaseRecord.model_validate(
        {**base, "holder": "rogue", "kind": "claim", "term": term - 1, "seq": 0, "prev_term": term - 2,
         "prev_seq": 0})
    others = [a for n, a in cluster.agents.items() if n != leader]
    before = sum(a.metric("hasync_lease_records_ignored_total") for a in others)
    t1 = time.monotonic()
    publish(broker, topics.lease, stale.to_payload(), retain=True)
    publish(broker, topics.lease, rogue.to_payload())
    wait_until(lambda: sum(a.metric("hasync_lease_records_ignored_total") for a in others) >= before + 4,
               5, "both stale records to be ignored by both remaining agents")
    time.sleep(LEASE)  # a lease later, nothing changed
    assert cluster.current_leader() == second
    assert not cluster.leaders_since(t1)


@pytest.mark.parametrize("kind", ["lease", "heartbeat", "command", "leader"])
def test_malformed_messages_are_dropped_and_counted(cluster: Cluster, broker: BrokerProcess, kind: str) -> None:
    leader = three(cluster)
    topics = Topics(cluster.prefix, "test")
    topic = {
        "lease": topics.lease,
        "heartbeat": topics.heartbeat("n2"),
        "command": topics.command(leader),
        "leader": topics.leader,
    }[kind]
    garbage = [
        b"not json",
        b"\xff\xfe\x00 binary",
        json.dumps({"v": 2, "kind": "renew"}).encode(),
        json.dumps({"v": 1, "kind": "renew", "term": "x"}).encode(),
        b"{" + b" " * 20000 + b"}",
        b"[]",
        json.dumps({"v": 1, "command": "format_disk"}).encode(),
    ]
    t0 = time.monotonic()
    for payload in garbage:
        publish(broker, topic, payload)
    if kind == "leader":
        # Agents do not consume the leader topic; it must simply not disturb anything.
        time.sleep(0.5)
    else:
        target = cluster.agents[leader] if kind == "command" else cluster.agents["n1" if kind != "heartbeat" else "n3"]
        label = {"lease": "lease", "heartbeat": "heartbeat", "command": "command"}[kind]
        wait_until(lambda: target.metric("hasync_messages_dropped_total", topic=label) >= len(garbage), 5,
                   f"{len(garbage)} dropped messages counted on the {label} topic")
        reasons = {r for r in ("invalid", "oversized", "wrong_version")
                   if target.metric("hasync_messages_dropped_total", topic=label, reason=r) > 0}
        assert reasons == {"invalid", "oversized", "wrong_version"}
    assert all(a.alive for a in cluster.agents.values())
    assert cluster.current_leader() == leader
    assert not cluster.leaders_since(t0)


def test_status_cli_shows_one_primary(cluster: Cluster) -> None:
    leader = three(cluster)
    out = subprocess.run(
        [sys.executable, "-m", "hasync", "status", "--json", "--broker", cluster.broker_url, "--cluster", "test",
         "--topic-prefix", cluster.prefix],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    data = json.loads(out)
    roles = {n["node"]: n["role"] for n in data["nodes"]}
    assert roles[leader] == "primary"
    assert sorted(r for n, r in roles.items() if n != leader) == ["standby", "standby"]
    assert data["leader"] == leader
    table = subprocess.run(
        [sys.executable, "-m", "hasync", "status", "--broker", cluster.broker_url, "--cluster", "test",
         "--topic-prefix", cluster.prefix],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert f"primary: {leader}" in table


def test_status_view_reports_offline_after_kill(cluster: Cluster, broker: BrokerProcess) -> None:
    leader = three(cluster)
    cluster.kill(leader)
    cluster.wait_for_leader(timeout=FAILOVER_BOUND + 2, after=cluster.deaths[leader], exclude=leader)

    async def look() -> ClusterView:
        return await snapshot(BrokerConfig(url=broker.url), Topics(cluster.prefix, "test"), 1.0)

    view = asyncio.run(look())
    assert leader in view.nodes
    now = time.monotonic()
    assert len(view.primaries(now)) == 1 and view.primaries(now)[0] != leader
    assert view.rows(now)[0]["role"] in ("offline", "unknown")  # n1, the killed leader


@pytest.mark.parametrize("mosquitto", [{"persistence": True, "extra_config": ["autosave_interval 3600"]}],
                         indirect=True)
def test_crashed_mosquitto_restoring_an_old_lease_does_not_lower_terms(
    mosquitto: BrokerProcess, tmp_path: Path, topic_prefix: str
) -> None:
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        leader = three(cluster)
        mosquitto.restart()  # a graceful stop saves the database: it now holds this term's lease
        cluster.wait_for_leader(timeout=15, after=time.monotonic())
        wait_until(lambda: cluster.current_leader() == leader, 15, "the cluster to settle again")
        # Two handovers move the cluster two terms past what the broker saved.
        for _ in range(2):
            current = wait_until(cluster.current_leader, 10, "an acting primary")
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "hasync", "step-down", "--broker", cluster.broker_url,
                            "--cluster", "test", "--topic-prefix", cluster.prefix, "--node", current],
                           capture_output=True, timeout=30, check=True)
            cluster.wait_for_leader(timeout=10, after=t0, exclude=current)
        before = max(e["term"] for e in cluster.all_events() if e["event"] == "promote")
        t_crash = time.monotonic()
        mosquitto.kill()  # no save: on restart it restores the old retained lease
        mosquitto.start()

        async def retained_lease() -> ClusterView:
            return await snapshot(BrokerConfig(url=mosquitto.url), Topics(cluster.prefix, "test"), 0.2)

        restored = asyncio.run(retained_lease()).stream.lease
        assert restored is not None and restored.term < before, (restored, before)
        cluster.add("n4", priority=500)  # a fresh agent whose first view is that stale lease
        cluster.wait_for_leader(timeout=15, after=t_crash)
        wait_until(cluster.current_leader, 15, "exactly one acting primary")
        time.sleep(FAST_ELECTION["preempt_delay"] + LEASE)  # let n4 (best priority) take over if it will
        after = [e for e in cluster.all_events() if e["event"] == "promote" and e["t"] > t_crash]
        assert after and all(e["term"] > before for e in after), (before, after)
