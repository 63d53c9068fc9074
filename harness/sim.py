"""Test helpers for the pure election: message builders and a discrete-event model of the cluster.

``Sim`` runs several ``Election`` nodes over ``harness.fakebroker.BrokerModel``, the broker model the
in-process tier uses too, with the agent's own pieces: heartbeats built by ``hasync.heartbeat`` and
every message encoded and routed (``hasync.inbound``) as an agent would. It is the reference for what the
election's theory of operation assumes about the world (see hasync.election):

* one broker, one total order of publishes on the lease topic; every *connected* subscriber gets
  every message of a topic, in that order (FIFO per subscriber and topic), each delivery with its own
  delay. Messages are lost only by losing the connection;
* the broker keeps the last retained record (renewals and releases are retained, claims are not) and
  the last retained heartbeat (or will) of every node, and sends them on (re)connect with
  ``retained=True``;
* duplicates and stale re-sends only within one session (clean sessions: a new connection never gets
  an old connection's queue), possibly out of order;
* the broker publishes a node's will (if it publishes one at all: amqtt does not for a hung client)
  only after the agent has noticed the loss of that connection, or ``keepalive_timeout`` after the
  agent went deaf (frozen, or cut off without noticing yet); ``keepalive_timeout`` is longer than a
  renew deadline on the slowest clock. This is the will fast path's documented assumption;
* local clocks ``t_local = offset + rate * t_global`` with rates inside ``RATE_BOUNDS``, whose ratio
  stays below ``lease_duration / renew_deadline``;
* a frozen (SIGSTOPped) process keeps receiving into its socket buffer and handles the backlog when it
  resumes, all at the (jumped) local time of resumption; its clock keeps running meanwhile;
* the agent publishes its heartbeat on connect, every ``heartbeat_interval`` and when asked to
  (``RepublishHeartbeat``), ticks the election at ``next_wakeup`` (and at least every ``max_tick``)
  and after every event, and publishes an ``after_hooks`` release ``hook_delay_min..hook_delay`` late.

Everything is recorded for the invariants: ``Sim.check_safety()`` raises ``InvariantError`` for two
winners of a term, two acting primaries at one global instant, or a view term going back;
``Sim.leader_samples`` and ``Sim.liveness_bound()`` serve the liveness check in test_simulation.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hasync import heartbeat as heartbeats
from hasync.election import (
    Action,
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
    StepDown,
    Tick,
    Timing,
)
from hasync.inbound import Router, ToElection
from hasync.messages import Heartbeat, LeaseRecord, NodeRole, View, parse
from hasync.topics import Topics
from hasync.transport import Incoming, Will

from .fakebroker import BrokerModel, Client

# ---- message builders ---------------------------------------------------------------------------


def record(
    kind: Literal["claim", "renew", "release"],
    term: int,
    seq: int,
    holder: str,
    *,
    prev: tuple[int, int] | None = None,
    successor: str | None = None,
    incarnation: str | None = None,
    conn: int = 1,
    priority: int = 100,
) -> LeaseRecord:
    return LeaseRecord(
        kind=kind,
        term=term,
        seq=seq,
        holder=holder,
        incarnation=incarnation or f"{holder}-1",
        conn=conn,
        prev_term=prev[0] if prev else None,
        prev_seq=prev[1] if prev else None,
        successor=successor,
        priority=priority,
        lease_ms=3000,
        sent_at=0.0,
    )


def claim(holder: str, term: int, prev: tuple[int, int], **kw: Any) -> LeaseRecord:
    return record("claim", term, 0, holder, prev=prev, **kw)


def renew(holder: str, term: int, seq: int, **kw: Any) -> LeaseRecord:
    return record("renew", term, seq, holder, **kw)


def release(holder: str, term: int, seq: int, **kw: Any) -> LeaseRecord:
    return record("release", term, seq, holder, **kw)


def heartbeat(
    node: str,
    *,
    online: bool = True,
    view: tuple[int, int] | None = None,
    eligible: bool = True,
    priority: int = 100,
    preempt: bool = True,
    incarnation: str | None = None,
    conn: int = 1,
    role: NodeRole | None = None,
    leader: str | None = None,
    healthy: bool | None = None,
    maintenance: bool = False,
) -> Heartbeat:
    """A peer's heartbeat (``online=False``: its Last Will)."""
    return Heartbeat(
        node=node,
        incarnation=incarnation or f"{node}-1",
        conn=conn,
        online=online,
        role=role or (NodeRole.STANDBY if online else NodeRole.OFFLINE),
        view=View(term=view[0], seq=view[1]) if view else None,
        leader=leader,
        priority=priority,
        preempt=preempt,
        healthy=eligible if healthy is None else healthy,
        eligible=eligible and online,
        maintenance=maintenance,
    )


# ---- the simulation -----------------------------------------------------------------------------

# Clock rates: 1.1 / 0.9 = 1.22 < lease_duration / renew_deadline = 1.5 with the default timing.
RATE_BOUNDS = (0.9, 1.1)
EPS = 1e-9


@dataclass(frozen=True)
class Net:
    """Delays in global seconds. Every delivery takes ``down_min..down_max`` (per node, see
    ``Sim.node_net``), publishes reach the broker after ``up_min..up_max``. ``dup_p``: chance that a
    delivery is repeated later in the same session, ``replay_max`` seconds after the original at most.
    """

    up_min: float = 0.0
    up_max: float = 0.02
    down_min: float = 0.005
    down_max: float = 0.05
    dup_p: float = 0.0
    replay_max: float = 1.0

    @property
    def max_delay(self) -> float:
        return self.up_max + self.down_max


@dataclass(frozen=True)
class Flaky:
    """A flaky link (what ``tc netem delay 200ms 150ms loss 10%`` does to a TCP connection): every message
    to or from the host takes ``delay`` +- ``jitter``; with chance ``loss`` a segment is lost and the
    message waits for a retransmission, ``rto`` later. Order is kept (TCP), nothing is lost for good,
    and the connection survives (the stalls stay well below the keepalive)."""

    start: float
    end: float
    delay: float = 0.2
    jitter: float = 0.15
    loss: float = 0.1
    rto: tuple[float, float] = (0.4, 1.0)


@dataclass
class Interval:
    node: str
    incarnation: str
    term: int
    start: float
    end: float | None = None


@dataclass
class Host:
    """One machine: its clock, its network, and the successive incarnations of its agent."""

    node_id: str
    priority: int
    preempt: bool
    rate: float
    offset: float
    net: Net
    election: Election | None = None
    restarts: int = 0
    alive: bool = False
    believes_connected: bool = False  # the agent's view of its connection
    session: int | None = None  # the broker's view: the session id currently open for this host
    paused: bool = False
    paused_at: float = 0.0
    agent_session: int | None = None  # the session the agent believes it is on
    router: Router | None = None
    backlog: list[Event] = field(default_factory=list)
    disconnect_pending: bool = False  # the broker dropped us while frozen: learn it on resume
    tick_token: int = 0
    hb_token: int = 0
    net_down_until: float = 0.0  # a cut: no connection can be made before this
    reconnect_token: int = 0
    healthy: bool = True
    maintenance: bool = False
    send_clock: float = 0.0  # FIFO uplink: the broker gets this host's publishes in send order
    flaky: Flaky | None = None
    heartbeats_sent: dict[float, float] = field(default_factory=dict)  # sent_at -> local send time

    def local(self, t: float) -> float:
        return self.offset + self.rate * t

    def global_(self, t_local: float) -> float:
        return (t_local - self.offset) / self.rate


class InvariantError(AssertionError):
    pass


class Sim:
    """A cluster of ``Election`` nodes over a model broker, driven by a global event queue."""

    def __init__(
        self,
        hosts: list[Host],
        *,
        timing: Timing | None = None,
        seed: int = 0,
        keepalive_timeout: float = 3.0,
        hook_delay: float = 0.0,
        hook_delay_min: float = 0.0,
        max_tick: float = 0.05,
        trace: bool = False,
    ) -> None:
        self.timing = timing or Timing()
        self.hosts = {h.node_id: h for h in hosts}
        self.rng = random.Random(seed)
        self.keepalive_timeout = keepalive_timeout
        self.hook_delay = hook_delay
        self.hook_delay_min = hook_delay_min
        self.max_tick = max_tick
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._session_ids = itertools.count(1)
        # the broker
        self.topics = Topics("sim", "cluster")
        self.model = BrokerModel()
        self._clients: dict[int, Client] = {}  # session id -> the broker's connection
        self._fifo: dict[tuple[int, str], float] = {}  # (session, topic) -> last delivery time
        # records for the invariants
        self.intervals: list[Interval] = []
        self.winners: dict[int, list[tuple[str, str, float]]] = {}  # term -> (node, incarnation, when)
        self.excused: list[str] = []  # terms won twice across a loss of the broker's retained lease
        self.reused_terms: set[int] = set()
        self.leader_samples: list[tuple[float, str | None]] = []
        self.last_disturbance = 0.0
        self.violations: list[str] = []
        self.trace_on = trace
        self.log: list[str] = []
        self._last_term: dict[tuple[str, str], int] = {}
        self.ignored = 0
        self._triggers: list[tuple[str, float, Callable[[str], None]]] = []
        self.broker_down_until = 0.0
        self.amnesia_at: float | None = None  # the broker last lost or rolled back its retained lease

    @property
    def retained_lease(self) -> LeaseRecord | None:
        payload = self.model.retained.get(self.topics.lease)
        return parse(LeaseRecord, payload) if payload else None

    @property
    def lease_log(self) -> list[LeaseRecord]:
        """Every lease record the broker accepted, in its order."""
        return [parse(LeaseRecord, p.payload) for p in self.model.log if p.topic == self.topics.lease and p.payload]

    # ---- plumbing ---------------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (max(t, self.now), next(self._seq), fn))

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end:
            t, _, fn = heapq.heappop(self._queue)
            self.now = t
            fn()
            self._sample()
        self.now = end
        self._sample()

    def trace(self, msg: str) -> None:
        if self.trace_on:
            self.log.append(f"{self.now:9.4f} {msg}")

    def disturbed(self) -> None:
        self.last_disturbance = max(self.last_disturbance, self.now)

    def _delay(self, lo: float, hi: float) -> float:
        return lo + self.rng.random() * (hi - lo)

    def _link_delay(self, h: Host, lo: float, hi: float) -> float:
        """One message's delay on ``h``'s link: the network's, or the flaky link's while it lasts."""
        f = h.flaky
        if f is None or not f.start <= self.now < f.end:
            return self._delay(lo, hi)
        delay = max(0.0, f.delay + (2 * self.rng.random() - 1) * f.jitter)
        while self.rng.random() < f.loss:  # lost, retransmitted (and maybe lost again)
            delay += self._delay(*f.rto)
        return delay

    def flaky(self, node_id: str, start: float, end: float, **link: Any) -> None:
        """Make ``node_id``'s link flaky from ``start`` to ``end`` (see ``Flaky``)."""
        self.hosts[node_id].flaky = Flaky(start, end, **link)

    # ---- the agents -------------------------------------------------------------------------------

    def start(self, node_id: str, t: float) -> None:
        """(Re)start the agent on a host at global time ``t`` as a new incarnation."""

        def go() -> None:
            h = self.hosts[node_id]
            if h.alive:
                return
            h.restarts += 1
            h.alive = True
            h.paused = False
            h.backlog.clear()
            h.disconnect_pending = False
            h.believes_connected = False
            h.election = Election(
                node_id, f"{node_id}-{h.restarts}", priority=h.priority, preempt=h.preempt,
                timing=self.timing,
            )
            h.router = Router(self.topics, node_id)
            self.trace(f"{node_id}: start incarnation {h.election.incarnation}")
            self.disturbed()
            self._handle(h, HealthChanged(h.healthy, "" if h.healthy else "sim"))
            if h.maintenance:
                self._handle(h, MaintenanceChanged(True))
            self._connect_later(h, 0.0)

        self.at(t, go)

    def _handle(self, h: Host, event: Event) -> None:
        e = h.election
        assert e is not None and h.alive
        if h.paused:
            h.backlog.append(event)
            return
        now = h.local(self.now)
        actions = e.handle(event, now)
        if not isinstance(event, Tick | HeartbeatReceived) or actions:
            self.trace(f"{h.node_id}: {_short(event)} -> {[_short(a) for a in actions]}")
        self._check_term(h, e)
        for action in actions:
            self._act(h, e, action)
        self._schedule_tick(h)

    def _check_term(self, h: Host, e: Election) -> None:
        key = (h.node_id, e.incarnation)
        last = self._last_term.get(key, 0)
        if e.term < last:
            self.violations.append(f"{self.now:.4f}: {key} view term went back {last} -> {e.term}")
        self._last_term[key] = e.term

    def when(self, what: str, after: float, fn: Callable[[str], None]) -> None:
        """Call ``fn(node_id)`` the first time after global time ``after`` that a node does ``what``:
        "claim", "renew", "release" (publishes one) or "promote"; to aim faults at narrow windows."""
        self._triggers.append((what, after, fn))

    def _fire(self, what: str, node_id: str) -> None:
        due = [t for t in self._triggers if t[0] == what and t[1] <= self.now]
        for t in due:
            self._triggers.remove(t)
            t[2](node_id)

    def _act(self, h: Host, e: Election, action: Action) -> None:
        match action:
            case Publish(record=rec):
                self._fire(rec.kind, h.node_id)
        match action:
            case Publish(record=rec, retain=retain, after_hooks=after_hooks):
                if after_hooks and self.hook_delay > 0:
                    session = h.session if h.believes_connected else None
                    self.at(self.now + self._delay(self.hook_delay_min, self.hook_delay),
                            lambda: self._publish_from(h, rec, retain, session))
                else:
                    self._publish_from(h, rec, retain, h.session if h.believes_connected else None)
            case Promoted(term=term, deadline=deadline):
                self._check_winner(term, h.node_id, e.incarnation)
                self.intervals.append(Interval(h.node_id, e.incarnation, term, self.now))
                self._fire("promote", h.node_id)
                if h.global_(deadline) <= self.now:
                    self.violations.append(f"{self.now:.4f}: {h.node_id} promoted past its deadline")
            case Demoted(term=term, acting_until=until):
                iv = self._open_interval(h, e)
                if iv is None or iv.term != term:
                    self.violations.append(f"{self.now:.4f}: {h.node_id} demoted from {term} it never led")
                    return
                iv.end = min(self.now, h.global_(until))
                if h.global_(until) > self.now + EPS:
                    self.violations.append(f"{self.now:.4f}: {h.node_id} acting_until in the future")
            case RepublishHeartbeat():
                self._publish_heartbeat(h)
            case Fault() | Ignored():
                if isinstance(action, Ignored):
                    self.ignored += 1

    def _open_interval(self, h: Host, e: Election) -> Interval | None:
        for iv in reversed(self.intervals):
            if iv.node == h.node_id and iv.incarnation == e.incarnation and iv.end is None:
                return iv
        return None

    def _schedule_tick(self, h: Host) -> None:
        e = h.election
        assert e is not None
        h.tick_token += 1
        token = h.tick_token
        wake = h.global_(e.next_wakeup(h.local(self.now))) + EPS
        t = min(max(wake, self.now + 1e-6), self.now + self.max_tick)

        def tick() -> None:
            if h.alive and not h.paused and h.tick_token == token:
                self._handle(h, Tick())

        self.at(t, tick)

    def _schedule_heartbeat(self, h: Host) -> None:
        h.hb_token += 1
        token = h.hb_token

        def beat() -> None:
            if h.alive and not h.paused and h.hb_token == token and h.believes_connected:
                self._publish_heartbeat(h)

        self.at(self.now + self.timing.heartbeat_interval / h.rate, beat)

    def _publish_heartbeat(self, h: Host) -> None:
        e = h.election
        assert e is not None
        if h.believes_connected:
            # sent_at: the global send time, so that its echo's round trip can be told (flap damping)
            h.heartbeats_sent[self.now] = h.local(self.now)
            self._publish_hb_from(h, heartbeats.build(e, h.local(self.now), sent_at=self.now), h.session)
        self._schedule_heartbeat(h)

    # ---- the broker -------------------------------------------------------------------------------

    def _uplink(self, h: Host) -> float:
        t = max(h.send_clock, self.now + self._link_delay(h, h.net.up_min, h.net.up_max))
        h.send_clock = t
        return t

    def _publish_from(self, h: Host, rec: LeaseRecord, retain: bool, session: int | None) -> None:
        if session is None:
            return

        def arrive() -> None:
            if h.session != session:
                self.trace(f"broker: lost {_short(rec)} from dead session of {h.node_id}")
                return
            self.trace(f"broker: {_short(rec)}")
            self.model.publish(self._clients[session], self.topics.lease, rec.to_payload(), retain=retain)

        self.at(self._uplink(h), arrive)

    def _publish_hb_from(self, h: Host, hb: Heartbeat, session: int | None) -> None:
        if session is None:
            return

        def arrive() -> None:
            if h.session == session:
                self.model.publish(self._clients[session], self.topics.heartbeat(hb.node), hb.to_payload(),
                                   retain=True)

        self.at(self._uplink(h), arrive)

    def _deliver(self, h: Host, session: int, message: Incoming) -> None:
        """The broker hands ``message`` to the host's connection: it arrives after a network delay, behind
        every earlier message of its topic; a live one may come again later (a QoS 1 duplicate)."""
        key = (session, message.topic)
        t = max(self._fifo.get(key, 0.0), self.now + self._link_delay(h, h.net.down_min, h.net.down_max))
        self._fifo[key] = t

        def arrive() -> None:
            if h.session == session and h.alive and h.believes_connected:
                assert h.router is not None
                routed = h.router.route(message)  # the agent's own decoding: a MessageError fails the test
                if isinstance(routed, ToElection):
                    event = routed.event
                    if isinstance(event, HeartbeatReceived) and event.heartbeat.node == h.node_id:
                        sent = h.heartbeats_sent.pop(event.heartbeat.sent_at, None)
                        if sent is not None:  # as the agent does: the echo's round trip
                            event = HeartbeatReceived(event.heartbeat, echo_rtt=h.local(self.now) - sent)
                    self._handle(h, event)

        self.at(t, arrive)
        if not message.retain and h.net.dup_p > 0 and self.rng.random() < h.net.dup_p:
            self.at(t + self._delay(0, h.net.replay_max), arrive)

    def _open_session(self, h: Host) -> None:
        e = h.election
        assert e is not None
        session = next(self._session_ids)
        h.session = session
        h.agent_session = session
        h.believes_connected = True
        self.trace(f"{h.node_id}: connected, session {session}, conn {e.conn + 1}")
        self.disturbed()
        self._handle(h, Connected(e.conn + 1))
        will = Will(self.topics.heartbeat(h.node_id), heartbeats.build(e, h.local(self.now), online=False).to_payload())
        client = self.model.connect(f"{h.node_id}-{session}", will, functools.partial(self._deliver, h, session))
        self._clients[session] = client
        # retained messages first, then whatever is published after the subscription
        self.model.subscribe(client, self.topics.lease, self.topics.all_heartbeats)
        self._publish_heartbeat(h)

    def _connect_later(self, h: Host, delay: float) -> None:
        h.reconnect_token += 1
        token = h.reconnect_token

        def attempt() -> None:
            if not h.alive or h.reconnect_token != token or h.believes_connected:
                return
            back = max(h.net_down_until, self.broker_down_until)
            if h.paused or self.now < back:
                # a frozen agent does not retry; a cut one retries when the network is back
                self.at(max(self.now + 0.1, back), attempt)
                return
            self._open_session(h)

        self.at(self.now + delay, attempt)

    def _close_session(self, h: Host, *, will: bool, will_delay: float = 0.0) -> None:
        """The broker ends the host's session; optionally it publishes the will (now or later)."""
        session = h.session
        if session is None:
            return
        h.session = None
        self.disturbed()
        registered = self.model.drop(self._clients.pop(session))
        if will and registered is not None:
            hb = parse(Heartbeat, registered.payload)
            closed_at = self.now

            def publish_will() -> None:
                # The documented assumption of the will fast path: the agent learns of the loss of its
                # connection before a peer can act on its will. An agent that cannot (frozen, or not
                # yet noticing a cut) gets its will only keepalive_timeout after it went deaf, when
                # its renew deadline has certainly passed.
                if h.alive and h.believes_connected and h.agent_session == session:
                    deaf_since = min(closed_at, h.paused_at) if h.paused else closed_at
                    if self.now < deaf_since + self.keepalive_timeout:
                        self.at(deaf_since + self.keepalive_timeout, publish_will)
                        return
                self.trace(f"broker: will of {hb.node} {hb.incarnation}:{hb.conn}")
                self.disturbed()
                self.model.publish(None, registered.topic, registered.payload, retain=True)

            self.at(self.now + will_delay, publish_will)

    def _lose_connection(self, h: Host) -> None:
        """The agent learns that its connection is gone, then reconnects with backoff."""
        if not h.alive or not h.believes_connected:
            return
        if h.paused:
            h.disconnect_pending = True
            return
        h.believes_connected = False
        self.disturbed()
        self._handle(h, Disconnected("sim"))
        self._connect_later(h, self._delay(0.1, 1.0))

    # ---- faults -----------------------------------------------------------------------------------

    def kill(self, node_id: str, *, will: bool, will_delay: float = 0.0, restart_after: float | None) -> None:
        h = self.hosts[node_id]
        if not h.alive:
            return
        e = h.election
        assert e is not None
        self.trace(f"{node_id}: KILL will={will} restart_after={restart_after}")
        self.disturbed()
        iv = self._open_interval(h, e)
        if iv is not None:
            dl = e.deadline
            iv.end = min(self.now, h.global_(dl)) if dl is not None else self.now
        h.alive = False
        h.paused = False
        h.backlog.clear()
        h.believes_connected = False
        self._close_session(h, will=will, will_delay=will_delay)
        if restart_after is not None:
            self.start(node_id, self.now + restart_after)

    def pause(self, node_id: str, duration: float, *, broker_drops: bool, will: bool) -> None:
        """SIGSTOP for ``duration``. ``broker_drops``: a broker that times the client out after
        ``keepalive_timeout`` (and then publishes its will if ``will``)."""
        h = self.hosts[node_id]
        if not h.alive or h.paused:
            return
        self.trace(f"{node_id}: PAUSE {duration:.3f} drops={broker_drops} will={will}")
        self.disturbed()
        h.paused = True
        h.paused_at = self.now
        session = h.session
        if broker_drops and duration > self.keepalive_timeout and session is not None:

            def timeout() -> None:
                if h.session == session and h.paused:
                    self.trace(f"broker: keepalive timeout of {node_id}")
                    self._close_session(h, will=will)
                    h.disconnect_pending = True

            self.at(self.now + self.keepalive_timeout, timeout)
        self.at(self.now + duration, lambda: self._resume(h))

    def _resume(self, h: Host) -> None:
        if not h.alive or not h.paused:
            return
        self.trace(f"{h.node_id}: RESUME with {len(h.backlog)} queued")
        self.disturbed()
        h.paused = False
        backlog, h.backlog = h.backlog, []
        for event in backlog:
            if h.alive and not h.paused:
                self._handle(h, event)
        if h.disconnect_pending:
            h.disconnect_pending = False
            self._lose_connection(h)
        elif not h.believes_connected:
            self._connect_later(h, self._delay(0.1, 1.0))
        self._handle(h, Tick())
        if h.believes_connected:
            self._schedule_heartbeat(h)

    def cut(
        self, node_id: str, duration: float, *, learn_delay: float = 0.0, will_delay: float | None = 0.0
    ) -> None:
        """Cut the host off the network for ``duration``: the broker drops the session now (its will
        ``will_delay`` later, or none), the agent notices ``learn_delay`` later (<= will_delay)."""
        h = self.hosts[node_id]
        if not h.alive or h.session is None:
            return
        assert will_delay is None or learn_delay <= will_delay
        self.trace(f"{node_id}: CUT {duration:.3f} learn={learn_delay:.3f} will={will_delay}")
        h.net_down_until = self.now + duration
        # scheduled first: with equal delays the agent learns of the loss before the will goes out
        self.at(self.now + learn_delay, lambda: self._lose_connection(h))
        self._close_session(h, will=will_delay is not None, will_delay=will_delay or 0.0)
        self.at(self.now + duration, self.disturbed)

    def step_down(self, node_id: str, successor: str | None = None, *, final: bool = False) -> None:
        h = self.hosts[node_id]
        if h.alive and h.election is not None:
            self.disturbed()
            self._handle(h, StepDown("sim", successor=successor, final=final))

    def set_health(self, node_id: str, healthy: bool) -> None:
        h = self.hosts[node_id]
        h.healthy = healthy
        if h.alive and h.election is not None:
            self.disturbed()
            self._handle(h, HealthChanged(healthy, "" if healthy else "sim"))

    def set_priority(self, node_id: str, priority: int) -> None:
        """The node's priority in force moves (weighted health checks), for this incarnation and the next."""
        h = self.hosts[node_id]
        h.priority = priority
        if h.alive and h.election is not None:
            self.disturbed()
            self._handle(h, PriorityChanged(priority))

    def set_maintenance(self, node_id: str, on: bool) -> None:
        h = self.hosts[node_id]
        h.maintenance = on
        if h.alive and h.election is not None:
            self.disturbed()
            self._handle(h, MaintenanceChanged(on))

    def broker_restart(
        self, down_for: float, *, restore: LeaseRecord | Literal["keep"] | None = "keep"
    ) -> None:
        """The broker goes away (every client notices), comes back after ``down_for`` with the
        retained lease set to ``restore`` (persistence restoring an older record, or nothing)."""
        self.trace(f"broker: RESTART down {down_for:.3f} restore={_short(restore) if restore else restore}")
        self.disturbed()
        self.broker_down_until = self.now + down_for
        for h in self.hosts.values():
            if h.session is not None:
                self._close_session(h, will=False)
                self.at(self.now + self._delay(0.0, 0.3), functools.partial(self._lose_connection, h))
        if restore != "keep":
            self.amnesia_at = self.now
            if restore is None:
                self.model.retained.clear()  # no persistence at all
            else:
                self.model.retained[self.topics.lease] = restore.to_payload()
        self.at(self.now + down_for, self.disturbed)

    def _check_winner(self, term: int, node: str, incarnation: str) -> None:
        """Invariant (a). Terms live in the broker's retained lease; once the broker has lost it or
        rolled it back (a restart without persistence, or restoring an older record), a term whose
        only other witnesses are unreachable (dead, frozen, cut off) can be opened again, and nothing
        in the protocol can prevent that. Such re-use is recorded in ``excused``, not a violation."""
        for other, other_inc, when in self.winners.get(term, []):
            if (other, other_inc) == (node, incarnation):
                continue
            what = f"{self.now:.4f}: term {term} won by {other}/{other_inc} at {when:.4f} and {node}/{incarnation}"
            if self.amnesia_at is not None and self.amnesia_at >= when:
                self.excused.append(what)
                self.reused_terms.add(term)
            else:
                self.violations.append(what)
        self.winners.setdefault(term, []).append((node, incarnation, self.now))

    # ---- observation --------------------------------------------------------------------------------

    def leaders_now(self) -> list[str]:
        """Nodes that may act as primary at this global instant (a frozen leader still counts)."""
        return [
            h.node_id for h in self.hosts.values()
            if h.alive and h.election is not None and h.election.is_leader(h.local(self.now))
        ]

    def _sample(self) -> None:
        leaders = self.leaders_now()
        if len(leaders) > 1:
            self.violations.append(f"{self.now:.4f}: two acting primaries {leaders}")
        current = leaders[0] if leaders else None
        if not self.leader_samples or self.leader_samples[-1][1] != current:
            self.leader_samples.append((self.now, current))

    def current_leader(self) -> str | None:
        leaders = self.leaders_now()
        return leaders[0] if leaders else None

    def close_intervals(self) -> None:
        for iv in self.intervals:
            if iv.end is None:
                h = self.hosts[iv.node]
                e = h.election
                dl = e.deadline if e is not None and e.incarnation == iv.incarnation else None
                iv.end = min(self.now, h.global_(dl)) if dl is not None else self.now

    def check_safety(self) -> None:
        """Raise InvariantError listing every violation of (a) one winner per term, (b) no two
        acting primaries at one global instant, (c) view terms never decrease."""
        self.close_intervals()
        problems = list(self.violations)
        ivs = sorted(self.intervals, key=lambda iv: iv.start)
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                assert a.end is not None and b.end is not None
                if b.start >= a.end - EPS:
                    continue
                problems.append(
                    f"overlap: {a.node}/{a.incarnation} term {a.term} [{a.start:.4f}, {a.end:.4f}) and "
                    f"{b.node}/{b.incarnation} term {b.term} [{b.start:.4f}, {b.end:.4f})"
                )
        if problems:
            raise InvariantError("\n".join(problems[:20] + self.log[-150:]))

    def liveness_bound(self) -> float:
        """How long after the last disturbance a primary must exist, in global seconds.

        * stray records of the disturbance (in flight, duplicated, replayed) keep arriving for up to
          ``max_delay + replay_max``, and each restarts a follower's silence;
        * then a full ``lease_duration`` of silence (the observation after a connect ends no later),
          on a clock running as slowly as RATE_BOUNDS allows;
        * a claim round: the stagger of the worst rank (``N * claim_stagger``), the claim's round trip
          and the first renewal's round trip (``2 * max_delay``), then the winner is primary;
        * one failed round: a claim given up after ``renew_deadline`` or lost in a contest to a claim
          whose claimant dies (its rejection is itself activity) costs ``renew_deadline`` and a
          second claim round;
        * 0.5 s of slack for tick granularity.
        """
        t = self.timing
        nets = [h.net for h in self.hosts.values()]
        max_delay = max(n.max_delay for n in nets)
        replay = max(n.replay_max if n.dup_p > 0 else 0.0 for n in nets)
        slow = RATE_BOUNDS[0]
        claim_round = len(self.hosts) * t.claim_stagger / slow + 2 * max_delay
        return (
            max_delay + replay
            + t.lease_duration / slow
            + claim_round
            + t.renew_deadline / slow + claim_round
            + 0.5
        )


def _short(x: object) -> str:
    if isinstance(x, LeaseRecord):
        extra = f" prev=({x.prev_term},{x.prev_seq})" if x.kind == "claim" else ""
        extra += f" succ={x.successor}" if x.successor else ""
        return f"{x.kind}({x.term},{x.seq}) {x.holder}/{x.incarnation}:{x.conn}{extra}"
    if isinstance(x, RecordReceived):
        return f"recv{'[R]' if x.retained else ''} {_short(x.record)}"
    if isinstance(x, HeartbeatReceived):
        hb = x.heartbeat
        v = f"({hb.view.term},{hb.view.seq})" if hb.view else "-"
        return f"hb {hb.node}/{hb.incarnation}:{hb.conn} online={hb.online} view={v} elig={hb.eligible}"
    if isinstance(x, Publish):
        flags = (" retain" if x.retain else "") + (" after_hooks" if x.after_hooks else "")
        return f"publish {_short(x.record)}{flags}"
    if isinstance(x, Ignored):
        return f"ignored {_short(x.record)}: {x.reason}"
    return repr(x)
