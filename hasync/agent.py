"""The agent: drives the pure election from MQTT, timers, health checks and signals.

``Agent(config).run()`` runs until ``stop()``; then it hands leadership over gracefully, publishes its
own offline status and disconnects. One supervisor TaskGroup holds the named tasks:
``hasync[node].connection`` (connect, subscribe, receive; reconnect with backoff and jitter) and
``hasync[node].ticker`` (election timers and heartbeats). The election is only ever touched from the
event loop's thread, through ``_feed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from . import __version__
from .config import AgentConfig
from .discovery import Discovery, primary_state
from .election import (
    Action,
    ClaimUnanswered,
    Connected,
    Demoted,
    Disconnected,
    Election,
    Event,
    Fault,
    HealthChanged,
    HeartbeatReceived,
    Ignored,
    MaintenanceChanged,
    Promoted,
    Publish,
    RecordReceived,
    RepublishHeartbeat,
    Role,
    StepDown,
    Tick,
)
from .health import HealthMonitor
from .homeassistant import HomeAssistantError, HomeAssistantLink
from .hooks import HookResult, HookRunner
from .http import HttpServer
from .messages import Command, Heartbeat, LeaderAnnouncement, LeaseRecord, MessageError, parse
from .metrics import Metrics
from .mqtt import AuthFailure, Backoff, Incoming, MqttFailure, Session, Will, connect, wait_or
from .replica import HomeAssistantBackend, MemoryBackend, Replica, backend_for
from .topics import TopicKind, Topics

logger = logging.getLogger(__name__)

_ROLE_NAMES = {
    Role.DISCONNECTED: "offline",
    Role.OBSERVING: "observing",
    Role.FOLLOWER: "standby",
    Role.CANDIDATE: "candidate",
    Role.LEADER: "primary",
}


class Agent:
    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.node_id = config.node_id
        self.incarnation = secrets.token_hex(6)
        self.topics = Topics(config.topic_prefix, config.cluster)
        self.election = Election(
            config.node_id,
            self.incarnation,
            priority=config.priority,
            preempt=config.preempt,
            timing=config.election.timing(),
        )
        self.metrics = Metrics()
        ha = config.homeassistant
        self.discovery = Discovery(self.topics, self.node_id, ha.discovery_prefix,
                                   config.election.renew_deadline, __version__) if ha.discovery else None
        self._ha_status_topic = f"{ha.discovery_prefix}/status"
        self._next_primary_state = 0.0
        # Health is the health checks and, when configured, the link to this node's Home Assistant.
        self._checks_health: tuple[bool, str] | None = None if config.health_checks else (True, "")
        self._ha: HomeAssistantLink | None = None
        self._ha_health: tuple[bool, str] | None = None
        self._managing: asyncio.Task[None] | None = None
        self.http_port: int | None = None
        self._outbox: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._session: Session | None = None
        self._hooks: HookRunner | None = None
        self._health: HealthMonitor | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sent: dict[tuple[str, int, int], float] = {}
        self._summary: tuple[Any, ...] = ()
        self._next_heartbeat = 0.0
        self._events: IO[str] | None = None
        self._warned: set[tuple[str, str]] = set()
        # Entity state sync, wherever there are entities to sync: this node's HA, or the memory backend.
        self.replica: Replica | None = None
        sync = config.sync
        if sync.enabled and (sync.backend == "memory" or ha.url is not None):
            self.replica = Replica(self.node_id, self.topics, sync, backend_for(sync), self.metrics,
                                   publish=lambda topic, payload, retain: self._outbox.put_nowait(
                                       (topic, payload, retain)))

    # ---- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the agent to hand over and exit (safe to call from a signal handler)."""
        self._stop.set()

    async def run(self) -> None:
        cfg = self.config
        if cfg.events_file is not None:
            # A small append-only log, written line by line; blocking opens are fine at start-up.
            self._events = Path(cfg.events_file).open("a", buffering=1)  # noqa: ASYNC230, SIM115
        try:
            async with contextlib.AsyncExitStack() as stack:
                self._hooks = await stack.enter_async_context(
                    HookRunner(cfg.hooks, self._hook_env(), on_result=self._on_hook_result)
                )
                if cfg.http.enabled:
                    http = await stack.enter_async_context(
                        HttpServer(
                            cfg.http.host, cfg.http.port, status=self.status,
                            is_primary=self.is_primary, ready=self._ready, metrics=self._render_metrics,
                            memory=(self.replica.backend if self.replica is not None
                                    and isinstance(self.replica.backend, MemoryBackend) else None),
                        )
                    )
                    self.http_port = http.port
                    logger.info("HTTP endpoints on http://%s:%d (/healthz /role /metrics)", http.host, http.port)
                # Like keepalived's notify_backup at start: a previous run of this agent may have been
                # killed as primary, leaving the promote hook's effects (dnsmasq, a floating IP) behind.
                self._submit_hook("demote", 0, "starting as standby")
                if cfg.maintenance:
                    self._feed(MaintenanceChanged(on=True))
                ha = cfg.homeassistant
                if ha.url is not None and ha.token is not None:
                    backend = self.replica.backend if self.replica is not None else None
                    watch = backend if isinstance(backend, HomeAssistantBackend) else None
                    self._ha = await stack.enter_async_context(
                        HomeAssistantLink(ha.url, ha.token, on_change=self._on_ha_health,
                                          probe_topic=self.topics.ha_probe(self.node_id),
                                          on_states=watch.on_states if watch else None,
                                          on_state_changed=watch.on_state_changed if watch else None)
                    )
                    if watch is not None:
                        watch.link = self._ha
                if self.replica is None:
                    logger.info("state sync off: %s", "sync.enabled is false" if not cfg.sync.enabled
                                else "no Home Assistant configured (homeassistant.url and token)")
                self._health = await stack.enter_async_context(
                    HealthMonitor(cfg.health_checks, on_change=self._on_health)
                )
                self._update_health()
                async with asyncio.TaskGroup() as tg:
                    node = self.node_id
                    conn = tg.create_task(self._connection_loop(), name=f"hasync[{node}].connection")
                    tick = tg.create_task(self._ticker(), name=f"hasync[{node}].ticker")
                    sync = None if self.replica is None else tg.create_task(
                        self.replica.run(), name=f"hasync[{node}].sync")
                    await self._stop.wait()
                    await self._shutdown()
                    conn.cancel()
                    tick.cancel()
                    if sync is not None:
                        sync.cancel()
                    for task in list(self._tasks):
                        task.cancel()
                logger.debug("shutdown: tasks finished; closing health checks, HTTP and hooks")
        finally:
            if self._events is not None:
                self._events.close()

    async def _shutdown(self) -> None:
        logger.info("stopping: handing leadership over if held")
        pending = self._execute(self.election.handle(StepDown("shutdown", final=True), self.clock()))
        for record in pending:
            await self._release_after_hooks(record, direct=True)
        await self._publish_now(self.topics.heartbeat(self.node_id), self._heartbeat(online=False).to_payload())

    async def _publish_now(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        """Publish on the current connection during shutdown, waiting at most 2 s for the broker's
        acknowledgement: a broker that does not answer must not keep the agent from exiting."""
        session = self._session
        if session is None:
            logger.warning("not connected: could not publish on %s before exiting", topic)
            return
        try:
            async with asyncio.timeout(2):
                await session.publish(topic, payload, retain=retain)
        except (TimeoutError, MqttFailure) as exc:
            logger.warning("publishing on %s before exiting: %s", topic, exc or "no acknowledgement in 2 s")

    # ---- connection ---------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        """Connect, run the session, and on any failure reconnect with backoff and jitter.

        Logging: a lost connection is reported once; of the failed attempts that follow, the first is
        reported at WARNING (ERROR for refused credentials) and the rest at DEBUG.
        """
        cfg = self.config.broker
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        conn = 0
        failures = 0  # consecutive failed attempts since the last connection that worked
        while True:
            conn += 1
            will = Will(self.topics.heartbeat(self.node_id), self._heartbeat(online=False, conn=conn).to_payload())
            client_id = f"hasync-{self.node_id}-{self.incarnation}-{conn}"
            connected_at: float | None = None
            permanent = False
            reason = "connection closed"
            try:
                async with connect(cfg, client_id, will) as session:
                    connected_at = self.clock()
                    attempts, failures = failures, 0
                    await self._session_main(session, conn, attempts)
            except AuthFailure as exc:
                permanent = True
                reason = str(exc)
                self.metrics.connect_failures.labels("auth").inc()
                level = logging.ERROR if failures == 0 else logging.DEBUG
                logger.log(level, "broker %s refused our credentials (%s); retrying every %.1f s",
                           cfg.redacted_url(), exc, cfg.reconnect_max)
                failures += 1
            except MqttFailure as exc:
                reason = str(exc)
                self.metrics.connect_failures.labels("connection").inc()
                if connected_at is not None:
                    logger.warning("lost the connection to %s: %s", cfg.redacted_url(), exc)
                else:
                    level = logging.WARNING if failures == 0 else logging.DEBUG
                    logger.log(level, "cannot connect to %s: %s; retrying", cfg.redacted_url(), exc)
                    failures += 1
            finally:
                self._session = None
                self.metrics.connected.set(0)
                if connected_at is not None:
                    self._feed(Disconnected(reason))
                    if self.replica is not None:
                        self.replica.disconnected()
                        self.metrics.sync_synced.set(0)
            if connected_at is not None and self.clock() - connected_at > 10:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay(permanent=permanent))

    async def _session_main(self, session: Session, conn: int, failures: int) -> None:
        while not self._outbox.empty():  # records of an older connection must never go out
            self._outbox.get_nowait()
        self._session = session
        self._feed(Connected(conn))
        t = self.topics
        topics = [t.lease, t.all_heartbeats, t.command(self.node_id)]
        if self.discovery is not None:
            topics.append(self._ha_status_topic)
        await session.subscribe(*topics)
        sync_sender: asyncio.Task[None] | None = None
        if self.replica is not None:
            self.replica.connected()
            await session.subscribe(*self.replica.subscriptions())
            self.replica.subscribed()
            sync_sender = asyncio.create_task(self.replica.sender(session), name=f"hasync[{self.node_id}].sync-sender")
        self.metrics.connected.set(1)
        self.metrics.connects.inc()
        self._announce_to_home_assistant()
        self._publish_heartbeat()
        logger.log(logging.INFO if failures == 0 else logging.WARNING,
                   "connected to %s as %s (connection %d%s)", self.config.broker.redacted_url(),
                   self.node_id, conn, f", after {failures} failed attempts" if failures else "")
        sender = asyncio.create_task(self._sender(session), name=f"hasync[{self.node_id}].sender")
        try:
            async for message in session.messages():
                self._on_message(message)
        finally:
            for task in (sender, sync_sender):
                if task is not None:
                    task.cancel()  # they never end by themselves: each publish handles its own failure
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        raise MqttFailure("message stream ended")

    async def _sender(self, session: Session) -> None:
        """Hand queued messages to the client in order, without waiting for each acknowledgement.

        The protocol never relies on an acknowledgement (only an echo counts), and a broker that is
        slow to acknowledge one message must not hold back the next renewal. The client puts packets
        on the wire in the order publish() is called, and tasks start in the order they are created.
        """
        inflight: set[asyncio.Task[None]] = set()

        async def publish(topic: str, payload: bytes, retain: bool) -> None:
            try:
                await session.publish(topic, payload, retain=retain)
            except MqttFailure as exc:
                logger.debug("publish on %s not acknowledged: %s", topic, exc)

        try:
            while True:
                topic, payload, retain = await self._outbox.get()
                task = asyncio.create_task(publish(topic, payload, retain), name=f"hasync[{self.node_id}].publish")
                inflight.add(task)
                task.add_done_callback(inflight.discard)
        finally:
            for task in inflight:
                task.cancel()

    # ---- the election -------------------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        self._execute(self.election.handle(event, self.clock()))
        summary = (
            self.election.role, self.election.leader, self.election.term,
            self.election.eligible(self.clock()), self.election.healthy, self.election.maintenance,
        )
        if self.replica is not None:
            self.replica.set_leader_term(self.election.term)
        if summary != self._summary:
            self._summary = summary
            self.metrics.set_role(self._role_name())
            self.metrics.term.set(self.election.term)
            if self._session is not None:
                self._publish_heartbeat()
                self._publish_primary_state()
        self._wake.set()

    def _execute(self, actions: list[Action]) -> list[LeaseRecord]:
        """Carry the actions out; returns releases that must wait for hooks (already scheduled)."""
        deferred: list[LeaseRecord] = []
        for action in actions:
            match action:
                case Publish(record=record, retain=retain, after_hooks=False):
                    self._publish_record(record, retain)
                case Publish(record=record, after_hooks=True):
                    deferred.append(record)
                    if not self._stop.is_set():
                        self._spawn(self._release_after_hooks(record), "release")
                case Promoted(term=term, deadline=deadline):
                    logger.warning("PRIMARY for term %d", term)
                    self.metrics.promotions.inc()
                    self.metrics.is_primary.set(1)
                    self._record_event("promote", term=term, deadline=deadline)
                    self._submit_hook("promote", term, "elected")
                    self._manage_automations(True)
                    self._outbox.put_nowait((self.topics.leader, LeaderAnnouncement(
                        leader=self.node_id, term=term, sent_at=time.time()).to_payload(), True))
                case Demoted(term=term, reason=reason, acting_until=until):
                    logger.warning("no longer primary (term %d): %s", term, reason)
                    self.metrics.demotions.labels(reason.split(":")[0][:40]).inc()
                    self.metrics.is_primary.set(0)
                    self._record_event("demote", term=term, reason=reason, acting_until=until)
                    self._submit_hook("demote", term, reason)
                    self._manage_automations(False)
                case Fault(reason=reason):
                    logger.warning("fault: %s", reason)
                    self._record_event("fault", reason=reason)
                    self._submit_hook("fault", self.election.term, reason)
                case Ignored(record=record, reason=reason):
                    self.metrics.ignored.labels(reason).inc()
                    logger.debug("ignored %s %d/%d from %s: %s", record.kind, record.term, record.seq,
                                 record.holder, reason)
                case ClaimUnanswered(term=term):
                    self.metrics.claims_unanswered.inc()
                    key = ("claim", "unanswered")
                    logger.log(logging.DEBUG if key in self._warned else logging.WARNING,
                               "our claim for term %d did not come back from the broker within %.1f s: is its "
                               "ACL dropping our publishes on %s?", term, self.config.election.renew_deadline,
                               self.topics.lease)
                    self._warned.add(key)
                case RepublishHeartbeat(reason=reason):
                    logger.info("republishing our status: %s", reason)
                    self._publish_heartbeat()
        return deferred

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[None]:
        """A supervised background task: tracked, cancelled at shutdown, its failure logged."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            coro, name=f"hasync[{self.node_id}].{what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def _release_after_hooks(self, record: LeaseRecord, *, direct: bool = False) -> None:
        if self._hooks is not None:
            try:
                async with asyncio.timeout(self.config.hooks.timeout + 1):
                    await self._hooks.drain()
            except TimeoutError:
                logger.error("the demote hook did not finish in %.0f s; releasing anyway", self.config.hooks.timeout)
        if self._managing is not None:
            # Managed mode: this node's automations are off before the successor turns its own on.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._managing), 10)
        announcement = LeaderAnnouncement(leader=None, term=record.term, sent_at=time.time())
        stamped = record.model_copy(update={"sent_at": time.time()})
        logger.info("releasing term %d%s", record.term,
                    f" to {record.successor}" if record.successor else "")
        # Neither is retained: a late one must not overwrite what a newer primary retained meanwhile.
        if direct:
            await self._publish_now(self.topics.leader, announcement.to_payload(), retain=False)
            await self._publish_now(self.topics.lease, stamped.to_payload(), retain=False)
        else:
            self._outbox.put_nowait((self.topics.leader, announcement.to_payload(), False))
            self._outbox.put_nowait((self.topics.lease, stamped.to_payload(), False))

    def _publish_record(self, record: LeaseRecord, retain: bool) -> None:
        if record.kind == "claim":
            self.metrics.claims.inc()
            logger.info("claiming term %d", record.term)
        stamped = record.model_copy(update={"sent_at": time.time()})
        self._sent[(record.kind, record.term, record.seq)] = self.clock()
        if len(self._sent) > 64:
            for key in list(self._sent)[:32]:
                del self._sent[key]
        self._outbox.put_nowait((self.topics.lease, stamped.to_payload(), retain))

    async def _ticker(self) -> None:
        while True:
            self._feed(Tick())
            now = self.clock()
            if now >= self._next_heartbeat and self._session is not None:
                self._publish_heartbeat()
            if now >= self._next_primary_state and self._session is not None:
                self._publish_primary_state()
            wake_at = min(self.election.next_wakeup(now), self._next_heartbeat, self._next_primary_state)
            self._wake.clear()
            await wait_or(self._wake, max(0.0, wake_at - self.clock()))

    # ---- incoming -----------------------------------------------------------------------------

    def _on_message(self, message: Incoming) -> None:
        if message.topic == self._ha_status_topic:
            if message.payload == b"online" and not message.retain:
                logger.info("Home Assistant came online: publishing discovery and states again")
                self._announce_to_home_assistant()
                self._publish_heartbeat()
            return
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return
        if not message.payload:
            return  # a retained message being cleared (e.g. a decommissioned node)
        try:
            match parsed.kind:
                case TopicKind.LEASE:
                    record = parse(LeaseRecord, message.payload)
                    self._observe_echo(record)
                    self._feed(RecordReceived(record, retained=message.retain))
                case TopicKind.HEARTBEAT:
                    heartbeat = parse(Heartbeat, message.payload)
                    if heartbeat.node != parsed.node:
                        raise MessageError("node_mismatch", f"{heartbeat.node} on {parsed.node}'s topic")
                    self._feed(HeartbeatReceived(heartbeat))
                case TopicKind.COMMAND:
                    command = parse(Command, message.payload)
                    if message.retain:
                        raise MessageError("retained_command", "commands must not be retained")
                    logger.info("command %s%s received", command.command,
                                "" if command.on is None else f" {'on' if command.on else 'off'}")
                    if command.command == "maintenance":
                        assert command.on is not None
                        self._feed(MaintenanceChanged(on=command.on))
                    else:
                        self._feed(StepDown("step-down requested", successor=command.successor))
                case TopicKind.ENTITY:
                    if self.replica is not None:
                        assert parsed.entity_id is not None
                        self.replica.on_record(parsed.entity_id, message.payload, message.retain)
                case TopicKind.SYNC_MARKER:
                    if self.replica is not None and parsed.node == self.node_id:
                        self.replica.on_marker(message.payload)
                case TopicKind.LEADER:
                    pass
        except MessageError as exc:
            self.metrics.dropped.labels(parsed.kind.value, exc.reason).inc()
            key = (parsed.kind.value, exc.reason)
            level = logging.DEBUG if key in self._warned else logging.WARNING
            self._warned.add(key)
            logger.log(level, "dropped a message on %s: %s", message.topic, exc)

    def _observe_echo(self, record: LeaseRecord) -> None:
        if record.holder == self.node_id and record.incarnation == self.incarnation:
            sent = self._sent.pop((record.kind, record.term, record.seq), None)
            if sent is not None:
                self.metrics.echo.observe(self.clock() - sent)

    def _on_health(self, healthy: bool, detail: str) -> None:
        self._checks_health = (healthy, detail)
        self._update_health()

    def _on_ha_health(self, healthy: bool, detail: str) -> None:
        self._ha_health = (healthy, detail)
        self._update_health()
        if healthy:
            # (Re)connected: bring automations in line with the role (we may have missed a change).
            self._manage_automations(self.is_primary())

    def _update_health(self) -> None:
        """Feed the election the combined health: every check passes and, if configured, HA is fine."""
        parts: list[tuple[bool, str]] = []
        if self._checks_health is None:
            parts.append((False, "waiting for the first health check results"))
        else:
            parts.append((self._checks_health[0], self._checks_health[1] or "health checks failing"))
        if self._ha is not None:
            if self._ha_health is None:
                parts.append((False, "waiting for Home Assistant"))
            else:
                parts.append((self._ha_health[0], f"Home Assistant: {self._ha_health[1]}"))
        healthy = all(ok for ok, _ in parts)
        detail = "ok" if healthy else "; ".join(d for ok, d in parts if not ok)
        if (healthy, detail) != (self.election.healthy, self.election.health_detail):
            self._feed(HealthChanged(healthy, detail))

    def _manage_automations(self, enabled: bool) -> None:
        """Managed mode: automations on only on the primary (except ``run_everywhere``), in order."""
        ha = self._ha
        if ha is None or not self.config.homeassistant.managed_automations:
            return
        previous = self._managing
        keep = self.config.homeassistant.run_everywhere

        async def apply() -> None:
            if previous is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await previous
            try:
                changed = await ha.set_automations(enabled, keep=keep)
            except HomeAssistantError as exc:
                logger.warning("could not turn automations %s: %s", "on" if enabled else "off", exc)
                return
            if changed:
                logger.info("turned %d automations %s: %s", len(changed), "on" if enabled else "off",
                            ", ".join(changed))

        self._managing = self._spawn(apply(), "automations")

    def _on_hook_result(self, result: HookResult) -> None:
        self.metrics.hooks.labels(result.event, "ok" if result.ok else "failed").inc()
        if not result.ok:
            self._record_event("hook_failed", hook=result.event, error=result.error or "")

    # ---- outgoing -----------------------------------------------------------------------------

    def _role_name(self) -> str:
        e = self.election
        if e.role is Role.LEADER and not e.is_leader(self.clock()):
            return "standby"
        name = _ROLE_NAMES[e.role]
        if name in ("standby", "observing") and (not e.healthy or e.maintenance):
            return "fault" if not e.healthy else name
        return name

    def _heartbeat(self, *, online: bool, conn: int | None = None) -> Heartbeat:
        e = self.election
        now = self.clock()
        return Heartbeat(
            node=self.node_id,
            incarnation=self.incarnation,
            conn=e.conn if conn is None else conn,
            online=online,
            role=self._role_name() if online else "offline",  # type: ignore[arg-type]
            view=e.view(),
            leader=e.leader,
            priority=e.priority,
            preempt=e.preempt,
            healthy=e.healthy,
            eligible=online and e.eligible(now),
            maintenance=e.maintenance,
            checks=self._checks(),
            agent_version=__version__,
            sync=self.replica.summary() if self.replica is not None and online else None,
            sent_at=time.time(),
        )

    def _announce_to_home_assistant(self) -> None:
        if self.discovery is None:
            return
        for topic, payload in self.discovery.configs():
            self._outbox.put_nowait((topic, payload, True))
        self._publish_primary_state()

    def _publish_primary_state(self) -> None:
        """HA's primary sensor of this node, refreshed every renew interval: it expires in HA (and stops
        counting as primary there) if the agent stops refreshing it. Not retained: only a live agent
        may say a node is primary."""
        if self.discovery is None:
            self._next_primary_state = float("inf")
            return
        now = self.clock()
        self._next_primary_state = now + self.config.election.renew_interval
        deadline = self.election.deadline if self.is_primary() else None
        until = time.time() + (deadline - now) if deadline is not None else 0.0
        self._outbox.put_nowait((self.discovery.primary_state_topic(), primary_state(deadline is not None, until),
                                 False))

    def _checks(self) -> dict[str, bool]:
        checks = self._health.states() if self._health else {}
        if self._ha is not None:
            checks = {**checks, "home-assistant": bool(self._ha_health and self._ha_health[0])}
        return checks

    def _publish_heartbeat(self) -> None:
        self._next_heartbeat = self.clock() + self.config.election.heartbeat_interval
        heartbeat = self._heartbeat(online=True)
        for name, up in heartbeat.checks.items():
            self.metrics.check_up.labels(name).set(1 if up else 0)
        self.metrics.healthy.set(1 if heartbeat.healthy else 0)
        self._outbox.put_nowait((self.topics.heartbeat(self.node_id), heartbeat.to_payload(), True))

    def _submit_hook(self, event: str, term: int, reason: str) -> None:
        if self._hooks is None:
            return
        env = {
            "HASYNC_ROLE": "primary" if event == "promote" else ("fault" if event == "fault" else "standby"),
            "HASYNC_TERM": str(term),
            "HASYNC_LEADER": self.election.leader or "",
            "HASYNC_REASON": reason,
        }
        self._hooks.submit(event, env)  # type: ignore[arg-type]

    def _hook_env(self) -> dict[str, str]:
        return {"HASYNC_NODE": self.node_id, "HASYNC_CLUSTER": self.config.cluster}

    def _record_event(self, event: str, **fields: Any) -> None:
        if self._events is None:
            return
        entry = {"t": self.clock(), "wall": time.time(), "node": self.node_id,
                 "incarnation": self.incarnation, "event": event, **fields}
        self._events.write(json.dumps(entry) + "\n")

    # ---- queries (HTTP) -----------------------------------------------------------------------

    def is_primary(self) -> bool:
        return self.election.is_leader(self.clock())

    def _ready(self) -> bool:
        return self._session is not None

    def _render_metrics(self) -> bytes:
        self.metrics.is_primary.set(1 if self.is_primary() else 0)
        if self.replica is not None:
            self.replica.update_gauges()
        return self.metrics.render()

    def status(self) -> dict[str, Any]:
        e = self.election
        return {
            "node": self.node_id,
            "cluster": self.config.cluster,
            "role": self._role_name(),
            "primary": self.is_primary(),
            "term": e.term,
            "leader": e.leader,
            "priority": e.priority,
            "healthy": e.healthy,
            "health_detail": e.health_detail,
            "maintenance": e.maintenance,
            "eligible": e.eligible(self.clock()),
            "connected": self._session is not None,
            "checks": self._checks(),
            "home_assistant": None if self._ha is None else {
                "healthy": self._ha_health[0] if self._ha_health else False,
                "detail": self._ha_health[1] if self._ha_health else "connecting",
            },
            "sync": None if self.replica is None else self.replica.status(),
            "incarnation": self.incarnation,
            "version": __version__,
        }
