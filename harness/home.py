"""The two-node home of issue 12 in network namespaces, and one fault measured end to end.

Topology (harness.netns, one bridge): ``n1`` and ``n2``, each with a stand-in for Home Assistant
(harness.standin_ha, port 8123 on all addresses, answering with its node's name) and whichever system
moves the floating IP (``HasyncPair``: an agent with ``vip:``; ``KeepalivedPair``: Debian's keepalived with
the seed's VRRP configuration); ``broker`` (Mosquitto); ``client`` (harness.homeprobe: an HTTP GET to the
floating IP every 25 ms, each answer or failure with its time and the node that answered).

Observers, each a process whose lines a thread reads: ``ip -ts monitor address`` in both nodes (when
each held the floating IP, with ``ip``'s own timestamps), ``ip -ts monitor neigh`` in the client (which
MAC its ARP entry for the floating IP points at), and the client's probes. Every time is
``time.monotonic()`` (``ip``'s wall-clock stamps are converted), one clock for every namespace.

``Home.measure(system, fault)`` waits until the pair is steady, injects the fault into the node that
holds the address, waits until the other node answers the client, lets the fault stand for ``hold``
seconds more, lifts it (restarts, thaws,
plugs the cable back, heals the cut) and waits until the pair is steady again; harness.timeline turns
the records of that window into a ``Sample``. Every wait is bounded; ``Home.close`` (or leaving the
``with``) stops every process it started, by its own handle, and deletes the namespaces, whose
iptables rules go with them.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Protocol, Self, TypeVar

from hasync.audit import Tenure, decreasing_terms, overlaps, tenures, terms_with_two_winners
from hasync.election import Timing

from . import netns
from .agents import Cluster
from .brokers import MosquittoProcess, mosquitto_binary
from .standin_ha import PORT as HA_PORT
from .timeline import Attempt, answered_by, both_answered, outages, two_holders
from .wait import free_port, wait_until

NODES = ("n1", "n2")
VIP_HOST = 50  # the floating IP is .50 in the LAN's /24
STEADY_ANSWERS = 5  # the client's last answers that must all come from the holder
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
    """When ``node`` held ``ip`` on its eth0: ``changes`` is ``[(t, held)]``, its state when the monitor
    became ready first."""

    def __init__(self, lan: netns.Lan, node: str, ip: str, workdir: Path) -> None:
        self.lan, self.node, self.ip = lan, node, ip
        self.changes: list[tuple[float, bool]] = []
        self._ready = threading.Event()
        self._reader = LineReader([*lan.prefix(node), *netns.realtime(), "ip", "-ts", "-o", "monitor", "address"],
                                  self._line, workdir / f"monitor-{node}.log")

    def _line(self, line: str) -> None:
        parsed = _ip_stamp(line)
        if parsed is None:
            return
        t, rest = parsed
        if f" inet {MARKER}/" in rest:
            self._ready.set()
        elif f" inet {self.ip}/" in rest and " eth0" in rest and self.changes:
            held = not rest.startswith("Deleted ")
            if t > self.changes[-1][0] and held != self.changes[-1][1]:
                self.changes.append((t, held))

    def start(self) -> Self:
        self._reader.start()
        # Ready once it reports an address added after it started: no change can slip past unseen.
        _until_seen(self._ready, f"the address monitor in {self.node}",
                    lambda: self.lan.run_in(self.node, "ip", "addr", "add", f"{MARKER}/32", "dev", "lo"),
                    lambda: self.lan.run_in(self.node, "ip", "addr", "del", f"{MARKER}/32", "dev", "lo"))
        self.changes.append((time.monotonic(), self.ip in addresses(self.lan, self.node)))
        return self

    def holds(self) -> bool:
        return self.changes[-1][1]

    def added_after(self, t: float) -> float | None:
        return next((c for c, held in list(self.changes) if held and c > t), None)

    def close(self) -> None:
        self._reader.close()


class NeighbourMonitor:
    """Which MAC the client's neighbour (ARP) entry for ``ip`` points at: ``changes`` is ``[(t, mac)]``,
    None while it has none (or a failed one)."""

    def __init__(self, lan: netns.Lan, node: str, ip: str, workdir: Path) -> None:
        self.lan, self.node, self.ip = lan, node, ip
        self.changes: list[tuple[float, str | None]] = []
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
        elif words[0] == self.ip and self.changes:
            mac = None
            if "lladdr" in words and not rest.startswith("Deleted ") and "FAILED" not in words:
                mac = words[words.index("lladdr") + 1]
            if t > self.changes[-1][0] and mac != self.changes[-1][1]:
                self.changes.append((t, mac))

    def start(self) -> Self:
        self._reader.start()
        _until_seen(self._ready, f"the neighbour monitor in {self.node}",
                    lambda: self.lan.run_in(self.node, "ip", "neigh", "replace", MARKER, "lladdr",
                                            "02:00:00:00:00:77", "dev", "eth0"),
                    lambda: self.lan.run_in(self.node, "ip", "neigh", "del", MARKER, "dev", "eth0"))
        self.changes.append((time.monotonic(), neighbour(self.lan, self.node, self.ip)))
        return self

    def mac(self) -> str | None:
        return self.changes[-1][1]

    def switched_to(self, mac: str, after: float) -> float | None:
        return next((t for t, m in list(self.changes) if m == mac and t > after), None)

    def close(self) -> None:
        self._reader.close()


class Client:
    """The client's probes (harness.homeprobe) in its namespace; ``attempts`` grows as they answer."""

    def __init__(self, lan: netns.Lan, node: str, vip: str, workdir: Path, interval: float) -> None:
        self.attempts: list[Attempt] = []
        self._ready = threading.Event()
        self._reader = LineReader([*lan.prefix(node), sys.executable, "-m", "harness.homeprobe", "--http",
                                   f"{vip}:{HA_PORT}", "--interval", str(interval)], self._line,
                                  workdir / "client.log")

    def _line(self, line: str) -> None:
        record = json.loads(line)
        if record.get("ready"):
            self._ready.set()
            return
        self.attempts.append(Attempt(record["probe"], record["start"], record["end"], record["ok"], record["who"],
                                     record["error"]))

    def start(self) -> Self:
        self._reader.start()
        wait_until(self._ready.is_set, 15, "the client's probes to start")
        return self

    def answering(self, who: str, now: float) -> bool:
        """The last ``STEADY_ANSWERS`` attempts answered, all by ``who``, the latest started just now."""
        last = sorted(self.attempts[-STEADY_ANSWERS * 4:], key=lambda a: a.start)[-STEADY_ANSWERS:]
        return (len(last) == STEADY_ANSWERS and all(a.ok and a.who == who for a in last)
                and now - last[-1].start < 0.5)

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
    """An hasync agent on each node, production timings, ``vip:`` for the floating IP, an http health check
    on the local HA stand-in (the seed's ``vrrp_script``), ``preempt: false``."""

    name = "hasync"

    def __init__(self, home: Home) -> None:
        self.home = home
        self.quiet = PRODUCTION["lease_duration"] + 1.5  # a (re)connected node observes a lease before it may claim
        self.cluster: Cluster | None = None
        self.deaths: dict[str, float] = {}  # "node#incarnation" -> the time of its kill -9
        self._observing_until = 0.0  # a restarted agent may not claim before

    def start(self) -> None:
        home = self.home
        # A directory and topic prefix per pair: a pair started for the next fault reads only its own events.
        tag = secrets.token_hex(3)
        self.cluster = Cluster(home.workdir / f"hasync-{tag}", home.broker.url, f"home-{tag}")
        for node, priority in zip(NODES, (200, 150), strict=True):
            self.cluster.add(
                node, priority=priority, preempt=False, command_prefix=home.lan.prefix(node),
                election=PRODUCTION, broker={"keepalive": 5, "reconnect_min": 0.2, "reconnect_max": 10.0},
                http={"host": home.lan.addresses[node]}, log={"level": "INFO"},
                vip=[{"address": f"{home.vip}/24", "interface": "eth0"}],
                health_checks=[{"name": "ha", "type": "http", "url": f"http://127.0.0.1:{HA_PORT}/"}])

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

    def holder(self) -> str | None:
        cluster = self._cluster()
        if time.monotonic() < self._observing_until:
            return None
        now = time.monotonic()
        acting = [t.node.partition("#")[0] for t in self._tenures() if t.end >= now]
        leader = acting[0] if len(acting) == 1 else None
        if leader is None or not all(a.alive for a in cluster.agents.values()):
            return None
        roles = {node: agent.status().get("role") for node, agent in cluster.agents.items()}
        return leader if roles == {leader: "primary", other(leader): "standby"} else None

    def supports(self, fault: Fault) -> bool:
        return True

    def inject(self, fault: Fault, node: str) -> None:
        cluster = self._cluster()
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
                # A (re)connected node claims, even on a will, only after observing for a lease: the pair is
                # steady once that is over (the quiet period counts from here, and a start can take seconds).
                agent = cluster.agents[node].start()
                wait_until(lambda: agent.status().get("connected"), FAILOVER_TIMEOUT, f"{node} to connect")
                self._observing_until = time.monotonic() + PRODUCTION["lease_duration"]
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
}}
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
    (so n1 preempts back), a ``vrrp_script`` curling the local HA stand-in, ``track_script``."""

    name = "keepalived"

    def __init__(self, home: Home) -> None:
        binary = keepalived_binary()
        if binary is None:
            raise FileNotFoundError("keepalived is not installed (Debian: apt-get install keepalived)")
        self.binary = binary
        self.home = home
        self.quiet = 3 * ADVERT_INT + 1.0  # a restarted master preempts, the backup's master-down timer runs out
        self.workdir = home.workdir / "keepalived"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _config(self, node: str) -> Path:
        path = self.workdir / f"{node}.conf"
        path.write_text(KEEPALIVED_CONF.format(node=node, port=HA_PORT, vip=self.home.vip,
                                               state="MASTER" if node == NODES[0] else "BACKUP",
                                               priority=150 if node == NODES[0] else 100))
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
class Sample:
    """One fault, end to end. Seconds; ``arp`` is None if the client's entry did not change to the new
    holder's MAC within the window (or the holder stayed the same, after a broker restart)."""

    system: str
    fault: Fault
    old: str
    new: str
    failover: float  # fault → the first answer from the new holder (once it holds the address) arrived
    outage: float  # the longest run of failed requests the fault caused (0: none failed)
    restore_outage: float  # the same, once the fault was lifted, until steady again
    two_holders: float  # both nodes had the floating IP configured (fault → steady again)
    both_answered: float  # the new holder's first answer → the old one's last answer after it, until lifted
    arp: float | None  # fault → the client's ARP entry on the new holder's MAC
    final: str  # the holder once steady again


def unavailable() -> str | None:
    """Why the home cannot be built here, or None."""
    why = netns.available()
    if why is not None:
        return why
    if mosquitto_binary() is None:
        return "mosquitto is not installed"
    return None


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
        self.lan = netns.Lan([*NODES, "broker", "client"])
        self.vip = ""
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
        self._stack.close()

    def _build(self) -> None:
        lan = self._stack.enter_context(self.lan)
        third = lan.gateway.split(".")[2]
        self.vip = f"10.213.{third}.{VIP_HOST}"
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
            monitor = AddressMonitor(lan, node, self.vip, self.workdir)
            self._stack.callback(monitor.close)
            self.monitors[node] = monitor.start()
        self.neighbour = NeighbourMonitor(lan, "client", self.vip, self.workdir)
        self._stack.callback(self.neighbour.close)
        self.neighbour.start()
        self.client = Client(lan, "client", self.vip, self.workdir, self.probe_interval)
        self._stack.callback(self.client.close)
        self.client.start()

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

    def steady(self, system: System, since: float, timeout: float = STEADY_TIMEOUT) -> str:
        """Wait until the pair is steady (``system.quiet`` after ``since``): one node holds the floating IP, the
        other does not, and the client's last answers all came from it."""

        missing = ["the quiet period"]

        def check() -> str | None:
            now = time.monotonic()
            if now - since < system.quiet:
                return None
            holder = system.holder()
            last = sorted(self.client.attempts[-3:], key=lambda a: a.start)
            missing[:] = [f"holder {holder}, holding {[n for n, m in self.monitors.items() if m.holds()]}, "
                          f"client's ARP entry {neighbour(self.lan, 'client', self.vip)} (MACs {self.macs}), "
                          f"last answers {last}"]
            if holder is None or not self.monitors[holder].holds() or self.monitors[other(holder)].holds():
                return None
            # Not the client's ARP entry: the nodes forward (net.ipv4.ip_forward is 1 in new namespaces here,
            # as on a Home Assistant host with Docker), so after keepalived's split heals the client may keep
            # the backup's MAC for good, the backup passing its requests on to the master.
            return holder if self.client.answering(holder, now) else None

        try:
            return wait_until(check, timeout, f"{system.name} to be steady", step=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {missing[0]}") from None

    def measure(self, system: System, fault: Fault) -> Sample:
        old = self.steady(system, 0.0)
        new = other(old)
        t_fault = time.monotonic()
        system.inject(fault, old)
        if fault == Fault.BROKER:  # restarted at once: whoever the election picks takes it, maybe the same node
            new = self.steady(system, t_fault)
        else:
            wait_until(lambda: self.monitors[new].added_after(t_fault)
                       and answered_by(self.client.attempts, new, t_fault), FAILOVER_TIMEOUT,
                       f"{new} to answer the client for the floating IP ({system.name}, {fault})", step=0.01)
        added = self.monitors[new].added_after(t_fault)
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
        runs = outages(attempts, t_fault, t_end)
        switched = self.neighbour.switched_to(self.macs[new], t_fault)
        return Sample(
            system=system.name, fault=fault, old=old, new=new, failover=over - t_fault,
            outage=max((o.seconds(t_end) for o in runs if o.start < t_restore), default=0.0),
            restore_outage=max((o.seconds(t_end) for o in runs if o.start >= t_restore), default=0.0),
            two_holders=two_holders(self.monitors[NODES[0]].changes, self.monitors[NODES[1]].changes,
                                    t_fault, t_end),
            both_answered=0.0 if new == old else both_answered(attempts, old, new, t0=t_fault, t1=t_restore),
            arp=None if switched is None else switched - t_fault,
            final=final)

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
