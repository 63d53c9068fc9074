"""Unit tests of the pure election state machine: explicit times, no event loop, no network.

Default timing: lease_duration 3, renew_deadline 2, renew_interval 0.5, heartbeat_interval 1,
claim_stagger 0.15, preempt_delay 5.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import pytest

from harness.sim import claim, heartbeat, record, release, renew
from harness.sim import claim as claim_
from hasync.election import (
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
    Timing,
)
from hasync.messages import LeaseRecord

T = Timing(preempt_delay=5.0)  # the tests' numbers were chosen for a 5 s preempt delay
FOLLOWING = (1, 1)  # the view a peer following the leader of term 1 reports
A = TypeVar("A")


def node(node_id: str = "a", now: float = 0.0, *, conn: int = 1, **kw: Any) -> Election:
    """A healthy node connected at ``now``."""
    kw.setdefault("timing", T)
    e = Election(node_id, f"{node_id}-1", **kw)
    e.handle(HealthChanged(True), now)
    e.handle(Connected(conn), now)
    return e


def role(e: Election) -> Role:
    """The role, read afresh (mypy would otherwise keep an earlier narrowing of ``e.role``)."""
    return e.role


def published(actions: Iterable[Action]) -> list[LeaseRecord]:
    return [a.record for a in actions if isinstance(a, Publish)]


def only_publish(actions: list[Action]) -> Publish:
    pubs = [a for a in actions if isinstance(a, Publish)]
    assert len(pubs) == 1, actions
    return pubs[0]


def ignored(actions: Iterable[Action]) -> list[str]:
    return [a.reason for a in actions if isinstance(a, Ignored)]


def of_type(actions: Iterable[Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def step(e: Election, event: Event, now: float) -> list[Action]:
    """Handle an event and echo the node's own publishes straight back (an instant broker)."""
    actions = e.handle(event, now)
    return actions + feed(e, published(actions), now)


def feed(e: Election, recs: Iterable[LeaseRecord], now: float, *, retained: bool = False) -> list[Action]:
    actions: list[Action] = []
    for rec in recs:
        actions += e.handle(RecordReceived(rec, retained=retained), now)
    return actions


def leader(node_id: str = "a", *, claim_at: float = 3.0, echo_at: float = 3.01, **kw: Any) -> Election:
    """A node that started at 0, claimed term 1 at ``claim_at``, saw its claim echoed at ``echo_at``
    and published renewal 1 then, which came back at once: deadline ``echo_at + renew_deadline``."""
    e = node(node_id, **kw)
    actions = e.handle(Tick(), claim_at)
    assert e.role is Role.CANDIDATE, actions
    won = feed(e, published(actions), echo_at)
    assert not of_type(won, Promoted), won
    confirmed = feed(e, published(won), echo_at)
    assert of_type(confirmed, Promoted), confirmed
    return e


def follower_of(holder: str, node_id: str = "b", *, at: float = 0.5, seq: int = 3, **kw: Any) -> Election:
    """A node connected at 0 that received a live renewal (1, seq) from ``holder`` at ``at``."""
    e = node(node_id, **kw)
    feed(e, [renew(holder, 1, seq)], at)
    assert e.role is Role.FOLLOWER and e.leader == holder
    return e


# ---- start-up and claiming ----------------------------------------------------------------------


def test_first_start_observes_a_full_lease_before_claiming() -> None:
    e = node()
    assert e.role is Role.OBSERVING
    assert not e.eligible(0.0)
    assert e.next_wakeup(0.0) == pytest.approx(1.0)  # the heartbeat interval comes first
    assert published(e.handle(Tick(), 2.999)) == []
    assert e.role is Role.OBSERVING
    actions = e.handle(Tick(), 3.0)
    (pub,) = of_type(actions, Publish)
    assert pub.record.kind == "claim" and not pub.retain
    assert (pub.record.term, pub.record.prev_term, pub.record.prev_seq) == (1, 0, 0)
    assert (pub.record.holder, pub.record.incarnation, pub.record.conn) == ("a", "a-1", 1)
    assert role(e) is Role.CANDIDATE


def test_a_claim_becomes_leadership_only_when_its_echo_and_the_first_renewal_are_processed() -> None:
    e = node()
    (claim_rec,) = published(e.handle(Tick(), 3.0))
    assert not e.is_leader(3.0)
    assert e.handle(Tick(), 3.2) == []
    assert not e.is_leader(3.2) and e.role is Role.CANDIDATE
    actions = feed(e, [claim_rec], 3.3)
    # The claim won: the first renewal goes out at once, retained, but the node is not primary yet.
    renewal = only_publish(actions)
    assert renewal.retain
    assert (renewal.record.kind, renewal.record.term, renewal.record.seq) == ("renew", 1, 1)
    assert not of_type(actions, Promoted)
    assert not e.is_leader(3.3) and e.role is Role.CANDIDATE and e.leader == "a"
    assert e.deadline is None
    # Once the broker has it (it is retained), the term can not be opened again: now it leads.
    actions = feed(e, [renewal.record], 3.4)
    assert actions == [Promoted(1, deadline=3.3 + T.renew_deadline)]
    assert e.is_leader(3.4) and role(e) is Role.LEADER and e.deadline == 3.3 + T.renew_deadline


def test_a_claim_that_never_comes_back_is_reported_and_given_up() -> None:
    e = node()
    [claim] = published(e.handle(Tick(), 3.0))
    assert e.role is Role.CANDIDATE
    assert not [a for a in e.handle(Tick(), 3.0 + T.renew_deadline - 0.01) if isinstance(a, ClaimUnanswered)]
    actions = e.handle(Tick(), 3.0 + T.renew_deadline)
    assert ClaimUnanswered(claim.term) in actions
    assert e.role is Role.FOLLOWER and not e.is_leader(3.0 + T.renew_deadline)


def test_a_winner_whose_first_renewal_never_comes_back_never_leads() -> None:
    e = node()
    (claim_rec,) = published(e.handle(Tick(), 3.0))
    feed(e, [claim_rec], 3.1)
    actions = e.handle(Tick(), 3.6) + e.handle(Tick(), 4.1) + e.handle(Tick(), 4.99)
    assert [r.seq for r in published(actions)] == [2, 3, 4]  # it keeps renewing meanwhile
    actions = e.handle(Tick(), 5.0)  # the claim's deadline
    assert actions == []  # no Promoted, so no Demoted either
    assert e.role is Role.FOLLOWER and not e.is_leader(5.0)


def test_a_node_that_joined_between_two_claims_follows_the_winners_renewal() -> None:
    """Subscribed after a's winning claim and before b's losing one: it reads only b's claim."""
    e = node("c", now=10.0)
    feed(e, [renew("x", 1, 5)], 10.0, retained=True)
    assert ignored(feed(e, [claim("b", 2, (1, 5))], 10.1)) == []  # looks valid from here
    assert e.leader == "b"
    assert ignored(feed(e, [renew("a", 2, 1)], 10.2)) == []  # the winner's renewal corrects it
    assert (e.term, e.leader) == (2, "a")
    # Once in sync, a claim-view is trusted: another holder's renewal of that term is ignored.
    feed(e, [claim("d", 3, (2, 1))], 11.0)
    assert ignored(feed(e, [renew("b", 3, 1)], 11.1)) == ["not the holder of this term"]
    assert e.leader == "d"


def test_a_node_that_reconnected_is_out_of_sync_again() -> None:
    e = follower_of("x", at=0.5)
    feed(e, [claim("y", 2, (1, 3))], 4.0)
    assert ignored(feed(e, [renew("z", 2, 1)], 4.1)) == ["not the holder of this term"]
    e.handle(Disconnected(), 5.0)
    e.handle(Connected(2), 6.0)
    assert ignored(feed(e, [renew("z", 2, 2)], 6.1)) == []
    assert e.leader == "z"


def test_two_concurrent_claims_for_one_term_first_in_stream_order_wins_everywhere() -> None:
    nodes = [node(n) for n in "abc"]
    for e in nodes:
        feed(e, [renew("x", 1, 5)], 0.0, retained=True)
    claims = [published(e.handle(Tick(), 3.0))[0] for e in nodes]
    assert all((c.term, c.prev_term, c.prev_seq) == (2, 1, 5) for c in claims)
    # The broker took b's claim first, then c's, then a's.
    stream = [claims[1], claims[2], claims[0]]
    results = {e.node_id: feed(e, stream, 3.05) for e in nodes}
    (b_renewal,) = published(results["b"])
    for e in nodes:
        results[e.node_id] += feed(e, [b_renewal], 3.1)
    assert of_type(results["b"], Promoted) == [Promoted(2, 3.05 + T.renew_deadline)]
    for n in "ac":
        assert not of_type(results[n], Promoted)
        assert nodes["abc".index(n)].role is Role.FOLLOWER
    for actions in results.values():
        assert ignored(actions) == ["claim names an outdated position"] * 2
    assert [e.leader for e in nodes] == ["b", "b", "b"]
    assert [e.view() for e in nodes] == [nodes[1].view()] * 3


def test_a_renewal_after_the_claimant_last_looked_invalidates_its_claim() -> None:
    b = follower_of("x", at=0.5, seq=3)
    (stale_claim,) = published(b.handle(Tick(), 3.5))
    assert (stale_claim.prev_term, stale_claim.prev_seq) == (1, 3)
    other = follower_of("x", "c", at=0.5, seq=3)
    # x renewed once more before the claim reached the broker: everyone reads renew(1,4) first.
    for e in (b, other):
        actions = feed(e, [renew("x", 1, 4), stale_claim], 3.6)
        assert ignored(actions) == ["claim names an outdated position"]
        assert not of_type(actions, Promoted)
        view = e.view()
        assert e.leader == "x" and view is not None and (view.term, view.seq) == (1, 4)
    assert b.role is Role.FOLLOWER and not b.is_leader(3.6)


def test_stale_renewals_and_rogue_claims_are_ignored_and_leave_the_term_alone() -> None:
    e = node()
    feed(e, [claim("x", 3, (2, 9)), renew("x", 3, 5)], 0.5)
    assert (e.term, e.leader) == (3, "x")
    cases = {
        "older or repeated seq": [renew("x", 3, 4), renew("x", 3, 5)],
        "older term": [renew("x", 2, 9), renew("y", 1, 50), release("x", 2, 10)],
        "claim names an outdated position": [claim("y", 3, (2, 9)), claim("y", 2, (1, 7))],
        "not the holder of this term": [renew("y", 3, 6), release("y", 3, 6)],
    }
    for reason, recs in cases.items():
        for rec in recs:
            assert ignored(feed(e, [rec], 1.0)) == [reason], rec
            view = e.view()
            assert view is not None and (view.term, view.seq, e.leader) == (3, 5, "x")


def test_a_view_adopts_a_newer_term_it_missed_the_claim_of() -> None:
    e = node()
    feed(e, [renew("x", 1, 3)], 0.5)
    assert ignored(feed(e, [renew("y", 4, 2)], 0.6)) == []
    assert (e.term, e.leader) == (4, "y")
    assert ignored(feed(e, [renew("x", 1, 4)], 0.7)) == ["older term"]


# ---- time ---------------------------------------------------------------------------------------


def test_the_leader_demotes_when_no_renewal_is_echoed_within_the_renew_deadline() -> None:
    e = leader(claim_at=3.0, echo_at=3.0)
    deadline = e.deadline
    assert deadline is not None and deadline == pytest.approx(5.0)
    # Renewals keep going out every renew_interval, but none comes back.
    sent = published(e.handle(Tick(), 3.5)) + published(e.handle(Tick(), 4.0))
    assert [r.seq for r in sent] == [2, 3]
    assert e.is_leader(4.999)
    assert not of_type(e.handle(Tick(), 4.999), Demoted)
    (demoted,) = of_type(e.handle(Tick(), 5.0), Demoted)
    assert demoted.term == 1 and demoted.acting_until <= deadline
    assert not e.is_leader(5.0) and e.role is Role.FOLLOWER


def test_an_echoed_renewal_extends_the_deadline_from_its_send_time() -> None:
    e = node()
    (c,) = published(e.handle(Tick(), 3.0))
    (r1,) = published(feed(e, [c], 3.1))  # renewal seq 1 sent at 3.1
    (r2,) = published(e.handle(Tick(), 3.6))  # seq 2 sent at 3.6
    assert of_type(feed(e, [r1], 4.5), Promoted)
    assert e.deadline == pytest.approx(3.1 + T.renew_deadline)
    feed(e, [r2], 4.6)
    assert e.deadline == pytest.approx(3.6 + T.renew_deadline)
    feed(e, [r1], 4.7)  # a duplicate of an old echo changes nothing
    assert e.deadline == pytest.approx(5.6)


def test_a_leader_that_wakes_up_late_demotes_before_acting() -> None:
    e = leader()
    deadline = e.deadline
    assert deadline is not None
    actions = e.handle(Tick(), 30.0)  # frozen for half a minute
    (demoted,) = of_type(actions, Demoted)
    assert demoted.acting_until == deadline
    assert published(actions) == []  # no renewal from a leader past its deadline


def test_followers_wait_a_full_lease_of_silence_before_claiming() -> None:
    e = follower_of("x", at=10.0)
    assert e.next_wakeup(10.0) <= 13.0
    assert published(e.handle(Tick(), 12.999)) == []
    feed(e, [renew("x", 1, 2)], 12.0)  # ignored (stale), but still activity
    assert published(e.handle(Tick(), 14.999)) == []
    (c,) = published(e.handle(Tick(), 15.0))
    assert (c.kind, c.term, c.prev_term, c.prev_seq) == ("claim", 2, 1, 3)


def test_a_retained_record_is_not_activity() -> None:
    e = node()
    feed(e, [renew("x", 1, 3)], 2.5, retained=True)
    assert e.role is Role.OBSERVING  # only a live renewal ends observation early
    (c,) = published(e.handle(Tick(), 3.0))
    assert (c.kind, c.prev_term, c.prev_seq) == ("claim", 1, 3)


def test_a_retained_release_does_not_allow_an_immediate_claim() -> None:
    for successor in (None, "a"):
        e = node()
        feed(e, [release("x", 1, 4, successor=successor)], 0.5, retained=True)
        assert e.leader is None
        assert published(e.handle(Tick(), 2.9)) == []
        (c,) = published(e.handle(Tick(), 3.0))
        assert (c.prev_term, c.prev_seq) == (1, 4)


def test_a_live_release_without_successor_frees_the_lease_at_once() -> None:
    e = follower_of("x", at=5.0)
    (c,) = published(feed(e, [release("x", 1, 4)], 5.5))
    assert (c.kind, c.prev_term, c.prev_seq) == ("claim", 1, 4)


def test_a_live_release_naming_another_successor_leaves_others_waiting_for_silence() -> None:
    e = follower_of("x", at=5.0)
    assert published(feed(e, [release("x", 1, 4, successor="c")], 5.5)) == []
    assert published(e.handle(Tick(), 8.49)) == []
    assert published(e.handle(Tick(), 8.5)) != []


# ---- graceful handover --------------------------------------------------------------------------


def test_step_down_demotes_then_releases_to_the_best_eligible_peer_who_claims_at_once() -> None:
    a = leader()
    b, c = node("b"), node("c")
    d = node("d")
    for e in (b, c, d):
        feed(e, [renew("a", 1, 1, incarnation="a-1")], 3.2)
    for e in (a, b, c, d):
        e.handle(HeartbeatReceived(heartbeat("b", view=FOLLOWING, priority=100)), 3.5)
        e.handle(HeartbeatReceived(heartbeat("c", view=FOLLOWING, priority=150)), 3.5)
        e.handle(HeartbeatReceived(heartbeat("d", view=FOLLOWING, priority=300, eligible=False)), 3.5)
    actions = a.handle(StepDown("operator"), 4.0)
    assert [type(x) for x in actions] == [Demoted, Publish]
    demoted, pub = actions
    assert isinstance(demoted, Demoted) and isinstance(pub, Publish)
    assert demoted.acting_until == 4.0 and not a.is_leader(4.0)
    assert pub.after_hooks and not pub.retain  # a late release must not replace a newer retained lease
    assert (pub.record.kind, pub.record.term, pub.record.successor) == ("release", 1, "c")
    # c sees the live release and claims at once; b waits for silence; a holds off.
    (c_claim,) = published(feed(c, [pub.record], 4.1))
    assert (c_claim.kind, c_claim.term, c_claim.prev_term, c_claim.prev_seq) == ("claim", 2, 1, 2)
    assert published(feed(b, [pub.record], 4.1)) == []
    assert published(feed(a, [pub.record], 4.1)) == []
    assert published(b.handle(Tick(), 7.0)) == []
    (c_renewal,) = published(feed(c, [c_claim], 4.2))
    for e in (a, b, d):
        feed(e, [c_claim], 4.2)
    for e in (a, b, c, d):
        feed(e, [c_renewal], 4.3)
    assert c.is_leader(4.3) and {e.leader for e in (a, b, c, d)} == {"c"}


def test_step_down_to_a_named_successor() -> None:
    a = leader()
    a.handle(HeartbeatReceived(heartbeat("b", view=FOLLOWING, priority=100)), 3.5)
    a.handle(HeartbeatReceived(heartbeat("c", view=FOLLOWING, priority=150)), 3.5)
    (pub,) = published(a.handle(StepDown("operator", successor="b"), 4.0))
    assert pub.successor == "b"


def test_a_non_final_step_down_holds_the_node_off_claiming_again() -> None:
    a = leader()
    a.handle(StepDown("operator"), 4.0)
    # silence would allow a claim at 7.0, the hold-off also ends at 7.0
    assert published(a.handle(Tick(), 6.99)) == []
    a.handle(StepDown("again"), 6.99)
    assert published(a.handle(Tick(), 9.98)) == []
    assert published(a.handle(Tick(), 9.99)) != []


def test_a_final_step_down_stops_all_future_claims() -> None:
    a = leader()
    a.handle(StepDown("shutdown", final=True), 4.0)
    assert not a.eligible(4.0)
    assert published(a.handle(Tick(), 100.0)) == []


# ---- Last Will ----------------------------------------------------------------------------------


def test_the_holders_will_makes_the_lease_vacant_at_once() -> None:
    b = follower_of("x", at=4.0)
    actions = b.handle(HeartbeatReceived(heartbeat("x", online=False)), 4.5)
    (c,) = published(actions)
    assert (c.kind, c.term, c.prev_term, c.prev_seq) == ("claim", 2, 1, 3)


def test_the_will_fast_path_still_respects_observation_after_connect() -> None:
    b = node("b")
    feed(b, [renew("x", 1, 3)], 0.5)
    assert published(b.handle(HeartbeatReceived(heartbeat("x", online=False)), 1.0)) == []
    assert published(b.handle(Tick(), 2.99)) == []
    assert published(b.handle(Tick(), 3.0)) != []  # instead of 0.5 + 3.0


def test_a_will_of_an_older_connection_or_incarnation_is_not_a_vacancy() -> None:
    for will in (
        heartbeat("x", online=False, conn=0),
        heartbeat("x", online=False, incarnation="x-0"),
        heartbeat("y", online=False),
    ):
        b = follower_of("x", at=4.0)
        assert published(b.handle(HeartbeatReceived(will), 4.5)) == []
        assert published(b.handle(Tick(), 6.99)) == []
        assert published(b.handle(Tick(), 7.0)) != []


def test_the_will_fast_path_can_be_switched_off() -> None:
    b = follower_of("x", at=4.0, timing=Timing(will_fast_path=False))
    assert published(b.handle(HeartbeatReceived(heartbeat("x", online=False)), 4.5)) == []
    assert published(b.handle(Tick(), 6.99)) == []
    assert published(b.handle(Tick(), 7.0)) != []


def test_a_will_is_no_vacancy_once_the_holder_renewed_on_a_new_connection() -> None:
    b = follower_of("x", at=4.0)
    feed(b, [renew("x", 1, 4, conn=2)], 4.2)
    assert published(b.handle(HeartbeatReceived(heartbeat("x", online=False, conn=1)), 4.5)) == []


def test_a_nodes_own_stale_will_makes_it_republish_its_heartbeat() -> None:
    e = node("a", conn=2)
    actions = e.handle(HeartbeatReceived(heartbeat("a", online=False, conn=1)), 0.1)
    assert of_type(actions, RepublishHeartbeat)
    actions = e.handle(HeartbeatReceived(heartbeat("a", online=False, incarnation="a-0", conn=2)), 0.1)
    assert of_type(actions, RepublishHeartbeat)


def test_a_leader_that_reads_its_own_current_will_demotes() -> None:
    a = leader()
    actions = a.handle(HeartbeatReceived(heartbeat("a", online=False, conn=1)), 3.5)
    (demoted,) = of_type(actions, Demoted)
    assert demoted.acting_until == 3.5 and not a.is_leader(3.5)
    assert not of_type(actions, RepublishHeartbeat)


# ---- health, maintenance, preemption ------------------------------------------------------------


def test_health_going_bad_on_the_leader_hands_over() -> None:
    a = leader()
    a.handle(HeartbeatReceived(heartbeat("b", view=FOLLOWING)), 3.5)
    actions = a.handle(HealthChanged(False, "core unreachable"), 4.0)
    assert [type(x) for x in actions] == [Fault, Demoted, Publish]
    fault, demoted, pub = actions
    assert isinstance(fault, Fault) and "core unreachable" in fault.reason
    assert isinstance(demoted, Demoted) and demoted.acting_until == 4.0
    assert isinstance(pub, Publish) and pub.after_hooks
    assert (pub.record.kind, pub.record.successor) == ("release", "b")
    assert not a.eligible(4.0)
    assert published(a.handle(Tick(), 50.0)) == []


def test_an_unhealthy_node_does_not_claim_until_healthy() -> None:
    e = Election("a", "a-1")
    e.handle(Connected(1), 0.0)
    assert published(e.handle(Tick(), 10.0)) == []
    assert published(e.handle(HealthChanged(True), 11.0)) != []


def test_maintenance_keeps_a_node_from_claiming() -> None:
    e = node()
    e.handle(MaintenanceChanged(True), 1.0)
    assert not e.eligible(1.0)
    assert published(e.handle(Tick(), 3.0)) == []
    assert published(e.handle(Tick(), 30.0)) == []
    assert published(e.handle(MaintenanceChanged(False), 31.0)) != []


def test_maintenance_on_the_leader_hands_over() -> None:
    a = leader()
    actions = a.handle(MaintenanceChanged(True), 4.0)
    assert [type(x) for x in actions] == [Demoted, Publish]


def test_preemption_by_a_higher_priority_peer_after_the_preempt_delay() -> None:
    a = leader(priority=100)
    t = 3.5
    for e_t in (t, t + 1, t + 2, t + 3, t + 4):
        step(a, HeartbeatReceived(heartbeat("c", view=FOLLOWING, priority=200)), e_t)
        step(a, Tick(), e_t + 0.5)  # renewals come back: the lease stays alive
    assert a.is_leader(t + 4.99)
    assert not of_type(step(a, HeartbeatReceived(heartbeat("c", view=FOLLOWING, priority=200)), t + 4.99), Demoted)
    actions = a.handle(Tick(), t + T.preempt_delay)
    assert [type(x) for x in actions] == [Demoted, Publish]
    assert of_type(actions, Demoted)[0].reason == "preempted by c"
    (pub,) = published(actions)
    assert pub.successor == "c"


def test_no_preemption_by_a_peer_that_opts_out_or_is_not_better_or_flaps() -> None:
    peers = {
        "opted out": heartbeat("c", view=FOLLOWING, priority=200, preempt=False),
        "same priority": heartbeat("c", view=FOLLOWING, priority=100),
        "ineligible": heartbeat("c", view=FOLLOWING, priority=200, eligible=False),
    }
    for why, hb in peers.items():
        a = leader(priority=100)
        for t in (3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0):
            actions = step(a, HeartbeatReceived(hb), t)
            assert not of_type(actions, Demoted), why
        assert a.is_leader(9.0)
    # eligibility must be continuous for the whole preempt_delay
    a = leader(priority=100)
    for t, eligible in ((3.5, True), (4.5, True), (5.5, False), (6.5, True), (7.5, True), (8.5, True),
                        (9.5, True), (10.5, True)):
        actions = step(a, HeartbeatReceived(heartbeat("c", view=FOLLOWING, priority=200, eligible=eligible)), t)
        actions += step(a, Tick(), t + 0.5)
        assert not of_type(actions, Demoted)
    assert a.is_leader(11.49)
    (demoted,) = of_type(step(a, Tick(), 11.5), Demoted)  # 5 s after c became eligible again
    assert demoted.reason == "preempted by c"


def test_a_peer_heartbeat_from_before_our_term_neither_preempts_nor_succeeds() -> None:
    """A dead node's retained heartbeat is delivered again on every reconnect and looks fresh and
    eligible; one that does not report our term was not sent since we won."""
    ghost = heartbeat("c", view=(0, 7), priority=200)
    a = leader(priority=100)
    for t in (3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5):
        actions = step(a, HeartbeatReceived(ghost), t)
        actions += step(a, Tick(), t + 0.5)
        assert not of_type(actions, Demoted)
    (pub,) = published(a.handle(StepDown("operator"), 10.0))
    assert pub.successor is None


def test_a_node_behind_a_fresh_peers_view_claims_from_that_view() -> None:
    b = follower_of("x", at=0.5, seq=3)  # b's view: term 1, seq 3
    b.handle(HeartbeatReceived(heartbeat("c", view=(2, 1), eligible=False)), 3.0)  # c, in maintenance, saw term 2
    [claim] = published(b.handle(Tick(), 3.5))
    assert (claim.term, claim.prev_term, claim.prev_seq) == (3, 2, 1)
    # Every reader judges it alike: c (at (2, 1)) and b itself accept it.
    assert not ignored(b.handle(RecordReceived(claim), 3.51))
    c = follower_of("x", "c", at=0.1, seq=3)
    feed(c, [claim_("y", 2, (1, 3)), renew("y", 2, 1)], 0.2)
    assert c.view() is not None and (c.view().term, c.view().seq) == (2, 1)  # type: ignore[union-attr]
    assert not ignored(c.handle(RecordReceived(claim), 3.51))
    assert c.lease is not None and (c.lease.term, c.lease.holder) == (3, "b")


def test_a_peer_with_an_equal_or_older_view_does_not_block() -> None:
    b = follower_of("x", at=0.5, seq=3)
    b.handle(HeartbeatReceived(heartbeat("c", view=(1, 3), eligible=False)), 3.0)
    b.handle(HeartbeatReceived(heartbeat("d", view=(2, 1), online=False)), 3.0)
    assert published(b.handle(Tick(), 3.5)) != []


def test_claims_are_staggered_by_rank() -> None:
    hbs = [heartbeat("c", priority=200), heartbeat("d", priority=100), heartbeat("a", priority=50)]
    b = follower_of("x", at=0.5)
    for hb in hbs:
        b.handle(HeartbeatReceived(hb), 3.0)
    # Only c ranks ahead of b: higher priority. d has b's priority but a larger id; a is worse.
    assert published(b.handle(Tick(), 3.5 + T.claim_stagger - 0.001)) == []
    assert published(b.handle(Tick(), 3.5 + T.claim_stagger)) != []


# ---- connection ---------------------------------------------------------------------------------


def test_disconnected_demotes_immediately_and_reconnect_observes_again() -> None:
    a = leader()
    actions = a.handle(Disconnected("broker gone"), 3.5)
    (demoted,) = of_type(actions, Demoted)
    assert demoted.acting_until == 3.5 and not a.is_leader(3.5)
    assert a.role is Role.DISCONNECTED and not a.eligible(3.5)
    assert feed(a, [renew("x", 5, 1)], 3.6) == []  # nothing is read while disconnected
    assert a.term == 1
    a.handle(Connected(2), 4.0)
    assert role(a) is Role.OBSERVING and a.conn == 2
    assert published(a.handle(Tick(), 6.99)) == []
    (c,) = published(a.handle(Tick(), 7.0))
    assert (c.term, c.conn, c.prev_term) == (2, 2, 1)


def test_a_candidate_that_disconnects_drops_its_candidacy() -> None:
    e = node()
    (c,) = published(e.handle(Tick(), 3.0))
    e.handle(Disconnected(), 3.1)
    e.handle(Connected(2), 3.2)
    # the old connection's claim, should it come back, is not ours any more: no leadership
    actions = feed(e, [c], 3.3)
    assert not of_type(actions, Promoted) and not e.is_leader(3.3)


# ---- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(renew_interval=2.0),
        dict(renew_interval=0.0),
        dict(renew_deadline=3.0),
        dict(lease_duration=1.5),
        dict(heartbeat_interval=1.6),
        dict(heartbeat_interval=0.0),
        dict(claim_stagger=-0.1),
        dict(preempt_delay=-1.0),
    ],
)
def test_timing_check_rejects_bad_relations(bad: dict[str, Any]) -> None:
    timing = Timing(**bad)
    with pytest.raises(ValueError):
        timing.check()
    with pytest.raises(ValueError):
        Election("a", "a-1", timing=timing)


def test_timing_check_accepts_the_defaults_and_edges() -> None:
    Timing().check()
    Timing(heartbeat_interval=1.5, claim_stagger=0.0, preempt_delay=0.0).check()


def test_records_validate_their_shape() -> None:
    with pytest.raises(ValueError):
        record("claim", 2, 0, "a", prev=(2, 0))
    with pytest.raises(ValueError):
        record("renew", 2, 0, "a")
    with pytest.raises(ValueError):
        record("renew", 2, 1, "a", successor="b")


def test_a_node_that_stepped_down_is_not_eligible_during_its_holdoff() -> None:
    """Otherwise a peer with a lower priority that just took over would be preempted straight back."""
    b = follower_of("x", at=0.5)
    assert b.eligible(1.0)
    b.handle(StepDown("step-down requested"), 1.0)
    assert not b.eligible(1.0 + T.lease_duration - 0.01)
    assert b.eligible(1.0 + T.lease_duration)


# ---- flap damping and the release fast path ------------------------------------------------------------

DAMP = Timing(preempt_delay=5.0, damping_hold=30.0, damping_half_life=300.0)


def echo(e: Election, now: float) -> list[Action]:
    """The node's own heartbeat comes back from the broker, and so does a renewal of b, who took over
    term 2 (unanswered claims of its own would say the link is bad)."""
    seq = int(now * 10)
    actions = feed(e, [renew("b", 2, seq)], now)
    return actions + e.handle(HeartbeatReceived(heartbeat(e.node_id, incarnation=e.incarnation, conn=e.conn)), now)


def lost_by_deadline(e: Election) -> float:
    """Let a leader's renewals go unanswered until its deadline demotes it; returns that time."""
    deadline = e.deadline
    assert deadline is not None
    demoted = of_type(e.handle(Tick(), deadline), Demoted)
    assert demoted and demoted[0].cause == "renew_deadline"
    return deadline


def test_a_leader_lost_by_a_fault_does_not_preempt_until_its_link_was_stable_for_the_hold() -> None:
    e = leader(timing=DAMP)
    lost = lost_by_deadline(e)
    assert not e.preempting(lost) and e.damped_until(lost) == pytest.approx(lost + 30.0)
    for t in range(1, 30):  # heartbeats come back every second: the link is stable
        echo(e, lost + t)
        assert not e.preempting(lost + t)
    echo(e, lost + 30.0)
    assert e.preempting(lost + 30.0) and e.damped_until(lost + 30.0) is None


def test_a_stalling_link_restarts_the_hold() -> None:
    e = leader(timing=DAMP)
    lost = lost_by_deadline(e)
    echo(e, lost + 1.0)
    echo(e, lost + 10.0)  # 9 s without our own heartbeat: the link stalled
    assert e.damped_until(lost + 10.0) == pytest.approx(lost + 40.0)
    e.handle(Disconnected(), lost + 20.0)
    e.handle(Connected(2), lost + 21.0)
    assert e.damped_until(lost + 21.0) == pytest.approx(lost + 51.0)
    echo(e, lost + 51.0)
    assert e.preempting(lost + 51.0)


def test_repeated_losses_double_the_hold_and_put_the_node_last_in_line() -> None:
    e = leader(timing=DAMP)
    first = lost_by_deadline(e)
    assert e._rank(first) == 0  # one loss: still first in line for a vacant lease (a broker restart, say)
    # Elected again at once (nobody else there), and lost again.
    t = first + 3.0
    actions = e.handle(Tick(), t)
    (c,) = published(actions)
    won = feed(e, [c], t)
    feed(e, published(won), t)
    assert e.is_leader(t)
    second = lost_by_deadline(e)
    hold = e.damped_until(second)
    assert hold is not None and hold - second == pytest.approx(30.0 * 2 ** (2 ** -((second - first) / 300)))
    assert 55 < hold - second < 60
    e.handle(HeartbeatReceived(heartbeat("b", view=(2, 1), priority=1)), second)
    assert e._rank(second) == 2  # behind every eligible peer, even a worse one


def test_losses_by_choice_do_not_damp_and_losses_are_forgotten() -> None:
    for stop in (StepDown("update"), MaintenanceChanged(True)):
        e = leader(timing=DAMP)
        e.handle(stop, 4.0)
        assert e.damped_until(4.0) is None
    e = leader(timing=DAMP)
    lost = lost_by_deadline(e)
    e.handle(Disconnected(), lost + 100.0)  # unstable, but the loss is forgotten after a half-life
    assert e.damped_until(lost + 100.0) is not None
    assert e.damped_until(lost + 301.0) is None
    e = leader(timing=Timing(preempt_delay=5.0, flap_damping=False))
    assert lost_by_deadline(e) and e.preempting(10.0)


def test_without_the_release_fast_path_a_release_waits_for_silence() -> None:
    for successor in (None, "b"):
        e = follower_of("x", at=5.0, timing=Timing(preempt_delay=5.0, release_fast_path=False))
        assert published(feed(e, [release("x", 1, 4, successor=successor)], 5.5)) == []
        assert published(e.handle(Tick(), 8.49)) == []
        assert published(e.handle(Tick(), 8.5)) != []


def test_slow_echoes_of_our_own_heartbeat_restart_the_hold() -> None:
    e = leader(timing=DAMP)
    lost = lost_by_deadline(e)
    for t in range(1, 20):
        echo(e, lost + t)
    slow = heartbeat(e.node_id, incarnation=e.incarnation, conn=e.conn)
    e.handle(HeartbeatReceived(slow, echo_rtt=0.3), lost + 20)  # on time, but 300 ms to come back
    assert e.damped_until(lost + 20) == pytest.approx(lost + 50)
    e.handle(HeartbeatReceived(slow, echo_rtt=0.2), lost + 21)  # 200 ms: within damping_max_rtt
    assert e.damped_until(lost + 21) == pytest.approx(lost + 50)
