"""The kept resources' state machine (hasync.kept): plain synchronous asserts on a hand-moved clock, and
properties over arbitrary sequences of what the election reads and decides."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.sim import claim, heartbeat, release, renew
from hasync.election import (
    Connected,
    Demoted,
    DemotionCause,
    Disconnected,
    HealthChanged,
    HeartbeatReceived,
    MaintenanceChanged,
    Promoted,
    RecordReceived,
    StepDown,
    Tick,
    Timing,
)
from hasync.kept import (
    BROKER_LOSS,
    Acquire,
    Action,
    Input,
    KeptError,
    KeptResources,
    Release,
    Scope,
    State,
    reelection_grace,
)
from hasync.messages import NodeRole

ME, OTHER = "n1", "n2"
GRACE = reelection_grace(Timing())


def kept(term: int = 5, *, connected: bool = False) -> KeptResources:
    """A machine that held ``term`` and lost the broker at t=10 (its connection dropped)."""
    k = KeptResources(ME, grace=GRACE)
    assert k.handle(Promoted(term, 0.0), 1.0) == [Acquire(term, Scope.ALL)]
    k.handle(Disconnected(), 10.0)
    assert k.handle(Demoted(term, DemotionCause.DISCONNECTED, "lost", 10.0), 10.0) == [
        Release(term, Scope.FENCED, "lost")]
    assert k.state is State.KEPT
    if connected:
        assert k.handle(Connected(2), 20.0) == []
    return k


def test_the_grace_covers_an_observation_a_claim_and_its_echoes() -> None:
    t = Timing()
    assert GRACE == 2 * t.lease_duration + t.renew_deadline == 8.0


@pytest.mark.parametrize("cause", sorted(BROKER_LOSS))
def test_a_broker_loss_releases_only_the_fenced_resources(cause: DemotionCause) -> None:
    k = KeptResources(ME, grace=GRACE)
    k.handle(Promoted(3, 0.0), 0.0)
    assert k.handle(Demoted(3, cause, "why", 1.0), 1.0) == [Release(3, Scope.FENCED, "why")]
    assert k.status() == {"term": 3, "since": 1.0, "reelection_due": None}


@pytest.mark.parametrize("cause", sorted(set(DemotionCause) - BROKER_LOSS))
def test_any_other_demotion_releases_everything_as_before(cause: DemotionCause) -> None:
    k = KeptResources(ME, grace=GRACE)
    k.handle(Promoted(3, 0.0), 0.0)
    assert k.handle(Demoted(3, cause, "why", 1.0), 1.0) == [Release(3, Scope.ALL, "why")]
    assert k.state is State.IDLE and k.status() is None


def test_with_nothing_kept_a_broker_loss_releases_everything() -> None:
    k = KeptResources(ME, grace=GRACE, keeps=False)
    k.handle(Promoted(3, 0.0), 0.0)
    assert k.handle(Demoted(3, DemotionCause.DEADLINE, "why", 1.0), 1.0) == [Release(3, Scope.ALL, "why")]


def test_kept_through_an_outage_of_any_length_while_nothing_is_heard() -> None:
    k = kept()
    for t in (11.0, 100.0, 100_000.0):
        assert k.handle(Tick(), t) == []
    assert k.next_wakeup() == float("inf") and k.state is State.KEPT


def test_re_elected_after_reconnecting_acquires_only_the_fenced_resources() -> None:
    k = kept(5, connected=True)
    assert k.handle(RecordReceived(renew(ME, 5, 40), retained=True), 20.0) == []  # its own retained renewal
    assert k.handle(HeartbeatReceived(heartbeat(OTHER, view=(5, 40))), 20.0) == []  # a standby that saw term 5
    assert k.handle(RecordReceived(claim(ME, 6, (5, 40))), 23.1) == []  # our own claim is not a rival's
    assert k.handle(HeartbeatReceived(heartbeat(OTHER, view=(6, 0))), 23.1) == []
    assert k.handle(Promoted(6, 25.0), 23.2) == [Acquire(6, Scope.FENCED)]
    assert k.state is State.PRIMARY and k.next_wakeup() == float("inf")


@pytest.mark.parametrize("record", [renew(OTHER, 6, 1, conn=2), claim(OTHER, 6, (5, 40)), release(OTHER, 7, 3),
                                    renew(OTHER, 6, 1, incarnation="x")])
@pytest.mark.parametrize("retained", [True, False])
def test_a_record_of_another_holder_above_the_held_term_releases_them(record: object, retained: bool) -> None:
    k = kept(5, connected=True)
    assert isinstance(record, type(renew(OTHER, 1, 1)))
    [action] = k.handle(RecordReceived(record, retained=retained), 20.0)
    assert action == Release(5, Scope.KEPT, action.reason) and OTHER in action.reason
    assert k.state is State.IDLE


def test_a_rival_claim_after_our_own_claim_of_that_term_lost_to_it_is_no_rival() -> None:
    """Broker order decides: seen after ours, another claim of the same term names an outdated position."""
    k = kept(5, connected=True)
    k.handle(RecordReceived(claim(ME, 6, (5, 40))), 23.0)
    assert k.handle(RecordReceived(claim(OTHER, 6, (5, 40))), 23.0) == []
    assert k.handle(RecordReceived(claim(OTHER, 7, (6, 0))), 24.0)[0].scope is Scope.KEPT


def test_records_of_older_terms_and_of_this_node_do_not_release_them() -> None:
    k = kept(5, connected=True)
    for rec in (renew(OTHER, 4, 9), release(OTHER, 5, 2), renew(ME, 9, 1, incarnation="earlier-run")):
        assert k.handle(RecordReceived(rec, retained=True), 20.0) == []
    assert k.state is State.KEPT


def test_a_heartbeat_of_another_primary_above_the_held_term_releases_them() -> None:
    k = kept(5, connected=True)
    assert k.handle(HeartbeatReceived(heartbeat(OTHER, view=(5, 9), role=NodeRole.PRIMARY)), 20.0) == []  # stale
    assert k.handle(HeartbeatReceived(heartbeat(OTHER, view=(7, 9), role=NodeRole.STANDBY)), 20.0) == []
    [action] = k.handle(HeartbeatReceived(heartbeat(OTHER, view=(6, 1), role=NodeRole.PRIMARY)), 20.0)
    assert action.scope is Scope.KEPT and "n2 reports itself primary in term 6" in action.reason


def test_not_re_elected_within_the_grace_of_reconnecting_releases_them() -> None:
    k = kept(5)
    k.handle(Connected(2), 20.0)
    assert k.next_wakeup() == 20.0 + GRACE
    assert k.handle(Tick(), 20.0 + GRACE - 0.01) == []
    [action] = k.handle(Tick(), 20.0 + GRACE)
    assert action == Release(5, Scope.KEPT, f"not elected again within {GRACE:g} s of reaching the broker")


def test_a_lost_connection_stops_the_clock_and_the_next_one_starts_it_again() -> None:
    k = kept(5)
    k.handle(Connected(2), 20.0)
    k.handle(Disconnected(), 21.0)
    assert k.next_wakeup() == float("inf") and k.handle(Tick(), 20.0 + GRACE + 50) == []
    k.handle(Connected(3), 100.0)
    assert k.next_wakeup() == 100.0 + GRACE


def test_a_renew_deadline_on_a_silent_connection_starts_the_clock_only_when_something_arrives() -> None:
    """A cut the TCP connection has not noticed yet: the deadline passes while 'connected'."""
    k = KeptResources(ME, grace=GRACE)
    k.handle(Connected(1), 0.0)
    k.handle(Promoted(2, 5.0), 4.0)
    k.handle(Demoted(2, DemotionCause.DEADLINE, "deadline", 10.0), 10.0)
    assert k.handle(Tick(), 10.0 + 10 * GRACE) == [] and k.state is State.KEPT
    k.handle(HeartbeatReceived(heartbeat(ME, view=(2, 30))), 200.0)
    assert k.next_wakeup() == 200.0 + GRACE


@pytest.mark.parametrize("event", [StepDown("operator"), StepDown("shutdown", final=True), MaintenanceChanged(on=True)])
def test_letting_go_releases_them_at_once(event: StepDown | MaintenanceChanged) -> None:
    k = kept(5)
    [action] = k.handle(event, 12.0)
    assert action.scope is Scope.KEPT and k.state is State.IDLE


def test_a_failing_health_check_does_not_release_them() -> None:
    """During an outage the checks through the broker fail too (Home Assistant's MQTT link)."""
    k = kept(5)
    assert k.handle(HealthChanged(False, "Home Assistant: MQTT disconnected"), 12.0) == []
    assert k.handle(MaintenanceChanged(on=False), 12.0) == []


def test_role_changes_out_of_order_are_refused_and_change_nothing() -> None:
    k = KeptResources(ME, grace=GRACE)
    with pytest.raises(KeptError, match="demoted from term 1 while idle"):
        k.handle(Demoted(1, DemotionCause.STEP_DOWN, "x", 0.0), 0.0)
    k.handle(Promoted(1, 0.0), 0.0)
    with pytest.raises(KeptError, match="promoted for term 2 while primary for term 1"):
        k.handle(Promoted(2, 0.0), 0.0)
    assert (k.state, k.term) == (State.PRIMARY, 1)


# ---- properties ------------------------------------------------------------------------------------------


@dataclass
class Held:
    """What the actions say is held, checked as they come."""

    fenced: bool = False
    kept: bool = False

    def apply(self, action: Action) -> None:
        match action:
            case Acquire(scope=Scope.ALL):
                assert not self.fenced and not self.kept, "acquired what it held: a second promote hook"
                self.fenced = self.kept = True
            case Acquire(scope=Scope.FENCED):
                assert self.kept and not self.fenced
                self.fenced = True
            case Release(scope=Scope.ALL):
                assert self.fenced and self.kept
                self.fenced = self.kept = False
            case Release(scope=Scope.FENCED):
                assert self.fenced and self.kept
                self.fenced = False
            case Release(scope=Scope.KEPT):
                assert self.kept and not self.fenced
                self.kept = False
            case _:
                raise AssertionError(action)


terms = st.integers(1, 8)
others = st.sampled_from([OTHER, "n3"])
stream_events = st.one_of(
    st.builds(Connected, st.integers(1, 9)),
    st.just(Disconnected()),
    st.just(Tick()),
    st.builds(lambda h, t, k: RecordReceived(renew(h, t, 1) if k else claim(h, t, (t - 1, 0))),
              st.sampled_from([ME, OTHER]), terms, st.booleans()),
    st.builds(lambda n, t, r: HeartbeatReceived(heartbeat(n, view=(t, 1), role=r)),
              st.sampled_from([ME, OTHER]), terms, st.sampled_from([NodeRole.PRIMARY, NodeRole.STANDBY])),
    st.builds(HealthChanged, st.booleans()),
    st.builds(MaintenanceChanged, st.booleans()),
    st.builds(StepDown, st.just("x")),
)
steps = st.lists(st.tuples(st.floats(0, 20), stream_events, st.sampled_from(DemotionCause), st.booleans()),
                 max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps=steps, keeps=st.booleans())
def test_the_fenced_resources_are_held_exactly_while_primary_and_nothing_is_acquired_twice(
        steps: list[tuple[float, Input, DemotionCause, bool]], keeps: bool) -> None:
    """Role changes alternate as the election makes them; any stream events in between."""
    k = KeptResources(ME, grace=GRACE, keeps=keeps)
    held, now, term = Held(), 0.0, 0
    for gap, event, cause, change_role in steps:
        now += gap
        if change_role:
            if k.state is State.PRIMARY:
                actions = k.handle(Demoted(term, cause, "why", now), now)
                assert actions[-1].scope in ((Scope.FENCED,) if cause in BROKER_LOSS and keeps else (Scope.ALL,))
            else:
                term += 1
                actions = k.handle(Promoted(term, now + 2), now)
        else:
            was = k.state
            actions = k.handle(event, now)
            assert was is State.KEPT or not actions  # only kept resources are released by the stream
        for action in actions:
            held.apply(action)
        assert held.fenced == (k.state is State.PRIMARY)  # the fencing guarantee
        assert held.kept == (k.state in (State.PRIMARY, State.KEPT))
        if not keeps:
            assert k.state is not State.KEPT


@settings(max_examples=200, deadline=None)
@given(rival=st.integers(9, 50), gap=st.floats(0, 1000), before=st.lists(stream_events, max_size=20))
def test_whatever_came_before_a_rival_term_releases_them(rival: int, gap: float, before: list[Input]) -> None:
    k = kept(5)
    for event in before:
        if k.state is not State.KEPT:
            return
        k.handle(event, 11.0)
    if k.state is State.KEPT:  # (the stream's terms stay below 9)
        assert [a.scope for a in k.handle(RecordReceived(renew(OTHER, rival, 1)), 11.0 + gap)] == [Scope.KEPT]


# ---- configuration ---------------------------------------------------------------------------------------


def test_on_broker_loss_is_fenced_unless_said_otherwise_and_one_line_when_wrong() -> None:
    from hasync.config import BrokerLoss, ConfigError, load_config

    cfg = load_config(overrides={("vip",): [{"address": "10.0.0.5/24", "interface": "eth0"}]})
    assert cfg.vip[0].on_broker_loss is BrokerLoss.FENCED and cfg.hooks.on_broker_loss is BrokerLoss.FENCED
    assert not cfg.keeps_resources and cfg.hooks.on_promote_failure == "stay"
    cfg = load_config(overrides={("hooks", "on_broker_loss"): "kept"})
    assert cfg.keeps_resources
    with pytest.raises(ConfigError) as info:
        load_config(overrides={("vip",): [{"address": "10.0.0.5/24", "interface": "eth0", "on_broker_loss": "kep"}]})
    [line] = str(info.value).splitlines()[1:]
    assert line.strip().startswith("vip.0.on_broker_loss: Input should be 'fenced' or 'kept'")
