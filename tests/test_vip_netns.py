"""The floating IP for real: agent processes in network namespaces on one bridge (harness.netns) with
Mosquitto, the kernel's addresses moved by netlink, and a client namespace whose neighbour table shows
what the LAN believes. Root, iproute2 and mosquitto needed."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import netns
from harness.agents import Cluster, checked_cluster
from harness.brokers import MosquittoProcess, mosquitto_binary
from harness.wait import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

NODES = {"n1": 200, "n2": 150}


def addresses(lan: netns.Lan, node: str) -> set[str]:
    """The addresses on the node's eth0, as ``ip`` prints them (``a.b.c.d/len``)."""
    out = json.loads(lan.run_in(node, "ip", "-j", "addr", "show", "dev", "eth0"))
    return {f"{a['local']}/{a['prefixlen']}" for link in out for a in link["addr_info"]}


def mac(lan: netns.Lan, node: str) -> str:
    return str(json.loads(lan.run_in(node, "ip", "-j", "link", "show", "dev", "eth0"))[0]["address"])


def neighbour(lan: netns.Lan, node: str, ip: str) -> str | None:
    """The link-layer address ``node``'s neighbour table holds for ``ip``, if any."""
    out = json.loads(lan.run_in(node, "ip", "-j", "neigh", "show", "to", ip, "dev", "eth0"))
    return out[0].get("lladdr") if out else None


def poke(lan: netns.Lan, node: str, ip: str) -> None:
    """One UDP datagram from ``node`` to ``ip`` (the discard port): the kernel resolves the address first."""
    family = "AF_INET6" if ":" in ip else "AF_INET"
    lan.run_in(node, sys.executable, "-c",
               f"import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); s.sendto(b'x', ('{ip}', 9))")


@contextlib.contextmanager
def two_nodes_and_a_client(tmp_path: Path, topic_prefix: str, *, six: bool
                           ) -> Iterator[tuple[netns.Lan, Cluster, list[str]]]:
    """n1 (best) and n2 with the floating IPs, a client namespace; yields once n1 holds them."""
    why = netns.available()
    if why is not None or mosquitto_binary() is None:
        pytest.skip(why or "mosquitto is not installed")
    with netns.Lan([*NODES, "client"]) as lan:
        third = lan.gateway.split(".")[2]
        vips = [f"10.213.{third}.50/24"]
        if six:  # a ULA prefix of the LAN's own: the client gets an address in it to reach the floating one
            vips.append(f"fd00:213:{int(third):x}::50/64")
            lan.run_in("client", "ip", "addr", "add", f"fd00:213:{int(third):x}::12/64", "dev", "eth0", "nodad")
        port = free_port()
        with MosquittoProcess(tmp_path / "mosquitto", port=port, extra_config=[f"listener {port} {lan.gateway}"]), \
                checked_cluster(tmp_path / "agents", f"mqtt://{lan.gateway}:{port}", topic_prefix) as cluster:
            for node, priority in NODES.items():
                cluster.add(node, priority=priority, command_prefix=lan.prefix(node),
                            http={"host": lan.addresses[node]},
                            vip=[{"address": v, "interface": "eth0"} for v in vips])
            assert cluster.wait_for_leader(30) == "n1"
            wait_until(lambda: set(vips) <= addresses(lan, "n1"), 5, "n1 to hold the floating IPs")
            yield lan, cluster, vips


def test_the_floating_ip_follows_the_primary_and_the_client_follows_the_garp(tmp_path: Path,
                                                                             topic_prefix: str) -> None:
    with two_nodes_and_a_client(tmp_path, topic_prefix, six=False) as (lan, cluster, vips):
        [vip] = vips
        ip = vip.split("/")[0]
        assert vip not in addresses(lan, "n2")
        macs = {node: mac(lan, node) for node in NODES}
        poke(lan, "client", ip)  # the client learns the primary's MAC
        wait_until(lambda: neighbour(lan, "client", ip) == macs["n1"], 5, "the client to resolve n1's MAC")

        killed = cluster.kill("n1")  # kill -9: nothing removes the address from n1
        assert cluster.wait_for_leader(10, after=killed, exclude="n1") == "n2"
        wait_until(lambda: vip in addresses(lan, "n2"), 5, "n2 to hold the floating IP")
        wait_until(lambda: neighbour(lan, "client", ip) == macs["n2"], 5, "the client's entry to point at n2")
        switched = time.monotonic()
        print(f"kill -9 to the client's entry on n2's MAC: {switched - killed:.2f} s (without any client traffic)")
        assert vip in addresses(lan, "n1")  # what kill -9 leaves behind, until the agent starts again

        # The agent starts again (systemd's Restart=): the stale address goes before it can be elected; then,
        # the better node, it takes the primary role back (preemption, a graceful handover) and the address.
        restarted = time.monotonic()
        cluster.agents["n1"].start()
        wait_until(lambda: cluster.agents["n1"].metric("hasync_vip_stale_removed_total") == 1, 15,
                   "n1 to remove the address it left behind")
        assert not cluster.leaders_since(restarted)  # removed before anyone was elected again
        assert cluster.wait_for_leader(15, after=restarted) == "n1"
        wait_until(lambda: vip in addresses(lan, "n1") and vip not in addresses(lan, "n2"), 5,
                   "the floating IP back on n1 only")
        wait_until(lambda: neighbour(lan, "client", ip) == macs["n1"], 5, "the client's entry back on n1")
        status = cluster.agents["n1"].status()
        assert status["vip"]["held"] == [vip] and status["vip"]["fault"] is None
        assert cluster.agents["n2"].status()["vip"]["held"] == []
        wait_until(lambda: cluster.agents["n1"].metric("hasync_vip_announcements_total") == 3, 5,
                   "the three announcements of n1's second tenure")


def test_ipv6_the_client_follows_the_unsolicited_neighbour_advertisement(tmp_path: Path,
                                                                         topic_prefix: str) -> None:
    with two_nodes_and_a_client(tmp_path, topic_prefix, six=True) as (lan, cluster, vips):
        vip6 = vips[1]
        ip6 = str(ipaddress.ip_interface(vip6).ip)
        macs = {node: mac(lan, node) for node in NODES}
        wait_until(lambda: vip6 in addresses(lan, "n1"), 5, "n1 to hold the IPv6 address")
        poke(lan, "client", ip6)
        wait_until(lambda: neighbour(lan, "client", ip6) == macs["n1"], 5, "the client to resolve n1's MAC")
        cluster.agents["n1"].terminate()  # SIGTERM: a graceful handover
        wait_until(lambda: vip6 in addresses(lan, "n2"), 10, "n2 to hold the IPv6 address")
        assert vip6 not in addresses(lan, "n1")
        wait_until(lambda: neighbour(lan, "client", ip6) == macs["n2"], 5, "the client's entry to point at n2")


def test_a_node_without_cap_net_admin_says_so_and_is_never_elected(tmp_path: Path, topic_prefix: str) -> None:
    why = netns.available()
    if why is not None or mosquitto_binary() is None:
        pytest.skip(why or "mosquitto is not installed")
    with netns.Lan(["n1"]) as lan:
        port = free_port()
        third = lan.gateway.split(".")[2]
        vip = f"10.213.{third}.50/24"
        with MosquittoProcess(tmp_path / "mosquitto", port=port, extra_config=[f"listener {port} {lan.gateway}"]), \
                checked_cluster(tmp_path / "agents", f"mqtt://{lan.gateway}:{port}", topic_prefix) as cluster:
            agent = cluster.add("n1", http={"host": lan.addresses["n1"]}, vip=[{"address": vip, "interface": "eth0"}],
                                command_prefix=[*lan.prefix("n1"), "setpriv", "--bounding-set", "-net_admin,-net_raw",
                                                "--"])
            wait_until(lambda: agent.status().get("vip", {}).get("fault"), 15, "the fault in /healthz")
            time.sleep(3)  # the observation window (two leases): that it is not elected takes one
            status = agent.status()
            assert "Operation not permitted" in status["vip"]["fault"] and "CAP_NET_ADMIN" in status["vip"]["fault"]
            assert status["eligible"] is False and not cluster.leaders_since(0)
            assert agent.metric("hasync_vip_errors_total", operation="check", error="permission") >= 1
            assert vip not in addresses(lan, "n1") and agent.alive
            assert agent.log().count("check failed: removing") >= 1


def test_a_primary_cut_off_drops_the_address_before_the_successor_adds_it(tmp_path: Path,
                                                                          topic_prefix: str) -> None:
    """The primary's packets dropped both ways (iptables in its namespace): it removes the address at its
    renew deadline, a lease of silence before n2 may claim. Both namespaces are sampled every few ms until
    n2 holds it: never both at once."""
    with two_nodes_and_a_client(tmp_path, topic_prefix, six=False) as (lan, cluster, vips):
        [vip] = vips
        start = time.monotonic()
        for chain in ("INPUT", "OUTPUT"):
            lan.run_in("n1", "iptables", "-A", chain, "-j", "DROP")
        samples: list[tuple[float, bool, bool]] = []

        def sample() -> bool:
            samples.append((time.monotonic(), vip in addresses(lan, "n1"), vip in addresses(lan, "n2")))
            return samples[-1][2]

        wait_until(sample, 10, "n2 to hold the floating IP", step=0.005)
        assert not [s for s in samples if s[1] and s[2]], "both held the floating IP"
        gone = next(t for t, on1, _ in samples if not on1)
        taken = next(t for t, _, on2 in samples if on2)
        print(f"cut: n1 let go {gone - start:.2f} s after the cut, n2 took it {taken - start:.2f} s after "
              f"({len(samples)} samples)")
        assert gone - start <= 1.0 + 0.25 + 0.3  # renew deadline (harness timings) after the last echo, + slack
        lan.run_in("n1", "iptables", "-F")
        wait_until(lambda: cluster.agents["n1"].status().get("role") == "standby", 30, "n1 to follow again")
        assert vip not in addresses(lan, "n1") and vip in addresses(lan, "n2")
