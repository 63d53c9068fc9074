"""Reading the cluster's state from the broker, and the commands hasync's own tools send: for the command
line and the demo.

An observer follows the lease stream by the election's own rules (``hasync.election.LeaseStream``), so
what it reports as the lease is what the agents hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import __version__
from .config import BrokerConfig
from .election import LeaseStream
from .homeassistant.discovery import Discovery
from .messages import Command, Heartbeat, LeaderAnnouncement, LeaseRecord, MessageError, NodeRole, parse
from .mqtt import connect
from .signing import Keyring, Signer
from .topics import TopicKind, Topics
from .transport import Incoming


class CommandRefused(Exception):
    """A command that the cluster's state shows would be wrong (an unknown node, one that is not primary)."""


@dataclass
class NodeState:
    heartbeat: Heartbeat
    received_at: float  # local monotonic
    live: bool  # received as it was published, not only from the broker's retained store

    def current(self, now: float, stale_after: float) -> bool:
        """Whether this heartbeat describes the node now: seen live, recently.

        A retained heartbeat alone proves nothing: a node that crashed on a broker that does not retain
        wills (amqtt), or that hangs (no will at all), leaves its last "online" heartbeat behind.
        """
        return self.heartbeat.online and self.live and now - self.received_at <= stale_after


@dataclass
class ClusterView:
    """What an observer has seen: latest heartbeat per node, the lease stream, the leader topic."""

    topics: Topics
    nodes: dict[str, NodeState] = field(default_factory=dict)
    stream: LeaseStream = field(default_factory=LeaseStream)
    announcement: LeaderAnnouncement | None = None
    dropped: int = 0
    stale_after: float = 3.0  # seconds without a live heartbeat before a node's state is unknown
    keyring: Keyring | None = None  # the cluster's keys: then only what verifies is shown, as the agents do
    rejected: int = 0  # messages that failed verification

    def apply(self, message: Incoming, now: float) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None or not message.payload:
            if parsed is not None and parsed.kind is TopicKind.HEARTBEAT and parsed.node:
                self.nodes.pop(parsed.node, None)
            return
        try:
            if parsed.kind is TopicKind.HEARTBEAT:
                hb = parse(Heartbeat, message.payload)
                if hb.node == parsed.node and self._verified(message, hb.node, hb.sig):
                    self.nodes[hb.node] = NodeState(hb, now, live=not message.retain)
            elif parsed.kind is TopicKind.LEASE:
                record = parse(LeaseRecord, message.payload)
                if self._verified(message, record.holder, record.sig):
                    self.stream.offer(record, retained=message.retain)
            elif parsed.kind is TopicKind.LEADER:
                self.announcement = parse(LeaderAnnouncement, message.payload)
        except MessageError:
            self.dropped += 1

    def _verified(self, message: Incoming, signer: str, sig: str | None) -> bool:
        if self.keyring is None or self.keyring.check(message.topic, message.payload, signer, sig) is None:
            return True
        self.rejected += 1
        return False

    @property
    def authenticated(self) -> bool:
        """Whether what is shown was verified, and the cluster requires signatures of every node (as far
        as this observer can tell: every node seen signs its heartbeats)."""
        return self.keyring is not None and self.keyring.required and all(
            s.heartbeat.sig is not None for s in self.nodes.values())

    def primaries(self, now: float) -> list[str]:
        return sorted(n for n, s in self.nodes.items()
                      if s.current(now, self.stale_after) and s.heartbeat.role is NodeRole.PRIMARY)

    def role(self, node: str, now: float) -> str:
        """The node's role as far as the observer can tell: ``offline`` after its will, ``unknown`` while no
        live heartbeat was seen recently."""
        state = self.nodes[node]
        hb = state.heartbeat
        if state.current(now, self.stale_after):
            return hb.role.value
        return NodeRole.OFFLINE.value if not hb.online else "unknown"

    def rows(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for node, state in sorted(self.nodes.items()):
            hb = state.heartbeat
            age = None if not hb.online else round(now - state.received_at, 1)
            rows.append({
                "node": node,
                "role": self.role(node, now),
                "reported_role": hb.role.value,
                "term": hb.view.term if hb.view else 0,
                "leader": hb.leader,
                "priority": hb.priority,
                "healthy": hb.healthy,
                "eligible": hb.eligible,
                "maintenance": hb.maintenance,
                "checks": hb.checks,
                "heartbeat_age_s": age,
                "heartbeat_wall_age_s": round(time.time() - hb.sent_at, 1) if hb.sent_at else None,
                "version": hb.agent_version,
                "sync": None if hb.sync is None else hb.sync.model_dump(),
                "signed": hb.sig is not None,
            })
        return rows

    def to_json(self, now: float) -> dict[str, Any]:
        lease = self.stream.lease
        return {
            "cluster": self.topics.cluster,
            "leader": self.announcement.leader if self.announcement else None,
            "term": self.announcement.term if self.announcement else (lease.term if lease else 0),
            "lease": None if lease is None else {
                "kind": "release" if lease.released else ("claim" if lease.seq == 0 else "renew"),
                "term": lease.term, "seq": lease.seq, "holder": lease.holder, "successor": lease.successor,
            },
            "nodes": self.rows(now),
            "authenticated": self.authenticated,
            "rejected": self.rejected,
        }

    def check_step_down(self, node: str, successor: str | None, now: float) -> None:
        """Raise CommandRefused unless ``node`` is the primary and ``successor`` (if any) could take over."""
        self._check_known(node)
        role = self.role(node, now)
        if role != NodeRole.PRIMARY:
            primaries = self.primaries(now)
            raise CommandRefused(f"{node} is not the primary (it is {role}); the primary is "
                                 f"{', '.join(primaries) if primaries else 'nobody right now'}")
        if successor is None:
            return
        if successor == node:
            raise CommandRefused(f"{node} cannot hand over to itself")
        self._check_known(successor)
        state = self.nodes[successor]
        if not state.current(now, self.stale_after):
            raise CommandRefused(f"{successor} cannot take over: it is {self.role(successor, now)}")
        if not state.heartbeat.eligible:
            why = "in maintenance" if state.heartbeat.maintenance else (
                "unhealthy" if not state.heartbeat.healthy else "not eligible yet")
            raise CommandRefused(f"{successor} cannot take over: it is {why}")

    def check_known(self, node: str) -> None:
        self._check_known(node)

    def _check_known(self, node: str) -> None:
        if node not in self.nodes:
            seen = ", ".join(sorted(self.nodes)) or "none"
            raise CommandRefused(f"no node {node!r} in cluster {self.topics.cluster!r} under {self.topics.base}/ "
                                 f"(nodes seen: {seen})")


async def watch(broker: BrokerConfig, topics: Topics, view: ClusterView, stop: asyncio.Event,
                subscribed: Callable[[], object] | None = None) -> None:
    """Keep ``view`` up to date until ``stop`` is set; ``subscribed`` is called once it is listening."""
    client_id = f"hasync-observer-{secrets.token_hex(4)}"
    async with connect(broker, client_id) as session:
        await session.subscribe(topics.lease, topics.leader, topics.all_heartbeats)
        if subscribed is not None:
            subscribed()

        async def consume() -> None:
            async for message in session.messages():
                view.apply(message, time.monotonic())

        task = asyncio.create_task(consume(), name="hasync.status.consume")
        try:
            await stop.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def snapshot(broker: BrokerConfig, topics: Topics, wait: float,
                   keyring: Keyring | None = None) -> ClusterView:
    """Collect retained state (and what arrives meanwhile) for ``wait`` seconds from the subscription on (a
    slow connect must not eat the window: every node's heartbeat should be in it)."""
    view = ClusterView(topics, keyring=keyring)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    await watch(broker, topics, view, stop, subscribed=lambda: loop.call_later(wait, stop.set))
    return view


async def send_command(broker: BrokerConfig, topics: Topics, node: str, command: Command,
                       signer: Signer | None = None) -> None:
    """Publish ``command`` to ``node``; signed by ``signer`` (then stamped with its node and the time)."""
    topic = topics.command(node)
    if signer is None:
        payload = command.to_payload()
    else:
        stamped = command.model_copy(update={"by": signer.node_id, "sent_at": time.time()})
        payload = signer.sign(topic, stamped.to_payload())
    async with connect(broker, f"hasync-cli-{secrets.token_hex(4)}") as session:
        await session.publish(topic, payload, retain=False)


async def send_step_down(broker: BrokerConfig, topics: Topics, node: str, successor: str | None) -> None:
    await send_command(broker, topics, node, Command(command="step_down", successor=successor))


async def checked_command(
    broker: BrokerConfig, topics: Topics, node: str, what: Literal["step_down", "resume"], *,
    successor: str | None = None, wait: float = 1.5, signer: Signer | None = None, keyring: Keyring | None = None,
) -> None:
    """Read the cluster's state for ``wait`` seconds, refuse a command it shows to be wrong
    (``CommandRefused``), else send it."""
    view = await snapshot(broker, topics, wait, keyring)
    if what == "step_down":
        view.check_step_down(node, successor, time.monotonic())
    else:
        view.check_known(node)
    await send_command(broker, topics, node, Command(command=what, successor=successor), signer)


async def decommission(broker: BrokerConfig, topics: Topics, node: str, discovery_prefix: str) -> int:
    """Clear a retired node's retained status and Home Assistant entities; returns how many topics."""
    removals = Discovery(topics, node, discovery_prefix, 2.0, __version__).removals()
    async with connect(broker, f"hasync-cli-{secrets.token_hex(4)}") as session:
        for topic, payload in removals:
            await session.publish(topic, payload, retain=True)
    return len(removals)
