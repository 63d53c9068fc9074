"""The agent in-process: real ``Agent`` objects on the fake broker (and fake Home Assistant), on virtual time
(harness.inprocess). Elections, failovers, handovers, broker faults, hostile messages, Home Assistant's
health and view, start-up errors: everything that needs neither a frozen process, a signal, nor a real
broker or HA. Each cluster is audited at the end: never two primaries, one winner per term, terms only go up.
Timings are the production defaults (lease 3 s, renew deadline 2 s, preempt delay 10 s): virtual time makes
them free."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from harness import inprocess, vclock
from harness.fakebroker import FakeMqtt
from harness.fakeha import FakeHomeAssistant
from harness.inprocess import metric
from harness.sim import claim, release, renew
from harness.wait import eventually, free_port
from hasync.agent import Agent, AgentError
from hasync.election import MAX_TERM, Election
from hasync.messages import Command, Heartbeat, NodeRole, View, parse
from hasync.topics import Topics
from hasync.transport import AuthFailure, ConnectionLost

T = Topics(inprocess.PREFIX, inprocess.CLUSTER)
LEASE, DEADLINE, PREEMPT = 3.0, 2.0, 10.0


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


def heartbeat_of(fake: FakeMqtt, node: str) -> Heartbeat | None:
    payload = fake.model.retained.get(T.heartbeat(node))
    return parse(Heartbeat, payload) if payload else None


def command(fake: FakeMqtt, node: str, **fields: Any) -> None:
    fake.inject(T.command(node), Command(**fields).to_payload())


async def three(c: inprocess.Cluster, **settings: Any) -> None:
    for i, priority in ((1, 100), (2, 90), (3, 80)):
        await c.add(f"n{i}", priority=priority, **settings)
    assert await c.wait_for_leader() == "n1"
    await asyncio.sleep(LEASE)  # everyone done observing


# ---- election and failover --------------------------------------------------------------------------


def test_three_agents_elect_the_best_then_fail_over_at_once_on_a_crash() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            killed = await c.kill("n1")
            assert await c.wait_for_leader(other_than="n1") == "n2"
            [promotion] = c.promotions(after=killed)
            assert promotion["t"] - killed < 0.2  # the will: no lease to wait out
            assert heartbeat_of(c.fake, "n1").online is False  # type: ignore[union-attr]

    run(scenario)


@pytest.mark.parametrize("order", [("n3", "n2", "n1"), ("n2", "n3", "n1"), ("n1", "n3", "n2"), ("n3", "n1", "n2")])
@pytest.mark.parametrize("gap", [0.0, 0.3, 1.2])
def test_at_a_cold_start_the_best_node_wins_the_first_term(order: tuple[str, ...], gap: float) -> None:
    """Nodes started together (within a lease) elect the best of them: no term for a worse node, and no
    preemption ten seconds later."""

    async def scenario() -> None:
        async with inprocess.cluster(FakeMqtt(ack_delay=0.002)) as c:
            for node in order:
                await c.add(node, priority={"n1": 100, "n2": 90, "n3": 80}[node])
                await asyncio.sleep(gap)
            await asyncio.sleep(LEASE + PREEMPT + 5)
            assert [(e["node"], e["term"]) for e in c.promotions()] == [("n1", 1)]

    run(scenario)


def test_without_a_will_the_lease_runs_out_before_anyone_takes_over() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            t0 = vclock.clock()
            c.fake.cut("n1", will=False)  # cut off without the broker noticing: no will
            assert await c.wait_for_leader(other_than="n1") == "n2"
            [promotion] = c.promotions(after=t0)
            [demotion] = [e for e in c.events if e["event"] == "demote" and e["node"] == "n1"]
            assert demotion["acting_until"] <= promotion["t"]
            # A lease of silence after the last renewal the others received (at most a renew interval ago).
            assert promotion["t"] - t0 >= LEASE - 0.5

    run(scenario)


@pytest.mark.parametrize("ack_delay", [0.0, 0.05])
def test_a_stopped_primary_hands_over_and_its_last_word_is_offline(ack_delay: float) -> None:
    async def scenario() -> None:
        async with inprocess.cluster(FakeMqtt(ack_delay=ack_delay)) as c:
            await three(c)
            client = c.fake.session_of("n1").client.client_id  # type: ignore[union-attr]
            t0 = vclock.clock()
            await c.stop("n1")
            assert await c.wait_for_leader(other_than="n1") == "n2"
            assert c.promotions(after=t0)[0]["t"] - t0 < 0.1  # named in the release: no lease to wait out
            sent = [p for p in c.fake.model.log if p.client_id == client]
            last = sent[-1]
            assert last.topic == T.heartbeat("n1") and parse(Heartbeat, last.payload).online is False
            assert heartbeat_of(c.fake, "n1").online is False  # type: ignore[union-attr]
            [demote] = [e for e in c.events if e["event"] == "demote" and e["node"] == "n1"]
            assert demote["reason"] == "shutdown" and demote["cause"] == "shutdown"

    run(scenario)


def test_a_node_that_stepped_down_does_not_take_leadership_back_until_told() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            command(c.fake, "n1", command="step_down")
            assert await c.wait_for_leader(other_than="n1") == "n2"
            await asyncio.sleep(3 * PREEMPT)  # eligible all along, and better: no preemption
            assert c.leader() == "n2"
            assert heartbeat_of(c.fake, "n1").preempt is False  # type: ignore[union-attr]
            assert c.agents["n1"].status()["preempt"] is False
            command(c.fake, "n1", command="resume")
            # It has been eligible for longer than the preempt delay: it takes over at once, gracefully.
            assert await c.wait_for_leader(other_than="n2", timeout=1) == "n1"
            [demotion] = [e for e in c.events if e["event"] == "demote" and e["node"] == "n2"]
            assert demotion["reason"] == "preempted by n1"

    run(scenario)


def test_a_step_down_to_a_named_successor() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            command(c.fake, "n1", command="step_down", successor="n3")
            assert await c.wait_for_leader(other_than="n1") == "n3"

    run(scenario)


@pytest.mark.parametrize("preempt", [True, False])
def test_a_better_node_takes_over_after_the_preempt_delay_unless_it_opts_out(preempt: bool) -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await c.add("low", priority=10)
            assert await c.wait_for_leader() == "low"
            joined = vclock.clock()
            await c.add("high", priority=200, preempt=preempt)
            await asyncio.sleep(LEASE + PREEMPT + 2)
            if preempt:
                assert c.leader() == "high"
                [demotion] = [e for e in c.events if e["event"] == "demote"]
                assert demotion["reason"] == "preempted by high" and demotion["t"] - joined >= PREEMPT
            else:
                assert c.leader() == "low"

    run(scenario)


def test_maintenance_hands_over_and_keeps_leadership_away_until_switched_off() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await c.add("maint", priority=200, maintenance=True)
            await c.add("ok", priority=10)
            assert await c.wait_for_leader() == "ok"
            await asyncio.sleep(LEASE + PREEMPT)
            assert c.leader() == "ok" and c.agents["maint"].status()["maintenance"] is True
            command(c.fake, "maint", command="maintenance", on=False)
            assert await c.wait_for_leader(other_than="ok", timeout=LEASE + PREEMPT + 2) == "maint"
            command(c.fake, "maint", command="maintenance", on=True)
            assert await c.wait_for_leader(other_than="maint") == "ok"

    run(scenario)


# ---- the broker misbehaving -----------------------------------------------------------------------------


@pytest.mark.parametrize("keep_retained", [True, False])
def test_a_broker_restart_leaves_one_primary_and_terms_only_grow(keep_retained: bool) -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            before = c.agents["n1"].election.term
            t0 = vclock.clock()
            c.fake.restart(keep_retained=keep_retained)
            await eventually(lambda: c.leader() is None, 1, "the primary to notice")
            await c.wait_for_leader()
            await asyncio.sleep(LEASE + PREEMPT + 1)  # the best node preempts if another won the restart
            assert c.leader() == "n1"
            assert all(e["term"] > before for e in c.promotions(after=t0))

    run(scenario)


def test_after_a_broker_restart_the_best_node_wins_even_when_it_reconnects_last() -> None:
    """Nodes reconnecting together after a broker restart elect the best of them (the cold-start rule), not
    whichever reconnected first, to be preempted later (which moves leadership, and kept resources, twice)."""
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            t0 = vclock.clock()
            c.fake.unreachable.add("n1")  # n1 comes back half a lease after the others
            c.fake.restart()
            await asyncio.sleep(LEASE / 2)
            c.fake.reconnect_node("n1")
            assert await c.wait_for_leader(timeout=3 * LEASE) == "n1"
            await asyncio.sleep(LEASE + PREEMPT + 1)
            assert [e["node"] for e in c.promotions(after=t0)] == ["n1"]

    run(scenario)


def test_a_hung_broker_makes_the_primary_stop_at_its_own_deadline() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            t0 = vclock.clock()
            c.fake.pause()
            await eventually(lambda: c.leader() is None, DEADLINE + 0.1, "the primary to stop acting")
            [demotion] = [e for e in c.events if e["event"] == "demote"]
            assert demotion["acting_until"] <= t0 + DEADLINE
            assert demotion["reason"] == "renew deadline passed without an echoed renewal"
            await asyncio.sleep(10)
            c.fake.resume()
            await c.wait_for_leader()

    run(scenario)


def test_claims_the_broker_silently_drops_never_make_a_primary(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeMqtt()
        # An ACL that lets n1 publish its status but not on the lease topic (Mosquitto acks what it drops).
        fake.model.acl = lambda client, topic: not (client.startswith("hasync-n1-") and topic == T.lease)
        async with inprocess.cluster(fake) as c:
            await c.add("n1")
            await asyncio.sleep(30)
            assert not c.promotions()
            assert metric(c.agents["n1"], "hasync_claims_unanswered_total") >= 5
        unanswered = [r for r in caplog.records if "did not come back from the broker" in r.getMessage()]
        assert [r.levelno for r in unanswered][:1] == [logging.WARNING]
        assert all(r.levelno == logging.DEBUG for r in unanswered[1:])

    run(scenario)


def test_an_unreachable_broker_is_retried_with_backoff_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeMqtt()
        fake.refuse = ConnectionLost("Connection refused")
        async with inprocess.cluster(fake) as c:
            agent = await c.add("n1")
            await asyncio.sleep(20)
            attempts = metric(agent, "hasync_mqtt_connect_failures_total", kind="connection")
            assert 20 <= attempts <= 200  # backoff from 0.05 s up to 1 s, with jitter: not a tight loop
            fake.refuse = None
            await c.wait_for_leader(timeout=5)
        cannot = [r for r in caplog.records if "cannot connect" in r.getMessage()]
        assert [r.levelno for r in cannot].count(logging.WARNING) == 1

    run(scenario)


def test_refused_credentials_are_one_error_and_retried_every_reconnect_max(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeMqtt()
        fake.refuse = AuthFailure("Not authorized")
        async with inprocess.cluster(fake) as c:
            agent = await c.add("n1")
            await asyncio.sleep(10.5)
            assert metric(agent, "hasync_mqtt_connect_failures_total", kind="auth") == 11  # every 1 s, at once first
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "refused our credentials" in errors[0].getMessage()

    run(scenario)


# ---- hostile and broken messages ------------------------------------------------------------------------

GARBAGE = [
    b"not json",
    b"\xff\xfe\x00 binary",
    json.dumps({"v": 2, "kind": "renew"}).encode(),
    json.dumps({"v": 1, "kind": "renew", "term": "x"}).encode(),
    b"{" + b" " * 20000 + b"}",
    b"[]",
    b"null",
    b'{"v": 1, "term": 1e400}',
    json.dumps({"v": 1, "command": "format_disk"}).encode(),
]


@pytest.mark.parametrize("kind", ["lease", "heartbeat", "command"])
def test_malformed_messages_are_dropped_and_counted(kind: str) -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            topic = {"lease": T.lease, "heartbeat": T.heartbeat("n2"), "command": T.command("n1")}[kind]
            target = c.agents["n1" if kind != "heartbeat" else "n3"]
            t0 = vclock.clock()
            for payload in GARBAGE:
                c.fake.inject(topic, payload)
            await asyncio.sleep(1)
            assert metric(target, "hasync_messages_dropped_total", topic=kind) == len(GARBAGE)
            for reason in ("invalid", "oversized", "wrong_version"):
                assert metric(target, "hasync_messages_dropped_total", topic=kind, reason=reason) > 0
            assert c.leader() == "n1" and not c.promotions(after=t0)

    run(scenario)


def test_messages_that_pass_the_schema_but_lie_are_dropped() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            n2 = Election("n2", "forged-1")
            forged = Heartbeat(node="n2", incarnation="x", conn=1, online=True, role=NodeRole.PRIMARY)
            c.fake.inject(T.heartbeat("n3"), forged.to_payload())  # n2's status on n3's topic
            c.fake.inject(T.command("n1"), Command(command="step_down").to_payload(), retain=True)
            c.fake.cut("n1", will=False)  # a retained message arrives as retained when one (re)subscribes
            await asyncio.sleep(1)
            assert metric(c.agents["n1"], "hasync_messages_dropped_total", reason="node_mismatch") == 1
            assert metric(c.agents["n1"], "hasync_messages_dropped_total", reason="retained_command") == 1
            await c.wait_for_leader()
            assert n2.term == 0

    run(scenario)


def test_replayed_records_and_rogue_claims_are_ignored() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            n1 = c.agents["n1"]
            term, holder = n1.election.term, n1.election.lease
            assert holder is not None
            t0 = vclock.clock()
            old = renew("n1", term, 1, incarnation=n1.incarnation, conn=1)
            rogue = claim("rogue", 1, (0, 0))
            late = release("n2", term - 1 if term > 1 else term, 1)
            for record in (old, rogue, late):
                c.fake.inject(T.lease, record.to_payload())
            await asyncio.sleep(2 * LEASE)
            assert c.leader() == "n1" and not c.promotions(after=t0)
            assert metric(c.agents["n2"], "hasync_lease_records_ignored_total") >= 3

    run(scenario)


@pytest.mark.parametrize("term", [MAX_TERM, MAX_TERM - 1])
def test_records_at_the_protocols_limit_crash_nobody(term: int, caplog: pytest.LogCaptureFixture) -> None:
    """A renewal retained at the largest term the wire allows once crash-looped every agent (each tried
    to claim the next term, which its own model refused). Now the agents ignore what they could not
    follow (MAX_TERM), or adopt it and cannot claim past it; either way every agent keeps running."""

    async def scenario() -> None:
        fake = FakeMqtt()
        fake.inject(T.lease, renew("evil", term, 1).to_payload(), retain=True)
        fake.inject(T.heartbeat("evil"), Heartbeat(
            node="evil", incarnation="e", conn=1, online=True, role=NodeRole.STANDBY,
            view=View(term=term, seq=1), eligible=True, healthy=True).to_payload(), retain=True)
        async with inprocess.cluster(fake) as c:
            for i in (1, 2):
                await c.add(f"n{i}", priority=100 - i)
            await asyncio.sleep(30)
            agents = list(c.agents.values())
            assert all(metric(a, "hasync_internal_errors_total") == 0 for a in agents)
            assert all(a.status()["connected"] for a in agents)
            if term == MAX_TERM:  # ignored: the cluster elects as if it were not there
                assert c.leader() == "n1"
                assert metric(c.agents["n1"], "hasync_lease_records_ignored_total",
                              reason="term at the protocol's limit") >= 1
            else:  # followed: a claim past it cannot be made, so nobody leads (forged records: issue 14)
                assert c.leader() is None
                assert all(a.election.term == term for a in agents)
                # and nobody tries: a claim of MAX_TERM would be ignored by all, itself included, forever
                assert all(metric(a, "hasync_claims_total") == 0 for a in agents)

    run(scenario)
    if term < MAX_TERM:
        assert sum("where no later term can be claimed" in r.getMessage() for r in caplog.records) == 2  # once each


def test_a_failing_handler_is_counted_and_the_agent_carries_on(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            n2 = c.agents["n2"]
            real = n2.election.handle
            failures = {"left": 3}

            def flaky(event: Any, now: float) -> Any:
                if type(event).__name__ == "HeartbeatReceived" and failures["left"] > 0:
                    failures["left"] -= 1
                    raise RuntimeError("a bug")
                return real(event, now)

            monkeypatch.setattr(n2.election, "handle", flaky)
            await asyncio.sleep(5)
            assert metric(n2, "hasync_internal_errors_total", where="election") == 3
            await c.kill("n1")
            assert await c.wait_for_leader(other_than="n1") == "n2"

    run(scenario)


def test_a_task_that_fails_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            agent = c.make("n1")
            real = agent._ticker
            calls = {"n": 0}

            async def broken_once() -> None:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("a bug in the ticker")
                await real()

            monkeypatch.setattr(agent, "_ticker", broken_once)
            c.agents.pop("n1", None)
            task = asyncio.create_task(agent.run())
            await asyncio.sleep(LEASE + 2)
            assert agent.is_primary()
            assert metric(agent, "hasync_internal_errors_total", where="ticker") == 1
            agent.stop()
            await task

    run(scenario)


# ---- Home Assistant -----------------------------------------------------------------------------------


def test_home_assistants_health_gates_leadership() -> None:
    async def scenario() -> None:
        ha1, ha2 = FakeHomeAssistant(), FakeHomeAssistant()
        async with inprocess.cluster() as c:
            await c.add("n1", priority=100, ha=ha1)
            await c.add("n2", priority=90, ha=ha2)
            assert await c.wait_for_leader() == "n1"
            await asyncio.sleep(LEASE)
            ha1.mqtt_connected = False  # n1's HA cannot reach the broker: n1 must not lead
            assert await c.wait_for_leader(other_than="n1", timeout=10) == "n2"
            [demotion] = [e for e in c.events if e["event"] == "demote"]
            assert demotion["reason"].startswith("unhealthy: Home Assistant: Home Assistant's MQTT connection")
            assert [e for e in c.events if e["event"] == "fault" and e["node"] == "n1"]
            assert c.agents["n1"].status()["role"] == "fault"
            ha1.mqtt_connected = True
            await eventually(lambda: c.agents["n1"].status()["eligible"], 15, "n1 to be eligible again")

    run(scenario)


def test_managed_mode_keeps_automations_on_only_on_the_primary() -> None:
    async def scenario() -> None:
        automations = {"automation.lights": ("on", {}), "automation.heating": ("on", {}),
                       "automation.everywhere": ("on", {})}
        has = {n: FakeHomeAssistant(entities=dict(automations)) for n in ("n1", "n2")}
        managed = {"managed_automations": True, "run_everywhere": ["automation.everywhere"]}
        async with inprocess.cluster() as c:
            for node, priority in (("n1", 100), ("n2", 90)):
                await c.add(node, priority=priority, ha=has[node], homeassistant=managed)

            def states(node: str) -> list[str | None]:
                return [has[node].state(e) for e in automations]

            await eventually(lambda: states("n2") == ["off", "off", "on"] and states("n1") == ["on", "on", "on"],
                             15, "automations on only on the primary (n1)")
            await c.kill("n1")
            await eventually(lambda: states("n2") == ["on", "on", "on"], 5, "the new primary's automations on")

    run(scenario)


def test_discovery_shows_each_node_in_home_assistant_and_comes_back_after_ha_restarts() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await c.add("n1", homeassistant={"discovery": True})
            await c.wait_for_leader()
            configs = {t for t in c.fake.model.retained if t.startswith("homeassistant/")}
            assert "homeassistant/binary_sensor/hasync_test_n1/primary/config" in configs and len(configs) == 8
            states = [p for p in c.fake.model.log if p.topic == T.primary_state("n1")]
            await asyncio.sleep(5)
            newer = [p for p in c.fake.model.log if p.topic == T.primary_state("n1")][len(states):]
            assert 9 <= len(newer) <= 11  # every renew interval, not retained
            assert all(json.loads(p.payload)["primary"] and not p.retain for p in newer)
            published = len(c.fake.model.log)
            c.fake.inject("homeassistant/status", b"online")  # HA restarted: it needs everything again
            await asyncio.sleep(0.1)
            again = {p.topic for p in list(c.fake.model.log)[published:]}
            assert configs <= again

    run(scenario)


def test_status_and_metrics_show_the_role_with_bounded_labels() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            for _ in range(3):  # handovers back and forth: demotion labels must not grow with terms
                leader = c.leader()
                assert leader is not None
                command(c.fake, leader, command="step_down")
                await c.wait_for_leader(other_than=leader)
                command(c.fake, leader, command="resume")
            n1 = c.agents["n1"]
            status = n1.status()
            assert status["node"] == "n1" and status["connected"] and status["role"] in ("primary", "standby")
            text = n1._render_metrics().decode()
            assert 'hasync_role{role="standby"}' in text and 'hasync_role{role="primary"}' in text
            demotions = [line for line in text.splitlines() if line.startswith("hasync_demotions_total{")]
            assert demotions == ['hasync_demotions_total{reason="step_down"} 1.0'] or len(demotions) <= 2, demotions

    run(scenario)


# ---- start-up errors are one clear line ------------------------------------------------------------------


def test_an_events_file_in_a_missing_directory_is_one_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        agent = Agent(inprocess.config("n1", events_file=str(tmp_path / "missing" / "n1.events")),
                      connect=FakeMqtt().connect, clock=vclock.clock, wall=vclock.wall)
        with pytest.raises(AgentError, match=r"cannot open events_file .*missing/n1.events: No such file"):
            async with agent:
                pass

    run(scenario)


def test_a_busy_http_port_is_one_clear_error() -> None:
    async def scenario() -> None:
        port = free_port()
        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
        try:
            agent = Agent(inprocess.config("n1", http={"enabled": True, "port": port}), connect=FakeMqtt().connect)
            with pytest.raises(AgentError, match=rf"cannot serve the HTTP endpoints on 127.0.0.1:{port}: "):
                async with agent:
                    pass
        finally:
            blocker.close()

    asyncio.run(scenario())


def test_an_agent_leaving_on_an_error_still_hands_over_and_says_offline() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            n1 = c.agents.pop("n1")
            task = c._tasks.pop("n1")
            task.cancel()  # as if the code around the agent failed: __aexit__ runs with an exception
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await c.wait_for_leader(other_than="n1", timeout=0.5) == "n2"  # released, no lease wait
            assert heartbeat_of(c.fake, "n1").online is False  # type: ignore[union-attr]
            assert not n1.is_primary()

    run(scenario)


def test_a_forged_release_at_the_last_claimable_term_causes_no_claim_storm() -> None:
    """Found by the fuzzer: after a release at MAX_TERM - 1 every node claimed MAX_TERM, which every
    reader (itself included) ignores, and claimed again at once, forever: a busy loop flooding the broker."""

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            c.fake.inject(T.lease, release("rogue", MAX_TERM - 1, 3).to_payload())
            await asyncio.sleep(30)  # on a real loop: a core at 100 % (the virtual clock raises BusyLoopError)
            assert all(metric(a, "hasync_claims_total") <= 1 for a in c.agents.values())
            assert c.leader() is None

    run(scenario)


def test_what_a_message_says_reaches_the_log_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            await three(c)
            forged = {**json.loads(renew("n1", 1, 1).to_payload()), "x\nFAKE LOG LINE": 1}
            c.fake.inject(T.lease, json.dumps(forged).encode())
            await asyncio.sleep(1)

    run(scenario)
    dropped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped a message")]
    assert dropped and all("\n" not in line for line in dropped), dropped


def test_publishes_the_broker_never_acknowledges_are_counted_and_free_their_slots() -> None:
    async def scenario() -> None:
        fake = FakeMqtt(ack_delay=3600.0)  # a broker that takes everything and acknowledges nothing
        async with inprocess.cluster(fake) as c:
            agent = await c.add("n1")
            await asyncio.sleep(60)
            assert agent.is_primary()  # only echoes count, not acknowledgements
            assert metric(agent, "hasync_publishes_unacknowledged_total") > 50
            assert agent.publisher.in_flight < 120

    run(scenario)
