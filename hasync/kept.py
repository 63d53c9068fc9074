"""Resources kept through a broker outage: a pure state machine, ``KeptResources.handle(input, now) -> actions``.

Theory of operation
===================

The election fences everything. A primary that cannot renew its lease stops acting at its renew deadline,
before any other node may claim, so two nodes never act as primary at once (``hasync.election``). For the
primary's *resources* (a floating IP, what its role hooks start: dnsmasq) that has a price in a home: when
the broker goes down, the primary lets go of DHCP and DNS and no other node can take them (nobody can be
elected without a broker), so the whole house loses them because of the broker. keepalived keeps serving.

So each resource says what a broker loss does to it (``on_broker_loss``):

* ``fenced`` (the default): released with the lease, at the renew deadline, as every resource always was.
* ``kept``: held through the outage while this node was the last primary and sees no other primary.

This module decides *when* kept resources are released; ``hasync.effects`` knows which resources are kept.
It reads the same events the election reads (``hasync.election.Event``) and the election's role changes
(``Promoted``, ``Demoted``), and answers with what to acquire or release, in three scopes: ``ALL`` the
resources, only the ``FENCED`` ones, only the ``KEPT`` ones.

States
------
* ``IDLE``: not primary, nothing kept. ``Promoted`` -> ``PRIMARY``, acquire ``ALL``.
* ``PRIMARY``: every resource held. ``Demoted`` by a broker loss (``BROKER_LOSS``: the connection dropped,
  the renew deadline passed, the broker published this node's will) -> ``KEPT``, release the ``FENCED``
  ones; ``Demoted`` for any other cause (a step-down, a preemption, a failing health check, maintenance,
  shutdown, a newer term) -> ``IDLE``, release ``ALL``: these still release before the successor is told.
* ``KEPT`` (for the term it held): the kept resources stay until one of these, then ``IDLE``, release ``KEPT``:

  - **another node is, or may be, primary**: a lease record of another holder, or a heartbeat of another
    node reporting itself primary, for a term above the one held (and above any term this node claimed
    since: its own new claim is not a rival);
  - **not re-elected in time**: ``grace`` seconds (``reelection_grace``) after the first sign since the loss
    that the link works again (a new connection, any message received) without being elected again;
  - **this node lets go**: a step-down, shutdown or maintenance.

  ``Promoted`` (re-elected while still holding them) -> ``PRIMARY``, acquire only the ``FENCED`` ones: the
  kept resources were never released, so what acquires them (the promote hook) does not run again. A lost
  connection stops the re-election clock; the next connection starts it again. A failing health check
  does not release them: during a broker outage the checks that go through the broker fail too (Home
  Assistant's MQTT link), and a kept resource would then be fenced after all. An unhealthy node is not
  re-elected, so the clock releases them once the broker is back.

Guarantee and trade-off
-----------------------
Fenced resources keep the election's guarantee: released at the renew deadline, never held by two nodes.
Kept resources give it up in exactly one case: this node cut off from the broker but not from the LAN. The
other nodes, still connected, elect a new primary a lease after the last renewal, and it acquires them too;
this node cannot know (it hears nothing from the broker) and holds them until it reaches the broker again
and reads the newer term. Both hold them for the length of the cut, less about a lease (``lease_duration``),
plus the time to reconnect. When the broker itself is down nobody else can be elected, and there is no
overlap. Kept resources are for what tolerates a second holder for a while (a DHCP server with a range of its
own, a DNS forwarder, an address whose clients follow the newest gratuitous ARP), never for what must not run
twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .election import (
    Connected,
    Demoted,
    DemotionCause,
    Disconnected,
    Event,
    HeartbeatReceived,
    MaintenanceChanged,
    Promoted,
    RecordReceived,
    StepDown,
    Timing,
)
from .messages import NodeRole

# Demotions that only say this node lost the broker, not that another node may lead or that it should not.
BROKER_LOSS = frozenset({DemotionCause.DISCONNECTED, DemotionCause.DEADLINE, DemotionCause.WILL})


def reelection_grace(timing: Timing) -> float:
    """How long a kept node may take to be elected again once its link works: a reconnected node observes
    for a lease before it may claim, claims after at most one more lease of silence (its rank's stagger
    included), and its claim and first renewal must come back within a renew deadline."""
    return 2 * timing.lease_duration + timing.renew_deadline


class State(enum.Enum):
    IDLE = "idle"
    PRIMARY = "primary"
    KEPT = "kept"


class Scope(enum.StrEnum):
    ALL = "all"
    FENCED = "fenced"
    KEPT = "kept"


@dataclass(frozen=True)
class Acquire:
    term: int
    scope: Scope


@dataclass(frozen=True)
class Release:
    term: int  # the term the resources were held for
    scope: Scope
    reason: str


Action = Acquire | Release
Input = Event | Promoted | Demoted


class KeptError(Exception):
    """A role change that cannot happen in this state (the election alternates promotions and demotions)."""


class KeptResources:
    """One node's kept resources. ``keeps``: whether any resource is kept at all (if not, a broker loss
    releases everything, as it always did)."""

    def __init__(self, node_id: str, *, grace: float, keeps: bool = True) -> None:
        self.node_id = node_id
        self.grace = grace
        self.keeps = keeps
        self.state = State.IDLE
        self.term = 0  # the term the resources are held for (PRIMARY, KEPT)
        self.kept_since: float | None = None
        self._rival_above = 0  # KEPT: a rival's term above this releases them
        self._release_at: float | None = None  # KEPT: not re-elected by then, release

    def next_wakeup(self) -> float:
        """When a ``Tick`` may release the kept resources (infinity if nothing is due)."""
        return self._release_at if self._release_at is not None else float("inf")

    def status(self) -> dict[str, object] | None:
        """What ``/healthz`` shows while resources are kept, else None."""
        if self.state is not State.KEPT:
            return None
        return {"term": self.term, "since": self.kept_since, "reelection_due": self._release_at}

    def handle(self, event: Input, now: float) -> list[Action]:
        actions: list[Action] = []
        match event:
            case Promoted(term=term):
                if self.state is State.PRIMARY:
                    raise KeptError(f"promoted for term {term} while primary for term {self.term}")
                scope = Scope.FENCED if self.state is State.KEPT else Scope.ALL
                self._enter(State.PRIMARY, term)
                actions.append(Acquire(term, scope))
            case Demoted(term=term, cause=cause, reason=reason):
                if self.state is not State.PRIMARY:
                    raise KeptError(f"demoted from term {term} while {self.state.value}")
                if cause in BROKER_LOSS and self.keeps:
                    self._enter(State.KEPT, term)
                    self.kept_since = now
                    self._rival_above = term
                    actions.append(Release(term, Scope.FENCED, reason))
                else:
                    self._enter(State.IDLE, 0)
                    actions.append(Release(term, Scope.ALL, reason))
            case _ if self.state is State.KEPT:
                why = self._reason_to_release(event, now)
                if why is not None:
                    held = self.term
                    self._enter(State.IDLE, 0)
                    actions.append(Release(held, Scope.KEPT, why))
        return actions

    # ---- internals ------------------------------------------------------------------------------

    def _enter(self, state: State, term: int) -> None:
        self.state, self.term = state, term
        if state is not State.KEPT:
            self.kept_since = None
            self._release_at = None

    def _reason_to_release(self, event: Event, now: float) -> str | None:
        match event:
            case Disconnected():
                self._release_at = None  # no link: nothing to learn, no election to win
                return None
            case StepDown(reason=reason):
                return f"stepping down ({reason})"
            case MaintenanceChanged(on=True):
                return "maintenance"
            case RecordReceived(record=rec):
                if rec.holder == self.node_id:
                    self._rival_above = max(self._rival_above, rec.term)
                elif rec.term > self._rival_above:
                    return f"{rec.holder} {'claimed' if rec.kind == 'claim' else 'holds'} term {rec.term}"
            case HeartbeatReceived(heartbeat=hb):
                term = hb.view.term if hb.view is not None else 0
                if hb.node != self.node_id and hb.role is NodeRole.PRIMARY and term > self._rival_above:
                    return f"{hb.node} reports itself primary in term {term}"
        if isinstance(event, Connected | RecordReceived | HeartbeatReceived) and self._release_at is None:
            self._release_at = now + self.grace  # the link works: the election has this long to pick us again
        if self._release_at is not None and now >= self._release_at:
            return f"not elected again within {self.grace:g} s of reaching the broker"
        return None


__all__ = ["BROKER_LOSS", "Acquire", "Action", "KeptError", "KeptResources", "Release", "Scope",
           "State", "reelection_grace"]
