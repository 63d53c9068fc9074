"""The agent: drives the pure election (and entity sync) from MQTT, timers, health and signals.

``async with Agent(config) as agent:`` is the whole lifecycle. Entering opens what the agent serves and
watches (the events file, hooks, the HTTP endpoints, Home Assistant, health checks) and starts one
supervisor TaskGroup of named tasks:

* ``hasync[node].connection``: connect, subscribe, receive; reconnect with backoff and jitter;
* ``hasync[node].publisher``: the one ordered publisher (``hasync.publisher``);
* ``hasync[node].ticker``: election timers, heartbeats, Home Assistant's primary sensor;
* ``hasync[node].effects``: releases and automations, in order (``hasync.effects``);
* ``hasync[node].sync``: entity sync's applier and timers, when sync is on;
* ``hasync[node].vip``: the floating IPs (``hasync.vip``), when configured.

Leaving (``stop()`` from a signal handler, or the block ending, with an error or not) hands leadership
over gracefully, then publishes the node's offline status as its last word, then disconnects.

No message can stop the agent: every message is routed (``hasync.inbound``), and one that does not
validate, or whose handling fails, is dropped, counted and logged. A task that fails unexpectedly is
logged with its traceback, counted and restarted. The election is only ever touched from the event
loop's thread, through ``_feed``; the broker and Home Assistant are reached through seams given to the
constructor (``connect``, ``open_websocket``), and time through ``clock`` (monotonic) and ``wall``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from . import __version__, signing
from . import heartbeat as heartbeats
from .aio import Backoff, wait_or
from .config import AgentConfig, BrokerLoss, HookEvent
from .effects import EventLog, EventsFileError, RoleEffects
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
    PriorityChanged,
    Promoted,
    Publish,
    RecordReceived,
    RepublishHeartbeat,
    Resume,
    StepDown,
    TermLimit,
    Tick,
)
from .health import HealthMonitor, Probe
from .hooks import HookResult, HookRunner
from .http import HttpServer, HttpServerError, Route
from .inbound import HomeAssistantOnline, Router, SyncMarker, ToElection, ToSync
from .logs import printable
from .messages import DropReason, Heartbeat, LeaseRecord, MessageError, NodeRole
from .metrics import Metrics
from .publisher import Outgoing, Publisher
from .signing import Keyring, Signer
from .topics import Topics
from .transport import AuthFailure, Connect, ConnectionLost, Incoming, MqttFailure, Session, Will

if TYPE_CHECKING:
    from .config import FederationConfig, FederationRules
    from .federation.hub import Exporter
    from .fence import Guardian
    from .homeassistant.link import HomeAssistantLink
    from .homeassistant.websocket import OpenWebSocket
    from .sync.backend import Backend
    from .sync.replica import Replica
    from .vip import Announcer, FloatingIps, Netlink

logger = logging.getLogger(__name__)

FINAL_PUBLISH_TIMEOUT = 2.0  # s the last words may take on the way out: a dead broker must not hold us


class AgentError(Exception):
    """The agent cannot start: a port taken, an events file it cannot write."""


class Part(enum.StrEnum):
    """Where an unexpected error was caught (the label of ``hasync_internal_errors_total``)."""

    MESSAGE = "message"
    ELECTION = "election"
    CONNECTION = "connection"
    PUBLISHER = "publisher"
    TICKER = "ticker"
    EFFECTS = "effects"
    SYNC = "sync"
    VIP = "vip"
    GUARDIAN = "guardian"
    FEDERATION = "federation"


class ConnectFailure(enum.StrEnum):
    AUTH = "auth"
    CONNECTION = "connection"


class HookOutcome(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"


class Agent:
    exporter: Exporter | None = None  # a federation hub's: created with the Home Assistant link
    vip: FloatingIps | None = None  # the floating IPs, when configured
    guardian: Guardian | None = None  # with floating IPs (the real netlink) or a fence command
    _fence_after = 0.0  # s past the acting deadline the guardian fences a stalled primary (hasync.fence)

    def __init__(
        self,
        config: AgentConfig,
        *,
        connect: Connect | None = None,
        open_websocket: OpenWebSocket | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        netlink: Netlink | None = None,
        announcer: Announcer | None = None,
        probe: Probe | None = None,
    ) -> None:
        """``connect``: the broker seam (default: ``hasync.mqtt`` to ``config.broker``); ``open_websocket``:
        Home Assistant's (``hasync.homeassistant.websocket.OpenWebSocket``; default: aiohttp); ``netlink`` and
        ``announcer``: the floating IPs' (``hasync.vip``; default: pyroute2 and a raw socket, and then the
        guardian too); ``probe``: runs a health check (``hasync.health.Probe``; default: the real probes)."""
        self.config = config
        self.node_id = config.node_id
        self.clock = clock
        self.wall = wall
        if connect is None:
            from .mqtt import connector  # the only module that imports aiomqtt

            connect = connector(config.broker, urgent=Topics(config.topic_prefix, config.cluster).is_election)
        self._connect = connect
        self._open_websocket = open_websocket
        self.incarnation = secrets.token_hex(6)
        self.topics = Topics(config.topic_prefix, config.cluster)
        self.election = Election(config.node_id, self.incarnation, priority=config.priority,
                                 preempt=config.preempt, timing=config.election.timing())
        self.signer: Signer | None = None
        keyring: Keyring | None = None
        if config.signing is not None:
            try:
                self.signer, keyring = signing.load(config.node_id, config.signing.private_key,
                                                    config.signing.public_keys, required=config.signing.required)
            except signing.SigningError as exc:
                raise AgentError(f"signing: {exc}") from None
        self.seal = signing.sealer(self.signer)
        self.metrics = Metrics(renew_deadline=config.election.renew_deadline)
        self.publisher = Publisher(clock=clock, on_unacknowledged=self.metrics.publishes_unacknowledged.inc)
        ha = config.homeassistant
        self.router = Router(self.topics, self.node_id,
                             ha_status_topic=f"{ha.discovery_prefix}/status" if ha.discovery else None,
                             keyring=keyring, wall=wall,
                             unsigned_commands=config.signing is None or config.signing.unsigned_commands)
        self.effects = RoleEffects(config, self.topics, self.publisher, self.metrics,
                                   leader=lambda: self.election.leader, clock=clock, wall=wall, seal=self.seal,
                                   agent_version=__version__)
        self._floating_ips(netlink, announcer)
        self.effects.vip = self.vip
        self.http_port: int | None = None
        self.replica: Replica | None = None  # when sync is on (the sync package is imported only then)
        self._ha: HomeAssistantLink | None = None
        self._ha_health: tuple[bool, str] | None = None
        self._checks_health: tuple[bool, str] | None = None if config.health_checks else (True, "")
        self._health: HealthMonitor | None = None
        self._probe = probe
        self._session: Session | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._wake = asyncio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._http_routes: list[Route] = []  # the memory backend's test API
        self._tasks: list[asyncio.Task[None]] = []
        self._sent: dict[tuple[str, int, int], float] = {}
        self._heartbeats_sent: dict[float, float] = {}  # our heartbeats' sent_at -> local send time
        self._summary: tuple[Any, ...] = ()
        self._next_heartbeat = 0.0
        self._next_primary_state = 0.0 if ha.discovery else float("inf")
        self._warned: set[tuple[str, str]] = set()
        self._entered = False
        self._promote_failed = False  # stepped down after a failed promote hook: Resume after one that works

    def _floating_ips(self, netlink: Netlink | None, announcer: Announcer | None) -> None:
        """The floating IPs, if configured; and the guardian, which removes them (with the real netlink) and runs
        the fence command (``hooks.fence``) when this process dies or stalls as primary."""
        cfg = self.config
        guarded = cfg.vip if netlink is None else []
        if cfg.vip:
            from . import vip  # (pyroute2 only once it is used)

            self.vip = vip.FloatingIps(cfg.vip, self.metrics, netlink=netlink or vip.PyRoute2Netlink(self.clock),
                                       announcer=announcer or vip.RawAnnouncer(), clock=self.clock,
                                       takeover_gap=cfg.takeover_after - cfg.election.renew_deadline,
                                       on_fault=self._update_health)
        # (The guardian keeps CLOCK_MONOTONIC: a fence needs the agent on it, not on a test's virtual clock.)
        if guarded or (cfg.hooks.fence is not None and self.clock is time.monotonic):
            from .fence import Guardian, fence_after

            self._fence_after = fence_after(cfg.election.renew_deadline, cfg.takeover_after)
            self.guardian = Guardian(guarded, self.metrics, fence=cfg.hooks.fence, fence_timeout=cfg.hooks.timeout,
                                     env={"HASYNC_NODE": self.node_id, "HASYNC_CLUSTER": cfg.cluster},
                                     on_fenced=self._on_fenced)

    # ---- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the agent to hand over and exit (safe to call from a signal handler)."""
        self._stop.set()

    async def wait(self) -> None:
        """Until ``stop()`` is called."""
        await self._stop.wait()

    async def run(self) -> None:
        """``async with self``, until ``stop()``."""
        async with self:
            await self.wait()

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("Cannot reopen an Agent once it has been started; create a new one.")
        self._entered = True
        stack = contextlib.AsyncExitStack()
        try:
            await self._open(stack)
            group = asyncio.TaskGroup()
            await group.__aenter__()
            stack.push_async_callback(self._close_group, group)
        except BaseException:
            await stack.aclose()
            raise
        stack.callback(self.metrics.watch_gc())
        self._stack = stack
        loops: list[tuple[Part, Callable[[], Awaitable[None]]]] = [
            (Part.CONNECTION, self._connection_loop), (Part.PUBLISHER, self.publisher.run),
            (Part.TICKER, self._ticker), (Part.EFFECTS, self.effects.run)]
        if self.replica is not None:
            loops.append((Part.SYNC, self.replica.run))
        if self.vip is not None:
            loops.append((Part.VIP, self.vip.run))
        if self.guardian is not None:
            loops.append((Part.GUARDIAN, self.guardian.run))
        if self.exporter is not None:
            loops.append((Part.FEDERATION, self.exporter.run))
        for part, loop in loops:
            self._tasks.append(group.create_task(self._supervised(part, loop), name=f"hasync[{self.node_id}].{part}"))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            logger.error("stopping after an unexpected error: %r", exc)
        self._stop.set()
        try:
            await self._shutdown()
        finally:
            assert self._stack is not None
            await self._stack.aclose()

    async def _close_group(self, group: asyncio.TaskGroup) -> None:
        for task in self._tasks:  # the supervised loops never end by themselves
            task.cancel()
        await group.__aexit__(None, None, None)
        logger.debug("shutdown: tasks finished; closing health checks, Home Assistant, HTTP and hooks")

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        if cfg.events_file is not None:
            try:
                events = EventLog(cfg.events_file, node=self.node_id, incarnation=self.incarnation,
                                  clock=self.clock, wall=self.wall)
            except EventsFileError as exc:
                raise AgentError(str(exc)) from exc
            stack.callback(events.close)
            self.effects.events = events
        self.effects.hooks = await stack.enter_async_context(HookRunner(
            cfg.hooks, {"HASYNC_NODE": self.node_id, "HASYNC_CLUSTER": cfg.cluster}, on_result=self._on_hook_result))
        backend = self._sync_backend()
        if cfg.http.enabled:
            try:
                http = await stack.enter_async_context(HttpServer(
                    cfg.http.host, cfg.http.port, status=self.status, is_primary=self.is_primary, ready=self._ready,
                    metrics=self._render_metrics, routes=self._http_routes))
            except HttpServerError as exc:
                raise AgentError(str(exc)) from exc
            self.http_port = http.port
            logger.info("HTTP endpoints on http://%s:%d (/healthz /role /metrics)", http.host, http.port)
        self.effects.starting()
        # The guardian (its own task) is let go last: after the floating IPs are off and the hooks have run.
        if self.guardian is not None:
            stack.push_async_callback(self.guardian.close)
        if self.vip is not None:
            # Off every interface before this node can be elected (a previous run may have been killed as
            # primary), and off again on the way out, whatever ends the agent (after the tasks stopped).
            stack.push_async_callback(self.vip.release)
            await self.vip.check()
        if cfg.maintenance:
            self._feed(MaintenanceChanged(on=True))
        ha = cfg.homeassistant
        if ha.url is not None and ha.token is not None:
            await self._open_home_assistant(stack, backend)
        if self.replica is None:
            logger.info("state sync off: %s", "sync.enabled is false" if not cfg.sync.enabled
                        else "no Home Assistant configured (homeassistant.url and token)")
        self._health = await stack.enter_async_context(HealthMonitor(cfg.health_checks, on_change=self._on_health,
                                                                     on_priority=self._on_priority, probe=self._probe))
        self._update_health()

    def _sync_backend(self) -> Backend | None:
        """Entity sync, wherever there are entities to sync: this node's HA, or the memory backend."""
        sync, ha = self.config.sync, self.config.homeassistant
        if not sync.enabled or (sync.backend != "memory" and ha.url is None):
            return None
        from .sync.replica import Replica

        backend: Backend
        if sync.backend == "memory":
            from .sync.memory import MemoryBackend

            backend = MemoryBackend()
            self._http_routes = backend.routes()
        else:
            from .homeassistant.backend import HomeAssistantBackend

            backend = HomeAssistantBackend()
        self.replica = Replica(self.node_id, self.topics, sync, backend, self.metrics, publisher=self.publisher,
                               wall_ms=lambda: int(self.wall() * 1000), clock=self.clock)
        return backend

    async def _open_home_assistant(self, stack: contextlib.AsyncExitStack, backend: Backend | None) -> None:
        from .homeassistant.automations import AutomationSwitch
        from .homeassistant.backend import HomeAssistantBackend
        from .homeassistant.link import HomeAssistantLink

        ha = self.config.homeassistant
        assert ha.url is not None and ha.token is not None
        watch = backend if isinstance(backend, HomeAssistantBackend) else None
        if self.config.federation is not None:
            self.exporter = self._exporter(self.config.federation)
        exporter = self.exporter

        def on_states(states: list[dict[str, Any]]) -> None:
            if watch is not None:
                watch.on_states(states)

        def on_state_changed(event: dict[str, Any]) -> None:
            if watch is not None:
                watch.on_state_changed(event)
            if exporter is not None:
                exporter.on_state_changed(event)

        watching = watch is not None or exporter is not None
        registry_events: tuple[str, ...] = ()
        if exporter is not None:
            from .federation.hub import REGISTRY_EVENTS

            registry_events = tuple(REGISTRY_EVENTS)
        self._ha = await stack.enter_async_context(HomeAssistantLink(
            ha.url, ha.token, on_change=self._on_ha_health, probe_topic=self.topics.ha_probe(self.node_id),
            on_states=on_states if watching else None, on_state_changed=on_state_changed if watching else None,
            event_types=registry_events,
            on_event=exporter.on_registry_updated if exporter is not None else None,
            open_websocket=self._open_websocket, websocket_url=ha.websocket_url))
        if watch is not None:
            watch.link = self._ha
        if ha.managed_automations:
            self.effects.automations = AutomationSwitch(self._ha)

    def _exporter(self, fed: FederationConfig) -> Exporter:
        from .federation.export import Hub, Rules, Selection
        from .federation.hub import Exporter

        def rules(r: FederationRules) -> Rules:
            return Rules(frozenset(r.domains), frozenset(r.entities), tuple(r.entity_globs), frozenset(r.devices),
                         frozenset(r.areas))

        hub = Hub(self.config.topic_prefix, self.config.cluster,
                  fed.discovery_prefix or self.config.homeassistant.discovery_prefix, __version__)

        async def ha_command(message: dict[str, Any]) -> Any:
            assert self._ha is not None
            return await self._ha.command(message)

        return Exporter(hub, Selection(rules(fed.include), rules(fed.exclude)), ha_command=ha_command,
                        connect=self._connect, client_id=f"hasync-{self.node_id}-{self.incarnation}",
                        metrics=self.metrics, removal_grace=fed.removal_grace, clock=self.clock)

    async def _shutdown(self) -> None:
        """Hand over (the release waits for the demote hook and the automations), then the offline status."""
        if self._stopping:
            return
        self._stopping = True
        logger.info("stopping: handing leadership over if held")
        releases = self._execute(self._handle(StepDown("shutdown", final=True)))
        budget = self.config.hooks.timeout + 11  # the demote hook, then the automations
        try:
            async with asyncio.timeout(budget):
                await self.effects.release_vip()  # before the release below lets the successor add them
                await self.effects.idle()
                if releases:
                    await self.effects.wait_for_hooks()
        except TimeoutError:
            logger.error("hooks and automations did not finish within %.0f s; leaving anyway", budget)
        final = [m for record in releases for m in self.effects.release_messages(record)]
        topic = self.topics.heartbeat(self.node_id)
        final.append(Outgoing(topic, self.seal(topic, self._heartbeat(online=False)), True))
        if not self.publisher.connected:
            logger.warning("not connected: could not say goodbye on the broker (the Last Will says offline)")
            return
        try:
            async with asyncio.timeout(FINAL_PUBLISH_TIMEOUT):
                said = await self.publisher.close(final)
        except TimeoutError:
            said = False
        if not said:
            logger.warning("the broker did not acknowledge our last messages within %.0f s", FINAL_PUBLISH_TIMEOUT)

    async def _supervised(self, part: Part, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop for the agent's lifetime; should it fail (a bug), log, count and restart it."""
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                await loop()
                return
            except Exception:
                self._internal_error(part, f"the {part.value} task failed; restarting it")
            await asyncio.sleep(backoff.next_delay())

    def _internal_error(self, part: Part, what: str) -> None:
        self.metrics.internal_errors.labels(part.value).inc()
        logger.exception("%s (a bug: please report it)", what)

    # ---- connection ---------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        """Connect, run the session, and on any failure reconnect with backoff and jitter.

        Logging: a lost connection is reported once; of the failed attempts that follow, the first is
        reported at WARNING (ERROR for refused credentials) and the rest at DEBUG.
        """
        cfg = self.config.broker
        backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        conn = self.election.conn
        failures = 0  # consecutive failed attempts since the last connection that worked
        while not self._stopping:
            conn += 1
            topic = self.topics.heartbeat(self.node_id)
            will = Will(topic, self.seal(topic, self._heartbeat(online=False, conn=conn)))
            client_id = f"hasync-{self.node_id}-{self.incarnation}-{conn}"
            connected_at: float | None = None
            permanent = False
            try:
                async with self._connect(client_id, will) as session:
                    connected_at = self.clock()
                    attempts, failures = failures, 0
                    await self._session_main(session, conn, attempts)
            except AuthFailure as exc:
                permanent = True
                self.metrics.connect_failures.labels(ConnectFailure.AUTH.value).inc()
                level = logging.ERROR if failures == 0 else logging.DEBUG
                logger.log(level, "broker %s refused our credentials (%s); retrying every %.1f s",
                           cfg.redacted_url(), exc, cfg.reconnect_max)
                failures += 1
            except MqttFailure as exc:
                self.metrics.connect_failures.labels(ConnectFailure.CONNECTION.value).inc()
                if connected_at is not None:
                    logger.warning("lost the connection to %s: %s", cfg.redacted_url(), exc)
                else:
                    level = logging.WARNING if failures == 0 else logging.DEBUG
                    logger.log(level, "cannot connect to %s: %s; retrying", cfg.redacted_url(), exc)
                    failures += 1
            finally:
                self._session = None
                self.publisher.detach()
                self.metrics.connected.set(0)
                if connected_at is not None:
                    self._feed(Disconnected("connection lost"))
                    if self.replica is not None:
                        self.replica.disconnected()
                        self.metrics.sync_synced.set(0)
            if connected_at is not None and self.clock() - connected_at > 10:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay(permanent=permanent))

    async def _session_main(self, session: Session, conn: int, failures: int) -> None:
        self.publisher.attach(session)
        self._session = session
        self._feed(Connected(conn))
        await session.subscribe(*self.router.subscriptions())
        if self.replica is not None:
            self.replica.connected()
            await session.subscribe(*self.replica.subscriptions())
            self.replica.subscribed()
        self.metrics.connected.set(1)
        self.metrics.connects.inc()
        self._announce_to_home_assistant()
        self._publish_heartbeat()
        logger.log(logging.INFO if failures == 0 else logging.WARNING,
                   "connected to %s as %s (connection %d%s)", self.config.broker.redacted_url(),
                   self.node_id, conn, f", after {failures} failed attempts" if failures else "")
        async for message in session.messages():
            self._on_message(message)
        raise ConnectionLost("message stream ended")

    # ---- the election -------------------------------------------------------------------------

    def _handle(self, event: Event) -> list[Action]:
        """The election's actions for ``event``; the kept resources see the event before they are carried out."""
        try:
            actions = self.election.handle(event, self.clock())
        except Exception:
            self._internal_error(Part.ELECTION, f"the election failed on {type(event).__name__}; event dropped")
            return []
        self.effects.observe(event)
        return actions

    def _feed(self, event: Event) -> None:
        self._execute(self._handle(event))
        e = self.election
        now = self.clock()
        if e.deadline is not None:  # (a promotion or a renewal that came back)
            if self.vip is not None:
                self.vip.extend(e.deadline)  # new lifetimes
            if self.guardian is not None:  # fence the hooks' services should this process stall past it
                self.guardian.arm(math.inf if self.config.hooks.on_broker_loss is BrokerLoss.KEPT
                                  else e.deadline + self._fence_after, e.term)
        if self.replica is not None:
            self.replica.set_leader_term(e.term)
        summary = (e.role, e.leader, e.term, e.eligible(now), e.healthy, e.maintenance, e.preempting(now))
        if summary != self._summary:
            self._summary = summary
            self.metrics.set_role(heartbeats.reported_role(e, now))
            self.metrics.term.set(e.term)
            if self._session is not None:
                self._publish_heartbeat()
                self._publish_primary_state()
        self._wake.set()

    def _execute(self, actions: list[Action]) -> list[LeaseRecord]:
        """Carry the actions out; returns the releases that wait for hooks, once the agent is stopping
        (until then they are the effects worker's)."""
        deferred: list[LeaseRecord] = []
        for action in actions:
            match action:
                case Publish(record=record, retain=retain, after_hooks=False):
                    self._publish_record(record, retain)
                case Publish(record=record, after_hooks=True):
                    if self._stopping:
                        deferred.append(record)
                    else:
                        self.effects.release_after_hooks(record)
                case Promoted(term=term, deadline=deadline):
                    self.effects.promoted(term, deadline)
                    self._primary_parts(True)
                case Demoted(term=term, cause=cause, reason=reason, acting_until=until):
                    self.effects.demoted(term, cause, reason, until)
                    self._primary_parts(False)
                    damped = self.election.damped_until(self.clock())
                    if damped is not None:
                        logger.warning("flap damping: not taking leadership back before this node's link has been "
                                       "stable for %.0f s", damped - self.clock())
                case Fault(reason=reason):
                    self.effects.fault(self.election.term, reason)
                case Ignored(record=record, reason=reason):
                    self.metrics.ignored.labels(reason.value).inc()
                    logger.debug("ignored %s %d/%d from %s: %s", record.kind, record.term, record.seq,
                                 record.holder, reason.value)
                case ClaimUnanswered(term=term):
                    self.metrics.claims_unanswered.inc()
                    self._warn_once(("claim", "unanswered"),
                                    "our claim for term %d did not come back from the broker within %.1f s: is its "
                                    "ACL dropping our publishes on %s?", term, self.config.election.renew_deadline,
                                    self.topics.lease)
                case RepublishHeartbeat(reason=reason):
                    logger.info("republishing our status: %s", reason)
                    self._publish_heartbeat()
                case TermLimit(term=term):
                    logger.error("the lease is at term %d, where no later term can be claimed: nobody can be "
                                 "elected (a forged record?). Clear the retained %s and restart the agents",
                                 term, self.topics.lease)
        return deferred

    def _publish_record(self, record: LeaseRecord, retain: bool) -> None:
        if record.kind == "claim":
            self.metrics.claims.inc()
            logger.info("claiming term %d", record.term)
        stamped = record.model_copy(update={"sent_at": self.wall()})
        self._sent[(record.kind, record.term, record.seq)] = self.clock()
        if len(self._sent) > 64:
            for key in list(self._sent)[:32]:
                del self._sent[key]
        self.publisher.put(self.topics.lease, self.seal(self.topics.lease, stamped), retain=retain)

    async def _ticker(self) -> None:
        while True:
            self._feed(Tick())
            now = self.clock()
            wake_at = min(self.election.next_wakeup(now), self.effects.kept.next_wakeup())
            if self._session is not None:  # (while disconnected, nothing is due but the election's timers)
                if now >= self._next_heartbeat:
                    self._publish_heartbeat()
                if now >= self._next_primary_state:
                    self._publish_primary_state()
                wake_at = min(wake_at, self._next_heartbeat, self._next_primary_state)
            self._wake.clear()
            if not await wait_or(self._wake, max(0.0, wake_at - self.clock())):
                # Woken by its timer: how late. A primary whose event loop stalls for longer than
                # renew_deadline - renew_interval demotes itself.
                self.metrics.loop_lag.observe(max(0.0, self.clock() - wake_at))

    # ---- incoming -----------------------------------------------------------------------------

    def _on_message(self, message: Incoming) -> None:
        try:
            routed = self.router.route(message)
            match routed:
                case ToElection(event=event, command=command):
                    if command is not None:
                        logger.info("command %s%s received", command.command,
                                    "" if command.on is None else f" {'on' if command.on else 'off'}")
                    if isinstance(event, RecordReceived):
                        self._observe_echo(event.record)
                    elif isinstance(event, HeartbeatReceived) and event.heartbeat.node == self.node_id:
                        sent = self._heartbeats_sent.pop(event.heartbeat.sent_at, None)
                        if sent is not None:
                            event = HeartbeatReceived(event.heartbeat, echo_rtt=self.clock() - sent)
                    self._feed(event)
                case ToSync(entity_id=entity_id, payload=payload, retained=retained):
                    if self.replica is not None:
                        self.replica.on_record(entity_id, payload, retained)
                case SyncMarker(payload=payload):
                    if self.replica is not None:
                        self.replica.on_marker(payload)
                case HomeAssistantOnline():
                    logger.info("Home Assistant came online: publishing discovery and states again")
                    self._announce_to_home_assistant()
                    self._publish_heartbeat()
        except MessageError as exc:
            self._dropped(message, exc.reason, str(exc))
        except Exception:
            self._internal_error(Part.MESSAGE, f"handling a message on {printable(message.topic)} failed; dropped")
            self._dropped(message, DropReason.FAILED, "handling it failed")

    def _dropped(self, message: Incoming, reason: DropReason, detail: str) -> None:
        kind = self.router.kind(message.topic)
        label = kind.value if kind is not None else "other"
        self.metrics.dropped.labels(label, reason.value).inc()
        self._warn_once((label, reason.value), "dropped a message on %s: %s", printable(message.topic),
                        printable(detail))

    def _warn_once(self, key: tuple[str, str], msg: str, *args: object) -> None:
        """WARNING the first time, DEBUG after (a flood of one kind of garbage must not flood the log)."""
        level = logging.DEBUG if key in self._warned else logging.WARNING
        if len(self._warned) < 1000:
            self._warned.add(key)
        logger.log(level, msg, *args)

    def _observe_echo(self, record: LeaseRecord) -> None:
        if record.holder == self.node_id and record.incarnation == self.incarnation:
            sent = self._sent.pop((record.kind, record.term, record.seq), None)
            if sent is not None:
                now = self.clock()
                self.metrics.echo.observe(now - sent)
                deadline = self.election.deadline  # (before this echo extends it)
                if record.kind == "renew" and deadline is not None and record.term == self.election.term:
                    self.metrics.renewal_margin.observe(deadline - now)

    def _primary_parts(self, primary: bool) -> None:
        """The agent's parts that work only on the primary: the health checks of its services, the export."""
        if self._health is not None:
            self._health.set_primary(primary)
        if self.exporter is not None:
            self.exporter.set_active(primary)

    # ---- health ---------------------------------------------------------------------------------

    def _on_health(self, healthy: bool, detail: str) -> None:
        self._checks_health = (healthy, detail)
        self._update_health()

    def _on_priority(self, delta: int) -> None:
        """The weighted health checks moved this node's priority (keepalived's weight)."""
        priority = max(0, min(1000, self.config.priority + delta))
        self.metrics.priority.set(priority)
        if priority != self.election.priority:
            logger.info("priority %d (%d, health check weights %+d)", priority, self.config.priority, delta)
            self._feed(PriorityChanged(priority))

    def _on_ha_health(self, healthy: bool, detail: str) -> None:
        self._ha_health = (healthy, detail)
        self._update_health()
        if healthy:
            # (Re)connected: bring automations in line with the role (we may have missed a change).
            self.effects.switch_automations(self.is_primary())

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
        if self.vip is not None and self.vip.fault is not None:
            parts.append((False, f"floating IP: {self.vip.fault}"))
        healthy = all(ok for ok, _ in parts)
        detail = "ok" if healthy else "; ".join(d for ok, d in parts if not ok)
        if (healthy, detail) != (self.election.healthy, self.election.health_detail):
            self._feed(HealthChanged(healthy, detail))

    def _on_hook_result(self, result: HookResult) -> None:
        self.metrics.hooks.labels(result.event.value, (HookOutcome.OK if result.ok else HookOutcome.FAILED).value).inc()
        if result.event is HookEvent.DEMOTE and result.ok and self.guardian is not None and not self.is_primary():
            self.guardian.disarm()  # (a demote hook that failed leaves it armed: the fence runs at the deadline)
        if not result.ok:
            self.effects.hook_failed(result.event, result.error or "")
        if result.event is not HookEvent.PROMOTE or self.config.hooks.on_promote_failure != "handover":
            return
        if not result.ok and self.is_primary():
            # The primary could not start what it serves (dnsmasq): let a node that can have the role. Like a
            # step-down command, it holds its preemption back, until a promote hook of its own succeeds.
            logger.error("the promote hook failed: stepping down (hooks.on_promote_failure: handover)")
            self._promote_failed = True
            self._feed(StepDown(f"promote hook failed: {result.error}"))
        elif result.ok and self._promote_failed:
            self._promote_failed = False
            self._feed(Resume())

    def _on_fenced(self, term: int, outcome: str) -> None:
        """The guardian ran the fence command: this process stalled past its deadline as primary of ``term``."""
        self.metrics.stall_fences.inc()
        self.effects.fenced(term, outcome, primary=self.is_primary())

    # ---- outgoing -----------------------------------------------------------------------------

    def _checks(self) -> dict[str, bool]:
        checks = self._health.states() if self._health else {}
        if self._ha is not None:
            checks = {**checks, "home-assistant": bool(self._ha_health and self._ha_health[0])}
        return checks

    def _heartbeat(self, *, online: bool, conn: int | None = None) -> Heartbeat:
        sync = self.replica.summary() if self.replica is not None and online else None
        return heartbeats.build(self.election, self.clock(), online=online, conn=conn, checks=self._checks(),
                                agent_version=__version__, sync=sync, sent_at=self.wall())

    def _publish_heartbeat(self) -> None:
        self._next_heartbeat = self.clock() + self.config.election.heartbeat_interval
        heartbeat = self._heartbeat(online=True)
        for name, up in heartbeat.checks.items():
            self.metrics.check_up.labels(name).set(1 if up else 0)
        self.metrics.healthy.set(1 if heartbeat.healthy else 0)
        topic = self.topics.heartbeat(self.node_id)
        # When it was sent, by its wall-clock stamp: its echo's round trip tells flap damping how the link is.
        self._heartbeats_sent[heartbeat.sent_at] = self.clock()
        while len(self._heartbeats_sent) > 16:
            del self._heartbeats_sent[next(iter(self._heartbeats_sent))]
        self.publisher.put(topic, self.seal(topic, heartbeat), retain=True)

    def _announce_to_home_assistant(self) -> None:
        self.effects.announce(self.is_primary(), self.election.deadline if self.is_primary() else None)

    def _publish_primary_state(self) -> None:
        if self.effects.discovery is None:
            return
        self._next_primary_state = self.clock() + self.config.election.renew_interval
        self.effects.primary_state(self.election.deadline if self.is_primary() else None)

    # ---- queries (HTTP) -----------------------------------------------------------------------

    def is_primary(self) -> bool:
        return self.election.is_leader(self.clock())

    def role(self) -> NodeRole:
        return heartbeats.reported_role(self.election, self.clock())

    def _ready(self) -> bool:
        return self._session is not None

    def _render_metrics(self) -> bytes:
        self.metrics.is_primary.set(1 if self.is_primary() else 0)
        if self.replica is not None:
            self.replica.update_gauges()
        return self.metrics.render()

    def status(self) -> dict[str, Any]:
        e = self.election
        now = self.clock()
        damped = e.damped_until(now)
        return {
            "node": self.node_id,
            "cluster": self.config.cluster,
            "role": self.role().value,
            "primary": self.is_primary(),
            "term": e.term,
            "leader": e.leader,
            "priority": e.priority,
            "preempt": e.preempting(now),
            "damped_for_s": None if damped is None else round(damped - now, 1),  # flap damping holds it back
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
            "federation": None if self.exporter is None else self.exporter.status(),
            "vip": None if self.vip is None else self.vip.status(),
            "guardian": None if self.guardian is None else self.guardian.status(),
            "kept": self.effects.kept.status(),  # resources kept through a broker outage, if any
            "incarnation": self.incarnation,
            # Signed control messages required of every node: otherwise any client that may write the
            # cluster's topics can speak for any node.
            "authenticated": self.config.signing is not None and self.config.signing.required,
            "version": __version__,
        }

