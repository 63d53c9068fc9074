"""The dnsmasq recipe (examples/dnsmasq) as it is, in network namespaces: two nodes, each with an agent and a real
dnsmasq started and stopped by the recipe's hook script (``DNSMASQ_CONTROL=pidfile``: no systemd here), the
floating IP from ``vip:``, Mosquitto on the bridge, and a client namespace that asks DNS (harness.dnsclient) at
the floating IP and does DHCP (busybox udhcpc). Root, iproute2, iptables, mosquitto, dnsmasq and busybox needed
(scripts/test installs them)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import dnsmasq, netns
from harness.agents import Cluster, checked_cluster
from harness.brokers import MosquittoProcess
from harness.wait import free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

NODES = {"n1": 200, "n2": 150}
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Home:
    lan: netns.Lan
    cluster: Cluster
    broker: MosquittoProcess
    vip: str  # a.b.c.d/24
    pidfiles: dict[str, Path]

    @property
    def ip(self) -> str:
        return self.vip.split("/")[0]

    def holds(self, node: str) -> bool:
        out = json.loads(self.lan.run_in(node, "ip", "-j", "addr", "show", "dev", "eth0"))
        return self.vip in {f"{a['local']}/{a['prefixlen']}" for link in out for a in link["addr_info"]}

    def serving(self, node: str) -> bool:
        return dnsmasq.running(self.pidfiles[node])

    def dns(self, server: str, name: str = "whoami.test") -> str | None:
        """The client's question to ``server``: whoami.test is each node's own address in its dnsmasq."""
        out = subprocess.run([*self.lan.prefix("client"), sys.executable, "-m", "harness.dnsclient", server, name],
                             capture_output=True, text=True, timeout=10, cwd=REPO, check=False)
        return out.stdout.strip() or None

    def dhcp(self) -> str | None:
        """One DHCP exchange from the client (udhcpc, which leaves the interface alone): the server's address."""
        out = subprocess.run([*self.lan.prefix("client"), "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f",
                              "-t", "2", "-T", "1", "-s", "/bin/true"], capture_output=True, text=True, timeout=15,
                             check=False)
        found = re.search(r"obtained from (\S+?),", out.stdout + out.stderr)
        return found.group(1) if found else None

    def dhcp_servers(self) -> list[str]:
        """Every DHCP server that offers an address to one DHCPDISCOVER (harness.dhcpclient)."""
        out = subprocess.run([*self.lan.prefix("client"), sys.executable, "-m", "harness.dhcpclient", "eth0"],
                             capture_output=True, text=True, timeout=10, cwd=REPO, check=False)
        return sorted(out.stdout.split())

    def sample(self) -> tuple[float, bool, bool, bool, bool]:
        return (time.monotonic(), self.holds("n1"), self.holds("n2"), self.serving("n1"), self.serving("n2"))


@contextlib.contextmanager
def home(tmp_path: Path, topic_prefix: str, on_broker_loss: str, *, broken: str | None = None,
         dns_check: bool = False, **settings: object) -> Iterator[Home]:
    """n1 (best) and n2 running the recipe; yields once n1 holds the floating IP and serves (``broken``: that
    node's dnsmasq.conf does not parse, and the test waits for nothing; ``dns_check``: each node asks its own
    dnsmasq, on the primary only, as examples/dnsmasq/hasync.yaml does)."""
    why = dnsmasq.missing()
    if why is not None:
        pytest.skip(why)
    with netns.Lan([*NODES, "client"], forward=True) as lan:
        third = lan.gateway.split(".")[2]
        vip = f"10.213.{third}.53/24"
        port = free_port()
        pidfiles = {node: tmp_path / node / "dnsmasq.pid" for node in NODES}
        with MosquittoProcess(tmp_path / "mosquitto", port=port,
                              extra_config=[f"listener {port} {lan.gateway}"]) as broker, \
                checked_cluster(tmp_path / "agents", f"mqtt://{lan.gateway}:{port}", topic_prefix) as cluster:
            try:
                for node, priority in NODES.items():
                    (tmp_path / node).mkdir()
                    conf = tmp_path / node / "dnsmasq.conf"
                    dnsmasq.write_config(conf, lan, node, vip.split("/", maxsplit=1)[0])
                    if node == broken:
                        conf.write_text(conf.read_text() + "no-such-option\n")
                    hook = dnsmasq.hook(conf, pidfiles[node])
                    checks = [{"name": "dnsmasq-answers", "type": "dns", "server": lan.addresses[node],
                               "query": "whoami.test", "expect": [lan.addresses[node]], "when": "primary",
                               "interval": 0.5, "timeout": 0.5, "fall": 2}] if dns_check else []
                    cluster.add(node, priority=priority, command_prefix=lan.prefix(node),
                                http={"host": lan.addresses[node]}, health_checks=checks,
                                vip=[{"address": vip, "interface": "eth0", "on_broker_loss": on_broker_loss}],
                                hooks={"promote": hook, "demote": hook, "fence": hook, "on_broker_loss": on_broker_loss,
                                       "on_promote_failure": "handover", "timeout": 10}, **settings)
                h = Home(lan, cluster, broker, vip, pidfiles)
                if broken:
                    yield h
                    return
                assert cluster.wait_for_leader(30) == "n1"
                wait_until(lambda: h.holds("n1") and h.serving("n1"), 10, "n1 to hold the floating IP and serve")
                yield h
            finally:
                for pidfile in pidfiles.values():  # a dnsmasq an agent left behind (kill -9, a failed test)
                    dnsmasq.kill(pidfile)


def test_only_the_primary_serves_and_after_a_kill_9_the_other_does(tmp_path: Path, topic_prefix: str) -> None:
    with home(tmp_path, topic_prefix, "kept", preempt=False) as h:
        n1, n2 = h.lan.addresses["n1"], h.lan.addresses["n2"]
        assert h.dns(h.ip) == n1 and h.dhcp() == n1 and h.dhcp_servers() == [n1]
        assert not h.serving("n2") and h.dns(n2) is None and not h.holds("n2")

        killed = h.cluster.kill("n1")  # kill -9 of the agent only (as under systemd): its guardian fences
        assert h.cluster.wait_for_leader(10, after=killed, exclude="n1") == "n2"
        wait_until(lambda: h.serving("n2") and h.holds("n2"), 10, "n2 to serve")
        wait_until(lambda: h.dns(h.ip) == n2, 10, "DNS at the floating IP answered by n2")
        print(f"kill -9 to DNS answered by n2 at the floating IP: {time.monotonic() - killed:.2f} s")
        # The guardian ran the fence command (the recipe's stop) and removed the address, kept though they are.
        assert not h.serving("n1") and not h.holds("n1") and h.dhcp_servers() == [n2]
        assert f"hasync guardian: the agent (pid {h.cluster.agents['n1'].pid}) is gone: removed {h.vip} on eth0; " \
               "fence command ok" in h.cluster.agents["n1"].log()
        # systemd restarts the agent: its start-up demote hook stops whatever a killed run left behind (here:
        # nothing; without the guardian, its dnsmasq).
        h.cluster.agents["n1"].start()
        wait_until(lambda: not h.serving("n1") and not h.holds("n1"), 15, "n1 to clear what it left behind")
        assert h.dhcp() == n2 and h.dhcp_servers() == [n2] and h.dns(h.ip) == n2 and h.dns(n1) is None
        assert h.cluster.current_leader() == "n2"


def outage(h: Home, seconds: float) -> list[tuple[float, bool, bool, bool, bool]]:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(h.sample())
        time.sleep(0.02)
    return samples


@pytest.mark.parametrize("on_broker_loss", ["kept", "fenced"])
def test_the_broker_killed(tmp_path: Path, topic_prefix: str, on_broker_loss: str) -> None:
    """kept: the primary serves DHCP and DNS at the floating IP throughout; fenced: both stop at the renew
    deadline. Nobody else is elected either way."""
    with home(tmp_path, topic_prefix, on_broker_loss) as h:
        n1 = h.lan.addresses["n1"]
        h.broker.kill()
        killed = time.monotonic()
        samples = outage(h, 6.0)  # four leases
        if on_broker_loss == "kept":
            assert all(on1 and up1 and not on2 and not up2 for _, on1, on2, up1, up2 in samples)
            assert h.dns(h.ip) == n1 and h.dhcp() == n1
        else:
            gone = next(t for t, on1, _, up1, _ in samples if not on1 and not up1)
            assert not any(on2 or up2 for _, _, on2, _, up2 in samples)
            print(f"fenced: floating IP and dnsmasq gone {gone - killed:.2f} s after the broker was killed")
            assert gone - killed < 1.0 + 3.0  # the renew deadline, then the demote hook
            assert h.dns(h.ip) is None and h.dhcp() is None
        h.broker.start()
        assert h.cluster.wait_for_leader(30, after=killed) == "n1"
        wait_until(lambda: h.serving("n1") and h.holds("n1"), 10, "n1 to serve again")


@pytest.mark.parametrize("on_broker_loss", ["kept", "fenced"])
def test_the_primary_cut_off_from_the_broker_only(tmp_path: Path, topic_prefix: str, on_broker_loss: str) -> None:
    """The trade-off, measured: n1's packets to and from the broker dropped (iptables in n1), the LAN left
    alone, for CUT seconds. n2 is elected (n1's will, 1.5 keepalives after its last packet). kept: n1 keeps the
    floating IP and dnsmasq until it reaches the broker again; fenced: it let go at its renew deadline."""
    cut_for = 6.0
    with home(tmp_path, topic_prefix, on_broker_loss) as h:
        port = str(h.broker.port)
        rules = [("OUTPUT", "-d", "--dport"), ("INPUT", "-s", "--sport")]
        for chain, host, side in rules:
            h.lan.run_in("n1", "iptables", "-A", chain, host, h.lan.gateway, "-p", "tcp", side, port, "-j", "DROP")
        cut = time.monotonic()
        samples = outage(h, cut_for)
        assert any(on2 and up2 for _, _, on2, _, up2 in samples), "n2 was not elected during the cut"
        both_answer = on_broker_loss == "kept" and h.dns(h.lan.addresses["n1"]) and h.dns(h.lan.addresses["n2"]) \
            and len(h.dhcp_servers()) == 2
        h.lan.run_in("n1", "iptables", "-F")
        healed = time.monotonic()

        def settled() -> bool:
            samples.append(h.sample())
            _, on1, on2, up1, up2 = samples[-1]
            return not on1 and not up1 and on2 and up2

        wait_until(settled, 20, "n1 to let go once it reaches the broker again", step=0.02)
        ip_both = _overlap(samples, lambda s: s[1] and s[2])
        dns_both = _overlap(samples, lambda s: s[3] and s[4])
        gone = next(t for t, on1, *_ in samples if not on1)
        print(f"{on_broker_loss}: cut {cut_for:.1f} s; floating IP on both nodes {ip_both:.2f} s, both dnsmasq "
              f"running {dns_both:.2f} s; n1 let go {gone - cut:.2f} s after the cut, {gone - healed:.2f} s after "
              f"it was lifted")
        if on_broker_loss == "fenced":
            assert ip_both == 0 and dns_both == 0
        else:
            assert both_answer, "both dnsmasq answered DNS during the cut"
            assert ip_both > 0 and dns_both > 0
            assert gone >= healed  # kept until n1 could read n2's term
        assert h.dns(h.ip) == h.lan.addresses["n2"]


def _overlap(samples: list[tuple[float, bool, bool, bool, bool]], both: object) -> float:
    """Seconds during which ``both(sample)`` held, counting each sample until the next."""
    assert callable(both)
    return sum(b[0] - a[0] for a, b in itertools.pairwise(samples) if both(a))


def test_a_dnsmasq_that_does_not_start_hands_the_role_over(tmp_path: Path, topic_prefix: str) -> None:
    """n1's dnsmasq.conf is broken: its promote hook fails, it steps down (hooks.on_promote_failure: handover),
    and n2, which can serve, takes over and stays primary (n1 holds its preemption back)."""
    with home(tmp_path, topic_prefix, "kept", broken="n1") as h:
        n2 = h.lan.addresses["n2"]
        wait_until(lambda: h.cluster.current_leader() == "n2" and h.serving("n2") and h.holds("n2"), 30,
                   "n2 to take over and serve")
        promotions = [(e["node"], e["term"]) for e in h.cluster.all_events() if e["event"] == "promote"]
        assert promotions[0][0] == "n1" and promotions[-1][0] == "n2"
        [failed] = [e for e in h.cluster.agents["n1"].events() if e["event"] == "hook_failed"]
        assert failed["hook"] == "promote"
        time.sleep(3)  # two leases and preempt_delay: n1, the better node, does not take the role back
        assert h.cluster.current_leader() == "n2" and not h.serving("n1") and not h.holds("n1")
        assert h.dns(h.ip) == n2 and h.dhcp_servers() == [n2]


def test_a_dnsmasq_that_stops_answering_on_the_primary_hands_the_role_over(tmp_path: Path,
                                                                           topic_prefix: str) -> None:
    """A check that runs only on the primary (``when: primary``) asks its own dnsmasq; killed, it stops
    answering, the primary runs its fault hook and hands over, and n2 serves."""
    with home(tmp_path, topic_prefix, "fenced", dns_check=True) as h:
        n2 = h.lan.addresses["n2"]
        time.sleep(2)  # the check has run on n1 (one interval of grace after the promotion, then every 0.5 s)
        assert h.cluster.current_leader() == "n1"
        os.kill(int(h.pidfiles["n1"].read_text()), 9)
        died = time.monotonic()
        assert h.cluster.wait_for_leader(10, after=died, exclude="n1") == "n2"
        print(f"dnsmasq killed on the primary to n2 primary: {time.monotonic() - died:.2f} s")
        [demotion] = [e for e in h.cluster.agents["n1"].events() if e["event"] == "demote"]
        assert demotion["cause"] == "unhealthy" and "dnsmasq-answers" in demotion["reason"], demotion
        assert [e for e in h.cluster.agents["n1"].events() if e["event"] == "fault"]
        wait_until(lambda: h.serving("n2") and h.holds("n2") and h.dns(h.ip) == n2, 10, "n2 to serve")
        assert not h.holds("n1")
