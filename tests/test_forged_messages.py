"""Forged messages against a running cluster, in-process (real agents on the fake broker, virtual time).

The attacks of issue 14's fault run: a client that may write the cluster's topics publishes the primary's
Last Will, a release of the primary's term (naming a successor or not), a claim or a renewal of the next
term, a step-down command, or heartbeats of a better node, while the primary's inbound path is blocked
for 1.5 s (it keeps publishing, it hears nothing). The attacker reads the retained state first, as any
client of the broker can, so the records are schema-valid and current.

With signing, every forged record is dropped and counted and the primary keeps its term. Without it
(an unauthenticated cluster), a forged will or release makes two primaries, and switching the matching
fast path off removes that: both are shown, so the README's trade-offs rest on a test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from harness import inprocess, vclock
from harness.fakebroker import FakeMqtt
from harness.inprocess import metric
from hasync import signing
from hasync.audit import overlaps, tenures
from hasync.messages import Command, Heartbeat, LeaseRecord, NodeRole, View, parse
from hasync.topics import Topics

T = Topics(inprocess.PREFIX, inprocess.CLUSTER)
LEASE = 3.0
NODES = {"n1": 100, "n2": 90, "n3": 80}


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


def keys(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Each node's signing section: its own private key, everyone's public keys."""
    public = {node: signing.public_key_text(signing.generate(tmp_path / f"{node}.key").public_key())
              for node in NODES}
    return {node: {"private_key": str(tmp_path / f"{node}.key"), "public_keys": public} for node in NODES}


def retained(fake: FakeMqtt) -> tuple[LeaseRecord, Heartbeat]:
    """What any client of the broker can read: the retained lease and the primary's heartbeat."""
    lease = parse(LeaseRecord, fake.model.retained[T.lease])
    return lease, parse(Heartbeat, fake.model.retained[T.heartbeat(lease.holder)])


def record(lease: LeaseRecord, **fields: Any) -> bytes:
    base = lease.model_dump(exclude_none=True, exclude={"sig"})
    return LeaseRecord.model_validate({**base, **fields}).to_payload()


def forge(attack: str, fake: FakeMqtt) -> list[tuple[str, bytes]]:
    """The forged messages of ``attack``, made from the retained state."""
    lease, primary = retained(fake)
    ahead = lease.seq + 100  # past any renewal the primary sends meanwhile
    match attack:
        case "will":
            will = primary.model_copy(update={"online": False, "role": NodeRole.OFFLINE, "eligible": False,
                                              "sig": None})
            return [(T.heartbeat(lease.holder), will.to_payload())]
        case "release to a successor":
            return [(T.lease, record(lease, kind="release", seq=ahead, successor="n2"))]
        case "release":
            return [(T.lease, record(lease, kind="release", seq=ahead))]
        case "claim":
            return [(T.lease, record(lease, kind="claim", term=lease.term + 1, seq=0, holder="n3",
                                     prev_term=lease.term, prev_seq=ahead))]
        case "renewal of a new term":
            return [(T.lease, record(lease, term=lease.term + 1, seq=1, holder="rogue"))]
        case "better heartbeats" | "better heartbeats of a stranger":
            node = "n2" if attack == "better heartbeats" else "n9"
            hb = Heartbeat(node=node, incarnation=f"{node}-forged", conn=1, online=True, role=NodeRole.STANDBY,
                           view=View(term=lease.term, seq=ahead), priority=1000, preempt=True, healthy=True,
                           eligible=True)
            return [(T.heartbeat(node), hb.to_payload())]
    raise AssertionError(attack)


ATTACKS = ["will", "release to a successor", "release", "claim", "renewal of a new term", "better heartbeats",
           "better heartbeats of a stranger"]


async def attack(c: inprocess.Cluster, name: str, *, deaf_for: float = 1.5, repeat: float = 0.0) -> float:
    """Block the primary's inbound path, publish the forgeries (again every second for ``repeat`` s), then
    let it hear again; returns when the attack began."""
    t0 = vclock.clock()
    session = c.fake.deafen("n1")
    forged = forge(name, c.fake)
    for topic, payload in forged:
        c.fake.inject(topic, payload, retain=topic != T.lease)
    await asyncio.sleep(deaf_for)
    session.hear()
    for _ in range(int(repeat)):
        await asyncio.sleep(1.0)
        for topic, payload in forged:
            c.fake.inject(topic, payload, retain=True)
    return t0


async def start(c: inprocess.Cluster, settings: dict[str, dict[str, Any]] | None = None, **common: Any) -> None:
    for node, priority in NODES.items():
        await c.add(node, priority=priority, **({"signing": settings[node]} if settings else {}), **common)
    assert await c.wait_for_leader() == "n1"
    await asyncio.sleep(LEASE)


@pytest.mark.parametrize("name", ATTACKS)
def test_a_signed_cluster_drops_every_forgery_and_keeps_its_primary(name: str, tmp_path: Path) -> None:
    settings = keys(tmp_path)

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await start(c, settings)
            term = c.agents["n1"].election.term
            t0 = await attack(c, name, repeat=15 if name.startswith("better heartbeats") else 0)
            await asyncio.sleep(3 * LEASE)
            assert c.leader() == "n1" and c.agents["n1"].election.term == term
            assert not c.promotions(after=t0)
            for node in ("n2", "n3"):
                assert metric(c.agents[node], "hasync_messages_dropped_total", reason="unsigned") >= 1
            assert c.agents["n2"].status()["authenticated"]

    run(scenario)


def test_a_forged_record_at_the_term_limit_is_dropped_too(tmp_path: Path) -> None:
    """Unsigned, the last claimable term stalls an election for good (test_agent_inprocess); signed, the
    record never gets in."""
    settings = keys(tmp_path)

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await start(c, settings)
            lease, _ = retained(c.fake)
            c.fake.inject(T.lease, record(lease, term=2**53 - 2, seq=1, holder="evil"), retain=True)
            await asyncio.sleep(LEASE)
            assert c.leader() == "n1"
            await c.kill("n1")
            # at once: n1's signed will (made when it connected) opens the will fast path
            assert await c.wait_for_leader(0.5) == "n2"

    run(scenario)


def test_commands_unsigned_from_home_assistant_are_accepted_unless_refused(tmp_path: Path) -> None:
    """Home Assistant's buttons cannot sign: the broker's ACL authorises them (broker/acl.example). A
    step-down is a graceful handover, which cannot overlap. ``unsigned_commands: false`` refuses them."""
    settings = keys(tmp_path)
    strict = {node: {**section, "unsigned_commands": False} for node, section in settings.items()}

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await start(c, strict)
            c.fake.inject(T.command("n1"), Command(command="step_down").to_payload())
            await asyncio.sleep(LEASE)
            assert c.leader() == "n1"
            assert metric(c.agents["n1"], "hasync_messages_dropped_total", reason="unsigned") == 1
        async with inprocess.cluster() as c:
            await start(c, settings)
            c.fake.inject(T.command("n1"), Command(command="step_down").to_payload())
            assert await c.wait_for_leader(other_than="n1") == "n2"

    run(scenario)


# ---- an unauthenticated cluster ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "switch"), [
    ("will", "will_fast_path"),
    ("release to a successor", "release_fast_path"),
    ("release", "release_fast_path"),
])
def test_unauthenticated_a_forged_will_or_release_makes_two_primaries_unless_its_fast_path_is_off(
        name: str, switch: str) -> None:
    async def attacked(election: dict[str, Any]) -> list[Any]:
        c = inprocess.Cluster()
        try:
            await start(c, election=election)
            await attack(c, name)
            await asyncio.sleep(3 * LEASE)
            return overlaps(tenures(c.events, vclock.clock(), c.deaths))
        finally:
            await c.close()

    async def scenario() -> None:
        assert await attacked({}), f"a forged {name} made no overlap: this test shows nothing"
        assert not await attacked({switch: False})

    run(scenario)


@pytest.mark.parametrize("name", ["claim", "renewal of a new term", "better heartbeats of a stranger"])
def test_unauthenticated_other_forgeries_depose_the_primary_without_an_overlap(name: str) -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:  # audited at the end: never two primaries
            await start(c)
            term = c.agents["n1"].election.term
            t0 = await attack(c, name, repeat=15 if name.startswith("better heartbeats") else 0)
            await asyncio.sleep(3 * LEASE)
            assert c.promotions(after=t0) or c.agents["n1"].election.term != term, "not deposed: shows nothing"

    run(scenario)


def test_unauthenticated_better_heartbeats_of_a_live_node_move_nothing() -> None:
    """A preemption needs the better node to have been better for the whole preempt delay: a live node's own
    heartbeats, coming between the forged ones, say otherwise each time (priorities move with weighted
    health checks, so the delay counts from the last time it was not better)."""
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await start(c)
            term = c.agents["n1"].election.term
            t0 = await attack(c, "better heartbeats", repeat=15)
            await asyncio.sleep(3 * LEASE)
            assert c.leader() == "n1" and c.agents["n1"].election.term == term and not c.promotions(after=t0)

    run(scenario)


def test_replays_of_genuine_signed_records_are_stale(tmp_path: Path) -> None:
    """Signing does not stop a replay of what a node really signed: the stream's rules do, as before. After
    a handover and a reconnect, the old term's renewals and release and the old connection's will are
    replayed as they were sent: nobody is deposed and nobody takes over."""
    settings = keys(tmp_path)

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await start(c, settings)
            c.fake.inject(T.command("n1"), Command(command="step_down").to_payload())
            assert await c.wait_for_leader(other_than="n1") == "n2"
            c.fake.cut("n2", will=True)  # n2's will goes out; n2 reconnects on a new connection
            assert await c.wait_for_leader(other_than="n2") in ("n1", "n3")
            await asyncio.sleep(LEASE)
            leader = c.leader()
            assert leader is not None
            term = c.agents[leader].election.term
            signed = [p for p in c.fake.model.log
                      if p.topic in (T.lease, *map(T.heartbeat, NODES)) and b'"sig":' in p.payload]
            assert any(b'"release"' in p.payload for p in signed) and any(b'"online":false' in p.payload
                                                                         for p in signed)
            t0 = vclock.clock()
            ignored = {n: metric(a, "hasync_lease_records_ignored_total") for n, a in c.agents.items()}
            for p in signed:
                c.fake.inject(p.topic, p.payload)
            await asyncio.sleep(2 * LEASE)
            assert c.leader() == leader and c.agents[leader].election.term == term
            assert not c.promotions(after=t0)
            assert all(metric(a, "hasync_messages_dropped_total", reason="bad_signature") == 0
                       for a in c.agents.values())  # genuine: they verify, and are judged stale
            assert all(metric(a, "hasync_lease_records_ignored_total") > ignored[n] for n, a in c.agents.items())

    run(scenario)
