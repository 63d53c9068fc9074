"""harness.timeline: the figures of the two-node home (outage, two holders, both answering) from records."""

from __future__ import annotations

import pytest

from harness.timeline import (
    Attempt,
    Doubles,
    answered_by,
    both_answered,
    held,
    longest_outage,
    outages,
    two_holders,
    two_servers,
)


def ok(start: float, who: str = "n1", took: float = 0.002) -> Attempt:
    return Attempt("http", start, start + took, True, who)


def fail(start: float, took: float = 0.5) -> Attempt:
    return Attempt("http", start, start + took, False, None, "TimeoutError: timed out")


def test_no_failure_is_no_outage() -> None:
    attempts = [ok(t / 40) for t in range(100)]
    assert outages(attempts, 0, 3) == []
    assert longest_outage(attempts, 0, 3) == 0.0


def test_an_outage_runs_from_the_last_answer_to_the_next_answers_arrival() -> None:
    # Answers until 1.0, timeouts from 1.025, then an attempt started at 1.9 hangs until the address is
    # back and is answered at 2.3: the client went without an answer from 1.002 to 2.3.
    attempts = [ok(1.0), *(fail(1.025 + i * 0.025) for i in range(35)), ok(1.9, "n2", took=0.4), ok(2.325, "n2")]
    [outage] = outages(attempts, 0.5, 3.0)
    assert outage.start == 1.002 and outage.end == 2.3 and outage.failed == 35
    assert abs(longest_outage(attempts, 0.5, 3.0) - 1.298) < 1e-9


def test_an_outage_outside_the_window_is_left_out_and_an_unfinished_one_counts_to_its_end() -> None:
    attempts = [ok(0.0), fail(0.1), ok(0.2), ok(1.0), fail(1.1), fail(1.2)]
    found = outages(attempts, 0.5, 2.0)
    assert [(o.start, o.end) for o in found] == [(1.002, None)]
    assert abs(longest_outage(attempts, 0.5, 2.0) - (2.0 - 1.002)) < 1e-9


def test_other_probes_do_not_count() -> None:
    attempts = [ok(0.0), Attempt("dns", 0.1, 0.2, False), ok(0.2)]
    assert outages(attempts, 0, 1) == []


def test_answered_by_is_the_first_arrival_from_that_node() -> None:
    attempts = [ok(0.0, "n1"), ok(0.5, "n2", took=0.3), ok(0.6, "n2")]
    assert answered_by(attempts, "n2", 0.1) == 0.602
    assert answered_by(attempts, "n1", 0.1) is None


def test_both_answered_is_the_old_nodes_last_answer_after_the_new_ones_first() -> None:
    attempts = [ok(0.0, "n1"), ok(1.0, "n2"), ok(1.1, "n1"), ok(1.5, "n1"), ok(2.0, "n2")]
    assert both_answered(attempts, "n1", "n2", 0.0, 3.0) == 0.5
    assert both_answered([ok(0.0, "n1"), ok(1.0, "n2")], "n1", "n2", 0.0, 3.0) == 0.0


def test_held_intervals_are_clipped_to_the_window() -> None:
    changes = [(0.0, True), (1.0, False), (2.0, True)]
    assert held(changes, 0.5, 3.0) == [(0.5, 1.0), (2.0, 3.0)]
    assert held([(0.0, False)], 0.0, 1.0) == []


def test_two_holders_is_the_intersection() -> None:
    first = [(0.0, True), (2.0, False)]  # the old holder lets go at 2.0
    second = [(0.0, False), (1.5, True)]  # the new one took it at 1.5
    assert two_holders(first, second, 0.0, 5.0) == 0.5
    assert two_holders(first, [(0.0, False), (2.5, True)], 0.0, 5.0) == 0.0


def dhcp(start: float, *servers: str, took: float = 0.2) -> Attempt:
    return Attempt("dhcp", start, start + took, bool(servers), servers[0] if servers else None, None, servers)


def test_two_servers_counts_the_exchanges_two_servers_answered_and_spans_their_runs() -> None:
    attempts = [dhcp(0.0, "n1"), dhcp(0.1, "n1", "n2"), dhcp(0.2, "n2", "n1"), dhcp(0.3, "n2"),
                dhcp(0.4), dhcp(0.5, "n1", "n2"), dhcp(0.6, "n2"), ok(0.15), ok(0.45)]
    found = two_servers(attempts, 0.0, 1.0)
    assert found.count == 3
    assert found.seconds == pytest.approx((0.4 - 0.1) + (0.7 - 0.5))  # a run ends at its last one's answer


def test_two_servers_outside_the_window_or_from_one_server_twice_do_not_count() -> None:
    attempts = [dhcp(0.0, "n1", "n2"), dhcp(0.1, "n1", "n1"), dhcp(2.0, "n1", "n2")]
    assert two_servers(attempts, 0.05, 1.0) == Doubles(0, 0)
    assert two_servers([], 0.0, 1.0) == Doubles(0, 0)
