"""The leader election: a pure state machine, ``Election.handle(event, now) -> actions``.

Theory of operation
===================

MQTT has no compare-and-set. Two agents can publish a claim at the same instant and the broker takes
both; a retained message is simply overwritten. hasync therefore never treats a publish as a decision.
The decision is made by *reading*: every agent subscribes to one lease topic and applies the same
deterministic rule to the records in the order the broker delivers them. The broker's order is the
arbiter, and an agent's own claim counts only when it comes back from the broker.

The stream and the view
-----------------------
Each record is a claim, a renewal or a release, numbered by ``(term, seq)``. A node's *view* is the
newest record it has accepted. The rules, applied to every record in stream order:

* a **claim** for term ``t`` names the record it follows, ``(prev_term, prev_seq)`` with
  ``t == prev_term + 1``. It is accepted iff that position is not older than the view
  (lexicographically). This is compare-and-set emulated by reading: if the leader renewed after the
  claimant last looked, or another claim for ``t`` came first, the claim names an outdated position and
  every reader rejects it. So a term has at most one accepted claim: the first in broker order.
* a **renewal** ``(t, s)`` is accepted iff ``t`` is the view's term, its holder is the view's holder,
  the lease is not released and ``s`` is greater than the view's seq. A renewal for a term newer than
  the view is adopted too: the reader missed the claim (it joined late). So is a renewal of the view's
  term by another holder while the view is only a claim and the reader has not accepted a live
  renewal or release since it (re)connected: it may have subscribed between the winning claim and a
  losing one, and read only the loser's.
* a **release** is accepted like a renewal and marks the lease free, optionally naming a successor.
* anything else is stale (an older term or seq: a replay, a rogue or late claim) and is ignored.
  Terms in a view therefore never decrease.

Only renewals are published with the retain flag (claims and releases are not), so the retained record
a joining node starts from is always one its holder published after winning its term, and a release
that arrives late (slow demote hooks) cannot replace a newer term's renewal there. A winner therefore
becomes primary only when its first renewal has come back from the broker too: from then on the
broker retains the term, and no node that missed the claim can open the same term again.

Time
----
Only local monotonic clocks are used: a record's age is judged by the local time it was *received*,
never by comparing the sender's wall clock (the ``sent_at`` fields are for humans).

* The leader acts only until ``deadline = send time of its newest echoed record + renew_deadline``
  (its claim, until the first renewal comes back).
  Every renewal that comes back extends it; if none does in time, it demotes. It checks this deadline
  (``is_leader(now)``) before anything it does as primary, so a leader that was frozen (SIGSTOP) and
  wakes up late does nothing as primary: it demotes first.
* A follower may claim only after a full ``lease_duration`` of silence on the lease topic: no record
  at all (valid or not, from anyone) received for that long. Since ``lease_duration >
  renew_deadline``, and the leader's newest echoed record was sent no later than the follower
  received it, the leader's deadline passes before the follower's claim is even sent, provided the
  two clocks' rates differ by less than ``lease_duration / renew_deadline``.
* Start-up and reconnect count as activity: a node observes for a full lease before it may claim, so
  a stale retained lease (a restarted broker can restore an old one) never leads to a claim by itself.
  A claim names the newest position the claimant knows: its own view, or a newer one that a fresh
  heartbeat of an online peer reports (a node that joined from a stale retained record is behind the
  peers that stayed; claiming from the position they hold makes every reader judge the claim alike).

Fast paths
----------
* **Release.** A graceful handover demotes first (the demote hook has run), then publishes a release
  naming the successor, which claims at once. Other nodes still wait for silence. It can be switched
  off (``release_fast_path``): then every node waits for silence after a release.
* **Last Will.** When the holder's connection drops, the broker publishes its will (a heartbeat with
  ``online: false``). If the will carries the same incarnation and connection number as the holder's
  newest record, the lease is vacant at once. This is safe because a leader demotes the moment it
  loses its own connection; it assumes the leader learns of that loss no later than a peer receives
  the will, claims and sees its claim echoed. It can be switched off (``will_fast_path``). A will
  from an older connection of a node that is back is ignored. Correctness never depends on the will
  being sent at all (amqtt never sends it for a hung client).

After vacancy, eligible nodes claim in rank order (priority, then node id), ``claim_stagger`` apart,
so the best node usually wins without a contest; when two do contest, the stream decides. At a cold
start (this node has not seen a live renewal since it started or last connected), a better peer that is
still observing (healthy, online, not in maintenance) counts in the rank too, and the node waits for the
end of that peer's observation (at most one more lease): nodes that start together, or reconnect together
after a broker restart, elect the best of them, rather than whichever reconnected first and was preempted
``preempt_delay`` later (which would also move resources a primary kept through the outage twice).

Without signed messages (``hasync.signing``) both fast paths can be forged: a will or a release that
the primary does not happen to receive lets another node take over while the primary still acts, until
its renew deadline. With signatures, only the node itself (or the broker, with the will that node
signed) can open them.

Flap damping
------------
A node that loses leadership by a fault (``FAULTS``: its deadline, its connection, its own will, a newer
term it missed, a failing health check) must not take it back by preemption until its link has been
stable for a while: otherwise a node on a flaky link loses the lease, looks eligible again a few seconds
later, preempts, and loses it again. Each such loss adds one to a penalty that halves every
``damping_half_life``; the node then holds its preemption back (its heartbeat says ``preempt: false``)
until its link has been stable for ``damping_hold * 2 ** (penalty - 1)`` (at most ``damping_max``).
Stable means: no disconnect, no claim of its own left unanswered, and its own heartbeats coming back
within ``damping_max_rtt`` of being sent (when the driver measures it: ``HeartbeatReceived.echo_rtt``)
and no more than 1.5 heartbeat intervals apart; any of these restarts the count. After a second loss (penalty
1.5 or more) the node is also the last to claim a vacant lease. A single loss (a broker restart, say)
leaves its rank alone, so the old primary usually wins the next election itself. Damping only delays
claims and preemptions: it cannot make two primaries.

A primary hands over to a better peer (preemption) once that peer, preempting, has been both eligible and of
a higher priority than the primary for ``preempt_delay``. Priorities move (``PriorityChanged``: weighted
health checks), so the delay counts from whichever came last: a check that fails for a moment does not
move leadership there and back.

A node that was asked to step down (``StepDown``, not final) holds its preemption back until it is told
to take it up again (``Resume``) or restarts: it may still be elected when the lease falls vacant, but
it does not take leadership back from a worse node, which would undo the handover before an update.

Numbers
-------
Terms and sequence numbers come from the stream, so a peer can send any value the wire allows
(``hasync.messages.MAX_INT``). A record whose term is ``MAX_TERM`` or more is ignored, and so is a peer's
view that far on: a node only ever adopts a term it can follow with a claim of the next one.

Guarantees and assumptions
--------------------------
At most one accepted claim per term, agreed by every node that read the stream; never two nodes acting
as primary at once. Assumed: one broker, which delivers each message on the lease topic to every
connected subscriber in one order; clock *rates* that differ by less than the lease/renew ratio; a
leader process that is scheduled at least once per renew interval when it is not frozen outright.
Not guaranteed: that a frozen or cut-off leader's side effects (a hook already running) stop; that
terms survive a full restart of every node *and* a broker without persistence (the retained lease is
the only memory); liveness while the broker is down.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .messages import MAX_INT, Heartbeat, LeaseRecord, NodeRole, View

MAX_TERM = MAX_INT  # terms from MAX_TERM on are ignored: nothing could follow them


class Role(enum.Enum):
    DISCONNECTED = "disconnected"
    OBSERVING = "observing"
    FOLLOWER = "standby"
    CANDIDATE = "candidate"
    LEADER = "primary"


@dataclass(frozen=True)
class Timing:
    """Seconds. Validated by ``hasync.config``; the relations are restated in ``check``."""

    lease_duration: float = 3.0
    renew_deadline: float = 2.0
    renew_interval: float = 0.5
    heartbeat_interval: float = 1.0
    claim_stagger: float = 0.15
    preempt_delay: float = 10.0
    will_fast_path: bool = True
    release_fast_path: bool = True
    # Flap damping: after losing leadership by a fault, no preemption until the link has been stable for
    # damping_hold, doubled for every further recent loss (up to damping_max); losses are forgotten with
    # a half-life of damping_half_life.
    flap_damping: bool = True
    damping_hold: float = 30.0
    damping_max: float = 600.0
    damping_half_life: float = 300.0
    damping_max_rtt: float = 0.25  # an own heartbeat slower than this to come back: the link is not stable

    def check(self) -> None:
        if not 0 < self.renew_interval < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < renew_interval < renew_deadline < lease_duration")
        if not 0 < self.heartbeat_interval <= self.lease_duration / 2:
            raise ValueError("need 0 < heartbeat_interval <= lease_duration / 2")
        if self.claim_stagger < 0 or self.preempt_delay < 0:
            raise ValueError("claim_stagger and preempt_delay must be >= 0")
        if not 0 <= self.damping_hold <= self.damping_max or self.damping_half_life <= 0:
            raise ValueError("need 0 <= damping_hold <= damping_max and damping_half_life > 0")
        if self.damping_max_rtt <= 0:
            raise ValueError("need damping_max_rtt > 0")


# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    conn: int


@dataclass(frozen=True)
class Disconnected:
    reason: str = "connection lost"


@dataclass(frozen=True)
class RecordReceived:
    record: LeaseRecord
    retained: bool = False


@dataclass(frozen=True)
class HeartbeatReceived:
    heartbeat: Heartbeat
    # For this node's own heartbeat coming back: how long it took, if the driver knows (flap damping).
    echo_rtt: float | None = None


@dataclass(frozen=True)
class HealthChanged:
    healthy: bool
    detail: str = ""


@dataclass(frozen=True)
class MaintenanceChanged:
    on: bool


@dataclass(frozen=True)
class PriorityChanged:
    """This node's priority is now ``priority`` (weighted health checks). Its heartbeats say so; peers
    preempt it or stop preempting by the usual rules. Ranks only order claims, so no priority can make two
    primaries."""

    priority: int


@dataclass(frozen=True)
class StepDown:
    """Hand leadership over gracefully. ``final`` (shutdown) also stops all future claims; otherwise the
    node holds its preemption back until ``Resume``."""

    reason: str
    successor: str | None = None
    final: bool = False


@dataclass(frozen=True)
class Resume:
    """A node that stepped down may take leadership back from worse nodes again (preemption)."""


@dataclass(frozen=True)
class Tick:
    pass


Event = (
    Connected
    | Disconnected
    | RecordReceived
    | HeartbeatReceived
    | HealthChanged
    | MaintenanceChanged
    | PriorityChanged
    | StepDown
    | Resume
    | Tick
)


# ---- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Publish a lease record. ``after_hooks``: only once every queued role hook has finished."""

    record: LeaseRecord
    retain: bool
    after_hooks: bool = False


@dataclass(frozen=True)
class Promoted:
    term: int
    deadline: float


class DemotionCause(enum.StrEnum):
    """Why a primary stopped (the label of ``hasync_demotions_total``); ``Demoted.reason`` has the details."""

    DISCONNECTED = "disconnected"
    DEADLINE = "renew_deadline"
    DEPOSED = "deposed"
    WILL = "own_will"
    STEP_DOWN = "step_down"
    SHUTDOWN = "shutdown"
    UNHEALTHY = "unhealthy"
    MAINTENANCE = "maintenance"
    PREEMPTED = "preempted"


# Losses that say something about this node's link or health: they count for flap damping.
FAULTS = frozenset({DemotionCause.DISCONNECTED, DemotionCause.DEADLINE, DemotionCause.DEPOSED,
                    DemotionCause.WILL, DemotionCause.UNHEALTHY})


@dataclass(frozen=True)
class Demoted:
    term: int
    cause: DemotionCause
    reason: str
    acting_until: float  # the last instant this node could have acted as primary


@dataclass(frozen=True)
class Fault:
    reason: str


class IgnoreReason(enum.StrEnum):
    """Why a valid lease record was not accepted (the label of ``hasync_lease_records_ignored_total``)."""

    OUTDATED_CLAIM = "claim names an outdated position"
    OLDER_TERM = "older term"
    NOT_HOLDER = "not the holder of this term"
    RELEASED = "term already released"
    OLDER_SEQ = "older or repeated seq"
    TERM_LIMIT = "term at the protocol's limit"


@dataclass(frozen=True)
class Ignored:
    record: LeaseRecord
    reason: IgnoreReason


@dataclass(frozen=True)
class RepublishHeartbeat:
    reason: str


@dataclass(frozen=True)
class ClaimUnanswered:
    """Our claim did not come back within the renew deadline: the broker dropped it (an ACL?) or
    the connection is stalling."""

    term: int


@dataclass(frozen=True)
class TermLimit:
    """The stream is at the last term a claim may open: no node can be elected any more (reported once).
    Only a forged record can get there; the way out is clearing the retained lease and restarting."""

    term: int


Action = Publish | Promoted | Demoted | Fault | Ignored | RepublishHeartbeat | ClaimUnanswered | TermLimit


# ---- state --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """The accepted view of the lease stream."""

    term: int
    seq: int
    holder: str
    incarnation: str
    conn: int
    released: bool = False
    successor: str | None = None

    @property
    def position(self) -> tuple[int, int]:
        return (self.term, self.seq)


class LeaseStream:
    """The accepted view of the lease stream, by the rules of the theory of operation. The election keeps
    one; so does an observer such as ``hasync status``, which then agrees with the agents."""

    def __init__(self) -> None:
        self.lease: Lease | None = None
        # Accepted a live renewal or release since (re)connecting: the reader is in step with the stream.
        self.synced = False

    def reconnected(self) -> None:
        self.synced = False

    def offer(self, rec: LeaseRecord, *, retained: bool) -> IgnoreReason | None:
        """Apply the stream rules; None if accepted, or why the record is ignored."""
        why = self._accept(rec)
        if why is None and rec.kind != "claim" and not retained:
            self.synced = True  # a live renewal or release: its holder won the term we now view
        return why

    def _accept(self, rec: LeaseRecord) -> IgnoreReason | None:
        lease = self.lease
        if rec.term >= MAX_TERM:
            return IgnoreReason.TERM_LIMIT
        if rec.kind == "claim":
            assert rec.prev_term is not None and rec.prev_seq is not None
            if lease is not None and (rec.prev_term, rec.prev_seq) < lease.position:
                return IgnoreReason.OUTDATED_CLAIM
            self.lease = Lease(rec.term, 0, rec.holder, rec.incarnation, rec.conn)
            return None
        if lease is None or rec.term > lease.term:
            self.lease = Lease(
                rec.term, rec.seq, rec.holder, rec.incarnation, rec.conn,
                released=rec.kind == "release", successor=rec.successor,
            )
            return None
        if rec.term < lease.term:
            return IgnoreReason.OLDER_TERM
        if rec.holder != lease.holder:
            if lease.seq > 0 or self.synced:
                return IgnoreReason.NOT_HOLDER
            # Our view of this term is only a claim, read before we were in sync with the stream: we
            # (re)connected half-way through a contest and may have missed the winning claim.
            self.lease = Lease(
                rec.term, rec.seq, rec.holder, rec.incarnation, rec.conn,
                released=rec.kind == "release", successor=rec.successor,
            )
            return None
        if lease.released:
            return IgnoreReason.RELEASED
        if rec.seq <= lease.seq:
            return IgnoreReason.OLDER_SEQ
        self.lease = replace(
            lease, seq=rec.seq, incarnation=rec.incarnation, conn=rec.conn,
            released=rec.kind == "release", successor=rec.successor,
        )
        return None


@dataclass
class Peer:
    heartbeat: Heartbeat
    received_at: float
    eligible_since: float | None = None
    observing_since: float | None = None  # first heartbeat of its current connection that said "observing"
    # Since when it has had a higher priority than this node (priorities move with weighted health checks:
    # a preemption waits for preempt_delay of that too, so a blip of a check does not move leadership).
    outranking_since: float | None = None


@dataclass
class _Leadership:
    term: int
    seq: int
    deadline: float
    next_renew_at: float
    sent_at: dict[int, float] = field(default_factory=dict)
    confirmed: bool = False  # one of our renewals came back: the broker retains this term


@dataclass
class _Candidacy:
    term: int
    sent_at: float


class Election:
    """One node's election state. Feed it events with the local monotonic time; do what it returns."""

    def __init__(
        self,
        node_id: str,
        incarnation: str,
        *,
        priority: int = 100,
        preempt: bool = True,
        timing: Timing | None = None,
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.priority = priority
        self.preempt = preempt
        self.timing = timing or Timing()
        self.timing.check()
        self.role = Role.DISCONNECTED
        self.conn = 0
        self.stream = LeaseStream()
        self.peers: dict[str, Peer] = {}
        self.healthy = False
        self.health_detail = "no health result yet"
        self.maintenance = False
        self.stopping = False
        self.preempt_held = False  # stepped down: no preemption until Resume (or a restart)
        self._cold = True  # no live renewal seen since this node started (see "cold start")
        # Flap damping: recent losses by a fault (decaying), and since when the link has looked stable.
        self._penalty = 0.0
        self._penalty_at = 0.0
        self._hold = 0.0  # how long the link must be stable, set at each loss from the penalty
        self._stable_since = 0.0
        self._last_echo: float | None = None  # our own heartbeat's last echo on this connection
        self._connected_at = 0.0
        self._last_activity = 0.0
        self._vacant_since: float | None = None
        self._holdoff_until = 0.0
        self._leadership: _Leadership | None = None
        self._candidacy: _Candidacy | None = None
        self._limit_reported = False

    # ---- queries --------------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        return self.stream.lease

    def preempting(self, now: float) -> bool:
        """Whether this node takes leadership from a worse primary (what its heartbeat reports)."""
        return self.preempt and not self.preempt_held and self.damped_until(now) is None

    def damped_until(self, now: float) -> float | None:
        """While flap damping holds this node back from preemption: until when, if its link stays stable;
        None when it does not."""
        t = self.timing
        penalty = self._penalty_now(now)
        if not t.flap_damping or penalty < 0.5:
            return None
        until = self._stable_since + self._hold
        return until if now < until else None

    def _last_in_line(self, now: float) -> bool:
        """Damped after a second recent loss: also the last to claim a vacant lease."""
        return self.damped_until(now) is not None and self._penalty_now(now) >= 1.5

    def _penalty_now(self, now: float) -> float:
        """Recent losses by a fault, each forgotten with the damping half-life."""
        return self._penalty * 2 ** (-(now - self._penalty_at) / self.timing.damping_half_life)

    def is_leader(self, now: float) -> bool:
        """True only while this node may act as primary: leader and within its renew deadline."""
        lead = self._leadership
        return lead is not None and lead.confirmed and now < lead.deadline

    @property
    def term(self) -> int:
        return self.lease.term if self.lease else 0

    @property
    def leader(self) -> str | None:
        """The node holding the lease in this node's view (None when free or unknown)."""
        if self.lease is None or self.lease.released:
            return None
        return self.lease.holder

    @property
    def deadline(self) -> float | None:
        lead = self._leadership
        return lead.deadline if lead and lead.confirmed else None

    def view(self) -> View | None:
        return View(term=self.lease.term, seq=self.lease.seq) if self.lease else None

    def eligible(self, now: float) -> bool:
        return (
            self.role in (Role.FOLLOWER, Role.CANDIDATE, Role.LEADER)
            and self.healthy
            and not self.maintenance
            and not self.stopping
            # Just stepped down (for an update, say): not a candidate for preemption or succession.
            and now >= self._holdoff_until
        )

    def next_wakeup(self, now: float) -> float:
        """The next time a Tick may change something (the caller also ticks after every event)."""
        times = [now + self.timing.heartbeat_interval]
        if self._leadership:
            times += [self._leadership.next_renew_at, self._leadership.deadline]
        if self._candidacy:
            times.append(self._candidacy.sent_at + self.timing.renew_deadline)
        if self.role is Role.OBSERVING:
            times.append(self._connected_at + self.timing.lease_duration)
        damped = self.damped_until(now)
        if damped is not None:
            times.append(damped)
        claim_at = self._claim_time(now)
        if claim_at is not None and self._claim_position(now)[0] + 1 < MAX_TERM:
            times.append(claim_at)
        return max(now, min(times))

    # ---- the entry point ------------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        actions: list[Action] = []
        match event:
            case Connected(conn=conn):
                self.conn = conn
                self.role = Role.OBSERVING
                self._cold = True  # a broker restart reconnects everyone at once: a cold start again
                self._connected_at = now
                self._last_activity = now
                self._unstable(now)
                self._last_echo = None
                self._vacant_since = None
                self._candidacy = None
                self.stream.reconnected()
            case Disconnected(reason=reason):
                self._drop_leadership(now, DemotionCause.DISCONNECTED, f"disconnected: {reason}", actions)
                self._unstable(now)
                self._candidacy = None
                self.role = Role.DISCONNECTED
            case RecordReceived(record=record, retained=retained):
                self._on_record(record, retained, now, actions)
            case HeartbeatReceived(heartbeat=hb, echo_rtt=rtt):
                self._on_heartbeat(hb, rtt, now, actions)
            case HealthChanged(healthy=healthy, detail=detail):
                was = self.healthy
                self.healthy = healthy
                self.health_detail = detail
                if was and not healthy:
                    actions.append(Fault(detail or "health check failed"))
                    self._step_down(now, DemotionCause.UNHEALTHY, f"unhealthy: {detail}", None, actions)
            case PriorityChanged(priority=priority):
                self._set_priority(priority, now)
            case MaintenanceChanged(on=on):
                self.maintenance = on
                if on:
                    self._step_down(now, DemotionCause.MAINTENANCE, "maintenance", None, actions)
            case StepDown(reason=reason, successor=successor, final=final):
                if final:
                    self.stopping = True
                cause = DemotionCause.SHUTDOWN if final else DemotionCause.STEP_DOWN
                self._step_down(now, cause, reason, successor, actions)
                if not final:
                    self._holdoff_until = now + self.timing.lease_duration
                    self.preempt_held = True
            case Resume():
                self.preempt_held = False
            case Tick():
                pass
        self._advance(now, actions)
        return actions

    def _set_priority(self, priority: int, now: float) -> None:
        self.priority = priority
        for peer in self.peers.values():
            if peer.heartbeat.priority <= priority:
                peer.outranking_since = None
            elif peer.outranking_since is None:
                peer.outranking_since = now

    # ---- the stream -----------------------------------------------------------------------------

    def _on_record(self, rec: LeaseRecord, retained: bool, now: float, actions: list[Action]) -> None:
        if self.role is Role.DISCONNECTED:
            return
        if not retained:
            self._last_activity = now
        why = self.stream.offer(rec, retained=retained)
        if why is not None:
            actions.append(Ignored(rec, why))
            if self._candidacy and rec.holder == self.node_id and rec.kind == "claim" and (
                rec.term == self._candidacy.term and rec.conn == self.conn
            ):
                self._candidacy = None
                self.role = Role.FOLLOWER
            return
        lease = self.lease
        assert lease is not None
        if rec.kind == "renew" and not retained:
            self._cold = False
        # A retained record says nothing about *when* the lease was released: only a live release
        # opens the fast path; a retained one waits for the silence rule like anything else.
        fast = self.timing.release_fast_path
        self._vacant_since = now if lease.released and not retained and fast else None
        mine = rec.holder == self.node_id and rec.incarnation == self.incarnation and rec.conn == self.conn

        if self._leadership and (
            lease.term != self._leadership.term or lease.holder != self.node_id or (lease.released and not mine)
        ):
            self._drop_leadership(now, DemotionCause.DEPOSED, f"deposed by {lease.holder} in term {lease.term}",
                                  actions)

        if rec.kind == "claim":
            if mine and self._candidacy and self._candidacy.term == rec.term:
                self._win(now, actions)
            elif self._candidacy:
                self._candidacy = None  # someone else's claim came first
                if self.role is Role.CANDIDATE:
                    self.role = Role.FOLLOWER
            elif mine:
                # Our claim won after we had given up on it: free the term at once.
                actions.append(Publish(self._record("release", rec.term, 1), retain=False))
        elif rec.kind == "renew" and mine and self._leadership and rec.term == self._leadership.term:
            lead = self._leadership
            sent = lead.sent_at.pop(rec.seq, None)
            if sent is not None:
                lead.deadline = max(lead.deadline, sent + self.timing.renew_deadline)
                for old in [s for s in lead.sent_at if s < rec.seq]:
                    del lead.sent_at[old]
                if not lead.confirmed and now < lead.deadline:
                    lead.confirmed = True
                    self.role = Role.LEADER
                    actions.append(Promoted(lead.term, lead.deadline))
        elif rec.kind == "renew" and not retained and self.role is Role.OBSERVING:
            self.role = Role.FOLLOWER  # a live, valid renewal: there is a leader, observation done

    def _on_heartbeat(self, hb: Heartbeat, rtt: float | None, now: float, actions: list[Action]) -> None:
        if hb.node == self.node_id:
            if hb.online and (hb.incarnation, hb.conn) == (self.incarnation, self.conn):
                # Our own heartbeat came back. A slow round trip, or a gap well beyond the heartbeat
                # interval (lost packets, retransmissions), is a link flap damping must not call stable.
                gap = now - self._last_echo if self._last_echo is not None else 0.0
                slow = rtt is not None and rtt > self.timing.damping_max_rtt
                if slow or gap > 1.5 * self.timing.heartbeat_interval:
                    self._unstable(now)
                self._last_echo = now
            if not hb.online and (hb.incarnation, hb.conn) != (self.incarnation, self.conn):
                actions.append(RepublishHeartbeat(f"stale will of connection {hb.incarnation}:{hb.conn}"))
            elif not hb.online and self.role is not Role.DISCONNECTED:
                # The broker has declared our current connection dead.
                self._drop_leadership(now, DemotionCause.WILL, "broker published our will", actions)
            return
        peer = self.peers.get(hb.node)
        # Eligibility counts as continuous only while heartbeats keep coming (a frozen node's last
        # heartbeat still says "eligible").
        continuous = peer is not None and now - peer.received_at <= self.timing.lease_duration
        eligible_since = peer.eligible_since if peer and continuous else None
        eligible_since = (eligible_since if eligible_since is not None else now) if hb.online and hb.eligible else None
        observing_since: float | None = None
        if hb.online and hb.role is NodeRole.OBSERVING:
            observing_since = now
            if peer is not None and continuous and (
                    peer.heartbeat.incarnation, peer.heartbeat.conn) == (hb.incarnation, hb.conn):
                observing_since = peer.observing_since if peer.observing_since is not None else now
        outranking_since = None
        if hb.priority > self.priority:
            previous = peer.outranking_since if peer is not None and continuous else None
            outranking_since = previous if previous is not None else now
        self.peers[hb.node] = Peer(hb, now, eligible_since, observing_since, outranking_since)
        lease = self.lease
        if (
            not hb.online
            and self.timing.will_fast_path
            and lease is not None
            and not lease.released
            and lease.holder == hb.node
            and (lease.incarnation, lease.conn) == (hb.incarnation, hb.conn)
            and self._vacant_since is None
        ):
            self._vacant_since = now

    # ---- decisions ------------------------------------------------------------------------------

    def _advance(self, now: float, actions: list[Action]) -> None:
        if self.role is Role.DISCONNECTED:
            return
        if self.role is Role.OBSERVING and now >= self._connected_at + self.timing.lease_duration:
            self.role = Role.FOLLOWER
        lead = self._leadership
        if lead is not None:
            if now >= lead.deadline:
                self._drop_leadership(now, DemotionCause.DEADLINE, "renew deadline passed without an echoed renewal",
                                      actions)
            else:
                successor = self._preemptor(now) if lead.confirmed else None
                if successor is not None:
                    self._step_down(now, DemotionCause.PREEMPTED, f"preempted by {successor}", successor, actions)
                elif now >= lead.next_renew_at:
                    lead.seq += 1
                    lead.sent_at[lead.seq] = now
                    lead.next_renew_at = now + self.timing.renew_interval
                    actions.append(Publish(self._record("renew", lead.term, lead.seq), retain=True))
        cand = self._candidacy
        if cand is not None and now >= cand.sent_at + self.timing.renew_deadline:
            self._candidacy = None
            self.role = Role.FOLLOWER
            self._last_activity = max(self._last_activity, now)
            self._unstable(now)
            actions.append(ClaimUnanswered(cand.term))
        claim_at = self._claim_time(now)
        if claim_at is not None and now >= claim_at:
            if self._claim_position(now)[0] + 1 >= MAX_TERM:
                # Every reader (this one too) ignores a claim of MAX_TERM: claiming it would only repeat.
                if not self._limit_reported:
                    self._limit_reported = True
                    actions.append(TermLimit(self._claim_position(now)[0]))
                return
            self._claim(now, actions)

    def _claim_time(self, now: float) -> float | None:
        """When this node may claim, or None if it may not (yet) claim at all."""
        if self._leadership or self._candidacy or not self.eligible(now):
            return None
        lease = self.lease
        t = self.timing
        successor_of_release = (
            lease is not None and lease.released and lease.successor == self.node_id
            and self._vacant_since is not None
        )
        if successor_of_release:
            assert self._vacant_since is not None
            return self._vacant_since
        if self.role is not Role.FOLLOWER or now < self._holdoff_until:
            return None
        silence_end = self._last_activity + t.lease_duration
        start = silence_end
        if self._vacant_since is not None and not (lease is not None and lease.successor):
            start = min(start, max(self._vacant_since, self._connected_at + t.lease_duration))
        if self._cold:
            # Cold start: give better peers that are still observing the time to finish (one lease at most).
            ends = [p.observing_since + t.lease_duration for p in self._starting_peers(now)
                    if p.observing_since is not None]
            if ends:
                start = max(start, min(max(ends), silence_end + t.lease_duration))
        return start + self._rank(now) * t.claim_stagger

    def _claim_position(self, now: float) -> tuple[int, int]:
        """The position a claim follows: our view, or a newer one a fresh online peer reports.

        A node that (re)joined from a stale retained record is behind the peers that stayed; claiming
        from its own view would be judged differently by them and by itself. A reported view is a
        position in the stream, so claiming from the newest one makes every reader judge the claim the
        same way (and a peer further ahead rejects it, as compare-and-set should).
        """
        best = self.lease.position if self.lease else (0, 0)
        for peer in self._fresh_peers(now):
            view = peer.heartbeat.view
            if view is not None and view.term < MAX_TERM and (view.term, view.seq) > best:
                best = (view.term, view.seq)
        return best

    def _fresh_peers(self, now: float) -> Iterable[Peer]:
        horizon = now - self.timing.lease_duration
        return (p for p in self.peers.values() if p.heartbeat.online and p.received_at >= horizon)

    def _better(self, hb: Heartbeat) -> bool:
        return (-hb.priority, hb.node) < (-self.priority, self.node_id)

    def _starting_peers(self, now: float) -> list[Peer]:
        """Better peers that are still observing and will be eligible when done (cold start only)."""
        return [
            p for p in self._fresh_peers(now)
            if p.observing_since is not None and p.heartbeat.healthy and not p.heartbeat.maintenance
            and self._better(p.heartbeat)
        ]

    def _rank(self, now: float) -> int:
        holder = self.lease.holder if self.lease else None
        if self._last_in_line(now):
            # Flap damping: after every eligible peer, whatever the priorities.
            return 1 + sum(1 for p in self._fresh_peers(now) if p.heartbeat.eligible and p.heartbeat.node != holder)
        ahead = {p.heartbeat.node for p in self._fresh_peers(now)
                 if p.heartbeat.eligible and p.heartbeat.node != holder and self._better(p.heartbeat)}
        if self._cold:
            ahead.update(p.heartbeat.node for p in self._starting_peers(now))
        return len(ahead)

    def _following_me(self, hb: Heartbeat) -> bool:
        """A peer reporting our term in its view is alive since we won and is following us; a frozen
        node's last heartbeat still looks fresh and eligible for a while, but reports an older term."""
        return hb.view is not None and self.lease is not None and hb.view.term >= self.lease.term

    def _best_successor(self, now: float) -> str | None:
        candidates = [
            p.heartbeat for p in self._fresh_peers(now)
            if p.heartbeat.eligible and p.heartbeat.node != self.node_id and self._following_me(p.heartbeat)
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda hb: (-hb.priority, hb.node)).node

    def _preemptor(self, now: float) -> str | None:
        best: Heartbeat | None = None
        for p in self._fresh_peers(now):
            hb = p.heartbeat
            if (
                hb.preempt and hb.eligible and hb.priority > self.priority and self._following_me(hb)
                and p.eligible_since is not None and p.outranking_since is not None
                and now - max(p.eligible_since, p.outranking_since) >= self.timing.preempt_delay
                and (best is None or (-hb.priority, hb.node) < (-best.priority, best.node))
            ):
                best = hb
        return best.node if best else None

    def _claim(self, now: float, actions: list[Action]) -> None:
        prev = self._claim_position(now)  # its term is below MAX_TERM: the claim's term is valid
        self._candidacy = _Candidacy(term=prev[0] + 1, sent_at=now)
        self.role = Role.CANDIDATE
        actions.append(
            Publish(self._record("claim", prev[0] + 1, 0, prev=prev), retain=False)
        )

    def _win(self, now: float, actions: list[Action]) -> None:
        cand = self._candidacy
        assert cand is not None
        self._candidacy = None
        deadline = cand.sent_at + self.timing.renew_deadline
        if now >= deadline:
            self.role = Role.FOLLOWER
            actions.append(Publish(self._record("release", cand.term, 1), retain=False))
            return
        # The claim won, but this node is not primary until its first renewal comes back: a claim is
        # not retained, so until the broker retains a record of the term, a node that missed the claim
        # could open the same term again. _advance publishes renewal 1 at once.
        self._leadership = _Leadership(term=cand.term, seq=0, deadline=deadline, next_renew_at=now)

    def _drop_leadership(
        self, now: float, cause: DemotionCause, reason: str, actions: list[Action]
    ) -> _Leadership | None:
        lead = self._leadership
        if lead is None:
            return None
        self._leadership = None
        if self.role in (Role.LEADER, Role.CANDIDATE):
            self.role = Role.FOLLOWER
        self._last_activity = max(self._last_activity, now)
        if lead.confirmed:
            actions.append(Demoted(lead.term, cause, reason, acting_until=min(now, lead.deadline)))
            if cause in FAULTS:
                self._penalty = self._penalty_now(now) + 1
                self._penalty_at = now
                t = self.timing
                self._hold = min(t.damping_max, t.damping_hold * 2 ** (self._penalty - 1))
                self._unstable(now)
        return lead

    def _unstable(self, now: float) -> None:
        """The link (or the node) just misbehaved: flap damping counts its stable time from now."""
        self._stable_since = max(self._stable_since, now)

    def _step_down(
        self, now: float, cause: DemotionCause, reason: str, successor: str | None, actions: list[Action]
    ) -> None:
        if self._candidacy is not None:
            # A claim in flight may still win; _on_record releases a won term we no longer want.
            self._candidacy = None
            self.role = Role.FOLLOWER
        if self._leadership is None or not self.is_leader(now):
            self._drop_leadership(now, cause, reason, actions)
            return
        if successor is None or successor == self.node_id:
            successor = self._best_successor(now)
        lead = self._drop_leadership(now, cause, reason, actions)
        assert lead is not None
        release = self._record("release", lead.term, lead.seq + 1, successor=successor)
        # Not retained: a release that arrives late (slow demote hooks) must not replace a newer term's
        # renewal as the broker's retained lease. A node that joins after it waits for silence instead.
        actions.append(Publish(release, retain=False, after_hooks=True))

    def _record(
        self,
        kind: str,
        term: int,
        seq: int,
        *,
        prev: tuple[int, int] | None = None,
        successor: str | None = None,
    ) -> LeaseRecord:
        return LeaseRecord.model_validate(
            {
                "kind": kind,
                "term": term,
                "seq": seq,
                "holder": self.node_id,
                "incarnation": self.incarnation,
                "conn": self.conn,
                "prev_term": prev[0] if prev else None,
                "prev_seq": prev[1] if prev else None,
                "successor": successor,
                "priority": self.priority,
                "lease_ms": int(self.timing.lease_duration * 1000),
                "sent_at": 0.0,
            }
        )
