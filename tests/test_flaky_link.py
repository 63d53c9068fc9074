"""A flaky link on the primary, for real: three agent processes in network namespaces of their own
(harness.netns), Mosquitto on the bridge, and the primary's packets delayed 200 ms +- 150 ms and 10 %
of them dropped for 60 s (harness.netem: netem's figures from issue 14's fault run, on NFQUEUE since
this kernel has no sch_netem). Production timings (lease 3 s, preempt delay 10 s).

Without flap damping the primary lost the lease, took it back by preemption as soon as it looked
eligible, and lost it again: 4 to 9 leadership changes and 9 to 32 s without a primary per minute.
The target: at most one change, and a primary for at least 55 of the 60 s, in every run.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import netns
from harness.agents import Cluster, checked_cluster
from harness.brokers import MosquittoProcess, mosquitto_binary
from harness.wait import free_port, wait_until
from hasync.audit import tenures
from hasync.election import Timing

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

WINDOW = 60.0
PRODUCTION = {key: getattr(Timing(), key) for key in (
    "lease_duration", "renew_deadline", "renew_interval", "heartbeat_interval", "claim_stagger", "preempt_delay")}


def changes_and_coverage(events: list[dict[str, Any]], deaths: dict[str, float], start: float, end: float,
                         first: str) -> tuple[int, float]:
    """Leadership changes in [start, end] (a primary other than the previous one), and the seconds of it
    during which some node was primary."""
    changes, covered, previous = 0, 0.0, first
    for tenure in sorted(tenures(events, end, deaths), key=lambda t: t.start):
        lo, hi = max(tenure.start, start), min(tenure.end, end)
        if hi <= lo:
            continue
        covered += hi - lo
        if tenure.start > start and tenure.node != previous:
            changes += 1
        previous = tenure.node
    return changes, covered


@contextlib.contextmanager
def three_in_namespaces(tmp_path: Path, topic_prefix: str) -> Iterator[tuple[netns.Lan, Cluster]]:
    """n1 (best), n2, n3 each in a namespace of its own on a LAN with Mosquitto, production timings; yields
    once n1 leads and the others follow. Audited (never two primaries) when the block ends."""
    why = netns.available()
    if why is not None or mosquitto_binary() is None:
        pytest.skip(why or "mosquitto is not installed")
    nodes = {"n1": 200, "n2": 150, "n3": 100}
    with netns.Lan(list(nodes)) as lan:
        port = free_port()
        with MosquittoProcess(tmp_path / "mosquitto", port=port, extra_config=[f"listener {port} {lan.gateway}"]), \
                checked_cluster(tmp_path / "agents", f"mqtt://{lan.gateway}:{port}", topic_prefix) as cluster:
            for node, priority in nodes.items():
                cluster.add(node, priority=priority, command_prefix=lan.prefix(node), election=PRODUCTION,
                            broker={"keepalive": 5}, http={"host": lan.addresses[node]})
            assert cluster.wait_for_leader(30) == "n1"
            for node in ("n2", "n3"):
                agent = cluster.agents[node]
                wait_until(lambda agent=agent: agent.status().get("role") == "standby", 15, f"{node} to follow")
            yield lan, cluster


@pytest.mark.parametrize("run", range(5))
def test_a_flaky_primary_changes_leadership_at_most_once(run: int, tmp_path: Path, topic_prefix: str) -> None:
    with three_in_namespaces(tmp_path, topic_prefix) as (lan, cluster):
        netem = subprocess.Popen(
            [*lan.prefix("n1"), sys.executable, "-m", "harness.netem", "--seconds", str(WINDOW),
             "--seed", str(run)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert netem.stdout is not None and netem.stdout.readline().strip() == "READY"
            start = time.monotonic()
            for chain, flag in (("OUTPUT", "-o"), ("INPUT", "-i")):
                lan.run_in("n1", "iptables", "-A", chain, flag, "eth0", "-j", "NFQUEUE", "--queue-num", "0",
                           "--queue-bypass")
            time.sleep(WINDOW)  # the observation window itself
            end = time.monotonic()
            lan.run_in("n1", "iptables", "-F")
        finally:
            netem.terminate()
            counts = netem.communicate(timeout=10)[0]
        changes, covered = changes_and_coverage(cluster.all_events(), cluster.deaths, start, end, "n1")
        print(f"run {run}: {changes} leadership changes, a primary for {covered:.1f} s of {end - start:.1f} s; "
              f"netem: {counts.strip()}")
        assert "dropped=" in counts and int(counts.split("dropped=")[1].split()[0]) > 0, counts
        assert changes <= 1, f"{changes} leadership changes in {WINDOW:.0f} s of a flaky link"
        assert covered >= WINDOW - 5, f"a primary for only {covered:.1f} s"


@pytest.mark.parametrize("cut", ["blackhole", "inbound", "outbound"])
def test_a_cut_primary_is_replaced_within_a_lease_and_never_overlaps(cut: str, tmp_path: Path,
                                                                     topic_prefix: str) -> None:
    """What issue 14's fault run found fine, kept so with damping: the primary's packets dropped both ways,
    or only inbound, or only outbound (iptables DROP in its namespace). The cluster's audit (never two
    primaries) runs at the end. The new primary comes a lease after the last record the others received:
    at most lease + renew deadline after the cut (an inbound cut lets the primary's renewals out until its
    own deadline); about 3.0 s for a blackhole (issue 14's run: 2.98 s), 3.0-3.5 s here for the others."""
    chains = {"blackhole": ("INPUT", "OUTPUT"), "inbound": ("INPUT",), "outbound": ("OUTPUT",)}[cut]
    with three_in_namespaces(tmp_path, topic_prefix) as (lan, cluster):
        start = time.monotonic()
        for chain in chains:
            lan.run_in("n1", "iptables", "-A", chain, "-j", "DROP")
        bound = PRODUCTION["lease_duration"] + PRODUCTION["renew_deadline"] + 0.5
        successor = cluster.wait_for_leader(bound, after=start, exclude="n1")
        promoted = cluster.leaders_since(start)[0]["t"]
        print(f"{cut}: {successor} primary {promoted - start:.2f} s after the cut")
        assert successor == "n2"
        lan.run_in("n1", "iptables", "-F")
        wait_until(lambda: cluster.agents["n1"].status().get("role") == "standby", 30, "n1 to follow again")
