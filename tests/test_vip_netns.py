"""The floating IP for real: agent processes in network namespaces on one bridge (harness.netns) with
Mosquitto, the kernel's addresses moved by netlink, and a client namespace whose neighbour table shows
what the LAN believes. Root, iproute2 and mosquitto needed.

``HASYNC_FENCE_RUNS`` sets how many times the kill -9 and SIGSTOP tests fault the primary (3 in the suite;
the README's figures come from 25)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import netns
from harness.addrlog import AddressLog
from harness.agents import FAST_FENCED_ELECTION, AgentProcess, Cluster, checked_cluster
from harness.brokers import MosquittoProcess, mosquitto_binary
from harness.wait import free_port, wait_until
from hasync import guardian

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


def lifetimes(lan: netns.Lan, node: str) -> dict[str, tuple[int, int]]:
    """``{address/len: (valid, preferred)}`` seconds left of the addresses on the node's eth0 (2**32 - 1:
    forever)."""
    out = json.loads(lan.run_in(node, "ip", "-j", "addr", "show", "dev", "eth0"))
    return {f"{a['local']}/{a['prefixlen']}": (a["valid_life_time"], a["preferred_life_time"])
            for link in out for a in link["addr_info"]}


@contextlib.contextmanager
def two_nodes_and_a_client(tmp_path: Path, topic_prefix: str, *, six: bool, preempt: bool = True
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
                cluster.add(node, priority=priority, preempt=preempt, command_prefix=lan.prefix(node),
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

        killed = cluster.kill("n1")  # kill -9 of the agent: its guardian removes the address
        assert cluster.wait_for_leader(10, after=killed, exclude="n1") == "n2"
        wait_until(lambda: vip in addresses(lan, "n2"), 5, "n2 to hold the floating IP")
        wait_until(lambda: neighbour(lan, "client", ip) == macs["n2"], 5, "the client's entry to point at n2")
        switched = time.monotonic()
        print(f"kill -9 to the client's entry on n2's MAC: {switched - killed:.2f} s (without any client traffic)")
        assert vip not in addresses(lan, "n1")
        assert f"hasync guardian: the agent (pid {cluster.agents['n1'].pid}) is gone: removed {vip} on eth0" \
            in cluster.agents["n1"].log()

        # The agent starts again (systemd's Restart=); the better node, it takes the primary role back
        # (preemption, a graceful handover) and the address.
        restarted = time.monotonic()
        cluster.agents["n1"].start()
        assert cluster.wait_for_leader(15, after=restarted) == "n1"
        assert cluster.agents["n1"].metric("hasync_vip_stale_removed_total") == 0  # nothing was left behind
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
        # By its renew deadline after the last renewal that came back (its lifetime, topped up, ends just before).
        assert gone - start <= FAST_FENCED_ELECTION["renew_deadline"] + 0.3
        lan.run_in("n1", "iptables", "-F")
        wait_until(lambda: cluster.agents["n1"].status().get("role") == "standby", 30, "n1 to follow again")
        assert vip not in addresses(lan, "n1") and vip in addresses(lan, "n2")


# ---- the primary killed or frozen: its address goes before the successor adds it -----------------------

RUNS = int(os.environ.get("HASYNC_FENCE_RUNS", "3"))


@pytest.mark.timeout(60 + 15 * RUNS)
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_killed_or_frozen_primary_lets_go_before_the_successor_takes_over(tmp_path: Path, topic_prefix: str,
                                                                          fault: str) -> None:
    """kill -9 of the primary's agent (its guardian removes the addresses) or SIGSTOP (the kernel ends their
    lifetime), RUNS times, alternating between the nodes; every address change in both namespaces in the
    kernel's own order (harness.addrlog): on the old primary each address goes before the new one adds it,
    IPv4 and IPv6."""
    margins: dict[str, list[float]] = {}
    with two_nodes_and_a_client(tmp_path, topic_prefix, six=True, preempt=False) as (lan, cluster, vips):
        valid, preferred = lifetimes(lan, "n1")[vips[0]]
        assert valid == preferred and 0 <= valid <= 1  # floor(2.75 - 1.25 - echo) from each renewal
        ips = [vip.split("/")[0] for vip in vips]
        log = AddressLog(lan, ips, tmp_path).start()
        try:
            holder = "n1"
            for run in range(RUNS):
                successor = "n2" if holder == "n1" else "n1"
                agent = cluster.agents[holder]
                acted_before = agent.log().count("hasync guardian:")
                t0 = cluster.kill(holder) if fault == "kill" else time.monotonic()
                if fault == "stop":
                    agent.signal(signal.SIGSTOP)
                wait_until(lambda s=successor, t=t0: all(log.first(s, ip, held=True, after=t) is not None
                                                         for ip in ips), 15, f"{successor} to hold the floating IPs")
                for ip in ips:
                    gone = log.first(holder, ip, held=False, after=t0)
                    taken = log.first(successor, ip, held=True, after=t0)
                    assert gone is not None and taken is not None and gone < taken, (
                        f"run {run}: {ip} on {holder} until change {gone}, on {successor} from change {taken}:\n"
                        + "\n".join(map(str, log.changes[-20:])))
                    left, came = log.changes[gone].t, log.changes[taken].t
                    margins.setdefault(ip, []).append(came - left)
                    print(f"{fault} run {run}: {ip} gone from {holder} {(left - t0) * 1000:.1f} ms after the fault, "
                          f"on {successor} {(came - t0) * 1000:.1f} ms after it: {(came - left) * 1000:.1f} ms apart")
                if fault == "kill":
                    agent.start()
                else:
                    assert agent.log().count("hasync guardian:") == acted_before  # it never acts while the agent lives
                    agent.signal(signal.SIGCONT)
                wait_until(lambda a=agent, s=successor: (a.status().get("role"), a.status().get("leader")) == (
                    "standby", s), 20, f"{holder} back as standby, following {successor}")
                assert not any(vip in addresses(lan, holder) for vip in vips)
                # A node that (re)connected may claim, even on a will, only after observing for a lease.
                time.sleep(FAST_FENCED_ELECTION["lease_duration"])
                holder = successor
        finally:
            log.close()
    for ip, values in margins.items():
        print(f"{fault}: {ip} taken after it was gone, over {len(values)} runs: min {min(values) * 1000:.1f} ms, "
              f"median {statistics.median(values) * 1000:.1f} ms, max {max(values) * 1000:.1f} ms")


# ---- the guardian ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def addresses_left_on_a_node() -> Iterator[tuple[netns.Lan, list[str]]]:
    """A namespace n1 whose eth0 holds an IPv4 and an IPv6 floating address, no agent."""
    why = netns.available()
    if why is not None:
        pytest.skip(why)
    with netns.Lan(["n1"]) as lan:
        third = lan.gateway.split(".")[2]
        ours = [f"10.213.{third}.50/24", f"fd00:213:{int(third):x}::50/64"]
        for address in ours:
            lan.run_in("n1", "ip", "addr", "add", address, "dev", "eth0", *(["nodad"] if ":" in address else []))
        yield lan, ours


def test_the_guardian_removes_the_addresses_when_its_pipe_closes_and_not_before(tmp_path: Path) -> None:
    """The guardian process alone, in a namespace: with the agent's end of the pipe open it removes nothing,
    whatever it is sent (SIGINT, SIGTERM, SIGHUP); the moment that end closes, it removes IPv4 and IPv6."""
    with addresses_left_on_a_node() as (lan, ours):
        read, write = os.pipe()
        args = [arg for address in ours for arg in ("eth0", address)]
        with subprocess.Popen([*lan.prefix("n1"), sys.executable, "-m", "hasync.guardian", *args], stdin=read,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
            os.close(read)
            assert process.stdout is not None and process.stdout.readline().split()[0] == guardian.READY
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                process.send_signal(sig)
            time.sleep(0.5)
            assert process.poll() is None and set(ours) <= addresses(lan, "n1")
            os.close(write)
            closed = time.monotonic()
            wait_until(lambda: not set(ours) & addresses(lan, "n1"), 5, "the guardian to remove the addresses")
            print(f"pipe closed to both addresses gone: {(time.monotonic() - closed) * 1000:.0f} ms (polling ip)")
            assert process.wait(5) == 0
            assert process.stderr is not None and "removed 10.213." in process.stderr.read()
            assert lan.addresses["n1"] + "/24" in addresses(lan, "n1")  # its own address stays


def test_a_guardian_killed_is_harmless_and_started_again(tmp_path: Path, topic_prefix: str) -> None:
    """kill -9 of the primary's guardian: the address stays, the agent stays primary and starts another."""
    why = netns.available()
    if why is not None or mosquitto_binary() is None:
        pytest.skip(why or "mosquitto is not installed")
    with netns.Lan(["n1"]) as lan:
        port = free_port()
        vip = f"10.213.{lan.gateway.split('.')[2]}.50/24"
        with MosquittoProcess(tmp_path / "mosquitto", port=port, extra_config=[f"listener {port} {lan.gateway}"]), \
                checked_cluster(tmp_path / "agents", f"mqtt://{lan.gateway}:{port}", topic_prefix) as cluster:
            agent: AgentProcess = cluster.add("n1", command_prefix=lan.prefix("n1"), http={"host": lan.addresses["n1"]},
                                              vip=[{"address": vip, "interface": "eth0"}])
            assert cluster.wait_for_leader(30) == "n1"
            wait_until(lambda: vip in addresses(lan, "n1"), 5, "n1 to hold the floating IP")
            first = agent.status()["guardian"]
            assert first["starts"] == 1 and agent.metric("hasync_guardian") == 1
            os.kill(first["pid"], signal.SIGKILL)
            wait_until(lambda: agent.status()["guardian"]["starts"] == 2, 10, "a new guardian")
            assert agent.status()["guardian"]["pid"] != first["pid"] and agent.status()["primary"]
            assert vip in addresses(lan, "n1") and len(cluster.leaders_since(0)) == 1
            assert "the guardian exited (-9); starting it again" in agent.log()
            time.sleep(FAST_FENCED_ELECTION["lease_duration"])  # renewals go on; the address with them
            assert vip in addresses(lan, "n1") and agent.status()["primary"]


def test_vip_release_takes_off_what_an_agent_left_behind(tmp_path: Path) -> None:
    """``hasync vip-release`` (the systemd unit's ExecStopPost): the configured addresses off their interface,
    whatever else is there left alone; a second run finds nothing."""
    with addresses_left_on_a_node() as (lan, ours):
        config = tmp_path / "hasync.yaml"
        config.write_text(json.dumps({"node_id": "n1", "vip": [{"address": a, "interface": "eth0"} for a in ours]}))
        release = [*lan.prefix("n1"), sys.executable, "-m", "hasync", "vip-release", "--config", str(config)]
        first = subprocess.run(release, capture_output=True, text=True, timeout=60, check=False)
        assert first.returncode == 0 and first.stdout.strip() == f"removed {ours[0]} on eth0, {ours[1]} on eth0"
        assert addresses(lan, "n1") & set(ours) == set() and f"{lan.addresses['n1']}/24" in addresses(lan, "n1")
        again = subprocess.run(release, capture_output=True, text=True, timeout=60, check=False)
        assert (again.returncode, again.stdout.strip()) == (0, "none of the floating IPs was on its interface")
