"""A cluster of agents (real processes) with production timings, for the benchmarks.

Differences from the test-suite's clusters: the election, broker and log settings are hasync's
defaults (``hasync.config``), not the fast test timings; nodes have distinct priorities and
``preempt: false``, so after a fault the next primary is the best-ranked survivor and nothing moves
back later (a restarted node rejoins as standby): every run starts from a known, quiet cluster.

Overlap: every kill is recorded per agent *incarnation* (a node restarted after a kill -9 is a new
process), and tenures are computed per incarnation, so the tenure of a node killed in run 1 is not
stretched to its kill in run 5 (``hasync.audit.tenures`` takes deaths per node name).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from harness.agents import AgentProcess, Cluster
from harness.wait import wait_until
from hasync import signing
from hasync.audit import Tenure, overlaps, tenures
from hasync.config import AgentConfig, BrokerConfig, ElectionConfig, Profile
from hasync.messages import Command
from hasync.topics import Topics

CLUSTER = "test"  # what harness/agents.py configures
T = TypeVar("T")


def profile_config(profile: Profile = "default") -> AgentConfig:
    """hasync's configuration with a timing profile and nothing else set (Home Assistant discovery off for the
    fast profile, which requires it)."""
    return AgentConfig.model_validate({"election": {"profile": profile},
                                       "homeassistant": {"discovery": profile == "default"}})


def production_settings(profile: Profile = "default") -> dict[str, Any]:
    """hasync's defaults (of a timing profile) for everything that shapes failover time; events file and HTTP
    port come from harness/agents.py."""
    config = profile_config(profile)
    broker = config.broker
    return {
        "broker": {"keepalive": broker.keepalive, "reconnect_min": broker.reconnect_min,
                   "reconnect_max": broker.reconnect_max},
        "election": config.election.model_dump(),
        "homeassistant": {"discovery": config.homeassistant.discovery},
        "log": {"level": "INFO"},
        "preempt": False,
    }


def timings_text() -> str:
    e = ElectionConfig()
    b = BrokerConfig()
    fast = profile_config("fast")
    f = fast.election
    return (f"hasync's defaults (production): lease_duration {e.lease_duration} s, renew_deadline "
            f"{e.renew_deadline} s, renew_interval {e.renew_interval} s, heartbeat_interval "
            f"{e.heartbeat_interval} s, claim_stagger {e.claim_stagger} s, will_fast_path "
            f"{e.will_fast_path}; broker keepalive {b.keepalive} s (Mosquitto sends a silent client's will "
            f"after {1.5 * b.keepalive:.1f} s), reconnect backoff {b.reconnect_min}-{b.reconnect_max} s with "
            "jitter; log level INFO; Home Assistant discovery on. Nodes have distinct priorities and "
            "`preempt: false` (see bench/cluster.py), so preempt_delay never comes into play. Scenarios named "
            f"`…-fast` use the fast timing profile (`election: {{profile: fast}}`): lease_duration "
            f"{f.lease_duration} s, renew_deadline {f.renew_deadline} s, renew_interval {f.renew_interval} s, "
            f"heartbeat_interval {f.heartbeat_interval} s, claim_stagger {f.claim_stagger} s, broker keepalive "
            f"{fast.broker.keepalive} s, Home Assistant discovery off (the profile requires it).")


@dataclass(frozen=True)
class Audit:
    """The overlap check of one run: overlaps (seconds) of tenures that began in the run, and the gap
    between the newest tenure's start and the end of the one before it."""

    overlaps: list[float]
    gap: float | None


class BenchCluster:
    def __init__(self, workdir: Path, broker_url: str, nodes: dict[str, int], *, signed: bool = False,
                 profile: Profile = "default", node_settings: dict[str, dict[str, Any]] | None = None,
                 **settings: Any) -> None:
        """``signed``: every node gets a signing key (hasync.signing) and every node's public key. ``profile``:
        the timing profile's settings instead of the defaults; ``node_settings``: a node's own (its network
        namespace's ``command_prefix``, its HTTP address)."""
        self.signing: dict[str, dict[str, Any]] = {}
        if signed:
            keys = workdir / "keys"
            keys.mkdir(parents=True, exist_ok=True)
            public = {node: signing.public_key_text(signing.generate(keys / f"{node}.key").public_key())
                      for node in nodes}
            self.signing = {node: {"private_key": str(keys / f"{node}.key"), "public_keys": public}
                            for node in nodes}
        self.prefix = f"bench{uuid.uuid4().hex[:8]}"
        self.topics = Topics(self.prefix, CLUSTER)
        self.broker_url = broker_url
        self.cluster = Cluster(workdir, broker_url, self.prefix)
        self.priorities = nodes
        self.settings = {**production_settings(profile), **settings}
        self.node_settings = node_settings or {}
        self.deaths: dict[str, float] = {}  # "node#incarnation" -> time of its kill -9
        # When each agent last started or lost its connection: see ``stable_leader``.
        self.connected_since: dict[str, float] = {}

    def __enter__(self) -> BenchCluster:
        try:
            for node, priority in self.priorities.items():
                signed = {"signing": self.signing[node]} if self.signing else {}
                self.cluster.add(node, priority=priority, **self.settings, **signed,
                                 **self.node_settings.get(node, {}))
                self.connected_since[node] = time.monotonic()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """SIGTERM every agent (SIGCONT first: one may be frozen); kill any that do not exit."""
        try:
            self.cluster.stop_all()
        except subprocess.TimeoutExpired:
            pass  # stop_all killed it after printing its stacks
        finally:
            for agent in self.cluster.agents.values():
                if agent.process is not None and agent.process.poll() is None:
                    agent.process.kill()
                    agent.process.wait()

    @property
    def agents(self) -> dict[str, AgentProcess]:
        return self.cluster.agents

    # ---- state --------------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every agent's events, each node renamed ``node#incarnation``."""
        return [{**e, "node": f"{e['node']}#{e.get('incarnation', '')}"}
                for a in self.agents.values() for e in a.events()]

    def tenures(self) -> list[Tenure]:
        return tenures(self.events(), time.monotonic(), self.deaths)

    def reconnected(self, at: float) -> None:
        """Every agent lost its connection and connects again from ``at`` (the broker restarted)."""
        self.connected_since = dict.fromkeys(self.connected_since, at)

    def stable_leader(self) -> str | None:
        """The primary, if the cluster is quiet: every agent alive, connected, eligible (no step-down
        holdoff), all following one primary, and only that one with an open tenure.

        Also, every agent started (or reconnected) more than a lease (+1.5 s to start up) ago. A node
        that has seen a primary reports itself eligible at once, but may claim only after observing a
        full lease since it connected: a peer that ranks below it then waits a claim_stagger for it in
        vain. Runs are meant to measure the steady state, not that window."""
        now = time.monotonic()
        settle = self.settings["election"]["lease_duration"] + 1.5
        if any(now - since < settle for since in self.connected_since.values()):
            return None
        statuses = {}
        for node, agent in self.agents.items():
            if not agent.alive:
                return None
            status = agent.status()
            if not status or not status.get("connected") or not status.get("eligible"):
                return None
            statuses[node] = status
        primaries = [n for n, s in statuses.items() if s.get("primary")]
        if len(primaries) != 1 or any(s.get("leader") != primaries[0] for s in statuses.values()):
            return None
        acting = [t.node.split("#")[0] for t in self.tenures() if t.end >= now]
        return primaries[0] if acting == primaries else None

    def wait_stable(self, timeout: float = 40.0, hold: float = 1.0) -> str:
        """Wait until ``stable_leader`` names the same node for ``hold`` seconds (one heartbeat
        interval: every node has heard every other's latest heartbeat)."""
        since: float | None = None
        seen: str | None = None

        def settled() -> str | None:
            nonlocal since, seen
            leader = self.stable_leader()
            now = time.monotonic()
            if leader is None or leader != seen:
                seen, since = leader, now
                return None
            return leader if since is not None and now - since >= hold else None

        return wait_until(settled, timeout, "a stable cluster (one primary, all connected and eligible)", step=0.1)

    def next_promotion(self, after: float, timeout: float, exclude: str | None = None) -> dict[str, Any]:
        """The first promotion event after monotonic time ``after`` (its ``node`` is the plain node id)."""

        def found() -> dict[str, Any] | None:
            promos = sorted((e for a in self.agents.values() for e in a.events()
                             if e["event"] == "promote" and e["t"] > after and e["node"] != exclude),
                            key=lambda e: e["t"])
            return promos[0] if promos else None

        return wait_until(found, timeout, f"a promotion after t={after:.3f}", step=0.01)

    def audit(self, since: float) -> Audit:
        """Overlaps among tenures that began after ``since``, and the newest tenure's gap to the one
        before it (how long the cluster had no primary, on the shared monotonic clock)."""
        all_tenures = self.tenures()
        found = [min(a.end, b.end) - max(a.start, b.start)
                 for a, b in overlaps(all_tenures) if max(a.start, b.start) >= since]
        gap = None
        new = [t for t in all_tenures if t.start >= since]
        if new:
            latest = new[-1]
            before = [t.end for t in all_tenures if t.start < latest.start]  # the same node's, too
            if before:
                gap = latest.start - max(before)
        return Audit(found, gap)

    # ---- faults -------------------------------------------------------------------------------

    def incarnation(self, node: str) -> str:
        """The incarnation of a node's running agent, from its latest event (every agent logs at least
        the promote of the tenure we are about to end) or its /healthz."""
        events = self.agents[node].events()
        if events:
            return str(events[-1].get("incarnation", ""))
        return str(self.agents[node].status().get("incarnation", ""))

    def kill(self, node: str) -> float:
        """kill -9 the node's agent; its tenure ends at that instant. Returns the time of the kill."""
        incarnation = self.incarnation(node)
        t = self.agents[node].kill()
        self.deaths[f"{node}#{incarnation}"] = t
        return t

    def restart(self, node: str) -> None:
        agent = self.agents[node]
        if agent.process is not None and agent.process.poll() is None:
            raise RuntimeError(f"{node} is still running")
        agent.start()
        self.connected_since[node] = time.monotonic()


class CommandSender:
    """Publishes commands (step-down) to nodes from a paho client on its own thread."""

    def __init__(self, broker_url: str, topics: Topics) -> None:
        cfg = BrokerConfig(url=broker_url)
        self.topics = topics
        self._connected = False
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = self._on_connect
        self._client.connect(cfg.host, cfg.port)
        self._client.loop_start()
        wait_until(lambda: self._connected, 10, "the command client to connect")

    def _on_connect(self, *_: object) -> None:
        self._connected = True

    def step_down(self, node: str) -> float:
        """Ask ``node`` to step down; returns the monotonic time just before the publish."""
        payload = Command(command="step_down").to_payload()
        t = time.monotonic()
        self._client.publish(self.topics.command(node), payload, qos=1, retain=False)
        return t

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


@contextlib.contextmanager
def command_sender(broker_url: str, topics: Topics) -> Iterator[CommandSender]:
    sender = CommandSender(broker_url, topics)
    try:
        yield sender
    finally:
        sender.close()
