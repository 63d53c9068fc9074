"""Health checks as the election sees them: real agents on the fakes of their seams (harness/inprocess.py), on
virtual time, with each node's check results set by the test (the probe seam, ``inprocess.Probes``).

Weighted checks move a node's priority (keepalived's ``weight``): leadership moves only after the better
node has been better for the preempt delay, so a blip does not move it there and back. Checks that run only
on the primary hand over when they fail, and are not run anywhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from harness import inprocess, vclock
from harness.inprocess import Probes, metric
from harness.wait import eventually
from hasync.agent import Agent

LEASE, PREEMPT = 3.0, 10.0
INTERVAL, FALL = 2.0, 2


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


def check(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "type": "tcp", "host": "127.0.0.1", "port": 9, "interval": INTERVAL, "fall": FALL,
            **fields}


async def weighted_pair(c: inprocess.Cluster) -> tuple[Agent, Probes]:
    """a (200, a camera check of weight -150) leads b (100); returns a and its check results."""
    camera = Probes()
    a = await c.add("a", priority=200, probes=camera, health_checks=[check("camera", weight=-150)])
    await c.add("b", priority=100)
    assert await c.wait_for_leader() == "a"
    return a, camera


def test_a_failing_weighted_check_lowers_the_priority_and_a_better_node_takes_over_after_the_delay() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            a, camera = await weighted_pair(c)
            await asyncio.sleep(LEASE + PREEMPT)
            camera.failing["camera"] = "connection refused"
            failed = vclock.clock()
            await eventually(lambda: a.election.priority == 50, FALL * INTERVAL + 1, "a's priority to drop to 50")
            dropped = vclock.clock()
            assert a.status()["healthy"] and a.status()["eligible"]  # a weight never makes a node ineligible
            assert metric(a, "hasync_priority") == 50
            assert await c.wait_for_leader(other_than="a", timeout=PREEMPT + 5) == "b"
            [demotion] = [e for e in c.events if e["event"] == "demote"]
            assert demotion["reason"] == "preempted by b"
            assert demotion["t"] - dropped >= PREEMPT - 0.5, "b waited for the delay from the drop, not from its start"
            assert dropped - failed <= FALL * INTERVAL + 0.5
            assert not [e for e in c.events if e["event"] == "fault"]
            # Back to health: a is better again and takes over after the delay (the weights are symmetric).
            del camera.failing["camera"]
            await eventually(lambda: a.election.priority == 200, 2 * INTERVAL + 1, "a's priority back to 200")
            assert await c.wait_for_leader(other_than="b", timeout=PREEMPT + 5) == "a"

    run(scenario)


def test_a_blip_shorter_than_the_preempt_delay_moves_nothing() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            a, camera = await weighted_pair(c)
            await asyncio.sleep(LEASE + 2 * PREEMPT)  # b has been eligible far longer than the delay
            camera.failing["camera"] = "timeout"
            await eventually(lambda: a.election.priority == 50, FALL * INTERVAL + 1, "a's priority to drop")
            await asyncio.sleep(PREEMPT / 2)
            del camera.failing["camera"]
            await eventually(lambda: a.election.priority == 200, 2 * INTERVAL + 1, "a's priority back")
            await asyncio.sleep(2 * PREEMPT)
            assert c.leader() == "a"
            assert [e["node"] for e in c.events if e["event"] == "promote"] == ["a"]

    run(scenario)


def test_a_positive_weight_raises_the_priority_while_its_check_passes() -> None:
    async def scenario() -> None:
        uplink = Probes()
        async with inprocess.cluster() as c:
            b = await c.add("b", priority=100, probes=uplink, health_checks=[check("uplink", weight=150)])
            await c.add("a", priority=200)
            await eventually(lambda: b.election.priority == 250, 5, "b's priority to rise to 250")
            await asyncio.sleep(LEASE + PREEMPT + 2)
            assert c.leader() == "b"
            uplink.failing["uplink"] = "down"
            assert await c.wait_for_leader(other_than="b", timeout=FALL * INTERVAL + PREEMPT + 5) == "a"

    run(scenario)


def test_a_primary_only_check_runs_only_on_the_primary_and_hands_over_when_it_fails() -> None:
    async def scenario() -> None:
        a_probes, b_probes = Probes(), Probes()
        dnsmasq = [{"name": "dnsmasq", "type": "dns", "server": "127.0.0.1", "query": "ha.home", "when": "primary",
                    "interval": INTERVAL, "fall": FALL}]
        async with inprocess.cluster() as c:
            a = await c.add("a", priority=200, probes=a_probes, health_checks=dnsmasq)
            b = await c.add("b", priority=100, probes=b_probes, health_checks=dnsmasq)
            assert await c.wait_for_leader() == "a"
            await asyncio.sleep(3 * INTERVAL)
            assert a_probes.runs.get("dnsmasq", 0) >= 2 and "dnsmasq" not in b_probes.runs  # only the primary's
            a_probes.failing["dnsmasq"] = "no answer from 127.0.0.1 within 1s"
            failed = vclock.clock()
            assert await c.wait_for_leader(other_than="a", timeout=FALL * INTERVAL + LEASE) == "b"
            [demotion] = [e for e in c.events if e["event"] == "demote"]
            assert demotion["cause"] == "unhealthy" and "dnsmasq" in demotion["reason"]
            assert demotion["t"] - failed <= FALL * INTERVAL + 0.5
            assert [e for e in c.events if e["event"] == "fault" and e["node"] == "a"]
            # Off the primary the check stops and counts as up: a is eligible again, but a fault holds its
            # preemption back (flap damping), so b keeps serving.
            await eventually(lambda: a.status()["eligible"], INTERVAL + 1, "a to be eligible again")
            runs = a_probes.runs["dnsmasq"]
            await asyncio.sleep(PREEMPT + LEASE)
            assert a_probes.runs["dnsmasq"] == runs and c.leader() == "b"
            assert b_probes.runs.get("dnsmasq", 0) >= 2  # b's own check took over with it
            assert b.status()["healthy"]

    run(scenario)


def test_a_primary_only_check_gives_the_new_primary_one_interval_before_its_first_probe() -> None:
    async def scenario() -> None:
        probes = Probes()
        probes.failing["dnsmasq"] = "not started yet"
        async with inprocess.cluster() as c:
            a = await c.add("a", probes=probes, health_checks=[check("dnsmasq", when="primary")])
            assert await c.wait_for_leader() == "a"
            promoted = next(e["t"] for e in c.events if e["event"] == "promote")
            await asyncio.sleep(INTERVAL - 0.2)
            assert "dnsmasq" not in probes.runs  # the service it started is given an interval
            del probes.failing["dnsmasq"]
            await asyncio.sleep(5 * INTERVAL)
            assert c.leader() == "a" and probes.runs["dnsmasq"] >= 3
            assert vclock.clock() - promoted > 5 * INTERVAL and a.status()["healthy"]

    run(scenario)
