"""The two-node home of issue 12 in network namespaces, and one fault measured end to end.

Topology (harness.netns, one bridge): ``n1`` and ``n2``, each with a stand-in for Home Assistant
(harness.standin_ha, port 8123 on all addresses, IPv4 and IPv6, answering with its node's name), dnsmasq
(harness.dnsmasq: DHCP for the LAN, and DNS that answers ``whoami.test`` with its node's address), started and
stopped by whichever system moves the floating IP (``HasyncPair``: an agent with ``vip:`` (an IPv4 and an IPv6
address) and the dnsmasq recipe's hooks and checks, its resources fenced or kept through a broker loss;
``KeepalivedPair``: Debian's keepalived with the seed's VRRP configuration, IPv4 only, and dnsmasq in its
notify scripts); ``broker`` (Mosquitto); ``client`` (harness.homeprobe: an HTTP GET to the floating IP every
25 ms over IPv4 and over IPv6, a DNS query to it every 50 ms, a DHCP exchange every 100 ms; each answer or
failure with its time and the node that answered, and for DHCP every server that offered).

Observers, each a process whose lines a thread reads: ``ip -ts monitor address`` in both nodes (when
each held each floating IP, with ``ip``'s own timestamps), ``ip -ts monitor neigh`` in the client (which
MAC its ARP and IPv6 neighbour entries for the floating IPs point at), and the client's probes. Every time
is ``time.monotonic()`` (``ip``'s wall-clock stamps are converted), one clock for every namespace.

``Home.measure(system, fault)`` waits until the pair is steady, injects the fault into the node that
holds the address, waits until the other node answers the client (HTTP, DNS, DHCP), lets the fault stand
for ``hold`` seconds more, lifts it (restarts, thaws, plugs the cable back, heals the cut) and waits until
the pair is steady again; harness.timeline turns the records of that window into a ``Sample``. Every wait is
bounded; ``Home.close`` (or leaving the ``with``) stops every process it started, by its own handle (and any
dnsmasq left behind, by its pidfile), and deletes the namespaces, whose iptables rules go with them.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self, TypeVar

from hasync.audit import Tenure, decreasing_terms, overlaps, tenures, terms_with_two_winners
from hasync.election import Timing

from . import dnsmasq, netns
from .agents import Cluster
from .brokers import MosquittoProcess
from .dnsmasq import WHOAMI
from .standin_ha import PORT as HA_PORT
from .timeline import Attempt, Doubles, answered_by, both_answered, outages, two_holders, two_servers
from .wait import free_port, wait_until

NODES = ("n1", "n2")
VIP_HOST = 50  # the floating IPs are .50 in the LAN's /24 and ::50 in its IPv6 /64
CLIENT_HOST = 13  # the client's IPv6 address is ::13 (its IPv4 one is .13: harness.netns, the fourth namespace)
# Steady again after a fault may take a client's ARP entry expiring: keepalived's master does not announce
# again when a split heals, and the client keeps the backup's MAC until its entry fails (reachable_time
# 15-45 s, then 5 s of delay and 3 probes).
STEADY_TIMEOUT = 120.0
FAILOVER_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
MARKER = "192.0.2.77"  # TEST-NET-1: an address or neighbour a monitor must report before it counts as ready

PRODUCTION = {key: getattr(Timing(), key) for key in (
    "lease_duration", "renew_deadline", "renew_interval", "heartbeat_interval", "claim_stagger", "preempt_delay")}


class Fault(enum.StrEnum):
    KILL = "kill"  # kill -9 of the holder's agent (keepalived: of its keepalived)
    STOP = "stop"  # SIGSTOP of it, SIGCONT once the other node answers
    LINK = "link"  # the holder's cable pulled (its veth's bridge end down), plugged back
    CUT = "cut"  # hasync: the holder cut off from the broker only; keepalived: the two nodes from each other
    BROKER = "broker"  # the broker killed (SIGKILL) and started again at once; hasync only
    STEP_DOWN = "step-down"  # hasync step-down; keepalived stopped gracefully (SIGTERM) and started again


def other(node: str) -> str:
    return NODES[1] if node == NODES[0] else NODES[0]


# ---- processes whose output a thread reads -----------------------------------------------------------


class LineReader:
    """A child process (in its own session, so nothing it spawns outlives ``close``) whose stdout lines a
    thread hands to ``on_line`` with the time they were read; stderr goes to ``log``."""

    def __init__(self, argv: Sequence[str], on_line: Callable[[str], None], log: Path) -> None:
        self.argv = list(argv)
        self._on_line = on_line
        self._log = log
        self.process: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        with self._log.open("a") as log:
            self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                            text=True, start_new_session=True)
        self._thread = threading.Thread(target=self._read, name=f"reader-{self.argv[-1]}", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self._on_line(line.rstrip("\n"))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


_WALL_TO_MONOTONIC = time.time() - time.monotonic()


def _ip_stamp(line: str) -> tuple[float, str] | None:
    """``[2026-12-03T01:38:44.845356] rest`` (``ip -ts``, local wall clock) as (monotonic time, rest)."""
    if not line.startswith("["):
        return None
    stamp, _, rest = line[1:].partition("] ")
    try:
        wall = datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None
    return wall - _WALL_TO_MONOTONIC, rest


def _until_seen(seen: threading.Event, what: str, make: Callable[[], object], undo: Callable[[], object],
                timeout: float = 10.0) -> None:
    """Make a marker change and undo it until a monitor reports it: the monitor may not have subscribed
    yet when the first one happens."""
    deadline = time.monotonic() + timeout
    while True:
        make()
        seen.wait(0.2)
        undo()
        if seen.is_set():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")


class AddressMonitor:
    """When ``node`` held each of ``ips`` on its eth0: ``changes[ip]`` is ``[(t, held)]``, its state when the
    monitor became ready first."""

    def __init__(self, lan: netns.Lan, node: str, ips: Sequence[str], workdir: Path) -> None:
        self.lan, self.node = lan, node
        self.changes: dict[str, list[tuple[float, bool]]] = {ip: [] for ip in ips}
        self._ready = threading.Event()
        self._reader = LineReader([*lan.prefix(node), *netns.realtime(), "ip", "-ts", "-o", "monitor", "address"],
                                  self._line, workdir / f"monitor-{node}.log")

    def _line(self, line: str) -> None:
        parsed = _ip_stamp(line)
        if parsed is None:
            return
        t, rest = parsed
        found = _ADDRESS.search(rest)
        if found is None:
            return
        ip = found.group(1)
        if ip == MARKER:
            self._ready.set()
        elif ip in self.changes and " eth0" in rest and (changes := self.changes[ip]):
            held = not rest.startswith("Deleted ")
            if t > changes[-1][0] and held != changes[-1][1]:
                changes.append((t, held))

    def start(self) -> Self:
        self._reader.start()
        # Ready once it reports an address added after it started: no change can slip past unseen.
        _until_seen(self._ready, f"the address monitor in {self.node}",
                    lambda: self.lan.run_in(self.node, "ip", "addr", "add", f"{MARKER}/32", "dev", "lo"),
                    lambda: self.lan.run_in(self.node, "ip", "addr", "del", f"{MARKER}/32", "dev", "lo"))
        now, present = time.monotonic(), addresses(self.lan, self.node)
        for ip, changes in self.changes.items():
            changes.append((now, ip in present))
        return self

    def holds(self, ip: str) -> bool:
        return self.changes[ip][-1][1]

    def added_after(self, ip: str, t: float) -> float | None:
        return next((c for c, held in list(self.changes[ip]) if held and c > t), None)

    def close(self) -> None:
        self._reader.close()


_ADDRESS = re.compile(r" inet6? ([0-9a-f.:]+)/")


class NeighbourMonitor:
    """Which MAC the client's neighbour entry (ARP, IPv6 neighbour discovery) for each of ``ips`` points at:
    ``changes[ip]`` is ``[(t, mac)]``, None while it has none (or a failed one)."""

    def __init__(self, lan: netns.Lan, node: str, ips: Sequence[str], workdir: Path) -> None:
        self.lan, self.node = lan, node
        self.changes: dict[str, list[tuple[float, str | None]]] = {ip: [] for ip in ips}
        self._ready = threading.Event()
        self._reader = LineReader([*lan.prefix(node), *netns.realtime(), "ip", "-ts", "-o", "monitor", "neigh"],
                                  self._line, workdir / f"monitor-neigh-{node}.log")

    def _line(self, line: str) -> None:
        parsed = _ip_stamp(line)
        if parsed is None:
            return
        t, rest = parsed
        words = rest.removeprefix("Deleted ").split()
        if not words:
            return
        if words[0] == MARKER:
            self._ready.set()
        elif words[0] in self.changes and (changes := self.changes[words[0]]):
            mac = None
            if "lladdr" in words and not rest.startswith("Deleted ") and "FAILED" not in words:
                mac = words[words.index("lladdr") + 1]
            if t > changes[-1][0] and mac != changes[-1][1]:
                changes.append((t, mac))

    def start(self) -> Self:
        self._reader.start()
        _until_seen(self._ready, f"the neighbour monitor in {self.node}",
                    lambda: self.lan.run_in(self.node, "ip", "neigh", "replace", MARKER, "lladdr",
                                            "02:00:00:00:00:77", "dev", "eth0"),
                    lambda: self.lan.run_in(self.node, "ip", "neigh", "del", MARKER, "dev", "eth0"))
        now = time.monotonic()
        for ip, changes in self.changes.items():
            changes.append((now, neighbour(self.lan, self.node, ip)))
        return self

    def switched_to(self, ip: str, mac: str, after: float) -> float | None:
        return next((t for t, m in list(self.changes[ip]) if m == mac and t > after), None)

    def close(self) -> None:
        self._reader.close()


# The client's probes: how many of each one's last attempts must all have been answered by the holder for the
# pair to count as steady (DHCP: by the holder alone).
STEADY_ANSWERS = {"http": 5, "http6": 5, "dns": 3, "dhcp": 3}
FRESH = 1.0  # s: the latest of them started at most this long ago


class Client:
    """The client's probes (harness.homeprobe) in its namespace; ``attempts`` grows as they answer, each with
    ``who`` (and DHCP's ``servers``) as node names where the answer named a node's address."""

    def __init__(self, lan: netns.Lan, node: str, vips: Vips, workdir: Path, interval: float) -> None:
        self.attempts: list[Attempt] = []
        self._names = {address: name for name, address in lan.addresses.items()}
        self._ready = threading.Event()
        self._reader = LineReader([*lan.prefix(node), sys.executable, "-m", "harness.homeprobe",
                                   "--http", f"{vips.v4}:{HA_PORT}", "--http", f"[{vips.v6}]:{HA_PORT}",
                                   "--dns", vips.v4, WHOAMI, "--dhcp", "eth0", "--interval", str(interval)],
                                  self._line, workdir / "client.log")

    def _line(self, line: str) -> None:
        record = json.loads(line)
        if record.get("ready"):
            self._ready.set()
            return
        who = record["who"]
        self.attempts.append(Attempt(record["probe"], record["start"], record["end"], record["ok"],
                                     self._names.get(who, who), record["error"],
                                     tuple(self._names.get(s, s) for s in record["servers"])))

    def start(self) -> Self:
        self._reader.start()
        wait_until(self._ready.is_set, 15, "the client's probes to start")
        return self

    def answering(self, who: str, now: float, probes: Iterable[str]) -> bool:
        """For each of ``probes``, its last attempts (``STEADY_ANSWERS``) all answered by ``who`` alone, the
        latest started just now."""
        for probe in probes:
            count = STEADY_ANSWERS[probe]
            mine = [a for a in self.attempts[-400:] if a.probe == probe]
            last = sorted(mine, key=lambda a: a.start)[-count:]
            if not (len(last) == count and all(a.ok and a.who == who and set(a.servers) <= {who} for a in last)
                    and now - last[-1].start < FRESH):
                return False
        return True

    def close(self) -> None:
        self._reader.close()


def addresses(lan: netns.Lan, node: str) -> set[str]:
    """The IPv4 and IPv6 addresses on the node's eth0, without prefix length."""
    out = json.loads(lan.run_in(node, "ip", "-j", "addr", "show", "dev", "eth0"))
    return {a["local"] for link in out for a in link["addr_info"]}


def mac(lan: netns.Lan, node: str) -> str:
    return str(json.loads(lan.run_in(node, "ip", "-j", "link", "show", "dev", "eth0"))[0]["address"])


def neighbour(lan: netns.Lan, node: str, ip: str) -> str | None:
    out = json.loads(lan.run_in(node, "ip", "-j", "neigh", "show", "to", ip, "dev", "eth0"))
    if not out or "FAILED" in out[0].get("state", []):
        return None
    found = out[0].get("lladdr")
    return str(found) if found else None


class NamespacedMosquitto(MosquittoProcess):
    """Mosquitto inside a namespace of the LAN, listening on that node's address."""

    def __init__(self, workdir: Path, lan: netns.Lan, node: str) -> None:
        port = free_port()
        super().__init__(workdir, port=port, extra_config=[f"listener {port} {lan.addresses[node]}"])
        self.host = lan.addresses[node]
        self._prefix = lan.prefix(node)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self._log_file() as log:
            return subprocess.Popen([*self._prefix, self.binary, "-c", str(self.config_path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)


# ---- the two systems under test ----------------------------------------------------------------------


class System(Protocol):
    name: str
    quiet: float  # seconds after the fault is lifted before the pair counts as steady
    ips: tuple[str, ...]  # the floating IPs it moves (the home's IPv4 one first)
    probes: tuple[str, ...]  # the client's probes it serves (http6 only if it moves the IPv6 address)

    def start(self) -> None: ...

    def close(self) -> None: ...

    def holder(self) -> str | None:
        """The node that should hold the floating IP now, if the pair agrees on one."""
        ...

    def supports(self, fault: Fault) -> bool: ...

    def inject(self, fault: Fault, node: str) -> None: ...

    def restore(self, fault: Fault, node: str) -> None: ...

    def logs(self) -> str: ...


class HasyncPair:
    """An hasync agent on each node, production timings, ``vip:`` for the floating IPs (IPv4 and IPv6), the
    dnsmasq recipe (examples/dnsmasq: its hook script as the promote and demote hook, ``on_promote_failure:
    handover``, a DNS check of the node's own dnsmasq on the primary only, the LAN interface tracked), an http
    health check on the local HA stand-in (the seed's ``vrrp_script``), ``preempt: false``. ``broker_loss``: the
    addresses' and the hooks' ``on_broker_loss`` (fenced, the default, or kept)."""

    def __init__(self, home: Home, broker_loss: str = "fenced") -> None:
        self.home = home
        self.broker_loss = broker_loss
        self.name = f"hasync-{broker_loss}"
        self.quiet = PRODUCTION["lease_duration"] + 1.5  # a (re)connected node observes a lease before it may claim
        self.ips: tuple[str, ...] = home.vips.both
        self.probes: tuple[str, ...] = ("http", "http6", "dns", "dhcp")
        self.cluster: Cluster | None = None
        self.deaths: dict[str, float] = {}  # "node#incarnation" -> the time of its kill -9
        self._ready_since: dict[str, float] = {}  # "node#incarnation" -> first seen eligible and connected
        self.pidfiles: list[Path] = []

    def start(self) -> None:
        home = self.home
        # A directory and topic prefix per pair: a pair started for the next fault reads only its own events.
        tag = secrets.token_hex(3)
        workdir = home.workdir / f"hasync-{tag}"
        self.cluster = Cluster(workdir, home.broker.url, f"home-{tag}")
        for node, priority in zip(NODES, (200, 150), strict=True):
            conf, pidfile = home.dnsmasq(workdir / f"dnsmasq-{node}", node)
            self.pidfiles.append(pidfile)
            address = home.lan.addresses[node]
            hook = dnsmasq.hook(conf, pidfile)
            self.cluster.add(
                node, priority=priority, preempt=False, command_prefix=home.lan.prefix(node),
                election=PRODUCTION, broker={"keepalive": 5, "reconnect_min": 0.2, "reconnect_max": 10.0},
                http={"host": address}, log={"level": "INFO"},
                vip=[{"address": f"{home.vips.v4}/24", "interface": "eth0", "on_broker_loss": self.broker_loss},
                     {"address": f"{home.vips.v6}/64", "interface": "eth0", "on_broker_loss": self.broker_loss}],
                hooks={"promote": hook, "demote": hook, "fence": hook, "on_broker_loss": self.broker_loss,
                       "on_promote_failure": "handover", "timeout": 30},
                health_checks=[
                    {"name": "ha", "type": "http", "url": f"http://127.0.0.1:{HA_PORT}/"},
                    {"name": "dnsmasq-answers", "type": "dns", "server": address, "query": WHOAMI,
                     "expect": [address], "when": "primary", "interval": 5, "timeout": 2, "fall": 2},
                    {"name": "lan", "type": "interface", "interface": "eth0"}])

    def _cluster(self) -> Cluster:
        if self.cluster is None:
            raise RuntimeError("the hasync pair is not started")
        return self.cluster

    def close(self) -> None:
        if self.cluster is None:
            return
        try:
            for agent in self.cluster.agents.values():
                if agent.alive:
                    agent.signal(signal.SIGCONT)
                    agent.status()  # two answers: its timers ran since it woke, a past demotion is logged
                    agent.status()
            self.audit()
        finally:
            self.cluster.stop_all()
            for pidfile in self.pidfiles:  # one a killed agent left behind and nobody stopped
                dnsmasq.kill(pidfile)

    def _tenures(self) -> list[Tenure]:
        """Per incarnation: a node killed in one run and restarted is a new process, and its tenure of the
        first run must not stretch to its kill in a later one (``Cluster.deaths`` holds one per node)."""
        events = [{**e, "node": f"{e['node']}#{e.get('incarnation', '')}"}
                  for a in self._cluster().agents.values() for e in a.events()]
        return tenures(events, time.monotonic(), self.deaths)

    def audit(self) -> None:
        """Never two primaries at once, one winner per term, terms never down (the agents' own events)."""
        both = overlaps(self._tenures())
        assert not both, f"two primaries at once: {both}"
        events = self._cluster().all_events()
        assert not terms_with_two_winners(events), terms_with_two_winners(events)
        assert not decreasing_terms(events), decreasing_terms(events)

    def handover(self, old: str, new: str) -> float | None:
        """Seconds from ``old``'s last demotion to ``new``'s promotion after it (the agents' own events): a
        graceful handover's time, its demote hook included (the release waits for it)."""
        events = self._cluster().all_events()
        promoted = [e["t"] for e in events if e["event"] == "promote" and e["node"] == new]
        if not promoted:
            return None
        demoted = [e["t"] for e in events if e["event"] == "demote" and e["node"] == old and e["t"] <= promoted[-1]]
        return promoted[-1] - demoted[-1] if demoted else None

    def holder(self) -> str | None:
        cluster = self._cluster()
        now = time.monotonic()
        acting = [t.node.partition("#")[0] for t in self._tenures() if t.end >= now]
        leader = acting[0] if len(acting) == 1 else None
        if leader is None or not all(a.alive for a in cluster.agents.values()):
            return None
        statuses = {node: agent.status() for node, agent in cluster.agents.items()}
        if {node: s.get("role") for node, s in statuses.items()} != {leader: "primary", other(leader): "standby"}:
            return None
        # The standby could take over at once: healthy, and connected for a lease (a node that just (re)connected
        # observes a full lease before it may claim); an agent's start-up takes seconds on a loaded machine.
        standby = statuses[other(leader)]
        key = f"{other(leader)}#{standby.get('incarnation')}"
        if not (standby.get("eligible") and standby.get("connected")):
            self._ready_since.pop(key, None)
            return None
        since = self._ready_since.setdefault(key, now)
        return leader if now - since >= PRODUCTION["lease_duration"] else None

    def supports(self, fault: Fault) -> bool:
        return True

    def inject(self, fault: Fault, node: str) -> None:
        cluster = self._cluster()
        self._ready_since.clear()  # observed again once the fault is lifted
        match fault:
            case Fault.KILL:
                events = cluster.agents[node].events()
                incarnation = events[-1].get("incarnation", "") if events else ""
                self.deaths[f"{node}#{incarnation}"] = cluster.agents[node].kill()
            case Fault.STOP:
                cluster.agents[node].signal(signal.SIGSTOP)
            case Fault.LINK:
                self.home.link(node, up=False)
            case Fault.CUT:
                self.home.cut(node, "broker")
            case Fault.BROKER:
                self.home.broker.kill()
                self.home.broker.start()  # at once, as systemd's Restart= would
            case Fault.STEP_DOWN:
                agent = cluster.agents[node]
                subprocess.run([sys.executable, "-m", "hasync", "step-down", "--config", str(agent.config_path),
                                "--node", node], check=True, capture_output=True, timeout=30)

    def restore(self, fault: Fault, node: str) -> None:
        cluster = self._cluster()
        match fault:
            case Fault.KILL:
                # A (re)connected node claims, even on a will, only after observing for a lease: holder() counts
                # the pair steady once the restarted standby has been connected and eligible that long.
                agent = cluster.agents[node].start()
                wait_until(lambda: agent.status().get("connected"), FAILOVER_TIMEOUT, f"{node} to connect")
            case Fault.STOP:
                cluster.agents[node].signal(signal.SIGCONT)
            case Fault.LINK:
                self.home.link(node, up=True)
            case Fault.CUT:
                self.home.heal(node)
            case Fault.BROKER | Fault.STEP_DOWN:
                pass

    def logs(self) -> str:
        return self.cluster.logs() if self.cluster is not None else ""


KEEPALIVED_CONF = """\
global_defs {{
    router_id {node}
    script_user root
    enable_script_security
}}

vrrp_script chk_ha {{
    script "/usr/bin/curl -fsS -o /dev/null --max-time 1 http://127.0.0.1:{port}/"
    interval 2
    timeout 2
    fall 2
    rise 2
}}

vrrp_instance HA {{
    state {state}
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int 1
    authentication {{
        auth_type PASS
        auth_pass hasync
    }}
    virtual_ipaddress {{
        {vip}/24 dev eth0
    }}
    track_script {{
        chk_ha
    }}
{notify}}}
"""
# dnsmasq on the master only, as keepalived users do it: notify scripts on each state change. Not the seed's (it
# ran no dnsmasq); the rest of the configuration above is.
KEEPALIVED_NOTIFY = """\
    notify_master "{script} master"
    notify_backup "{script} backup"
    notify_fault "{script} fault"
    notify_stop "{script} stop"
"""
# The notify script: `systemctl start dnsmasq` on master, `systemctl stop dnsmasq` otherwise; there is no systemd
# in the namespaces, so it starts and stops dnsmasq by pidfile exactly as the recipe's hook script does for hasync
# (the same script, run here with the arguments it takes from hasync).
NOTIFY_SCRIPT = """\
#!/bin/sh
case "$1" in
  master) export HASYNC_EVENT=promote HASYNC_TERM=vrrp ;;
  *) export HASYNC_EVENT=demote HASYNC_REASON="keepalived $1" ;;
esac
{hook}
"""
ADVERT_INT = 1.0


def keepalived_binary() -> str | None:
    for path in ("/usr/sbin/keepalived", "/sbin/keepalived"):
        if os.access(path, os.X_OK):
            return path
    return None


class KeepalivedPair:
    """Debian's keepalived on each node with the seed's configuration: VRRP (multicast, the default, to
    224.0.0.18 over the bridge), ``advert_int 1``, n1 ``state MASTER`` priority 150 and n2 ``BACKUP`` 100
    (so n1 preempts back), a ``vrrp_script`` curling the local HA stand-in, ``track_script``, the IPv4
    floating IP only; and dnsmasq started by ``notify_master``, stopped by ``notify_backup``, ``notify_fault``
    and ``notify_stop``."""

    name = "keepalived"
    probes: tuple[str, ...] = ("http", "dns", "dhcp")

    def __init__(self, home: Home) -> None:
        binary = keepalived_binary()
        if binary is None:
            raise FileNotFoundError("keepalived is not installed (Debian: apt-get install keepalived)")
        self.binary = binary
        self.home = home
        self.quiet = 3 * ADVERT_INT + 1.0  # a restarted master preempts, the backup's master-down timer runs out
        self.ips: tuple[str, ...] = (home.vips.v4,)
        self.workdir = home.workdir / f"keepalived-{secrets.token_hex(3)}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pidfiles: list[Path] = []

    def _config(self, node: str) -> Path:
        """Written once per pair: a restarted keepalived reads the same files."""
        path = self.workdir / f"{node}.conf"
        if path.exists():
            return path
        conf, pidfile = self.home.dnsmasq(self.workdir / f"dnsmasq-{node}", node)
        self.pidfiles.append(pidfile)
        script = self.workdir / f"{node}-notify.sh"
        script.write_text(NOTIFY_SCRIPT.format(hook=dnsmasq.hook(conf, pidfile)))
        script.chmod(0o755)
        path.write_text(KEEPALIVED_CONF.format(node=node, port=HA_PORT, vip=self.home.vips.v4,
                                               state="MASTER" if node == NODES[0] else "BACKUP",
                                               priority=150 if node == NODES[0] else 100,
                                               notify=KEEPALIVED_NOTIFY.format(script=script)))
        return path

    def _start(self, node: str) -> None:
        files = {flag: str(self.workdir / f"{node}.{what}.pid") for flag, what in (("-p", "main"), ("-r", "vrrp"),
                                                                                   ("-c", "checkers"))}
        argv = [*self.home.lan.prefix(node), self.binary, "--dont-fork", "--log-console", "--log-detail",
                "--no-syslog", "--vrrp", "-f", str(self._config(node)),
                *(x for flag, path in files.items() for x in (flag, path))]
        with (self.workdir / f"{node}.log").open("ab") as log:
            # A session of its own: kill -9 of "keepalived" reaches its VRRP child and running scripts too.
            self.processes[node] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                    start_new_session=True)

    def start(self) -> None:
        for node in NODES:
            self._start(node)

    def _group(self, node: str, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.processes[node].pid, sig)

    def _stop(self, node: str) -> None:
        process = self.processes.get(node)
        if process is None:
            return
        if process.poll() is None:
            self._group(node, signal.SIGCONT)
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._group(node, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        self._group(node, signal.SIGKILL)  # a child the parent did not take with it

    def close(self) -> None:
        for node in NODES:
            self._stop(node)
        for pidfile in self.pidfiles:  # one a killed keepalived left behind
            dnsmasq.kill(pidfile)

    def holder(self) -> str | None:
        alive = all(p.poll() is None for p in self.processes.values())
        return NODES[0] if alive else None  # the highest priority, and VRRP preempts

    def supports(self, fault: Fault) -> bool:
        return fault != Fault.BROKER

    def inject(self, fault: Fault, node: str) -> None:
        match fault:
            case Fault.KILL:
                self._group(node, signal.SIGKILL)
                self.processes[node].wait(STOP_TIMEOUT)
            case Fault.STOP:
                self._group(node, signal.SIGSTOP)
            case Fault.LINK:
                self.home.link(node, up=False)
            case Fault.CUT:
                self.home.cut(node, other(node))
                self.home.cut(other(node), node)
            case Fault.STEP_DOWN:
                self._stop(node)
            case Fault.BROKER:
                raise ValueError("VRRP has no broker")

    def restore(self, fault: Fault, node: str) -> None:
        match fault:
            case Fault.KILL | Fault.STEP_DOWN:
                self._start(node)
            case Fault.STOP:
                self._group(node, signal.SIGCONT)
            case Fault.LINK:
                self.home.link(node, up=True)
            case Fault.CUT:
                self.home.heal(node)
                self.home.heal(other(node))
            case Fault.BROKER:
                pass

    def logs(self) -> str:
        return "\n".join(f"==== keepalived {n}\n{(self.workdir / f'{n}.log').read_text(errors='replace')[-4000:]}"
                         for n in NODES if (self.workdir / f"{n}.log").exists())


# ---- the home ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vips:
    """The floating IPs: IPv4 (in the LAN's /24) and IPv6 (in a ULA /64 of the LAN's own)."""

    v4: str
    v6: str

    @property
    def both(self) -> tuple[str, str]:
        return self.v4, self.v6


@dataclass(frozen=True)
class Sample:
    """One fault, end to end. Seconds. ``outage`` and ``restore_outage`` per client probe the system serves
    (http, http6, dns, dhcp); ``two_holders`` and ``moved`` per floating IP it moves (by family: ipv4, ipv6);
    ``moved``: fault → the client's neighbour entry (ARP, IPv6 neighbour) on the new holder's MAC, None if it did
    not move within the window (or the holder stayed the same, after a broker restart)."""

    system: str
    fault: Fault
    at: float  # the fault's time (time.monotonic())
    old: str
    new: str
    failover: float  # fault → the first HTTP answer from the new holder (once it holds the address) arrived
    lifted: float  # fault → the fault lifted (the new holder answered every probe, then ``hold`` passed)
    outage: dict[str, float]  # the longest run of failed attempts the fault caused (0: none failed), per probe
    restore_outage: dict[str, float]  # the same, once the fault was lifted, until steady again
    two_holders: dict[str, float]  # both nodes had the floating IP configured (fault → steady again)
    two_dhcp: Doubles  # DHCP exchanges that two servers answered (fault → steady again)
    both_answered: float  # HTTP: the new holder's first answer → the old one's last answer after it, until lifted
    moved: dict[str, float | None]
    final: str  # the holder once steady again


def family(ip: str) -> str:
    return "ipv6" if ":" in ip else "ipv4"


def unavailable() -> str | None:
    """Why the home cannot be built here, or None."""
    return dnsmasq.missing()


class Home:
    """``with Home(workdir) as home:`` builds the LAN, the broker, the HA stand-ins, the observers and the
    client; a system (``HasyncPair(home)``, ``KeepalivedPair(home)``) is started and closed within it."""

    def __init__(self, workdir: Path, *, probe_interval: float = 0.025, hold: float = 1.0) -> None:
        """``hold``: seconds a fault stands after the other node answers, before it is lifted."""
        self.workdir = workdir
        self.hold = hold
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.probe_interval = probe_interval
        self._stack = contextlib.ExitStack()
        self._cuts: dict[str, list[list[str]]] = {}
        self._pidfiles: list[Path] = []
        self.lan = netns.Lan([*NODES, "broker", "client"])
        self.vips = Vips("", "")
        self.macs: dict[str, str] = {}
        self.monitors: dict[str, AddressMonitor] = {}

    def __enter__(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for node in list(self._cuts):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.heal(node)
        for pidfile in self._pidfiles:
            dnsmasq.kill(pidfile)
        self._stack.close()

    def _build(self) -> None:
        lan = self._stack.enter_context(self.lan)
        third = int(lan.gateway.split(".")[2])
        self.vips = Vips(f"10.213.{third}.{VIP_HOST}", f"fd00:213:{third:x}::{VIP_HOST}")
        # The client needs an address in the IPv6 floating IP's prefix to reach it (the nodes get theirs with it).
        lan.run_in("client", "ip", "addr", "add", f"fd00:213:{third:x}::{CLIENT_HOST}/64", "dev", "eth0", "nodad")
        self.broker = NamespacedMosquitto(self.workdir / "broker", lan, "broker")
        self.broker.start()
        self._stack.callback(self.broker.stop)
        for node in NODES:
            self.macs[node] = mac(lan, node)
            ready = threading.Event()

            def on_line(line: str, ready: threading.Event = ready) -> None:
                if line == "READY":
                    ready.set()

            standin = LineReader([*lan.prefix(node), sys.executable, "-m", "harness.standin_ha", node], on_line,
                                 self.workdir / f"standin-{node}.log").start()
            self._stack.callback(standin.close)
            wait_until(ready.is_set, 15, f"the HA stand-in on {node}")
            monitor = AddressMonitor(lan, node, self.vips.both, self.workdir)
            self._stack.callback(monitor.close)
            self.monitors[node] = monitor.start()
        self.neighbour = NeighbourMonitor(lan, "client", self.vips.both, self.workdir)
        self._stack.callback(self.neighbour.close)
        self.neighbour.start()
        self.client = Client(lan, "client", self.vips, self.workdir, self.probe_interval)
        self._stack.callback(self.client.close)
        self.client.start()

    def dnsmasq(self, directory: Path, node: str) -> tuple[Path, Path]:
        """A dnsmasq configuration for ``node`` in ``directory``: (its file, the pidfile its dnsmasq will write).
        A dnsmasq still running when the home closes is killed."""
        directory.mkdir(parents=True, exist_ok=True)
        conf, pidfile = directory / "dnsmasq.conf", directory / "dnsmasq.pid"
        dnsmasq.write_config(conf, self.lan, node, self.vips.v4)
        self._pidfiles.append(pidfile)
        return conf, pidfile

    # ---- network faults, undone by close() whatever happens ----

    def link(self, node: str, *, up: bool) -> None:
        netns.run("ip", "link", "set", self.lan.veth(node), "up" if up else "down")

    def cut(self, node: str, peer: str) -> None:
        """Drop everything between ``node`` and ``peer`` (iptables in ``node``'s namespace, both ways)."""
        rules = [["INPUT", "-s", self.lan.addresses[peer], "-j", "DROP"],
                 ["OUTPUT", "-d", self.lan.addresses[peer], "-j", "DROP"]]
        for rule in rules:
            self._cuts.setdefault(node, []).append(rule)
            self.lan.run_in(node, "iptables", "-A", *rule)

    def heal(self, node: str) -> None:
        for rule in self._cuts.pop(node, []):
            self.lan.run_in(node, "iptables", "-D", *rule)

    # ---- measuring ----

    def holding(self, system: System) -> list[str]:
        """The nodes that hold any of the system's floating IPs."""
        return [n for n, m in self.monitors.items() if any(m.holds(ip) for ip in system.ips)]

    def steady(self, system: System, since: float, timeout: float = STEADY_TIMEOUT) -> str:
        """Wait until the pair is steady (``system.quiet`` after ``since``): one node holds the floating IPs, the
        other none, and the client's last answers (HTTP, DNS, DHCP) all came from it alone."""

        missing = ["the quiet period"]

        def check() -> str | None:
            now = time.monotonic()
            if now - since < system.quiet:
                return None
            holder = system.holder()
            last = {p: max((a for a in self.client.attempts[-200:] if a.probe == p), key=lambda a: a.start,
                           default=None) for p in system.probes}
            missing[:] = [f"holder {holder}, holding {self.holding(system)}, client's neighbour entries "
                          f"{ {ip: neighbour(self.lan, 'client', ip) for ip in system.ips} } (MACs {self.macs}), "
                          f"last answers {last}"]
            if holder is None or not all(self.monitors[holder].holds(ip) for ip in system.ips) \
                    or self.holding(system) != [holder]:
                return None
            # Not the client's ARP entry: the nodes forward (net.ipv4.ip_forward is 1 in new namespaces here,
            # as on a Home Assistant host with Docker), so after keepalived's split heals the client may keep
            # the backup's MAC for good, the backup passing its requests on to the master.
            return holder if self.client.answering(holder, now, system.probes) else None

        try:
            return wait_until(check, timeout, f"{system.name} to be steady", step=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {missing[0]}") from None

    def _serves(self, system: System, node: str, since: float) -> bool:
        """``node`` holds the floating IPs and has answered every client probe since ``since`` (DHCP: offered)."""
        attempts = list(self.client.attempts)
        return (all(self.monitors[node].added_after(ip, since) for ip in system.ips)
                and all(any(a.ok and a.end >= since and (a.who == node or node in a.servers)
                            for a in attempts if a.probe == probe) for probe in system.probes))

    def measure(self, system: System, fault: Fault) -> Sample:
        old = self.steady(system, 0.0)
        new = other(old)
        t_fault = time.monotonic()
        system.inject(fault, old)
        if fault == Fault.BROKER:  # restarted at once: whoever the election picks takes it, maybe the same node
            new = self.steady(system, t_fault)
        else:
            wait_until(lambda: self._serves(system, new, t_fault), FAILOVER_TIMEOUT,
                       f"{new} to answer the client for the floating IPs ({system.name}, {fault})", step=0.01)
        added = self.monitors[new].added_after(self.vips.v4, t_fault)
        # (From its add only when the same node may hold it again: a monitor's stamp can come after the first
        # answer that address gave.)
        over = answered_by(self.client.attempts, new, added if added is not None and new == old else t_fault)
        assert over is not None
        # The fault stands a while after the failover (the observation window, not a wait for an event): a
        # node that cannot let go (killed, frozen, cut off) shows as two holders for at least this long.
        time.sleep(self.hold)
        t_restore = time.monotonic()
        system.restore(fault, old)
        final = self.steady(system, t_restore)
        t_end = time.monotonic()
        attempts = list(self.client.attempts)

        def longest(probe: str, t0: float, t1: float) -> float:
            runs = [o for o in outages(attempts, t_fault, t_end, probe) if t0 <= o.start < t1]
            return max((o.seconds(t_end) for o in runs), default=0.0)

        first, second = (self.monitors[n] for n in NODES)
        return Sample(
            system=system.name, fault=fault, at=t_fault, old=old, new=new, failover=over - t_fault,
            lifted=t_restore - t_fault,
            outage={p: longest(p, float("-inf"), t_restore) for p in system.probes},
            restore_outage={p: longest(p, t_restore, float("inf")) for p in system.probes},
            two_holders={family(ip): two_holders(first.changes[ip], second.changes[ip], t_fault, t_end)
                         for ip in system.ips},
            two_dhcp=two_servers(attempts, t_fault, t_end),
            both_answered=0.0 if new == old else both_answered(attempts, old, new, t0=t_fault, t1=t_restore),
            moved={family(ip): None if (t := self.neighbour.switched_to(ip, self.macs[new], t_fault)) is None
                   else t - t_fault for ip in system.ips},
            final=final)

    def changes(self, since: float) -> str:
        """What the observers saw since ``since`` (seconds after it): each node's floating IPs, the client's
        neighbour entries for them, the client's failed attempts per probe (first, last, how many, the last
        error): for a run whose figures need explaining."""
        lines = []
        names: dict[str | None, str | None] = {m: n for n, m in self.macs.items()}
        for ip in self.vips.both:
            for node, monitor in self.monitors.items():
                held = [(round(t - since, 3), h) for t, h in monitor.changes[ip] if t >= since]
                lines.append(f"{ip} on {node}: {held}")
            entry = [(round(t - since, 3), names.get(m, m)) for t, m in self.neighbour.changes[ip] if t >= since]
            lines.append(f"{ip} client's entry: {entry}")
        for probe in STEADY_ANSWERS:
            failed = [a for a in self.client.attempts if a.probe == probe and not a.ok and a.start >= since]
            if failed:
                lines.append(f"{probe}: {len(failed)} failed from {failed[0].start - since:.3f} to "
                             f"{failed[-1].start - since:.3f}, last: {failed[-1].error}")
        return "\n".join(lines)

    def logs(self, system: System | None = None) -> str:
        parts = [system.logs()] if system is not None else []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"==== {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        broker_log = self.broker.log_path
        if broker_log.exists():
            parts.append(f"==== broker\n{broker_log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


S = TypeVar("S", bound=System)


@contextlib.contextmanager
def running(system: S, home: Home, log: IO[str] | None = None) -> Iterator[S]:
    """Start ``system``, yield it, close it; on failure write the home's logs to ``log``."""
    try:
        system.start()
        yield system
    except BaseException:
        print(home.logs(system), file=log or sys.stdout)
        raise
    finally:
        system.close()
