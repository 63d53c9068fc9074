"""State-sync scenarios that need the sync being built now (issue 4). Each is registered so it shows in
the report as a row saying so; replace a ``pending(...)`` line with a module of real scenarios.

Planned, against the ceiling measured by ``bench.mqttloop`` (plain aiomqtt publish → subscribe):

* agent-to-agent sync latency (p50/p99 at 100 and 1,000 entity updates/s; target p99 ≤ 5 ms at 1,000/s)
  and max sustained throughput (target ≥ 0.5 x the plain loop's), on each broker;
* snapshot convergence of a node that joins late, 1,000 and 10,000 entities (target 10,000 ≤ 3 s);
* sync through real Home Assistant: a state change in one HA to the same state in the other HA;
* agent footprint under load (1,000 updates/s): see ``bench.footprint``.
"""

from __future__ import annotations

from .registry import pending

WHY = "pending: state sync"

pending("sync-latency", "agent-to-agent sync latency", [
    ("latency at 100 updates/s", "ms"), ("latency at 1,000 updates/s (target p99 ≤ 5 ms)", "ms")], WHY)
pending("sync-throughput", "agent-to-agent sync throughput",
        [("max sustained updates/s (target ≥ 0.5 x plain aiomqtt loop)", "msg/s")], WHY)
pending("snapshot-convergence", "snapshot convergence of a late joiner", [
    ("1,000 entities", "ms"), ("10,000 entities (target ≤ 3 s)", "ms")], WHY)
pending("sync-ha", "sync through real Home Assistant", [("state change in HA A → same state in HA B", "ms")], WHY)
