"""The hub's exporter (hasync.federation.hub) in a real agent, on the fake broker and a fake Home Assistant
whose registries change while it exports (harness.inprocess, harness.fakeha), on virtual time.

What main holds is the fake broker's retained store; what the exporter asked Home Assistant is the fake's
``calls``."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from harness import inprocess, vclock
from harness.fakebroker import FakeMqtt
from harness.fakeha import FakeHomeAssistant
from harness.inprocess import metric
from harness.wait import eventually
from hasync.agent import Agent
from hasync.federation.export import Entry, Hub, uid
from hasync.federation.hub import REREAD_LONGEST

GRACE = 120.0  # virtual seconds cost real ones too (the agents' heartbeats): shorter than the default
HUB = Hub(inprocess.PREFIX, inprocess.CLUSTER)
KITCHEN = uid(Entry("light.kitchen", platform="hue", unique_id="0017-0b"))
PUMP = uid(Entry("switch.pump", platform="zwave_js", unique_id="5-37-0"))
LIGHT_ATTRIBUTES = {"supported_color_modes": ["brightness"], "color_mode": "brightness", "brightness": 100,
                    "friendly_name": "Kitchen"}


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


def hub_ha() -> FakeHomeAssistant:
    """A hub: a light on a device in the kitchen, a switch without a device."""
    ha = FakeHomeAssistant()
    ha.add_area("kitchen", "Kitchen")
    ha.add_device("d1", "Ceiling", identifiers=[["hue", "0017"]], area_id="kitchen", manufacturer="Signify")
    ha.register("light.kitchen", platform="hue", unique_id="0017-0b", device_id="d1", original_name="Kitchen")
    ha.add("light.kitchen", "on", LIGHT_ATTRIBUTES)
    ha.register("switch.pump", platform="zwave_js", unique_id="5-37-0", original_name="Pump")
    ha.add("switch.pump", "off", {"friendly_name": "Pump"})
    return ha


def federation(**rules: Any) -> dict[str, Any]:
    return {"include": rules or {"domains": ["light", "switch"]}, "removal_grace": GRACE}


def config(topic: str, fake: FakeMqtt) -> dict[str, Any] | None:
    payload = fake.model.retained.get(topic)
    return None if payload is None else json.loads(payload)


def state(entity_uid: str, fake: FakeMqtt) -> dict[str, Any] | None:
    payload = fake.model.retained.get(HUB.topics(entity_uid).state)
    return None if payload is None else json.loads(payload)


def cleared(topic: str, fake: FakeMqtt) -> list[float]:
    """Empty retained publishes on ``topic`` (a clear), by sequence number."""
    return [p.seq for p in fake.model.log if p.topic == topic and p.retain and not p.payload]


async def exporting(c: inprocess.Cluster, ha: FakeHomeAssistant, *, node: str = "hub1", **settings: Any) -> Agent:
    agent = await c.add(node, ha=ha, federation=settings.pop("federation", federation()), **settings)
    await eventually(lambda: c.fake.model.retained.get(HUB.status_topic) == b"online", 30, "the hub online")
    return agent


LIGHT_TOPIC = HUB.config_topic("light", KITCHEN)
PUMP_TOPIC = HUB.config_topic("switch", PUMP)


def test_a_burst_of_registry_events_is_one_read_and_every_new_entity_is_exported() -> None:
    async def scenario() -> None:
        ha = hub_ha()
        async with inprocess.cluster() as c:
            agent = await exporting(c, ha)
            reads = len(ha.commands("config/entity_registry/list"))
            for i in range(500):  # an integration setting up 500 entities over 2.5 s
                ha.register(f"switch.s{i:03d}", platform="zwave_js", unique_id=f"s{i}")
                ha.add(f"switch.s{i:03d}", "on")
                if i % 2:
                    await asyncio.sleep(0.01)
            await eventually(lambda: metric(agent, "hasync_federation_exported") == 502, 30, "502 exported")
            topics = [HUB.config_topic("switch", uid(Entry(f"switch.s{i:03d}", platform="zwave_js",
                                                            unique_id=f"s{i}"))) for i in range(500)]
            assert all(t in c.fake.model.retained for t in topics)
            assert state(uid(Entry("switch.s499", platform="zwave_js", unique_id="s499")), c.fake) == {
                "state": "on", "attributes": {}}
            # One read per REREAD_LONGEST of the burst at most, not one per event.
            assert len(ha.commands("config/entity_registry/list")) - reads <= 1 + 2.5 / REREAD_LONGEST
            assert not ha.commands("config/device_registry/list")[1:]  # only the entities changed

    run(scenario)


def test_a_rename_on_the_hub_keeps_main_s_topic_and_unique_id_and_follows_the_new_entity_id() -> None:
    async def scenario() -> None:
        ha = hub_ha()
        async with inprocess.cluster() as c:
            await exporting(c, ha)
            before = config(LIGHT_TOPIC, c.fake)
            assert before is not None and before["object_id"] == "test_kitchen"
            ha.update_entry("light.kitchen", new_entity_id="light.kitchen_ceiling", name="Ceiling light")
            await eventually(lambda: (config(LIGHT_TOPIC, c.fake) or {}).get("object_id") == "test_kitchen_ceiling",
                             30, "the config published again")
            after = config(LIGHT_TOPIC, c.fake)
            assert after is not None
            assert after["unique_id"] == before["unique_id"] == f"hasync_fed_test_{KITCHEN}"
            assert after["name"] == "Ceiling light"
            assert after["state_topic"] == before["state_topic"]
            ha.set_state("light.kitchen_ceiling", "off")  # the state follows the new entity id
            await eventually(lambda: (state(KITCHEN, c.fake) or {}).get("state") == "OFF", 10, "the new state")
            c.fake.inject(HUB.topics(KITCHEN).command(), b'{"state": "ON"}')  # and main's commands
            await eventually(lambda: ha.service_calls("light", "turn_on"), 10, "the command")
            assert ha.service_calls("light", "turn_on")[-1]["target"] == {"entity_id": "light.kitchen_ceiling"}
            await asyncio.sleep(GRACE + 60)
            assert not cleared(LIGHT_TOPIC, c.fake)  # never retired: a rename is not a removal
            assert [t for t in c.fake.model.retained if t.endswith("/config")] == sorted([LIGHT_TOPIC, PUMP_TOPIC])

    run(scenario)


def test_a_removed_entity_is_unavailable_at_once_and_cleared_only_after_the_grace() -> None:
    async def scenario() -> None:
        ha = hub_ha()
        async with inprocess.cluster() as c:
            agent = await exporting(c, ha)
            removed = vclock.clock()
            ha.unregister("switch.pump")
            await eventually(lambda: (state(PUMP, c.fake) or {}).get("state") == "unavailable", 10, "unavailable")
            assert metric(agent, "hasync_federation_retiring") == 1
            assert PUMP_TOPIC in c.fake.model.retained  # not deleted on main yet
            await eventually(lambda: PUMP_TOPIC not in c.fake.model.retained, GRACE + 30, "the config cleared")
            assert vclock.clock() - removed >= GRACE
            assert HUB.topics(PUMP).state not in c.fake.model.retained  # its state cleared too
            assert LIGHT_TOPIC in c.fake.model.retained
            assert metric(agent, "hasync_federation_cleared_total") == 1
            assert metric(agent, "hasync_federation_retiring") == 0

    run(scenario)


def test_an_entity_back_within_the_grace_loses_nothing_on_main() -> None:
    async def scenario() -> None:
        ha = hub_ha()
        async with inprocess.cluster() as c:
            await exporting(c, ha)
            ha.unregister("switch.pump")  # an integration reloading: removed, then set up again
            await eventually(lambda: (state(PUMP, c.fake) or {}).get("state") == "unavailable", 10, "unavailable")
            await asyncio.sleep(GRACE / 2)
            ha.register("switch.pump", platform="zwave_js", unique_id="5-37-0", original_name="Pump")
            ha.add("switch.pump", "on")
            await eventually(lambda: (state(PUMP, c.fake) or {}).get("state") == "on", 10, "back on main")
            await asyncio.sleep(GRACE)
            assert not cleared(PUMP_TOPIC, c.fake)
            assert config(PUMP_TOPIC, c.fake) is not None

    run(scenario)


def test_disabled_or_moved_out_of_the_selection_is_a_removal_too() -> None:
    async def scenario() -> None:
        ha = hub_ha()
        ha.add_area("garden", "Garden")
        async with inprocess.cluster() as c:
            await exporting(c, ha, federation=federation(areas=["Kitchen"], entities=["switch.pump"]))
            ha.update_entry("switch.pump", disabled_by="user")
            ha.update_device("d1", area_id="garden")  # the light's area is its device's
            await eventually(lambda: not {PUMP_TOPIC, LIGHT_TOPIC} & set(c.fake.model.retained), GRACE + 30,
                             "both cleared")

    run(scenario)


def test_configs_of_a_previous_run_are_cleared_after_the_grace_and_nobody_else_s_ever() -> None:
    async def scenario() -> None:
        fake = FakeMqtt()
        old_uid, foreign_uid = "u" + "0" * 24, "u" + "1" * 24
        stale = HUB.config_topic("switch", old_uid)  # exported by an earlier run, gone since
        other_hub = Hub(inprocess.PREFIX, "radios")
        theirs = other_hub.config_topic("switch", old_uid)  # another hub's: another node id
        not_ours = HUB.config_topic("switch", foreign_uid)  # under our node id, but not our unique id
        fake.inject(stale, json.dumps({"unique_id": f"hasync_fed_test_{old_uid}", "name": "old"}).encode(),
                    retain=True)
        fake.inject(theirs, json.dumps({"unique_id": f"hasync_fed_radios_{old_uid}"}).encode(), retain=True)
        fake.inject(not_ours, json.dumps({"unique_id": "somebody_else"}).encode(), retain=True)
        fake.inject(HUB.config_topic("switch", "x"), b"not json", retain=True)
        ha = hub_ha()
        async with inprocess.cluster(fake) as c:
            started = vclock.clock()
            await exporting(c, ha)
            await eventually(lambda: (state(old_uid, fake) or {}).get("state") == "unavailable", 10, "unavailable")
            assert stale in fake.model.retained
            await eventually(lambda: stale not in fake.model.retained, GRACE + 30, "the stale config cleared")
            assert vclock.clock() - started >= GRACE
            await asyncio.sleep(GRACE)
            assert {theirs, not_ours, HUB.config_topic("switch", "x"), LIGHT_TOPIC, PUMP_TOPIC} <= set(
                fake.model.retained)
            assert cleared(stale, fake) and not [p for p in fake.model.log if not p.payload and p.topic in (
                theirs, not_ours, LIGHT_TOPIC, PUMP_TOPIC)]

    run(scenario)


def test_a_standby_of_a_hub_pair_never_clears_anything() -> None:
    """The standby's Home Assistant lacks the light the primary exports: were the standby to export, the light
    would retire and be cleared. It never publishes under the discovery prefix at all."""

    async def scenario() -> None:
        standby_ha = FakeHomeAssistant()
        standby_ha.register("switch.pump", platform="zwave_js", unique_id="5-37-0")
        standby_ha.add("switch.pump", "off")
        async with inprocess.cluster() as c:
            await exporting(c, hub_ha(), node="a", priority=200)
            await c.add("b", ha=standby_ha, federation=federation(), priority=100)
            await asyncio.sleep(2 * GRACE)
            assert c.leader() == "a"
            assert LIGHT_TOPIC in c.fake.model.retained and not cleared(LIGHT_TOPIC, c.fake)
            assert not [p for p in c.fake.model.log if (p.client_id or "").startswith("hasync-b-")
                        and p.topic.startswith("homeassistant/")]

    run(scenario)


def test_a_hub_whose_home_assistant_imports_its_own_exports_warns_and_never_exports_them(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        ha = hub_ha()
        async with inprocess.cluster() as c:
            agent = await exporting(c, ha)
            assert metric(agent, "hasync_federation_self_imported") == 0
            # What the hub's HA does when it reads the prefix the hub exports to: MQTT copies of the exports.
            ha.register("light.test_kitchen", platform="mqtt", unique_id=f"hasync_fed_test_{KITCHEN}")
            ha.add("light.test_kitchen", "on", LIGHT_ATTRIBUTES)
            ha.register("switch.test_pump", platform="mqtt", unique_id=f"hasync_fed_test_{PUMP}")
            ha.add("switch.test_pump", "off")
            await eventually(lambda: metric(agent, "hasync_federation_self_imported") == 2, 10, "the self-check")
            assert agent.status()["federation"]["self_imported"] == 2
            assert metric(agent, "hasync_federation_exported") == 2  # the copies are not exported
            assert [t for t in c.fake.model.retained if t.endswith("/config")] == sorted([LIGHT_TOPIC, PUMP_TOPIC])

    with caplog.at_level(logging.WARNING, logger="hasync.federation.hub"):
        run(scenario)
    warnings = [r.getMessage() for r in caplog.records if "reads the discovery prefix" in r.getMessage()]
    assert len(warnings) == 1 and "2 MQTT copies" in warnings[0], warnings


def test_changes_missed_while_home_assistant_was_unreachable_are_read_after_it_is_back() -> None:
    """Losing Home Assistant makes the hub unhealthy (it stops exporting, main's entities stay): the next
    export reads everything again."""

    async def scenario() -> None:
        ha = hub_ha()
        async with inprocess.cluster() as c:
            await exporting(c, ha)
            ha.stop()
            ha.register("switch.fountain", platform="zwave_js", unique_id="7-37-0")  # no event reaches the hub
            ha.add("switch.fountain", "on")
            ha.unregister("switch.pump")
            ha.set_state("light.kitchen", "off", LIGHT_ATTRIBUTES)
            await asyncio.sleep(30)
            ha.start()
            fountain = HUB.config_topic("switch", uid(Entry("switch.fountain", platform="zwave_js",
                                                             unique_id="7-37-0")))
            await eventually(lambda: fountain in c.fake.model.retained, 60, "the fountain exported")
            await eventually(lambda: (state(PUMP, c.fake) or {}).get("state") == "unavailable", 10, "pump retiring")
            await eventually(lambda: (state(KITCHEN, c.fake) or {}).get("state") == "OFF", 10, "the light's state")

    run(scenario)


def test_an_entity_without_a_registry_entry_retires_when_its_state_goes_and_returns_with_it() -> None:
    async def scenario() -> None:
        ha = hub_ha()
        ha.add("lock.front_door", "locked")  # no unique id: exported only when named
        door = uid(Entry("lock.front_door"))
        topic = HUB.config_topic("lock", door)
        async with inprocess.cluster() as c:
            await exporting(c, ha, federation=federation(entities=["lock.front_door"]))
            assert topic in c.fake.model.retained
            ha.remove("lock.front_door")  # its integration reloading
            await eventually(lambda: (state(door, c.fake) or {}).get("state") == "unavailable", 10, "unavailable")
            await asyncio.sleep(60)
            ha.add("lock.front_door", "unlocked")
            await eventually(lambda: (state(door, c.fake) or {}).get("state") == "unlocked", 10, "back")
            await asyncio.sleep(GRACE)
            assert not cleared(topic, c.fake)

    run(scenario)


def test_the_hub_exports_to_main_s_prefix_when_its_own_home_assistant_reads_another() -> None:
    async def scenario() -> None:
        main_prefix = Hub(inprocess.PREFIX, inprocess.CLUSTER, discovery_prefix="main")
        async with inprocess.cluster() as c:
            await exporting(c, hub_ha(), federation={**federation(), "discovery_prefix": "main"})
            assert {t for t in c.fake.model.retained if t.endswith("/config")} == {
                main_prefix.config_topic("light", KITCHEN), main_prefix.config_topic("switch", PUMP)}
            before = len(c.fake.model.log)
            c.fake.inject("main/status", b"online")  # main's birth on its own prefix
            await eventually(lambda: [p for p in list(c.fake.model.log)[before:]
                                      if p.topic == main_prefix.config_topic("switch", PUMP)], 10, "published again")

    run(scenario)
