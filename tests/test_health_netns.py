"""Interface tracking for real: agent processes in network namespaces (harness.netns) with Mosquitto; the
primary tracks an interface of its own, whose link goes down. Root, iproute2 and mosquitto needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import netns
from harness.agents import checked_cluster
from harness.brokers import MosquittoProcess, mosquitto_binary
from harness.wait import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

INTERVAL, FALL = 0.5, 2


def test_a_tracked_interface_going_down_hands_over_and_coming_up_makes_the_node_eligible(
        tmp_path: Path, topic_prefix: str) -> None:
    why = netns.available()
    if why is not None or mosquitto_binary() is None:
        pytest.skip(why or "mosquitto is not installed")
    with netns.Lan(["n1", "n2"]) as lan:
        # (this kernel has no dummy interfaces: a veth pair inside n1's namespace, both ends up)
        lan.run_in("n1", "ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p")
        lan.run_in("n1", "ip", "link", "set", "uplink0p", "up")
        lan.run_in("n1", "ip", "link", "set", "uplink0", "up")
        port = free_port()
        track = {"name": "uplink", "type": "interface", "interface": "uplink0", "interval": INTERVAL,
                 "timeout": INTERVAL, "fall": FALL, "rise": 1}
        with MosquittoProcess(tmp_path / "mosquitto", port=port, extra_config=[f"listener {port} {lan.gateway}"]), \
                checked_cluster(tmp_path / "agents", f"mqtt://{lan.gateway}:{port}", topic_prefix) as cluster:
            n1 = cluster.add("n1", priority=200, command_prefix=lan.prefix("n1"), http={"host": lan.addresses["n1"]},
                             health_checks=[track])
            cluster.add("n2", priority=100, command_prefix=lan.prefix("n2"), http={"host": lan.addresses["n2"]})
            assert cluster.wait_for_leader(30) == "n1"
            down = cluster.all_events()[-1]["t"]
            lan.run_in("n1", "ip", "link", "set", "uplink0", "down")
            assert cluster.wait_for_leader(FALL * INTERVAL + 5, after=down, exclude="n1") == "n2"
            [demotion] = [e for e in n1.events() if e["event"] == "demote"]
            assert demotion["cause"] == "unhealthy" and "uplink0 is down" in demotion["reason"], demotion
            assert not n1.status()["eligible"]
            lan.run_in("n1", "ip", "link", "set", "uplink0", "up")
            wait_until(lambda: n1.status()["eligible"], 10, "n1 to be eligible once its link is up")
