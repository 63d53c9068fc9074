"""Entity sync in-process: agents with the memory backend or the fake Home Assistant, on the fake broker,
on virtual time. Propagation exactly once, conflicts, restarts, late joiners, a broker that goes away,
garbage on the bus, Home Assistant refusing values and deleting helpers. The same paths against real
brokers and real Home Assistants are in test_sync_agents.py and test_ha_sync.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from harness import inprocess, vclock
from harness.fakebroker import FakeMqtt
from harness.fakeha import FakeHomeAssistant
from harness.inprocess import metric
from harness.wait import eventually
from hasync.agent import Agent
from hasync.sync.memory import MemoryBackend
from hasync.sync.state import EntityRecord
from hasync.topics import Topics
from hasync.transport import ConnectionLost

T = Topics(inprocess.PREFIX, inprocess.CLUSTER)
MEMORY = {"sync": {"backend": "memory", "retry_interval": 1.0}}
FLAG = "input_boolean.flag"


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


def memory(agent: Agent) -> MemoryBackend:
    assert agent.replica is not None
    backend = agent.replica.backend
    assert isinstance(backend, MemoryBackend)
    return backend


def held(agent: Agent) -> dict[str, str]:
    return {e: v[0] for e, v in memory(agent).entities.items()}


def synced(agent: Agent) -> bool:
    return bool((agent.status()["sync"] or {}).get("synced"))


def settled(agent: Agent) -> bool:
    sync = agent.status()["sync"] or {}
    return sync.get("pending") == 0 and sync.get("queued") == 0


async def start(c: inprocess.Cluster, *nodes: str, **settings: Any) -> list[Agent]:
    agents = [await c.add(node, priority=100 - i, **{**MEMORY, **settings}) for i, node in enumerate(nodes)]
    await eventually(lambda: all(synced(a) for a in agents), 10, "every agent to sync")
    return agents


def publishes(fake: FakeMqtt, entity_id: str) -> int:
    return sum(1 for p in fake.model.log if p.topic == T.entity(entity_id))


def test_a_change_reaches_every_peer_exactly_once() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            n1, n2, n3 = await start(c, "n1", "n2", "n3")
            memory(n1).set_local(FLAG, "on")
            await eventually(lambda: held(n2).get(FLAG) == held(n3).get(FLAG) == "on", 1, "the change everywhere")
            await asyncio.sleep(30)  # quiet: nothing more may happen
            assert [[e.entity_id for e in memory(a).applied_since(0)] for a in (n1, n2, n3)] == [[], [FLAG], [FLAG]]
            assert publishes(c.fake, FLAG) == 1
            assert all(settled(a) for a in (n1, n2, n3))

    run(scenario)


def test_concurrent_changes_of_one_entity_converge_everywhere() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            n1, n2, n3 = await start(c, "n1", "n2", "n3")
            for round_ in range(5):
                memory(n1).set_local(FLAG, f"n1-{round_}")
                memory(n2).set_local(FLAG, f"n2-{round_}")
                await eventually(lambda: len({held(a).get(FLAG) for a in (n1, n2, n3)}) == 1, 2, "agreement")
                await asyncio.sleep(1)
                assert len({held(a).get(FLAG) for a in (n1, n2, n3)}) == 1
                await asyncio.sleep(0.003)

    run(scenario)


def test_a_restarted_agent_and_a_late_joiner_catch_up() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            n1, _n2, _n3 = await start(c, "n1", "n2", "n3")
            await c.stop("n3")
            values = {f"input_number.n{i}": str(i) for i in range(50)}
            for entity_id, value in values.items():
                memory(n1).set_local(entity_id, value)
            [n3] = await start(c, "n3")
            [n4] = await start(c, "n4")
            await eventually(lambda: all(held(a) == values for a in (n3, n4)), 5, "the newcomers to hold everything")

    run(scenario)


def test_changes_made_while_the_broker_was_away_meet_when_it_is_back() -> None:
    async def scenario() -> None:
        fake = FakeMqtt()
        async with inprocess.cluster(fake) as c:
            n1, n2 = await start(c, "n1", "n2")
            memory(n1).set_local("input_text.note", "before")
            await eventually(lambda: held(n2).get("input_text.note") == "before", 1, "the first change")
            fake.refuse = ConnectionLost("Connection refused")
            fake.restart(keep_retained=False)  # as amqtt, or Mosquitto without persistence
            await asyncio.sleep(1)
            memory(n1).set_local("input_boolean.b1", "on")  # made while nobody can publish
            memory(n2).set_local("input_boolean.b2", "on")
            memory(n2).set_local("input_text.note", "made offline")
            await asyncio.sleep(5)
            fake.refuse = None
            expected = {"input_text.note": "made offline", "input_boolean.b1": "on", "input_boolean.b2": "on"}
            await eventually(lambda: held(n1) == held(n2) == expected, 5, "both nodes to hold both changes")
            [n3] = await start(c, "n3")
            await eventually(lambda: held(n3) == expected, 5, "a new node to find everything retained again")

    run(scenario)


@pytest.mark.parametrize("garbage", [b"not json", b"", b"{}", "other"])
def test_retained_garbage_on_an_entity_topic_is_repaired_by_a_node_that_knows_better(garbage: bytes | str) -> None:
    """Garbage, an empty payload clearing the topic, or another entity's record, retained on an entity's
    topic: a node that holds a valid record publishes it again, so a node that joins later gets the
    entity. (Before the repair, a later joiner never got it until someone changed it.)"""

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            n1, n2 = await start(c, "n1", "n2")
            memory(n1).set_local(FLAG, "on")
            memory(n1).set_local("input_boolean.other", "off")
            await eventually(lambda: held(n2).get(FLAG) == "on", 1, "the change")
            payload = garbage if isinstance(garbage, bytes) else c.fake.model.retained[T.entity("input_boolean.other")]
            c.fake.inject(T.entity(FLAG), payload, retain=True)
            await asyncio.sleep(1)
            retained = c.fake.model.retained.get(T.entity(FLAG))
            assert retained is not None and EntityRecord.model_validate_json(retained).state == "on"
            [n3] = await start(c, "n3")
            await eventually(lambda: held(n3).get(FLAG) == "on", 5, "the joiner to get the entity")
            if garbage:
                assert metric(n1, "hasync_messages_dropped_total", topic="entity") >= 1

    run(scenario)


def test_a_value_nobody_changed_has_no_age() -> None:
    """A value published with the lowest version (stamp 0: nobody changed it while an agent watched) once
    made a peer report a lag of 56 years."""

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            n1, n2 = await start(c, "n1", "n2")
            memory(n1).set_local("counter.new", "3")  # appears: its first value is no change
            await eventually(lambda: held(n2).get("counter.new") == "3", 1, "the new entity")
            assert n2.status()["sync"]["lag_seconds"] is None
            assert metric(n2, "hasync_sync_lag_seconds_sum") == 0
            memory(n1).set_local("counter.new", "4")  # a change: a real stamp, a real (small) lag
            await eventually(lambda: held(n2).get("counter.new") == "4", 1, "the change")
            assert 0 <= n2.status()["sync"]["lag_seconds"] < 1

    run(scenario)


def test_a_record_too_large_for_the_bus_is_not_published() -> None:
    async def scenario() -> None:
        async with inprocess.cluster() as c:
            n1, _ = await start(c, "n1", "n2")
            memory(n1).set_local("input_select.huge", "a", {"options": ["x" * 100] * 200})
            await asyncio.sleep(1)
            assert publishes(c.fake, "input_select.huge") == 0
            assert metric(n1, "hasync_sync_dropped_total", reason="too_large") == 1

    run(scenario)


def test_a_chatty_entity_is_throttled_and_its_newest_value_still_arrives() -> None:
    async def scenario() -> None:
        throttle = {"sync": {**MEMORY["sync"], "include": {"entity_globs": ["sensor.*"]},
                             "throttle": [{"entity_globs": ["sensor.*_power"], "min_interval": 5}]}}
        async with inprocess.cluster() as c:
            n1, n2 = await start(c, "n1", "n2", **throttle)
            for watts in range(100):
                memory(n1).set_local("sensor.oven_power", str(watts))
                await asyncio.sleep(0.1)
            await eventually(lambda: held(n2).get("sensor.oven_power") == "99", 6, "the newest value")
            assert publishes(c.fake, "sensor.oven_power") <= 4  # one per 5 s over 10 s, plus the newest

    run(scenario)


def test_without_the_marker_the_reconcile_window_closes_after_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        fake = FakeMqtt()
        fake.model.acl = lambda client, topic: not topic.endswith("/sync-marker")
        async with inprocess.cluster(fake) as c:
            agent = await c.add("n1", **MEMORY)
            await asyncio.sleep(4.9)
            assert not synced(agent)
            await asyncio.sleep(0.2)
            assert synced(agent)  # sync.reconcile_timeout, 5 s
        assert any("marker did not come back" in r.getMessage() for r in caplog.records)

    run(scenario)


# ---- through (fake) Home Assistants --------------------------------------------------------------------

HELPERS = {"input_boolean.flag": ("off", {}), "input_number.level": ("0.0", {"min": 0, "max": 100}),
           "light.kitchen": ("off", {})}


async def ha_pair(c: inprocess.Cluster, *has: FakeHomeAssistant) -> list[Agent]:
    agents = [await c.add(f"n{i + 1}", priority=100 - i, ha=ha, sync={"retry_interval": 1.0})
              for i, ha in enumerate(has)]
    await eventually(lambda: all(synced(a) and a.status()["home_assistant"]["healthy"] for a in agents), 15,
                     "both agents synced and their HA healthy")
    return agents


def changes_of(ha: FakeHomeAssistant, entity_id: str) -> int:
    """How many times the entity's state changed in this HA (scene.apply calls that touched it)."""
    return sum(1 for call in ha.service_calls("scene", "apply")
               if entity_id in (call.get("service_data") or {}).get("entities", {}))


def test_a_change_in_one_home_assistant_is_applied_once_in_the_other_and_not_echoed() -> None:
    async def scenario() -> None:
        ha1, ha2 = FakeHomeAssistant(entities=dict(HELPERS)), FakeHomeAssistant(entities=dict(HELPERS))
        async with inprocess.cluster() as c:
            await ha_pair(c, ha1, ha2)
            await asyncio.sleep(1)
            initial = publishes(c.fake, "input_boolean.flag")  # each node's unchanged value, at the lowest version
            ha1.set_state("input_boolean.flag", "on")
            await eventually(lambda: ha2.state("input_boolean.flag") == "on", 1, "the change in HA 2")
            ha2.set_state("input_number.level", "42.0")
            await eventually(lambda: ha1.state("input_number.level") == "42.0", 1, "the change in HA 1")
            await asyncio.sleep(20)
            assert (changes_of(ha1, "input_boolean.flag"), changes_of(ha2, "input_boolean.flag")) == (0, 1)
            assert (changes_of(ha1, "input_number.level"), changes_of(ha2, "input_number.level")) == (1, 0)
            assert publishes(c.fake, "input_boolean.flag") == initial + 1
            assert ha1.state("light.kitchen") == "off" and not publishes(c.fake, "light.kitchen")  # not selected

    run(scenario)


def test_a_value_home_assistant_does_not_take_fails_with_a_reason_and_is_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        ha1 = FakeHomeAssistant(entities=dict(HELPERS))
        ha2 = FakeHomeAssistant(entities={**HELPERS, "input_number.level": ("0.0", {"min": 0, "max": 10})})
        async with inprocess.cluster() as c:
            _, n2 = await ha_pair(c, ha1, ha2)
            ha1.set_state("input_number.level", "50.0")
            await asyncio.sleep(5)
            assert ha2.state("input_number.level") == "0.0"
            assert metric(n2, "hasync_sync_apply_failures_total") >= 2  # retried every retry_interval
            ha1.set_state("input_number.level", "5.0")
            await eventually(lambda: ha2.state("input_number.level") == "5.0", 2, "a value HA 2 takes")
        assert any("did not take '50.0'" in r.getMessage() for r in caplog.records)

    run(scenario)


def test_a_helper_deleted_in_one_home_assistant_is_deleted_in_the_other() -> None:
    async def scenario() -> None:
        ha1, ha2 = FakeHomeAssistant(entities=dict(HELPERS)), FakeHomeAssistant(entities=dict(HELPERS))
        for ha in (ha1, ha2):
            ha.add("input_boolean.ui_made", "off", ui_helper=True)
        async with inprocess.cluster() as c:
            await ha_pair(c, ha1, ha2)
            ha1.remove("input_boolean.ui_made")
            await eventually(lambda: ha2.state("input_boolean.ui_made") is None, 2, "the deletion in HA 2")
            ha1.remove("input_boolean.flag")  # a YAML helper: HA 2 cannot delete it, and says why
            await asyncio.sleep(3)
            assert ha2.state("input_boolean.flag") == "off"

    run(scenario)


def test_a_home_assistant_that_was_down_catches_up() -> None:
    async def scenario() -> None:
        ha1, ha2 = FakeHomeAssistant(entities=dict(HELPERS)), FakeHomeAssistant(entities=dict(HELPERS))
        async with inprocess.cluster() as c:
            await ha_pair(c, ha1, ha2)
            ha2.stop()
            await asyncio.sleep(3)
            ha1.set_state("input_boolean.flag", "on")
            ha1.set_state("input_number.level", "7.0")
            await asyncio.sleep(3)
            ha2.start()
            await eventually(lambda: (ha2.state("input_boolean.flag"), ha2.state("input_number.level")) == (
                "on", "7.0"), 35, "HA 2 to catch up after it is back")

    run(scenario)


def test_the_echo_of_our_own_record_is_recognised_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record an agent publishes comes back to it (it subscribes to every entity topic); a payload
    identical to one it encoded is taken as that record, unparsed. Anything else is parsed as before, and
    our own bytes on another entity's topic are still refused."""
    from hasync.sync import replica

    parsed: list[bytes] = []
    original = replica.parse

    def counting_parse(model: type[EntityRecord], payload: bytes) -> EntityRecord:
        parsed.append(payload)
        return original(model, payload)

    async def scenario() -> None:
        async with inprocess.cluster() as c:
            [n1] = await start(c, "n1")
            monkeypatch.setattr(replica, "parse", counting_parse)
            for i in range(10):
                memory(n1).set_local(f"input_number.n{i}", str(i))
            await eventually(lambda: all(settled(a) for a in [n1]), 2, "n1 to see its records come back")
            assert publishes(c.fake, "input_number.n0") == 1
            assert parsed == []
            own = c.fake.model.retained[T.entity("input_number.n0")]
            c.fake.inject(T.entity("input_number.n1"), own, retain=False)
            c.fake.inject(T.entity("input_number.n2"), b"not json", retain=False)
            await eventually(lambda: metric(n1, "hasync_messages_dropped_total", topic="entity") == 2, 1, "drops")
            assert parsed == [own, b"not json"]

    run(scenario)
