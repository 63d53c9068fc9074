"""Reading the cluster's state from the broker, for ``hasync status`` and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .config import BrokerConfig
from .discovery import Discovery
from .messages import Command, Heartbeat, LeaderAnnouncement, LeaseRecord, MessageError, parse
from .mqtt import Incoming, connect
from .topics import TopicKind, Topics


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
    lease: LeaseRecord | None = None
    lease_received_at: float | None = None
    announcement: LeaderAnnouncement | None = None
    dropped: int = 0
    stale_after: float = 3.0  # seconds without a live heartbeat before a node's state is unknown

    def apply(self, message: Incoming, now: float) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None or not message.payload:
            if parsed is not None and parsed.kind is TopicKind.HEARTBEAT and parsed.node:
                self.nodes.pop(parsed.node, None)
            return
        try:
            if parsed.kind is TopicKind.HEARTBEAT:
                hb = parse(Heartbeat, message.payload)
                if hb.node == parsed.node:
                    self.nodes[hb.node] = NodeState(hb, now, live=not message.retain)
            elif parsed.kind is TopicKind.LEASE:
                record = parse(LeaseRecord, message.payload)
                if record.kind != "claim" and (
                    self.lease is None or (record.term, record.seq) >= (self.lease.term, self.lease.seq)
                ):
                    self.lease = record
                    self.lease_received_at = now
            elif parsed.kind is TopicKind.LEADER:
                self.announcement = parse(LeaderAnnouncement, message.payload)
        except MessageError:
            self.dropped += 1

    def primaries(self, now: float) -> list[str]:
        return sorted(n for n, s in self.nodes.items()
                      if s.current(now, self.stale_after) and s.heartbeat.role == "primary")

    def rows(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for node, state in sorted(self.nodes.items()):
            hb = state.heartbeat
            age = None if not hb.online else round(now - state.received_at, 1)
            role = hb.role if state.current(now, self.stale_after) else ("offline" if not hb.online else "unknown")
            rows.append({
                "node": node,
                "role": role,
                "reported_role": hb.role,
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
            })
        return rows

    def to_json(self, now: float) -> dict[str, Any]:
        lease = self.lease
        return {
            "cluster": self.topics.cluster,
            "leader": self.announcement.leader if self.announcement else None,
            "term": self.announcement.term if self.announcement else (lease.term if lease else 0),
            "lease": None if lease is None else {
                "kind": lease.kind, "term": lease.term, "seq": lease.seq, "holder": lease.holder,
                "successor": lease.successor,
            },
            "nodes": self.rows(now),
        }


async def watch(broker: BrokerConfig, topics: Topics, view: ClusterView, stop: asyncio.Event) -> None:
    """Keep ``view`` up to date until ``stop`` is set."""
    client_id = f"hasync-observer-{secrets.token_hex(4)}"
    async with connect(broker, client_id) as session:
        await session.subscribe(topics.lease, topics.leader, topics.all_heartbeats)

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


async def snapshot(broker: BrokerConfig, topics: Topics, wait: float) -> ClusterView:
    """Collect retained state (and what arrives meanwhile) for ``wait`` seconds."""
    view = ClusterView(topics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(wait, stop.set)
    await watch(broker, topics, view, stop)
    return view


async def send_step_down(broker: BrokerConfig, topics: Topics, node: str, successor: str | None) -> None:
    async with connect(broker, f"hasync-cli-{secrets.token_hex(4)}") as session:
        await session.publish(topics.command(node), Command(command="step_down", successor=successor)
                              .to_payload(), retain=False)


async def decommission(broker: BrokerConfig, topics: Topics, node: str, discovery_prefix: str) -> int:
    """Clear a retired node's retained status and Home Assistant entities; returns how many topics."""
    removals = Discovery(topics, node, discovery_prefix, 2.0, __version__).removals()
    async with connect(broker, f"hasync-cli-{secrets.token_hex(4)}") as session:
        for topic, payload in removals:
            await session.publish(topic, payload, retain=True)
    return len(removals)
