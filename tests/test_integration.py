"""Agents as real processes on real brokers (amqtt and Mosquitto): what only processes and real brokers can
show (kill -9 with the broker's own will, SIGSTOP, SIGTERM, broker restarts and persistence, the command
line), and the invariants after each. The election's other faults (hung broker, ACL, replays, hostile
messages, handovers) run in-process in test_agent_inprocess.py.

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
from typing import Any

import pytest

from harness.agents import FAST_ELECTION, Cluster, LeaseRecorder, checked_cluster, wait_until
from harness.brokers import BrokerProcess
from hasync.config import BrokerConfig
from hasync.messages import Heartbeat
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


def settled(cluster: Cluster, hold: float, timeout: float) -> str:
    """The primary, once the same one has been primary for ``hold`` seconds (no preemption pending)."""
    seen: dict[str, Any] = {"leader": None, "since": time.monotonic()}

    def stable() -> str | None:
        leader, now = cluster.current_leader(), time.monotonic()
        if leader != seen["leader"]:
            seen.update(leader=leader, since=now)
        return leader if leader is not None and now - seen["since"] >= hold else None

    result: str = wait_until(stable, timeout, f"one primary for {hold:.1f} s")
    return result


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


def test_agents_started_together_elect_the_best_first(cluster: Cluster) -> None:
    """At a cold start the best node wins the first term (once only 1 of 6 starts did; the others had a
    worse node win and the best one preempt it a preempt delay later)."""
    for i, prio in ((3, 80), (2, 90), (1, 100)):  # the best starts last
        cluster.add(f"n{i}", priority=prio)
    assert cluster.wait_for_leader(timeout=15) == "n1"
    time.sleep(FAST_ELECTION["preempt_delay"] + LEASE)
    assert [(e["node"], e["term"]) for e in cluster.leaders_since(0)] == [("n1", 1)]


@pytest.mark.mosquitto
def test_fast_profile_sigstop_failover_without_overlap(mosquitto: BrokerProcess, tmp_path: Path,
                                                        topic_prefix: str) -> None:
    """The fast timing profile as a user configures it (``election: {profile: fast}``, resolved by the agent):
    a frozen primary is replaced and its last instant as primary comes before the new promotion (the cluster's
    audit checks every tenure at the end). How fast is the benchmark's (failover-stop-mosquitto-fast)."""
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as cluster:
        leader = three(cluster, preempt=False, election={"profile": "fast"})
        old = cluster.agents[leader]
        with LeaseRecorder(mosquitto.url, topic_prefix) as recorder:
            wait_until(lambda: recorder.records, 5, "a renewal")
        assert {r.lease_ms for _, r in recorder.records} == {850}  # the profile's lease, on the wire
        t_stop = time.monotonic()
        old.signal(signal.SIGSTOP)
        try:
            new = cluster.wait_for_leader(timeout=10, after=t_stop, exclude=leader)
            t_new = cluster.leaders_since(t_stop)[0]["t"]
        finally:
            old.signal(signal.SIGCONT)
        demote = wait_until(lambda: [e for e in old.events() if e["event"] == "demote"], 10,
                            "the woken primary to record its demotion")[-1]
        assert demote["acting_until"] < t_new, (demote, t_new)
        assert new != leader and cluster.current_leader() == new


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


def retained_heartbeat(broker_url: str, prefix: str, node: str) -> Heartbeat | None:
    async def look() -> ClusterView:
        return await snapshot(BrokerConfig(url=broker_url), Topics(prefix, "test"), 0.3)

    state = asyncio.run(look()).nodes.get(node)
    return None if state is None else state.heartbeat


def test_sigterm_hands_over_gracefully_and_leaves_offline_as_its_last_word(cluster: Cluster) -> None:
    """The retained status after an exit must say offline: the role-change heartbeat of the handover once
    overtook the offline one (4 of 11 SIGTERMs on Mosquitto left "online": true, "role": "standby")."""
    leader = three(cluster, preempt=False)  # leadership stays where each handover puts it
    for trial in range(4):
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
        last = retained_heartbeat(cluster.broker_url, cluster.prefix, leader)
        assert last is not None and last.online is False, (trial, last)
        cluster.agents[leader].start()  # back as a standby: the next trial stops the new primary
        wait_until(lambda a=cluster.agents[leader]: a.status().get("role") == "standby", 10, "a standby again")
        leader = new


def test_the_step_down_command_refuses_what_the_cluster_shows_is_wrong(cluster: Cluster) -> None:
    leader = three(cluster)
    standby = next(n for n in cluster.agents if n != leader)

    def step_down(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hasync", "step-down", "--broker", cluster.broker_url, "--cluster", "test",
             "--topic-prefix", cluster.prefix, *args],
            capture_output=True, text=True, timeout=30, check=False,
        )

    for args, error in (
        (["--node", "nobody"], "no node 'nobody' in cluster 'test'"),
        (["--node", standby], f"{standby} is not the primary (it is standby); the primary is {leader}"),
        (["--node", leader, "--to", "nobody"], "no node 'nobody'"),
        (["--node", leader, "--to", leader], f"{leader} cannot hand over to itself"),
    ):
        refused = step_down(*args)
        assert refused.returncode == 1 and refused.stderr.startswith(f"hasync: not sent: {error}"), refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert cluster.current_leader() == leader  # nothing was sent
    t0 = time.monotonic()
    done = step_down("--node", leader, "--to", standby)
    assert done.returncode == 0 and done.stdout.strip() == f"asked {leader} to step down to {standby}", done
    assert cluster.wait_for_leader(timeout=5, after=t0, exclude=leader) == standby


def test_broker_restart_elects_one_leader(cluster: Cluster, broker: BrokerProcess) -> None:
    leader = three(cluster)
    t0 = time.monotonic()
    broker.restart()
    # Every agent reconnects; the leader lost its connection, so it demoted; one leader again.
    wait_until(lambda: [e for e in cluster.agents[leader].events() if e["event"] == "demote"
                        and e["t"] > t0], 10, "the leader to demote on losing the broker")
    cluster.wait_for_leader(timeout=LEASE * 2 + 10, after=t0)
    wait_until(cluster.current_leader, 5, "exactly one acting primary")


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
        three(cluster)
        mosquitto.restart()  # a graceful stop saves the database: it now holds this term's lease
        cluster.wait_for_leader(timeout=15, after=time.monotonic())
        # One primary again: the old one if it won the election after the restart; if another node did,
        # flap damping keeps the old one from preempting for election.damping_hold (its connection
        # dropped), and the best of the others may still preempt: wait for a primary that stays.
        settled(cluster, FAST_ELECTION["preempt_delay"] + LEASE, 20)
        # Two handovers move the cluster two terms past what the broker saved.
        for _ in range(2):
            current = settled(cluster, FAST_ELECTION["preempt_delay"] + LEASE, 20)
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
