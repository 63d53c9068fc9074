"""Prometheus metrics of one agent, in a registry of its own (several agents can share a process).

Every label value comes from an enum (roles, causes, reasons) or from the configuration (health check
names), never from a message: the number of time series is bounded by the code and the config.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .messages import NodeRole


class Metrics:
    def __init__(self, renew_deadline: float = 2.0) -> None:  # noqa: PLR0915 (a flat list of declarations)
        """``renew_deadline``: the renewal margin's buckets are fractions of it."""
        r = self.registry = CollectorRegistry()
        self.role = Gauge("hasync_role", "1 for the node's current role", ["role"], registry=r)
        self.is_primary = Gauge("hasync_is_primary", "1 while this node acts as primary", registry=r)
        self.term = Gauge("hasync_term", "Lease term in this node's view", registry=r)
        self.promotions = Counter("hasync_promotions", "Times this node became primary", registry=r)
        self.demotions = Counter("hasync_demotions", "Times this node stopped being primary", ["reason"],
                                 registry=r)
        self.dropped = Counter("hasync_messages_dropped", "Messages dropped as invalid",
                               ["topic", "reason"], registry=r)
        self.ignored = Counter("hasync_lease_records_ignored", "Valid lease records the election ignored",
                               ["reason"], registry=r)
        self.claims = Counter("hasync_claims", "Claims this node published", registry=r)
        self.claims_unanswered = Counter("hasync_claims_unanswered",
                                         "Claims that did not come back from the broker in time", registry=r)
        self.connected = Gauge("hasync_mqtt_connected", "1 while connected to the broker", registry=r)
        self.connects = Counter("hasync_mqtt_connects", "Successful broker connections", registry=r)
        self.connect_failures = Counter("hasync_mqtt_connect_failures", "Failed or lost connections",
                                        ["kind"], registry=r)
        self.healthy = Gauge("hasync_healthy", "1 while all health checks pass", registry=r)
        self.federation_exported = Gauge("hasync_federation_exported", "Entities this hub exports (while primary)",
                                         registry=r)
        self.federation_commands = Counter("hasync_federation_commands", "Commands from main, by result",
                                           ["result"], registry=r)
        self.federation_dropped = Counter("hasync_federation_state_changes_dropped",
                                          "State changes dropped because too many were waiting", registry=r)
        self.federation_retiring = Gauge("hasync_federation_retiring", "Configs on main of entities no longer "
                                         "exported, waiting out the removal grace before they are cleared",
                                         registry=r)
        self.federation_cleared = Counter("hasync_federation_cleared", "Configs cleared on main (entities main "
                                          "deleted) after the removal grace", registry=r)
        self.federation_rereads = Counter("hasync_federation_registry_reads", "Registry lists read again after "
                                          "Home Assistant's registry events (debounced)", registry=r)
        self.federation_self_imported = Gauge("hasync_federation_self_imported", "Entities of the hub's own Home "
                                              "Assistant that are MQTT copies of its exports (it reads the prefix "
                                              "the hub exports to)", registry=r)
        self.priority = Gauge("hasync_priority", "This node's priority, with its health checks' weights", registry=r)
        self.internal_errors = Counter("hasync_internal_errors", "Unexpected errors the agent caught and survived "
                                       "(bugs: each is logged with its traceback)", ["where"], registry=r)
        self.publishes_unacknowledged = Counter("hasync_publishes_unacknowledged",
                                                "Publishes the broker did not acknowledge in time", registry=r)
        self.check_up = Gauge("hasync_health_check_up", "1 while the check passes", ["check"], registry=r)
        self.hooks = Counter("hasync_hook_runs", "Role hook runs", ["event", "result"], registry=r)
        self.echo = Histogram("hasync_renew_echo_seconds", "Time from sending a lease record to its echo",
                              buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2),
                              registry=r)
        # How close the primary came to demoting itself: its deadline, less the time each of its renewals came
        # back (which extends it). At or below 0: the renewal was too late. Buckets of 2.5 % of the deadline.
        self.renewal_margin = Histogram(
            "hasync_renewal_margin_seconds", "Time left before the renew deadline when a renewal's echo arrived",
            buckets=[round(renew_deadline * k / 40, 4) for k in range(41)], registry=r)
        self.loop_lag = Histogram("hasync_event_loop_lag_seconds", "How late the agent's timers ran",
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1,
                                           2, 5), registry=r)
        self.gc_pause = Histogram("hasync_gc_pause_seconds", "Pauses of Python's cyclic garbage collector (while "
                                  "the agent runs), by generation", ["generation"],
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6), registry=r)
        self.kept = Gauge("hasync_kept", "1 while this node holds resources kept through a broker outage "
                          "(on_broker_loss: kept) without being primary", registry=r)
        self.kept_releases = Counter("hasync_kept_releases", "Times the resources kept through a broker outage "
                                     "were released", registry=r)
        self.vip_held = Gauge("hasync_vip_held", "1 while this node holds the floating IP", ["address"], registry=r)
        self.vip_fault = Gauge("hasync_vip_fault", "1 while this node cannot hold its floating IPs (not eligible)",
                               registry=r)
        self.vip_errors = Counter("hasync_vip_errors", "Floating IP operations that failed",
                                  ["operation", "error"], registry=r)
        self.vip_announcements = Counter("hasync_vip_announcements",
                                         "Gratuitous ARPs and unsolicited neighbour advertisements sent", registry=r)
        self.vip_stale_removed = Counter("hasync_vip_stale_removed",
                                         "Floating IPs found on an interface while not primary, and removed",
                                         registry=r)
        self.vip_refreshes = Counter("hasync_vip_refreshes", "New lifetimes given to fenced floating IPs", registry=r)
        self.vip_lapses = Counter("hasync_vip_lapses", "Fenced floating IPs whose lifetime ended while this node was "
                                  "primary (no renewal came back in time), added again", registry=r)
        self.guardian = Gauge("hasync_guardian", "1 while the guardian runs (it removes the floating IPs and runs the "
                              "fence command when the agent dies or stalls as primary)", registry=r)
        self.stall_fences = Counter("hasync_stall_fences", "Fence commands the guardian ran because this agent "
                                    "stalled past its deadline as primary", registry=r)

        self.sync_synced = Gauge("hasync_sync_synced", "1 once this connection's retained entity records are in",
                                 registry=r)
        self.sync_pending = Gauge("hasync_sync_pending",
                                  "Entities with sync work outstanding (stamp, apply, or see on the bus)",
                                  registry=r)
        self.sync_queued = Gauge("hasync_sync_queue_depth", "Records waiting to be published plus applies waiting",
                                 registry=r)
        self.sync_published = Counter("hasync_sync_records_published", "Entity records published", registry=r)
        self.sync_received = Counter("hasync_sync_records_received", "Entity records received", registry=r)
        self.sync_local_changes = Counter("hasync_sync_local_changes", "Changes of mirrored entities made here",
                                          registry=r)
        self.sync_applied = Counter("hasync_sync_applied", "Records applied to the local entities", registry=r)
        self.sync_apply_failures = Counter("hasync_sync_apply_failures", "Applies that did not take effect",
                                           registry=r)
        self.sync_dropped = Counter("hasync_sync_dropped", "Entity records or changes ignored", ["reason"], registry=r)
        self.sync_lag = Histogram("hasync_sync_lag_seconds",
                                  "From a change's stamp (origin's clock) to its apply here",
                                  buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                  registry=r)
        self.sync_apply_seconds = Histogram("hasync_sync_apply_seconds", "Duration of one apply batch",
                                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                            registry=r)

    def watch_gc(self) -> Callable[[], None]:
        """Time every collection into ``gc_pause`` (the callbacks are the process's); returns the undo."""
        started: list[float] = []

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[:] = [time.perf_counter()]
            elif started:
                self.gc_pause.labels(str(info.get("generation", -1))).observe(time.perf_counter() - started[0])

        gc.callbacks.append(on_gc)
        return lambda: gc.callbacks.remove(on_gc)

    def set_role(self, role: NodeRole) -> None:
        for name in NodeRole:
            self.role.labels(name.value).set(1 if name is role else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
