"""What a role change does outside the election: hooks, the events file, managed automations, the leader
topic, and Home Assistant's view of this node (discovery and the primary sensor).

The election decides; the agent carries its actions out through :class:`RoleEffects`. Which resources (the
floating IPs, the role hooks) a role change acquires or releases is decided by ``hasync.kept``: a broker loss
releases only the fenced ones, the kept ones later. The election's own state (the primary sensor, managed
automations, the leader topic) always follows the role at once. Work that waits
(a release that must follow the demote hook and the automations being switched off) runs on one worker,
in the order it was asked for, inside the agent's task group (``run``): a later role change never
overtakes an earlier one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from .config import AgentConfig, BrokerLoss, HookEvent
from .election import Demoted, DemotionCause, Event, Promoted
from .homeassistant.discovery import Discovery, primary_state
from .homeassistant.errors import HomeAssistantError
from .kept import Acquire, KeptResources, Release, Scope, reelection_grace
from .messages import LeaderAnnouncement, LeaseRecord, Message, NodeRole
from .metrics import Metrics
from .publisher import Outgoing, Publisher
from .topics import Topics

if TYPE_CHECKING:
    from .vip import FloatingIps

logger = logging.getLogger(__name__)

AUTOMATIONS_TIMEOUT = 10.0  # s a release waits for this node's automations to be switched off


class EventsFileError(Exception):
    """The events file cannot be opened."""


class EventLog:
    """Role changes appended to ``events_file`` as JSON lines, with this process's monotonic time (comparable
    between processes of one host: the demo, the tests and the benchmarks audit them)."""

    def __init__(self, path: Path, *, node: str, incarnation: str, clock: Callable[[], float],
                 wall: Callable[[], float]) -> None:
        try:
            # A small append-only log, written line by line; blocking opens are fine at start-up.
            self._file: IO[str] | None = path.open("a", buffering=1)
        except OSError as exc:
            raise EventsFileError(f"cannot open events_file {path}: {exc.strerror or exc}") from exc
        self._node, self._incarnation, self._clock, self._wall = node, incarnation, clock, wall

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            return
        entry = {"t": self._clock(), "wall": self._wall(), "node": self._node, "incarnation": self._incarnation,
                 "event": event, **fields}
        try:
            self._file.write(json.dumps(entry) + "\n")
        except OSError as exc:  # a full disk must not stop the agent
            logger.warning("events file: %s; not writing it any more", exc)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class EventSink(Protocol):
    """Where role changes are recorded: the events file, or a test's memory."""

    def write(self, event: str, **fields: Any) -> None: ...


class Hooks(Protocol):
    def submit(self, event: HookEvent, env: dict[str, str]) -> None: ...
    def drain(self) -> Awaitable[None]: ...


class Automations(Protocol):
    async def set_automations(self, enabled: bool, *, keep: Iterable[str] = ()) -> list[str]: ...


@dataclass(frozen=True)
class _Release:
    record: LeaseRecord


@dataclass(frozen=True)
class _Switch:
    enabled: bool


class RoleEffects:
    def __init__(
        self,
        config: AgentConfig,
        topics: Topics,
        publisher: Publisher,
        metrics: Metrics,
        *,
        leader: Callable[[], str | None],
        clock: Callable[[], float],
        wall: Callable[[], float],
        agent_version: str,
        events: EventSink | None = None,
        seal: Callable[[str, Message], bytes] = lambda topic, message: message.to_payload(),
    ) -> None:
        self.config = config
        self._seal = seal
        self.topics = topics
        self.publisher = publisher
        self.metrics = metrics
        self._leader = leader
        self._clock = clock
        self._wall = wall
        self.events = events
        self.hooks: Hooks | None = None
        self.automations: Automations | None = None  # this node's Home Assistant in managed mode
        self.vip: FloatingIps | None = None  # the floating IPs, when configured
        ha = config.homeassistant
        self.discovery = Discovery(topics, config.node_id, ha.discovery_prefix, config.election.renew_deadline,
                                   agent_version) if ha.discovery else None
        self.kept = KeptResources(config.node_id, grace=reelection_grace(config.election.timing()),
                                  keeps=config.keeps_resources)
        self._hooks_kept = config.hooks.on_broker_loss is BrokerLoss.KEPT
        self._jobs: asyncio.Queue[_Release | _Switch] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- role changes (from the election's actions) ---------------------------------------------

    def promoted(self, term: int, deadline: float) -> None:
        logger.warning("PRIMARY for term %d", term)
        self.metrics.promotions.inc()
        self.metrics.is_primary.set(1)
        self._event("promote", term=term, deadline=deadline)
        self._resources(self.kept.handle(Promoted(term, deadline), self._clock()))
        self.switch_automations(True)
        self.publisher.put(self.topics.leader, LeaderAnnouncement(
            leader=self.config.node_id, term=term, sent_at=self._wall()).to_payload(), retain=True)

    def demoted(self, term: int, cause: DemotionCause, reason: str, acting_until: float) -> None:
        logger.warning("no longer primary (term %d): %s", term, reason)
        self.metrics.demotions.labels(cause.value).inc()
        self.metrics.is_primary.set(0)
        self._event("demote", term=term, cause=cause.value, reason=reason, acting_until=acting_until)
        self._resources(self.kept.handle(Demoted(term, cause, reason, acting_until), self._clock()))
        self.switch_automations(False)

    def observe(self, event: Event) -> None:
        """Every event the election is fed, before the election's own actions are carried out: while this node
        keeps resources through a broker outage, they tell ``hasync.kept`` when to release them."""
        self._resources(self.kept.handle(event, self._clock()))

    def fault(self, term: int, reason: str) -> None:
        logger.warning("fault: %s", reason)
        self._event("fault", reason=reason)
        self._hook(HookEvent.FAULT, term, reason)

    def starting(self) -> None:
        """Like keepalived's notify_backup at start: a previous run killed as primary may have left the
        promote hook's effects (dnsmasq, a floating IP) behind."""
        self._hook(HookEvent.DEMOTE, 0, "starting as standby")

    def fenced(self, term: int, outcome: str, *, primary: bool) -> None:
        """The guardian ran the fence command: this agent stalled past its deadline as primary of ``term``. Still
        primary (starved, not frozen, and no other node elected meanwhile): the promote hook starts again what the
        fence stopped, as a lapsed floating IP is added again."""
        logger.warning("the guardian ran the fence command (%s): the deadline of term %d passed before the demote hook "
                       "had run (this agent stalled, or the hook is slow)%s", outcome, term,
                       "; still primary: running the promote hook again" if primary else "")
        self._event("fenced", term=term, outcome=outcome, primary=primary)
        if primary:
            self._hook(HookEvent.PROMOTE, term, "fenced while stalled; still primary")

    def hook_failed(self, event: HookEvent, error: str) -> None:
        self._event("hook_failed", hook=event.value, error=error)

    def release_after_hooks(self, record: LeaseRecord) -> None:
        """Publish a release once the demote hook has run and the automations are off (in order)."""
        self._submit(_Release(record))

    def switch_automations(self, enabled: bool) -> None:
        """Managed mode: automations on only on the primary (except ``run_everywhere``)."""
        if self.automations is not None and self.config.homeassistant.managed_automations:
            self._submit(_Switch(enabled))

    async def idle(self) -> None:
        """Wait until every job asked for so far is done."""
        await self._idle.wait()

    # ---- Home Assistant's view of this node -----------------------------------------------------

    def announce(self, is_primary: bool, deadline: float | None) -> None:
        """Discovery configs (retained), then the primary sensor's state."""
        if self.discovery is None:
            return
        for topic, payload in self.discovery.configs():
            self.publisher.put(topic, payload, retain=True)
        self.primary_state(deadline)

    def primary_state(self, deadline: float | None) -> None:
        """HA's primary sensor of this node: it expires in HA (and stops counting as primary there) if the
        agent stops refreshing it. Not retained: only a live agent may say a node is primary. ``deadline``
        is the local time this node stops acting as primary, None when it is not primary."""
        if self.discovery is None:
            return
        until = self._wall() + (deadline - self._clock()) if deadline is not None else 0.0
        self.publisher.put(self.discovery.primary_state_topic(), primary_state(deadline is not None, until),
                           retain=False)

    # ---- the worker -----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            job = await self._jobs.get()
            try:
                match job:
                    case _Release(record=record):
                        await self._release(record)
                    case _Switch(enabled=enabled):
                        await self._switch(enabled)
            finally:
                if self._jobs.empty():
                    self._idle.set()

    def release_messages(self, record: LeaseRecord) -> list[Outgoing]:
        """The leader topic's "nobody" and the release itself. Neither is retained: a late one must not
        overwrite what a newer primary retained meanwhile."""
        announcement = LeaderAnnouncement(leader=None, term=record.term, sent_at=self._wall())
        stamped = record.model_copy(update={"sent_at": self._wall()})
        logger.info("releasing term %d%s", record.term, f" to {record.successor}" if record.successor else "")
        return [Outgoing(self.topics.leader, announcement.to_payload(), False),
                Outgoing(self.topics.lease, self._seal(self.topics.lease, stamped), False)]

    async def wait_for_hooks(self) -> None:
        if self.hooks is None:
            return
        try:
            async with asyncio.timeout(self.config.hooks.timeout + 1):
                await self.hooks.drain()
        except TimeoutError:
            logger.error("the demote hook did not finish in %.0f s; releasing anyway", self.config.hooks.timeout)

    async def release_vip(self) -> None:
        """The floating IPs off this node: before a release lets the successor add them."""
        if self.vip is not None:
            await self.vip.release()

    async def _release(self, record: LeaseRecord) -> None:
        await self.release_vip()
        await self.wait_for_hooks()
        for message in self.release_messages(record):
            self.publisher.put(message.topic, message.payload, retain=message.retain)

    async def _switch(self, enabled: bool) -> None:
        automations = self.automations
        if automations is None:
            return
        try:
            async with asyncio.timeout(AUTOMATIONS_TIMEOUT):
                changed = await automations.set_automations(enabled, keep=self.config.homeassistant.run_everywhere)
        except (HomeAssistantError, TimeoutError) as exc:
            logger.warning("could not turn automations %s: %s", "on" if enabled else "off",
                           exc or f"no answer within {AUTOMATIONS_TIMEOUT:g} s")
            return
        if changed:
            logger.info("turned %d automations %s: %s", len(changed), "on" if enabled else "off", ", ".join(changed))

    # ---- the resources ----------------------------------------------------------------------------

    def _resources(self, actions: list[Acquire | Release]) -> None:
        for action in actions:
            match action:
                case Acquire(term=term, scope=scope):
                    if self.vip is not None:
                        self.vip.promoted()  # adds what it does not hold; announces them all
                    if scope is Scope.FENCED:
                        logger.warning("elected again while still holding the kept resources (%s)", self._kept_names())
                        self.metrics.kept.set(0)
                    if self._includes_hooks(scope):
                        self._hook(HookEvent.PROMOTE, term, "elected")
                case Release(term=term, scope=scope, reason=reason):
                    if scope is Scope.KEPT:
                        logger.warning("releasing the resources kept through the broker outage (%s): %s",
                                       self._kept_names(), reason)
                        self.metrics.kept.set(0)
                        self.metrics.kept_releases.inc()
                        self._event("release_kept", term=term, reason=reason)
                    elif scope is Scope.FENCED:
                        logger.warning("lost the broker as primary: keeping %s until another node may be primary",
                                       self._kept_names())
                        self.metrics.kept.set(1)
                        self._event("keep", term=term, reason=reason)
                    if self.vip is not None:  # at once, whatever the hooks do: the renew deadline is the fencing point
                        self.vip.demoted(keep=scope is Scope.FENCED)
                    if self._includes_hooks(scope):
                        self._hook(HookEvent.DEMOTE, term, reason)

    def _includes_hooks(self, scope: Scope) -> bool:
        return scope is Scope.ALL or (scope is Scope.KEPT) == self._hooks_kept

    def _kept_names(self) -> str:
        names = [vip.address for vip in self.config.vip if vip.on_broker_loss is BrokerLoss.KEPT]
        if self._hooks_kept:
            names.append("the role hooks")
        return ", ".join(names)

    # ---- helpers --------------------------------------------------------------------------------

    def _submit(self, job: _Release | _Switch) -> None:
        self._idle.clear()
        self._jobs.put_nowait(job)

    def _hook(self, event: HookEvent, term: int, reason: str) -> None:
        if self.hooks is None:
            return
        role = {HookEvent.PROMOTE: NodeRole.PRIMARY, HookEvent.FAULT: NodeRole.FAULT}.get(event, NodeRole.STANDBY)
        self.hooks.submit(event, {
            "HASYNC_ROLE": role.value,
            "HASYNC_TERM": str(term),
            "HASYNC_LEADER": self._leader() or "",
            "HASYNC_REASON": reason,
        })

    def _event(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.write(event, **fields)
