"""A node's heartbeat, built from its election state: pure, used by the agent and by the simulation.

The heartbeat is a node's retained status on ``nodes/{node}``; its Last Will is the same message with
``online`` false. What a node reports as its role (:func:`reported_role`) is what ``hasync status``, the
``/healthz`` endpoint, Home Assistant's role sensor and the ``hasync_role`` metric show.
"""

from __future__ import annotations

from collections.abc import Mapping

from .election import Election, Role
from .messages import Heartbeat, NodeRole, SyncSummary

_REPORTED = {
    Role.DISCONNECTED: NodeRole.OFFLINE,
    Role.OBSERVING: NodeRole.OBSERVING,
    Role.FOLLOWER: NodeRole.STANDBY,
    Role.CANDIDATE: NodeRole.CANDIDATE,
    Role.LEADER: NodeRole.PRIMARY,
}


def reported_role(election: Election, now: float) -> NodeRole:
    """``primary`` only while the node may act as primary (within its renew deadline); ``fault`` for an
    unhealthy node that is not leading."""
    if election.role is Role.LEADER and not election.is_leader(now):
        return NodeRole.STANDBY
    role = _REPORTED[election.role]
    if role in (NodeRole.STANDBY, NodeRole.OBSERVING) and not election.healthy:
        return NodeRole.FAULT
    return role


def build(
    election: Election,
    now: float,
    *,
    online: bool = True,
    conn: int | None = None,
    checks: Mapping[str, bool] | None = None,
    agent_version: str = "",
    sync: SyncSummary | None = None,
    sent_at: float = 0.0,
) -> Heartbeat:
    """The heartbeat of ``election``'s node at local time ``now``; ``online=False`` gives its will
    (``conn``: the connection it is registered for, by default the current one)."""
    return Heartbeat(
        node=election.node_id,
        incarnation=election.incarnation,
        conn=election.conn if conn is None else conn,
        online=online,
        role=reported_role(election, now) if online else NodeRole.OFFLINE,
        view=election.view(),
        leader=election.leader,
        priority=election.priority,
        preempt=election.preempting(now),
        healthy=election.healthy,
        eligible=online and election.eligible(now),
        maintenance=election.maintenance,
        checks=dict(checks or {}),
        agent_version=agent_version,
        sync=sync if online else None,
        sent_at=sent_at,
    )
